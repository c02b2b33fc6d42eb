"""CoE evaluation: the sandbox that runs generated code, the automatic scorers on real benchmark items, the
judge on a real local expert, and the resumable score matrix."""
from __future__ import annotations

import json

import pytest

from coeserve.evaluate.judge import ExpertJudge, PREFIX, parse_rating, to_score
from coeserve.evaluate.run import EvalConfig, run
from coeserve.evaluate.sandbox import run_python
from coeserve.evaluate.scorers import (HumanEvalPass, MultipleChoice, NumericMatch, extract_letter, final_number,
                                       humaneval_program)
from coeserve.evaluate.generate import Generators
from coeserve.sources import gpqa_diamond, gsm8k, humaneval
from tests.conftest import REPO, SMOL
from tests.test_cli import coe

ROUTING = REPO / "data" / "routing" / "routing.jsonl"


@pytest.fixture(scope="module")
def he():
    return {it.id: it for it in humaneval()}


def test_humaneval_known_correct_scores_1_and_known_wrong_scores_0(he):
    item = he["HumanEval/0"]
    right = "```python\n" + item.prompt + item.extra["canonical_solution"] + "```"
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    body_only = item.extra["canonical_solution"]  # a completion that continues the prompt, HumanEval style
    scorer = HumanEvalPass(timeout=10)
    assert scorer.score(item, right)[0] == 1.0
    assert scorer.score(item, body_only)[0] == 1.0
    score, note = scorer.score(item, wrong)
    assert score == 0.0 and note.startswith("failed: AssertionError")


def test_sandbox_contains_loops_shell_network_and_writes(tmp_path):
    marker = tmp_path / "escaped"
    r = run_python("while True:\n    pass\n", timeout=2)
    assert r.status == "timeout" and not r.passed
    r = run_python(f"import os\nos.system('touch {marker}')\n")
    assert r.status == "blocked" and "os.system" in r.detail
    r = run_python(f"import subprocess\nsubprocess.run(['touch', '{marker}'])\n")
    assert r.status == "blocked" and "subprocess.Popen" in r.detail
    r = run_python(f"open('{marker}', 'w').write('x')\n")
    assert r.status == "blocked" and "outside the sandbox" in r.detail
    r = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert r.status == "blocked" and "socket" in r.detail
    r = run_python("try:\n    import os; os.system('true')\nexcept BaseException:\n    pass\n")
    assert r.status == "blocked"  # the hook ends the process: catching the error does not get around it
    assert not marker.exists()
    r = run_python("x = bytearray(8 << 30)\n", memory_mb=512)
    assert r.status == "failed" and "MemoryError" in r.detail
    assert run_python("open('scratch.txt', 'w').write('ok')\nimport math\nassert math.isqrt(17) == 4\n").passed


def test_numeric_and_choice_scorers_on_real_items():
    item = next(it for it in gsm8k() if it.id == "gsm8k/test/0")
    assert item.answer == "18"
    s = NumericMatch()
    assert s.score(item, "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\nAnswer: $18")[0] == 1.0
    assert s.score(item, "She makes 1,018 dollars. Answer: 1,018")[0] == 0.0
    assert s.score(item, "I am not sure.")[0] == 0.0
    assert final_number("#### 1,234") == "1234" and final_number("so 3.5 then 7") == "7"
    q = gpqa_diamond()[0]
    assert q.answer in "ABCD" and f"{q.answer}) " in q.prompt and "canary" in q.extra
    c = MultipleChoice()
    assert c.score(q, f"Reasoning...\nAnswer: {q.answer}")[0] == 1.0
    assert c.score(q, "Answer: " + next(x for x in "ABCD" if x != q.answer))[0] == 0.0
    assert extract_letter("(C) because") == "C" and extract_letter("The answer is B.") == "B"
    assert extract_letter("I cannot tell") is None


def test_humaneval_program_keeps_the_prompt_imports(he):
    item = he["HumanEval/0"]
    prog = humaneval_program(item, "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```")
    assert prog.startswith("from typing import List") and prog.rstrip().endswith("check(has_close_elements)")


def test_judge_rating_rules():
    assert parse_rating("Rating: [[7]] because") == 7
    assert parse_rating("The rating: 9/10") == 9
    assert parse_rating("Rating: [[11]]") is None and parse_rating("great answer") is None
    assert to_score(None) == 0.0 and to_score(1) == 0.0 and to_score(10) == 1.0


def test_local_expert_judge_returns_parseable_ratings(store):
    gens = Generators(store, device="cpu", max_seq_len=1024)
    judge = ExpertJudge(SMOL, gens.get(SMOL, keep=True, prefix=PREFIX))
    ratings = judge.grade(["What is the capital of France?"] * 2, ["Paris.", "Bananas are yellow."])
    assert all(r is not None and 1 <= r <= 10 for r in ratings)


def test_score_matrix_is_written_and_resumable(store, tmp_path):
    gens = Generators(store, device="cpu", max_seq_len=1024)
    calls = []

    def generate_for(expert):
        fn = gens.get(expert)
        return lambda prompts, max_tokens: calls.append(len(prompts)) or fn(prompts, max_tokens)

    def judge_for():
        return ExpertJudge(SMOL, gens.get(SMOL, keep=True, prefix=PREFIX))

    cfg = EvalConfig((SMOL,), ("stem", "writing"), per_category=2, max_tokens=8, data=ROUTING.name, judge=SMOL)
    out = tmp_path / "scores.json"
    args = (ROUTING, out, generate_for, judge_for, lambda e: store.info(e).params)
    doc = run(cfg, *args)
    assert calls == [2, 2]
    assert doc["params"][SMOL] == store.info(SMOL).params
    stem, writing = doc["cells"][f"{SMOL}/stem"], doc["cells"][f"{SMOL}/writing"]
    assert stem["scorer"] == "auto" and writing["scorer"] == "judge" and stem["n"] == writing["n"] == 2
    assert all(0 <= c["score"] <= 1 for c in (stem, writing))
    test_ids = [json.loads(x)["id"] for x in ROUTING.read_text().splitlines()
                if json.loads(x)["category"] == "stem" and json.loads(x)["split"] == "test"][:2]
    assert [i["id"] for i in stem["items"]] == test_ids  # held-out items, in a fixed order
    assert run(cfg, *args)["cells"] == doc["cells"] and calls == [2, 2]  # nothing left to do
    run(EvalConfig((SMOL,), ("stem",), per_category=2, max_tokens=9, data=ROUTING.name, judge=SMOL), *args)
    assert calls == [2, 2, 2]  # other settings: the old cells are not reused


def test_coe_evaluate_refuses_unknown_experts(store, tmp_path):
    r = coe(store.home, "evaluate", "--experts", "nope", "--data", str(ROUTING), "--out", str(tmp_path / "s.json"))
    assert r.returncode == 2 and r.stderr.startswith("coe: error:") and "'nope' is not installed" in r.stderr
    r = coe(store.home, "evaluate", "--experts", SMOL, "--categories", "poetry", "--data", str(ROUTING),
            "--out", str(tmp_path / "s.json"))
    assert r.returncode == 2 and "no test rows in category 'poetry'" in r.stderr
