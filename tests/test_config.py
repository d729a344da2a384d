"""The config dataclasses are the one source of the optimizers' arguments, JSON keys and checks."""

from __future__ import annotations

import inspect
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from deepspeed_cdadam import (
    EF21,
    LIECSGD,
    AdaCGD,
    Birder,
    CDAdam,
    InProcessWorld,
    OneBitAdam,
    OneBitLamb,
    SketchedAMSGrad,
    ZeroOneAdam,
)
from deepspeed_cdadam.config import (
    SPEC,
    AdaCGDConfig,
    BirderConfig,
    CDAdamConfig,
    Choice,
    CommonConfig,
    EF21Config,
    LIECSGDConfig,
    OneBitAdamConfig,
    OneBitLambConfig,
    SketchedAMSGradConfig,
    ZeroOneAdamConfig,
    describe,
    field_names,
    json_keys,
    spec_of,
)

OPTIMIZERS = [
    (CDAdam, CDAdamConfig),
    (OneBitAdam, OneBitAdamConfig),
    (EF21, EF21Config),
    (LIECSGD, LIECSGDConfig),
    (OneBitLamb, OneBitLambConfig),
    (Birder, BirderConfig),
    (ZeroOneAdam, ZeroOneAdamConfig),
    (AdaCGD, AdaCGDConfig),
    (SketchedAMSGrad, SketchedAMSGradConfig),
]
IDS = ["CDAdam", "OneBitAdam", "EF21", "LIECSGD", "OneBitLamb", "Birder", "ZeroOneAdam", "AdaCGD", "SketchedAMSGrad"]
#: Constructor parameters that are objects, not settings (never in a config or a JSON file).
NOT_SETTINGS = {"self", "params", "transport", "process_group"}
ROOT = Path(__file__).resolve().parents[1]


def _p():
    return torch.nn.Parameter(torch.zeros(4))


def _tr():
    return InProcessWorld(1).transports[0]


# --- constructors and dataclasses cannot drift -----------------------------------------------
@pytest.mark.parametrize("optimizer,config_cls", OPTIMIZERS, ids=IDS)
def test_constructor_parameters_are_the_config_fields_with_the_same_defaults(optimizer, config_cls):
    assert optimizer.CONFIG is config_cls
    parameters = inspect.signature(optimizer.__init__).parameters
    settings = {name: p.default for name, p in parameters.items() if name not in NOT_SETTINGS}
    assert sorted(settings) == sorted(field_names(config_cls))  # every field is a parameter, and back
    for f in fields(config_cls):
        assert settings[f.name] == f.default, f"{optimizer.__name__}({f.name}=...) default differs from the config's"
    built = optimizer([_p()], transport=_tr())
    assert built.config == config_cls()


def test_param_group_defaults_are_the_per_group_hyperparameters():
    assert set(CDAdam([_p()], transport=_tr()).defaults) == {
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "amsgrad",
        "bias_correction",
    }
    assert set(OneBitAdam([_p()], transport=_tr()).defaults) == {"lr", "betas", "eps", "weight_decay"}
    assert set(EF21([_p()], transport=_tr()).defaults) == {"lr", "weight_decay"}
    assert CDAdamConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)  # JSON lists become tuples


def test_ef21_ratio_default_is_resolved_by_the_config():
    assert EF21Config().resolved_ratio == EF21.DEFAULT_RATIO == 0.016
    assert EF21Config(compressor="scaled_sign").resolved_ratio is None
    assert EF21([_p()], compressor="randk", ratio=0.5, transport=_tr()).compressor.ratio == 0.5


# --- generated JSON keys ---------------------------------------------------------------------
def test_json_keys_per_type():
    common = (
        "lr",
        "weight_decay",
        "compressor",
        "block_size",
        "scale_blocks",
        "timeout_s",
        "seed",
        "nonfinite_grads",
        "consistency_check_every",
    )
    adam = common + ("betas", "eps", "worker_scale_scope")
    hierarchy = ("hierarchy", "ranks_per_node")
    assert json_keys(CDAdamConfig) == adam + hierarchy + (
        "amsgrad",
        "bias_correction",
        "exchange",
        "bucket_cap_mb",
        "overlap",
        "comm_backend_name",
        "cuda_aware",
    )
    assert json_keys(OneBitAdamConfig) == adam + hierarchy + (
        "freeze_step",
        "comm_backend_name",
        "cuda_aware",
        "bias_correction",  # upstream OnebitAdam's keys
        "eps_inside_sqrt",
    )
    assert json_keys(EF21Config) == common + ("ratio", "comm_backend_name", "cuda_aware")


@pytest.mark.parametrize("config_cls", [c for _, c in OPTIMIZERS], ids=IDS)
def test_deepspeed_only_keys_never_shadow_a_field(config_cls):
    keys = json_keys(config_cls)
    assert len(keys) == len(set(keys))
    assert set(field_names(config_cls.DEEPSPEED_OPTIONS)) >= {"comm_backend_name", "cuda_aware"}


def test_the_integration_accepts_exactly_the_generated_keys():
    integration = pytest.importorskip("deepspeed_cdadam.integration.deepspeed")
    assert integration.ALLOWED_KEYS == {
        "cdadam": json_keys(CDAdamConfig),
        "onebitadam": json_keys(OneBitAdamConfig),
        "onebitlamb": json_keys(OneBitLambConfig),
        "ef21": json_keys(EF21Config),
        "liecsgd": json_keys(LIECSGDConfig),
        "birder": json_keys(BirderConfig),
        "zerooneadam": json_keys(ZeroOneAdamConfig),
        "adacgd": json_keys(AdaCGDConfig),
        "sketchedamsgrad": json_keys(SketchedAMSGradConfig),
    }
    with pytest.raises(ValueError) as err:
        integration._reject_unknown_keys("ef21", {"ratoi": 0.1})
    assert str(err.value) == (
        "Unknown key optimizer.params.ratoi for optimizer type 'ef21'. Allowed: "
        + ", ".join(json_keys(EF21Config))
        + ". Did you mean 'ratio'?"
    )


@pytest.mark.parametrize("config_cls", [c for _, c in OPTIMIZERS], ids=IDS)
def test_every_json_key_is_documented(config_cls):
    text = describe(config_cls)
    readme = (ROOT / "README.md").read_text()
    for key in json_keys(config_cls):
        assert re.search(rf"^{key} \(default ", text, re.M), key
        assert f"`{key}`" in readme, f"README.md does not mention optimizer.params key {key!r}"


# --- each field's check names the key and what is allowed -------------------------------------
def _checked_fields():
    seen = set()
    for _, config_cls in OPTIMIZERS:
        for cls in (config_cls, config_cls.DEEPSPEED_OPTIONS):
            for f in fields(cls):
                if f.metadata[SPEC].must_be() and (cls, f.name) not in seen:  # comm_backend_name: the integration's
                    seen.add((cls, f.name))
                    yield pytest.param(cls, f.name, id=f"{cls.__name__}.{f.name}")


@pytest.mark.parametrize("cls,name", list(_checked_fields()))
def test_a_wrong_value_names_the_key_and_what_is_allowed(cls, name):
    spec = cls.__dataclass_fields__[name].metadata[SPEC]
    with pytest.raises((TypeError, ValueError)) as err:
        cls(**{name: "bogus"})
    message = str(err.value)
    assert f"{cls.KEY_PREFIX}{name}='bogus'" in message
    if isinstance(spec, Choice):
        assert f"Allowed: {', '.join(spec.values)}." in message or spec.must_be() in message
    elif type(spec).__name__ != "Only":
        assert message.endswith(f"Must be {spec.must_be()}.")


@pytest.mark.parametrize(
    "config_cls,kwargs,message",
    [
        (CDAdamConfig, {"lr": float("nan")}, "Invalid lr=nan. Must be a finite number >= 0.0."),
        (CDAdamConfig, {"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0. Must be in [0.0, 1.0)."),
        (CDAdamConfig, {"betas": (0.9,)}, "Invalid betas=(0.9,). Must be a pair of numbers in [0.0, 1.0)."),
        (CDAdamConfig, {"eps": 0.0}, "Invalid eps=0.0. Must be a number > 0.0."),
        (CDAdamConfig, {"block_size": True}, "Invalid block_size=True. Must be None (one block per shard) or an int"),
        (CDAdamConfig, {"timeout_s": 0}, "Invalid timeout_s=0. Must be a number > 0 (seconds)."),
        (CDAdamConfig, {"seed": 1.5}, "Invalid seed=1.5. Must be an int."),
        (CDAdamConfig, {"consistency_check_every": -1}, "Must be an int >= 0 (0: never)."),
        (OneBitAdamConfig, {"freeze_step": True}, "Invalid freeze_step=True. Must be an int >= 0."),
        (EF21Config, {"ratio": 1.5}, "Invalid ratio=1.5. Must be None (0.016 for topk and randk, the paper's) or"),
        # (schemes registered later are listed after these)
        (CDAdamConfig, {"exchange": "markow"}, "Unknown exchange='markow'. Allowed: markov, error_feedback, naive, none"),
        (CDAdamConfig, {"compressor": "topK"}, "Unknown compressor='topK'. Allowed: scaled_sign, sign_l2, topk, randk"),
        (CDAdamConfig, {"nonfinite_grads": "skipp"}, "Invalid nonfinite_grads='skipp'. Allowed: error, skip. Did you"),
        (
            CDAdamConfig,
            {"worker_scale_scope": "tensor", "compressor": "topk"},
            "worker_scale_scope='tensor' needs a scaled-sign compressor",
        ),
        (EF21Config, {"compressor": "sign_l2", "ratio": 0.1}, "Invalid ratio=0.1 for compressor='sign_l2'"),
    ],
)
def test_field_messages(config_cls, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        config_cls(**kwargs)


def test_a_compressor_instance_is_a_valid_compressor():
    from deepspeed_cdadam.compressors import TopK

    compressor = TopK(0.1)
    assert EF21Config(compressor=compressor).build_compressor() is compressor
    with pytest.raises(ValueError, match=re.escape("Invalid ratio=0.2 with a Compressor instance")):
        EF21Config(compressor=compressor, ratio=0.2)
    with pytest.raises(TypeError, match=re.escape("Invalid compressor=5. Must be one of scaled_sign,")):
        CDAdamConfig(compressor=5)


def test_spec_of_and_the_common_fields():
    assert spec_of(CDAdamConfig, "lr") is spec_of(EF21Config, "lr")  # one check, redefaulted per optimizer
    assert set(field_names(CommonConfig)) <= set(field_names(EF21Config)) & set(field_names(CDAdamConfig))
    with pytest.raises(AttributeError):
        CDAdamConfig().lr = 1.0  # frozen


# --- a bad JSON value and a bad Python argument raise the same -----------------------------------
class _Engine:
    """What ``build_optimizer`` reads of a DeepSpeed engine before any transport is built."""

    mpu = None

    def __init__(self, type_name, params):
        self._type, self._params = type_name, params

    def optimizer_params(self):
        return self._params

    def optimizer_name(self):
        return self._type

    def zero_optimization(self):
        return False


@pytest.mark.parametrize(
    "optimizer,key,value",
    [
        (CDAdam, "lr", "fast"),
        (CDAdam, "betas", [0.9, 1.5]),
        (CDAdam, "eps", 0),
        (CDAdam, "amsgrad", "yes"),
        (CDAdam, "bias_correction", 1),
        (CDAdam, "exchange", "markow"),
        (CDAdam, "compressor", "sign"),
        (CDAdam, "block_size", 0),
        (CDAdam, "timeout_s", -1),
        (CDAdam, "seed", "0"),
        (CDAdam, "worker_scale_scope", "global"),
        (CDAdam, "nonfinite_grads", "ignore"),
        (CDAdam, "consistency_check_every", -5),
        (OneBitAdam, "freeze_step", -2),
        (OneBitAdam, "compressor", "topk_"),
        (EF21, "ratio", 0.0),
        (EF21, "weight_decay", -0.1),
        (LIECSGD, "momentum", 1.0),
        (LIECSGD, "average_period", 0),
        (LIECSGD, "bucket_size", -1),
        (LIECSGD, "block_size", 256),
    ],
)
def test_a_bad_json_value_and_a_bad_python_argument_give_the_same_message(optimizer, key, value):
    pytest.importorskip("deepspeed")
    from deepspeed_cdadam.integration.deepspeed import build_optimizer

    with pytest.raises((TypeError, ValueError)) as from_python:
        optimizer([_p()], transport=_tr(), **{key: value})
    type_name = optimizer.__name__.lower()
    with pytest.raises((TypeError, ValueError)) as from_json:
        build_optimizer(_Engine(optimizer.__name__, {key: value}), type_name, [_p()])
    assert type(from_json.value) is type(from_python.value)
    assert str(from_json.value) == str(from_python.value)
    assert f"{key}=" in str(from_python.value) or "beta parameter" in str(from_python.value)
