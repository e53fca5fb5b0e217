"""Tests of the tbf-shaped network namespace (skipped where namespaces are unavailable)."""
from __future__ import annotations

import subprocess

import pytest

from ssd_allreduce.bench.netns import (
    ShapedNetwork,
    burst_bytes,
    measure_bandwidth_mbps,
    namespaces_available,
    parse_rate_bits,
)

OK, REASON = namespaces_available()
needs_netns = pytest.mark.skipif(not OK, reason=REASON)
pytestmark = pytest.mark.timeout(20)


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("rate", ["100", "fast", "100mbps", "100 mbit", "-1mbit", "0gbit",
                                  "1Gbit", "", "mbit"])
def test_bad_rate_raises(rate: str) -> None:
    with pytest.raises(ValueError, match="kbit, mbit or gbit"):
        ShapedNetwork(rate)


def test_rate_parsing_and_burst() -> None:
    assert parse_rate_bits("100mbit") == 100e6
    assert parse_rate_bits("2.5gbit") == 2.5e9
    assert burst_bytes("100mbit") == 256 * 1024
    assert burst_bytes("10gbit") == 5_000_000  # 1.25e9 B/s / 250 = 4 ms


def test_prefix_outside_block_raises() -> None:
    with pytest.raises(RuntimeError, match="with ShapedNetwork"):
        ShapedNetwork("1gbit").prefix()


@needs_netns
@pytest.mark.parametrize(("rate", "low", "high"),
                         [("100mbit", 80, 110), ("1gbit", 800, 1100)])
def test_shaped_bandwidth(rate: str, low: float, high: float) -> None:
    with ShapedNetwork(rate) as net:
        assert net.prefix() == ["ip", "netns", "exec", net.name]
        assert net.name in _namespaces()
        mbps = measure_bandwidth_mbps(net.prefix(), seconds=1.0)
    assert low <= mbps <= high, f"{rate}: measured {mbps:.1f} Mbit/s"


@needs_netns
def test_namespace_deleted_on_exit() -> None:
    with ShapedNetwork(None, name="ssd-test-exit") as net:
        assert "ssd-test-exit" in _namespaces()
    assert net.name not in _namespaces()


@needs_netns
def test_namespace_deleted_when_body_raises() -> None:
    net = ShapedNetwork("1gbit")
    with pytest.raises(KeyError):
        with net:
            assert net.name in _namespaces()
            raise KeyError("boom")
    assert net.name not in _namespaces()
