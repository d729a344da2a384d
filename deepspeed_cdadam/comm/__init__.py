"""Moving compressed payloads: shard layout, byte accounting, transports."""

from .accounting import CommStats
from .layout import ShardLayout
from .transport import InProcessWorld, Pending, TorchDistributedTransport, Transport, node_groups

__all__ = [
    "CommStats",
    "InProcessWorld",
    "Pending",
    "ShardLayout",
    "TorchDistributedTransport",
    "Transport",
    "node_groups",
]
