"""0/1 Adam inside DeepSpeed's engine on 2 gloo ranks (`deepspeed` launcher, ds_train.py).

Ours ("type": "ZeroOneAdam" from JSON) against DeepSpeed 0.19.6's own ZeroOneAdam (its code
untouched; its compressed all-reduce gets CPU bit packing, tests/integration/upstream_cpu_backend.py),
on the `layers` model: 6 tensors of 520, 40, 960, 24, 120 and 5 coordinates (none a multiple of 16, so
upstream pads every one). The settings pass every phase change in 28 steps: variance refreshes (the
engine's fp32 all-reduce) at steps 1, 2, 3, 5, 7, 11 with the interval doubling 1 -> 2 -> 4 -> 8, 1-bit
gradient steps between, the freeze after step 12, then syncs at 13, 14, 15, 19, 23, 27 with the
local-step interval doubling 1 -> 2 -> 4 (clipped at 4) and local steps between.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.launch import deepspeed_cmd, run_checked

#: Upstream's ZeroOneAdam: deleted from DeepSpeed after 0.19.6, with its package (find_spec of a module
#: in a missing package raises, hence the package first).
HAVE_UPSTREAM = (
    importlib.util.find_spec("deepspeed.runtime.fp16.onebit") is not None
    and importlib.util.find_spec("deepspeed.runtime.fp16.onebit.zoadam") is not None
)
SCHEDULE = {"var_freeze_step": 12, "var_update_scaler": 2, "local_step_scaler": 2, "local_step_clipper": 4}
STEPS = 28
VARIANCE_STEPS = 6  # 1, 2, 3, 5, 7, 11: the engine's all-reduce, on both sides
SAVE_AT = 17  # between two syncs: u, l and each rank's own parameters and m in flight


def launch(directory: Path, optimizer: dict, *script_args: str, save_at: int = 0, **extra) -> list[dict]:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0, "optimizer": optimizer, **extra}
    (directory / "ds.json").write_text(json.dumps(config))
    run_checked(
        [
            *deepspeed_cmd(2, "tests/integration/ds_train.py"),
            "--deepspeed_config", str(directory / "ds.json"), "--out", str(directory), "--steps", str(STEPS),
            "--model", "layers", *(("--save-at", str(save_at)) if save_at else ()), *script_args,
        ]
    )  # fmt: skip
    return [torch.load(directory / f"rank{r}.pt") for r in range(2)]


def upstream_optimizer(lr: float) -> dict:
    return {"type": "ZeroOneAdam", "params": {"lr": lr, **SCHEDULE, "comm_backend_name": "compressed"}}


@pytest.mark.skipif(not HAVE_UPSTREAM, reason="upstream ZeroOneAdam was removed after deepspeed 0.19.6")
def test_matches_upstream_zero_one_adam_fp32_and_resumes_exactly(tmp_path):
    """fp32: identical parameters on both ranks at every step, bit for bit, and the engine's all-reduce
    on the same steps. Lining the two up: upstream's first step() only initialises (ds_train.py gives it
    a zero-gradient call first, which is its call 1; its schedule counts calls, ours steps + 1, so the
    same settings give the same steps). Ours also saves a checkpoint at step 17 (between two syncs) and
    a new engine started from other weights loads it and ends where the uninterrupted run does."""
    upstream = launch(tmp_path / "up", upstream_optimizer(0.01), "--upstream")
    ours = launch(tmp_path / "ours", {"type": "ZeroOneAdam", "params": {"lr": 0.01, **SCHEDULE}}, save_at=SAVE_AT)
    assert upstream[0]["optimizer"] == "ZeroOneAdam" and ours[0]["optimizer"] == "ZeroOneAdam"
    for a, b in zip(upstream, ours):
        assert a["allreduce_calls"] == b["allreduce_calls"] == VARIANCE_STEPS
        assert torch.equal(a["x0"], b["x0"])
        for t in range(STEPS):
            assert torch.equal(a["params"][t], b["params"][t]), f"step {t + 1}"
        assert torch.equal(b["resumed_params"], b["params"][-1])  # exact resume mid local steps
    assert torch.equal(ours[0]["params"][11], ours[1]["params"][11])  # first phase: one model
    assert not torch.equal(ours[0]["params"][SAVE_AT - 1], ours[1]["params"][SAVE_AT - 1])  # local: each its own
    assert not torch.equal(ours[0]["params"][-1], ours[0]["params"][12])  # the second phase moved the weights


@pytest.mark.skipif(HAVE_UPSTREAM, reason="with upstream ZeroOneAdam present, the fp32 comparison runs this too")
def test_from_json_resumes_exactly_without_upstream(tmp_path):
    """A DeepSpeed release without ZeroOneAdam (0.19.7+): "type": "ZeroOneAdam" builds ours, the engine's
    all-reduce runs on the variance steps only, and a checkpoint between two syncs resumes exactly."""
    ours = launch(tmp_path / "ours", {"type": "ZeroOneAdam", "params": {"lr": 0.01, **SCHEDULE}}, save_at=SAVE_AT)
    for record in ours:
        assert record["optimizer"] == "ZeroOneAdam"
        assert record["allreduce_calls"] == VARIANCE_STEPS
        assert torch.equal(record["resumed_params"], record["params"][-1])
    assert torch.equal(ours[0]["params"][11], ours[1]["params"][11])
    assert not torch.equal(ours[0]["params"][SAVE_AT - 1], ours[1]["params"][SAVE_AT - 1])


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_UPSTREAM, reason="upstream ZeroOneAdam was removed after deepspeed 0.19.6")
def test_matches_upstream_zero_one_adam_fp16(tmp_path):
    """fp16 (static loss scale): upstream runs under DeepSpeed's fused wrapper, which hands it one flat
    fp32 tensor per param group and makes its initialising call while it is built (ds_train.py then
    gives it no other); ours under the unfused wrapper, with scale_blocks="group_padded" compressing
    each group's segment as one padded tensor. Identical fp16 parameters at every step; ours also
    resumes exactly from step 17 (each rank's fp32 copies back in the wrapper, the model rounded from them)."""
    fp16 = {"enabled": True, "loss_scale": 128}
    upstream = launch(tmp_path / "up", upstream_optimizer(0.01), "--upstream", fp16=fp16)
    params = {"lr": 0.01, **SCHEDULE, "scale_blocks": "group_padded"}
    ours_optimizer = {"type": "zerooneadam", "params": params}  # the lower-cased name upstream's engine uses
    ours = launch(tmp_path / "ours", ours_optimizer, save_at=SAVE_AT, fp16=fp16)
    assert upstream[0]["optimizer"] == "ZeroOneAdam" and ours[0]["optimizer"] == "ZeroOneAdam"
    for a, b in zip(upstream, ours):
        assert a["allreduce_calls"] == b["allreduce_calls"] == VARIANCE_STEPS
        assert torch.equal(a["x0"], b["x0"])
        for t in range(STEPS):
            assert torch.equal(a["params"][t], b["params"][t]), f"step {t + 1}"
        assert torch.equal(b["resumed_params"], b["params"][-1])
    assert not torch.equal(ours[0]["params"][-1], ours[0]["params"][12])
