"""Communication backends behind one interface: Horovod, torch.distributed, mpi4py."""
from __future__ import annotations

from typing import Any, Union

from .base import Communicator, Handle, ReduceOp, payload_bytes

BACKENDS = ("horovod", "torch", "mpi")


def make_communicator(backend: Union[str, Communicator], process_set: Any = None) -> Communicator:
    """A communicator for ``backend`` ("horovod", "torch", "mpi") or the instance given."""
    if isinstance(backend, Communicator):
        if process_set is not None:
            raise ValueError("process_set is ignored with a Communicator instance: build the "
                             "communicator on the process set instead")
        return backend
    if backend == "horovod":
        from .horovod import HorovodCommunicator
        return HorovodCommunicator(process_set)
    if process_set is not None:
        raise ValueError(f"process_set is a Horovod concept; backend={backend!r} takes a "
                         "communicator instance built on your group/communicator instead")
    if backend == "torch":
        from .torch_dist import TorchDistCommunicator
        return TorchDistCommunicator()
    if backend == "mpi":
        from .mpi import MPICommunicator
        return MPICommunicator()
    raise ValueError(f"backend must be one of {BACKENDS} or a Communicator, got {backend!r}")


__all__ = ["BACKENDS", "Communicator", "Handle", "ReduceOp", "make_communicator", "payload_bytes"]
