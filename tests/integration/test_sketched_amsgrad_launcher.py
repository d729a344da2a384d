"""`deepspeed --num_gpus 2 ...` on CPU: JSON "SketchedAMSGrad" through an unmodified deepspeed.initialize,
with a checkpoint saved at step 5 and loaded into an engine started from other weights.

One launch (ds_train.py, 8 steps on 2 gloo ranks): the engine's all-reduce stays off; the engine's
parameters equal a replay of the recorded gradients through our optimizer outside DeepSpeed bit for
bit, and the plain reference; the resumed run (each rank's momentum and error from its per-rank file)
ends where the uninterrupted one does, bit for bit; the bytes are exact.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from deepspeed_cdadam import SketchedAMSGrad  # noqa: E402
from deepspeed_cdadam.comm.accounting import all_reduce_bytes_sent  # noqa: E402
from deepspeed_cdadam.references.sketched_amsgrad import SketchedAMSGradReference  # noqa: E402
from tests.integration.test_deepspeed_launcher import STEPS, launch, replay  # noqa: E402

#: The second round on: both of the exchange's sums cross gloo inside the engine.
PARAMS = {
    "lr": 0.01,
    "betas": [0.9, 0.99],
    "weight_decay": 0.01,
    "k": 40,
    "sketch_rows": 5,
    "sketch_columns": 160,
    "candidate_factor": 2,
    "seed": 3,
}


def expected_bytes_sent(steps: int) -> int:
    """2 ranks, fp32: the reduce-scatter + all-gather of the 5 x 160 table (400 values each way), of the
    2 k = 80 candidates' values (40 each way), and the 2 control flags, per step."""
    return steps * ((400 + 400 + 40 + 40) * 4 + all_reduce_bytes_sent(8, 2))


def test_sketched_amsgrad_from_json_resumes_bit_identically(tmp_path):
    records = launch(tmp_path, {"type": "SketchedAMSGrad", "params": PARAMS})
    assert [r["optimizer"] for r in records] == ["SketchedAMSGrad", "SketchedAMSGrad"]
    assert [r["allreduce_calls"] for r in records] == [0, 0]  # compressed from step 1: engine all-reduce off
    kwargs = {**PARAMS, "betas": tuple(PARAMS["betas"])}
    replayed = replay(SketchedAMSGrad, kwargs, records)
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(records[rank]["params"], replayed[rank])), rank
        assert torch.equal(records[rank]["params"][-1], records[0]["params"][-1])  # the same on both ranks
        assert torch.equal(records[rank]["resumed_params"], records[rank]["params"][-1]), rank
    # the per-rank momenta differ between the ranks (each its own gradients), v and vhat do not
    last = [r["opt_state"][-1] for r in records]
    assert not torch.equal(last[0]["exp_avg"], last[1]["exp_avg"])
    assert torch.equal(last[0]["max_exp_avg_sq"], last[1]["max_exp_avg_sq"])
    # the reference written from the spec, in float64 on the same gradients
    x0 = records[0]["x0"].double()
    ref = SketchedAMSGradReference(x0, 2, **{**kwargs, "group": 0})
    for t in range(STEPS):
        x = ref.step([r["grads"][t].double() for r in records])
        torch.testing.assert_close(x.float(), records[0]["params"][t], rtol=0, atol=1e-5)
    assert not torch.equal(records[0]["params"][-1], records[0]["x0"])
    assert [r["bytes_sent"] for r in records] == [expected_bytes_sent(STEPS)] * 2
