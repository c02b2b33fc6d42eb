"""The `coe` command line on the real built-in experts, as a user runs it (a subprocess per command)."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import GEMMA, SMOL


def coe(home, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coeserve.cli", "--home", str(home), *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_experts_lists_the_builtins(store):
    r = coe(store.home, "experts")
    assert r.returncode == 0
    for name, arch in ((SMOL, "llama"), (GEMMA, "gemma3")):
        line = next(x for x in r.stdout.splitlines() if name in x)
        assert arch in line and "fp32" in line and "MiB" in line
    assert "134.5M" in r.stdout and "268.1M" in r.stdout


def test_generate_streams_an_answer(store):
    r = coe(store.home, "generate", "--expert", SMOL, "--temperature", "0", "--max-tokens", "20",
            "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr and "finish: stop" in r.stderr
    again = coe(store.home, "generate", "--expert", SMOL, "--temperature", "0", "--max-tokens", "20", "--speculate",
                "4", "What is the capital of France?")
    assert again.returncode == 0 and again.stdout == r.stdout  # drafts change the passes, not the tokens


def test_generate_into_a_closed_pipe_stops_quietly(store):
    """`coe generate … | head -c 8`: the reader goes away mid-stream; no traceback, SIGPIPE's status."""
    p = subprocess.Popen([sys.executable, "-m", "coeserve.cli", "--home", str(store.home), "generate", "--expert",
                          SMOL, "--temperature", "0", "--max-tokens", "48", "--seed",
                          "1", "Count from 1 to 40, one number per line."],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.read(8)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(300) == 141 and len(first) == 8
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_generate_held_to_a_json_schema_or_choices(store, tmp_path):
    import json

    schema = tmp_path / "capital.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"capital": {"type": "string"}},
                                  "required": ["capital"]}))
    r = coe(store.home, "generate", "--expert", SMOL, "--temperature", "0", "--max-tokens", "40", "--json-schema",
            str(schema), "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"capital": "Paris"} and "finish: stop" in r.stderr
    r = coe(store.home, "generate", "--expert", SMOL, "--choice", "yes", "--choice", "no", "Is the sky blue?")
    assert r.returncode == 0 and r.stdout.strip() in ("yes", "no")
    r = coe(store.home, "generate", "--expert", SMOL, "--regex", "(", "hi")
    assert r.returncode == 2 and r.stderr.startswith("coe: error: the regex does not compile: Regex parsing error")
    assert len(r.stderr.strip().splitlines()) == 1


def test_generate_raw_on_a_base_model(store):
    r = coe(store.home, "generate", "--expert", GEMMA, "--temperature", "0", "--max-tokens", "8", "--raw",
            "1, 2, 3, 4, 5,")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" 6, 7") and "finish: length" in r.stderr


def test_chat_keeps_the_conversation(store):
    args = ("chat", "--expert", SMOL, "--temperature", "0", "--max-tokens", "24")
    both = coe(store.home, *args, stdin="My name is Alice.\nWhat is my name?\n\n")
    alone = coe(store.home, *args, stdin="What is my name?\n\n")
    assert both.returncode == 0 and alone.returncode == 0, both.stderr
    answers = [a.strip() for a in both.stdout.split("> ")[1:3]]
    assert all(answers)
    # Greedy decoding: the same question answers differently only because the first turn is in context.
    assert answers[1] != alone.stdout.split("> ")[1].strip()


def test_unknown_expert_is_one_line(store):
    r = coe(store.home, "generate", "--expert", "no-such-expert", "hi")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("coe: error:")
    assert "no-such-expert" in r.stderr and "not installed" in r.stderr


def test_bad_sampling_value_is_one_line(store):
    r = coe(store.home, "generate", "--expert", SMOL, "--temperature", "-1", "hi")
    assert r.returncode == 2 and r.stderr.startswith("coe: error:") and "temperature" in r.stderr


def test_rm_removes_experts_and_names_a_missing_one(tmp_path):
    from coeserve.formats import synthetic
    from coeserve.store.disk import DiskStore

    disk = DiskStore(tmp_path)
    for name in ("a", "b", "c"):
        synthetic.install(disk, name, synthetic.synthetic_config("tiny"))
    disk.image_dir("a", "bf16")  # a cast goes with its expert
    r = coe(tmp_path, "rm", "a", "nope")
    assert r.returncode == 2 and "nope" in r.stderr and r.stderr.count("\n") == 1
    assert disk.names() == ["a", "b", "c"]  # nothing removed when a name is wrong
    r = coe(tmp_path, "rm", "a", "b")
    assert r.returncode == 0 and "removed a" in r.stdout and "removed b" in r.stdout
    assert disk.names() == ["c"] and sorted(p.name for p in disk.root.iterdir()) == ["c"]
    assert "c" in coe(tmp_path, "experts").stdout
