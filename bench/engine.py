"""Engine benchmark: decode tokens/s of our engine at several batch sizes against transformers `generate`
(batch 1) on the same weights, prefill tokens/s, and the memory-bandwidth ceiling, in one run.

    python bench/engine.py                           # CPU: SmolLM2-135M-Instruct, fp32
    python bench/engine.py --synthetic 7b --fused     # GPU: a 7B-shaped random-weight Llama in bf16

The ceiling is bytes read per decode step (weights + the KV cache it attends to) divided by the memory
bandwidth of a large device copy measured in this run, counted as STREAM does (bytes read + bytes
written per second). Each decode rate, ours and transformers', is the best of three runs (a shared
machine's noise otherwise swings the ratio by a third). The largest batch is measured again with sampled
answers (temperature 0.8, top_p 0.95), against its greedy rate, and where the engine samples on the
device (EngineConfig.device_sampling: CUDA, or --device-sampling) also row by row as CPU does, one pass
a step (`decode_*_sampled_rowwise_tok_s`). Where the engine queues several passes per step
(EngineConfig.decode_ahead: CUDA), batch 1 is measured again with one pass a step, as
`decode_*_b1_one_pass_tok_s`. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from coeserve.benchmarks.common import (copy_bandwidth, device_name, save_json, sync, synthetic_expert,
                                        write_result)
from coeserve.config import EngineConfig, default_home
from coeserve.engine.engine import Engine, Expert
from coeserve.engine.load import load_expert, pick_device
from coeserve.engine.sequence import SamplingParams

RUNS = 3  # decode runs per rate; the best counts


SAMPLED = dict(temperature=0.8, top_p=0.95)  # a chat client's usual settings, for the sampled rate


def decode_rate(engine: Engine, batch: int, prompt: list[int], tokens: int, runs: int = RUNS,
                sampled: bool = False) -> float:
    """The best of `runs` decodes of `tokens` tokens by `batch` sequences, aggregate tokens/s: greedy, or
    `sampled` with SAMPLED (each sequence its own seed)."""
    best = 0.0
    for _ in range(runs):
        how = [dict(SAMPLED, seed=i) if sampled else dict(temperature=0) for i in range(batch)]
        seqs = [engine.add(engine.make_sequence(prompt, SamplingParams(max_tokens=tokens + 1, ignore_eos=True, **h)))
                for h in how]
        while any(not s.output_ids for s in seqs) or engine.prefilling:
            engine.step()  # prefill everything first: this measures decode alone
        engine.step()  # one decode step outside the clock (fused mode compiles on its first call)
        sync(engine.expert.device)
        t, before = time.perf_counter(), sum(len(s.output_ids) for s in seqs)
        engine.run_until_done()
        sync(engine.expert.device)
        best = max(best, (sum(len(s.output_ids) for s in seqs) - before) / (time.perf_counter() - t))
    return best


def prefill_rate(engine: Engine, prompt: list[int], runs: int = 2) -> float:
    """The best of `runs` prefills. One timed prefill each, two H200 runs gave 1.2 s and 67 ms for the
    same 512 tokens (bench/results/engine-h200*.json); the first prefill of a run may meet its shapes
    first (kernels loaded, tuned)."""
    best = 0.0
    for _ in range(runs):
        seq = engine.add(engine.make_sequence(prompt, SamplingParams(max_tokens=1, temperature=0)))
        sync(engine.expert.device)
        t = time.perf_counter()
        engine.run_until_done()
        sync(engine.expert.device)
        assert seq.finished
        best = max(best, len(prompt) / (time.perf_counter() - t))
    return best


def forward_rate(engine: Engine, prompt: list[int], tokens: int) -> float:
    """Batch-1 decode forward passes alone (Runner.decode of one sequence, again and again at one
    position), tokens/s, the best of RUNS runs: no sampling and no engine bookkeeping. Its gap to
    decode_rate is the time each step spends outside the forward pass, in which the device may sit idle."""
    seq = engine.add(engine.make_sequence(prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)))
    while not seq.output_ids or engine.prefilling:
        engine.step()
    engine.runner.decode([seq])
    best = 0.0
    for _ in range(RUNS):  # the best, as for decode_rate
        sync(engine.expert.device)
        t = time.perf_counter()
        for _ in range(tokens):
            engine.runner.decode([seq])
        sync(engine.expert.device)
        best = max(best, tokens / (time.perf_counter() - t))
    engine.abort(seq)
    return best


def transformers_rate(gguf: Path, prompt: list[int], tokens: int, runs: int = RUNS) -> float:
    """The best of `runs` generate calls, as for ours: on a noisy machine one slow call would swing the
    ratio either way."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([prompt])
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    best = 0.0
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(runs):
            t = time.perf_counter()
            model.generate(ids, **kw)
            best = max(best, tokens / (time.perf_counter() - t))
    return best


def step_bytes(expert: Expert, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight once, plus the batch's KV cache."""
    c = expert.cfg
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in expert.model.w.values()}.values())
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * context * batch * expert.model.head.element_size()
    return weights + kv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--expert", default="smollm2-135m-instruct")
    ap.add_argument("--synthetic", help="random-weight shape instead of an installed expert (7b, 1b, tiny)")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--fused", action="store_true", help="also measure fused mode (torch.compile)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--decode-ahead", type=int, help="passes per step (default: the engine's, 8 on CUDA, else 1)")
    ap.add_argument("--device-sampling", action=argparse.BooleanOptionalAction,
                    help="sample all rows at once on the device (default: the engine's, on CUDA)")
    ap.add_argument("--out", help="write the JSON result here too")
    args = ap.parse_args(argv)

    dev = pick_device(args.device)
    if args.synthetic:
        expert = synthetic_expert(args.synthetic, dev, args.dtype)
    else:
        from coeserve import catalog
        from coeserve.store.disk import DiskStore
        store = DiskStore(default_home())
        catalog.ensure(store, [args.expert] if args.expert in catalog.BUILTINS else [])
        expert = load_expert(store, args.expert, device=args.device, dtype=args.dtype, max_len=4096)
    batches = [int(b) for b in args.batches.split(",")]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, min(expert.cfg.vocab_size, 30000), (args.prompt_len,), generator=gen).tolist()
    long_prompt = torch.randint(10, min(expert.cfg.vocab_size, 30000), (args.prefill_len,), generator=gen).tolist()
    bw = copy_bandwidth(dev)
    rows, result = [], {"bench": "engine", "expert": expert.name, "device": device_name(dev),
                        "dtype": str(expert.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                        "copy_GBps": bw / 1e9}
    for fused in ([False, True] if args.fused else [False]):
        mode = "fused" if fused else "unfused"
        # No prefix cache: every run here prefills the same prompt, and prefill is what it measures.
        engine = Engine(expert, EngineConfig(max_batch=max(batches), max_seq_len=2048, fused=fused,
                                             prefill_chunk=args.prefill_len, prefix_cache=False,
                                             decode_ahead=args.decode_ahead,
                                             device_sampling=args.device_sampling))
        for b in batches:
            rate = decode_rate(engine, b, prompt, args.tokens)
            ceiling = bw / step_bytes(expert, b, args.prompt_len + args.tokens // 2) * b
            rows.append((f"ours {mode}", b, rate, ceiling))
            result[f"decode_{mode}_b{b}_tok_s"] = rate
            result[f"ceiling_b{b}_tok_s"] = ceiling
            checkpoint(result, args.out)
        top = max(batches)  # sampling's cost per step grows with the batch: measured at the largest
        result[f"decode_{mode}_b{top}_sampled_tok_s"] = decode_rate(engine, top, prompt, args.tokens, sampled=True)
        result[f"ratio_sampled_vs_greedy_b{top}_{mode}"] = \
            result[f"decode_{mode}_b{top}_sampled_tok_s"] / result[f"decode_{mode}_b{top}_tok_s"]
        if engine.device_sampling:  # the same, sampled row by row (so one pass a step), as on CPU
            engine.device_sampling = False
            rowwise = result[f"decode_{mode}_b{top}_sampled_rowwise_tok_s"] = \
                decode_rate(engine, top, prompt, args.tokens, sampled=True)
            engine.device_sampling = True
            result[f"ratio_sampled_device_vs_rowwise_b{top}_{mode}"] = \
                result[f"decode_{mode}_b{top}_sampled_tok_s"] / rowwise
        checkpoint(result, args.out)
        if 1 in batches:
            result[f"forward_only_{mode}_b1_tok_s"] = forward_rate(engine, prompt, args.tokens)
            if engine.decode_ahead > 1:  # the same steps with one pass each, a token read back after each
                result["decode_ahead"], engine.decode_ahead = engine.decode_ahead, 1
                result[f"decode_{mode}_b1_one_pass_tok_s"] = decode_rate(engine, 1, prompt, args.tokens)
                engine.decode_ahead = result["decode_ahead"]
        result[f"prefill_{mode}_tok_s"] = prefill_rate(engine, long_prompt)
    if not args.synthetic and not args.no_transformers:
        from coeserve import catalog
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            gguf = catalog.BUILTINS[args.expert].locate(Path(d))
            hf = transformers_rate(gguf, prompt, args.tokens)
        rows.append(("transformers generate", 1, hf, result["ceiling_b1_tok_s"]))
        result["transformers_b1_tok_s"] = hf
        result["ratio_b1_vs_transformers"] = result["decode_unfused_b1_tok_s"] / hf
        if "decode_fused_b1_tok_s" in result:
            result["ratio_b1_fused_vs_transformers"] = result["decode_fused_b1_tok_s"] / hf
    for mode in ("unfused", "fused"):
        if f"decode_{mode}_b1_tok_s" in result:
            b1 = result[f"decode_{mode}_b1_tok_s"]
            if f"decode_{mode}_b8_tok_s" in result:
                result[f"ratio_b8_vs_b1_{mode}"] = result[f"decode_{mode}_b8_tok_s"] / b1
            ceiling = result["ceiling_b1_tok_s"]
            result[f"roofline_b1_{mode}"] = b1 / ceiling
            result[f"roofline_b1_forward_only_{mode}"] = result[f"forward_only_{mode}_b1_tok_s"] / ceiling
            if f"decode_{mode}_b1_one_pass_tok_s" in result:
                result[f"roofline_b1_one_pass_{mode}"] = result[f"decode_{mode}_b1_one_pass_tok_s"] / ceiling
    if "decode_fused_b1_tok_s" in result:
        result["ratio_fused_vs_unfused_b1"] = result["decode_fused_b1_tok_s"] / result["decode_unfused_b1_tok_s"]
    print_table(rows, result)
    write_result(result, args.out)
    return 0


def checkpoint(result: dict, out: str | None) -> None:
    """What is measured so far, marked partial, in the --out file: a run cut short (a GPU lease's time
    limit; each batch size compiles anew) keeps it. The run's end overwrites it with the whole result."""
    save_json({**result, "partial": True}, out)


def print_table(rows, result) -> None:
    print(f"{'engine':24s} {'batch':>5s} {'tok/s':>9s} {'ceiling':>9s} {'of ceiling':>10s}")
    for name, b, rate, ceil in rows:
        print(f"{name:24s} {b:5d} {rate:9.1f} {ceil:9.1f} {rate / ceil:9.0%}")
    for k, v in result.items():
        if k.startswith(("forward_only", "prefill")) or k.endswith(("one_pass_tok_s", "sampled_tok_s", "rowwise_tok_s")):
            print(f"{k}: {v:.0f}")
    for k, v in result.items():
        if k.startswith(("ratio", "roofline")):
            print(f"{k}: {v:.2f}")


if __name__ == "__main__":
    sys.exit(main())
