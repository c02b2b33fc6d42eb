"""Our CPU kernel for decode-step matmuls gives torch's values, on every shape the models use and on
ragged ones (fan-in not a multiple of the vector width, an odd number of output rows)."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from coeserve import kernels
from coeserve.models.common import SMALL_ROWS, linear


@pytest.fixture(scope="module")
def small():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: torch's matmuls do the work")
    op = kernels.build()
    assert op is not None, "the kernels did not build (see the log)"
    return op


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("n, k", [(960, 576), (576, 1536), (2048, 640), (1001, 64), (7, 37), (101, 16), (5, 3)])
def test_small_linear_matches_torch(small, rows, n, k):
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
    want = F.linear(x.double(), w.double()).float()
    got = small(x, w)
    assert got.shape == (rows, n)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4 * k ** 0.5)


def test_models_linear_takes_it_for_decode_steps(small):
    """linear() on 1..SMALL_ROWS rows (with a bias, on a [B, 1, in] decode activation) is the kernel's
    result, bit for bit; beyond that it is torch's, to rounding."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(300, 64, generator=gen), torch.randn(300, generator=gen)
    for rows in (1, 2, 4, SMALL_ROWS, SMALL_ROWS + 1):
        x = torch.randn(rows, 1, 64, generator=gen)
        y = linear(x, w, b)
        assert y.shape == (rows, 1, 300)
        if rows <= SMALL_ROWS:
            assert torch.equal(y, (small(x.reshape(rows, 64), w) + b).view(rows, 1, 300))
        assert torch.allclose(y, F.linear(x, w, b), atol=1e-4)


def test_bad_input_is_refused(small):
    with pytest.raises(RuntimeError, match="x \\[M, K\\], w \\[N, K\\]"):
        small(torch.randn(2, 8), torch.randn(3, 9))
    with pytest.raises(RuntimeError, match="fp32"):
        small(torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous"):
        small(torch.randn(8, 2).t(), torch.randn(3, 8))


@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count_covers_every_row(small, threads):
    """Each thread reads its range of rows as streams (12 for one row of x, 6 for more) and the rest one
    by one: with 1 or 3 threads the ranges split differently, and every output is still written with
    its own row's value."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        for rows in (1, 2, 5):
            for n in (1, 4, 11, 12, 13, 63, 130, 1001):
                x, w = torch.randn(rows, 48, generator=gen), torch.randn(n, 48, generator=gen)
                want = F.linear(x.double(), w.double()).float()
                assert torch.allclose(small(x, w), want, rtol=1e-5, atol=1e-4), (rows, n)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def attention(small):
    return kernels.decode_attention()


@pytest.mark.parametrize("window, softcap", [(0, 0.0), (8, 0.0), (0, 30.0), (5, 20.0)])
def test_decode_attention_matches_reference(attention, window, softcap):
    """Each row's query over its own slot's keys 0..p (the last `window` of them when set), GQA heads
    sharing a kv head, soft-capped scores when asked: the values of the plain formula, in float64."""
    gen = torch.Generator().manual_seed(window * 100 + int(softcap))
    slots_n, hkv, max_len, d, h = 5, 3, 300, 64, 9
    kc, vc = torch.randn(slots_n, hkv, max_len, d, generator=gen), torch.randn(slots_n, hkv, max_len, d, generator=gen)
    q = torch.randn(4, h, d, generator=gen)
    slots, positions = torch.tensor([4, 0, 2, 1]), torch.tensor([17, 0, 299, 6])  # not a range of slots
    got = attention(q, kc, vc, slots, positions, window, 0.125, softcap)
    assert got.shape == (4, h * d)
    for b in range(4):
        p = int(positions[b])
        lo = max(0, p - window + 1) if window else 0
        k = kc[slots[b], :, lo:p + 1].double().repeat_interleave(h // hkv, 0)
        v = vc[slots[b], :, lo:p + 1].double().repeat_interleave(h // hkv, 0)
        s = (q[b].double()[:, None] @ k.transpose(-1, -2))[:, 0] * 0.125
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        want = (torch.softmax(s, -1)[:, None] @ v)[:, 0].reshape(-1).float()
        assert torch.allclose(got[b], want, atol=1e-5), (b, (got[b] - want).abs().max())


def test_decode_attention_refuses_bad_input(attention):
    kc = torch.zeros(2, 1, 8, 16)
    q, one = torch.zeros(1, 2, 16), torch.tensor([0])
    with pytest.raises(RuntimeError, match="out of the cache"):
        attention(q, kc, kc, torch.tensor([2]), one, 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="out of the cache"):
        attention(q, kc, kc, one, torch.tensor([8]), 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="H a multiple of Hkv"):
        attention(torch.zeros(1, 2, 8), kc, kc, one, one, 0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="fp32"):
        attention(q.double(), kc.double(), kc.double(), one, one, 0, 1.0, 0.0)


@pytest.fixture(scope="module")
def norm(small):
    return kernels.rms_norm()


@pytest.mark.parametrize("shape", [(1, 576), (3, 1, 576), (517, 640), (2, 4, 256), (5, 37), (1, 16), (2, 0)])
def test_rms_norm_matches_torch(norm, shape):
    """Rows of any length (a multiple of the vector width or not), any leading shape, against the
    formula in float64."""
    gen = torch.Generator().manual_seed(shape[-1])
    x, w = torch.randn(*shape, generator=gen) * 3, torch.randn(shape[-1], generator=gen)
    got = norm(x, w, 1e-5)
    xd = x.double()
    want = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()).float()
    assert got.shape == x.shape
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_models_rms_norm_takes_it_eagerly(norm):
    """models.common.rms_norm is the kernel's result on contiguous fp32 CPU rows and torch's on a strided
    view (Gemma's q/k norms over heads sliced out of the fused qkv), to rounding either way."""
    from coeserve.models.common import rms_norm

    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 1, 64, generator=gen), torch.randn(64, generator=gen)
    assert torch.equal(rms_norm(x, w, 1e-6), norm(x, w, 1e-6))
    strided = torch.randn(2, 1, 96, generator=gen)[..., :64]
    assert torch.allclose(rms_norm(strided, w, 1e-6), F.rms_norm(strided, (64,), w, 1e-6), atol=1e-6)


def test_rms_norm_refuses_bad_input(norm):
    with pytest.raises(RuntimeError, match="x \\[..., D\\], w \\[D\\]"):
        norm(torch.randn(2, 8), torch.randn(9), 1e-6)
    with pytest.raises(RuntimeError, match="fp32"):
        norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match="contiguous"):
        norm(torch.randn(8, 2).t(), torch.randn(8), 1e-6)


@pytest.fixture(scope="module")
def rope(small):
    return kernels.rope()


@pytest.mark.parametrize("B, T, H, D", [(1, 1, 9, 64), (3, 1, 3, 64), (1, 7, 4, 256), (2, 5, 2, 6)])
def test_rope_matches_torch(rope, B, T, H, D):
    """On q sliced out of a fused qkv row (strided) and on a contiguous k, against the torch formula
    models.common uses elsewhere, and models.common.apply_rope takes it."""
    from coeserve.models.common import apply_rope, rope_factors, rope_table

    gen = torch.Generator().manual_seed(B * 100 + T * 10 + H)
    table = rope_table(D, 10000.0, None, 64)
    cos, sin = rope_factors(table[torch.randint(0, 64, (B, T), generator=gen)])
    qkv = torch.randn(B, T, 3 * H * D, generator=gen)
    for x in (qkv[..., : H * D].view(B, T, H, D), torch.randn(B, T, H, D, generator=gen)):
        half = D // 2
        want = x.double() * cos.double() + torch.cat([x[..., half:], x[..., :half]], -1).double() * sin.double()
        got = rope(x, cos.contiguous(), sin.contiguous())
        assert got.shape == (B, T, H, D) and got.is_contiguous()
        assert torch.allclose(got, want.float(), rtol=1e-5, atol=1e-6)
        assert torch.equal(apply_rope(x, (cos, sin)), got)


def test_rope_refuses_bad_input(rope):
    cos = torch.randn(1, 2, 1, 8)
    with pytest.raises(RuntimeError, match="x \\[B, T, H, D\\] with D even"):
        rope(torch.randn(1, 3, 2, 8), cos, cos)
    with pytest.raises(RuntimeError, match="fp32"):
        rope(torch.randn(1, 2, 2, 8, dtype=torch.float64), cos.double(), cos.double())
    with pytest.raises(RuntimeError, match="contiguous"):
        rope(torch.randn(1, 2, 8, 2).transpose(-1, -2), cos, cos)
