"""Draft tokens by prompt lookup (n-gram speculation, vLLM's `ngram` method): a sequence whose last few
tokens occurred earlier in its prompt or output is guessed to go on as it went on there. The engine
feeds a greedy sequence's last token and its drafts through one pass, reads the model's choice at each
of their positions, and keeps the drafts up to the first the model would not have chosen, plus the
model's own token after them: the tokens of decoding one at a time, several from one pass where the
output repeats its context (code edits, quotes, lists), one where it does not. A decode pass reads
all the weights whatever its few rows, so the drafts it checks cost little on memory-bound hardware."""
from __future__ import annotations

from coeserve.engine.sequence import Sequence

NGRAM_MAX = 3  # the longest tail looked up first: a longer match predicts better
NGRAM_MIN = 2  # one token matches too often to predict much


def propose(tokens: list[int], k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest tail of `tokens` (of
    NGRAM_MAX down to NGRAM_MIN tokens) that occurred before; none if no tail did."""
    if k < 1:
        return []
    end = len(tokens)
    for n in range(min(NGRAM_MAX, end - 1), NGRAM_MIN - 1, -1):
        tail = tokens[end - n:]
        first = tail[0]
        for start in range(end - n - 1, -1, -1):  # latest first; start + n < end: something follows
            if tokens[start] == first and tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []


def accepted(drafts: list[int], choices: list[int]) -> list[int]:
    """The tokens a pass over [last token, *drafts] gives, `choices` being the model's pick at each of
    its positions: the drafts up to the first the model did not pick, then the model's pick there."""
    m = 0
    while m < len(drafts) and drafts[m] == choices[m]:
        m += 1
    return choices[:m + 1]


def drafts(seqs: list[Sequence], k: int, max_len: int) -> dict[Sequence, list[int]]:
    """Draft tokens (up to k each, or a sequence's draft_len) for the sequences that take the most likely
    token with nothing between the logits and the choice, within their limits: every draft accepted and
    the token after them still fit max_tokens and the context of max_len."""
    out = {}
    for s in seqs:
        p = s.params
        if not p.greedy or p.penalised or p.grammar is not None or len(s.output_ids) < p.min_tokens:
            continue
        room = min(s.draft_len or k, p.max_tokens - len(s.output_ids) - 1, max_len - s.length - 1)
        found = propose(s.prompt_ids + s.output_ids, room)
        if found:
            out[s] = found
    return out
