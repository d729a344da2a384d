"""`deepspeed --num_gpus 2 ...` on CPU: JSON "AdaCGD" through an unmodified deepspeed.initialize, with
a checkpoint saved and loaded mid-run (per-rank files: each worker's estimate, previous gradient and
server shards).

One launch (ds_train.py): 8 steps uninterrupted, and 5 steps + save + load into an engine started from
other weights + 3 more steps.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from deepspeed_cdadam import AdaCGD
from deepspeed_cdadam.references.adacgd import AdaCGDReference
from tests.integration.test_deepspeed_launcher import STEPS, launch, replay
from tests.optim.test_adacgd import expected_step_bytes

PARAMS = {"lr": 0.05, "ratios": [0.05, 0.2, 0.5], "zeta": 1.0}


def test_adacgd_from_json_resumes_bit_identically(tmp_path):
    records = launch(tmp_path, {"type": "AdaCGD", "params": PARAMS})
    assert [r["optimizer"] for r in records] == ["AdaCGD", "AdaCGD"]
    assert [r["allreduce_calls"] for r in records] == [0, 0]  # the exact first step runs in our exchange
    # the engine adds nothing and loses nothing: our optimizer on the recorded gradients, bit for bit,
    # and the resumed run ends where the uninterrupted one does, on every rank
    kwargs = {**PARAMS, "ratios": tuple(PARAMS["ratios"])}
    replayed = replay(AdaCGD, kwargs, records)
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(records[rank]["params"], replayed[rank])), rank
        assert torch.equal(records[rank]["resumed_params"], records[rank]["params"][-1]), rank
    assert torch.equal(records[0]["params"][-1], records[1]["params"][-1])
    # the reference written from the spec, on the same gradients; its levels give the bytes each rank sent
    x0 = records[0]["x0"]
    ref = AdaCGDReference(x0, 2, ratios=PARAMS["ratios"], zeta=PARAMS["zeta"], lr=PARAMS["lr"])
    steps, levels = [], []
    for t in range(STEPS):
        x = ref.step([r["grads"][t] for r in records])
        torch.testing.assert_close(x, records[0]["params"][t], rtol=0, atol=1e-6)
        last = ref.last
        steps.append(
            SimpleNamespace(kind=last["kind"], up_levels=last.get("up_levels"), down_level=last.get("down_level"))
        )
        levels += list(last.get("up_levels", ())) + [last.get("down_level")]
    assert {0, 1} <= set(levels) - {None}  # skips and cheap levels, not only the finest
    for rank in range(2):
        sent = sum(expected_step_bytes(2, rank, s, tuple(PARAMS["ratios"]), 4, x0.numel())["sent"] for s in steps)
        assert records[rank]["bytes_sent"] == sent, rank
