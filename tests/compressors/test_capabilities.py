"""Every compressor's declared capabilities match what it does (exchanges choose collectives from them)."""

import pytest
import torch

from deepspeed_cdadam.compressors import get_compressor
from deepspeed_cdadam.compressors.base import PAYLOAD_SIZES, RANDOMNESS
from deepspeed_cdadam.compressors.registry import COMPRESSOR_NAMES

BLOCKS = (40, 24)


def _vectors(n=3):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(sum(BLOCKS), generator=gen, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("name", COMPRESSOR_NAMES)
def test_declared_values_are_known(name):
    comp = get_compressor(name)
    assert comp.randomness in RANDOMNESS and comp.payload_size in PAYLOAD_SIZES and isinstance(comp.linear, bool)


@pytest.mark.parametrize("name", COMPRESSOR_NAMES)
def test_randomness_is_what_is_declared(name):
    comp = get_compressor(name)
    x = _vectors(1)[0]
    same = torch.equal(comp(x, BLOCKS, seed=1), comp(x, BLOCKS, seed=1))
    other_seed = torch.equal(comp(x, BLOCKS, seed=1), comp(x, BLOCKS, seed=2))
    if comp.randomness == "none":
        assert same and other_seed
    elif comp.randomness == "shared":
        assert same and not other_seed  # a receiver replays the sender's draw from the seed alone


@pytest.mark.parametrize("name", COMPRESSOR_NAMES)
def test_fixed_payloads_have_one_wire_size(name):
    comp = get_compressor(name)
    if comp.payload_size != "fixed":
        pytest.skip("variable-size payloads carry a header")
    capacity = sum(BLOCKS) + 5
    sizes = {
        comp.to_wire(comp.compress(x, BLOCKS, seed=3), capacity, len(BLOCKS), x.dtype).numel() for x in _vectors()
    }
    assert sizes == {comp.wire_nbytes(capacity, len(BLOCKS), torch.float64)}


@pytest.mark.parametrize("name", COMPRESSOR_NAMES)
def test_linearity_is_what_is_declared(name):
    comp = get_compressor(name)
    xs = _vectors()
    payloads = [comp.compress(x, BLOCKS, seed=7) for x in xs]
    summed = payloads[0]._replace(payload=sum(p.payload.to(torch.float64) for p in payloads))
    try:
        in_compressed_space = comp.decompress(summed, dtype=torch.float64, seed=7)
        adds_up = torch.allclose(in_compressed_space, sum(comp(x, BLOCKS, seed=7) for x in xs))
    except (RuntimeError, TypeError, ValueError):
        adds_up = False
    assert adds_up == comp.linear
