"""Assemble the shipped routing set from the benchmark packages and the team-written prompts.

    python data/routing/build.py            # writes data/routing/routing.jsonl and prints the counts

The result depends only on the installed package versions (pinned in pyproject.toml), the files in
data/routing/written/ and the seed in coeserve.router.data, so a rerun reproduces the file byte for byte.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from coeserve.router import data

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--written", type=Path, default=HERE / "written")
    p.add_argument("--out", type=Path, default=HERE / "routing.jsonl")
    p.add_argument("--seed", type=int, default=data.SEED)
    args = p.parse_args()
    rows = data.build(args.written, args.seed)
    data.write(rows, args.out)
    counts = data.summary(rows)
    print(f"{'category':12s} {'train':>6s} {'val':>6s} {'test':>6s}")
    for cat, c in counts.items():
        print(f"{cat:12s} {c['train']:6d} {c['validation']:6d} {c['test']:6d}")
    print(json.dumps({"rows": len(rows), "out": args.out.name, "counts": counts}))


if __name__ == "__main__":
    main()
