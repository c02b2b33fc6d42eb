"""Prefix-cache benchmark: multi-turn chats on the engine with the prefix cache and without it, in one run
on the same weights. Several conversations run side by side (a batch per turn), or with
`--one-at-a-time` their turns are served one after another (a chat UI's users taking turns); each
turn's prompt is the whole conversation so far (a shared system prompt, every earlier question and
answer, the new question). Reports, per turn, the mean time to first token and the prompt tokens computed, for both,
and the ratios of mean time to first token: on the first turn (the chats share their system prompt)
and over the turns after it. Ends with one JSON line.

    python bench/prefix.py                           # CPU: SmolLM2-135M-Instruct, fp32
    python bench/prefix.py --out bench/results/prefix-cpu.json
    python bench/prefix.py --one-at-a-time --out bench/results/prefix-cpu-one-at-a-time.json
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from coeserve.benchmarks.common import device_name, sync, write_result
from coeserve.config import EngineConfig, default_home
from coeserve.engine.engine import Engine
from coeserve.engine.load import load_expert
from coeserve.engine.sequence import SamplingParams

SYSTEM = ("You are a careful assistant for a team of engineers. Answer in plain words, give the reason "
          "behind each answer, say when you are unsure, and keep each answer short. ") * 4
QUESTIONS = ["What does a compiler do?", "Why do caches make programs faster?", "What is a hash table?",
             "How does a CPU run two threads at once?", "What is the difference between a process and a thread?",
             "Why is memory bandwidth important for language models?", "What is a mutex for?",
             "How does a garbage collector find unused memory?"]


def converse(engine: Engine, codec, chats: int, turns: int, tokens: int, together: bool = True) -> list[dict]:
    """Run `chats` conversations of `turns` turns, each turn's prompts side by side (`together`) or one
    after another; per turn, mean time to first token and the prompt tokens computed (not found in the
    cache), and the answers (to check both runs agree)."""
    histories = [[{"role": "system", "content": SYSTEM}] for _ in range(chats)]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    out = []
    for t in range(turns):
        seqs, first = [], {}
        for group in [histories] if together else [[h] for h in histories]:
            batch = []
            for h in group:
                c = histories.index(h)
                h.append({"role": "user", "content": QUESTIONS[(c + t) % len(QUESTIONS)]})
                batch.append(engine.add(engine.make_sequence(codec.chat_prompt(h)[0], params)))
            seqs += batch
            start = time.perf_counter()
            while engine.has_work:
                engine.step()
                sync(engine.expert.device)
                now = time.perf_counter()
                for s in batch:
                    if s.output_ids and s.id not in first:
                        first[s.id] = now - start
            for h, s in zip(group, batch):
                h.append({"role": "assistant", "content": s.text})
        out.append({"ttft_s": sum(first.values()) / len(seqs), "prompt_tokens": sum(len(s.prompt_ids) for s in seqs),
                    "computed_tokens": sum(len(s.prompt_ids) - s.cached for s in seqs),
                    "answers": [s.output_ids for s in seqs]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--expert", default="smollm2-135m-instruct")
    ap.add_argument("--chats", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32, help="answer length")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="serve each turn's prompts one after another, not side by side")
    ap.add_argument("--out", help="write the JSON result here too")
    args = ap.parse_args(argv)

    from coeserve import catalog
    from coeserve.store.disk import DiskStore
    store = DiskStore(default_home())
    catalog.ensure(store, [args.expert] if args.expert in catalog.BUILTINS else [])
    expert = load_expert(store, args.expert, device=args.device, dtype=args.dtype, max_len=4096)
    runs = {}
    for cache in (False, True, False, True):  # each twice, interleaved: the best of two counts (a noisy machine)
        engine = Engine(expert, EngineConfig(max_batch=args.chats, max_seq_len=4096, prefix_cache=cache))
        turns = converse(engine, expert.codec, args.chats, args.turns, args.tokens, not args.one_at_a_time)
        name = "cache" if cache else "no_cache"
        if name in runs:
            turns = [min(a, b, key=lambda x: x["ttft_s"]) for a, b in zip(runs[name], turns)]
        runs[name] = turns
    how = "one at a time" if args.one_at_a_time else "side by side"
    same = all(a["answers"] == b["answers"] for a, b in zip(runs["cache"], runs["no_cache"]))
    print(f"{'turn':>4s} {'prompt tok':>10s} {'computed, no cache':>18s} {'computed, cache':>15s} "
          f"{'TTFT no cache':>13s} {'TTFT cache':>10s}")
    for t, (a, b) in enumerate(zip(runs["no_cache"], runs["cache"])):
        print(f"{t + 1:4d} {a['prompt_tokens']:10d} {a['computed_tokens']:18d} {b['computed_tokens']:15d} "
              f"{a['ttft_s']:12.3f}s {b['ttft_s']:9.3f}s")
    later = lambda run: sum(x["ttft_s"] for x in run[1:]) / max(1, len(run) - 1)
    result = {"bench": "prefix", "expert": expert.name, "device": device_name(expert.device),
              "dtype": str(expert.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
              "chats": args.chats, "served": how.replace(" ", "_"), "turns": args.turns,
              "answer_tokens": args.tokens, "same_answers": same,
              "ttft_s_no_cache": [x["ttft_s"] for x in runs["no_cache"]],
              "ttft_s_cache": [x["ttft_s"] for x in runs["cache"]],
              "computed_tokens_no_cache": [x["computed_tokens"] for x in runs["no_cache"]],
              "computed_tokens_cache": [x["computed_tokens"] for x in runs["cache"]],
              "ratio_ttft_first_turn": runs["no_cache"][0]["ttft_s"] / runs["cache"][0]["ttft_s"],
              "ratio_ttft_later_turns": later(runs["no_cache"]) / later(runs["cache"])}
    print(f"time to first token with the prefix cache: turn 1 (one system prompt, chats {how}) "
          f"{result['ratio_ttft_first_turn']:.2f}x faster, turns 2-{args.turns} "
          f"{result['ratio_ttft_later_turns']:.2f}x; same answers: {same}")
    write_result(result, args.out)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
