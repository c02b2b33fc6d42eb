"""The router artifact and routing. An artifact is a directory holding `router.json` (format version,
categories, embedder, classifier kind, calibrated thresholds, category→expert table) and two safetensors
files (classifier weights; the training embeddings for the out-of-distribution guard) — no pickle.

`Router.route(prompts)` embeds a batch, classifies it, and sends a prompt to the fallback category when
it is too short to classify (fewer than `min_words` words), when it is not language (`wordiness` below
`text_threshold`), when its nearest training prompt is less similar than `ood_threshold` (cosine), or
when the classifier's top probability is below `threshold`.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from coeserve.router.classifier import Classifier, make

FORMAT, VERSION = "coeserve-router", 1
SPEC_FILE, WEIGHTS_FILE, OOD_FILE = "router.json", "classifier.safetensors", "ood.safetensors"
BUILTIN = Path(__file__).resolve().parent / "builtin"


@dataclass(frozen=True)
class RouterSpec:
    categories: tuple[str, ...]
    classifier: str
    classifier_params: dict
    embedder: str
    max_seq_length: int  # embedder input tokens; longer prompts are cut (routing needs their opening)
    threshold: float  # top probability below this → fallback
    ood_threshold: float  # nearest-training-prompt cosine below this → fallback
    text_threshold: float = 0.0  # wordiness below this → fallback
    min_words: int = 3  # fewer words than this → fallback
    fallback: str = "general"
    mapping: dict = field(default_factory=dict)  # category → expert name
    info: dict = field(default_factory=dict)  # how it was trained and what it scored
    version: int = VERSION

    def __post_init__(self):
        object.__setattr__(self, "categories", tuple(self.categories))
        if self.version != VERSION:
            raise ValueError(f"router format version {self.version} is not supported (this coeserve reads {VERSION})")
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError("router: categories must be non-empty and unique")
        if self.fallback not in self.categories:
            raise ValueError(f"router: the fallback category {self.fallback!r} is not one of the categories")
        if not 0 <= self.threshold <= 1 or not 0 <= self.text_threshold <= 1 or not -1 <= self.ood_threshold <= 1:
            raise ValueError("router: threshold and text_threshold must be in [0, 1], ood_threshold in [-1, 1]")
        if self.max_seq_length < 8:
            raise ValueError("router: max_seq_length must be at least 8")
        if self.min_words < 0:
            raise ValueError("router: min_words must be >= 0")
        unknown = set(self.mapping) - set(self.categories)
        if unknown:
            raise ValueError(f"router mapping names unknown categories: {', '.join(sorted(unknown))}")

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "RouterSpec":
        d = json.loads(text)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"{where}: not a coeserve router (no \"format\": \"{FORMAT}\")")
        return cls(**d)


@dataclass(frozen=True)
class Route:
    category: str
    prob: float  # the classifier's probability of its top category
    predicted: str  # the classifier's top category, before the fallback rules
    expert: str | None  # from the mapping table; None when the table has no entry
    reason: str  # "confident" | "low-confidence" | "out-of-distribution" | "not-text" | "too-short"


def save(path: Path, spec: RouterSpec, clf: Classifier, bank: torch.Tensor) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in clf.t.items()}, str(path / WEIGHTS_FILE))
    save_file({"embeddings": bank.to(torch.float16).contiguous().cpu()}, str(path / OOD_FILE))
    write_spec(path, spec)


def write_spec(path: Path, spec: RouterSpec) -> None:
    tmp = Path(path) / (SPEC_FILE + ".tmp")
    tmp.write_text(spec.to_json() + "\n", encoding="utf-8")
    os.replace(tmp, Path(path) / SPEC_FILE)  # readers never see half a file


def read_spec(path: Path) -> RouterSpec:
    f = Path(path) / SPEC_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not a router directory (no {SPEC_FILE}; train one with `coe router train`)")
    return RouterSpec.from_json(f.read_text(encoding="utf-8"), str(f))


class Router:
    def __init__(self, spec: RouterSpec, clf: Classifier, bank: torch.Tensor, embedder):
        self.spec, self.embedder = spec, embedder
        self.clf = clf.to(embedder.device)
        self.bank = bank.to(embedder.device, torch.float32)

    @classmethod
    def load(cls, path: Path = BUILTIN, device: str = "auto", embedder=None) -> "Router":
        from coeserve.router.embedder import Embedder

        spec = read_spec(path)
        clf = make(spec.classifier, load_file(str(Path(path) / WEIGHTS_FILE)), spec.classifier_params)
        bank = load_file(str(Path(path) / OOD_FILE))["embeddings"]
        if embedder is None:
            embedder = Embedder(spec.embedder, device=device, max_seq_length=spec.max_seq_length)
        else:  # a shared embedder must read prompts the way the classifier was trained
            embedder.model.max_seq_length = spec.max_seq_length
        return cls(spec, clf, bank, embedder)

    def with_mapping(self, mapping: dict) -> "Router":
        return Router(replace(self.spec, mapping=dict(mapping)), self.clf, self.bank, self.embedder)

    @torch.inference_mode()
    def scores(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities and each prompt's cosine to its nearest training prompt."""
        return self.clf.proba(emb), (emb @ self.bank.T).max(dim=-1).values

    def route(self, prompts: list[str]) -> list[Route]:
        if not prompts:
            return []
        probs, near = self.scores(self.embedder(prompts))
        top, idx = probs.max(dim=-1)
        return [self._decide(p, float(t), self.spec.categories[int(i)], float(n))
                for p, t, i, n in zip(prompts, top.cpu(), idx.cpu(), near.cpu())]

    def _decide(self, prompt: str, prob: float, predicted: str, near: float) -> Route:
        from coeserve.router.embedder import words

        s = self.spec
        if len(words(prompt)) < s.min_words:
            reason = "too-short"
        elif self.embedder.wordiness(prompt) < s.text_threshold:
            reason = "not-text"
        elif near < s.ood_threshold:
            reason = "out-of-distribution"
        elif prob < s.threshold:
            reason = "low-confidence"
        else:
            reason = "confident"
        category = predicted if reason == "confident" else s.fallback
        return Route(category, prob, predicted, s.mapping.get(category), reason)
