"""Speculation benchmark: greedy answers decoded with draft tokens by prompt lookup (EngineConfig.speculate)
against the same engine without them, in one run on the same weights: batch-1 decode tokens/s per
workload, the share of drafts the model kept, and whether both gave the same tokens (they must). The
workloads are chat prompts whose answers repeat their context (a passage to repeat, code to edit) and
one whose answer is prose of its own (an explanation), where drafts find less to keep, each alone
(batch 1) and then all three side by side (batch 3, aggregate tokens/s). Each rate is the best of --runs.
Ends with one JSON line.

    python bench/speculate.py                         # CPU: SmolLM2-135M-Instruct, fp32
    python bench/speculate.py --out bench/results/speculate-cpu.json
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

PASSAGE = ("The museum opens at nine in the morning and closes at six in the evening. Tickets cost twelve "
           "euros for adults and six euros for children under fourteen. Guided tours start every hour from "
           "the main hall, and the last tour leaves at five. Photography without flash is allowed in all "
           "rooms except the gallery of old maps.")
CODE = '''def load(path):
    with open(path) as f:
        lines = f.readlines()
    records = []
    for line in lines:
        name, value = line.strip().split(",")
        records.append((name, float(value)))
    return records
'''
WORKLOADS = {  # SmolLM2-135M-Instruct's greedy answers: the passage again; most of the code again; prose
    "repeat": f"Repeat the following text exactly, word for word:\n\n{PASSAGE}",
    "edit": f"Add a docstring to this Python function:\n\n```python\n{CODE}```",
    "explain": "Explain how a refrigerator keeps food cold.",
}


def decode(engine: Engine, prompts: list[list[int]], tokens: int) -> tuple[float, list[list[int]], dict]:
    """Decode tokens/s of greedy answers to the prompts side by side, their tokens, and the engine's
    draft counts for them."""
    seqs = [engine.add(engine.make_sequence(ids, SamplingParams(max_tokens=tokens, temperature=0)))
            for ids in prompts]
    while not all(s.output_ids or s.finished for s in seqs):  # the prefills (and first tokens) are not decode
        engine.step()
    sync(engine.expert.device)
    engine.speculation = {"drafted": 0, "accepted": 0}
    start, first = time.perf_counter(), sum(len(s.output_ids) for s in seqs)
    while engine.has_work:
        engine.step()
    sync(engine.expert.device)
    made = sum(len(s.output_ids) for s in seqs) - first
    return made / (time.perf_counter() - start), [s.output_ids for s in seqs], dict(engine.speculation)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--expert", default="smollm2-135m-instruct")
    ap.add_argument("--speculate", type=int, default=4, help="draft tokens a step (the engine setting measured)")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from coeserve import catalog
    from coeserve.store.disk import DiskStore
    store = DiskStore(default_home())
    catalog.ensure(store, [args.expert] if args.expert in catalog.BUILTINS else [])
    expert = load_expert(store, args.expert, device=args.device, max_len=2048)
    engines = {k: Engine(expert, EngineConfig(max_batch=len(WORKLOADS), max_seq_len=2048, speculate=k))
               for k in (0, args.speculate)}
    result = {"bench": "speculate", "expert": expert.name, "device": device_name(expert.device),
              "threads": torch.get_num_threads(), "speculate": args.speculate}
    print(f"{'workload':10s} {'plain tok/s':>11s} {'drafts tok/s':>12s} {'ratio':>6s} {'kept':>6s} {'same':>5s}")
    prompts = {name: [expert.codec.chat_prompt([{"role": "user", "content": p}])[0]] for name, p in WORKLOADS.items()}
    prompts["together"] = [p[0] for p in prompts.values()]  # side by side: a batch of 3
    for name, ids in prompts.items():
        best = {}
        for _ in range(args.runs):  # alternated, so both see the machine's same moods
            for k, engine in engines.items():
                rate, out, counts = decode(engine, ids, args.tokens)
                if k not in best or rate > best[k][0]:
                    best[k] = (rate, out, counts)
        (plain, plain_out, _), (fast, fast_out, counts) = best[0], best[args.speculate]
        kept = counts["accepted"] / max(counts["drafted"], 1)
        same = plain_out == fast_out
        result[f"{name}_plain_tok_s"], result[f"{name}_speculate_tok_s"] = plain, fast
        result[f"{name}_ratio"], result[f"{name}_kept"], result[f"{name}_same_tokens"] = fast / plain, kept, same
        result[f"{name}_tokens"] = sum(map(len, plain_out))
        print(f"{name:10s} {plain:11.1f} {fast:12.1f} {fast / plain:5.2f}x {kept:6.0%} {str(same):>5s}")
    write_result(result, args.out)
    return 0 if all(result[f"{n}_same_tokens"] for n in prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
