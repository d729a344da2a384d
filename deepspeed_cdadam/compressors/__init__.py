"""Compressors: scaled sign (L1 and L2 scale), top-k, rand-k, and sign bit packing."""

from .base import Compressor
from .packing import pack_signs, unpack_signs
from .registry import COMPRESSOR_NAMES, get_compressor
from .sign import ScaledSignL1, ScaledSignL2, scaled_sign_l1, scaled_sign_l2, sign_plus
from .topk import RandK, TopK

__all__ = [
    "COMPRESSOR_NAMES",
    "Compressor",
    "RandK",
    "ScaledSignL1",
    "ScaledSignL2",
    "TopK",
    "get_compressor",
    "pack_signs",
    "scaled_sign_l1",
    "scaled_sign_l2",
    "sign_plus",
    "unpack_signs",
]
