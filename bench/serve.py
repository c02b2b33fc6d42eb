"""Serving benchmark: one CoE workload against a live `coe serve`, once with our expert-aware scheduler
and once with FCFS + LRU (the baseline), in one run, on the same requests.

    python bench/serve.py --out bench/results/serve-cpu.json
    python bench/serve.py --dtype bf16 --max-wait 30 --out bench/results/serve-cpu-bf16.json

The workload: the two real experts plus `--synthetic` random-weight experts (Llama-shaped, with
SmolLM2's tokenizer so they take text), Zipf(`--zipf`) popularity over them, Poisson arrivals at
`--rate` requests/s, prompts of 16-256 tokens and outputs of 8-64 tokens drawn per request. Two device
slots and a host tier smaller than all the experts, so most experts are a switch away and some a disk
read away. `--dtype bf16` stores and runs every expert in bf16 (a CPU with AMX runs it faster);
`--max-wait` sets the coe schedule's bound on waiting (FCFS has none). Reports throughput, p50/p99
time to first token and switches per 100 requests, a table and then one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from coeserve.benchmarks.workload import drive, make_home, scrape, wait_ready, workload

REPO = Path(__file__).resolve().parents[1]


def run_server(home: Path, schedule: str, port: int, slots: int, host_memory: str, max_batch: int,
               dtype: str, max_wait: float | None = None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen([sys.executable, "-m", "coeserve.cli", "--home", str(home), "serve", "--port", str(port),
                             "--schedule", schedule, "--device-slots", str(slots), "--max-seq-len", "512",
                             "--max-batch", str(max_batch), "--policy", "lru", "--host-memory", host_memory,
                             "--dtype", dtype] + (["--max-wait", str(max_wait)] if max_wait else []), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(home: Path, schedule: str, reqs: list[dict], slots: int, host_memory: str, max_batch: int,
            dtype: str, max_wait: float | None = None) -> dict:
    port = 8700 + random.randrange(200)
    base = f"http://127.0.0.1:{port}"
    proc = run_server(home, schedule, port, slots, host_memory, max_batch, dtype, max_wait)
    try:
        wait_ready(base, proc)
        res = asyncio.run(drive(base, reqs))
        span = max(r["end"] for r in res) - min(r["start"] for r in res)
        ttft = sorted(r["ttft"] for r in res)
        m = scrape(base)
        return {"throughput_rps": len(res) / span, "makespan_s": span, "ttft_p50_s": statistics.median(ttft),
                "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
                "switches_per_100": 100 * m["switches"] / len(res), "mean_decode_batch": m["mean_batch"]}
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--rate", type=float, default=8.0, help="requests per second (Poisson)")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--synthetic", type=int, default=6)
    ap.add_argument("--device-slots", type=int, default=2)
    ap.add_argument("--host-memory", help="host tier: less than all experts, so a miss there is a disk "
                    "read (default 1GiB in fp32, of 3.4 GiB of experts; 512MiB in bf16, the same share)")
    ap.add_argument("--max-wait", type=float, help="the coe schedule's bound on waiting (default: the server's)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="the experts' stored and compute dtype (bf16: fast on CPUs with AMX, and on GPUs)")
    ap.add_argument("--max-batch", type=int, default=16, help="decode batch bound of both servers")
    ap.add_argument("--prompt-words", default="12-200", help="range of prompt lengths, in words")
    ap.add_argument("--max-tokens", default="8-64", help="range of output lengths, in tokens")
    ap.add_argument("--schedules", default="fcfs,coe", help="which to run (the ratio needs both)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--home", default=os.environ.get("COE_HOME"))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not set(args.schedules.split(",")) <= {"fcfs", "coe"}:
        ap.error(f"--schedules takes fcfs, coe or both, not {args.schedules!r}")
    args.host_memory = args.host_memory or ("1GiB" if args.dtype == "fp32" else "512MiB")
    from coeserve.benchmarks.common import device_name, write_result
    from coeserve.config import default_home
    from coeserve.server.serve import ServeConfig
    import torch
    with tempfile.TemporaryDirectory(prefix="coe-bench-serve-") as tmp:
        experts = make_home(Path(tmp), args.synthetic, Path(args.home) if args.home else default_home(), args.dtype)
        words, tokens = (tuple(int(v) for v in r.split("-", 1)) for r in (args.prompt_words, args.max_tokens))
        reqs = workload(experts, args.requests, args.rate, args.zipf, args.seed, words, tokens)
        result = {"bench": "serve", "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                  "dtype": args.dtype,
                  "experts": len(experts), "requests": args.requests, "rate": args.rate, "zipf": args.zipf,
                  "device_slots": args.device_slots, "host_memory": args.host_memory,
                  "max_batch": args.max_batch, "max_wait": args.max_wait or ServeConfig.max_wait,
                  "prompt_words": args.prompt_words, "max_tokens": args.max_tokens}
        schedules = [s for s in ("fcfs", "coe") if s in args.schedules.split(",")]
        for schedule in schedules:
            r = measure(Path(tmp) / "home", schedule, reqs, args.device_slots, args.host_memory, args.max_batch,
                        args.dtype, args.max_wait)
            result.update({f"{schedule}_{k}": round(v, 3) for k, v in r.items()})
    print(f"{'schedule':10s} {'req/s':>8s} {'p50 TTFT':>9s} {'p99 TTFT':>9s} {'switch/100':>10s} {'batch':>6s}")
    for s in schedules:
        print(f"{s:10s} {result[s + '_throughput_rps']:8.2f} {result[s + '_ttft_p50_s']:8.2f}s "
              f"{result[s + '_ttft_p99_s']:8.2f}s {result[s + '_switches_per_100']:10.1f} "
              f"{result[s + '_mean_decode_batch']:6.2f}")
    if len(schedules) == 2:
        result["ratio_throughput_coe_vs_fcfs"] = round(result["coe_throughput_rps"] / result["fcfs_throughput_rps"], 2)
        result["ratio_p99_ttft_coe_vs_fcfs"] = round(result["coe_ttft_p99_s"] / result["fcfs_ttft_p99_s"], 2)
        print(f"throughput coe/fcfs {result['ratio_throughput_coe_vs_fcfs']:.2f} (target ≥ 3), "
              f"p99 TTFT coe/fcfs {result['ratio_p99_ttft_coe_vs_fcfs']:.2f} (target < 1)")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
