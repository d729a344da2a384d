"""Compressor lookup by name: ``get_compressor("scaled_sign")``, ``get_compressor("topk", ratio=0.01)``."""

from __future__ import annotations

import difflib

from .base import Compressor
from .sign import ScaledSign, ScaledSignL1, ScaledSignL2, check_worker_scale_scope
from .topk import RandK, TopK

COMPRESSOR_NAMES = ("scaled_sign", "sign_l2", "topk", "randk")
#: The names whose compressors take ``worker_scale_scope`` (``compressors.sign``).
SCALED_SIGN_NAMES = ("scaled_sign", "sign_l2")


def get_compressor(
    name: str | Compressor, *, ratio: float | None = None, worker_scale_scope: str | None = None
) -> Compressor:
    """Build a compressor from its name; a ``Compressor`` instance is returned as is.

    ``worker_scale_scope``: the scaled-sign setting ("block" or "tensor"; None: "block"). With an
    instance it must agree with the instance's own (which it cannot change)."""
    if worker_scale_scope is not None:
        check_worker_scale_scope(worker_scale_scope)
    if isinstance(name, Compressor):
        check_scope_agrees(name, worker_scale_scope)
        return name
    if not isinstance(name, str):
        raise TypeError(f"Invalid compressor={name!r}: must be a name in {COMPRESSOR_NAMES} or a Compressor.")
    if ratio is not None and name not in ("topk", "randk"):
        raise ValueError(f"Invalid ratio={ratio!r} for compressor={name!r}: only 'topk' and 'randk' take a ratio.")
    if worker_scale_scope == "tensor" and name in COMPRESSOR_NAMES and name not in SCALED_SIGN_NAMES:
        raise_tensor_needs_scaled_sign(name)
    match name:
        case "scaled_sign":
            return ScaledSignL1(worker_scale_scope or "block")
        case "sign_l2":
            return ScaledSignL2(worker_scale_scope or "block")
        case "topk":
            return TopK(0.01 if ratio is None else ratio)
        case "randk":
            return RandK(0.01 if ratio is None else ratio)
        case _:
            hint = difflib.get_close_matches(name, COMPRESSOR_NAMES, n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"Unknown compressor={name!r}. Allowed: {', '.join(COMPRESSOR_NAMES)}.{extra}")


def raise_tensor_needs_scaled_sign(compressor: object) -> None:
    raise ValueError(
        f"worker_scale_scope='tensor' needs a scaled-sign compressor ('scaled_sign' or 'sign_l2'), not "
        f"{getattr(compressor, 'name', compressor)!r}."
    )


def check_scope_agrees(compressor: Compressor, worker_scale_scope: str | None) -> None:
    """A ``worker_scale_scope`` given with a ``Compressor`` instance must be the instance's own (None: any)."""
    if worker_scale_scope is None or worker_scale_scope == compressor.worker_scale_scope:
        return
    if worker_scale_scope == "tensor" and not isinstance(compressor, ScaledSign):
        raise_tensor_needs_scaled_sign(compressor)
    raise ValueError(
        f"Invalid worker_scale_scope={worker_scale_scope!r} with compressor={compressor!r}, whose own "
        f"worker_scale_scope is {compressor.worker_scale_scope!r}: the scope is a setting of the compressor. "
        f"Build it with worker_scale_scope={worker_scale_scope!r}, or drop the worker_scale_scope keyword."
    )
