"""Optimizers: CD-Adam, 1-bit Adam, 1-bit LAMB and EF21 over compressed exchanges."""

from .adacgd import AdaCGD
from .birder import Birder
from .cd_adam import CDAdam
from .ef21 import EF21
from .liec_sgd import LIECSGD
from .onebit_adam import OneBitAdam
from .onebit_lamb import OneBitLamb
from .sketched_amsgrad import SketchedAMSGrad
from .zero_one_adam import ZeroOneAdam

__all__ = ["AdaCGD", "Birder", "EF21", "LIECSGD", "CDAdam", "OneBitAdam", "OneBitLamb", "SketchedAMSGrad", "ZeroOneAdam"]
