"""SSD-SGD (Several Steps Delay SGD, arXiv 2012.05396) on a non-blocking allreduce.

``DistributedOptimizer`` is a drop-in for ``horovod.torch.DistributedOptimizer``; ``finish()``
lands every window still in flight (it also runs at interpreter exit). Names load lazily, so
``python -m ssd_allreduce.doctor`` works even where torch does not import.
"""
from importlib import import_module
from typing import Any

__version__ = "0.1.0"
_LAZY = {"DistributedOptimizer": "optimizer", "SSDStats": "stats", "SSDSettings": "settings", "finish": "optimizer",
         "Compression": "compression"}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ssd_allreduce' has no attribute {name!r}")
