"""Sentence embeddings over HTTP: OpenAI's `POST /v1/embeddings`, Ollama's `POST /api/embed` and its older
`POST /api/embeddings`. They come from the router's embedding model (all-MiniLM-L6-v2 unless the
router names another sentence-transformers model: 384 numbers of unit length, at most 256 tokens of
input), in its own fp32 instance loaded at the first such request: the router's reads only a prompt's
first 64 tokens, in bf16 where the CPU multiplies bf16 in hardware. The experts are generative models,
not embedding models, and a request naming one is a 400. An input over the model's tokens is a 400 on
OpenAI's endpoint (as OpenAI answers) and cut to them on Ollama's unless `"truncate": false` (as
Ollama does). Tokenizing and the model run on worker threads: the event loop streams to everyone."""
from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Literal

import torch
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt
from starlette.concurrency import run_in_threadpool

from coeserve.server.app import VIRTUAL
from coeserve.server.ollama import read_body
from coeserve.server.state import ApiError

MAX_INPUTS = 2048  # inputs per request, as OpenAI allows
MICRO_BATCH = 32  # inputs per forward pass, taken in order of length so that a batch pads little
OLLAMA_NAME = "all-minilm"  # the default model's name in Ollama's library


class EmbeddingRequest(BaseModel):
    """OpenAI's body: text, texts, the model's token ids, or lists of them."""
    model_config = ConfigDict(extra="ignore")  # user…

    model: str = Field(min_length=1)
    input: str | list[str] | list[NonNegativeInt] | list[list[NonNegativeInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)


class OllamaEmbed(BaseModel):
    model_config = ConfigDict(extra="ignore")  # options, keep_alive

    model: str = Field(min_length=1)
    input: str | list[str] = Field(default_factory=list)
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)


class OllamaEmbeddings(BaseModel):
    """The older /api/embeddings: one prompt, one embedding."""
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    prompt: str = ""


class TextEmbedder:
    """A sentence-transformers model for the API: exact token counts, a length limit, fp32, unit rows."""

    def __init__(self, spec: str, device: torch.device):
        from sentence_transformers import SentenceTransformer

        from coeserve.router.embedder import DEFAULT, resolve

        self.name = spec if spec == DEFAULT else Path(spec).name
        self.names = {self.name.lower()} | ({OLLAMA_NAME, f"{OLLAMA_NAME}:l6-v2"} if spec == DEFAULT else set())
        self.model = SentenceTransformer(str(resolve(spec)), device=str(device)).float().eval()
        self.tokenizer, self.device = self.model.tokenizer, device
        self.max_tokens = self.model.max_seq_length
        self.dim = self.model.get_embedding_dimension()

    def answers_to(self, model: str) -> bool:
        name = model.lower()
        return name in self.names or name.removesuffix(":latest") in self.names

    def tokens(self, text: str, truncate: bool) -> list[int]:
        """Input ids as the model reads them (its special tokens included); cut to max_tokens if `truncate`."""
        cut = dict(truncation=True, max_length=self.max_tokens) if truncate else {}
        return self.tokenizer(text, **cut)["input_ids"]

    @torch.inference_mode()
    def __call__(self, inputs: list[list[int]]) -> torch.Tensor:
        """[len(inputs), dim] fp32 rows of unit length, on the CPU."""
        out = torch.empty(len(inputs), self.dim)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        pad = self.tokenizer.pad_token_id or 0
        for lo in range(0, len(order), MICRO_BATCH):
            rows = order[lo:lo + MICRO_BATCH]
            width = max(len(inputs[i]) for i in rows)
            ids = torch.tensor([inputs[i] + [pad] * (width - len(inputs[i])) for i in rows], device=self.device)
            mask = torch.tensor([[1] * len(inputs[i]) + [0] * (width - len(inputs[i])) for i in rows],
                                device=self.device)
            features = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.tokenizer.model_input_names:
                features["token_type_ids"] = torch.zeros_like(ids)
            emb = self.model(features)["sentence_embedding"].float()
            out[rows] = torch.nn.functional.normalize(emb, dim=-1).cpu()
        return out


def add_routes(app, state) -> None:
    loaded: list[TextEmbedder] = []
    lock = threading.Lock()

    def embedder() -> TextEmbedder:
        with lock:  # concurrent first requests wait for one load
            if not loaded:
                from coeserve.router.embedder import DEFAULT

                router = state.router
                spec = router.spec.embedder if router is not None else DEFAULT
                device = router.embedder.device if router is not None else torch.device("cpu")
                loaded.append(TextEmbedder(spec, device))
            return loaded[0]

    async def named(model: str) -> TextEmbedder:
        emb = await run_in_threadpool(embedder)
        if not emb.answers_to(model):
            if model in state.experts or model == VIRTUAL:
                raise ApiError(400, f"{model!r} is a generative model; embeddings come from {emb.name!r}",
                               param="model")
            raise ApiError(404, f"the model {model!r} does not exist; embeddings come from {emb.name!r}",
                           "not_found_error", "model_not_found", "model")
        return emb

    def check(emb: TextEmbedder, dimensions: int | None) -> None:
        if dimensions is not None and dimensions != emb.dim:
            raise ApiError(400, f"{emb.name} gives {emb.dim} dimensions and cannot give {dimensions}",
                           param="dimensions")

    async def embed(emb: TextEmbedder, texts: list, truncate: bool) -> tuple[torch.Tensor, int]:
        """Embeddings of texts or token-id lists, and the tokens read; a 400 names an input at fault."""
        if len(texts) > MAX_INPUTS:
            raise ApiError(400, f"at most {MAX_INPUTS} inputs per request, not {len(texts)}", param="input")
        vocab = len(emb.tokenizer)

        def prepare() -> list[list[int]]:
            ids = []
            for i, t in enumerate(texts):
                if not t:
                    raise ApiError(400, f"input {i} is empty", param="input")
                if isinstance(t, list) and max(t) >= vocab:
                    raise ApiError(400, f"token id {max(t)} is not in {emb.name}'s vocabulary of {vocab}",
                                   param="input")
                row = emb.tokens(t, truncate) if isinstance(t, str) else t
                if len(row) > emb.max_tokens:
                    raise ApiError(400, f"input {i} has {len(row)} tokens; {emb.name} reads at most "
                                   f"{emb.max_tokens}", param="input", code="context_length_exceeded")
                ids.append(row)
            return ids
        ids = await run_in_threadpool(prepare)
        vectors = await run_in_threadpool(emb, ids) if ids else torch.empty(0, emb.dim)
        if state.metrics:
            state.metrics.requests.labels(emb.name, "ok").inc()
            state.metrics.tokens.labels(emb.name, "prompt").inc(sum(map(len, ids)))
        return vectors, sum(map(len, ids))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        emb = await named(body.model)
        check(emb, body.dimensions)
        texts = [body.input] if isinstance(body.input, str) or (body.input and isinstance(body.input[0], int)) \
            else body.input
        if not texts:
            raise ApiError(400, "input is empty", param="input")
        vectors, n = await embed(emb, texts, truncate=False)
        data = [{"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": emb.name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/api/embed")
    async def api_embed(request: Request):
        start, body = time.perf_counter_ns(), await read_body(OllamaEmbed, request)
        emb = await named(body.model)
        check(emb, body.dimensions)
        texts = [body.input] if isinstance(body.input, str) and body.input else \
            [] if isinstance(body.input, str) else body.input
        vectors, n = await embed(emb, texts, body.truncate)
        return {"model": body.model, "embeddings": vectors.tolist(), "total_duration": time.perf_counter_ns() - start,
                "load_duration": 0, "prompt_eval_count": n}

    @app.post("/api/embeddings")
    async def api_embeddings(request: Request):
        body = await read_body(OllamaEmbeddings, request)
        emb = await named(body.model)
        if not body.prompt:
            return {"embedding": []}
        vectors, _ = await embed(emb, [body.prompt], truncate=True)
        return {"embedding": vectors[0].tolist()}


def _encoded(vector: torch.Tensor, fmt: str) -> list[float] | str:
    """OpenAI's float list, or base64 of the little-endian float32 bytes (the openai client's default)."""
    if fmt == "float":
        return vector.tolist()
    return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
