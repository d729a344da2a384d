"""Shared model, gradients and runners for distributed == simulator tests.

The model has two parameter groups (different lr) with sizes that are not multiples of
8 * world_size, and a parameter that never receives a gradient (it still travels as zeros, as the
simulator assumes). Both groups are one communication bucket: the reference is one vector of
38 + 15 coordinates with a per-coordinate lr and one ``ShardLayout`` over all of it.
Gradients depend on the rank, the step and the current parameters, so any divergence grows.
"""

from __future__ import annotations

import torch

from deepspeed_cdadam import EF21, CDAdam, OneBitAdam, ShardLayout
from deepspeed_cdadam.comm.layout import make_layout
from deepspeed_cdadam.compressors import ScaledSignL1, ScaledSignL2, get_compressor
from deepspeed_cdadam.simulate import (
    AMSGradReference,
    CDAdamReference,
    EF21Reference,
    ErrorFeedbackAMSGradReference,
    NaiveAMSGradReference,
    OneBitAdamReference,
    per_coordinate,
)

GROUP_SHAPES = [[(5, 7), (3,)], [(11,), (2, 2)]]  # 38 and 15 coordinates
GROUP_LR = [1e-2, 3e-3]
NO_GRAD = (1, 1)  # group 1, parameter 1 never gets a gradient

CASES = {
    # name: (optimizer class, optimizer kwargs, reference class, reference kwargs)
    "cdadam": (CDAdam, {}, CDAdamReference, {}),
    "cdadam_adam_wd": (
        CDAdam,
        {"amsgrad": False, "weight_decay": 0.1},
        CDAdamReference,
        {"amsgrad": False, "weight_decay": 0.1},
    ),
    "cdadam_topk": (CDAdam, {"compressor": "topk"}, CDAdamReference, {"compressor": "topk"}),
    "cdadam_randk": (CDAdam, {"compressor": "randk"}, CDAdamReference, {"compressor": "randk"}),
    "error_feedback": (CDAdam, {"exchange": "error_feedback"}, ErrorFeedbackAMSGradReference, {}),
    "naive": (CDAdam, {"exchange": "naive"}, NaiveAMSGradReference, {}),
    "uncompressed": (CDAdam, {"exchange": "none"}, AMSGradReference, {}),
    "onebit_tensor_scale": (
        OneBitAdam,
        {"freeze_step": 5, "worker_scale_scope": "tensor"},
        OneBitAdamReference,
        {"freeze_step": 5, "compressor": ScaledSignL2(worker_scale_scope="tensor")},
    ),
    "cdadam_tensor_scale": (
        CDAdam,
        {"worker_scale_scope": "tensor"},
        CDAdamReference,
        {"compressor": ScaledSignL1(worker_scale_scope="tensor")},
    ),
    "ef21_topk": (EF21, {"compressor": "topk"}, EF21Reference, {"compressor": "topk"}),
    # scale blocks along the parameter tensors (comm.layout.TensorLayout): permuted, and padded as upstream
    "onebit_tensor_padded": (
        OneBitAdam,
        {"freeze_step": 5, "worker_scale_scope": "tensor", "scale_blocks": "tensor_padded"},
        OneBitAdamReference,
        {"freeze_step": 5, "compressor": ScaledSignL2(worker_scale_scope="tensor"), "scale_blocks": "tensor_padded"},
    ),
    "cdadam_tensor_blocks": (CDAdam, {"scale_blocks": "tensor"}, CDAdamReference, {"scale_blocks": "tensor"}),
    "cdadam_tensor_padded_tensor_scale": (
        CDAdam,
        {"scale_blocks": "tensor_padded", "worker_scale_scope": "tensor"},
        CDAdamReference,
        {"scale_blocks": "tensor_padded", "compressor": ScaledSignL1(worker_scale_scope="tensor")},
    ),
    "ef_tensor_padded": (
        CDAdam,
        {"exchange": "error_feedback", "scale_blocks": "tensor_padded"},
        ErrorFeedbackAMSGradReference,
        {"scale_blocks": "tensor_padded"},
    ),
    "ef21_topk_tensor_blocks": (
        EF21,
        {"compressor": "topk", "scale_blocks": "tensor"},
        EF21Reference,
        {"compressor": "topk", "scale_blocks": "tensor"},
    ),
    "onebit": (
        OneBitAdam,
        {"freeze_step": 5, "weight_decay": 0.01},
        OneBitAdamReference,
        {"freeze_step": 5, "weight_decay": 0.01},
    ),
}


#: Cases whose groups differ in more than lr: each group's hyperparameters (both groups given in
#: full), applied to the optimizer's param groups and, per coordinate, to the reference.
GROUP_HPARAMS = {
    "cdadam_group_hparams": [
        {"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": True},
        {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.0, "amsgrad": False},
    ],
    "onebit_group_hparams": [
        {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
        {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0},
    ],
}
CASES["cdadam_group_hparams"] = (CDAdam, {}, CDAdamReference, {})
CASES["onebit_group_hparams"] = (OneBitAdam, {"freeze_step": 5}, OneBitAdamReference, {"freeze_step": 5})


def _reference_hparams(case: str, sizes: list[int], dtype: torch.dtype) -> dict:
    """Per-coordinate lr (and the other hyperparameters of ``GROUP_HPARAMS``) over the bucket."""
    out = {"lr": per_coordinate([(n, GROUP_LR[gi]) for gi, n in enumerate(sizes)], dtype)}
    groups = GROUP_HPARAMS.get(case)
    if groups:
        for key in groups[0]:
            if key == "betas":
                out[key] = tuple(per_coordinate([(n, g[key][k]) for n, g in zip(sizes, groups)], dtype) for k in (0, 1))
            else:
                out[key] = per_coordinate([(n, g[key]) for n, g in zip(sizes, groups)], dtype)
    return out


def initial_groups(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [
        torch.randn(sum(torch.Size(s).numel() for s in shapes), generator=gen, dtype=dtype) for shapes in GROUP_SHAPES
    ]


def gradient(group: int, rank: int, step: int, x: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 * group + 100 * step + rank)
    g = torch.randn(x.numel(), generator=gen, dtype=x.dtype) * (1 + x.abs())
    if group == NO_GRAD[0]:
        start = torch.Size(GROUP_SHAPES[1][0]).numel()
        g[start:] = 0.0
    return g


def _compressor(kwargs: dict) -> dict:
    out = dict(kwargs)
    if out.get("compressor") in ("topk", "randk"):
        out["compressor"] = get_compressor(out["compressor"], ratio=0.2)
    return out


def train_on_groups(make_optimizer, rank: int, steps: int, group_hparams: list[dict], dtype=torch.float64, device="cpu"):
    """The harness's two parameter groups (with ``group_hparams``) trained ``steps`` steps on this
    rank's gradients by ``make_optimizer(groups)``: (each group's flat parameters after each step, the optimizer)."""
    params = []
    groups = []
    for gi, (shapes, x0) in enumerate(zip(GROUP_SHAPES, initial_groups(dtype))):
        ps = [
            torch.nn.Parameter(t.reshape(s).clone().to(device))
            for t, s in zip(x0.split([torch.Size(s).numel() for s in shapes]), shapes)
        ]
        params.append(ps)
        groups.append({"params": ps, **group_hparams[gi]})
    opt = make_optimizer(groups)
    history = []
    for t in range(1, steps + 1):
        for gi, ps in enumerate(params):
            flat = torch.cat([p.detach().reshape(-1) for p in ps])
            g = gradient(gi, rank, t, flat.cpu()).to(device)
            for pi, (p, gp) in enumerate(zip(ps, g.split([p.numel() for p in ps]))):
                p.grad = None if (gi, pi) == NO_GRAD else gp.reshape(p.shape).clone()
        opt.step()
        history.append([torch.cat([p.detach().reshape(-1) for p in ps]).cpu() for ps in params])
    return history, opt


def run_optimizer(case: str, rank: int, transport, steps: int, dtype=torch.float64, block_size=None, device="cpu"):
    opt_cls, kwargs, _, _ = CASES[case]
    hparams = [{"lr": GROUP_LR[gi], **GROUP_HPARAMS.get(case, [{}, {}])[gi]} for gi in range(len(GROUP_SHAPES))]
    history, opt = train_on_groups(
        lambda groups: opt_cls(groups, transport=transport, block_size=block_size, **_compressor(kwargs)),
        rank, steps, hparams, dtype, device,
    )  # fmt: skip
    return history, opt.comm_stats


def run_reference(case: str, world_size: int, steps: int, dtype=torch.float64, block_size=None):
    """The reference on the one bucket both groups form; returns the iterates split by group."""
    _, _, ref_cls, kwargs = CASES[case]
    kwargs = dict(kwargs)
    scale_blocks = kwargs.pop("scale_blocks", "fixed")
    x0s = initial_groups(dtype)
    sizes = [x.numel() for x in x0s]
    x0 = torch.cat(x0s)
    hparams = _reference_hparams(case, sizes, dtype)
    tensor_sizes = tuple(torch.Size(s).numel() for shapes in GROUP_SHAPES for s in shapes)
    layout = make_layout(tensor_sizes, world_size, block_size, scale_blocks)
    ref = ref_cls(x0, world_size, layout, **hparams, **_compressor(kwargs))
    ref.group = 0  # the bucket's index
    history = []
    for t in range(1, steps + 1):
        grads = [
            torch.cat([gradient(gi, r, t, x) for gi, x in enumerate(ref.x.split(sizes))]) for r in range(world_size)
        ]
        history.append([x.clone() for x in ref.step(grads).split(sizes)])
    return history


def max_abs_diff(got, expected) -> float:
    """Largest ``|a - b| / max(1, |b|)`` over steps, groups and coordinates (absolute near 0, relative above 1)."""
    return max(
        float(((a - b).abs() / b.abs().clamp_min(1.0)).max())
        for step_g, step_e in zip(got, expected)
        for a, b in zip(step_g, step_e)
    )
