"""The expert × category score matrix (`coe evaluate`).

Each category's evaluation items are the first N rows of its *test* split in the routing set, so they are
held out from router training. Rows from a benchmark package are scored automatically against the gold
answer of the item they name (`sources`); the others (team-written, open-ended) are graded by a judge.
The matrix is rewritten after every finished cell, and a rerun with the same settings skips those cells.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from coeserve.evaluate.judge import Judge, to_score
from coeserve.evaluate.scorers import scorer_for
from coeserve.router import data
from coeserve.sources import items_by_id

FORMAT, VERSION = "coeserve-scores", 1


@dataclass(frozen=True)
class EvalConfig:
    experts: tuple[str, ...]
    categories: tuple[str, ...]
    per_category: int = 10
    max_tokens: int = 256
    data: str = "routing.jsonl"  # the routing set's file name (its hash is recorded too)
    judge: str = ""  # name of the judge, when a category needs one

    def __post_init__(self):
        object.__setattr__(self, "experts", tuple(self.experts))
        object.__setattr__(self, "categories", tuple(self.categories))
        if not self.experts or not self.categories:
            raise ValueError("evaluate: name at least one expert and one category")
        if self.per_category < 1 or self.max_tokens < 1:
            raise ValueError("evaluate: --per-category and --max-tokens must be at least 1")

    def same_run(self, other: dict) -> bool:
        """Cells from a file written with other settings must not be reused."""
        mine = asdict(self)
        return all(other.get(k) == mine[k] for k in ("per_category", "max_tokens", "data", "judge"))


def eval_rows(rows: list[dict], category: str, n: int) -> list[dict]:
    picked = [r for r in rows if r["category"] == category and r.get("split") == "test"][:n]
    if not picked:
        raise ValueError(f"the routing set has no test rows in category {category!r}")
    return picked


def needs_judge(rows: list[dict]) -> bool:
    return any(r.get("source") == "team" for r in rows)


class Matrix:
    """The JSON file: settings, parameter counts, and one cell per expert/category with per-item results."""

    def __init__(self, path: Path, cfg: EvalConfig, data_sha: str):
        self.path, self.cfg = Path(path), cfg
        self.doc = {"format": FORMAT, "version": VERSION, "config": {**asdict(cfg), "data_sha256": data_sha},
                    "params": {}, "cells": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text(encoding="utf-8"))
            if old.get("format") == FORMAT and cfg.same_run(old.get("config", {})) and \
                    old["config"].get("data_sha256") == data_sha:
                self.doc["cells"], self.doc["params"] = old.get("cells", {}), old.get("params", {})

    def has(self, expert: str, category: str) -> bool:
        return f"{expert}/{category}" in self.doc["cells"]

    def put(self, expert: str, category: str, cell: dict) -> None:
        self.doc["cells"][f"{expert}/{category}"] = cell
        self.save()

    def save(self) -> None:
        self.doc["experts"] = sorted({k.split("/")[0] for k in self.doc["cells"]} | set(self.cfg.experts))
        self.doc["categories"] = list(dict.fromkeys(list(self.cfg.categories) + [
            k.split("/", 1)[1] for k in self.doc["cells"]]))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)  # an interrupted run leaves the last complete matrix


def score_cell(rows: list[dict], replies: list[str], judge: Judge | None, items: dict) -> dict:
    """Per-item scores for one expert on one category's rows, and their mean."""
    results, unparsed = [], 0
    auto = [r for r in rows if r.get("source") != "team"]
    for r, reply in zip(rows, replies):
        if r.get("source") != "team":
            item = items[r["id"]]
            s, note = scorer_for(item).score(item, reply)
            results.append({"id": r["id"], "score": s, "note": note})
    team = [(r, reply) for r, reply in zip(rows, replies) if r.get("source") == "team"]
    if team:
        ratings = judge.grade([r["prompt"] for r, _ in team], [reply for _, reply in team])
        unparsed = sum(x is None for x in ratings)
        results += [{"id": r["id"], "score": round(to_score(x), 4), "note": f"rating {x}"}
                    for (r, _), x in zip(team, ratings)]
    scorer = "judge" if team and not auto else "auto" if not team else "mixed"
    return {"score": round(sum(x["score"] for x in results) / len(results), 4), "n": len(results),
            "scorer": scorer, "unparsed": unparsed, "items": results,
            "replies": [reply[:400] for reply in replies]}


def expert_prompt(row: dict, items: dict) -> str:
    if row.get("source") == "team":
        return row["prompt"]
    item = items[row["id"]]
    return scorer_for(item).prompt(item)


def run(cfg: EvalConfig, data_path: Path, out: Path, generate_for, judge_for, params_of, progress=None) -> dict:
    """Fill every missing cell. `generate_for(expert)` → fn(prompts, max_tokens) → replies;
    `judge_for()` → Judge; `params_of(expert)` → active parameters."""
    rows = data.load(data_path)
    items = items_by_id([s for s in {r.get("source") for r in rows} if s and s != "team"])
    m = Matrix(out, cfg, hashlib.sha256(Path(data_path).read_bytes()).hexdigest())
    todo = [(e, c) for e in cfg.experts for c in cfg.categories if not m.has(e, c)]
    cells = {c: eval_rows(rows, c, cfg.per_category) for c in cfg.categories}
    judge = judge_for() if any(needs_judge(cells[c]) for _, c in todo) else None
    for done, (expert, category) in enumerate(todo):
        if progress:
            progress(done, len(todo), f"{expert} × {category}")
        picked = cells[category]
        replies = generate_for(expert)([expert_prompt(r, items) for r in picked], cfg.max_tokens)
        m.doc["params"][expert] = int(params_of(expert))
        m.put(expert, category, score_cell(picked, replies, judge, items))
    if progress:
        progress(len(todo), len(todo), "done")
    m.save()
    return m.doc


def plot_heatmap(doc: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt
    import numpy as np

    experts, cats = doc["experts"], doc["categories"]
    s = np.array([[doc["cells"].get(f"{e}/{c}", {}).get("score", np.nan) for c in cats] for e in experts])
    fig, ax = plt.subplots(figsize=(1.1 * len(cats) + 2, 0.6 * len(experts) + 1.8))
    ax.imshow(s, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    ax.set_yticks(range(len(experts)), experts)
    for (i, j), v in np.ndenumerate(s):
        ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                color="black" if not np.isnan(v) and v > 0.6 else "white")
    ax.set_title(f"score per expert and category (n={doc['config']['per_category']} per cell)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
