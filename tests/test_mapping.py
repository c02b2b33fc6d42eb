"""The budgeted category→expert optimiser against brute force on random small instances."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from coeserve.router.mapping import Problem, parse_count, pareto, solve


def brute_force(pr: Problem, budget: float):
    """Every table, by enumeration: (best score within budget or None, all (cost, score) points)."""
    E, C = pr.scores.shape
    best, points = None, []
    for choice in itertools.product(range(E), repeat=C):
        if not all(pr.allowed[e, c] for c, e in enumerate(choice)):
            continue
        a = pr.assignment(list(choice))
        points.append((a.avg_params, a.score))
        if a.avg_params <= budget * (1 + 1e-12) and (best is None or a.score > best):
            best = a.score
    return best, points


def random_problem(rng, E, C, pinned=False) -> Problem:
    allowed = None
    if pinned:  # pin one category to one expert, as `--assign general=EXPERT` does
        allowed = np.ones((E, C), bool)
        allowed[:, 0] = False
        allowed[rng.integers(E), 0] = True
    return Problem(tuple(f"e{i}" for i in range(E)), tuple(f"c{j}" for j in range(C)),
                   rng.random((E, C)).round(2),  # rounding makes ties, which the solver must also handle
                   rng.random(C) + 0.05, rng.integers(1, 50, E) * 1e7, allowed)


@pytest.mark.parametrize("seed", range(25))
def test_solve_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    pr = random_problem(rng, int(rng.integers(2, 5)), int(rng.integers(1, 6)), pinned=seed % 3 == 0)
    lo, hi = pr.cheapest(), float(pr.params.max())
    for budget in (lo, lo + (hi - lo) * rng.random(), hi):
        want, _ = brute_force(pr, budget)
        got = solve(pr, budget)
        assert got.score == pytest.approx(want, abs=1e-9)
        assert got.avg_params <= budget * (1 + 1e-9)
        assert set(got.mapping) == set(pr.categories)


@pytest.mark.parametrize("seed", range(10))
def test_pareto_equals_brute_force_frontier(seed):
    rng = np.random.default_rng(100 + seed)
    pr = random_problem(rng, 3, 4)
    _, points = brute_force(pr, np.inf)
    # A point is on the frontier if no other is at most as costly and strictly better.
    want = sorted({(round(c, 3), round(s, 9)) for c, s in points
                   if not any(c2 <= c + 1e-6 and s2 > s + 1e-9 for c2, s2 in points)})
    front = pareto(pr)
    got = [(round(a.avg_params, 3), round(a.score, 9)) for a in front]
    assert got == sorted(got) and {s for _, s in got} == {s for _, s in want}
    assert [s for _, s in got] == sorted(s for _, s in got)  # more parameters buy more score
    for a in front:  # the frontier's best point within a budget is what solve finds
        assert solve(pr, a.avg_params).score == pytest.approx(a.score, abs=1e-9)


def test_infeasible_budget_is_a_clear_error():
    pr = Problem(("small", "big"), ("math", "code"), np.array([[0.2, 0.3], [0.9, 0.8]]), np.array([1, 1]),
                 np.array([135e6, 270e6]))
    with pytest.raises(ValueError, match=r"budget 100.0M is infeasible: the cheapest table averages 135.0M"):
        solve(pr, 100e6)
    assert solve(pr, 135e6).mapping == {"math": "small", "code": "small"}
    assert solve(pr, 202.5e6).mapping == {"math": "big", "code": "small"}  # math gains more per parameter
    assert solve(pr, 270e6).mapping == {"math": "big", "code": "big"}


def test_ties_go_to_the_cheaper_expert():
    pr = Problem(("small", "big"), ("a", "b"), np.zeros((2, 2)), np.array([1, 3]), np.array([1e8, 3e8]))
    assert solve(pr, 3e8).mapping == {"a": "small", "b": "small"}


def test_bad_inputs():
    with pytest.raises(ValueError, match="positive parameter count"):
        Problem(("a",), ("x",), np.ones((1, 1)), np.ones(1), np.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        Problem(("a", "b"), ("x",), np.ones((1, 1)), np.ones(1), np.ones(2))
    with pytest.raises(ValueError, match="needs a score"):
        Problem(("a", "b"), ("x",), np.array([[np.nan], [1.0]]), np.ones(1), np.ones(2))
    assert parse_count("200M") == 2e8 and parse_count("1.5B") == 1.5e9 and parse_count("7e9") == 7e9
    with pytest.raises(ValueError, match="not a parameter count"):
        parse_count("lots")
