import re

import pytest
import torch

from deepspeed_cdadam.compressors import RandK, TopK, get_compressor


def test_topk_keeps_the_k_largest_magnitudes():
    x = torch.tensor([0.1, -5.0, 0.3, 4.0, -0.2, 0.0, 3.0, -1.0])
    out = TopK(0.3)(x)  # k = ceil(2.4) = 3
    assert out.tolist() == [0.0, -5.0, 0.0, 4.0, 0.0, 0.0, 3.0, 0.0]


@pytest.mark.parametrize("cls", [TopK, RandK])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_wire_round_trip(cls, dtype):
    x = torch.randn(53, generator=torch.Generator().manual_seed(0), dtype=dtype)
    comp = cls(0.1)
    wire = comp.to_wire(comp.compress(x, (53,), seed=7), 60, 1, dtype)
    assert wire.numel() == comp.wire_nbytes(60, 1, dtype)
    got = comp.decompress(comp.from_wire(wire, 53, (53,), 60, dtype), dtype=dtype, seed=7)
    assert torch.equal(got, comp(x, seed=7))
    assert int((got != 0).sum()) == comp.k(53) == 6


def test_randk_is_shared_across_ranks_and_leaves_global_rng_alone():
    x = torch.randn(100)
    state = torch.get_rng_state()
    a, b = RandK(0.05)(x, seed=3), RandK(0.05)(x, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, RandK(0.05)(x, seed=4))


def test_randk_unbiased_up_to_k_over_d():
    x = torch.arange(1.0, 21.0, dtype=torch.float64)
    comp = RandK(0.25)  # k = 5 of d = 20
    mean = sum(comp(x, seed=s) for s in range(4000)) / 4000
    torch.testing.assert_close(mean, x * 5 / 20, rtol=0.1, atol=0.0)


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, "0.1", True])
def test_ratio_validated(ratio):
    with pytest.raises(ValueError, match=re.escape(f"Invalid TopK ratio={ratio!r}. Must be a number in (0.0, 1.0].")):
        TopK(ratio)


def test_unknown_compressor_has_hint():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Unknown compressor='scaled_sgn'. Allowed: scaled_sign, sign_l2, topk, randk. Did you mean 'scaled_sign'?"
        ),
    ):
        get_compressor("scaled_sgn")
