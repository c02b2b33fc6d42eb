"""`coe plan`: the planner's table, `--json`, and `--report DIR` (markdown + plots)."""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    s = sub.add_parser("plan", help="footprint and switch-time planner (docs/planner.md)")
    s.add_argument("--experts", default="150x7B", help="150x7B, 10x8B+2x70B, a manifest, or installed names")
    s.add_argument("--hardware", default="sn40l,dgx-h100,dgx-a100",
                   help="comma-separated presets: dgx-h100, dgx-a100, sn40l, h100-pcie-8x, gh200")
    s.add_argument("--measured", help="JSON from `coe bench switch --out FILE`: this machine's bandwidths")
    s.add_argument("--rate", type=float, default=1.0, help="workload: requests/s")
    s.add_argument("--zipf", type=float, default=1.0, help="workload: popularity skew")
    s.add_argument("--prompt-tokens", type=int, default=512)
    s.add_argument("--output-tokens", type=int, default=128)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    s.add_argument("--report", help="write DIR/plan.md and plots")
    s.set_defaults(fn=cmd_plan)


def cmd_plan(args) -> None:
    from coeserve.planner import Workload, compare, parse_experts

    if min(args.rate, args.prompt_tokens, args.output_tokens, args.batch) <= 0:
        raise ValueError("rate, prompt/output tokens and batch must be positive")
    groups = parse_experts(args.experts, args.home)
    wl = Workload(args.rate, args.zipf, args.prompt_tokens, args.output_tokens, args.batch)
    plans = compare(groups, [h.strip() for h in args.hardware.split(",")], wl, args.measured)
    if args.json:
        print(json.dumps({"experts": args.experts, "plans": plans}, indent=1))
    else:
        _table(args.experts, plans)
    if args.report:
        path = report(Path(args.report), args.experts, groups, plans, wl)
        print(f"report: {path}")


def _rows(plans):
    """Ratios are against the first hardware (default: the SN40L node with its three tiers)."""
    base = plans[0]
    for p in plans:
        yield (p["hardware"], str(p["nodes_all_in_hbm"]), str(p["nodes_three_tier"]),
               f"{p['nodes_all_in_hbm'] / base['nodes_three_tier']:.0f}x",
               f"{p['switch_s']['host'] * 1e3:.0f} ms", f"{p['switch_s']['disk']:.2f} s",
               f"{p['switch_s']['host'] / base['switch_s']['host']:.1f}x",
               f"{p['throughput_bound_rps']:.1f}", f"{p['latency_bound_s']:.2f} s")


HEAD = ("hardware", "nodes, all in HBM", "nodes, 3 tiers", "all-in-HBM nodes / first's 3-tier nodes",
        "switch from host", "from disk", "switch time / first's", "req/s bound", "latency bound")


def _table(spec, plans) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(*HEAD, title=f"{spec}: {plans[0]['experts']} experts, {plans[0]['total_bytes'] / 1e12:.2f} TB")
    for row in _rows(plans):
        t.add_row(*row)
    Console(width=200).print(t)


def report(out: Path, spec: str, groups, plans, wl) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from coeserve.planner import PRESETS, plan
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([p["hardware"] for p in plans], [p["switch_s"]["host"] * 1e3 for p in plans])
    ax.set_ylabel("switch from host tier (ms)")
    ax.set_title(f"one {groups[0].bytes / 1e9:.1f} GB expert")
    fig.tight_layout()
    fig.savefig(out / "switch.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    counts = [10, 50, 150, 300, 500, 850, 1200]
    for p in plans:
        hw = PRESETS.get(p["hardware"])
        if hw is None:
            continue
        from coeserve.planner import ExpertGroup
        ax.plot(counts, [plan([ExpertGroup(c, groups[0].params, groups[0].bytes_per_param)], hw, wl)["nodes_all_in_hbm"]
                         for c in counts], marker="o", label=f"{p['hardware']} (all in HBM)")
    ax.axhline(1, color="k", ls="--", label="one SN40L node (3 tiers)")
    ax.set_xlabel("experts")
    ax.set_ylabel("nodes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "footprint.png", dpi=120)
    lines = [f"# coe plan: {spec}", "", f"Workload: {json.dumps(plans[0]['workload'])}", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(plans)]
    lines += ["", "![switch time](switch.png)", "", "![footprint](footprint.png)", ""]
    (out / "plan.md").write_text("\n".join(lines))
    return out / "plan.md"
