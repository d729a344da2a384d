"""Bad input gets a clear error naming the argument and what is allowed."""

import re

import pytest
import torch

from deepspeed_cdadam import EF21, CDAdam, InProcessWorld, OneBitAdam


def _p(dtype=torch.float32):
    return torch.nn.Parameter(torch.zeros(4, dtype=dtype))


def _tr(n=1):
    return InProcessWorld(n).transports[0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": -1.0}, "Invalid lr=-1.0. Must be a finite number >= 0.0."),
        ({"lr": "0.1"}, "Invalid lr='0.1'. Must be a finite number >= 0.0."),
        ({"betas": (0.9,)}, "Invalid betas=(0.9,). Must be a pair of numbers in [0.0, 1.0)."),
        ({"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0. Must be in [0.0, 1.0)."),
        ({"eps": 0.0}, "Invalid eps=0.0. Must be a number > 0.0."),
        ({"weight_decay": -0.1}, "Invalid weight_decay=-0.1. Must be a number >= 0.0."),
        ({"exchange": "markow"}, "Unknown exchange='markow'. Allowed: markov, error_feedback, naive, none."),
        ({"compressor": "sign"}, "Unknown compressor='sign'. Allowed: scaled_sign, sign_l2, topk, randk."),
        ({"block_size": 0}, "Invalid block_size=0. Must be None (one block per shard) or an int >= 1."),
        ({"timeout_s": 0}, "Invalid timeout_s=0. Must be a number > 0 (seconds)."),
        ({"nonfinite_grads": "ignore"}, "Invalid nonfinite_grads='ignore'. Allowed: error, skip."),
        ({"consistency_check_every": -5}, "Invalid consistency_check_every=-5. Must be an int >= 0 (0: never)."),
        ({"worker_scale_scope": "global"}, "Invalid worker_scale_scope='global'. Allowed: block, tensor."),
    ],
)
def test_cd_adam_rejects(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CDAdam([_p()], transport=_tr(), **kwargs)


def test_amsgrad_must_be_bool():
    with pytest.raises(TypeError, match=re.escape("Invalid amsgrad='yes'. Must be a bool.")):
        CDAdam([_p()], amsgrad="yes", transport=_tr())


def test_bias_correction_must_be_bool():
    message = (
        "Invalid bias_correction='yes'. Must be a bool (False: the paper, no correction; "
        "True: Adam's correction of m and vhat)."
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        CDAdam([_p()], bias_correction="yes", transport=_tr())


@pytest.mark.parametrize("freeze_step", [-1, 1.5, True])
def test_onebit_freeze_step_validated(freeze_step):
    with pytest.raises(ValueError, match=re.escape(f"Invalid freeze_step={freeze_step!r}. Must be an int >= 0.")):
        OneBitAdam([_p()], freeze_step=freeze_step, transport=_tr())


def test_a_group_mixing_dtypes_makes_one_bucket_per_dtype():
    """Buckets, not groups, need one dtype (tests/optim/test_buckets.py steps such a group)."""
    opt = CDAdam([_p(torch.float32), _p(torch.float64), _p(torch.float32)], transport=_tr())
    assert [(b.key[0], len(b.params)) for b in opt.buckets()] == [(torch.float32, 2), (torch.float64, 1)]


def test_sparse_gradients_rejected():
    p = _p()
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match="CDAdam does not support sparse gradients."):
        CDAdam([p], transport=_tr()).step()


def test_without_process_group_the_error_says_what_to_do():
    p = _p()
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        CDAdam([p]).step()


def test_transport_world_size_must_match_layout():
    from deepspeed_cdadam.comm import ShardLayout
    from deepspeed_cdadam.exchange import make_exchange

    with pytest.raises(ValueError, match="layout.world_size=2 does not match the transport's world_size=1"):
        make_exchange("none", _tr(), ShardLayout(8, 2), None)


def test_fp16_params_use_fp32_buffers():
    p = torch.nn.Parameter(torch.ones(6, dtype=torch.float16))
    p.grad = torch.full((6,), 0.5, dtype=torch.float16)
    opt = CDAdam([p], lr=0.1, transport=_tr())
    opt.step()
    state = opt.state[p]
    assert state["exp_avg"].dtype == torch.float32 and p.dtype == torch.float16
    assert torch.all(p < 1.0)


@pytest.mark.parametrize("key", ["exp_avg_mask", "non_freeze"])
def test_upstream_group_keys_not_silently_ignored(key):
    with pytest.raises(
        ValueError, match=re.escape(f"Parameter-group key {key!r} (upstream OnebitAdam) is not supported")
    ):
        CDAdam([{"params": [_p()], key: True}], transport=_tr())


def test_shard_too_long_for_int32_indices_is_a_clear_error():
    from deepspeed_cdadam.comm import ShardLayout
    from deepspeed_cdadam.compressors import get_compressor
    from deepspeed_cdadam.exchange import make_exchange

    layout = ShardLayout(2**31 + 10, 1)  # nothing is allocated
    with pytest.raises(
        ValueError, match=re.escape("A server shard of 2147483658 coordinates is too long for compressor 'topk'")
    ):
        make_exchange("markov", _tr(), layout, get_compressor("topk"))
    make_exchange("markov", _tr(), layout, get_compressor("scaled_sign"))  # sign payloads have no such limit


def test_empty_parameter_list_is_rejected():
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        CDAdam([], transport=_tr())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"ratio": 0.0},
            r"Invalid ratio=0\.0\. Must be None \(0\.016 for topk and randk, the paper's\) or a number in \(0\.0, 1\.0\]\.",
        ),
        ({"compressor": "scaled_sign", "ratio": 0.1}, r"Invalid ratio=0\.1 for compressor='scaled_sign'"),
        ({"lr": -1.0}, r"Invalid lr=-1\.0\. Must be a finite number >= 0\.0\."),
        ({"weight_decay": -0.1}, r"Invalid weight_decay=-0\.1\. Must be a number >= 0\.0\."),
    ],
)
def test_ef21_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EF21([torch.nn.Parameter(torch.zeros(3))], transport=InProcessWorld(1).transports[0], **kwargs)


def test_ef21_default_is_the_papers_top_k():
    """K = 0.016 d (the paper, section 7.2): about the bytes of a scaled sign (64 bits per kept coordinate)."""
    opt = EF21([torch.nn.Parameter(torch.zeros(3))], transport=InProcessWorld(1).transports[0])
    assert opt.compressor.name == "topk" and opt.compressor.ratio == 0.016
    rand = EF21([torch.nn.Parameter(torch.zeros(3))], compressor="randk", transport=InProcessWorld(1).transports[0])
    assert rand.compressor.ratio == 0.016
