"""From engine events to HTTP: SSE chunks in OpenAI's format (ending `data: [DONE]`) or one body.
A client that goes away cancels its request, which frees its KV-cache slot."""
from __future__ import annotations

import asyncio
import json

from coeserve.server import schemas

FINISH = {"stop": "stop", "length": "length", "abort": "stop"}


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


class _Tally:
    """Latency metrics for one request: time to first token, then the gaps between text events."""

    def __init__(self, state, job):
        self.state, self.job, self.last = state, job, None

    def text(self, at: float) -> None:
        m = self.state.metrics
        if m is not None:
            if self.last is None:
                m.ttft.labels(self.job.expert).observe(at - self.job.arrival)
            else:
                m.itl.labels(self.job.expert).observe(at - self.last)
        self.last = at

    def done(self, seq, status: str) -> None:
        m = self.state.metrics
        if m is not None:
            m.requests.labels(self.job.expert, status).inc()
            m.tokens.labels(self.job.expert, "prompt").inc(len(seq.prompt_ids))
            m.tokens.labels(self.job.expert, "completion").inc(len(seq.output_ids))


def _logprobs(state, job, chat: bool):
    """The request's logprobs formatter, or one that gives None when it asked for none."""
    if job.seq.params.logprobs is None:
        return lambda items: None
    return schemas.Logprobs(state.codec(job.expert).piece, chat)


async def stream(state, job, events: asyncio.Queue, chat: bool, include_usage: bool):
    rid = schemas.new_id("chatcmpl" if chat else "cmpl")
    model, tally, finished = job.expert, _Tally(state, job), False
    logprobs, sent = _logprobs(state, job, chat), 0  # tokens whose logprobs went out
    try:
        if chat:
            yield _sse(schemas.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
        while True:
            kind, payload, at = await events.get()
            if kind == "text":
                tally.text(at)
                text, items = payload
                sent += len(items)
                lp = logprobs(items)
                yield _sse(schemas.chat_chunk(rid, model, {"content": text}, logprobs=lp) if chat else
                           schemas.completion_chunk(rid, model, text, logprobs=lp))
                continue
            finished = True
            if kind == "error":
                tally.done(job.seq, "error")
                yield _sse(schemas.error_body(f"{model} failed: {payload}", "server_error"))
                break
            seq = payload
            tally.done(seq, FINISH.get(seq.finish_reason, "stop"))
            reason = FINISH.get(seq.finish_reason, "stop")
            lp = logprobs(seq.logprobs[sent:])  # tokens whose text never showed (a stop string's)
            yield _sse(schemas.chat_chunk(rid, model, {}, reason, logprobs=lp) if chat else
                       schemas.completion_chunk(rid, model, "", reason, logprobs=lp))
            if include_usage:
                use = schemas.usage(len(seq.prompt_ids), len(seq.output_ids))
                yield _sse(schemas.chat_chunk(rid, model, None, use=use) if chat else
                           schemas.completion_chunk(rid, model, None, use=use))
            break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream
            state.scheduler.cancel(job)
            if state.metrics is not None:
                state.metrics.requests.labels(job.expert, "cancelled").inc()


async def collect(state, request, job, events: asyncio.Queue, chat: bool) -> dict:
    rid = schemas.new_id("chatcmpl" if chat else "cmpl")
    tally = _Tally(state, job)
    while True:
        try:
            kind, payload, at = await asyncio.wait_for(events.get(), 0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                state.scheduler.cancel(job)
                return {"error": "client disconnected"}
            continue
        if kind == "text":
            tally.text(at)
            continue
        if kind == "error":
            tally.done(job.seq, "error")
            return schemas.error_body(f"{job.expert} failed: {payload}", "server_error")
        seq = payload
        reason = FINISH.get(seq.finish_reason, "stop")
        tally.done(seq, reason)
        use = schemas.usage(len(seq.prompt_ids), len(seq.output_ids))
        make = schemas.chat_body if chat else schemas.completion_body
        return make(rid, job.expert, seq.text, reason, use, _logprobs(state, job, chat)(seq.logprobs))
