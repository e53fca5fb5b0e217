"""A key-value store that rank 0 serves at the address its peers reach it by (told to them over a
communicator, so it works under every launcher and backend): where process groups of our own meet
(hierarchical SSD-SGD over Horovod) and where the training driver's roll call is kept."""
from __future__ import annotations

import datetime
import os
import socket
from typing import Any

from .comm import Communicator


class StoreUnavailable(RuntimeError):
    """Rank 0 could not serve the store where every rank can reach it (raised on every rank)."""


def interface() -> str:
    """The network interface the launcher chose for collectives, if it said ("" if not)."""
    for name in ("HOROVOD_GLOO_IFACE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        iface = os.environ.get(name, "").split(",")[0].strip()
        if iface:
            return iface
    return ""


def address_of(iface: str) -> str:
    """This host's IPv4 address on ``iface``."""
    import psutil

    for addr in psutil.net_if_addrs().get(iface, []):
        if addr.family == socket.AF_INET:
            return addr.address
    raise StoreUnavailable(f"the network interface {iface!r} (from the launcher's environment) has no IPv4 "
                           "address on this host: set HOROVOD_GLOO_IFACE / GLOO_SOCKET_IFNAME to one it has")


def serve_from_rank0(comm: Communicator, hosts: int, timeout: datetime.timedelta) -> tuple[Any, str, int]:
    """(a TCPStore client, the server's address, its port), collective over ``comm``: rank 0 serves
    the store on the launcher's interface (else at its host name's address) and every rank
    connects. What went wrong on rank 0 is raised on every rank as ``StoreUnavailable``."""
    import torch.distributed as dist

    where: Any = None
    if comm.rank == 0:
        try:
            iface = interface()
            host = address_of(iface) if iface else socket.gethostbyname(socket.gethostname())
            if host.startswith("127.") and hosts > 1:
                raise StoreUnavailable(
                    f"this host's name resolves to the loopback address {host}, which the other hosts cannot "
                    "reach: set GLOO_SOCKET_IFNAME (or HOROVOD_GLOO_IFACE) to the network interface between nodes")
            server = dist.TCPStore(host, 0, comm.size, True, timeout=timeout, wait_for_workers=False)
            where = ("ok", host, server.port)
        except (OSError, RuntimeError) as exc:
            where = ("error", str(exc))
    told = comm.allgather_object(where)[0]
    if told[0] == "error":
        raise StoreUnavailable(f"rank 0 could not serve a store for the ranks to meet in: {told[1]}")
    _, host, port = told
    store = server if comm.rank == 0 else dist.TCPStore(host, port, comm.size, False, timeout=timeout)
    return store, host, port
