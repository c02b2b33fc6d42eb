"""Our model code on the real built-in experts against transformers reading the same GGUF files."""
from __future__ import annotations

import pytest
import torch

from coeserve.engine.kv_cache import KVCache
from tests.conftest import GEMMA, SMOL

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at a temperature of"]


def our_logits(expert, ids: list[int]) -> torch.Tensor:
    kv = KVCache(expert.cfg, 1, 256, torch.float32, "cpu")
    kv.set_step([0], len(ids))
    with torch.inference_mode():
        return expert.model(torch.tensor([ids]), torch.arange(len(ids))[None], torch.tensor([0]), kv)[0]


def our_greedy(expert, ids: list[int], n: int) -> list[int]:
    from coeserve.config import EngineConfig
    from coeserve.engine.engine import Engine
    from coeserve.engine.sequence import SamplingParams

    eng = Engine(expert, EngineConfig(max_batch=1, max_seq_len=256))
    [seq] = eng.generate([ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return seq.output_ids


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_logits_match_transformers(name, request, reference):
    expert = request.getfixturevalue("smol" if name == SMOL else "gemma")
    model, tok = reference(name)
    for p in PROMPTS:
        ids = tok(p).input_ids
        with torch.inference_mode():
            ref = model(torch.tensor([ids])).logits[0, -1]
        ours = our_logits(expert, ids)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-3, p


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_32_greedy_tokens_identical(name, request, reference):
    expert = request.getfixturevalue("smol" if name == SMOL else "gemma")
    model, tok = reference(name)
    ids = tok("Once upon a time, in a small village by the sea, there lived").input_ids
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert len(ref) == 32  # the prompt was chosen so that neither side stops early
    assert our_greedy(expert, ids, 32) == ref


def test_tokenizer_matches_transformers_gguf_tokenizer(smol, reference):
    _, tok = reference(SMOL)
    text = "Hello, world! Ünïcode and code: x = [i**2 for i in range(10)]"
    assert smol.codec.encode(text) == tok(text).input_ids


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_prompt_logprobs_match_transformers(name, request, reference):
    """A prompt's logprobs (SamplingParams.prompt_logprobs), prefilled in chunks of 5 next to another
    sequence's decode rows: each prompt token's logprob and its top 3 are transformers' log-softmax at
    the position before it, within 1e-3; none for the first token. The prompt comes in whole although
    a free slot holds its start (the prefix cache is not read for it)."""
    from coeserve.config import EngineConfig
    from coeserve.engine.engine import Engine
    from coeserve.engine.sequence import SamplingParams

    expert = request.getfixturevalue("smol" if name == SMOL else "gemma")
    model, tok = reference(name)
    ids = tok("The capital of France is Paris, and the capital of Italy is Rome.").input_ids
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    eng = Engine(expert, EngineConfig(max_batch=2, max_seq_len=256, prefill_chunk=5))
    eng.generate([ids[:12]], SamplingParams(max_tokens=2, temperature=0))  # leaves its start in a free slot
    other = eng.add(eng.make_sequence(ids[:3], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)))
    eng.step()  # the other decodes while the prompt below prefills
    seq = eng.add(eng.make_sequence(ids, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)))
    eng.run_until_done()
    assert other.finish_reason == "length" and seq.cached == 0
    assert [x.token for x in seq.prompt_logprobs] == ids[1:]
    for p, x in enumerate(seq.prompt_logprobs):
        assert abs(x.logprob - ref[p, ids[p + 1]].item()) < 1e-3, p
        top_v, top_i = ref[p].topk(3)
        assert {i for i, _ in x.top} == set(top_i.tolist()), p
        assert max(abs(v - w) for (_, v), w in zip(x.top, top_v.tolist())) < 1e-3, p  # best first
