"""deepspeed-cdadam: communication-compressed adaptive optimizers (CD-Adam, 1-bit Adam).

Importing the package needs neither cupy, CUDA nor deepspeed.
"""

from .comm import CommStats, InProcessWorld, ShardLayout, TorchDistributedTransport, Transport
from .compressors import COMPRESSOR_NAMES, Compressor, get_compressor
from .exchange import EXCHANGE_NAMES
from .optim import CDAdam, OneBitAdam
from .types import CommTimeoutError

__version__ = "0.1.0"

__all__ = [
    "COMPRESSOR_NAMES",
    "EXCHANGE_NAMES",
    "CDAdam",
    "CommStats",
    "CommTimeoutError",
    "Compressor",
    "InProcessWorld",
    "OneBitAdam",
    "ShardLayout",
    "TorchDistributedTransport",
    "Transport",
    "get_compressor",
]
