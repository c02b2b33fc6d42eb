"""Tiny random-weight models of every supported family, written by transformers (save_pretrained,
safetensors, fp32), imported through the store and run by our model code, against transformers' own
forward pass and greedy `generate` as the reference.

transformers' modeling code appears here as the reference only; coeserve never uses it at run time.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coeserve.config import EngineConfig  # noqa: E402
from coeserve.engine.engine import Engine, Expert  # noqa: E402
from coeserve.engine.kv_cache import KVCache  # noqa: E402
from coeserve.engine.load import bind_image  # noqa: E402
from coeserve.engine.sequence import SamplingParams  # noqa: E402
from coeserve.formats.checkpoint import ImportError_  # noqa: E402
from coeserve.formats.image import load_image, tensor_views  # noqa: E402
from coeserve.models import build_model  # noqa: E402
from coeserve.store.disk import DiskStore  # noqa: E402

MAX_LEN = 128  # longest prompt (40) + 32 generated tokens fit
N_GREEDY = 32
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, attn_implementation="eager")


def _qwen2():
    from transformers import Qwen2Config
    # Qwen2 always has q/k/v biases; tied embeddings as in Qwen2.5-0.5B.
    return Qwen2Config(**TINY, num_hidden_layers=2, vocab_size=384, tie_word_embeddings=True)


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(**TINY, num_hidden_layers=2, vocab_size=320, sliding_window=None)


def _mistral_sliding():
    from transformers import MistralConfig
    return MistralConfig(**TINY, num_hidden_layers=3, vocab_size=320, sliding_window=8)


def _gemma2():
    from transformers import Gemma2Config
    # Alternating sliding/global layers, a small window so prompts exceed it, query_pre_attn_scalar
    # different from head_dim, and caps small enough that tanh is far from linear.
    return Gemma2Config(**TINY, num_hidden_layers=4, vocab_size=448, head_dim=16, query_pre_attn_scalar=32,
                        sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=10.0)


def _gemma3():
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(**TINY, num_hidden_layers=4, vocab_size=448, head_dim=16, query_pre_attn_scalar=24,
                            sliding_window=8,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                         "full_attention"])


def _llama31():
    from transformers import LlamaConfig
    # transformers 5 spells Llama 3.1 scaling as rope_parameters with rope_type "llama3". With head_dim 16,
    # theta 5e5 and original_max_position_embeddings 64 the eight frequencies fall in all three bands
    # (kept, blended, divided by factor).
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return LlamaConfig(**TINY, num_hidden_layers=2, vocab_size=256, rope_parameters=rope)


CASES = {"qwen2-bias": _qwen2, "mistral": _mistral, "mistral-sliding8": _mistral_sliding,
         "gemma2-softcap": _gemma2, "gemma3-text": _gemma3, "llama3.1-rope": _llama31}


def _randomise(model, gemma: bool, seed: int) -> None:
    """Every parameter non-trivial: matrices N(0, 1/fan_in), biases N(0, 0.25), norm weights spread
    around 1 (Gemma stores w for a (1 + w) scale, so around 0 there)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if p.ndim == 2:
                p.copy_(r / math.sqrt(p.shape[1]))
            elif "norm" in name:
                p.copy_(r * 0.3 + (0.0 if gemma else 1.0))
            else:
                p.copy_(r * 0.5)


def _hf_source(hf_cfg, root):
    """A transformers model with non-trivial random weights, saved as an HF directory (fp32 safetensors)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    _randomise(ref, gemma=hf_cfg.model_type.startswith("gemma"), seed=1234)
    ref.generation_config.eos_token_id = None  # random weights: generate all N_GREEDY tokens
    ref.generation_config.pad_token_id = 0
    src = root / "hf"
    ref.save_pretrained(src, safe_serialization=True)
    return ref, src


def _load_ours(store: DiskStore, name: str):
    cfg = store.config(name)
    index, buf = load_image(store.path(name))
    model = build_model(cfg, max_len=MAX_LEN)
    model.bind(tensor_views(buf, index))
    return cfg, model, index, buf


def _build_case(case: str, root) -> dict:
    hf_cfg = CASES[case]()
    ref, src = _hf_source(hf_cfg, root)
    store = DiskStore(root / "home")
    store.import_source(src, case)
    cfg, model, index, buf = _load_ours(store, case)
    return dict(ref=ref, hf_cfg=hf_cfg, cfg=cfg, model=model, index=index, buf=buf, store=store, src=src)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a small CPU box, waking a second OpenMP thread for every small op costs
    far more than the op (measured: ~8 ms per softmax with 2 threads, µs with 1), so run single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, one_thread):
    return _build_case(request.param, tmp_path_factory.mktemp(request.param))


def _prompts(vocab: int, lengths=(5, 17, 40), seed: int = 7) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def our_logits(model, cfg, ids: list[int]) -> torch.Tensor:
    kv = KVCache(cfg, 1, MAX_LEN, torch.float32, "cpu")
    kv.set_step([0], len(ids))
    return model(torch.tensor([ids]), torch.arange(len(ids))[None], torch.tensor([0]), kv)[0]


@torch.inference_mode()
def our_greedy(model, cfg, ids: list[int], n: int) -> list[int]:
    """Greedy decoding through the KV cache: prefill the prompt, then one token at a time."""
    kv = KVCache(cfg, 1, MAX_LEN, torch.float32, "cpu")
    slots = torch.tensor([0])
    p = len(ids)
    kv.set_step([0], p)
    logits = model(torch.tensor([ids]), torch.arange(p)[None], slots, kv)
    out: list[int] = []
    while True:
        tok = int(logits[0].argmax())
        out.append(tok)
        if len(out) == n:
            return out
        kv.set_step([0], p + 1)
        logits = model(torch.tensor([[tok]]), torch.tensor([[p]]), slots, kv)
        p += 1


@torch.inference_mode()
def ref_greedy(ref, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    # An explicit mask: without it generate masks out every prompt token equal to pad_token_id.
    out = ref.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n)
    got = out[0, len(ids):].tolist()
    assert len(got) == n
    return got


def test_config_read_as_intended(case):
    """The import understood the features each case is meant to exercise."""
    cfg, hf = case["cfg"], case["hf_cfg"]
    mt = hf.model_type
    assert cfg.num_layers == hf.num_hidden_layers and cfg.head_dim == 16
    if mt == "qwen2":
        assert cfg.attention_bias and cfg.tie_word_embeddings
        assert not any(cfg.is_sliding(i) for i in range(cfg.num_layers))
    if mt == "mistral":
        if hf.sliding_window:
            assert cfg.sliding_window == 8 and all(cfg.is_sliding(i) for i in range(cfg.num_layers))
        else:
            assert cfg.sliding_window is None and not any(cfg.is_sliding(i) for i in range(cfg.num_layers))
    if mt == "gemma2":
        assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
        assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (5.0, 10.0)
        assert cfg.query_pre_attn_scalar == 32 and cfg.sliding_window == 8
    if mt == "gemma3_text":
        assert cfg.arch == "gemma3" and cfg.layer_types == tuple(hf.layer_types)
        assert cfg.rope_local_theta == 10000.0 and cfg.rope_theta == 1e6
    if mt == "llama":
        assert cfg.rope_scaling and cfg.rope_scaling["factor"] == 8.0
        assert cfg.rope_theta == 500000.0


def test_next_token_logits_match_transformers(case):
    ref, model, cfg = case["ref"], case["model"], case["cfg"]
    for ids in _prompts(cfg.vocab_size):
        with torch.inference_mode():
            want = ref(torch.tensor([ids])).logits[0, -1]
        got = our_logits(model, cfg, ids)
        assert got.shape == want.shape
        err = (got - want).abs().max().item()
        assert err < 1e-3, f"prompt length {len(ids)}: max abs logit error {err:.2e}"


@pytest.mark.parametrize("case", ["mistral-sliding8", "gemma2-softcap", "gemma3-text"], indirect=True)
def test_sliding_window_is_exercised(case):
    """Where a case has a sliding window, a prompt longer than it gives different logits with the window
    switched off, and transformers agrees with the windowed ones: both sides honour the window."""
    ref, model, cfg = case["ref"], case["model"], case["cfg"]
    assert any(cfg.is_sliding(i) for i in range(cfg.num_layers))
    [ids] = _prompts(cfg.vocab_size, lengths=(40,), seed=5)
    assert len(ids) > cfg.sliding_window
    unwindowed = build_model(dataclasses.replace(cfg, sliding_window=None), max_len=MAX_LEN)
    unwindowed.bind(tensor_views(case["buf"], case["index"]))
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0, -1]
    assert (our_logits(model, cfg, ids) - want).abs().max().item() < 1e-3
    assert (our_logits(unwindowed, cfg, ids) - want).abs().max().item() > 1e-2


def _v4_spelling(hf: dict) -> dict:
    """The same config as transformers 4 wrote it (and as most checkpoints on the Hub still have it):
    top-level rope_theta and rope_scaling, Gemma 3's rope_local_base_freq and sliding_window_pattern."""
    hf = dict(hf)
    rope = hf.pop("rope_parameters")
    if "full_attention" in rope:
        hf["rope_theta"] = rope["full_attention"]["rope_theta"]
        hf["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        assert hf.pop("layer_types") == ["sliding_attention", "full_attention"] * 2
        hf["sliding_window_pattern"] = 2
    else:
        hf["rope_theta"] = rope.pop("rope_theta")
        hf["rope_scaling"] = rope
    return hf


@pytest.mark.parametrize("case", ["llama3.1-rope", "gemma3-text"], indirect=True)
def test_transformers_v4_config_spelling(case, tmp_path):
    src = tmp_path / "v4"
    shutil.copytree(case["src"], src)
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(_v4_spelling(hf)))
    store = case["store"]
    store.import_source(src, "v4")
    cfg, model, _, _ = _load_ours(store, "v4")
    want = case["cfg"]
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.layer_types) == \
        (want.rope_theta, want.rope_local_theta, want.layer_types)
    assert (cfg.rope_scaling is None) == (want.rope_scaling is None)
    for ids in _prompts(cfg.vocab_size, lengths=(40,), seed=9):
        with torch.inference_mode():
            ref = case["ref"](torch.tensor([ids])).logits[0, -1]
        assert (our_logits(model, cfg, ids) - ref).abs().max().item() < 1e-3


def _gemma3_rope(full: dict):
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(**TINY, num_hidden_layers=2, vocab_size=256, head_dim=16, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"],
                            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                             "full_attention": {"rope_theta": 1e6, **full}})


def _llama_rope(rope: dict):
    from transformers import LlamaConfig
    return LlamaConfig(**TINY, num_hidden_layers=2, vocab_size=256, rope_parameters={"rope_theta": 1e4, **rope})


OTHER_ROPE = {
    # Gemma 3 4B/12B/27B: linear scaling (factor 8) on the global layers only.
    "gemma3-linear": lambda: _gemma3_rope({"rope_type": "linear", "factor": 8.0}),
    "llama-linear": lambda: _llama_rope({"rope_type": "linear", "factor": 4.0}),
    "llama-yarn": lambda: _llama_rope({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
    "llama-dynamic": lambda: _llama_rope({"rope_type": "dynamic", "factor": 4.0}),
}


@pytest.mark.parametrize("spelling", ["v5", "v4"])
@pytest.mark.parametrize("which", list(OTHER_ROPE))
def test_other_rope_scalings_refused_or_correct(which, spelling, tmp_path):
    """A rope scaling we may not implement is either refused at import, with an error naming the source
    and the scaling type, or implemented: never silently dropped (which gives wrong logits)."""
    hf_cfg = OTHER_ROPE[which]()
    ref, src = _hf_source(hf_cfg, tmp_path)
    if spelling == "v4":
        hf = json.loads((src / "config.json").read_text())
        rope = hf.pop("rope_parameters")
        if "full_attention" in rope:
            hf["rope_theta"] = rope["full_attention"].pop("rope_theta")
            hf["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
            hf["rope_scaling"] = rope["full_attention"]
        else:
            hf["rope_theta"] = rope.pop("rope_theta")
            hf["rope_scaling"] = rope
        (src / "config.json").write_text(json.dumps(hf))
    kind = which.split("-")[1]
    store = DiskStore(tmp_path / "home")
    try:
        store.import_source(src, "m")
    except ImportError_ as e:
        assert str(src) in str(e) and kind in str(e), f"unclear error: {e}"
        assert store.names() == []
        return
    cfg, model, _, _ = _load_ours(store, "m")
    for ids in _prompts(cfg.vocab_size, lengths=(40,), seed=13):
        with torch.inference_mode():
            want = ref(torch.tensor([ids])).logits[0, -1]
        err = (our_logits(model, cfg, ids) - want).abs().max().item()
        assert err < 1e-3, f"{kind} rope scaling imported but not applied: max abs logit error {err:.3f}"


def test_greedy_tokens_identical_to_generate(case):
    ref, model, cfg = case["ref"], case["model"], case["cfg"]
    for ids in _prompts(cfg.vocab_size, lengths=(11, 23), seed=11):
        want = ref_greedy(ref, ids, N_GREEDY)
        assert our_greedy(model, cfg, ids, N_GREEDY) == want, f"prompt length {len(ids)}"


def test_engine_batched_greedy_matches_generate(case):
    """The same through the engine: two sequences decoded together in one batch, prefilled in chunks."""
    ref, model, cfg = case["ref"], case["model"], case["cfg"]
    prompts = _prompts(cfg.vocab_size, lengths=(9, 30), seed=3)
    expert = Expert("t", cfg, model, None, torch.device("cpu"), torch.float32)
    eng = Engine(expert, EngineConfig(max_batch=2, max_seq_len=MAX_LEN, prefill_chunk=16))
    seqs = eng.generate(prompts, SamplingParams(max_tokens=N_GREEDY, temperature=0, ignore_eos=True))
    for ids, seq in zip(prompts, seqs):
        assert seq.output_ids == ref_greedy(ref, ids, N_GREEDY), f"prompt length {len(ids)}"


def _inside(t: torch.Tensor, buf: torch.Tensor) -> bool:
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    end = t.data_ptr() + t.numel() * t.element_size()
    return (t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            and lo <= t.data_ptr() and end <= hi)


def test_bound_parameters_are_views_of_the_image(case):
    model, buf, index, cfg = case["model"], case["buf"], case["index"], case["cfg"]
    assert set(model.w) == set(model.param_names())
    for name, t in model.w.items():
        assert _inside(t, buf), name
    # The load path (bind_image) keeps views too when the run dtype is the image's dtype.
    m2 = build_model(cfg, max_len=MAX_LEN)
    bind_image(m2, buf, index, torch.float32)
    for name, t in m2.w.items():
        assert _inside(t, buf), name
        assert t.data_ptr() == model.w[name].data_ptr(), name
