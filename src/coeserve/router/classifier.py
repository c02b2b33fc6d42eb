"""Category classifiers over prompt embeddings: base class + registry (the names are the CLI choices).

Each kind is fitted with scikit-learn, then exported to plain tensors (saved as safetensors) and run
in torch: routing needs neither scikit-learn nor pickle, and runs on the embedder's device.
"""
from __future__ import annotations

import numpy as np
import torch


class Classifier:
    """`proba(X)`: [N, dim] unit embeddings → [N, classes] probabilities."""
    name = ""

    def __init__(self, tensors: dict[str, torch.Tensor], params: dict, fitted=None):
        self.t, self.params = tensors, params
        self.fitted = fitted  # the scikit-learn model it was exported from (after fit only; never saved)

    @classmethod
    def fit(cls, X: np.ndarray, y: np.ndarray, seed: int = 0) -> "Classifier":
        raise NotImplementedError

    def proba(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: torch.device) -> "Classifier":
        self.t = {k: v.to(device) for k, v in self.t.items()}
        return self


def _f32(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class LogReg(Classifier):
    name = "logreg"

    @classmethod
    def fit(cls, X, y, seed=0):
        from sklearn.linear_model import LogisticRegression

        # Unit-length inputs: a weak penalty (C=10) lets the probabilities reach confident values.
        m = LogisticRegression(C=10.0, max_iter=5000, random_state=seed).fit(X, y)
        return cls({"weight": _f32(m.coef_), "bias": _f32(m.intercept_)}, {"C": 10.0}, m)

    def proba(self, X):
        return torch.softmax(X @ self.t["weight"].T + self.t["bias"], dim=-1)


class MLP(Classifier):
    name = "mlp"

    @classmethod
    def fit(cls, X, y, seed=0):
        from sklearn.neural_network import MLPClassifier

        m = MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=600, random_state=seed).fit(X, y)
        tensors = {}
        for i, (w, b) in enumerate(zip(m.coefs_, m.intercepts_)):
            tensors[f"w{i}"], tensors[f"b{i}"] = _f32(w), _f32(b)
        return cls(tensors, {"hidden": [256], "alpha": 1e-3, "layers": len(m.coefs_)}, m)

    def proba(self, X):
        n = self.params["layers"]
        for i in range(n):
            X = X @ self.t[f"w{i}"] + self.t[f"b{i}"]
            if i < n - 1:
                X = torch.relu(X)  # sklearn's default hidden activation
        return torch.softmax(X, dim=-1)


class KNN(Classifier):
    name = "knn"

    @classmethod
    def fit(cls, X, y, seed=0):
        k = 10
        return cls({"train": _f32(X), "labels": torch.from_numpy(np.asarray(y, dtype=np.int64))},
                   {"k": k, "classes": int(np.max(y)) + 1})

    def proba(self, X):
        # Unit vectors: the largest dot products are the nearest neighbours by cosine distance.
        k = min(self.params["k"], self.t["train"].shape[0])
        idx = (X @ self.t["train"].T).topk(k, dim=-1).indices
        votes = torch.zeros(X.shape[0], self.params["classes"], device=X.device)
        votes.scatter_add_(1, self.t["labels"][idx], torch.ones_like(idx, dtype=votes.dtype))
        return votes / k


REGISTRY: dict[str, type[Classifier]] = {c.name: c for c in (LogReg, MLP, KNN)}


def make(name: str, tensors: dict[str, torch.Tensor], params: dict) -> Classifier:
    if name not in REGISTRY:
        raise ValueError(f"unknown classifier {name!r} (known: {', '.join(REGISTRY)})")
    return REGISTRY[name](tensors, params)
