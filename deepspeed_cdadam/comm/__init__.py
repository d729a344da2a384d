"""Moving compressed payloads: shard layout, byte accounting, transports."""

from .accounting import CommStats
from .layout import ShardLayout
from .transport import InProcessWorld, TorchDistributedTransport, Transport

__all__ = ["CommStats", "InProcessWorld", "ShardLayout", "TorchDistributedTransport", "Transport"]
