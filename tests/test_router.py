"""The router on the shipped routing set: the set itself, training and accuracy, the exported classifiers,
the fallback on out-of-distribution prompts, determinism, and the `coe router` / `coe route` commands."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import string

import numpy as np
import pytest
import torch

from coeserve.router import data
from coeserve.router.classifier import REGISTRY
from coeserve.router.router import BUILTIN, Router, RouterSpec, read_spec
from coeserve.router.train import TrainConfig, calibrate_threshold, evaluate, separate, train
from tests.conftest import REPO, SMOL
from tests.test_cli import coe

ROUTING = REPO / "data" / "routing" / "routing.jsonl"


@pytest.fixture(scope="module")
def embedder():
    from coeserve.router.embedder import Embedder
    return Embedder(device="cpu")


@pytest.fixture(scope="module")
def builtin(embedder):
    return Router.load(BUILTIN, embedder=embedder)


def test_routing_set_is_shipped_balanced_and_reproducible(tmp_path):
    rows = data.load(ROUTING)
    counts = data.summary(rows)
    assert list(counts) == list(data.CATEGORIES)
    for cat, c in counts.items():
        total = sum(c.values())
        assert 120 <= total <= 200, (cat, total)
        assert c["train"] == round(0.70 * total) and c["validation"] == round(0.15 * total)
    sources = {(r["category"], r["source"]) for r in rows}
    assert {("coding", "human-eval"), ("math", "gsm8k"), ("math", "aime2025"), ("stem", "gpqa-diamond")} <= sources
    assert {s for c, s in sources if c in data.WRITTEN} == {"team"}
    assert len({r["id"] for r in rows}) == len(rows)
    # The shipped file is exactly what the build script makes from the packages and the written files.
    data.write(data.build(REPO / "data" / "routing" / "written"), tmp_path / "r.jsonl")
    assert (tmp_path / "r.jsonl").read_bytes() == ROUTING.read_bytes()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("router")
    res = train(ROUTING, out, TrainConfig(classifiers=("logreg", "knn")), device="cpu", log=lambda *_: None)
    return out, res


def test_trained_router_reaches_90_percent_on_the_test_split(trained, embedder):
    out, res = trained
    assert {r["classifier"] for r in res["comparison"]} == {"logreg", "knn"}
    assert res["chosen"] in ("logreg", "knn") and 0 <= res["threshold"] < 1
    router = Router.load(out, embedder=embedder)
    ev = evaluate(router, data.load(ROUTING, "test"))
    assert ev["n"] == sum(c["test"] for c in data.summary(data.load(ROUTING)).values())
    assert ev["classifier_accuracy"] >= 0.90
    assert ev["routed_accuracy"] >= 0.85 and ev["fallback_rate"] <= 0.10
    assert np.array(ev["confusion"]).sum() == ev["n"]
    assert sorted(p.name for p in out.iterdir()) == ["classifier.safetensors", "ood.safetensors", "router.json"]


def test_builtin_router_was_trained_on_the_shipped_set(builtin):
    spec = builtin.spec
    assert spec.info["data_sha256"] == hashlib.sha256(ROUTING.read_bytes()).hexdigest()
    assert spec.categories == data.CATEGORIES and spec.fallback == "general"
    assert set(spec.mapping) == set(data.CATEGORIES)  # every category, general included, has an expert
    assert spec.mapping["general"] == SMOL
    ev = evaluate(builtin, data.load(ROUTING, "test"))
    assert ev["classifier_accuracy"] >= 0.90


@pytest.mark.parametrize("name", list(REGISTRY))
def test_exported_classifier_matches_scikit_learn(name):
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 16)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = (X[:, 0] > 0).astype(int) + 2 * (X[:, 1] > 0)  # four separable-ish classes
    clf = REGISTRY[name].fit(X[:90], y[:90])
    got = clf.proba(torch.from_numpy(X[90:])).numpy()
    ref = clf.fitted or KNeighborsClassifier(n_neighbors=10, metric="cosine").fit(X[:90], y[:90])
    np.testing.assert_allclose(got, ref.predict_proba(X[90:]), atol=1e-5)
    assert (got.argmax(1) == y[90:]).mean() > 0.5  # chance is 0.25


def random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    chars = string.ascii_letters + string.digits + string.punctuation
    return ["".join(rng.choice(chars) for _ in range(rng.randint(4, 60))) for _ in range(n)]


def test_out_of_distribution_prompts_fall_back(builtin):
    noise = random_strings(40, seed=2024)  # not the seed the threshold was calibrated with
    emptyish = ["", " ", "??", "...", "\n\t", "?!?!", "a", "hmm", "ok"]
    routes = builtin.route(noise + emptyish)
    assert [r.category for r in routes] == ["general"] * len(routes)
    assert {r.reason for r in routes} <= {"too-short", "not-text", "out-of-distribution", "low-confidence"}
    assert all(r.expert == SMOL for r in routes)
    # …while real prompts of each kind are routed to their category.
    real = {"math": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                    "May. How many clips did Natalia sell altogether in April and May?",
            "coding": "def sort_even(l: list):\n    \"\"\"Return a copy of l with the values at even indices "
                      "sorted.\n    >>> sort_even([5, 6, 3, 4])\n    [3, 6, 5, 4]\n    \"\"\"\n",
            "writing": "Write a short poem about the first snow of winter falling on a quiet city."}
    assert [r.category for r in builtin.route(list(real.values()))] == list(real)


def test_routing_is_deterministic(builtin):
    prompts = [r["prompt"] for r in data.load(ROUTING, "test")[::7]] + random_strings(5, seed=7)
    a, b = builtin.route(prompts), builtin.route(prompts)
    assert a == b
    one = [builtin.route([p])[0] for p in prompts[:6]]
    assert [r.category for r in one] == [r.category for r in a[:6]]
    # Alone or in a padded micro-batch, the matmuls block differently: bf16 rounds each layer's output,
    # so probabilities agree less closely there than in fp32.
    tol = 1e-4 if builtin.embedder.dtype == torch.float32 else 2e-3
    assert [r.prob for r in one] == pytest.approx([r.prob for r in a[:6]], abs=tol)


def test_calibration_rules():
    top = np.array([0.30, 0.50, 0.60, 0.90, 0.95, 0.99])
    correct = np.array([False, False, True, True, True, True])
    assert calibrate_threshold(top, correct, 1.0) == 0.60  # the smallest that drops both mistakes
    assert calibrate_threshold(top, correct, 0.6) == 0.0  # 4/6 correct already meets it
    assert separate(np.array([0.6, 0.7, 0.9]), np.array([0.0, 0.1, 0.5])) == pytest.approx(0.55)


def test_router_spec_is_validated(tmp_path):
    spec = read_spec(BUILTIN)
    with pytest.raises(ValueError, match="version 2 is not supported"):
        RouterSpec(**{**spec.__dict__, "version": 2})
    with pytest.raises(ValueError, match="fallback category 'chat'"):
        RouterSpec(**{**spec.__dict__, "fallback": "chat"})
    with pytest.raises(ValueError, match="unknown categories: poetry"):
        RouterSpec(**{**spec.__dict__, "mapping": {"poetry": SMOL}})
    with pytest.raises(FileNotFoundError, match="not a router directory"):
        read_spec(tmp_path)


def test_coe_route_prints_category_expert_and_time(store):
    r = coe(store.home, "route", "--json", "--device", "cpu",
            "Solve for x: 3x + 7 = 22. Show each step of the algebra.")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["category"] == "math" and out["reason"] == "confident" and out["prob"] >= 0.5
    assert out["expert"] == read_spec(BUILTIN).mapping["math"] and out["route_ms"] > 0
    bad = coe(store.home, "route", "--router", str(store.home), "hi")
    assert bad.returncode == 2 and bad.stderr.startswith("coe: error:") and "not a router directory" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0


def test_coe_router_eval_and_map(store, tmp_path):
    png = tmp_path / "confusion.png"
    r = coe(store.home, "router", "eval", "--data", str(ROUTING), "--confusion", str(png), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["classifier_accuracy"] >= 0.90 and 0 <= out["fallback_rate"] <= 0.10
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Map onto a copy of the built-in router from a score file: math scores higher on the bigger expert.
    router = tmp_path / "router"
    shutil.copytree(BUILTIN, router)
    cats = data.CATEGORIES
    cells = {f"{e}/{c}": {"score": (0.9 if (e == "big" and c == "math") else 0.5)} for e in ("small", "big") for c in cats}
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"experts": ["small", "big"], "params": {"small": 1e8, "big": 4e8}, "cells": cells}))
    r = coe(store.home, "router", "map", "--scores", str(scores), "--budget", "150M", "--router", str(router),
            "--assign", "general=small", "--pareto", "--plot", str(tmp_path / "p.png"))
    assert r.returncode == 0, r.stderr
    mapping = read_spec(router).mapping
    assert mapping["math"] == "big" and all(mapping[c] == "small" for c in cats if c != "math")
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["frontier"]) == 2
    r = coe(store.home, "router", "map", "--scores", str(scores), "--budget", "50M", "--router", str(router))
    assert r.returncode == 2 and "infeasible" in r.stderr and r.stderr.startswith("coe: error:")


def test_bf16_embedder_routes_as_fp32(builtin):
    """bf16 (the default on CPUs with AMX) moves no test-split prompt to another category."""
    from coeserve.router.embedder import Embedder, native_bf16, pick_dtype

    assert pick_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native_bf16(torch.device("cpu"))
                                                        else torch.float32)
    prompts = [r["prompt"] for r in data.load(ROUTING, "test")[::2]]
    runs = {}
    for dtype in ("fp32", "bf16"):
        router = Router.load(BUILTIN, embedder=Embedder(device="cpu", dtype=dtype))
        assert router.embedder.dtype == pick_dtype(dtype, torch.device("cpu"))
        runs[dtype] = (router.embedder(prompts), router.route(prompts))
    (e32, r32), (e16, r16) = runs["fp32"], runs["bf16"]
    assert (e32 * e16).sum(-1).min() > 0.995
    assert [r.category for r in r16] == [r.category for r in r32]
    with pytest.raises(ValueError, match="embedder dtype"):
        pick_dtype("int8", torch.device("cpu"))


def test_embedder_by_name_or_path(embedder, tmp_path):
    from coeserve.router.embedder import Embedder, resolve

    by_path = Embedder(str(resolve("all-MiniLM-L6-v2")), device="cpu")
    prompts = ["Translate 'good morning' into Spanish.", "Prove that the square root of 2 is irrational."]
    a, b = embedder(prompts), by_path(prompts)
    assert a.shape == (2, 384) and torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a sentence-transformers model directory"):
        Embedder(str(tmp_path), device="cpu")
