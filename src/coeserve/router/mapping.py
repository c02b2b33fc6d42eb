"""The budgeted category→expert table (the CoE paper's second routing step).

Given scores S[e, c] (expert e on category c, in [0, 1]), category frequencies f_c and each expert's
active parameters P_e, pick one expert per category to maximise the expected score Σ_c f_c·S[x(c), c]
subject to the average active parameters Σ_c f_c·P[x(c)] ≤ budget. `solve` is exact (a 0/1 integer
program through scipy's `milp`; among optimal tables it takes the one with the fewest average
parameters); `pareto` is the exact score-vs-parameters frontier, by a dynamic programme over categories.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str) -> float:
    """'200M' → 2e8, '1.5B' → 1.5e9, '7e9' → 7e9."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a parameter count: {text!r} (examples: 200M, 1.5B, 7e9)")
    return float(m.group(1)) * _SUFFIX[m.group(2).upper()]


@dataclass(frozen=True)
class Problem:
    experts: tuple[str, ...]
    categories: tuple[str, ...]
    scores: np.ndarray  # [E, C]; NaN where unscored (allowed only where that expert is pinned)
    freq: np.ndarray  # [C], normalised to sum to 1
    params: np.ndarray  # [E] active parameters
    allowed: np.ndarray = field(default=None)  # [E, C] bool; None = every pair

    def __post_init__(self):
        s = np.asarray(self.scores, dtype=float)
        E, C = len(self.experts), len(self.categories)
        if s.shape != (E, C) or E == 0 or C == 0:
            raise ValueError(f"scores must be {E} experts × {C} categories, got shape {s.shape}")
        f, p = np.asarray(self.freq, dtype=float), np.asarray(self.params, dtype=float)
        if f.shape != (C,) or (f < 0).any() or f.sum() <= 0 or not np.isfinite(f).all():
            raise ValueError("category frequencies must be non-negative, finite and not all zero")
        if p.shape != (E,) or (p <= 0).any() or not np.isfinite(p).all():
            raise ValueError("every expert needs a positive parameter count")
        a = np.ones((E, C), bool) if self.allowed is None else np.asarray(self.allowed, bool)
        if a.shape != (E, C) or not a.any(axis=0).all():
            raise ValueError("every category needs at least one allowed expert")
        if (np.isnan(s) & a & (a.sum(axis=0) > 1)).any():
            raise ValueError("a category with a choice of experts needs a score for each of them")
        object.__setattr__(self, "scores", np.nan_to_num(s, nan=0.0))
        object.__setattr__(self, "freq", f / f.sum())
        object.__setattr__(self, "params", p)
        object.__setattr__(self, "allowed", a)

    def cheapest(self) -> float:
        """The smallest average active parameters any table can reach."""
        return float(sum(self.freq[c] * self.params[self.allowed[:, c]].min() for c in range(len(self.categories))))

    def assignment(self, choice: list[int]) -> "Assignment":
        cols = range(len(self.categories))
        return Assignment({self.categories[c]: self.experts[e] for c, e in zip(cols, choice)},
                          float(sum(self.freq[c] * self.scores[e, c] for c, e in zip(cols, choice))),
                          float(sum(self.freq[c] * self.params[e] for c, e in zip(cols, choice))))


@dataclass(frozen=True)
class Assignment:
    mapping: dict  # category → expert
    score: float  # expected score
    avg_params: float  # average active parameters per request


def _milp(pr: Problem, objective: np.ndarray, budget: float, min_score: float | None):
    from scipy.optimize import Bounds, LinearConstraint, milp

    E, C = pr.scores.shape
    one_each = np.kron(np.eye(C), np.ones(E))  # variable x[c*E + e]
    cost = np.concatenate([pr.freq[c] * pr.params for c in range(C)])
    cons = [LinearConstraint(one_each, 1, 1), LinearConstraint(cost[None], -np.inf, budget)]
    if min_score is not None:
        gain = np.concatenate([pr.freq[c] * pr.scores[:, c] for c in range(C)])
        cons.append(LinearConstraint(gain[None], min_score, np.inf))
    upper = pr.allowed.T.reshape(-1).astype(float)
    res = milp(objective, integrality=np.ones(E * C), bounds=Bounds(0, upper), constraints=cons)
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"the integer program failed: {res.message}")
    return [int(np.argmax(res.x[c * E:(c + 1) * E])) for c in range(C)]


def solve(pr: Problem, budget: float) -> Assignment:
    """The best table within the budget; ValueError if no table fits it."""
    if budget < pr.cheapest() * (1 - 1e-12):
        raise ValueError(f"budget {budget / 1e6:.1f}M is infeasible: the cheapest table averages "
                         f"{pr.cheapest() / 1e6:.1f}M active parameters")
    E, C = pr.scores.shape
    gain = np.concatenate([pr.freq[c] * pr.scores[:, c] for c in range(C)])
    best = pr.assignment(_milp(pr, -gain, budget, None))
    # Second pass: among tables within 1e-9 of the best score, the one with the fewest parameters.
    cost = np.concatenate([pr.freq[c] * pr.params for c in range(C)])
    return pr.assignment(_milp(pr, cost / cost.max(), budget, best.score - 1e-9))


def pareto(pr: Problem) -> list[Assignment]:
    """Every table not beaten on both expected score and average parameters, cheapest first."""
    front = [(0.0, 0.0, [])]  # (cost, score, choice per category so far)
    for c in range(len(pr.categories)):
        grown = [(cost + pr.freq[c] * pr.params[e], score + pr.freq[c] * pr.scores[e, c], ch + [e])
                 for cost, score, ch in front for e in np.flatnonzero(pr.allowed[:, c])]
        grown.sort(key=lambda t: (t[0], -t[1]))
        front, best = [], -np.inf
        for t in grown:  # keep a point only if it scores more than every cheaper one
            if t[1] > best + 1e-12:
                front.append(t)
                best = t[1]
    return [pr.assignment(ch) for _, _, ch in front]


def plot_pareto(front: list[Assignment], out, chosen: Assignment | None = None, budget: float | None = None):
    import matplotlib
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step([a.avg_params / 1e6 for a in front], [a.score for a in front], where="post", marker="o")
    if chosen is not None:
        ax.plot([chosen.avg_params / 1e6], [chosen.score], "r*", markersize=14, label="chosen")
        ax.legend()
    if budget is not None:
        ax.axvline(budget / 1e6, color="grey", linestyle="--")
    ax.set_xlabel("average active parameters (M)")
    ax.set_ylabel("expected score")
    ax.set_title("category→expert tables: Pareto frontier")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def from_scores(doc: dict, categories: tuple[str, ...], freq: dict, params: dict, assign: dict) -> Problem:
    """A problem from a `coe evaluate` score file. Categories: the router's; frequencies: `freq` or
    uniform; parameters: `params` (strings like '7B') or the file's; `assign` pins categories to experts
    (a pinned category needs no scores, e.g. the fallback category)."""
    experts = tuple(doc.get("experts") or [])
    cells = doc.get("cells") or {}
    if not experts or not cells:
        raise ValueError("the score file has no experts or no cells (is it from `coe evaluate`?)")
    for name in list(freq) + list(assign):
        if name not in categories:
            raise ValueError(f"unknown category {name!r} (the router's: {', '.join(categories)})")
    for e in list(assign.values()) + list(params):
        if e not in experts:
            raise ValueError(f"unknown expert {e!r} (in the score file: {', '.join(experts)})")
    p = np.array([parse_count(params[e]) if e in params else float(doc.get("params", {}).get(e, 0)) for e in experts])
    scores = np.array([[cells.get(f"{e}/{c}", {}).get("score", np.nan) for c in categories] for e in experts],
                      dtype=float)
    allowed = np.array([[assign.get(c, e) == e for c in categories] for e in experts])
    unscored = [c for j, c in enumerate(categories) if c not in assign and np.isnan(scores[:, j]).any()]
    if unscored:
        raise ValueError(f"no scores for every expert in {', '.join(unscored)}: evaluate them, or pin them "
                         "with --assign CATEGORY=EXPERT")
    f = np.array([float(freq.get(c, 1.0 if not freq else 0.0)) for c in categories])
    return Problem(experts, tuple(categories), scores, f, p, allowed)
