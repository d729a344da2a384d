"""deepspeed-cdadam: communication-compressed adaptive optimizers (CD-Adam, 1-bit Adam).

Importing the package needs neither cupy, CUDA nor deepspeed.
"""

from .comm import CommStats, InProcessWorld, ShardLayout, TorchDistributedTransport, Transport
from .compressors import COMPRESSOR_NAMES, Compressor, get_compressor
from .exchange import EXCHANGE_NAMES
from .optim import EF21, LIECSGD, AdaCGD, Birder, CDAdam, OneBitAdam, OneBitLamb, SketchedAMSGrad, ZeroOneAdam
from .optim.base import without_rank_state
from .types import CommTimeoutError

__version__ = "0.1.0"


def _register_with_deepspeed() -> None:
    """Register our optimizer types with DeepSpeed: now if its engine is imported, else the moment it is.

    Importing this package never imports deepspeed itself (that takes seconds and is optional).
    Registration runs inside ``import deepspeed``, after its engine module and after its pipeline
    engine module have loaded (DeepSpeed 0.19.6 loads the engine first, 0.19.7+ the pipeline engine,
    which imports the engine); it never raises (``integration.deepspeed.register`` warns and leaves
    DeepSpeed unpatched instead), so ``import deepspeed`` keeps working.
    """
    import importlib.abc
    import importlib.util
    import sys
    import warnings

    watched = ("deepspeed.runtime.engine", "deepspeed.runtime.pipe.engine")

    def register() -> None:
        try:
            from .integration.deepspeed import register as _register

            _register()
        except Exception as err:  # noqa: BLE001 - e.g. our integration module failing to import
            warnings.warn(
                f"deepspeed_cdadam: registering with DeepSpeed failed ({type(err).__name__}: {err}); "
                "DeepSpeed is left unpatched.",
                RuntimeWarning,
                stacklevel=2,
            )

    if watched[0] in sys.modules:
        register()
        return

    class _RegisterWhenEngineLoads(importlib.abc.MetaPathFinder):
        def __init__(self) -> None:
            self.waiting = set(watched)

        def find_spec(self, name, path, target=None):
            if name not in self.waiting:
                return None
            self.waiting.discard(name)
            if not self.waiting:
                sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)  # the other finders' spec (we no longer wait for it)
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
    "LIECSGD",
    "EXCHANGE_NAMES",
    "without_rank_state",
    "AdaCGD",
    "Birder",
    "CDAdam",
    "CommStats",
    "CommTimeoutError",
    "Compressor",
    "InProcessWorld",
    "OneBitAdam",
    "OneBitLamb",
    "ShardLayout",
    "TorchDistributedTransport",
    "Transport",
    "SketchedAMSGrad",
    "ZeroOneAdam",
    "get_compressor",
]
