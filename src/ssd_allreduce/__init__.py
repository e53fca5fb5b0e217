"""SSD-SGD (Several Steps Delay SGD, arXiv 2012.05396) on a non-blocking allreduce.

``DistributedOptimizer`` is a drop-in for ``horovod.torch.DistributedOptimizer``; ``finish()``
lands every window still in flight (it also runs at interpreter exit).
"""
from .compression import Compression
from .optimizer import DistributedOptimizer, SSDStats, finish

__version__ = "0.1.0"
__all__ = ["Compression", "DistributedOptimizer", "SSDStats", "finish", "__version__"]
