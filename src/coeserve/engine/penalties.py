"""Repetition, presence and frequency penalties and the logit bias, two ways that give the same logits:
`penalise`, on one row from a sequence's token lists (CPU's, with row-by-row sampling), and
`DevicePenalties`, on a batch of rows from token tables each sequence keeps on the device (with device
sampling, CUDA's): no host sync, and passes queued ahead count the tokens they pick in the tables on
the device, so penalised requests run ahead too."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from coeserve.engine.sequence import Sequence


def penalise(row: torch.Tensor, seq: Sequence) -> None:
    """In place, on one row of logits: HF's repetition penalty over the prompt and output (a positive
    logit divided by it, a negative one multiplied), then OpenAI's presence and frequency penalties over
    the output (minus presence once, minus frequency per occurrence), then OpenAI's logit bias (added)."""
    p, dev = seq.params, row.device
    if p.repetition_penalty != 1.0:
        ids = torch.tensor(seq.prompt_ids + seq.output_ids, device=dev).unique()
        seen = row[ids]
        row[ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
        counts = torch.bincount(torch.tensor(seq.output_ids, device=dev), minlength=row.numel())[:row.numel()]
        row -= counts * p.frequency_penalty + (counts > 0) * p.presence_penalty
    if p.logit_bias:
        ids, bias = zip(*p.logit_bias)
        row.index_add_(0, torch.tensor(ids, device=dev), torch.tensor(bias, device=dev, dtype=row.dtype))


@dataclass
class _Tables:
    """A sequence's tokens as the penalties read them, on the device: which tokens its prompt and output
    hold (repetition), how often its output holds each (presence, frequency), its logit bias as a row,
    and how many output tokens are counted (the rest are added at the next use)."""
    seen: torch.Tensor
    counts: torch.Tensor
    bias: torch.Tensor
    counted: int = 0


def _tables(seq: Sequence, vocab: int, device: torch.device) -> _Tables:
    t = seq.penalty_tables
    if t is None:
        t = seq.penalty_tables = _Tables(torch.zeros(vocab, dtype=torch.bool, device=device),
                                         torch.zeros(vocab, device=device), torch.zeros(vocab, device=device))
        t.seen[torch.tensor(seq.prompt_ids, device=device)] = True
        if seq.params.logit_bias:
            ids, bias = zip(*seq.params.logit_bias)
            t.bias.index_add_(0, torch.tensor(ids, device=device), torch.tensor(bias, device=device))
    if len(seq.output_ids) > t.counted:
        new = torch.tensor(seq.output_ids[t.counted:], device=device)
        t.seen[new] = True
        t.counts.index_put_((new,), torch.ones_like(new, dtype=t.counts.dtype), accumulate=True)
        t.counted = len(seq.output_ids)
    return t


class DevicePenalties:
    """The penalties of a batch's rows (`row_seqs`; None: a row that is no one's), as `penalise` applies
    them, from the sequences' tables stacked once: `apply` to a pass's logits, then `advance` with the
    tokens it picked to count them for the next pass."""

    def __init__(self, row_seqs: list[Sequence | None], vocab: int, device: torch.device):
        self.rows = [i for i, s in enumerate(row_seqs) if s is not None and s.params.penalised]
        if not self.rows:
            return
        tables = [_tables(row_seqs[i], vocab, device) for i in self.rows]
        self.index = torch.tensor(self.rows, device=device)
        self.seen = torch.stack([t.seen for t in tables])
        self.counts = torch.stack([t.counts for t in tables])
        self.bias = torch.stack([t.bias for t in tables])
        ps = [row_seqs[i].params for i in self.rows]
        self.rep, self.presence, self.frequency = (
            torch.tensor([[getattr(p, f)] for p in ps], device=device)
            for f in ("repetition_penalty", "presence_penalty", "frequency_penalty"))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalised logits (a new tensor when any row is penalised; the rows of the others unchanged)."""
        if not self.rows:
            return logits
        x = logits.index_select(0, self.index)
        x = torch.where(self.seen & (self.rep != 1.0), torch.where(x > 0, x / self.rep, x * self.rep), x)
        x = x - (self.counts * self.frequency + (self.counts > 0) * self.presence) + self.bias
        return logits.index_copy(0, self.index, x)

    def advance(self, tokens: torch.Tensor) -> None:
        """Count each penalised row's token of this pass (tokens: one per row of the batch)."""
        if self.rows:
            picked = tokens.index_select(0, self.index)
            rows = torch.arange(len(self.rows), device=picked.device)
            self.seen[rows, picked] = True
            self.counts[rows, picked] += 1
