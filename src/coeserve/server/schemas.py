"""OpenAI API request schemas (the subset we serve; the bodies we answer with are server/bodies.py).
Validation errors become 400s with OpenAI-style error bodies (app.py)."""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator, model_validator

from coeserve.engine.sequence import MAX_LOGPROBS
from coeserve.server import tools as toolkit
from coeserve.server.tools import Tool, ToolCall, ToolChoice

MAX_CHOICES = 64  # sequences one request may ask for (n, times the prompts of a completions batch)


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchema(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict | bool = Field(default=True, alias="schema")  # true: any JSON value
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object) or json_schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema}")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of a JSON schema, a regex, a list of choices or an EBNF grammar."""
    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None

    @model_validator(mode="after")
    def _one(self):
        if sum(x is not None for x in (self.json_, self.regex, self.choice, self.grammar)) != 1:
            raise ValueError("give exactly one of json, regex, choice and grammar")
        return self


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # as OpenAI-compatible servers do: unknown fields are ignored

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # a generator's range, with room for n
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) → bias in [-100, 100]
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # Extensions, as vLLM takes them:
    ignore_eos: bool = False  # generate exactly max_tokens, for benchmarks
    top_k: int = Field(default=0, ge=-1)  # 0 or -1: off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    stop_token_ids: list[NonNegativeInt] | None = Field(default=None, max_length=64)
    min_tokens: int = Field(default=0, ge=0)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def sampling(self, choice: int = 0) -> dict:
        """The SamplingParams fields this request sets for its `choice`-th sample of a prompt (with a
        seed, that sample's seed is seed + choice); app.py adds max_tokens, stop and logprobs."""
        seed = None if self.seed is None else self.seed + choice
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0), seed=seed,
                    min_p=self.min_p, presence_penalty=self.presence_penalty,
                    frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                    ignore_eos=self.ignore_eos, stop_token_ids=tuple(self.stop_token_ids or ()),
                    min_tokens=self.min_tokens,
                    logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
                    grammar=self.grammar())

    def grammar(self) -> tuple[str, str] | None:
        """The structured output asked for, as SamplingParams.grammar (engine/grammar.py), or None."""
        fmt, so = self.response_format, self.structured_outputs
        if fmt is not None and fmt.type != "text" and so is not None:
            raise ValueError("give response_format or structured_outputs, not both")
        if fmt is not None and fmt.type == "json_object":
            return ("json_schema", '{"type": "object"}')
        if fmt is not None and fmt.type == "json_schema":
            return ("json_schema", json.dumps(fmt.json_schema.schema_))
        if so is None:
            return None
        if so.json_ is not None:
            return ("json_schema", so.json_ if isinstance(so.json_, str) else json.dumps(so.json_))
        if so.regex is not None:
            return ("regex", so.regex)
        if so.choice is not None:
            return ("choice", json.dumps(so.choice))
        return ("ebnf", so.grammar)

    def token_ids(self) -> list[int]:
        """The token ids the request names (logit_bias, stop_token_ids): each expert it reaches must have them."""
        return [int(k) for k in self.logit_bias or ()] + list(self.stop_token_ids or ())

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > 1024:
            raise ValueError("at most 1024 biased tokens")
        for k, b in v.items():
            if not (k.isascii() and k.isdigit()):
                raise ValueError(f"keys are token ids, not {k!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"the bias of token {k} is {b}; it must be in [-100, 100]")
        if len({int(k) for k in v}) < len(v):
            raise ValueError("a token id is given twice (as keys like '7' and '07')")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def plain(self) -> dict:
        """As a chat template takes it (a developer message is a system message; tool calls with their
        arguments as objects, as transformers' templates expect)."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _loads(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        self.tool_mode()  # tool_choice checked against the tools
        return self

    def tool_mode(self) -> toolkit.Mode:
        """None (no tools in play), "auto", "required" or ("function", name) (server/tools.py)."""
        return toolkit.mode(self.tools, self.tool_choice)

    def grammar(self) -> tuple[str, str] | None:
        forced = toolkit.grammar(self.tools or [], self.tool_mode(), self.parallel_tool_calls)
        own = super().grammar()
        if forced and own:
            raise ValueError("a required or named tool_choice goes without response_format or structured_outputs")
        return forced or own

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Sampling):
    # A prompt is text or token ids; a batch is a list of either (choice i*n+j is prompt i's j-th sample).
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the prompt before the answer, in the text and (with logprobs) the logprobs

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            v = [v]
        if not 1 <= len(v) <= MAX_CHOICES:
            raise ValueError(f"give 1 to {MAX_CHOICES} prompts")
        if not all(v):
            raise ValueError("the prompt is empty")
        if any(isinstance(p, list) and min(p) < 0 for p in v):
            raise ValueError("token ids are not negative")
        return v

    @model_validator(mode="after")
    def _choices(self):
        if len(self.prompt) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts times n is at most {MAX_CHOICES}")
        return self

    def limit(self, default: int) -> int:
        return self.max_tokens or default


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a text prompt, or chat messages put through the expert's template."""
    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = None  # with messages: as the chat endpoint puts them in the prompt
    add_special_tokens: bool = True  # for a prompt: the tokens the tokenizer adds (a BOS, for one)
    add_generation_prompt: bool = True  # for messages: end where the assistant's answer begins
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give a prompt or messages, not both")
        return self


class DetokenizeRequest(BaseModel):
    model: str = Field(min_length=1)
    tokens: list[NonNegativeInt]
