"""Ollama's API on the same server, for the tools written against it: `POST /api/chat` and `/api/generate`
(NDJSON streams unless `"stream": false`), `GET /api/tags`, `POST /api/show`, `GET /api/ps` and
`GET /api/version`.

A request is translated into the OpenAI one and run by the same handler (routing with `model: "coe"`,
tools, structured output, the scheduler), and the answer, chunk by chunk, back into Ollama's shape:
`options` become the sampling fields (Ollama's defaults where unset: temperature 0.8, top_k 40, top_p
0.9; `num_predict`, `repeat_penalty` as the OpenAI server's `max_tokens` and `repetition_penalty`, an
unset or negative `num_predict` meaning, as in Ollama, until the end of sequence or the context is full),
`format: "json"` or a JSON schema becomes structured output, `/api/generate` puts its prompt (and
`system`) through the chat template unless `raw`. Errors are `{"error": message}` with the HTTP status."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from coeserve import __version__
from coeserve.server.app import VIRTUAL, expert_named, invalid
from coeserve.server.schemas import ChatRequest, CompletionRequest
from coeserve.server.state import ApiError
from coeserve.server.stream import chunks_of
from coeserve.server.tools import Tool

DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}  # Ollama's, where a request leaves them out


class Options(BaseModel):
    model_config = ConfigDict(extra="ignore")  # num_ctx, num_thread, mirostat…: the server's own settings

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = None  # unset or <= 0: until the end of sequence or the context
    stop: list[str] | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class OllamaCall(BaseModel):
    function: dict  # {"name", "arguments": {...}}


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | None = ""
    tool_calls: list[OllamaCall] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # keep_alive, think, images…

    model: str = Field(min_length=1)
    stream: bool = True
    format: str | dict | None = None
    options: Options | None = None


class OllamaChat(_Common):
    messages: list[OllamaMessage] = Field(default_factory=list)  # none: load the model (done_reason "load")
    tools: list[Tool] | None = None


class Show(BaseModel):
    model: str = Field(default="", validation_alias=AliasChoices("model", "name"))


class OllamaGenerate(_Common):
    prompt: str = ""  # empty: load the model (done_reason "load")
    system: str | None = None
    raw: bool = False


def _fields(body: _Common, context: int) -> dict:
    """The OpenAI request fields that /api/chat and /api/generate share: model, stream, sampling, format.
    `context`: the most tokens the model can generate, for Ollama's unbounded num_predict."""
    return {"model": body.model, "stream": body.stream,
            "stream_options": {"include_usage": True} if body.stream else None, **_sampling(body, context)}


def _sampling(body: _Common, context: int) -> dict:
    """The OpenAI request fields of Ollama's options and format."""
    o = body.options or Options()
    out = {k: v for k, v in DEFAULTS.items() if getattr(o, k) is None}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"),
                         ("seed", "seed"), ("stop", "stop"), ("repetition_penalty", "repeat_penalty"),
                         ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty")):
        if getattr(o, theirs) is not None:
            out[ours] = getattr(o, theirs)
    # Ollama's num_predict: unset or -1 (its default) generates until the end of sequence or the context
    # is full, and so does -2 (fill the context); our engine stops at the context in any case.
    out["max_tokens"] = o.num_predict if o.num_predict is not None and o.num_predict > 0 else context
    if body.format == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(body.format, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": body.format}}
    elif body.format not in (None, ""):
        raise ApiError(400, f"format is \"json\" or a JSON schema, not {body.format!r}")
    return out


def _message(m: OllamaMessage) -> dict:
    out = {"role": m.role, "content": m.content or ""}
    if m.tool_calls:
        out["tool_calls"] = [{"id": f"call_{k}", "type": "function", "function": {
            "name": c.function.get("name", ""), "arguments": json.dumps(c.function.get("arguments", {}))}}
            for k, c in enumerate(m.tool_calls)]
        out["content"] = m.content or None
    return out


def _openai(cls, fields: dict):
    try:
        return cls.model_validate(fields)
    except ValidationError as e:
        raise invalid([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


async def read_body(cls, request: Request):
    """The request's JSON body as `cls`, whatever its Content-Type (Ollama's own examples are `curl -d`,
    which says form-encoded)."""
    try:
        return cls.model_validate_json(await request.body() or b"{}")
    except ValidationError as e:
        raise invalid([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _Clock:
    """Ollama's durations (nanoseconds) from the request's start, its first token and its end (a body not
    streamed has no first token to see: its eval_duration counts from the start)."""

    def __init__(self):
        self.start, self.first = time.perf_counter_ns(), None

    def token(self) -> None:
        self.first = self.first or time.perf_counter_ns()

    def totals(self, usage: dict) -> dict:
        end = time.perf_counter_ns()
        first = self.first or self.start
        return {"total_duration": end - self.start, "load_duration": 0,
                "prompt_eval_count": usage.get("prompt_tokens", 0), "prompt_eval_duration": first - self.start,
                "eval_count": usage.get("completion_tokens", 0), "eval_duration": end - first}


def _calls(calls: list[dict]) -> list[dict]:
    return [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}}
            for c in calls]


async def _answer(response, model: str, was_chat: bool, chat: bool, clock: _Clock):
    """The OpenAI handler's response (of the chat handler if `was_chat`, else completions) in Ollama's
    shape (/api/chat's if `chat`, else /api/generate's): one JSON body, or an NDJSON stream of it."""
    key = "message" if chat else "response"
    piece = (lambda text: {"role": "assistant", "content": text}) if chat else (lambda text: text)
    headers = {k: v for k, v in response.headers.items() if k.startswith("x-coe-")}
    if not isinstance(response, StreamingResponse):
        body = json.loads(response.body)
        if "error" in body:  # an OpenAI error body, or collect's note of a client that went away
            err = body["error"]
            return JSONResponse({"error": err["message"] if isinstance(err, dict) else str(err)},
                                status_code=response.status_code)
        choice = body["choices"][0]
        text = (choice["message"]["content"] or "") if was_chat else choice["text"]
        out = {"model": model, "created_at": _now(), key: piece(text)}
        if chat and choice["message"].get("tool_calls"):
            out[key]["tool_calls"] = _calls(choice["message"]["tool_calls"])
        done = {"done": True, "done_reason": "length" if choice["finish_reason"] == "length" else "stop"}
        return JSONResponse({**out, **done, **clock.totals(body["usage"])}, headers=headers)

    async def lines():
        try:
            async for line in _lines():
                yield line
        finally:  # the client went away (or the stream ended): the OpenAI stream's own cleanup cancels its jobs
            await response.body_iterator.aclose()

    async def _lines():
        reason = "stop"
        async for chunk in chunks_of(response):
            if "error" in chunk:
                yield json.dumps({"error": chunk["error"]["message"]}) + "\n"
                return
            if not chunk["choices"]:  # the usage chunk: the last
                end = {"model": model, "created_at": _now(), key: piece(""), "done": True, "done_reason": reason}
                yield json.dumps({**end, **clock.totals(chunk["usage"])}) + "\n"
                continue
            c = chunk["choices"][0]
            if c.get("finish_reason"):
                reason = "length" if c["finish_reason"] == "length" else "stop"
            delta = c.get("delta", {}) if was_chat else {"content": c.get("text", "")}
            if delta.get("tool_calls"):  # as Ollama: on a line of their own, before the done line
                clock.token()
                calls = _calls(delta["tool_calls"])
                yield json.dumps({"model": model, "created_at": _now(), key: {**piece(""), "tool_calls": calls},
                                  "done": False}) + "\n"
            if delta.get("content"):
                clock.token()
                yield json.dumps({"model": model, "created_at": _now(), key: piece(delta["content"]),
                                  "done": False}) + "\n"
    return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)


def add_routes(app, state, chat, completions) -> None:
    """`chat`, `completions`: the OpenAI handlers (app.py) the translated requests go to."""

    def loaded(model: str, chat: bool) -> JSONResponse:
        """Ollama's answer to a request with nothing to generate: it loads the model. Here every expert is
        served as it is; a known name is answered at once."""
        if model != VIRTUAL:
            expert_named(state, model)
        key, empty = ("message", {"role": "assistant", "content": ""}) if chat else ("response", "")
        return JSONResponse({"model": model, "created_at": _now(), key: empty, "done": True, "done_reason": "load"})

    def context(model: str) -> int:
        """A model's context: the named expert's, or for the router, the largest of them."""
        if model == VIRTUAL:
            return max(state.context(n) for n in state.experts)
        return state.context(expert_named(state, model))

    @app.get("/")
    async def running():
        return PlainTextResponse("coeserve is running")  # Ollama's client checks / answers before anything

    @app.head("/")
    async def running_head():
        return PlainTextResponse("")

    @app.post("/api/chat")
    async def api_chat(request: Request):
        body = await read_body(OllamaChat, request)
        if not body.messages:
            return loaded(body.model, True)
        clock = _Clock()
        fields = {**_fields(body, context(body.model)), "messages": [_message(m) for m in body.messages]}
        if body.tools:
            fields["tools"] = [t.model_dump(exclude_none=True) for t in body.tools]
        response = await chat(_openai(ChatRequest, fields), request)
        return await _answer(response, body.model, True, True, clock)

    @app.post("/api/generate")
    async def api_generate(request: Request):
        body = await read_body(OllamaGenerate, request)
        if not body.prompt:
            return loaded(body.model, False)
        clock, fields = _Clock(), _fields(body, context(body.model))
        if body.raw:
            response = await completions(_openai(CompletionRequest, {**fields, "prompt": body.prompt}), request)
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                [{"role": "user", "content": body.prompt}]
            response = await chat(_openai(ChatRequest, {**fields, "messages": messages}), request)
        return await _answer(response, body.model, not body.raw, False, clock)

    def card(name: str) -> dict:
        if name == VIRTUAL:
            return {"name": VIRTUAL, "model": VIRTUAL, "modified_at": _now(), "size": 0, "digest": "",
                    "details": {"format": "coe", "family": "router", "families": ["router"],
                                "parameter_size": "", "quantization_level": ""}}
        info = state.disk.info(name)
        return {"name": name, "model": name, "modified_at": _now(), "size": info.bytes, "digest": "",
                "details": {"format": "coe-image", "family": info.arch, "families": [info.arch],
                            "parameter_size": f"{info.params / 1e6:.1f}M", "quantization_level": info.dtype.upper()}}

    @app.get("/api/tags")
    async def api_tags():
        return {"models": [card(n) for n in [VIRTUAL, *state.experts]]}

    @app.post("/api/show")
    async def api_show(request: Request):
        body = await read_body(Show, request)
        name = body.model if body.model == VIRTUAL else expert_named(state, body.model)
        out = card(name)
        family = out["details"]["family"]
        out["model_info"] = {"general.architecture": family}
        if name != VIRTUAL:
            out["model_info"][f"{family}.context_length"] = state.context(name)
        out["capabilities"] = ["completion", "tools"]
        return out

    @app.get("/api/ps")
    async def api_ps():
        """Ollama's running models: the experts in device memory now (at a cluster's ingress, which holds
        no tiers and does not know the nodes' devices, those served on some replica, size_vram 0). They
        stay until the store evicts them: no expiry time."""
        if state.store is not None:
            names, vram = state.store.resident("device"), state.store.device.type == "cuda"
        else:
            names, vram = list(getattr(state.scheduler, "placement", {})), False
        models = []
        for name in names:
            c = card(name)
            models.append({**c, "expires_at": "0001-01-01T00:00:00Z", "size_vram": c["size"] if vram else 0,
                           "context_length": state.context(name)})
        return {"models": models}

    @app.get("/api/version")
    async def api_version():
        return {"version": __version__}
