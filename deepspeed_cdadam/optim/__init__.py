"""Optimizers: CD-Adam and 1-bit Adam over compressed exchanges."""

from .cd_adam import CDAdam
from .onebit_adam import OneBitAdam

__all__ = ["CDAdam", "OneBitAdam"]
