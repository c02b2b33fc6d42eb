"""Which matmul path and weight layout streams a decode step fastest on this CPU, at batch 1 and 8
(`--batches` for others):
F.linear on [out, in] (the default BLAS), x @ W on a transposed [in, out] copy, oneDNN's linear on
[out, in] (what models/common.py uses on CPU, eager and for fused batches above 1), and the whole
step's matmuls compiled by torch.compile as reductions (what models/common.py uses in a fused batch-1
step). The shapes are SmolLM2-135M's, all 30 layers plus the head, so the weights (~540 MB) do not
fit in cache. Prints a table, then one JSON line.

    python bench/layout.py
    python bench/layout.py --batches 1,2,3,4,8
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

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
        "oneDNN [out,in]": lambda x: [onednn(x[m.shape[1]], m, None, "none", [], "") for m in mats],
    }
    fan_ins = sorted({m.shape[1] for m in mats})

    def reductions(xs, ws):  # one compiled graph: every matmul as sum(w * x), rows of w in the inner loop
        return [(w[:, None, :] * xs[fan_ins.index(w.shape[1])][None]).sum(-1).t() for w in ws]

    compiled = torch.compile(reductions, dynamic=False)
    paths["compiled sum(w*x)"] = lambda x: compiled([x[k] for k in fan_ins], mats)
    result = {"bench": "layout", "weights_MB": nbytes / 1e6, "threads": torch.get_num_threads()}
    print(f"{'path':20s} {'batch':>5s} {'ms/step':>8s} {'GB/s':>6s}")
    for b in batches:
        x = {k: torch.randn(b, k) for k in {m.shape[1] for m in mats}}  # an input per fan-in
        for name, fn in paths.items():
            dt = timed(lambda: fn(x))
            print(f"{name:20s} {b:5d} {dt * 1e3:8.1f} {nbytes / dt / 1e9:6.1f}")
            result[f"{name.split()[0]}_b{b}_ms"] = dt * 1e3
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
