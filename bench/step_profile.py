"""Where a decode token's time goes on the device: batch-1 greedy decode of an expert under torch.profiler,
with the engine's passes queued ahead (EngineConfig.decode_ahead) and with one pass a step, in one run.
Per token: wall time; the time some device kernel ran (the union of their intervals); the ceiling (the
weights' bytes over the copy bandwidth measured in this run); kernels launched; the kernels that take
the most time.

    python bench/step_profile.py --synthetic 7b --fused      # on a GPU (bench/gpu.sh's `profile` step)

Wall time above kernel time is time the device sat idle, waiting on the host; kernel time above the
ceiling is the kernels' own: too many of them, or matmuls that read their weights below the copy rate.
On a CPU there are no device kernels: only the wall time is reported.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from coeserve.benchmarks.common import copy_bandwidth, device_name, sync, synthetic_expert, write_result
from coeserve.config import EngineConfig
from coeserve.engine.engine import Engine
from coeserve.engine.load import pick_device
from coeserve.engine.sequence import SamplingParams

TOP = 12


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profiled_decode(engine: Engine, prompt: list[int], tokens: int) -> dict:
    """Decode `tokens` tokens of one sequence under the profiler, after one decode outside it that
    compiles and captures every shape the profiled one meets (same prompt, same lengths)."""
    params = SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)
    engine.generate([prompt], params)
    seq = engine.add(engine.make_sequence(prompt, params))
    while not seq.output_ids or engine.prefilling:
        engine.step()  # the prompt is not profiled
    dev, before = engine.expert.device, len(seq.output_ids)
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        engine.run_until_done()
        sync(dev)
        wall = time.perf_counter() - t
    n = len(seq.output_ids) - before
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.time_range.elapsed_us()
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:TOP]
    return {"tokens": n, "wall_ms_per_token": wall * 1e3 / n,
            "kernel_ms_per_token": busy_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e3 / n,
            "kernels_per_token": len(kernels) / n,
            "top": [{"kernel": name[:100], "per_token": c / n, "us_per_token": us / n} for name, (c, us) in top]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synthetic", default="7b", help="random-weight shape (7b, 1b, tiny)")
    ap.add_argument("--fused", action="store_true", help="torch.compile (and CUDA graphs on CUDA)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="write the JSON result here too")
    args = ap.parse_args(argv)

    dev = pick_device(args.device)
    expert = synthetic_expert(args.synthetic, dev)
    prompt = torch.randint(10, min(expert.cfg.vocab_size, 30000), (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in expert.model.w.values()}.values())
    bw = copy_bandwidth(dev)
    engine = Engine(expert, EngineConfig(max_batch=1, max_seq_len=1024, fused=args.fused, prefix_cache=False))
    result = {"bench": "step_profile", "expert": expert.name, "device": device_name(dev), "fused": args.fused,
              "copy_GBps": bw / 1e9, "ceiling_ms_per_token": weights / bw * 1e3}
    for ahead in dict.fromkeys((engine.decode_ahead, 1)):
        engine.decode_ahead = ahead
        r = result[f"decode_ahead_{ahead}"] = profiled_decode(engine, prompt, args.tokens)
        print(f"decode_ahead {ahead}: {r['wall_ms_per_token']:.3f} ms a token, kernels busy "
              f"{r['kernel_ms_per_token']:.3f} ms ({r['kernels_per_token']:.0f} kernels), ceiling "
              f"{result['ceiling_ms_per_token']:.3f} ms")
        for k in r["top"]:
            print(f"  {k['us_per_token']:9.1f} us  {k['per_token']:6.1f}x  {k['kernel']}")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
