"""Optimizers: CD-Adam, 1-bit Adam and EF21 over compressed exchanges."""

from .cd_adam import CDAdam
from .ef21 import EF21
from .onebit_adam import OneBitAdam

__all__ = ["EF21", "CDAdam", "OneBitAdam"]
