"""Compressor lookup by name: ``get_compressor("scaled_sign")``, ``get_compressor("topk", ratio=0.01)``."""

from __future__ import annotations

import difflib

from .base import Compressor
from .sign import ScaledSignL1, ScaledSignL2
from .topk import RandK, TopK

COMPRESSOR_NAMES = ("scaled_sign", "sign_l2", "topk", "randk")


def get_compressor(name: str | Compressor, *, ratio: float | None = None) -> Compressor:
    """Build a compressor from its name; a ``Compressor`` instance is returned as is."""
    if isinstance(name, Compressor):
        return name
    if not isinstance(name, str):
        raise TypeError(f"Invalid compressor={name!r}: must be a name in {COMPRESSOR_NAMES} or a Compressor.")
    if ratio is not None and name not in ("topk", "randk"):
        raise ValueError(f"Invalid ratio={ratio!r} for compressor={name!r}: only 'topk' and 'randk' take a ratio.")
    match name:
        case "scaled_sign":
            return ScaledSignL1()
        case "sign_l2":
            return ScaledSignL2()
        case "topk":
            return TopK(0.01 if ratio is None else ratio)
        case "randk":
            return RandK(0.01 if ratio is None else ratio)
        case _:
            hint = difflib.get_close_matches(name, COMPRESSOR_NAMES, n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"Unknown compressor={name!r}. Allowed: {', '.join(COMPRESSOR_NAMES)}.{extra}")
