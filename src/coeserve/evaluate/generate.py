"""Batched greedy generation on installed experts for the evaluator: one expert loaded at a time (plus a
judge kept loaded), each prompt wrapped in the expert's chat format."""
from __future__ import annotations

from coeserve.config import EngineConfig
from coeserve.engine.sequence import SamplingParams

MAX_BATCH = 8  # sequences decoded together; the KV cache for 8 × 2048 tokens stays well under 2 GiB


class Generators:
    def __init__(self, store, device: str = "auto", max_seq_len: int = 2048):
        self.store, self.device, self.max_seq_len = store, device, max_seq_len
        self.current: dict = {}  # the one expert under evaluation
        self.kept: dict = {}  # the judge

    def _engine(self, name: str, keep: bool):
        from coeserve.engine.engine import Engine
        from coeserve.engine.load import load_expert

        if name in self.kept or name in self.current:
            return (self.kept | self.current)[name]
        cfg = EngineConfig(max_batch=MAX_BATCH, max_seq_len=self.max_seq_len, device=self.device)
        expert = load_expert(self.store, name, device=cfg.device, max_len=cfg.max_seq_len)
        if expert.codec is None:
            raise ValueError(f"expert {name!r} has no tokenizer files, so it cannot take text")
        engine = Engine(expert, cfg)
        if keep:
            self.kept[name] = engine
        else:
            self.current = {name: engine}  # drop the previous expert before the next one grows the heap
        return engine

    def get(self, name: str, keep: bool = False, prefix: str = ""):
        """fn(prompts, max_tokens) → replies, greedy. `prefix` starts each reply (and is part of it)."""
        def generate(prompts: list[str], max_tokens: int) -> list[str]:
            engine = self._engine(name, keep)
            codec = engine.expert.codec
            encoded = [codec.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
            start = list(codec.tok(prefix, add_special_tokens=False).input_ids) if prefix else []
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=encoded[0][1] if encoded else ())
            return [prefix + s.text for s in engine.generate([ids + start for ids, _ in encoded], params)]
        return generate
