"""The OpenAI-compatible HTTP API (FastAPI). A request is validated, routed (`model: "coe"`) or sent to
the named expert, tokenized with that expert's template, and queued on the scheduler; tokens come back
from the engine thread through an asyncio queue, as SSE chunks or one JSON body. Every error is an
OpenAI-style body; one request's failure never touches the others."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from coeserve.engine import grammar
from coeserve.engine.sequence import SamplingParams, Sequence
from coeserve.scheduler import QueueFull
from coeserve.scheduler import Request as Job
from coeserve.server import tools as toolkit
from coeserve.server.bodies import error_body
from coeserve.server.schemas import ChatRequest, CompletionRequest
from coeserve.server.state import ApiError, ServerState

VIRTUAL = "coe"


def _guarded(path: str) -> bool:
    """Paths behind the API key, the readiness gate and the body limit."""
    return path.startswith(("/v1/", "/api/")) or path in ("/tokenize", "/detokenize")


class BodyLimit:
    """ASGI middleware: an API body sent without Content-Length (chunked) is read here first, and one
    over `max_body` bytes gets 413 before the app sees any of it (a declared length is checked in the
    gate below without reading)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers") or ())
        if scope["type"] != "http" or not _guarded(scope["path"]) or b"content-length" in headers:
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            chunks.append(msg.get("body", b""))
            size, more = size + len(chunks[-1]), msg.get("more_body", False)
            if size > self.state.max_body:
                err = ApiError(413, f"request body over {self.state.max_body} bytes", code="request_too_large")
                return await _error(err, scope["path"])(scope, receive, send)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()
        await self.app(scope, replayed, send)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="coeserve", docs_url=None, redoc_url=None)
    app.state.coe = state
    app.add_middleware(BodyLimit, state=state)

    @app.middleware("http")
    async def gate(request: Request, call_next):
        path = request.url.path
        if _guarded(path):
            if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
                return _error(ApiError(401, "missing or wrong API key (Authorization: Bearer …)",
                                       "authentication_error", "invalid_api_key"), path)
            if not state.ready or state.draining:
                why = "shutting down" if state.draining else "starting"
                return _error(ApiError(503, f"the server is {why}; retry shortly", "service_unavailable"), path)
            size = request.headers.get("content-length")
            if size and size.isdigit() and int(size) > state.max_body:
                return _error(ApiError(413, f"request body over {state.max_body} bytes", code="request_too_large"),
                              path)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(e, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return _error(invalid(e.errors()), request.url.path)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"), request.url.path)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(ApiError(e.status_code, str(e.detail), kind), request.url.path)

    @app.get("/health")
    async def health():
        ok = state.ready and not state.draining
        return JSONResponse({"status": "ok" if ok else ("draining" if state.draining else "starting")},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card(name: str, now: int) -> dict:
        card = {"id": name, "object": "model", "created": now, "owned_by": "coeserve"}
        if name != VIRTUAL:
            card["max_model_len"] = state.context(name)  # as vLLM gives it
            if hasattr(state.scheduler, "placement"):  # cluster: the replicas the expert was served on
                card["coe_replicas"] = sorted(state.scheduler.placement.get(name, ()))
        return card

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [model_card(n, now) for n in [VIRTUAL, *state.experts]]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        return model_card(name if name == VIRTUAL else expert_named(state, name), int(time.time()))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        msgs = [m.plain() for m in body.messages]
        users = [m["content"] for m in msgs if m["role"] == "user"]
        [(expert, route)] = await _resolve(state, body.model, [users[-1] if users else msgs[-1]["content"]])
        codec = await run_in_threadpool(state.codec, expert)
        how = body.tool_mode()
        msgs, specs = toolkit.prompt(msgs, body.tools if how else [], codec.takes_tools)
        try:  # a template over a long chat takes a while: not on the event loop, which streams to everyone
            ids, stop = await run_in_threadpool(codec.chat_prompt, msgs, tools=specs)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        tools = (body.tools, how, body.parallel_tool_calls) if how else None
        return await _run(state, request, body, [Prompt(expert, route, ids)], stop, chat=True, tools=tools)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.model == VIRTUAL and not all(isinstance(p, str) for p in body.prompt):
            raise ApiError(400, "a prompt of token ids needs a named expert (the ids are its tokenizer's), "
                           "not the router", param="prompt")
        prompts, echo = [], []
        for text, (expert, route) in zip(body.prompt, await _resolve(state, body.model, body.prompt)):
            if isinstance(text, str):
                codec = await run_in_threadpool(state.codec, expert)
                ids = await run_in_threadpool(codec.encode, text)
            else:  # token ids: a named expert's (checked above), its vocabulary read once
                ids, vocab = text, state.vocab(expert)
                if max(ids) >= vocab:
                    raise ApiError(400, f"token id {max(ids)} is not in {expert}'s vocabulary of {vocab}",
                                   param="prompt")
                if body.echo:
                    codec = await run_in_threadpool(state.codec, expert)
                    text = await run_in_threadpool(codec.decode, ids)
            prompts.append(Prompt(expert, route, ids))
            echo.append(text)
        return await _run(state, request, body, prompts, (), chat=False, echo=echo if body.echo else None)

    from coeserve.server import embeddings, ollama, responses, tokens
    tokens.add_routes(app, state)
    embeddings.add_routes(app, state)
    responses.add_routes(app, chat)
    ollama.add_routes(app, state, chat, completions)
    return app


def invalid(errors: list) -> ApiError:
    """A 400 for a body that does not validate, naming the first field at fault."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:])
    return ApiError(400, f"{where}: {first.get('msg', 'invalid request')}" if where else
                    first.get("msg", "invalid request"), param=where or None)


def _error(e: ApiError, path: str = "") -> JSONResponse:
    if path.startswith("/api/"):  # Ollama's API (server/ollama.py) answers errors as {"error": message}
        return JSONResponse({"error": str(e)}, status_code=e.status)
    return JSONResponse(error_body(str(e), e.kind, e.code, e.param), status_code=e.status)


@dataclass
class Prompt:
    """One prompt of a request, routed: its expert, (category, probability) and token ids."""
    expert: str
    route: tuple[str, float]
    ids: list[int]


def expert_named(state: ServerState, model: str) -> str:
    if model not in state.experts:
        raise ApiError(404, f"the model {model!r} does not exist (GET /v1/models lists them)",
                       "not_found_error", "model_not_found", "model")
    return model


async def _resolve(state: ServerState, model: str, texts: list) -> list[tuple[str, tuple[str, float]]]:
    """Each prompt's expert and (category, probability): the named expert, or the router's choice."""
    if model != VIRTUAL:
        return [(expert_named(state, model), ("none", 1.0))] * len(texts)
    t = time.perf_counter()
    routes = await run_in_threadpool(state.router.route, texts)
    if state.metrics:
        state.metrics.router.observe(time.perf_counter() - t)
    return [(r.expert if r.expert in state.experts else state.fallback, (r.category, r.prob)) for r in routes]


async def _run(state, request, body, prompts: list[Prompt], stop, chat: bool, tools=None, echo=None):
    """Queue n sequences per prompt (choice i*n + j is prompt i's j-th; with a seed, its seed is seed + j)
    and answer with all of them, streamed or as one body. `tools`: (tools, mode, parallel) when tool calls
    are in play (server/tools.py). `echo`: each prompt's text, to go before its answers (completions)."""
    named = body.token_ids()
    for p in prompts:
        top, vocab = max(named, default=-1), state.vocab(p.expert)
        if top >= vocab:
            where = "logit_bias" if top in map(int, body.logit_bias or ()) else "stop_token_ids"
            raise ApiError(400, f"token id {top} is not in {p.expert}'s vocabulary of {vocab}", param=where)
        if len(p.ids) >= state.context(p.expert):
            raise ApiError(400, f"the prompt has {len(p.ids)} tokens; {p.expert}'s context holds "
                           f"{state.context(p.expert)} (prompt plus at least one generated token)",
                           code="context_length_exceeded")
    try:
        params = [SamplingParams(max_tokens=body.limit(state.default_max_tokens),
                                 stop=tuple(body.stop or ()) + tuple(stop), logprobs=body.wanted_logprobs(),
                                 prompt_logprobs=body.wanted_logprobs() if echo else None,
                                 **body.sampling(j)) for j in range(body.n)]
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    if params[0].grammar is not None:  # compiled here, off the engine loop, once per tokenizer (then cached)
        for expert in dict.fromkeys(p.expert for p in prompts):
            codec = await run_in_threadpool(state.codec, expert)
            try:
                await run_in_threadpool(grammar.compiled, codec, *params[0].grammar, state.vocab(expert))
            except grammar.GrammarError as e:
                forced = isinstance(body, ChatRequest) and body.tool_mode() not in (None, "auto")
                where = "tools" if forced else "structured_outputs" if body.structured_outputs else "response_format"
                raise ApiError(400, str(e), param=where) from None
    events, post = asyncio.Queue(), state.post_box()
    jobs = [_job(p.expert, p.ids, params[j], i * body.n + j, events, post, not body.stream)
            for i, p in enumerate(prompts) for j in range(body.n)]
    for k, job in enumerate(jobs):
        try:
            state.scheduler.submit(job)
        except QueueFull as e:
            for queued in jobs[:k]:
                state.scheduler.cancel(queued)
            raise ApiError(429, str(e), "rate_limit_error", "queue_full") from None
    experts = list(dict.fromkeys(p.expert for p in prompts))
    model = experts[0] if len(experts) == 1 else VIRTUAL
    headers = {"x-coe-expert": ",".join(p.expert for p in prompts),
               "x-coe-category": ",".join(p.route[0] for p in prompts),
               "x-coe-confidence": ",".join(f"{p.route[1]:.4f}" for p in prompts)}
    from coeserve.server.stream import collect, stream
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream(state, model, jobs, body.n, events, chat, include, tools, echo),
                                 media_type="text/event-stream", headers=headers)
    out = await collect(state, request, model, jobs, body.n, events, chat, tools, echo)
    return JSONResponse(out, headers=headers, status_code=200 if "error" not in out else 500)


def _job(expert: str, ids: list[int], params: SamplingParams, index: int, events: asyncio.Queue, post,
         buffered: bool) -> Job:
    """A scheduler request for one choice; its events reach `events` as (index, kind, payload, time)."""
    def on_event(kind, payload):
        post(events, (index, kind, payload, time.monotonic()))
    seq = Sequence(list(ids), params)
    seq.on_text = lambda text: on_event("text", (text, seq.take_logprobs()))
    return Job(expert, seq, on_event, buffered=buffered)
