"""One forward step of a model over the KV cache: prefill a chunk of one sequence, prefill several short
prompts together, or decode one token for a batch. `fused=True` compiles the decode step with
torch.compile (and CUDA graphs on CUDA).

With `static=True` (the default for fused mode on CUDA, where CUDA graphs need it) a step has static
shapes: the batch is padded up to a bucket size (padding rows write to the cache's scratch slot) and the
attended length is rounded up to a multiple of LEN_BUCKET, so a few graphs, captured once each, serve
every step. On CPU the compiled step keeps dynamic shapes, which measured faster (docs/engine.md)."""
from __future__ import annotations

import torch

from coeserve.engine.kv_cache import KVCache
from coeserve.engine.sequence import Sequence


LEN_BUCKET = 256


class Runner:
    def __init__(self, model, kv: KVCache, device: torch.device, fused: bool = False,
                 buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), static: bool | None = None):
        self.model, self.kv, self.device = model, kv, device
        self.fused = fused
        self.static = fused and (device.type == "cuda" if static is None else static)
        self.buckets = tuple(b for b in buckets if b < kv.num_slots) + (kv.num_slots,)
        self._decode = self._compile() if fused else model
        self._compiled = {model: self._decode}

    def bind(self, model) -> None:
        """Step a model object bound to the same kind of weights elsewhere (another device slot); its
        compiled step is made once per model object, which lives as long as its slot."""
        if model is not self.model:
            self.model = model
            if not self.fused:
                self._decode = model
            else:
                if model not in self._compiled:
                    self._compiled[model] = self._compile()
                self._decode = self._compiled[model]

    def _compile(self):
        import torch._dynamo

        # One graph per (batch bucket, length bucket): allow that many before dynamo gives up.
        limit = len(self.buckets) * (self.kv.max_len // LEN_BUCKET + 1)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
        if self.device.type == "cuda":
            # Weights (views into a slot) and the KV cache never move: CUDA graphs may read them in
            # place instead of copying them into graph-owned buffers each replay.
            for t in list(self.model.w.values()) + self.kv.k + self.kv.v:
                torch._dynamo.mark_static_address(t)
        mode = "reduce-overhead" if self.device.type == "cuda" else "max-autotune-no-cudagraphs"
        return torch.compile(self.model, mode=mode, dynamic=not self.static)

    @torch.inference_mode()
    def prefill(self, seq: Sequence, chunk: int) -> torch.Tensor | None:
        """Run the next chunk of the prompt; logits [V] once the prompt is all in, else None."""
        lo = seq.prefilled
        hi = min(len(seq.prompt_ids), lo + chunk)
        tokens = torch.tensor([seq.prompt_ids[lo:hi]], device=self.device)
        positions = torch.arange(lo, hi, device=self.device).unsqueeze(0)
        self.kv.set_step([seq.slot], hi)
        logits = self.model(tokens, positions, torch.tensor([seq.slot], device=self.device), self.kv)
        seq.prefilled = hi
        return logits[0] if hi == len(seq.prompt_ids) else None

    @torch.inference_mode()
    def prefill_batch(self, seqs: list[Sequence]) -> torch.Tensor:
        """Whole prompts of several sequences in one forward pass, right-padded to the longest; logits
        [B, V] at each one's last token. A padded row writes keys past its prompt end, where its own
        later tokens overwrite them before any query may see them (attention reads positions <= its own)."""
        T = max(len(s.prompt_ids) for s in seqs)
        tokens = torch.tensor([s.prompt_ids + [0] * (T - len(s.prompt_ids)) for s in seqs], device=self.device)
        positions = torch.arange(T, device=self.device).expand(len(seqs), T)
        slots = [s.slot for s in seqs]
        self.kv.set_step(slots, T)
        last = torch.tensor([len(s.prompt_ids) - 1 for s in seqs], device=self.device)
        logits = self.model(tokens, positions, torch.tensor(slots, device=self.device), self.kv, last)
        for s in seqs:
            s.prefilled = len(s.prompt_ids)
        return logits

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for every sequence in one forward pass; logits [B, V]."""
        tokens = [s.last_token for s in seqs]
        positions = [s.length - 1 for s in seqs]
        slots = [s.slot for s in seqs]
        read_len = max(s.length for s in seqs)
        if self.static:
            pad = next(b for b in self.buckets if b >= len(seqs)) - len(seqs)
            tokens, positions, slots = tokens + [0] * pad, positions + [0] * pad, slots + [self.kv.scratch] * pad
            read_len = min(-(-read_len // LEN_BUCKET) * LEN_BUCKET, self.kv.max_len)
        self.kv.set_step(slots, read_len, views=not self.static)
        # While a switch is still streaming layers in, the eager model waits on each one; the compiled
        # step (and its CUDA graphs) runs once the whole expert is in its slot.
        step = self.model if self.model.layer_ready is not None else self._decode
        logits = step(torch.tensor(tokens, device=self.device)[:, None],
                              torch.tensor(positions, device=self.device)[:, None],
                              torch.tensor(slots, device=self.device), self.kv)
        return logits[: len(seqs)]
