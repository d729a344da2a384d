"""deepspeed-cdadam: communication-compressed adaptive optimizers (CD-Adam, 1-bit Adam).

Importing the package needs neither cupy, CUDA nor deepspeed.
"""

from .comm import CommStats, InProcessWorld, ShardLayout, TorchDistributedTransport, Transport
from .compressors import COMPRESSOR_NAMES, Compressor, get_compressor
from .exchange import EXCHANGE_NAMES
from .optim import EF21, CDAdam, OneBitAdam
from .types import CommTimeoutError

__version__ = "0.1.0"


def _register_with_deepspeed() -> None:
    """Register our optimizer types with DeepSpeed: now if its engine is imported, else the moment it is.

    Importing this package never imports deepspeed itself (that takes seconds and is optional).
    """
    import importlib.abc
    import importlib.util
    import sys

    engine_module = "deepspeed.runtime.engine"

    def register() -> None:
        from .integration.deepspeed import register as _register

        _register()

    if engine_module in sys.modules:
        register()
        return

    class _RegisterWhenEngineLoads(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != engine_module:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_then_register(module):
                    exec_module(module)
                    register()

                spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
            return spec

    if not any(isinstance(f, _RegisterWhenEngineLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenEngineLoads())


_register_with_deepspeed()

__all__ = [
    "COMPRESSOR_NAMES",
    "EF21",
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
