"""Which matmul path and weight layout streams a decode step fastest on this CPU, at batch 1 and 8
(`--batches` for others, up to prefill-sized row counts such as 517, where only torch's paths run):
F.linear on [out, in] (the default BLAS: what models/common.py uses on Intel CPUs above 16 rows),
x @ W on a transposed [in, out] copy, W @ x.T (the BLAS with the batch as the narrow side), oneDNN's
linear on [out, in] (what it uses there on AMD CPUs, and in compiled steps), and our
`kernels.small_linear` (what it uses, eager or compiled, for 1-16 rows). The shapes are SmolLM2-135M's,
all 30 layers plus the head, so the weights (~540 MB) do not fit in cache; each matmul runs on its own,
one after the other, as in a step, where each layer's input is the last one's output. (Independent
matmuls compiled together in one graph would not do: inductor fuses them into one loop that reads all
their weights at once, which no decode step can.) "floor" is the time to read the weights once at the
copy bandwidth measured in the same run. Prints a table, then one JSON line.

    python bench/layout.py
    python bench/layout.py --batches 1,2,3,4,8,16
    python bench/layout.py --batches 64,512,517
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from coeserve import kernels
from coeserve.benchmarks.common import copy_bandwidth, device_name
from coeserve.formats.synthetic import param_shapes, synthetic_config


def timed(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8")
    batches = [int(b) for b in ap.parse_args(argv).batches.split(",")]
    cfg = synthetic_config("tiny", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                           num_heads=9, num_kv_heads=3, head_dim=64,
                           tie_word_embeddings=True)
    mats = [torch.randn(s) for n, s in param_shapes(cfg) if len(s) == 2]
    mats_t = [m.t().contiguous() for m in mats]
    nbytes = sum(m.numel() * 4 for m in mats)
    onednn = torch.ops.mkldnn._linear_pointwise
    paths = {
        "F.linear [out,in]": lambda x: [F.linear(x[m.shape[1]], m) for m in mats],
        "x @ W [in,out]": lambda x: [x[m.shape[0]] @ m for m in mats_t],
        "W @ x.T [out,in]": lambda x: [m @ x[m.shape[1]].t() for m in mats],
        "oneDNN [out,in]": lambda x: [onednn(x[m.shape[1]], m, None, "none", [], "") for m in mats],
    }
    small = kernels.build()
    if small is not None:
        paths["ours small_linear"] = lambda x: [small(x[m.shape[1]], m) for m in mats]
    floor = nbytes / copy_bandwidth(torch.device("cpu"))
    result = {"bench": "layout", "device": device_name(torch.device("cpu")), "weights_MB": nbytes / 1e6,
              "threads": torch.get_num_threads(), "floor_ms": floor * 1e3}
    print(f"{'path':20s} {'batch':>5s} {'ms/step':>8s} {'GB/s':>6s} {'floor/t':>7s}")
    for b in batches:
        x = {k: torch.randn(b, k) for k in {m.shape[1] for m in mats}}  # an input per fan-in
        for name, fn in paths.items():
            if b > 16 and name.startswith("ours"):  # a decode-step path only
                continue
            dt = timed(lambda: fn(x))
            print(f"{name:20s} {b:5d} {dt * 1e3:8.1f} {nbytes / dt / 1e9:6.1f} {floor / dt:7.2f}")
            result[f"{name.split()[0]}_b{b}_ms"] = dt * 1e3
    print(f"floor (weights read once at the copy bandwidth): {floor * 1e3:.1f} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
