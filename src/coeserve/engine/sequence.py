"""A request inside the engine: its prompt tokens, sampling parameters, output so far and state."""
from __future__ import annotations

import enum
import itertools
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # vLLM's: no end-of-sequence token, stop token id or stop string before this many
    min_p: float = 0.0  # drop tokens below min_p times the most likely one's probability; 0 = off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time the token was generated
    repetition_penalty: float = 1.0  # HF's / vLLM's: logits of tokens in the prompt or output divided by it
    logprobs: int | None = None  # None = off; else each output token's logprob and this many top alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (no prefix cache then)
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, bias) added to the logits
    stop_token_ids: tuple[int, ...] = ()  # vLLM's: generating one of these ends the output (it is not shown)
    grammar: tuple[str, str] | None = None  # structured output: (kind, spec), see engine/grammar.py

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError("repetition_penalty must be in (0, 2]")
        if any(k is not None and not 0 <= k <= MAX_LOGPROBS for k in (self.logprobs, self.prompt_logprobs)):
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
        if any(not -100 <= b <= 100 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if any(t < 0 for t, _ in self.logit_bias) or any(t < 0 for t in self.stop_token_ids):
            raise ValueError("token ids are not negative")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if self.min_tokens and self.grammar is not None:
            raise ValueError("min_tokens does not go with structured output (the grammar says where it ends)")
        if self.grammar is not None and (len(self.grammar) != 2 or self.grammar[0] not in GRAMMARS):
            raise ValueError(f"grammar is (kind, spec) with kind one of {', '.join(GRAMMARS)}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @property
    def greedy(self) -> bool:
        """Greedy: temperature 0 (or below 1e-5, vLLM's bound, where dividing by it overflows) or top_k 1."""
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """Whether the logits change before sampling (penalties or a logit bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


GRAMMARS = ("json_schema", "regex", "choice", "ebnf")  # the kinds of structured output (engine/grammar.py)
MAX_LOGPROBS = 20  # top alternatives a token may carry, as OpenAI's API allows


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None  # streaming callback: new text as it becomes final
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the KV cache
    cached: int = 0  # of them, those found there (the prefix cache), not computed
    source: tuple | None = None  # (sequence, n): copy its first n prompt positions once it has them
    text: str = ""  # final output text (stop strings cut)
    emitted: int = 0  # characters of `text` passed to on_text
    detok: object | None = None  # the tokenizer's TextStream of output_ids, made at the first token
    logprobs: list = field(default_factory=list)  # with params.logprobs: a `TokenLogprob` per output token
    logprobs_taken: int = 0  # of them, passed on by take_logprobs
    prompt_logprobs: list = field(default_factory=list)  # with params.prompt_logprobs: a `TokenLogprob` per
    # prompt token after the first, filled as the prompt is prefilled
    matcher: object | None = None  # with params.grammar: its xgrammar matcher, made at the first sample
    error: str | None = None  # why the engine ended it ("abort"), when it failed on its own
    penalty_tables: object | None = None  # with penalties and device sampling: engine/penalties._Tables
    draft_len: int = 0  # draft tokens to propose next (engine/speculate.py); 0: as many as the engine allows
    generator: torch.Generator = field(init=False)

    def __post_init__(self):
        self.generator = torch.Generator()
        self.generator.manual_seed(self.params.seed if self.params.seed is not None
                                   else int.from_bytes(os.urandom(8), "little") & (2**63 - 1))

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def take_logprobs(self) -> list:
        """The logprobs not yet taken (for a streaming callback to send with its text)."""
        new = self.logprobs[self.logprobs_taken:]
        self.logprobs_taken += len(new)
        return new

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
