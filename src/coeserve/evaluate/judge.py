"""LLM-as-judge for open-ended categories: single-answer grading on a 1–10 scale (MT-Bench style).

The judge is a local expert (`ExpertJudge`) or any OpenAI-compatible chat endpoint (`EndpointJudge`,
through the `openai` client). The rating is read from `[[N]]`, else from `Rating: N`; a reply with
neither, or a number outside 1–10, is unparseable and scores as the lowest rating (1), so a judge that
cannot follow the format pulls scores down rather than silently dropping items; the evaluator counts them.
"""
from __future__ import annotations

import re

TEMPLATE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Consider helpfulness, relevance, accuracy, depth and "
    "level of detail. Start your reply with the rating on a scale of 1 to 10, strictly in this format, for "
    "example: \"Rating: [[5]]\", then explain it in one sentence.\n\n[Question]\n{question}\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]")


def parse_rating(reply: str) -> int | None:
    for pattern in (r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", r"[Rr]ating\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)"):
        m = re.search(pattern, reply)
        if m:
            value = float(m.group(1))
            return int(round(value)) if 1 <= value <= 10 else None
    return None


def to_score(rating: int | None) -> float:
    """1 → 0.0 … 10 → 1.0, on the same [0, 1] scale as the automatic scorers; unparseable → 0.0."""
    return 0.0 if rating is None else (rating - 1) / 9


class Judge:
    name = ""

    def replies(self, prompts: list[str]) -> list[str]:
        raise NotImplementedError

    def grade(self, questions: list[str], answers: list[str]) -> list[int | None]:
        prompts = [TEMPLATE.format(question=q, answer=a) for q, a in zip(questions, answers)]
        return [parse_rating(r) for r in self.replies(prompts)]


PREFIX = "Rating: [["  # a local judge's reply starts here, so even a small model answers with a number


class ExpertJudge(Judge):
    """A local expert grades greedily; `generate(prompts, max_tokens)` is the evaluator's batched
    generation, whose replies should start with PREFIX."""

    def __init__(self, name: str, generate, max_tokens: int = 48):
        self.name, self.generate, self.max_tokens = f"expert:{name}", generate, max_tokens

    def replies(self, prompts):
        return self.generate(prompts, self.max_tokens)


class EndpointJudge(Judge):
    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_tokens: int = 256):
        import os

        from openai import OpenAI

        self.name, self.model, self.max_tokens = f"endpoint:{model}", model, max_tokens
        # Local OpenAI-compatible servers accept any key; the client insists on one.
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none")

    def replies(self, prompts):
        out = []
        for p in prompts:
            r = self.client.chat.completions.create(model=self.model, temperature=0, max_tokens=self.max_tokens,
                                                    messages=[{"role": "user", "content": p}])
            out.append(r.choices[0].message.content or "")
        return out
