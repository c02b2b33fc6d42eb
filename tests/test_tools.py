"""Tool calling's pieces that need no model (server/tools.py): what counts as calls in an answer, what a
stream holds back, the prompt for a template without tools, and the forcing schema."""
from __future__ import annotations

import json

import pytest

from coeserve.server.tools import Held, NamedChoice, Tool, calls, grammar, mode, prompt

WEATHER = Tool.model_validate({"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
TIME = Tool.model_validate({"type": "function", "function": {"name": "get_time"}})
TOOLS = [WEATHER, TIME]


def named(name: str) -> NamedChoice:
    return NamedChoice.model_validate({"type": "function", "function": {"name": name}})


@pytest.mark.parametrize("text, names", [
    ('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', ["get_weather"]),
    ('  {"name": "get_time", "arguments": {}} ', ["get_time"]),
    ('```json\n[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]\n```',
     ["get_time", "get_weather"]),
    ('<tool_call>{"name": "get_weather", "parameters": {"city": "Rome"}}</tool_call>', ["get_weather"]),
    ('{"name": "send_mail", "arguments": {}}', None),  # not a given tool
    ('{"city": "Paris"}', None),
    ('The weather is fine. {"name": "get_time", "arguments": {}}', None),
    ('[]', None),
    ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call> and more words', None),
    ('```\n{"name": "get_time", "arguments": {}}\n```', None),  # a fence that does not say json: content
    ('{"name": ["get_time"]}', None), ('[{"name": {}}]', None), ("[" * 5000, None), ("[" * 5000 + "]" * 5000, None),
])
def test_what_counts_as_calls_in_auto(text, names):
    found = calls(text, TOOLS, "auto")
    assert (found and [c["function"]["name"] for c in found]) == (names or None)
    for c in found or ():
        assert c["type"] == "function" and c["id"].startswith("call_")
        assert isinstance(json.loads(c["function"]["arguments"]), dict)


def test_a_named_function_answer_is_its_arguments_and_parallel_false_keeps_one_call():
    [c] = calls('{"city": "Lima"}', TOOLS, ("function", "get_weather"))
    assert c["function"] == {"name": "get_weather", "arguments": '{"city": "Lima"}'}
    assert calls('{"city": "Li', TOOLS, ("function", "get_weather")) is None  # cut by max_tokens: content
    two = '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    assert len(calls(two, TOOLS, "auto")) == 2 and len(calls(two, TOOLS, "auto", parallel=False)) == 1


def test_a_stream_holds_back_only_what_may_become_calls():
    h = Held(TOOLS, "auto")
    assert [h.push(t) for t in ("  <to", "ol_c")] == ["", ""]  # may still open <tool_call>
    assert h.push("x") == "  <tool_cx" and h.push(" more") == " more" and h.end() == (None, "")
    h = Held(TOOLS, "auto")
    assert h.push('[{"name": "get_time", ') == "" and h.push('"arguments": {}}]') == ""
    found, rest = h.end()
    assert [c["function"]["name"] for c in found] == ["get_time"] and rest == ""
    h = Held(TOOLS, "auto")
    assert h.push("{not json") == "" and h.end() == (None, "{not json")  # held to the end: content then
    assert Held(TOOLS, "required").push("Sunny") == ""  # forced: always held


def test_a_template_without_tools_gets_them_in_a_system_message():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "18C, sunny", "tool_call_id": "c1"}]
    out, specs = prompt(msgs, TOOLS, template_takes_tools=False)
    assert specs is None and [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and '"get_weather"' in out[0]["content"]
    assert json.loads(out[2]["content"]) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert "18C, sunny" in out[3]["content"] and "c1" in out[3]["content"]
    same, specs = prompt(msgs, TOOLS, template_takes_tools=True)
    assert same == msgs and [s["function"]["name"] for s in specs] == ["get_weather", "get_time"]


def test_modes_and_forcing_schemas():
    assert mode(None, None) is None and mode(TOOLS, None) == "auto" and mode(TOOLS, "none") is None
    assert mode(TOOLS, "required") == "required" and mode(TOOLS, named("get_time")) == ("function", "get_time")
    odd = [Tool.model_validate({"type": "function", "function": {"name": n}}) for n in ("auto", "required")]
    assert mode(odd, named("required")) == ("function", "required")  # a tool's name is not a mode
    with pytest.raises(ValueError, match="needs tools"):
        mode(None, "required")
    with pytest.raises(ValueError, match="not among the tools"):
        mode(TOOLS, named("send_mail"))
    assert grammar(TOOLS, "auto", True) is None
    kind, spec = grammar(TOOLS, "required", False)
    schema = json.loads(spec)
    assert kind == "json_schema" and schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [a["properties"]["name"]["enum"] for a in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert json.loads(grammar(TOOLS, ("function", "get_weather"), True)[1]) == WEATHER.function.parameters
    assert json.loads(grammar(odd, ("function", "required"), True)[1]) == {"type": "object", "properties": {}}
