"""``worker_scale_scope`` is a setting of the scaled-sign compressors: validated there, passed by the
registry and by the optimizers' configs (their keyword and JSON key), read by the exchanges."""

from __future__ import annotations

import math
import re

import pytest
import torch

from deepspeed_cdadam import LIECSGD, CDAdam, InProcessWorld, OneBitAdam, OneBitLamb, ZeroOneAdam
from deepspeed_cdadam.comm.layout import ShardLayout, make_layout
from deepspeed_cdadam.compressors import RandK, ScaledSignL1, ScaledSignL2, TopK, get_compressor
from deepspeed_cdadam.config import CDAdamConfig, OneBitAdamConfig, ZeroOneAdamConfig
from deepspeed_cdadam.exchange import make_exchange


def _p():
    return [torch.nn.Parameter(torch.zeros(4))]


def _tr(n=1):
    return InProcessWorld(n).transports[0]


@pytest.mark.parametrize("cls", [ScaledSignL1, ScaledSignL2])
def test_scaled_sign_takes_the_scope(cls):
    assert cls().worker_scale_scope == "block"
    assert cls(worker_scale_scope="tensor").worker_scale_scope == "tensor"
    assert repr(cls(worker_scale_scope="tensor")) == f"{cls.__name__}(worker_scale_scope='tensor')"


@pytest.mark.parametrize("bad", ["global", "Tensor", None, 1])
def test_scaled_sign_rejects_other_scopes(bad):
    with pytest.raises(ValueError, match=re.escape(f"Invalid worker_scale_scope={bad!r}. Allowed: block, tensor.")):
        ScaledSignL2(worker_scale_scope=bad)


def test_a_compressor_without_the_setting_is_block():
    assert TopK(0.1).worker_scale_scope == "block"
    assert RandK(0.1).worker_scale_scope == "block"


def test_registry_passes_the_scope():
    made = get_compressor("sign_l2", worker_scale_scope="tensor")
    assert isinstance(made, ScaledSignL2) and made.worker_scale_scope == "tensor"
    assert get_compressor("scaled_sign").worker_scale_scope == "block"
    assert get_compressor("topk", ratio=0.5, worker_scale_scope="block").worker_scale_scope == "block"
    with pytest.raises(ValueError, match=re.escape("Invalid worker_scale_scope='shard'. Allowed: block, tensor.")):
        get_compressor("scaled_sign", worker_scale_scope="shard")


@pytest.mark.parametrize("name", ["topk", "randk"])
def test_tensor_needs_a_scaled_sign(name):
    message = f"worker_scale_scope='tensor' needs a scaled-sign compressor ('scaled_sign' or 'sign_l2'), not {name!r}."
    with pytest.raises(ValueError, match=re.escape(message)):
        get_compressor(name, worker_scale_scope="tensor")
    with pytest.raises(ValueError, match=re.escape(message)):
        CDAdam(_p(), compressor=name, worker_scale_scope="tensor")
    with pytest.raises(ValueError, match=re.escape(message)):  # an instance: the same message
        CDAdam(_p(), compressor=get_compressor(name), worker_scale_scope="tensor")


def test_registry_keeps_an_instance_whose_scope_agrees():
    comp = ScaledSignL1(worker_scale_scope="tensor")
    assert get_compressor(comp) is comp
    assert get_compressor(comp, worker_scale_scope="tensor") is comp
    with pytest.raises(ValueError) as err:
        get_compressor(comp, worker_scale_scope="block")
    assert str(err.value) == (
        "Invalid worker_scale_scope='block' with compressor=ScaledSignL1(worker_scale_scope='tensor'), whose own "
        "worker_scale_scope is 'tensor': the scope is a setting of the compressor. Build it with "
        "worker_scale_scope='block', or drop the worker_scale_scope keyword."
    )


@pytest.mark.parametrize(
    "config_cls,kwargs,cls,scope",
    [
        (CDAdamConfig, {}, ScaledSignL1, "block"),
        (CDAdamConfig, {"worker_scale_scope": "tensor"}, ScaledSignL1, "tensor"),
        (OneBitAdamConfig, {"worker_scale_scope": "tensor"}, ScaledSignL2, "tensor"),
        (ZeroOneAdamConfig, {}, ScaledSignL2, "tensor"),  # upstream's default
        (ZeroOneAdamConfig, {"worker_scale_scope": "block"}, ScaledSignL2, "block"),
    ],
)
def test_configs_build_the_compressor_with_their_scope(config_cls, kwargs, cls, scope):
    made = config_cls(**kwargs).build_compressor()
    assert type(made) is cls and made.worker_scale_scope == scope


def test_an_instance_carries_its_own_scope():
    tensor = ScaledSignL1(worker_scale_scope="tensor")
    assert CDAdamConfig(compressor=tensor).build_compressor() is tensor  # the keyword left at its default
    assert CDAdamConfig(compressor=tensor, worker_scale_scope="tensor").build_compressor() is tensor
    block = ScaledSignL2()
    assert ZeroOneAdamConfig(compressor=block).build_compressor() is block  # ZeroOneAdam's default is "tensor"
    with pytest.raises(ValueError) as err:
        CDAdam(_p(), compressor=ScaledSignL1(), worker_scale_scope="tensor")
    assert str(err.value).startswith(
        "Invalid worker_scale_scope='tensor' with compressor=ScaledSignL1(worker_scale_scope='block'), whose own "
        "worker_scale_scope is 'block'"
    )
    with pytest.raises(ValueError, match=re.escape("with compressor=ScaledSignL2(worker_scale_scope='tensor')")):
        ZeroOneAdam(_p(), compressor=ScaledSignL2(worker_scale_scope="tensor"), worker_scale_scope="block")


def test_optimizers_hand_their_scope_to_the_exchange():
    for opt in (
        OneBitAdam(_p(), worker_scale_scope="tensor", transport=_tr()),
        CDAdam(_p(), compressor=ScaledSignL1(worker_scale_scope="tensor"), transport=_tr()),
        OneBitLamb(_p(), transport=_tr()),  # upstream's default "tensor"
    ):
        assert opt.compressor.worker_scale_scope == "tensor"
        assert opt._exchange_for(0, 4).worker_scale_scope == "tensor"
    assert CDAdam(_p(), transport=_tr())._exchange_for(0, 4).worker_scale_scope == "block"


def test_node_hierarchy_and_liec_refuse_a_tensor_scoped_instance():
    with pytest.raises(ValueError, match=re.escape("Invalid worker_scale_scope='tensor' with hierarchy='node'.")):
        CDAdam(_p(), compressor=ScaledSignL1(worker_scale_scope="tensor"), hierarchy="node")
    with pytest.raises(ValueError, match=re.escape("for LIECSGD: its worker_scale_scope must be 'block'")):
        LIECSGD(_p(), compressor=ScaledSignL1(worker_scale_scope="tensor"))


def test_exchanges_take_no_scope_argument():
    with pytest.raises(TypeError):
        make_exchange("markov", _tr(), ShardLayout(8, 1), ScaledSignL1(), None, 0, "tensor")  # type: ignore[call-arg]


@pytest.mark.parametrize("scheme", ["markov", "error_feedback", "naive"])
@pytest.mark.parametrize("scope", ["block", "tensor"])
def test_the_exchange_scales_as_its_compressor_says(scheme, scope):
    """One rank, blocks of 8: "tensor" gives every coordinate the L2 scale of the whole vector, "block"
    each block its own (the server's re-compression of a constant-magnitude block keeps it)."""
    x = torch.randn(37, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ex = make_exchange(scheme, _tr(), ShardLayout(37, 1, 8), ScaledSignL2(worker_scale_scope=scope))
    state: dict = {}
    ex.init_state(state, torch.zeros_like(x))
    got = ex.exchange(x, state, step=1)
    sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    if scope == "tensor":
        magnitude = torch.full_like(x, math.sqrt(float((x * x).sum()) / 37))
    else:
        magnitude = torch.cat([torch.full_like(b, math.sqrt(float((b * b).sum()) / len(b))) for b in x.split(8)])
    torch.testing.assert_close(got, magnitude * sign, rtol=1e-12, atol=1e-12)


def test_a_tensor_layout_exchange_forwards_the_scope():
    layout = make_layout((5, 11), 2, None, "tensor_padded")
    ex = make_exchange("error_feedback", _tr(2), layout, ScaledSignL2(worker_scale_scope="tensor"))
    assert type(ex).__name__ == "PermutedExchange" and ex.worker_scale_scope == "tensor"
