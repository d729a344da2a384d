import pytest
import torch

from deepspeed_cdadam.compressors import ScaledSignL1, ScaledSignL2, scaled_sign_l1, scaled_sign_l2

BLOCKS = [(37,), (10, 0, 27), (8, 8, 8, 8, 5), (1,) * 37]


def _x(seed=0, numel=37, dtype=torch.float64):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x[3] = 0.0
    return x


@pytest.mark.parametrize("blocks", BLOCKS)
def test_l1_scale_keeps_block_l1_norm(blocks):
    x = _x()
    c = scaled_sign_l1(x, blocks)
    for part_x, part_c in zip(x.split(blocks), c.split(blocks)):
        torch.testing.assert_close(part_c.abs().sum(), part_x.abs().sum(), rtol=1e-12, atol=1e-12)
        if part_x.numel():
            # one magnitude per block: ||x_B||_1 / d_B
            assert torch.allclose(part_c.abs(), part_x.abs().mean().expand(part_x.numel()))


@pytest.mark.parametrize("blocks", BLOCKS)
def test_l2_scale_keeps_block_l2_norm(blocks):
    x = _x(1)
    c = scaled_sign_l2(x, blocks)
    for part_x, part_c in zip(x.split(blocks), c.split(blocks)):
        torch.testing.assert_close(part_c.norm(), part_x.norm(), rtol=1e-12, atol=1e-12)


def test_sign_of_zero_is_plus_one():
    x = torch.tensor([0.0, 2.0, -4.0])
    assert scaled_sign_l1(x).tolist() == [2.0, 2.0, -2.0]


@pytest.mark.parametrize("cls,plain", [(ScaledSignL1, scaled_sign_l1), (ScaledSignL2, scaled_sign_l2)])
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wire_round_trip_equals_plain_formula(cls, plain, blocks, dtype):
    x = _x(2, dtype=dtype)
    comp = cls()
    capacity, num_blocks = 45, max(len(blocks), 6)  # room for a longer shard: padding must not leak
    wire = comp.to_wire(comp.compress(x, blocks), capacity, num_blocks, dtype)
    assert wire.dtype == torch.uint8 and wire.numel() == comp.wire_nbytes(capacity, num_blocks, dtype)
    got = comp.decompress(comp.from_wire(wire, x.numel(), blocks, capacity, dtype), dtype=dtype)
    assert torch.equal(got, plain(x, blocks))
    assert torch.equal(comp(x, blocks), plain(x, blocks))


def test_payload_bits_is_one_bit_per_coordinate_plus_scales():
    assert ScaledSignL1().payload_bits((10, 0, 27)) == 37 + 3 * 32
    assert ScaledSignL1().wire_nbytes(37, 3, torch.float32) == 5 + 12


def test_contraction_property():
    x = _x(3, numel=1000)
    for comp in (scaled_sign_l1, scaled_sign_l2):
        err = (comp(x) - x).norm() ** 2
        assert err < x.norm() ** 2


def test_bad_blocks_rejected():
    with pytest.raises(ValueError, match=r"Invalid block_sizes=\(3, 3\): must be >= 0 and sum to len\(x\)=7\."):
        scaled_sign_l1(torch.ones(7), (3, 3))


@pytest.mark.parametrize("cls", [ScaledSignL1, ScaledSignL2])
@pytest.mark.parametrize("blocks", BLOCKS + [(3000, 0, 17, 5000, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_decompress_into_writes_and_adds_the_bits_of_decompress(cls, blocks, dtype, monkeypatch):
    """In place and a chunk at a time (small chunks here: blocks cut across chunk boundaries), the
    values are decompress()'s bit for bit, written or added; block scales summed a group of blocks at a
    time equal one pass over the vector."""
    from deepspeed_cdadam.compressors import packing

    n = sum(blocks)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    comp = cls()
    c = comp.compress(x, blocks)
    dense = comp.decompress(c, dtype=dtype)
    monkeypatch.setattr(packing, "MIN_CHUNK", 40)  # scales by groups of blocks, decoding in pieces of 40 coordinates
    assert torch.equal(comp.compress(x, blocks).scale, c.scale)
    out = torch.full((n,), 7.0, dtype=dtype)
    comp.decompress_into(c, out)
    assert torch.equal(out, dense)
    base = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = base.clone()
    comp.decompress_into(c, out, add=True)
    assert torch.equal(out, base + dense)
