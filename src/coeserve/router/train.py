"""Train, compare, calibrate and evaluate routers.

`train` embeds a routing set once, fits every registered classifier on its train split, compares them on
the validation split (accuracy, then latency), keeps the best, calibrates the two fallback thresholds on
validation data, and writes an artifact. `evaluate` scores a router on labelled rows.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coeserve.router import data
from coeserve.router.classifier import REGISTRY
from coeserve.router.router import Router, RouterSpec, save

# Pick the most accurate classifier; one within this much validation accuracy of it wins if faster.
ACCURACY_TIE = 0.005
NOISE_SEED, NOISE_N = 5, 300  # random-character strings that the wordiness threshold separates from prompts


@dataclass(frozen=True)
class TrainConfig:
    classifiers: tuple[str, ...] = tuple(REGISTRY)
    target_accuracy: float = 0.98  # accuracy required of the prompts the router does not send to fallback
    embedder: str = "all-MiniLM-L6-v2"
    # 64 tokens meets the 10 ms/prompt CPU target; 256 (MiniLM's own limit) is 1.8 points more accurate
    # on validation and about 2.4x slower (docs/router.md).
    max_seq_length: int = 64
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "classifiers", tuple(self.classifiers))
        unknown = set(self.classifiers) - set(REGISTRY)
        if unknown or not self.classifiers:
            raise ValueError(f"classifiers must be among {', '.join(REGISTRY)}")
        if not 0 < self.target_accuracy <= 1:
            raise ValueError("target accuracy must be in (0, 1]")


def _labels(rows: list[dict], categories: tuple[str, ...]) -> np.ndarray:
    index = {c: i for i, c in enumerate(categories)}
    unknown = {r["category"] for r in rows} - set(index)
    if unknown:
        raise ValueError(f"categories not in the training split: {', '.join(sorted(unknown))}")
    return np.array([index[r["category"]] for r in rows])


def _latency_us(clf, X: torch.Tensor, batch: int = 64, reps: int = 20, rounds: int = 5) -> float:
    """Best of several rounds: the machine is shared, and the slow rounds measure the neighbours."""
    x, best = X[:batch], float("inf")
    clf.proba(x)  # warm-up
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            clf.proba(x)
        best = min(best, (time.perf_counter() - t) / reps / len(x) * 1e6)
    return best


def compare(Xtr, ytr, Xva, yva, cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Fit each kind; one row per kind (validation accuracy, latency, fit time); and the fitted models."""
    table, fitted = [], {}
    for name in cfg.classifiers:
        t = time.perf_counter()
        clf = REGISTRY[name].fit(Xtr.numpy(), ytr, seed=cfg.seed)
        fit_s = time.perf_counter() - t
        with torch.inference_mode():
            acc = float((clf.proba(Xva).argmax(-1).numpy() == yva).mean())
            lat = _latency_us(clf, Xva)
        fitted[name] = clf
        table.append({"classifier": name, "val_accuracy": round(acc, 4), "us_per_prompt": round(lat, 2),
                      "fit_s": round(fit_s, 2)})
    return table, fitted


def pick(table: list[dict]) -> str:
    best = max(r["val_accuracy"] for r in table)
    close = [r for r in table if r["val_accuracy"] >= best - ACCURACY_TIE]
    return min(close, key=lambda r: r["us_per_prompt"])["classifier"]


def calibrate_threshold(top: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The smallest threshold t such that the validation prompts with top probability ≥ t are classified
    with accuracy ≥ target (so as few prompts as possible fall back); failing that, the most accurate t."""
    best_t, best_acc = 0.0, -1.0
    for t in np.unique(np.concatenate([[0.0], top])):
        keep = top >= t
        acc = correct[keep].mean() if keep.any() else 0.0
        if acc >= target:
            return float(t)
        if acc > best_acc:
            best_t, best_acc = float(t), acc
    return best_t


def noise_prompts(n: int = NOISE_N, seed: int = NOISE_SEED) -> list[str]:
    """Random printable-character strings (5–80 characters, some spaces): what keyboard noise looks like."""
    import random
    import string

    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + string.punctuation + "    "
    return ["".join(rng.choice(chars) for _ in range(rng.randint(5, 80))) for _ in range(n)]


def separate(keep: np.ndarray, reject: np.ndarray) -> float:
    """The threshold t (accept ≥ t) that keeps the most of `keep` plus rejects the most of `reject`, at the
    middle of the best interval."""
    cuts = np.unique(np.concatenate([keep, reject, [np.inf]]))
    right = [(keep >= t).mean() + (reject < t).mean() for t in cuts]
    i = int(np.argmax(right))
    below = max([x for x in np.concatenate([keep, reject]) if x < cuts[i]], default=cuts[i])
    return float((cuts[i] + below) / 2)


def train(path: Path, out: Path, cfg: TrainConfig = TrainConfig(), device: str = "cpu", log=print) -> dict:
    from coeserve.router.embedder import Embedder

    rows = data.load(path)
    tr, va = [r for r in rows if r.get("split", "train") == "train"], [r for r in rows if r.get("split") == "validation"]
    if not va:
        raise ValueError(f"{path}: no rows with \"split\": \"validation\" to compare and calibrate on")
    categories = tuple(c for c in data.CATEGORIES if any(r["category"] == c for r in tr)) + tuple(
        sorted({r["category"] for r in tr} - set(data.CATEGORIES)))
    if data.FALLBACK not in categories:
        raise ValueError(f"{path}: the training split has no {data.FALLBACK!r} rows (the fallback category)")
    # fp32 whatever the CPU: the artifact (classifier, calibrated thresholds, OOD bank) is the same on
    # every machine; bf16 routing reads it unchanged (Embedder's docstring).
    emb = Embedder(cfg.embedder, device=device, max_seq_length=cfg.max_seq_length, dtype="fp32")
    log(f"embedding {len(tr)} train and {len(va)} validation prompts with {cfg.embedder}")
    Xtr, Xva = emb([r["prompt"] for r in tr]).cpu(), emb([r["prompt"] for r in va]).cpu()
    ytr, yva = _labels(tr, categories), _labels(va, categories)
    table, fitted = compare(Xtr, ytr, Xva, yva, cfg)
    name = pick(table)
    with torch.inference_mode():
        probs = fitted[name].proba(Xva)
        near = (Xva @ Xtr.T).max(-1).values.numpy()
    top, pred = probs.max(-1).values.numpy(), probs.argmax(-1).numpy()
    wordy = np.array([emb.wordiness(r["prompt"]) for r in va])
    noise = np.array([emb.wordiness(p) for p in noise_prompts()])
    threshold = calibrate_threshold(top, pred == yva, cfg.target_accuracy)
    info = {"data": Path(path).name, "data_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "counts": data.summary(rows), "comparison": table, "chosen": name,
            "target_accuracy": cfg.target_accuracy, "noise": {"seed": NOISE_SEED, "n": NOISE_N}}
    spec = RouterSpec(categories=categories, classifier=name, classifier_params=fitted[name].params,
                      embedder=cfg.embedder, max_seq_length=emb.model.max_seq_length, threshold=round(threshold, 6),
                      # The cosine guard only refuses prompts farther from all training prompts than any
                      # validation prompt is; the wordiness guard is what catches noise.
                      ood_threshold=round(float(near.min()) - 1e-6, 6),
                      text_threshold=round(separate(wordy, noise), 6), info=info)
    save(out, spec, fitted[name], Xtr)
    return {"comparison": table, "chosen": name, "threshold": spec.threshold, "ood_threshold": spec.ood_threshold,
            "text_threshold": spec.text_threshold}


def evaluate(router: Router, rows: list[dict]) -> dict:
    """Accuracy of the classifier (top category) and of the routed category (after the fallback rules:
    a prompt sent to fallback counts as right only if it is labelled with the fallback category)."""
    routes = router.route([r["prompt"] for r in rows])
    truth = [r["category"] for r in rows]
    cats = list(router.spec.categories)
    conf = np.zeros((len(cats), len(cats)), dtype=int)
    for t, r in zip(truth, routes):
        if t in cats:
            conf[cats.index(t), cats.index(r.category)] += 1
    per = {}
    for i, c in enumerate(cats):
        tp, pred_n, true_n = conf[i, i], conf[:, i].sum(), conf[i].sum()
        per[c] = {"precision": round(float(tp / pred_n), 4) if pred_n else None,
                  "recall": round(float(tp / true_n), 4) if true_n else None, "n": int(true_n)}
    return {"n": len(rows), "categories": cats,
            "classifier_accuracy": round(float(np.mean([r.predicted == t for r, t in zip(routes, truth)])), 4),
            "routed_accuracy": round(float(np.mean([r.category == t for r, t in zip(routes, truth)])), 4),
            "fallback_rate": round(float(np.mean([r.reason != "confident" for r in routes])), 4),
            "per_category": per, "confusion": conf.tolist()}


def plot_confusion(result: dict, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    cats, conf = result["categories"], np.array(result["confusion"])
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(conf, cmap="Blues")
    ax.set_xticks(range(len(cats)), cats, rotation=45, ha="right")
    ax.set_yticks(range(len(cats)), cats)
    ax.set_xlabel("routed category")
    ax.set_ylabel("true category")
    for (i, j), v in np.ndenumerate(conf):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > conf.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
