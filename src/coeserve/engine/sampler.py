"""Turn logits into tokens: repetition penalties, a logit bias and a grammar's mask, then greedy or
temperature, top-k, min-p and top-p, each sampled token taking one uniform number from its sequence's
own seeded generator, so a sequence's tokens depend only on its seed, not on what else shares the
batch. Row by row (`_sample_row`, CPU's default), or with `batched=True` (CUDA's) every row at once on
the device (`sample_batch`), with no host sync, so passes queued ahead can sample too. `token_logprobs`
gives the logprobs a request asked for, from the model's own distribution (the raw logits, before
penalties, bias and temperature: vLLM's default)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from coeserve.engine import grammar
from coeserve.engine.penalties import DevicePenalties, penalise
from coeserve.engine.sequence import Sequence


class TokenLogprob(NamedTuple):
    """An output token's logprob and the `top` most likely tokens at its step, as (id, logprob), best
    first."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


NONE = -1  # sample()'s token for a row that allows no token (a grammar at a dead end): the sequence ends


def sample(logits: torch.Tensor, seqs: list[Sequence], ban: dict[int, list[int]] | None = None,
           batched: bool = False) -> list[int]:
    """A token for each row; `ban`: row → token ids it may not take (the ends a min_tokens holds off).
    NONE for a row whose masks allow no token. `batched`: the sampled rows in one `sample_batch`."""
    logits = logits.float()
    guided = [i for i, s in enumerate(seqs) if s.matcher is not None]
    if guided or ban or any(s.params.penalised for s in seqs):
        logits = logits.clone()  # the caller's logits stay raw (token_logprobs reads them)
        if batched:
            logits = DevicePenalties(seqs, logits.shape[-1], logits.device).apply(logits)
        for i, s in enumerate(seqs):
            if s.params.penalised and not batched:
                penalise(logits[i], s)
        for i, ids in (ban or {}).items():
            logits[i, ids] = float("-inf")
        if guided:  # structured output: only the tokens that keep each output valid
            grammar.mask(logits, guided, [seqs[i].matcher for i in guided])
    dead = set()
    if guided:  # a grammar at a dead end (it compiled, yet admits nothing here) allows no token at all
        allowed = (logits[guided] > float("-inf")).any(dim=-1).tolist()
        dead = {i for i, ok in zip(guided, allowed) if not ok}
    if batched:
        return _sample_batched(logits, seqs, dead)
    greedy = logits.argmax(dim=-1).tolist()
    return [NONE if i in dead else greedy[i] if s.params.greedy else _sample_row(logits[i], s)
            for i, s in enumerate(seqs)]


def _sample_batched(logits: torch.Tensor, seqs: list[Sequence], dead: set[int]) -> list[int]:
    tokens = logits.argmax(dim=-1)
    hot = [i for i, s in enumerate(seqs) if not s.params.greedy and i not in dead]
    if hot:
        rows = torch.tensor(hot, device=logits.device)
        hot_seqs = [seqs[i] for i in hot]
        u = uniforms(hot_seqs, 1, logits.device)[0]
        tokens[rows] = sample_batch(logits.index_select(0, rows), *row_params(hot_seqs, logits.device), u)
    out = tokens.tolist()
    return [NONE if i in dead else out[i] for i in range(len(seqs))]


def row_params(seqs: list[Sequence | None], device: torch.device) -> tuple[torch.Tensor, ...]:
    """sample_batch's temperature, top_k, top_p and min_p of each row; a greedy row or None (a row that
    is no one's) has temperature 0, and takes the argmax."""
    ps = [s.params if s is not None and not s.params.greedy else None for s in seqs]
    temp = torch.tensor([p.temperature if p else 0.0 for p in ps], device=device)
    top_k = torch.tensor([p.top_k if p else 0 for p in ps], device=device)
    top_p = torch.tensor([p.top_p if p else 1.0 for p in ps], device=device)
    min_p = torch.tensor([p.min_p if p else 0.0 for p in ps], device=device)
    return temp, top_k, top_p, min_p


def uniforms(seqs: list[Sequence | None], n: int, device: torch.device) -> torch.Tensor:
    """[n, rows]: the uniform numbers of each sampled row's next n tokens, drawn from its sequence's
    generator as one pass a step draws them (one a token, in order): the same seed gives the same tokens
    however many passes a step runs. 0 for greedy rows and rows that are no one's."""
    u = [[float(torch.rand((), generator=s.generator)) if s is not None and not s.params.greedy else 0.0
          for s in seqs] for _ in range(n)]
    return torch.tensor(u, device=device)


class AheadPicker:
    """For `steps` passes queued ahead (Runner.decode_ahead): called with a pass's logits and its number
    k, each row's token on the device, as one pass a step picks it: min_tokens' banned ends masked while
    held off, the rows' penalties (DevicePenalties, whose tables then count the token), then the argmax,
    or sample_batch with uniform numbers drawn for all passes first. For rows that ask, the picked
    tokens' logprobs from the raw logits, read back after the last pass (`logprobs`). `ends`: the
    expert's end-of-sequence ids; None rows are no one's."""

    def __init__(self, row_seqs: list[Sequence | None], steps: int, device: torch.device, ends=frozenset()):
        live = [s for s in row_seqs if s is not None]
        self.row_seqs, self.device, self.ends = row_seqs, device, ends
        self.greedy = all(s.params.greedy for s in live)
        self.plain = self.greedy and not any(s.params.penalised or s.params.logprobs is not None
                                             or len(s.output_ids) < s.params.min_tokens for s in live)
        self.params = None if self.greedy else row_params(row_seqs, device)
        self.u = None if self.greedy else uniforms(row_seqs, steps, device)
        self.want = [i for i, s in enumerate(row_seqs) if s is not None and s.params.logprobs is not None]
        self.top = max((row_seqs[i].params.logprobs for i in self.want), default=0)
        self.tables, self.recorded = None, []

    def __call__(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        if self.plain:
            return logits.argmax(dim=-1)
        if self.tables is None:
            self._prepare(logits.shape[-1])
        x = self.tables.apply(logits.float())
        if self.ban is not None:
            x = x.masked_fill(self.ban & (self.need > k)[:, None], float("-inf"))
        tokens = x.argmax(dim=-1) if self.greedy else sample_batch(x, *self.params, self.u[k])
        self.tables.advance(tokens)
        if self.want:
            lp = torch.log_softmax(logits.index_select(0, self.rows).float(), dim=-1)
            chosen = lp.gather(1, tokens.index_select(0, self.rows)[:, None])[:, 0]
            top_v, top_i = lp.topk(self.top, dim=-1) if self.top else (lp[:, :0], lp[:, :0].long())
            self.recorded.append((chosen, top_v, top_i))
        return tokens

    def _prepare(self, vocab: int) -> None:
        """The penalty tables and the ends each row holds off, for how many more passes."""
        dev = self.device
        self.tables = DevicePenalties(self.row_seqs, vocab, dev)
        self.rows = torch.tensor(self.want, device=dev)
        need = [max(s.params.min_tokens - len(s.output_ids), 0) if s is not None else 0 for s in self.row_seqs]
        self.ban = None
        if any(need):
            self.ban = torch.zeros(len(self.row_seqs), vocab, dtype=torch.bool, device=dev)
            for i, s in enumerate(self.row_seqs):
                if need[i]:
                    self.ban[i, sorted(self.ends | set(s.params.stop_token_ids))] = True
            self.need = torch.tensor(need, device=dev)

    def logprobs(self, picked: torch.Tensor) -> list[list[TokenLogprob | None]] | None:
        """[steps][rows] the picked tokens' logprobs (None for rows that asked for none); None if no row
        asked. `picked`: [steps, rows], the tokens."""
        if not self.want:
            return None
        chosen, top_v, top_i = (torch.stack(t).tolist() for t in zip(*self.recorded))
        tokens = picked.tolist()
        out = []
        for k in range(len(tokens)):
            row: list[TokenLogprob | None] = [None] * len(self.row_seqs)
            for j, i in enumerate(self.want):
                n = self.row_seqs[i].params.logprobs
                row[i] = TokenLogprob(tokens[k][i], chosen[k][j], tuple(zip(top_i[k][j][:n], top_v[k][j][:n])))
            out.append(row)
        return out


def sample_batch(logits: torch.Tensor, temp: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A token for each row of logits [R, V], all on the device and without a host sync: temperature,
    top-k, min-p and top-p as _sample_row applies them, over each row sorted once, then the token where
    u (in [0, 1)) times the kept mass falls in the kept tokens' cumulative mass, most likely first. Rows
    with temperature 0 take the argmax. The full sort costs little on a GPU (vLLM sorts too) and much on
    a CPU, where _sample_row's topk search serves one pass a step."""
    hot = temp > 0
    x = logits.float() / torch.where(hot, temp, 1.0)[:, None]
    vals, ids = x.sort(dim=-1, descending=True)
    n = vals.shape[-1]
    kth = vals.gather(1, (torch.where(top_k > 0, top_k, n).clamp_max(n) - 1)[:, None])
    probs = vals.masked_fill(vals < kth, float("-inf")).softmax(dim=-1)
    probs = probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)  # top_p counts the mass of what min_p kept
    # A token is kept while the mass before it is under top_p; top_p 1 keeps all (a sum may round past 1).
    probs = probs * ((probs.cumsum(dim=-1) - probs < top_p[:, None]) | (top_p[:, None] >= 1))
    cdf = probs.cumsum(dim=-1)
    at = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    # u times the mass rounded up to the mass: the last token with any (the kept tokens lead the row)
    at = torch.minimum(at, (probs > 0).sum(dim=-1, keepdim=True) - 1)
    return torch.where(hot, ids.gather(1, at).squeeze(1), logits.argmax(dim=-1))


NUCLEUS = 256  # top_p looks for its tokens among this many most likely ones first (_nucleus)


def _sample_row(row: torch.Tensor, seq: Sequence) -> int:
    """One token from a row of logits: temperature, then top-k, min-p and top-p, then a draw from the
    sequence's own generator (one uniform number a token, inverted through the kept tokens' cumulative
    probabilities). Only _nucleus's rare fallback sorts the whole vocabulary: a sort of SmolLM2's 49k
    logits took 3.4 ms of the 5 a row took before, and torch.multinomial over them 1.1."""
    p = seq.params
    row = row / p.temperature
    if p.top_k:
        kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()  # top_p counts the mass of what min_p kept
    ids = None
    if p.top_p < 1.0:
        probs, ids = _nucleus(probs, p.top_p)
    cdf = probs.cumsum(0)
    u = torch.rand((), generator=seq.generator).item()
    at = torch.tensor([u], dtype=cdf.dtype, device=cdf.device) * cdf[-1]
    i = int(torch.searchsorted(cdf, at, right=True))  # the first token whose cumulative mass passes u
    if i >= cdf.numel():  # u * total rounded up to the total: the last token with any mass
        i = int(torch.nonzero(probs).max())
    return i if ids is None else int(ids[i])


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of most likely tokens whose probability reaches top_p (the most likely token
    always): their probabilities, most likely first, and their ids. A token is kept while the mass of
    the tokens before it is under top_p. The set lies within any most-likely tokens of mass >= top_p:
    the NUCLEUS most likely when they have it, else those at or above the largest power of two whose
    tokens have it (a histogram of the probabilities' exponents finds it in one pass), sorted alone.
    Only if float rounding leaves those short is the whole row sorted."""
    k = min(NUCLEUS, probs.numel())
    vals, ids = probs.topk(k)
    if k < probs.numel() and vals.cumsum(0)[-1] < top_p:  # the token after them would be kept too
        vals, ids = _at_least(probs, top_p)
    return vals * (vals.cumsum(0) - vals < top_p), ids


def _at_least(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Most likely tokens with mass >= top_p (more than the smallest such set, fewer than all), sorted."""
    bucket = (-torch.floor(torch.log2(probs.clamp_min(2.0 ** -126)))).long()  # p in [2^-b, 2^(1-b)) → b
    mass = torch.bincount(bucket, weights=probs.double(), minlength=128).cumsum(0)  # of p >= 2^-b, by b
    b = int(torch.searchsorted(mass, torch.tensor([top_p], dtype=mass.dtype, device=mass.device)))
    if b < mass.numel():
        ids = torch.nonzero(probs >= 2.0 ** -b).squeeze(1)
        vals, order = probs[ids].sort(descending=True)
        if vals.cumsum(0)[-1] >= top_p:  # as _nucleus will count it: the token after them is not kept
            return vals, ids[order]
    return probs.sort(descending=True)


def token_logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
    """For each row whose sequence asked for logprobs, the chosen token's and the top alternatives'
    (log-softmax of the raw logits, in fp32); None for the others. One pass over the rows that ask."""
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(seqs)
    if want:
        found = logprobs_of(logits[want], [tokens[i] for i in want], max(seqs[i].params.logprobs for i in want))
        for i, lp in zip(want, found):
            n = seqs[i].params.logprobs
            out[i] = lp._replace(top=lp.top[:n])
    return out


def logprobs_of(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Each row's logprob of its token and its k most likely tokens' (log-softmax in fp32)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    rows = torch.arange(len(tokens), device=lp.device)
    chosen = lp[rows, torch.tensor(tokens, device=lp.device)].tolist()
    top_v, top_i = (lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [TokenLogprob(t, c, tuple(zip(i, v))) for t, c, i, v in zip(tokens, chosen, top_i, top_v)]


def prompt_logprobs(chunks: list[tuple[Sequence, int, int]], logits: torch.Tensor) -> int:
    """Add to each chunk's sequence the logprobs of its prompt tokens lo+1 .. hi (within the prompt),
    from `logits` at the positions before them, chunk after chunk (Runner.packed's `every` rows).
    The rows of `logits` read."""
    row = 0
    for seq, lo, hi in chunks:
        targets = seq.prompt_ids[lo + 1:min(hi, len(seq.prompt_ids) - 1) + 1]
        if targets:
            seq.prompt_logprobs += logprobs_of(logits[row:row + len(targets)], targets, seq.params.prompt_logprobs)
        row += len(targets)
    return row
