"""The same optimizers on CUDA tensors (packing, wire format, rand-k) equal the CPU simulator."""

import pytest
import torch

from deepspeed_cdadam import InProcessWorld
from tests.harness import max_abs_diff, run_optimizer, run_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("case", ["cdadam", "onebit", "cdadam_randk", "cdadam_topk"])
def test_cuda_matches_cpu_simulator(case):
    out = InProcessWorld(3, device="cuda").run(lambda r, tr: run_optimizer(case, r, tr, 15, device="cuda"))
    expected = run_reference(case, 3, 15)
    assert max_abs_diff(out[0][0], expected) <= 1e-10
