"""A sequence's output text as its tokens arrive: detokenized a token at a time (the tokenizer's
TextStream), cut at the first stop string, and handed to its streaming callback as far as it can no
longer change (not an incomplete UTF-8 character, not the start of a stop string)."""
from __future__ import annotations

from coeserve.engine.sequence import Sequence


def extend(codec, seq: Sequence, token: int | None, last: bool = True) -> bool:
    """Add `token`'s text (and, when `last`, any text held back) to seq.text; True if that completed a
    stop string, then the text is cut before it. Only the new text, and the end of the old that a
    stop string could begin in, is searched: each token costs the same however long the output.
    `codec` None: an expert without a tokenizer, whose sequences have no text."""
    if codec is None:
        return False
    if seq.detok is None:
        seq.detok = codec.stream()
    new = seq.detok.push(token) if token is not None else ""
    new += seq.detok.flush() if last else ""
    if not new:
        return False
    stops = seq.params.stop if len(seq.output_ids) >= seq.params.min_tokens else ()  # vLLM's min_tokens
    start = max(0, len(seq.text) - max((len(s) for s in stops), default=1) + 1)
    seq.text += new
    cut = min((i for i in (seq.text.find(s, start) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        seq.text = seq.text[:cut]
    return cut >= 0


def emit(seq: Sequence, final: bool) -> None:
    """Pass the callback the text not yet passed that can no longer change (all of it when `final`)."""
    end = len(seq.text)
    if not final:
        end = len(seq.text.rstrip("\ufffd"))  # an incomplete UTF-8 character is still arriving
        for s in seq.params.stop:  # hold back text that may begin a stop string
            for k in range(min(len(s) - 1, end), 0, -1):
                if seq.text.endswith(s[:k], 0, end):
                    end -= k
                    break
    if end > seq.emitted and seq.on_text:
        seq.on_text(seq.text[seq.emitted:end])
    seq.emitted = max(seq.emitted, end)
