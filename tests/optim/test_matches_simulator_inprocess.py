"""Distributed optimizers (n ranks as threads, in-process transport) == the reference simulator."""

import pytest
import torch

from deepspeed_cdadam import InProcessWorld
from tests.harness import CASES, NO_GRAD, initial_groups, max_abs_diff, run_optimizer, run_reference

STEPS = 22


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_simulator(case, world_size):
    out = InProcessWorld(world_size).run(lambda r, tr: run_optimizer(case, r, tr, STEPS))
    expected = run_reference(case, world_size, STEPS)
    for rank in range(world_size):
        assert max_abs_diff(out[rank][0], expected) <= 1e-12, f"rank {rank}"
    # parameters moved, including the one without a gradient (its coordinates still get gtil)
    assert not torch.equal(out[0][0][-1][0], initial_groups(torch.float64)[0])
    assert not torch.equal(out[0][0][-1][NO_GRAD[0]], initial_groups(torch.float64)[NO_GRAD[0]])


@pytest.mark.parametrize("block_size", [1, 4, 5])
def test_block_layout_matches_simulator(block_size):
    out = InProcessWorld(3).run(lambda r, tr: run_optimizer("cdadam", r, tr, 10, block_size=block_size))
    expected = run_reference("cdadam", 3, 10, block_size=block_size)
    assert max_abs_diff(out[1][0], expected) <= 1e-12
    other = run_reference("cdadam", 3, 10, block_size=None)
    assert max_abs_diff(out[1][0], other) > 1e-6  # the layout really changes the result


def test_float32_matches_simulator():
    out = InProcessWorld(2).run(lambda r, tr: run_optimizer("cdadam", r, tr, STEPS, dtype=torch.float32))
    expected = run_reference("cdadam", 2, STEPS, dtype=torch.float32)
    assert max_abs_diff(out[0][0], expected) <= 1e-5


@pytest.mark.parametrize("block_size", [None, 2, 5])
@pytest.mark.parametrize("world_size", [2, 3])
def test_tensor_blocks_with_sub_blocks_match_simulator(block_size, world_size):
    """scale_blocks="tensor" / "tensor_padded" with each tensor chunk cut into blocks of block_size."""
    for case in ("cdadam_tensor_blocks", "onebit_tensor_padded"):
        out = InProcessWorld(world_size).run(lambda r, tr: run_optimizer(case, r, tr, 10, block_size=block_size))
        expected = run_reference(case, world_size, 10, block_size=block_size)
        assert max_abs_diff(out[0][0], expected) <= 1e-12, case
        fixed = run_reference(case.replace("_tensor_blocks", "").replace("_tensor_padded", ""), world_size, 10)
        assert max_abs_diff(out[0][0], fixed) > 1e-9, case  # the tensor layout really changes the result
