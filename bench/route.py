"""Routing latency: a batch of 64 prompts through the built-in router on CPU, per prompt, against two
baselines in the same run — the same prompts routed one at a time, the batch embedded as one padded
batch (no length-sorted micro-batches), and the batch with the embedder in fp32 where the router picks
bf16 (CPUs with AMX) — plus the compute floor: the embedder's matmul FLOPs for these prompts at the
matmul rate of its dtype measured in this run.

    python bench/route.py --out bench/results/route-cpu.json

The target is ≤10 ms per prompt for a batch of 64 on CPU, judged on the median of the runs. Prints a
table, then one JSON line.
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from coeserve.benchmarks.common import device_name, write_result
from coeserve.router import data
from coeserve.router.embedder import Embedder
from coeserve.router.router import BUILTIN, Router

REPO = Path(__file__).resolve().parents[1]
TARGET_MS = 10.0


def prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts from the routing set's test split, all categories mixed."""
    rows = data.load(REPO / "data" / "routing" / "routing.jsonl", "test")
    random.Random(seed).shuffle(rows)
    return [r["prompt"] for r in rows[:n]]


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def matmul_flops_per_s(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / min(timed(lambda: a @ b, reps))


def embedder_flops(router: Router, batch: list[str]) -> float:
    """2 × (non-embedding weights) per token, over the tokens the embedder sees (attention not counted)."""
    model = router.embedder.model
    tok = model.tokenizer(batch, truncation=True, max_length=model.max_seq_length)
    tokens = sum(len(ids) for ids in tok["input_ids"])
    weights = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    return 2 * weights * tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--max-seq-length", type=int, help="override the router's embedder input length")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    router = Router.load(BUILTIN, device="cpu")
    router.embedder.micro_batch = args.micro_batch
    if args.max_seq_length:
        router.embedder.model.max_seq_length = args.max_seq_length
    batch = prompts(args.batch)
    n = len(batch)
    runs = {"batched": timed(lambda: router.route(batch), args.reps),
            "one at a time": timed(lambda: [router.route([q]) for q in batch], max(2, args.reps // 3))}
    router.embedder.micro_batch = n
    runs["one padded batch"] = timed(lambda: router.route(batch), args.reps)
    router.embedder.micro_batch = args.micro_batch
    if router.embedder.dtype != torch.float32:
        fp32 = Router.load(BUILTIN, embedder=Embedder(router.spec.embedder, device="cpu", dtype="fp32",
                                                      micro_batch=args.micro_batch))
        fp32.embedder.model.max_seq_length = router.embedder.model.max_seq_length
        runs["batched, fp32 embedder"] = timed(lambda: fp32.route(batch), args.reps)
    floor_ms = embedder_flops(router, batch) / matmul_flops_per_s(router.embedder.dtype) / n * 1e3
    ms = {k: min(v) / n * 1e3 for k, v in runs.items()}
    med = {k: statistics.median(v) / n * 1e3 for k, v in runs.items()}
    print(f"{'routing, batch of ' + str(n):28s} {'best ms/prompt':>15s} {'median':>8s} {'vs batched':>11s}")
    for k in runs:
        print(f"{k:28s} {ms[k]:15.2f} {med[k]:8.2f} {ms[k] / ms['batched']:10.2f}x")
    dtype = str(router.embedder.dtype).removeprefix("torch.")
    print(f"{'compute floor (' + dtype + ' matmul)':28s} {floor_ms:15.2f}")
    ok = med["batched"] <= TARGET_MS
    print(f"target ≤{TARGET_MS:g} ms/prompt (median): {'met' if ok else 'NOT met'} ({torch.get_num_threads()} "
          f"threads, micro-batch {args.micro_batch}, {router.embedder.model.max_seq_length} tokens max, "
          f"embedder in {dtype})")
    result = {"bench": "route", "device": device_name(torch.device("cpu")), "cpu": platform.machine(),
              "threads": torch.get_num_threads(), "batch": n, "micro_batch": args.micro_batch,
              "max_seq_length": router.embedder.model.max_seq_length, "embedder_dtype": dtype,
              "ms_per_prompt": {k: round(v, 3) for k, v in ms.items()},
              "median_ms_per_prompt": {k: round(v, 3) for k, v in med.items()},
              "speedup_vs_one_at_a_time": round(ms["one at a time"] / ms["batched"], 2),
              "speedup_vs_one_padded_batch": round(ms["one padded batch"] / ms["batched"], 2),
              **({"speedup_vs_fp32_embedder": round(ms["batched, fp32 embedder"] / ms["batched"], 2)}
                 if "batched, fp32 embedder" in ms else {}),
              "compute_floor_ms_per_prompt": round(floor_ms, 3), "target_ms": TARGET_MS, "target_met": ok}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
