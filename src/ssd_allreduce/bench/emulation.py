"""Where the comparison's ranks run: all on one shaped loopback (one namespace, every rank's traffic
through the same link), or on emulated nodes (a namespace per node, shaped links between them).
Where this machine cannot make them, the ranks run on the plain loopback and say so."""
from __future__ import annotations

import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from .netns import ShapedNetwork, measure_bandwidth_mbps, namespaces_available
from .nodes import EmulatedNodes, emulated_nodes_available


@dataclass
class Emulation:
    """How to launch into the emulated network, and what it measured."""

    label: str
    launcher_prefix: list[str]   # horovodrun runs behind it
    rank_prefix: list[str]       # every rank's command starts with it
    measured_mbps: Optional[float]
    nodes: int                   # 1: every rank shares the one loopback
    shaped: bool
    tx_bytes: Callable[[], Optional[int]]   # bytes sent so far over the shaped link(s)


def _node_names_only(ranks_per_node: int) -> list[str]:
    """Each rank told its node by ``$SSD_NODE``, without namespaces (the unshaped fallback)."""
    return ["bash", "-c", f'SSD_NODE="node$((HOROVOD_RANK / {ranks_per_node}))" exec "$@"', "node-name"]


def _lo_tx_bytes(prefix: list[str]) -> Optional[int]:
    try:
        return int(subprocess.run(prefix + ["cat", "/sys/class/net/lo/statistics/tx_bytes"], capture_output=True,
                                  text=True, timeout=10, check=True).stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def emulation_available(nodes: int) -> tuple[bool, str]:
    """Whether the namespaces (``nodes`` > 1: with a bridge and veth links) can be made here."""
    return emulated_nodes_available() if nodes > 1 else namespaces_available()


@contextmanager
def emulate(rate: Optional[str], nodes: int, ranks: int, available: bool = True) -> Iterator[Emulation]:
    """The network of one comparison at ``rate`` (a tc rate): ``nodes`` == 1, one shaped loopback
    for all ``ranks``; more, that many nodes of ``ranks // nodes`` ranks joined by shaped links.
    Not ``available``: the plain loopback (nodes named by ``$SSD_NODE`` only)."""
    if nodes > 1 and ranks % nodes:
        raise SystemExit(f"--ranks {ranks} cannot be split into --nodes {nodes} of equal size")
    per_node = ranks // nodes
    if not available:
        yield Emulation("unshaped loopback" + (f", {nodes} nodes named by $SSD_NODE" if nodes > 1 else ""), [],
                        _node_names_only(per_node) if nodes > 1 else [], None, nodes, False, lambda: None)
    elif nodes > 1:
        with EmulatedNodes(nodes, rate) as emulated:
            measured = measure_bandwidth_mbps(emulated.prefix(1), host=emulated.address(1),
                                              sender_prefix=emulated.prefix(0)) if rate else None
            yield Emulation(f"{nodes} nodes x {per_node} ranks, links tbf {rate or 'unshaped'}", [],
                            emulated.horovod_rank_prefix(per_node), measured, nodes, rate is not None,
                            emulated.link_tx_bytes)
    else:
        with ShapedNetwork(rate) as net:
            prefix = net.prefix()
            measured = measure_bandwidth_mbps(prefix) if rate else None
            yield Emulation(f"tbf {rate}" if rate else "unshaped namespace", prefix, [], measured, 1,
                            rate is not None, lambda: _lo_tx_bytes(prefix))
