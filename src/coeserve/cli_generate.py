"""`coe generate`, `coe chat` and `coe demo` (what `make serve` ran before the server): one expert, or each
built-in in turn, on the engine in this process, through the three-tier store. Registered on the main
parser by `add_parsers`; failures the user can cause raise the errors that cli.py prints as one line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from coeserve.cli import _progress, _store, _tier_options
from coeserve.config import EngineConfig


def _tiers(args):
    """The three-tier store, once per command, budgeted by --host-memory / --device-slots."""
    from coeserve.config import StoreConfig, parse_bytes
    from coeserve.store.store import ExpertStore

    if getattr(args, "tiers", None) is None:
        cfg = StoreConfig(host_bytes=parse_bytes(args.host_memory) if args.host_memory else None,
                          device_slots=args.device_slots, policy=args.policy)
        args.tiers = ExpertStore(_store(args), cfg, device=args.device, max_len=args.max_seq_len)
    return args.tiers


def _engine(args, name: str):
    from coeserve.engine.engine import Engine

    cfg = EngineConfig(max_batch=4, max_seq_len=args.max_seq_len, fused=args.fused, device=args.device,
                       speculate=args.speculate)
    tiers = _tiers(args)
    t = time.perf_counter()
    expert = tiers.acquire(name)  # held until the command ends
    if args.verbose:
        tr = tiers.load(name)
        tr.wait()
        print(f"[{name}: weights in a device slot {(tr.finished - t) * 1e3:.0f} ms after the request; "
              f"host → device copy {(tr.finished - tr.started) * 1e3:.0f} ms]", file=sys.stderr)
    if expert.codec is None:
        raise ValueError(f"expert {name!r} has no tokenizer files, so it cannot take text (re-import it "
                         "from a directory that has them)")
    return Engine(expert, cfg)


def _params(args, stop=()):
    from coeserve.engine.sequence import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=tuple(args.stop or ()) + tuple(stop), grammar=_grammar(args))


def _grammar(args) -> tuple[str, str] | None:
    """`coe generate`'s structured output (--json-schema, --regex, --choice), as SamplingParams.grammar."""
    schema, regex, choice = (getattr(args, k, None) for k in ("json_schema", "regex", "choice"))
    if schema is not None:
        if not schema.lstrip().startswith("{"):  # a file
            if not Path(schema).is_file():
                raise FileNotFoundError(f"--json-schema {schema}: no such file (give a file or the schema itself)")
            schema = Path(schema).read_text()
        return ("json_schema", schema)
    if regex is not None:
        return ("regex", regex)
    return ("choice", json.dumps(choice)) if choice else None


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
        args.tiers.release(name)  # the next expert may take its slot (--device-slots 1 shows a switch)
        question = "What is the capital of France? Answer in one sentence."
        print(f"\n[{name}] user: {question}\n[{name}] assistant: ", end="")
        ids, stop = engine.expert.codec.chat_prompt([{"role": "user", "content": question}])
        _stream(engine, ids, _params(args, stop))


def add_parsers(sub) -> None:
    for name, fn, hlp in (("generate", cmd_generate, "stream one completion"), ("chat", cmd_chat, "interactive chat"),
                          ("demo", cmd_demo, "a short chat on each built-in expert")):
        s = sub.add_parser(name, help=hlp)
        if name != "demo":
            s.add_argument("--expert", required=True)
        if name == "generate":
            s.add_argument("prompt")
            s.add_argument("--raw", action="store_true", help="no chat template: continue the text")
            held = s.add_mutually_exclusive_group()
            held.add_argument("--json-schema", metavar="SCHEMA", help="hold the output to a JSON schema (a file, "
                              "or the schema itself)")
            held.add_argument("--regex", help="hold the output to a regular expression")
            held.add_argument("--choice", action="append", help="the output is one of these (repeatable)")
        if name == "chat":
            s.add_argument("--system", default="")
        s.add_argument("--max-tokens", type=int, default=256 if name != "demo" else 48)
        s.add_argument("--temperature", type=float, default=0.7 if name != "demo" else 0.0)
        s.add_argument("--top-p", type=float, default=1.0)
        s.add_argument("--top-k", type=int, default=0)
        s.add_argument("--min-p", type=float, default=0.0)
        s.add_argument("--repetition-penalty", type=float, default=1.0,
                       help="divide the logits of tokens already in the prompt or output (1 = off)")
        s.add_argument("--seed", type=int)
        s.add_argument("--stop", action="append", help="stop string (repeatable)")
        s.add_argument("--max-seq-len", type=int, default=2048)
        s.add_argument("--fused", action="store_true", help="torch.compile the decode step")
        s.add_argument("--speculate", type=int, default=0, metavar="K",
                       help="check up to K draft tokens a step by prompt lookup (greedy answers: --temperature 0)")
        s.add_argument("--device", default="auto")
        _tier_options(s)
        s.set_defaults(fn=fn)
