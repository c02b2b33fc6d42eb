"""Cluster benchmark: throughput of the Ray Serve deployment with 1 and with 2 CoE-node replicas on the
same synthetic CoE workload (bench/serve.py's), in one run. Each replica gets the same resources (one
CPU thread here), as one more machine would add.

    python bench/cluster.py --out bench/results/cluster-cpu.json
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coeserve.benchmarks.workload import drive, make_home, wait_ready, workload

REPO = Path(__file__).resolve().parents[1]


def run_cluster(home: Path, replicas: int, port: int, slots: int, host_memory: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen([sys.executable, "-m", "coeserve.cli", "--home", str(home), "serve", "--ray",
                             "--port", str(port), "--replicas", str(replicas), "--node-cpus", "0.5",
                             "--node-threads", "1", "--device-slots", str(slots), "--host-memory", host_memory,
                             "--max-seq-len", "512",
                             "--max-batch", "8"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def measure(home: Path, replicas: int, reqs: list[dict], slots: int, host_memory: str) -> dict:
    port = 8900 + replicas
    base = f"http://127.0.0.1:{port}"
    proc = run_cluster(home, replicas, port, slots, host_memory)
    try:
        wait_ready(base, proc)
        asyncio.run(drive(base, reqs[:replicas * 2]))  # every replica up before the clock starts
        res = asyncio.run(drive(base, reqs))
        span = max(r["end"] for r in res) - min(r["start"] for r in res)
        ttft = sorted(r["ttft"] for r in res)
        return {"throughput_rps": len(res) / span, "makespan_s": span, "ttft_p50_s": ttft[len(ttft) // 2]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--synthetic", type=int, default=6)
    ap.add_argument("--device-slots", type=int, default=1, help="per replica")
    ap.add_argument("--host-memory", default="1GiB", help="host tier per replica")
    ap.add_argument("--home", default=os.environ.get("COE_HOME"))
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    import torch

    from coeserve.benchmarks.common import device_name, write_result
    from coeserve.config import default_home
    with tempfile.TemporaryDirectory(prefix="coe-bench-cluster-") as tmp:
        experts = make_home(Path(tmp), args.synthetic, Path(args.home) if args.home else default_home())
        reqs = workload(experts, args.requests, args.rate, args.zipf, seed=1)
        result = {"bench": "cluster", "device": device_name(torch.device("cpu")), "experts": len(experts),
                  "requests": args.requests, "rate": args.rate, "zipf": args.zipf, "threads_per_replica": 1,
                  "device_slots_per_replica": args.device_slots, "host_memory_per_replica": args.host_memory}
        for n in (1, 2):
            r = measure(Path(tmp) / "home", n, reqs, args.device_slots, args.host_memory)
            result.update({f"replicas{n}_{k}": round(v, 3) for k, v in r.items()})
    result["ratio_throughput_2_vs_1"] = round(result["replicas2_throughput_rps"] / result["replicas1_throughput_rps"], 2)
    print(f"{'replicas':>8s} {'req/s':>8s} {'p50 TTFT':>9s}")
    for n in (1, 2):
        print(f"{n:8d} {result[f'replicas{n}_throughput_rps']:8.2f} {result[f'replicas{n}_ttft_p50_s']:8.2f}s")
    print(f"throughput 2 replicas / 1 replica: {result['ratio_throughput_2_vs_1']:.2f}")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
