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
