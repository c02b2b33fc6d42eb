"""One forward step of a model over the KV cache: prefill a chunk of one sequence, or decode one token
for a batch. `fused=True` compiles the decode step with torch.compile (and CUDA graphs on CUDA)."""
from __future__ import annotations

import torch

from coeserve.engine.kv_cache import KVCache
from coeserve.engine.sequence import Sequence


class Runner:
    def __init__(self, model, kv: KVCache, device: torch.device, fused: bool = False):
        self.model, self.kv, self.device = model, kv, device
        self.fused = fused
        self._decode = self._compile() if fused else model

    def _compile(self):
        mode = "max-autotune-no-cudagraphs" if self.device.type != "cuda" else "reduce-overhead"
        return torch.compile(self.model, mode=mode, dynamic=True, fullgraph=False)

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
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for every sequence in one forward pass; logits [B, V]."""
        tokens = torch.tensor([[s.last_token] for s in seqs], device=self.device)
        positions = torch.tensor([[s.length - 1] for s in seqs], device=self.device)
        slots = [s.slot for s in seqs]
        self.kv.set_step(slots, max(s.length for s in seqs))
        return self._decode(tokens, positions, torch.tensor(slots, device=self.device), self.kv)
