"""Structured output: a sequence whose output must follow a JSON schema, a regex, a list of choices or an
EBNF grammar samples only among the tokens that keep it valid. xgrammar (vLLM's and SGLang's grammar
engine) compiles the constraint against the expert's tokenizer once; a matcher per sequence then gives,
at each step, a bitmask of the tokens allowed next, which masks that row's logits before sampling, and
allows the end-of-sequence token only where the output is complete.

A constraint is `SamplingParams.grammar`: (kind, spec), plain strings, so that it travels to cluster nodes
as it is: ("json_schema", schema as JSON text), ("regex", pattern), ("choice", JSON list of strings) or
("ebnf", grammar text)."""
from __future__ import annotations

import json
import re
import threading
import weakref

import torch

from coeserve.engine.sequence import GRAMMARS


class GrammarError(ValueError):
    """The constraint does not compile (a bad schema, regex or grammar); the message says why."""


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise GrammarError("structured output needs xgrammar: pip install 'coeserve[structured]' "
                           "(make install puts it in .venv)") from None
    return xgrammar


_LOCK = threading.Lock()
_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # codec → (lock, {vocab size: compiler})


def compiled(codec, kind: str, spec: str, vocab_size: int):
    """The compiled constraint for an expert's tokenizer (`codec`) and logits of `vocab_size`; cached per
    codec and vocabulary size, and per constraint by xgrammar. Raises GrammarError."""
    xgr = _xgrammar()
    with _LOCK:  # held only to find the codec's own lock: building its compiler takes seconds
        lock, compilers = _COMPILERS.setdefault(codec, (threading.Lock(), {}))
    with lock:
        if vocab_size not in compilers:
            info = xgr.TokenizerInfo.from_huggingface(codec.tok, vocab_size=vocab_size,
                                                      stop_token_ids=sorted(codec.eos_ids))
            compilers[vocab_size] = xgr.GrammarCompiler(info, max_threads=2)
        compiler = compilers[vocab_size]
    try:
        if kind == "json_schema":
            # Compact JSON (", " and ": " between items): small models given any whitespace may never stop.
            return compiler.compile_json_schema(spec, any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "choice":
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in json.loads(spec)))
        if kind == "ebnf":
            return compiler.compile_grammar(spec)
    except Exception as e:  # xgrammar raises RuntimeError or ValueError with the parser's message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", first)  # xgrammar's log prefix: time, source line
        raise GrammarError(f"the {kind.replace('_', ' ')} does not compile: {first}") from None
    raise GrammarError(f"unknown constraint kind {kind!r} (one of {', '.join(GRAMMARS)})")


def matcher(codec, grammar: tuple[str, str], vocab_size: int):
    return _xgrammar().GrammarMatcher(compiled(codec, *grammar, vocab_size))


def mask(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """In place: in each of `rows` of logits [B, V], -inf for every token its matcher does not allow."""
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(len(rows), logits.shape[-1])
    for j, m in enumerate(matchers):
        m.fill_next_token_bitmask(bitmask, j)
    part = logits[rows]
    xgr.apply_token_bitmask_inplace(part, bitmask.to(logits.device),
                                    backend="cpu" if logits.device.type == "cpu" else "torch_native")
    logits[rows] = part
