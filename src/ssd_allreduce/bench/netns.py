"""An emulated slow network for benchmarks: a private network namespace whose
loopback is rate-limited with a token-bucket filter (``tc qdisc ... tbf``).

Ranks started with :meth:`ShapedNetwork.prefix` talk over 127.0.0.1 inside the
namespace, so all their traffic crosses the shaped ``lo``. Needs root (or
CAP_NET_ADMIN) and iproute2; use :func:`namespaces_available` to check first.
"""
from __future__ import annotations

import itertools
import math
import os
import re
import select
import shutil
import subprocess
import sys
from types import TracebackType
from typing import Sequence

COMMAND_TIMEOUT_S = 10.0
"""Timeout of each ``ip``/``tc`` call."""

TBF_LATENCY = "400ms"
"""Queue length of the tbf, as time; small queues made Gloo jobs fail."""

MIN_BURST_BYTES = 256 * 1024
"""Smallest token bucket; smaller buckets made Gloo jobs fail."""

_RATE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(kbit|mbit|gbit)$")
_RATE_UNIT_BITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}  # tc's rate units are decimal
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_counter = itertools.count()


def _run(cmd: Sequence[str], timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; raise RuntimeError with the command and its stderr on any failure."""
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as err:
        raise RuntimeError(f"`{shown}` failed: {cmd[0]!r} not found on PATH "
                           "(install iproute2)") from err
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"`{shown}` timed out after {timeout:g} s") from err
    if proc.returncode != 0:
        raise RuntimeError(f"`{shown}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def parse_rate_bits(rate: str) -> float:
    """Bits per second of a tc rate such as ``"100mbit"``, ``"1gbit"`` or ``"2.5gbit"``."""
    match = _RATE_RE.match(rate) if isinstance(rate, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(
            f"bad rate {rate!r}: use a positive number followed by kbit, mbit or gbit, "
            "e.g. '100mbit', '1gbit', '10gbit' (or None for an unshaped namespace)"
        )
    return float(match.group(1)) * _RATE_UNIT_BITS[match.group(2)]


def burst_bytes(rate: str) -> int:
    """Token-bucket size for ``rate``: 4 ms of traffic, at least 256 KiB."""
    return max(MIN_BURST_BYTES, math.ceil(parse_rate_bits(rate) / 8 / 250))


def _create(name: str) -> None:
    _run(["ip", "netns", "add", name])
    try:
        _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
    except RuntimeError:
        _delete(name)
        raise


def _shape(name: str, rate: str) -> None:
    _run(["ip", "netns", "exec", name, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf",
          "rate", rate, "burst", str(burst_bytes(rate)), "latency", TBF_LATENCY])


def _delete(name: str) -> None:
    _run(["ip", "netns", "delete", name])


class ShapedNetwork:
    """Context manager: a private network namespace with ``lo`` shaped to ``rate``.

    ``rate`` is a tc rate (``"100mbit"``, ``"1gbit"``, ``"10gbit"``) or None for
    an unshaped namespace. The namespace is deleted on exit, also on error.
    """

    def __init__(self, rate: str | None, name: str | None = None) -> None:
        if rate is not None:
            parse_rate_bits(rate)
        if name is not None and not _NAME_RE.match(name):
            raise ValueError(f"bad namespace name {name!r}: use 1-64 characters "
                             "from letters, digits, '_', '.', '-'")
        self.rate = rate
        self.name = name or f"ssd-{os.getpid()}-{next(_counter)}"
        self._entered = False

    def __enter__(self) -> ShapedNetwork:
        _create(self.name)
        if self.rate is not None:
            try:
                _shape(self.name, self.rate)
            except RuntimeError:
                _delete(self.name)
                raise
        self._entered = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._entered = False
        _delete(self.name)

    def prefix(self) -> list[str]:
        """Command prefix that runs a command inside the namespace."""
        if not self._entered:
            raise RuntimeError(f"namespace {self.name!r} does not exist: use prefix() "
                               "inside a `with ShapedNetwork(...)` block")
        return ["ip", "netns", "exec", self.name]


def namespaces_available() -> tuple[bool, str]:
    """Whether a shaped namespace can be made here; the reason is plain when not."""
    if shutil.which("ip") is None:
        return False, "`ip` (iproute2) not found on PATH; install iproute2"
    if shutil.which("tc") is None:
        return False, "`tc` (iproute2) not found on PATH; install iproute2"
    name = f"ssd-probe-{os.getpid()}-{next(_counter)}"
    try:
        _create(name)
    except RuntimeError as err:
        who = "running as root" if os.geteuid() == 0 else f"not root (uid {os.geteuid()})"
        return False, (f"cannot create a network namespace ({who}; needs CAP_NET_ADMIN "
                       f"and a kernel with netns support): {err}")
    try:
        _shape(name, "1mbit")
    except RuntimeError as err:
        reason = f"tc refused a tbf qdisc (kernel without sch_tbf?): {err}"
    else:
        reason = ""
    try:
        _delete(name)
    except RuntimeError as err:
        reason = reason or f"could not delete the probe namespace {name!r}: {err}"
    if reason:
        return False, reason
    return True, "network namespaces and tbf shaping work"


_RECEIVER = r"""
import socket, sys, time
srv = socket.socket()
srv.bind((sys.argv[1], 0))
srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
total, start = 0, None
while True:
    data = conn.recv(1 << 20)
    if not data:
        break
    if start is None:
        start = time.perf_counter()
    else:
        total += len(data)
print(total, time.perf_counter() - start if start is not None else 0.0, flush=True)
"""

_SENDER = r"""
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sock = socket.create_connection((host, port))
chunk = b"\0" * (1 << 16)
end = time.perf_counter() + seconds
while time.perf_counter() < end:
    sock.sendall(chunk)
sock.close()
"""


def measure_bandwidth_mbps(prefix: list[str], seconds: float = 1.0, host: str = "127.0.0.1",
                           sender_prefix: list[str] | None = None) -> float:
    """Mbit/s of one TCP stream to ``host``, the receiver run with ``prefix`` (e.g. a namespace's)
    and the sender with ``sender_prefix`` (default: the same).

    The receiver times from its first read to EOF and does not count that first
    read, so the token bucket's initial burst barely inflates the result.
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    timeout = seconds + 30.0
    receiver_cmd = [*prefix, sys.executable, "-c", _RECEIVER, host]
    receiver = subprocess.Popen(receiver_cmd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([receiver.stdout], [], [], COMMAND_TIMEOUT_S)
        port_line = receiver.stdout.readline() if ready else ""  # type: ignore[union-attr]
        if not port_line.strip().isdigit():
            receiver.kill()
            _, err = receiver.communicate(timeout=COMMAND_TIMEOUT_S)
            raise RuntimeError(f"`{' '.join(receiver_cmd[:-2])} <receiver>` did not report a "
                               f"port within {COMMAND_TIMEOUT_S:g} s: {err.strip()}")
        sender = prefix if sender_prefix is None else sender_prefix
        _run([*sender, sys.executable, "-c", _SENDER, host, port_line.strip(), str(seconds)], timeout=timeout)
        out, err = receiver.communicate(timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"bandwidth receiver `{' '.join(receiver_cmd[:-2])}` saw no EOF "
                           f"{COMMAND_TIMEOUT_S:g} s after the sender ended") from exc
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    if receiver.returncode != 0:
        raise RuntimeError(f"bandwidth receiver `{' '.join(receiver_cmd[:-2])}` failed "
                           f"(exit {receiver.returncode}): {err.strip()}")
    nbytes, elapsed = out.split()
    if float(elapsed) <= 0:
        raise RuntimeError(f"bandwidth receiver saw no data after its first read: {out.strip()!r}")
    return int(nbytes) * 8 / float(elapsed) / 1e6
