"""Our CPU kernel for decode-batch matmuls gives torch's values, on every shape the models use and on
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


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("n, k", [(960, 576), (576, 1536), (2048, 640), (7, 37), (101, 16), (5, 3)])
def test_small_linear_matches_torch(small, rows, n, k):
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
    want = F.linear(x.double(), w.double()).float()
    got = small(x, w)
    assert got.shape == (rows, n)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4 * k ** 0.5)


def test_models_linear_takes_it_for_decode_batches(small):
    """linear() on 4..SMALL_ROWS rows (with a bias, on a [B, 1, in] decode activation) is the kernel's
    result, bit for bit; beyond that it is torch's, to rounding."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(300, 64, generator=gen), torch.randn(300, generator=gen)
    for rows in (4, SMALL_ROWS, SMALL_ROWS + 1):
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
