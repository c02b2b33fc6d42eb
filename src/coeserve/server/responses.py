"""OpenAI's Responses API, `POST /v1/responses`, for clients written against it (the openai SDK's
`client.responses.create`). A request is translated into a chat completion request and run by the
chat handler (routing with `model: "coe"`, tools, structured output, the scheduler), and its answer
back into a response: one body, or the Responses stream of typed events (`response.created` …
`response.output_text.delta` … `response.completed`).

Taken: `input` as text or a list of messages (text parts) and of earlier `function_call` and
`function_call_output` items, `instructions`, `max_output_tokens`, `temperature`, `top_p`, `tools`
(functions) with `tool_choice` and `parallel_tool_calls`, `text.format` (`json_object`, `json_schema`),
`stream`, `metadata`, and the chat endpoint's sampling extensions (`seed`, `top_k`, `min_p`, …).
Nothing is stored: `previous_response_id` and `store: true` retrieval are not served."""
from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coeserve.server.app import invalid
from coeserve.server.ollama import read_body
from coeserve.server.schemas import ChatRequest
from coeserve.server.state import ApiError
from coeserve.server.stream import chunks_of

PASSED = ("temperature", "top_p", "seed", "top_k", "min_p", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "stop", "logit_bias", "ignore_eos", "min_tokens", "user")  # as the chat endpoint takes them


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # the chat endpoint's sampling extensions ride along (PASSED)

    model: str = Field(min_length=1)
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True
    text: dict | None = None
    metadata: dict | None = None
    previous_response_id: str | None = None


def _text(content, where: str) -> str:
    """A message's content: text, or its text parts (input_text, output_text, text)."""
    if isinstance(content, str):
        return content
    parts = []
    for p in content or []:
        if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text"):
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise ApiError(400, f"{where}: only text parts are taken, not {kind!r}", param="input")
        parts.append(p.get("text", ""))
    return "".join(parts)


def _messages(body: ResponsesRequest) -> list[dict]:
    """The chat messages of a request's instructions and input items."""
    msgs = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return msgs + [{"role": "user", "content": body.input}]
    for i, item in enumerate(body.input):
        kind = item.get("type", "message")
        if kind == "message":
            msgs.append({"role": item.get("role", "user"), "content": _text(item.get("content"), f"input[{i}]")})
        elif kind == "function_call":  # a call the model made earlier: an assistant turn
            call = {"id": item.get("call_id", ""), "type": "function",
                    "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "{}")}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls"):
                msgs[-1]["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id", ""), "content": str(item.get("output", ""))})
        else:
            raise ApiError(400, f"input[{i}]: items of type {kind!r} are not taken", param="input")
    return msgs


def _chat_fields(body: ResponsesRequest) -> dict:
    if body.previous_response_id is not None:
        raise ApiError(400, "responses are not stored: send the conversation in input", param="previous_response_id")
    fields = {"model": body.model, "messages": _messages(body), "stream": body.stream,
              "parallel_tool_calls": body.parallel_tool_calls, "max_tokens": body.max_output_tokens}
    fields["stream_options"] = {"include_usage": True} if body.stream else None
    fields.update({k: v for k, v in (body.model_extra or {}).items() if k in PASSED})
    if body.tools:
        fields["tools"] = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                             if k in t}}
                           for t in body.tools if t.get("type") == "function"]
        if len(fields["tools"]) < len(body.tools):
            raise ApiError(400, "only function tools are served", param="tools")
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name", "")}}
    fields["tool_choice"] = choice
    fmt = (body.text or {}).get("format") or {"type": "text"}
    if fmt.get("type") == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif fmt.get("type") == "json_schema":
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name", "format"), "schema": fmt.get("schema", {}), "strict": fmt.get("strict")}}
    return fields


class _Answer:
    """The response being built: its id, output items and the request's settings it reports."""

    def __init__(self, body: ResponsesRequest, model: str):
        self.id, self.created = f"resp_{uuid.uuid4().hex[:24]}", int(time.time())
        self.body, self.model = body, model
        self.msg_id = f"msg_{uuid.uuid4().hex[:24]}"

    def message(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}

    @staticmethod
    def call(c: dict) -> dict:
        return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": c["id"],
                "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": "completed"}

    def body_of(self, output: list[dict], usage: dict | None, finish: str | None) -> dict:
        b = self.body
        done = finish is not None
        out = {"id": self.id, "object": "response", "created_at": self.created, "model": self.model,
               "status": ("incomplete" if finish == "length" else "completed") if done else "in_progress",
               "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
               "error": None, "output": output, "instructions": b.instructions,
               "max_output_tokens": b.max_output_tokens, "parallel_tool_calls": b.parallel_tool_calls,
               "temperature": (b.model_extra or {}).get("temperature", 1.0),
               "top_p": (b.model_extra or {}).get("top_p", 1.0), "tool_choice": b.tool_choice or "auto",
               "tools": b.tools or [], "text": b.text or {"format": {"type": "text"}}, "metadata": b.metadata or {},
               "usage": None}
        if usage is not None:
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            out["usage"] = {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
                            "output_tokens": usage["completion_tokens"],
                            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": usage["total_tokens"]}
        return out


def _one(response: JSONResponse, answer: _Answer) -> JSONResponse:
    body = json.loads(response.body)
    if "error" in body:
        return response
    choice = body["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    output = [answer.call(c) for c in calls] or [answer.message(choice["message"]["content"] or "")]
    headers = {k: v for k, v in response.headers.items() if k.startswith("x-coe-")}
    return JSONResponse(answer.body_of(output, body["usage"], choice["finish_reason"]), headers=headers)


def _streamed(response: StreamingResponse, answer: _Answer) -> StreamingResponse:
    """The chat stream's chunks as the Responses stream's events."""
    seq = iter(range(1 << 62))

    def event(kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(seq), **fields})}\n\n"

    async def events():
        try:
            async for e in _events():
                yield e
        finally:  # the client went away (or the stream ended): the chat stream's cleanup cancels its jobs
            await response.body_iterator.aclose()

    def opening() -> list[str]:
        part = {"type": "output_text", "text": "", "annotations": []}
        return [event("response.output_item.added", output_index=0, item=answer.message("", "in_progress")),
                event("response.content_part.added", part=part, item_id=answer.msg_id, output_index=0,
                      content_index=0)]

    async def _events():
        yield event("response.created", response=answer.body_of([], None, None))
        yield event("response.in_progress", response=answer.body_of([], None, None))
        text, calls, finish, opened = "", [], "stop", False
        where = {"item_id": answer.msg_id, "output_index": 0, "content_index": 0}
        async for c in chunks_of(response):
            if "error" in c:
                yield event("error", code=c["error"].get("code"), message=c["error"]["message"], param=None)
                return
            if not c["choices"]:  # the usage chunk: the last
                output = [answer.call(x) for x in calls] or [answer.message(text)]
                if not calls:
                    if not opened:  # an empty answer
                        for e in opening():
                            yield e
                    yield event("response.output_text.done", text=text, logprobs=[], **where)
                    part = {"type": "output_text", "text": text, "annotations": []}
                    yield event("response.content_part.done", part=part, **where)
                    yield event("response.output_item.done", output_index=0, item=output[0])
                else:
                    for k, item in enumerate(output):
                        yield event("response.output_item.added", output_index=k, item={**item, "arguments": ""})
                        yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=k,
                                    delta=item["arguments"])
                        yield event("response.function_call_arguments.done", item_id=item["id"], output_index=k,
                                    arguments=item["arguments"])
                        yield event("response.output_item.done", output_index=k, item=item)
                yield event("response.completed", response=answer.body_of(output, c["usage"], finish))
                continue
            choice = c["choices"][0]
            finish = choice.get("finish_reason") or finish
            delta = choice.get("delta", {})
            calls += [{"id": x["id"], "function": x["function"]} for x in delta.get("tool_calls") or []]
            if delta.get("content"):
                if not opened:
                    opened = True
                    for e in opening():
                        yield e
                text += delta["content"]
                yield event("response.output_text.delta", delta=delta["content"], logprobs=[], **where)
    headers = {k: v for k, v in response.headers.items() if k.startswith("x-coe-")}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def add_routes(app, chat) -> None:
    """`chat`: the chat completions handler (app.py) the translated requests go to."""

    @app.post("/v1/responses")
    async def responses(request: Request):
        body = await read_body(ResponsesRequest, request)
        try:
            chat_body = ChatRequest.model_validate(_chat_fields(body))
        except ValidationError as e:
            raise invalid([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
        response = await chat(chat_body, request)
        experts = response.headers.get("x-coe-expert", body.model)
        answer = _Answer(body, experts if "," not in experts else body.model)
        if isinstance(response, StreamingResponse):
            return _streamed(response, answer)
        return _one(response, answer)
