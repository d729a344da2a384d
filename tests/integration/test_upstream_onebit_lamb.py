"""1-bit LAMB inside DeepSpeed's engine on 2 gloo ranks (`deepspeed` launcher, ds_train.py).

Ours ("type": "OneBitLamb" from JSON) against DeepSpeed 0.19.6's own OnebitLamb (its code
untouched; its compressed all-reduce gets CPU bit packing, tests/integration/upstream_cpu_backend.py),
on the `layers` model: 6 tensors of 640, 40, 960, 24, 192 and 8 coordinates (1864: upstream pads its
fused buffer with 8 zeros to 1872 = 117 * 16), across the freeze and 5 compressed steps.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.test_deepspeed_launcher import STEPS, launch, write_config
from tests.launch import run_checked

def _have_upstream() -> bool:
    """Upstream's OnebitLamb: deleted from DeepSpeed after 0.19.6 (with its whole ``onebit`` package)."""
    try:
        return importlib.util.find_spec("deepspeed.runtime.fp16.onebit.lamb") is not None
    except ModuleNotFoundError:
        return False


HAVE_UPSTREAM = _have_upstream()

#: Upstream's tutorial settings (BERT seq 128: coeff_beta 0.9, factor_max 4.0, factor_min 0.5,
#: factor_threshold 0.1) with a short warm-up, and the trust-ratio clips narrowed (from 0.01 - 0.3) so
#: that on this model both bind: its ratios lie between 0.029 and 0.05.
LAMB = {
    "lr": 0.01,
    "max_coeff": 0.045,
    "min_coeff": 0.03,
    "coeff_beta": 0.9,
    "factor_max": 4.0,
    "factor_min": 0.5,
    "factor_threshold": 0.1,
}
FREEZE = 3
#: fp32 with weight decay; fp16 (dynamic loss scaling, as upstream requires) without (see below)
PRECISIONS = {
    "fp32": {"weight_decay": 0.01, "extra": {}},
    "fp16": {"weight_decay": 0.0, "extra": {"fp16": {"enabled": True, "initial_scale_power": 8}}},
}


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our runs from JSON, one launch per precision, shared by the tests below. fp32 also saves a
    checkpoint at step 5 (compressed phase) and resumes it in an engine started from other weights."""
    runs: dict[str, list[dict]] = {}

    def get(precision: str) -> list[dict]:
        if precision not in runs:
            setting = PRECISIONS[precision]
            params = {**LAMB, "weight_decay": setting["weight_decay"], "freeze_step": FREEZE}
            runs[precision] = launch(
                tmp_path_factory.mktemp(f"ours_{precision}"),
                {"type": "OneBitLamb", "params": params},
                "--model",
                "layers",
                save=precision == "fp32",
                **setting["extra"],
            )
        return runs[precision]

    return get


def test_ours_from_json_resumes_exactly_and_counts_its_bytes(ours):
    """Any DeepSpeed release: the engine's all-reduce in the warm-up only, local gradients after,
    a checkpoint round trip that continues bit-identically (upstream's reload resets its errors),
    and the bytes of one fused exchange per compressed step."""
    records = ours("fp32")
    assert records[0]["optimizer"] == "OneBitLamb"
    for record in records:
        assert record["allreduce_calls"] == FREEZE
        assert torch.equal(record["resumed_params"], record["params"][-1])
    assert not torch.equal(records[0]["grads"][FREEZE], records[1]["grads"][FREEZE])  # compressed: local gradients
    state = records[0]["opt_state"][-1]
    assert state["exp_avg_padding"].numel() == 8 and state["exp_avg_padding"].abs().min() > 0
    # bytes per rank: 8 steps of the 4-byte-per-rank control all-reduce (8 B); 5 compressed steps of
    # one all_to_all + one all_gather of 1872 / 2 = 936 signs (117 B) + one fp32 scale each way
    assert [r["bytes_sent"] for r in records] == [8 * 8 + 5 * 2 * (117 + 4)] * 2
    first = records[0]["lamb_coeffs"][0]  # both clips and the ratio itself occur
    assert LAMB["max_coeff"] in first and LAMB["min_coeff"] in first
    assert any(LAMB["min_coeff"] < c < LAMB["max_coeff"] for c in first)


@pytest.mark.skipif(not HAVE_UPSTREAM, reason="upstream OnebitLamb was removed after deepspeed 0.19.6")
@pytest.mark.parametrize(
    "precision",
    [
        "fp32",
        # two more launches (about a minute on 2 idle cores): behind `make test-slow` to keep the suite short
        pytest.param("fp16", marks=pytest.mark.slow),
    ],
)
def test_matches_upstream_onebit_lamb(tmp_path, ours, precision):
    """Identical parameters and coefficients step for step, bit for bit (steps 1-3 LAMB with the
    engine's all-reduce, 4-8 compressed).

    Lining the two up: upstream's first step() only initialises. In fp32, ds_train.py gives it a
    zero-gradient step first (its freeze_step one higher). In fp16 DeepSpeed's unfused wrapper
    (upstream requires dynamic loss scaling) already made that first call while it was built, so
    ds_train.py's zero-gradient step is upstream's first LAMB step: with m = v = 0 and no weight
    decay its update is 0 and its coefficient 1.0 (skipped by the average), so it changes nothing
    but the step count (freeze_step two higher).
    """
    setting = PRECISIONS[precision]
    shift = {"fp32": 1, "fp16": 2}[precision]
    params = {**LAMB, "weight_decay": setting["weight_decay"], "freeze_step": FREEZE + shift}
    upstream = launch(
        tmp_path,
        {"type": "OneBitLamb", "params": {**params, "comm_backend_name": "compressed"}},
        "--model",
        "layers",
        "--upstream",
        save=False,
        **setting["extra"],
    )
    records = ours(precision)
    assert upstream[0]["optimizer"] == "OnebitLamb" and records[0]["optimizer"] == "OneBitLamb"
    for a, b in zip(upstream, records):
        assert a["allreduce_calls"] == b["allreduce_calls"] == FREEZE  # the warm-up only
        assert torch.equal(a["x0"], b["x0"])
        for t in range(STEPS):
            assert torch.equal(a["params"][t], b["params"][t]), f"step {t + 1}"
            assert a["lamb_coeffs"][t] == b["lamb_coeffs"][t], f"step {t + 1}"
        assert not torch.equal(a["params"][-1], a["params"][FREEZE - 1])  # the compressed phase moved them


@pytest.mark.slow  # MPI is our transport, not the optimizer's: CD-Adam's launcher test covers it by default
@pytest.mark.skipif(not Path(sys.executable).with_name("mpiexec").exists(), reason="needs mpiexec beside python")
def test_over_mpi_equals_gloo(tmp_path, ours):
    """comm_backend_name "mpi" (mpiexec, mpi4py): the same bytes, so the same parameters as over gloo."""
    params = {**LAMB, "weight_decay": PRECISIONS["fp32"]["weight_decay"], "freeze_step": FREEZE}
    gloo = ours("fp32")
    config = write_config(tmp_path / "mpi", {"type": "OneBitLamb", "params": {**params, "comm_backend_name": "mpi"}})
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    script = ["tests/integration/ds_train.py", "--deepspeed_config", str(config), "--out", str(tmp_path / "mpi")]
    run_checked([mpiexec, "-n", "2", sys.executable, *script, "--steps", str(STEPS), "--model", "layers"])
    for rank in range(2):
        over_mpi = torch.load(tmp_path / "mpi" / f"rank{rank}.pt")
        assert over_mpi["allreduce_calls"] == FREEZE
        assert all(torch.equal(a, b) for a, b in zip(over_mpi["params"], gloo[rank]["params"]))
        assert over_mpi["lamb_coeffs"] == gloo[rank]["lamb_coeffs"]
