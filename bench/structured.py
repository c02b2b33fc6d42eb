"""Structured-output benchmark: decode tokens/s of the engine with every sequence held to a JSON schema
against the same engine, prompts and weights without a constraint, in one run, at batch 1 and 4; and
the time a constrained step spends making each matcher's bitmask and masking the logits. The
constrained outputs must parse and match the schema. Ends with one JSON line.

    python bench/structured.py                       # CPU: SmolLM2-135M-Instruct, fp32
    python bench/structured.py --out bench/results/structured-cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from coeserve.benchmarks.common import device_name, sync, write_result
from coeserve.config import EngineConfig, default_home
from coeserve.engine import grammar
from coeserve.engine.engine import Engine
from coeserve.engine.load import load_expert
from coeserve.engine.sequence import SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "kind": {"type": "string", "enum": ["fruit", "vegetable"]},
    "facts": {"type": "array", "items": {"type": "string", "maxLength": 80}, "maxItems": 4}},
    "required": ["name", "kind", "facts"]}
ASKS = ["Describe an apple as JSON.", "Describe a carrot as JSON.", "Describe a banana as JSON.",
        "Describe a potato as JSON."]
RUNS = 3  # the best counts (a noisy machine)


class Timed:
    """grammar.mask (the matchers' bitmasks and the masking), timed."""

    def __init__(self):
        self.seconds, self.real = 0.0, grammar.mask

    def __call__(self, *args):
        t = time.perf_counter()
        self.real(*args)
        self.seconds += time.perf_counter() - t


def run(engine: Engine, codec, batch: int, constrained: bool, tokens: int) -> dict:
    params = SamplingParams(max_tokens=tokens, temperature=0,
                            grammar=("json_schema", json.dumps(SCHEMA)) if constrained else None)
    prompts = [codec.chat_prompt([{"role": "user", "content": ASKS[i % len(ASKS)]}])[0] for i in range(batch)]
    timed = Timed()
    grammar.mask = timed
    try:
        seqs = [engine.add(engine.make_sequence(p, params)) for p in prompts]
        while engine.prefilling or engine.waiting:  # time decode only: prefill first
            engine.step()
        sync(engine.expert.device)
        start, done = time.perf_counter(), sum(len(s.output_ids) for s in seqs)
        steps = 0
        while engine.has_work:
            engine.step()
            steps += 1
        sync(engine.expert.device)
        elapsed = time.perf_counter() - start
    finally:
        grammar.mask = timed.real
    generated = sum(len(s.output_ids) for s in seqs) - done
    valid = all(_valid(s.text) for s in seqs) if constrained else None
    return {"tok_s": generated / elapsed, "steps": steps, "mask_ms_per_step": 1e3 * timed.seconds / max(steps, 1),
            "valid": valid, "texts": [s.text for s in seqs]}


def _valid(text: str) -> bool:
    try:
        out = json.loads(text)
    except ValueError:
        return False
    return set(out) == {"name", "kind", "facts"} and out["kind"] in ("fruit", "vegetable")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--expert", default="smollm2-135m-instruct")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--tokens", type=int, default=160, help="max_tokens of each output")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", help="write the JSON result here too")
    args = ap.parse_args(argv)

    from coeserve import catalog
    from coeserve.store.disk import DiskStore
    store = DiskStore(default_home())
    catalog.ensure(store, [args.expert] if args.expert in catalog.BUILTINS else [])
    expert = load_expert(store, args.expert, device=args.device, dtype=args.dtype)
    engine = Engine(expert, EngineConfig(max_batch=max(int(b) for b in args.batches.split(",")), max_seq_len=1024))
    grammar.compiled(expert.codec, "json_schema", json.dumps(SCHEMA), expert.cfg.vocab_size)  # compile once, first
    rows, ok = [], True
    print(f"{'batch':>5s} {'plain tok/s':>11s} {'json tok/s':>10s} {'ratio':>6s} {'mask ms/step':>12s}")
    for b in (int(x) for x in args.batches.split(",")):
        plain = max((run(engine, expert.codec, b, False, args.tokens) for _ in range(RUNS)), key=lambda r: r["tok_s"])
        held = max((run(engine, expert.codec, b, True, args.tokens) for _ in range(RUNS)), key=lambda r: r["tok_s"])
        ok &= held["valid"]
        rows.append({"batch": b, "plain_tok_s": plain["tok_s"], "json_tok_s": held["tok_s"],
                     "ratio": held["tok_s"] / plain["tok_s"], "mask_ms_per_step": held["mask_ms_per_step"],
                     "valid_json": held["valid"], "json_texts": held["texts"]})
        print(f"{b:5d} {plain['tok_s']:11.1f} {held['tok_s']:10.1f} {rows[-1]['ratio']:6.2f} "
              f"{held['mask_ms_per_step']:12.2f}")
    result = {"bench": "structured", "expert": expert.name, "device": device_name(expert.device),
              "dtype": str(expert.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
              "schema": SCHEMA, "rows": rows, "all_valid": ok}
    ratios = ", ".join(f"{r['ratio']:.2f}x" for r in rows)
    print(f"JSON-schema decode runs at {ratios} the unconstrained rate "
          f"(batches {args.batches}); every output valid: {ok}")
    write_result(result, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
