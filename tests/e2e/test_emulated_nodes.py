"""Emulated nodes: the link between nodes is shaped (measured), traffic inside a node is not, and
a Horovod job spread over the nodes sends its inter-node bytes across the links (counted)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from launchers import BIN, run_ranks
from ssd_allreduce.bench.netns import measure_bandwidth_mbps
from ssd_allreduce.bench.nodes import EmulatedNodes, emulated_nodes_available, link_burst_bytes, netem_available

OK, REASON = emulated_nodes_available()
pytestmark = [pytest.mark.skipif(not OK, reason=REASON), pytest.mark.timeout(180)]


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True).stdout


def test_link_burst_is_small_but_carries_a_millisecond():
    assert link_burst_bytes("20mbit") == 16 * 1024
    assert link_burst_bytes("10gbit") == 1_250_000


def test_links_between_nodes_are_shaped_and_the_inside_of_a_node_is_not():
    with EmulatedNodes(2, "50mbit") as nodes:
        between = measure_bandwidth_mbps(nodes.prefix(1), seconds=1.0, host=nodes.address(1),
                                         sender_prefix=nodes.prefix(0))
        inside = measure_bandwidth_mbps(nodes.prefix(0), seconds=0.5, host=nodes.address(0))
        sent = nodes.link_tx_bytes()
        names = nodes.namespaces
        assert all(n in _namespaces() for n in names)
    assert 40 <= between <= 55, f"between nodes: {between:.1f} Mbit/s through a 50 Mbit/s link"
    assert inside > 10 * 50, f"inside a node: {inside:.1f} Mbit/s"
    assert sent >= between * 1e6 / 8 * 0.9   # the stream crossed node 0's link
    assert not any(n in _namespaces() for n in names)


def test_link_delay_where_netem_exists():
    if not netem_available():
        pytest.skip("this kernel has no sch_netem: links are shaped in bandwidth only")
    with EmulatedNodes(2, None, delay="20ms") as nodes:
        out = subprocess.run(nodes.prefix(0) + [sys.executable, "-c", (
            "import socket, time; s = socket.socket(); t = time.perf_counter();"
            f"s.connect_ex(('{nodes.address(1)}', 9)); print(time.perf_counter() - t)")],
            capture_output=True, text=True, timeout=30, check=True).stdout
    assert float(out) >= 0.04   # a connection attempt's round trip crosses two delayed links


def test_a_horovod_job_across_nodes_sends_its_allreduce_over_the_links(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(
        "import os, torch, horovod.torch as hvd\n"
        "hvd.init()\n"
        "x = hvd.allreduce(torch.full((1 << 18,), float(hvd.rank())), name='x')\n"
        "assert torch.all(x == 1.5), x\n"
        "print(os.environ['SSD_NODE'], 'ok', flush=True)\n")
    with EmulatedNodes(2, "200mbit") as nodes:
        before = nodes.link_tx_bytes()
        out = run_ranks([str(BIN / "horovodrun"), "-np", "4", "-H", "localhost:4", "--gloo",
                         "--network-interface", "lo", *nodes.horovod_rank_prefix(2), sys.executable, str(script)],
                        timeout=120)
        crossed = nodes.link_tx_bytes() - before
    assert sorted(line.split(":")[-1].split()[0] for line in out.splitlines() if line.endswith(" ok")) == ["node0"] * 2 + ["node1"] * 2
    assert crossed >= 1 << 20   # a 1 MiB tensor averaged across two nodes crosses their links


def test_what_a_killed_run_left_is_removed_by_the_next():
    """A benchmark killed with SIGKILL leaves its namespaces and bridge; the next run removes them."""
    code = ("import os, sys; sys.path.insert(0, 'src'); from ssd_allreduce.bench.nodes import EmulatedNodes\n"
            "n = EmulatedNodes(2, '50mbit').__enter__(); print(n.bridge, *n.namespaces, flush=True); os._exit(0)")
    left = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=True).stdout.split()
    assert all(ns in _namespaces() for ns in left[1:])
    with EmulatedNodes(1, None):
        assert not any(ns in _namespaces() for ns in left[1:])
        bridges = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout
        assert f" {left[0]}:" not in bridges
