"""Emulated nodes on one machine: one network namespace per node (its loopback fast), each joined
to a bridge by a veth pair whose two ends are shaped with ``tc tbf`` (the node's link, both ways).
Ranks of a node run in its namespace; traffic between nodes crosses two shaped links, traffic
inside a node does not leave it.

    with EmulatedNodes(2, "100mbit") as nodes:
        horovodrun -np 4 -H localhost:4 --gloo --network-interface lo  <nodes.horovod_rank_prefix(2)>  python ...

Needs root (CAP_NET_ADMIN), iproute2 and the kernel's bridge, veth and tbf; ``emulated_nodes_available``
says plainly what is missing. tc's netem (link delay) is used where the kernel has it.
"""
from __future__ import annotations

import math
import os
import shutil
import socket
from pathlib import Path
from types import TracebackType
from typing import Optional

from .netns import _run, parse_rate_bits

IFACE = "ssd0"              # every node's link, named alike inside each namespace
MIN_LINK_BURST_BYTES = 16 * 1024
"""tbf's bucket on a node's link (MTU 1500, so much smaller than the loopback's): the smallest
that carried Gloo here; a large bucket lets a quiet link's next burst pass above the rate."""


def link_burst_bytes(rate: str) -> int:
    """Token bucket of a node link: 1 ms of traffic, at least ``MIN_LINK_BURST_BYTES``."""
    return max(MIN_LINK_BURST_BYTES, math.ceil(parse_rate_bits(rate) / 8 / 1000))


def shape_link(dev: str, rate: str, delay: Optional[str] = None, netns: Optional[str] = None) -> None:
    """Shape one end of a node's link, ``dev`` (in network namespace ``netns``, or this one), to
    ``rate`` with tbf, after ``delay`` with netem where given. Empty strings count as None (the
    emulated cluster of scripts/cluster_local.sh calls it from the shell)."""
    parse_rate_bits(rate)
    where = ["ip", "netns", "exec", netns] if netns else []
    tbf = ["tbf", "rate", rate, "burst", str(link_burst_bytes(rate)), "latency", "400ms"]
    if delay:
        _run(where + ["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem", "delay", delay])
        _run(where + ["tc", "qdisc", "add", "dev", dev, "parent", "1:", "handle", "2:", *tbf])
    else:
        _run(where + ["tc", "qdisc", "replace", "dev", dev, "root", *tbf])


class EmulatedNodes:
    """Context manager: ``count`` namespaces on a bridge, links shaped to ``rate`` (None: unshaped)
    with ``delay`` (e.g. "1ms", where netem exists). Everything is removed on exit, also on error."""

    def __init__(self, count: int, rate: Optional[str], delay: Optional[str] = None) -> None:
        if count < 1:
            raise ValueError(f"need at least one node, got {count}")
        if rate is not None:
            parse_rate_bits(rate)
        self.count, self.rate, self.delay = count, rate, delay
        pid, n = os.getpid(), next(_ids) % 100
        self.bridge = f"ssdb{pid}x{n}"                                   # <= 15 characters
        self.namespaces = [f"ssdn{pid}x{n}-{i}" for i in range(count)]
        self.outer = [f"sv{pid % 10**6}{n:02d}{i:02d}" for i in range(count)]   # the bridge's end of each link
        self.subnet = f"10.{200 + pid % 50}.{(pid // 50 * 100 + n) % 250}"
        self._made: list[str] = []

    def address(self, node: int) -> str:
        return f"{self.subnet}.{node + 1}"

    @property
    def bridge_address(self) -> str:
        return f"{self.subnet}.254"

    def __enter__(self) -> "EmulatedNodes":
        remove_leftovers()
        try:
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            self._made.append("bridge")
            _run(["ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            for i, (ns, outer) in enumerate(zip(self.namespaces, self.outer)):
                self._add_node(i, ns, outer)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _add_node(self, i: int, ns: str, outer: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._made.append(ns)
        inside = ["ip", "netns", "exec", ns]
        _run(inside + ["ip", "link", "set", "lo", "up"])
        _run(["ip", "link", "add", outer, "type", "veth", "peer", "name", IFACE, "netns", ns])
        _run(["ip", "link", "set", outer, "master", self.bridge, "up"])
        _run(inside + ["ip", "addr", "add", f"{self.address(i)}/24", "dev", IFACE])
        _run(inside + ["ip", "link", "set", IFACE, "up"])
        # `ip netns exec` shows /etc/netns/NS/hosts as /etc/hosts: the host name resolves to the
        # node's address, as on a real node (Horovod's Gloo process sets bind to it)
        hosts = Path("/etc/netns") / ns / "hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(f"127.0.0.1 localhost\n{self.address(i)} {socket.gethostname()}\n")
        if self.rate is not None:
            shape_link(IFACE, self.rate, self.delay, ns)
            shape_link(outer, self.rate, self.delay)

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        for name in reversed(self._made):
            try:
                if name == "bridge":
                    _run(["ip", "link", "delete", self.bridge])
                else:
                    _run(["ip", "netns", "delete", name])   # takes its veth pair with it
                    shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
            except RuntimeError:
                pass
        self._made = []

    def prefix(self, node: int) -> list[str]:
        """Command prefix that runs a command on ``node``."""
        return ["ip", "netns", "exec", self.namespaces[node]]

    def horovod_rank_prefix(self, ranks_per_node: int) -> list[str]:
        """The command horovodrun (on the host, ``--network-interface lo``) runs for every rank,
        in front of the rank's own: it enters node ``HOROVOD_RANK // ranks_per_node``, names it in
        ``$SSD_NODE``, and points Gloo at the node's link and the host's rendezvous server."""
        script = (f'n=$((HOROVOD_RANK / {ranks_per_node})); nodes=({" ".join(self.namespaces)}); '
                  f'exec ip netns exec "${{nodes[$n]}}" env SSD_NODE="node$n" HOROVOD_GLOO_IFACE={IFACE} '
                  f'HOROVOD_GLOO_RENDEZVOUS_ADDR={self.bridge_address} "$@"')
        return ["bash", "-c", script, "node-exec"]

    def link_tx_bytes(self) -> int:
        """Bytes all nodes have sent over their links so far (what crossed between nodes)."""
        total = 0
        for node in range(self.count):
            out = _run(self.prefix(node) + ["cat", f"/sys/class/net/{IFACE}/statistics/tx_bytes"]).stdout
            total += int(out)
        return total


_ids = iter(range(10**9))


def remove_leftovers() -> None:
    """Delete the namespaces and bridges that emulated nodes of processes no longer alive left
    (a benchmark killed with SIGKILL cannot clean up)."""
    def dead(name: str, prefix: str) -> bool:
        pid = name[len(prefix):].split("x")[0]
        if not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    for line in _run(["ip", "netns", "list"]).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith("ssdn") and dead(name, "ssdn"):
            _run(["ip", "netns", "delete", name])
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
    for line in _run(["ip", "-o", "link", "show", "type", "bridge"]).stdout.splitlines():
        name = line.split(":")[1].strip() if ":" in line else ""
        if name.startswith("ssdb") and dead(name, "ssdb"):
            _run(["ip", "link", "delete", name])


def emulated_nodes_available() -> tuple[bool, str]:
    """Whether emulated nodes can be made here; the reason is plain when not."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False, "`ip`/`tc` (iproute2) not found on PATH; install iproute2"
    try:
        with EmulatedNodes(1, "1mbit"):
            pass
    except RuntimeError as err:
        who = "root" if os.geteuid() == 0 else f"not root (uid {os.geteuid()})"
        return False, f"cannot make a bridge, a veth pair and a tbf qdisc here ({who}): {err}"
    return True, "namespaces, a bridge, veth pairs and tbf work"


def netem_available() -> bool:
    """Whether tc's netem (link delay) works here."""
    try:
        with EmulatedNodes(1, "1mbit", delay="1ms"):
            return True
    except RuntimeError:
        return False
