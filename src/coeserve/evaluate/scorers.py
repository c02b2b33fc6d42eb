"""Automatic scorers: each turns a benchmark item into the prompt an expert sees and scores the reply in
[0, 1]. GSM8K/AIME: numeric exact match on the final answer; HumanEval: pass@1 of the extracted code,
executed by `sandbox.run_python`; GPQA: the chosen letter. Base class + registry, keyed by item source.
"""
from __future__ import annotations

import re

from coeserve.evaluate.sandbox import run_python
from coeserve.sources import Item

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class Scorer:
    name = ""

    def prompt(self, item: Item) -> str:
        raise NotImplementedError

    def score(self, item: Item, reply: str) -> tuple[float, str]:
        """(score in [0, 1], a short note on how it was decided)."""
        raise NotImplementedError


def final_number(reply: str) -> str | None:
    """The answer after the last 'Answer:' / '####' / 'answer is', else the last number in the reply."""
    tail = reply
    for marker in ("####", "answer is", "Answer:", "answer:"):
        if marker in tail:
            tail = tail.rsplit(marker, 1)[1]
            nums = _NUMBER.findall(tail)
            if nums:
                return nums[0].replace(",", "").rstrip(".")
            tail = reply
    nums = _NUMBER.findall(reply)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def same_number(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return False


class NumericMatch(Scorer):
    name = "numeric"

    def prompt(self, item):
        return (f"{item.prompt}\n\nSolve the problem step by step, then give the final answer on the last line "
                "in the form 'Answer: <number>'.")

    def score(self, item, reply):
        got = final_number(reply)
        return (1.0 if got is not None and same_number(got, item.answer) else 0.0), f"got {got}, want {item.answer}"


def extract_letter(reply: str) -> str | None:
    m = re.findall(r"[Aa]nswer\s*(?:is)?\s*[:：]?\s*\(?\**([ABCD])\b", reply)
    if m:
        return m[-1]
    m = re.match(r"\s*\(?([ABCD])[).:]?(\s|$)", reply)
    return m.group(1) if m else None


class MultipleChoice(Scorer):
    name = "choice"

    def prompt(self, item):
        return ("Answer the following multiple choice question. The last line of your response should be of the "
                "form 'Answer: LETTER' where LETTER is one of ABCD.\n\n" + item.prompt)

    def score(self, item, reply):
        got = extract_letter(reply)
        return (1.0 if got == item.answer else 0.0), f"got {got}, want {item.answer}"


def extract_code(reply: str) -> str:
    """The first fenced code block (```python or plain ```), else the whole reply."""
    m = re.search(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", reply, re.DOTALL)
    return m.group(1) if m else reply


def humaneval_program(item: Item, reply: str) -> str:
    """A whole function in the reply replaces the prompt's stub (the prompt's imports kept); anything else
    is taken as the body that continues the prompt, as HumanEval completions do."""
    code = extract_code(reply)
    if re.search(rf"^\s*def\s+{re.escape(item.answer)}\s*\(", code, re.MULTILINE):
        imports = "\n".join(l for l in item.prompt.splitlines() if l.startswith(("import ", "from ")))
        body = imports + "\n\n" + code
    else:
        body = item.prompt + code
    return f"{body}\n\n{item.extra['test']}\n\ncheck({item.answer})\n"


class HumanEvalPass(Scorer):
    name = "humaneval"

    def __init__(self, timeout: float = 10.0, memory_mb: int = 1024):
        self.timeout, self.memory_mb = timeout, memory_mb

    def prompt(self, item):
        return ("Complete the following Python function. Reply with the complete function in one ```python "
                f"code block.\n\n```python\n{item.prompt}```")

    def score(self, item, reply):
        r = run_python(humaneval_program(item, reply), timeout=self.timeout, memory_mb=self.memory_mb)
        return (1.0 if r.passed else 0.0), f"{r.status}: {r.detail}"[:200]


SCORERS = {"gsm8k": NumericMatch, "aime2025": NumericMatch, "gpqa-diamond": MultipleChoice,
           "human-eval": HumanEvalPass}


def scorer_for(item: Item) -> Scorer:
    if item.source not in SCORERS:
        raise ValueError(f"no automatic scorer for source {item.source!r}")
    return SCORERS[item.source]()
