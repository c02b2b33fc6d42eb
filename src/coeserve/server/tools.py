"""Tool calling on /v1/chat/completions, as vLLM gives it without a model-specific parser, plus a light
one for `auto`:

- the tools reach the model through its chat template when the template takes `tools`; otherwise as a
  system message that lists them and says how to call one (a JSON list of {"name", "arguments"});
- `tool_choice: "required"` holds the output to that JSON list (at least one call; one with
  `parallel_tool_calls: false`) and a named function holds it to that function's arguments, both by
  structured output (engine/grammar.py), so the calls always parse and match the tools' parameters;
- `auto` (the default when tools are given) lets the model choose: an answer that is such a JSON list
  or object, bare, in a ```json fence or in <tool_call> tags, and names only given tools, becomes tool
  calls (the first alone with `parallel_tool_calls: false`); any other answer is content. While the
  start of a streamed answer may still become a call it is held back, then sent as content the moment
  it cannot;
- `none` leaves the tools out of the prompt.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Literal

from pydantic import BaseModel, Field


class Function(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: Function


class NamedFunction(BaseModel):
    name: str


class NamedChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class CallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: CallFunction


ToolChoice = Literal["none", "auto", "required"] | NamedChoice


Mode = str | tuple[str, str] | None  # None (no tools in play), "auto", "required" or ("function", name)


def mode(tools: list[Tool] | None, choice: ToolChoice | None) -> Mode:
    """How tools are in play (Mode); checks the pair."""
    if not tools:
        if choice not in (None, "none"):
            raise ValueError("tool_choice needs tools")
        return None
    if choice is None or choice == "auto":
        return "auto"
    if choice == "none":
        return None
    if choice == "required":
        return "required"
    if choice.function.name not in {t.function.name for t in tools}:
        raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
    return ("function", choice.function.name)


def grammar(tools: list[Tool], how: Mode, parallel: bool) -> tuple[str, str] | None:
    """The structured output that forces the calls (`required`, a named function), else None."""
    if how in (None, "auto"):
        return None
    if how != "required":
        [tool] = [t for t in tools if t.function.name == how[1]]
        return ("json_schema", json.dumps(tool.function.parameters))
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                               "arguments": t.function.parameters},
              "required": ["name", "arguments"]} for t in tools]
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    return ("json_schema", json.dumps(schema))


def prompt(messages: list[dict], tools: list[Tool], template_takes_tools: bool) -> tuple[list[dict], list | None]:
    """The messages (and the `tools` argument) for the chat template. A template that does not take
    tools gets them in a system message, earlier calls as their JSON text and results as user turns."""
    specs = [t.model_dump(exclude_none=True) for t in tools]
    if template_takes_tools:
        return messages, specs or None
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
            m = {"role": "assistant", "content": json.dumps(calls)}
        elif m["role"] == "tool":
            m = {"role": "user", "content": f"Result of the call {m.get('tool_call_id', '')}: {m['content']}"}
        out.append({"role": m["role"], "content": m["content"]})
    if specs:
        text = ("You can call these functions:\n" + json.dumps([s["function"] for s in specs]) +
                '\nTo call them, answer with only a JSON list of calls: [{"name": "...", "arguments": {...}}].')
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


_FENCE = re.compile(r"^```json\s*(.*?)\s*```$", re.S)
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_OPENINGS = ("{", "[", "```json", "<tool_call>")


def calls(text: str, tools: list[Tool], how: Mode, parallel: bool = True) -> list[dict] | None:
    """The tool calls in an answer, in OpenAI's shape, or None if it holds none (then it is content)."""
    names = {t.function.name for t in tools}
    if isinstance(how, tuple):  # a named function: the answer is its arguments
        return [_call(how[1], text)] if _parse(text) else None
    body = text.strip()
    tagged = _TAGGED.findall(body)
    if tagged and not _TAGGED.sub("", body).strip():
        items = []
        for t in tagged:
            items += _parse(t)
    else:
        fence = _FENCE.match(body)
        items = _parse(fence.group(1) if fence else body)
    found = []
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if not isinstance(args, dict):
            return None
        found.append(_call(name, json.dumps(args)))
    return (found if parallel else found[:1]) or None


def _parse(text: str) -> list:
    """The JSON value of `text` as a list of items ([] when it is not JSON, however deep or odd)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return []
    return value if isinstance(value, list) else [value]


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class Held:
    """A streamed choice's text while it may still be tool calls: `push` gives the text to send now as
    content (none while held), `end` the calls, or the content still held, at the finish."""

    def __init__(self, tools: list[Tool], how: Mode, parallel: bool = True):
        self.tools, self.how, self.parallel, self.text, self.free = tools, how, parallel, "", False

    def push(self, text: str) -> str:
        if self.free:
            return text
        self.text += text
        start = self.text.lstrip()
        if self.how != "auto" or not start or any(start.startswith(o) or o.startswith(start) for o in _OPENINGS):
            return ""
        self.free = True  # cannot become a call: out it goes, and everything after it
        return self.text

    def end(self) -> tuple[list[dict] | None, str]:
        if self.free:
            return None, ""
        found = calls(self.text, self.tools, self.how, self.parallel)
        return found, "" if found else self.text
