"""From engine events to HTTP: SSE chunks in OpenAI's format (ending `data: [DONE]`) or one body. A
request is one or more choices (n, or a batch of prompts), each its own scheduler request; their events
arrive on one queue as (choice index, kind, payload, time). A client that goes away cancels all of
them, which frees their KV-cache slots."""
from __future__ import annotations

import asyncio
import json

from coeserve.engine.sampler import TokenLogprob
from coeserve.server import bodies
from coeserve.server import tools as toolkit

FINISH = {"stop": "stop", "length": "length", "abort": "stop"}


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


class _Tally:
    """Metrics for one HTTP request: time to its first token, the gaps between each choice's text
    events, and at the end the request's status and token counts."""

    def __init__(self, state, jobs, n: int):
        self.state, self.jobs, self.n = state, jobs, n  # jobs[i*n + j]: prompt i's choice j
        self.expert, self.first, self.last = jobs[0].expert, True, {}
        self.prompt_tokens = sum(len(job.seq.prompt_ids) for job in jobs[::n])  # each prompt once

    def text(self, index: int, at: float) -> None:
        m = self.state.metrics
        if m is not None:
            if self.first:
                m.ttft.labels(self.expert).observe(at - self.jobs[0].arrival)
            elif index in self.last:
                m.itl.labels(self.jobs[index].expert).observe(at - self.last[index])
        self.first, self.last[index] = False, at

    def done(self, status: str) -> None:
        m = self.state.metrics
        if m is not None:
            m.requests.labels(self.expert, status).inc()
            m.tokens.labels(self.expert, "prompt").inc(self.prompt_tokens)
            m.tokens.labels(self.expert, "completion").inc(self.completion_tokens)
            m.tokens.labels(self.expert, "cached").inc(self.cached_tokens)

    @property
    def completion_tokens(self) -> int:
        return sum(len(job.seq.output_ids) for job in self.jobs)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens found in the KV cache (the prefix cache), per prompt those none of its choices
        computed (its samples copy from one another what one of them computes)."""
        return sum(min(job.seq.cached for job in self.jobs[i:i + self.n]) for i in range(0, len(self.jobs), self.n))

    def usage(self) -> dict:
        return {**bodies.usage(self.prompt_tokens, self.completion_tokens),
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}  # as OpenAI gives it


def _logprobs(state, job, chat: bool):
    """The choice's logprobs formatter, or one that gives None when the request asked for none."""
    if job.seq.params.logprobs is None:
        return lambda items: None
    return bodies.Logprobs(state.codec(job.expert).piece, chat)


def _prompt_items(seq) -> list:
    """An echoed prompt's tokens with their logprobs: none for the first (nothing precedes it)."""
    return [TokenLogprob(seq.prompt_ids[0], None, None), *seq.prompt_logprobs]


async def chunks_of(response):
    """The JSON chunks of one of our SSE streams (a StreamingResponse of `stream`), up to `[DONE]`: what
    the Ollama and Responses translations read (server/ollama.py, server/responses.py)."""
    async for event in response.body_iterator:
        data = event[len("data: "):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _cancel(state, jobs, done: set) -> None:
    for i, job in enumerate(jobs):
        if i not in done:
            state.scheduler.cancel(job)


def _finish(seq, tools, calls) -> str:
    """A choice's finish reason: a call chosen by the model (auto, required) ends in tool_calls."""
    if calls and tools[1] in ("auto", "required"):
        return "tool_calls"
    return FINISH.get(seq.finish_reason, "stop")


async def stream(state, model: str, jobs, n: int, events: asyncio.Queue, chat: bool, include_usage: bool,
                 tools=None, echo=None):
    """`tools`: (tools, mode, parallel) when tool calls are in play: a choice's text is held while it may
    be calls (server/tools.Held) and calls go out as one tool_calls delta at its finish. `echo`: each
    prompt's text, sent (with its logprobs) as a choice's first chunk once its prompt is in."""
    rid = bodies.new_id("chatcmpl" if chat else "cmpl")
    tally, done, failed = _Tally(state, jobs, n), set(), False
    logprobs = [_logprobs(state, job, chat) for job in jobs]
    sent = [0] * len(jobs)  # per choice, the tokens whose logprobs went out
    held = [toolkit.Held(*tools) if tools else None for _ in jobs]
    pending = [[] for _ in jobs]  # per choice, the logprobs of text held back
    echoed = set()  # the choices whose prompt went out
    try:
        if chat:
            for i in range(len(jobs)):
                yield _sse(bodies.chat_chunk(rid, model, {"role": "assistant", "content": ""}, index=i))
        while len(done) < len(jobs):
            i, kind, payload, at = await events.get()
            if echo and kind != "error" and i not in echoed:
                echoed.add(i)
                lp = logprobs[i](_prompt_items(jobs[i].seq))
                yield _sse(bodies.completion_chunk(rid, model, echo[i // n], logprobs=lp, index=i))
            if kind == "text":
                tally.text(i, at)
                text, items = payload
                if held[i] is not None:
                    text, items = held[i].push(text), pending[i] + items
                    pending[i] = [] if text else items
                    if not text:
                        continue
                sent[i] += len(items)
                lp = logprobs[i](items)
                yield _sse(bodies.chat_chunk(rid, model, {"content": text}, logprobs=lp, index=i) if chat else
                           bodies.completion_chunk(rid, model, text, logprobs=lp, index=i))
                continue
            if kind == "error":
                failed = True
                tally.done("error")
                yield _sse(bodies.error_body(f"{jobs[i].expert} failed: {payload}", "server_error"))
                break
            done.add(i)
            seq, calls, rest = payload, None, ""
            if held[i] is not None:
                calls, rest = held[i].end()
            reason = _finish(seq, tools, calls)
            lp = logprobs[i](seq.logprobs[sent[i]:])  # tokens whose text never showed (a stop string's, held)
            delta = {"content": rest} if rest else {}
            if calls:
                delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
            if delta:
                yield _sse(bodies.chat_chunk(rid, model, delta, logprobs=lp, index=i))
                lp = None
            yield _sse(bodies.chat_chunk(rid, model, {}, reason, logprobs=lp, index=i) if chat else
                       bodies.completion_chunk(rid, model, "", reason, logprobs=lp, index=i))
        if not failed:
            tally.done(FINISH.get(jobs[0].seq.finish_reason, "stop"))
            if include_usage:
                yield _sse(bodies.chat_chunk(rid, model, None, use=tally.usage()) if chat else
                           bodies.completion_chunk(rid, model, None, use=tally.usage()))
        yield "data: [DONE]\n\n"
    finally:
        if len(done) < len(jobs):  # the client went away mid-stream, or a choice failed
            _cancel(state, jobs, done)
            if not failed and state.metrics is not None:
                state.metrics.requests.labels(jobs[0].expert, "cancelled").inc()


async def collect(state, request, model: str, jobs, n: int, events: asyncio.Queue, chat: bool, tools=None,
                  echo=None) -> dict:
    rid = bodies.new_id("chatcmpl" if chat else "cmpl")
    tally, done = _Tally(state, jobs, n), set()
    while len(done) < len(jobs):
        try:
            i, kind, payload, at = await asyncio.wait_for(events.get(), 0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                _cancel(state, jobs, done)
                return {"error": "client disconnected"}
            continue
        if kind == "text":
            tally.text(i, at)
        elif kind == "error":
            tally.done("error")
            _cancel(state, jobs, done | {i})
            return bodies.error_body(f"{jobs[i].expert} failed: {payload}", "server_error")
        else:
            done.add(i)
    choices = []
    for i, job in enumerate(jobs):
        seq = job.seq
        lp = _logprobs(state, job, chat)((_prompt_items(seq) if echo else []) + seq.logprobs)
        if not chat:
            text = echo[i // n] + seq.text if echo else seq.text
            choices.append(bodies.completion_choice(i, text, FINISH.get(seq.finish_reason, "stop"), lp))
            continue
        calls = toolkit.calls(seq.text, *tools) if tools else None
        choices.append(bodies.chat_choice(i, seq.text, _finish(seq, tools, calls), lp, calls))
    tally.done(FINISH.get(jobs[0].seq.finish_reason, "stop"))
    return (bodies.chat_body if chat else bodies.completion_body)(rid, model, choices, tally.usage())
