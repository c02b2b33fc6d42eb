"""coeserve on Ray Serve, locally: an ingress and two CoE-node replicas with small budgets. Repeat
requests for an expert stay on the replica that holds it, answers equal the single-node engine's for the
same seed, and a replica killed mid-request loses nothing: its requests finish on the other one."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from .conftest import GEMMA, REPO, SMOL
from .test_server import free_port, get

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.cluster


class Cluster:
    def __init__(self, home):
        import openai
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coeserve.cli", "--home", str(home), "serve", "--ray", "--port", str(self.port),
             "--replicas", "2", "--node-cpus", "0.5", "--node-threads", "1", "--device-slots", "1",
             "--max-seq-len", "512", "--max-batch", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True)
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=300)

    def wait_ready(self, timeout=420) -> "Cluster":
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read())
            try:
                if get(self.base + "/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError("the Ray Serve app did not come up")

    def placement(self) -> dict[str, dict[str, int]]:
        """expert → {replica: pid}, from /metrics."""
        out: dict[str, dict[str, int]] = {}
        for line in get(self.base + "/metrics")[1].splitlines():
            if line.startswith("coe_expert_placement{"):
                labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1:line.index("}")].split(","))
                labels = {k: v.strip('"') for k, v in labels.items()}
                out.setdefault(labels["expert"], {})[labels["replica"]] = int(labels["pid"])
        return out

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(store):
    c = Cluster(store.home)
    try:
        yield c.wait_ready()
    finally:
        c.stop()


def chat(c, model, content, **kw):
    kw.setdefault("max_tokens", 16)
    return c.client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def local_answer(expert, content, params):
    from coeserve.config import EngineConfig
    from coeserve.engine.engine import Engine
    ids, stop = expert.codec.chat_prompt([{"role": "user", "content": content}])
    from dataclasses import replace
    return Engine(expert, EngineConfig(max_batch=1, max_seq_len=512)).generate(
        [ids], replace(params, stop=params.stop + stop))[0].text


def test_affinity_and_same_answers_as_one_node(cluster, smol):
    from coeserve.engine.sequence import SamplingParams
    q = "Name a primary colour."
    answers = [chat(cluster, SMOL, q, temperature=0.8, seed=11).choices[0].message.content for _ in range(4)]
    chat(cluster, GEMMA, "The sky is", max_tokens=4)
    where = cluster.placement()
    assert len(where[SMOL]) == 1, where  # every repeat went to the replica that holds it
    assert set(answers) == {local_answer(smol, q, SamplingParams(max_tokens=16, temperature=0.8, seed=11))}
    chunks = list(chat(cluster, SMOL, q, temperature=0.8, seed=11, stream=True, logprobs=True, top_logprobs=2))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    tokens = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    whole = chat(cluster, SMOL, q, temperature=0.8, seed=11, logprobs=True, top_logprobs=2).choices[0].logprobs
    assert text == answers[0] == "".join(t.token for t in tokens) and len(tokens[0].top_logprobs) == 2
    assert [t.token for t in whole.content] == [t.token for t in tokens]  # logprobs cross the node boundary
    models = {m.id: m for m in cluster.client.models.list().data}
    assert models[SMOL].model_extra["coe_replicas"] == sorted(where[SMOL])
    # Structured output: the node compiles the grammar for its own copy of the tokenizer (off its loop).
    year = chat(cluster, SMOL, "In which year did the Berlin Wall fall?", temperature=0,
                extra_body={"structured_outputs": {"regex": "1[0-9]{3}"}})
    assert re.fullmatch("1[0-9]{3}", year.choices[0].message.content) and year.choices[0].finish_reason == "stop"


def test_replica_killed_mid_request_loses_nothing(cluster, gemma):
    from coeserve.engine.sequence import SamplingParams
    q = "Tell me about the moon."
    want = local_answer(gemma, q, SamplingParams(max_tokens=24, temperature=0.0))
    before = set(cluster.placement().get(GEMMA, {}).values())
    out, errors = [], []

    def one():
        try:
            out.append(chat(cluster, GEMMA, q, max_tokens=24, temperature=0.0).choices[0].message.content)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    victim, end = None, time.time() + 120
    while victim is None and time.time() < end:
        pids = set(cluster.placement().get(GEMMA, {}).values())
        victim = next(iter(pids - before or pids), None) if pids else None
        time.sleep(0.05)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(300)
    assert not errors and out == [want] * 4
    assert len(cluster.placement()[GEMMA]) >= 2  # served again elsewhere
