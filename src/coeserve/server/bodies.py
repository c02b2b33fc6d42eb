"""The response bodies, stream chunks, logprobs and error bodies the OpenAI API answers with, in
OpenAI's exact shapes (the requests' schemas are server/schemas.py)."""
from __future__ import annotations

import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_choice(index: int, text: str, finish: str, logprobs: dict | None = None,
                tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def chat_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_chunk(rid: str, model: str, delta: dict | None, finish: str | None = None, use: dict | None = None,
               logprobs: dict | None = None, index: int = 0) -> dict:
    choice = None if delta is None else {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return _chunk(rid, model, "chat.completion.chunk", choice, use)


def _chunk(rid: str, model: str, kind: str, choice: dict | None, use: dict | None) -> dict:
    """A stream chunk: one choice's news, or none (the usage chunk)."""
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "choices": [] if choice is None else [choice]}
    if use is not None:
        body["usage"] = use
    return body


def completion_choice(index: int, text: str, finish: str, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def completion_chunk(rid: str, model: str, text: str | None, finish: str | None = None,
                     use: dict | None = None, logprobs: dict | None = None, index: int = 0) -> dict:
    choice = None if text is None else completion_choice(index, text, finish, logprobs)
    return _chunk(rid, model, "text_completion", choice, use)


def _finite(lp: float) -> float:
    return max(lp, -9999.0)  # JSON has no -inf; OpenAI-compatible servers send -9999.0 for it


class Logprobs:
    """Logprobs of one response's tokens (engine/sampler.TokenLogprob) in OpenAI's two shapes, a batch
    at a time (a stream chunk's or the whole output's). `piece(id)` is the codec's (text, bytes) of a
    token. The completions shape counts `text_offset` on from the tokens before."""

    def __init__(self, piece, chat: bool):
        self.piece, self.chat, self.offset = piece, chat, 0

    def __call__(self, items) -> dict | None:
        if not items:
            return None
        return self._chat(items) if self.chat else self._completion(items)

    def _entry(self, token: int, lp: float) -> dict:
        text, data = self.piece(token)
        return {"token": text, "logprob": _finite(lp), "bytes": data}

    def _chat(self, items) -> dict:
        return {"content": [{**self._entry(x.token, x.logprob), "top_logprobs": [self._entry(i, lp) for i, lp in x.top]}
                            for x in items], "refusal": None}

    def _completion(self, items) -> dict:
        """An echoed prompt's first token has no logprob (nothing precedes it): None, as OpenAI gives it."""
        tokens, offsets = [], []
        for x in items:
            tokens.append(self.piece(x.token)[0])
            offsets.append(self.offset)
            self.offset += len(tokens[-1])
        return {"tokens": tokens,
                "token_logprobs": [None if x.logprob is None else _finite(x.logprob) for x in items],
                "top_logprobs": [None if x.top is None else {self.piece(i)[0]: _finite(lp) for i, lp in x.top}
                                 for x in items],
                "text_offset": offsets}


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
