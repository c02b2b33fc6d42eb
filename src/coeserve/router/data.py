"""The labelled routing set: JSONL rows {prompt, category, source, id, split}. `build` assembles the
shipped set from the benchmark packages (coding, math, stem) and the team-written files (the other
categories), capped per category and split train/validation/test by a fixed seed; `load` reads and
validates any such file.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

from coeserve import sources

CATEGORIES = ("math", "coding", "stem", "humanities", "reasoning", "extraction", "writing", "roleplay", "general")
FALLBACK = "general"
WRITTEN = ("humanities", "reasoning", "extraction", "writing", "roleplay", "general")
SPLITS = ("train", "validation", "test")
FRACTIONS = (0.70, 0.15)  # train, validation; the rest is test
SEED = 20241201
# Package categories: (reader, how many items) — capped so no class dwarfs the team-written ones.
PACKAGED = {"coding": (("human-eval", 164),), "math": (("gsm8k", 150), ("aime2025", 30)),
            "stem": (("gpqa-diamond", 180),)}


def _stable_id(category: str, prompt: str) -> str:
    return f"team/{category}/{hashlib.sha256(prompt.encode()).hexdigest()[:12]}"


def _norm(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def packaged_rows(seed: int = SEED) -> list[dict]:
    rows = []
    for category, parts in PACKAGED.items():
        for source, cap in parts:
            items = sorted(sources.READERS[source](), key=lambda it: it.id)
            random.Random(f"{seed}:{source}").shuffle(items)
            for it in items[:cap]:
                row = {"prompt": it.prompt, "category": category, "source": source, "id": it.id}
                if "canary" in it.extra:  # the GPQA authors ask that copies of their items carry it
                    row["canary"] = it.extra["canary"]
                rows.append(row)
    return rows


def written_rows(written_dir: Path) -> list[dict]:
    """The team-written prompts; a missing file is skipped (the set is then short of that category)."""
    rows = []
    for category in WRITTEN:
        path = Path(written_dir) / f"{category}.jsonl"
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("category") != category or not str(r.get("prompt", "")).strip():
                raise ValueError(f"{path}:{n}: expected a non-empty prompt with category {category!r}")
            rows.append({"prompt": r["prompt"].strip(), "category": category, "source": "team",
                         "id": _stable_id(category, r["prompt"].strip())})
    return rows


def split(rows: list[dict], seed: int = SEED) -> list[dict]:
    """Deduplicate, then split each category by a seeded shuffle of its ids (stable under reordering)."""
    seen, out = set(), []
    for r in rows:
        if _norm(r["prompt"]) not in seen:
            seen.add(_norm(r["prompt"]))
            out.append(r)
    by_cat: dict[str, list[dict]] = {}
    for r in out:
        by_cat.setdefault(r["category"], []).append(r)
    result = []
    for category in CATEGORIES:
        group = sorted(by_cat.get(category, []), key=lambda r: r["id"])
        random.Random(f"{seed}:{category}").shuffle(group)
        n_train, n_val = round(FRACTIONS[0] * len(group)), round(FRACTIONS[1] * len(group))
        for i, r in enumerate(group):
            r["split"] = SPLITS[0] if i < n_train else SPLITS[1] if i < n_train + n_val else SPLITS[2]
            result.append(r)
    return result


def build(written_dir: Path, seed: int = SEED) -> list[dict]:
    return split(packaged_rows(seed) + written_rows(written_dir), seed)


def write(rows: list[dict], path: Path) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def load(path: Path, split_name: str | None = None) -> list[dict]:
    """Rows of a routing JSONL file (all, or one split). Every row needs prompt and category."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("category"), str):
            raise ValueError(f"{path}:{n}: each line needs a string prompt and category")
        if split_name is None or r.get("split", SPLITS[0]) == split_name:
            rows.append(r)
    if not rows:
        raise ValueError(f"{path}: no rows" + (f" in split {split_name!r}" if split_name else ""))
    return rows


def summary(rows: list[dict]) -> dict[str, dict[str, int]]:
    """category -> split -> count."""
    c = Counter((r["category"], r.get("split", "train")) for r in rows)
    cats = [k for k in CATEGORIES if any(cat == k for cat, _ in c)] + sorted({k for k, _ in c} - set(CATEGORIES))
    return {k: {s: c[(k, s)] for s in SPLITS} for k in cats}
