import pytest
import torch

from deepspeed_cdadam.compressors.packing import pack_signs, packed_nbytes, unpack_signs


@pytest.mark.parametrize("numel", list(range(35)) + [63, 64, 65, 1000, 1001])
def test_pack_unpack_round_trip_every_length(numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel) == (numel + 7) // 8
    expected = torch.where(x >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(packed, numel), expected)


def test_bit_layout_is_lsb_first_and_zero_counts_as_positive():
    x = torch.tensor([0.0, -1.0, -2.0, 3.0, -0.0, -5.0, -6.0, -7.0, 1.0])
    packed = pack_signs(x)
    # bits: e0=1 (0 >= 0), e3=1, e4=1 (-0.0 >= 0) -> 1 + 8 + 16 = 25; second byte holds e8=1
    assert packed.tolist() == [25, 1]


def test_padding_never_leaks():
    x = -torch.ones(5)
    out = unpack_signs(pack_signs(x), 5, torch.float64)
    assert out.dtype == torch.float64 and out.tolist() == [-1.0] * 5


def test_unpack_rejects_too_few_bytes():
    with pytest.raises(ValueError, match="2 bytes hold at most 16 signs, asked for 17"):
        unpack_signs(torch.zeros(2, dtype=torch.uint8), 17)


@pytest.mark.parametrize("numel", [0, 7, 8, 9, 4096 + 3, 50_001])
def test_chunked_packing_and_unpacking_equal_one_pass(numel, monkeypatch):
    """``pack_signs`` / ``unpack_signs_into`` work a chunk at a time (``packing.chunks``): with small
    chunks (many pieces, byte-aligned starts, a ragged last one) the bytes and values are those of one pass."""
    from deepspeed_cdadam.compressors import packing

    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    whole = pack_signs(x)
    monkeypatch.setattr(packing, "MIN_CHUNK", 8)
    monkeypatch.setattr(packing, "MAX_CHUNKS", 7)
    pieces = packing.chunks(numel)
    assert all(a % 8 == 0 for a, _ in pieces) and sum(b - a for a, b in pieces) == numel
    assert len(pieces) == (0 if numel == 0 else min(7, -(-numel // 8)))
    assert torch.equal(pack_signs(x), whole)
    table = packing.sign_table(torch.float64, "cpu") * 0.25
    out = torch.full((numel,), 3.0, dtype=torch.float64)
    packing.unpack_signs_into(whole, out, table, add=True)
    assert torch.equal(out, 3.0 + 0.25 * torch.where(x >= 0, 1.0, -1.0).double())
    packing.unpack_signs_into(whole, out, table)
    assert torch.equal(out, 0.25 * torch.where(x >= 0, 1.0, -1.0).double())
