"""Turn logits into tokens: greedy, temperature, top-k, top-p, each row with its own seeded generator,
so a sequence's tokens depend only on its seed, not on what else shares the batch."""
from __future__ import annotations

import torch

from coeserve.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    logits = logits.float()
    greedy = logits.argmax(dim=-1).tolist()
    return [greedy[i] if s.params.greedy else _sample_row(logits[i], s) for i, s in enumerate(seqs)]


def _sample_row(row: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    row = row / p.temperature
    if p.top_k:
        kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p.cpu(), 1, generator=seq.generator)
        return int(order[choice.to(order.device)])
    return int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))
