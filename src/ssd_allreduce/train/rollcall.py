"""Who is still there: every rank beats into a store that rank 0 serves, so a rank that stops on a
lost peer can name it (its rank, pid and host, and the step of its last beat). The backends cannot:
Gloo reports a closed connection, a frozen peer only a timeout, MPI nothing at all.

A peer is lost when its beat does not move while this rank watches (three beats' time) and it did
not say it was leaving; rank 0 is lost when its store does not answer.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional

from ..comm import Communicator
from ..rendezvous import StoreUnavailable, serve_from_rank0

BEAT_SECONDS = 1.0
RANKS_PER_BEAT_SECOND = 256    # rank 0's store takes about this many beats a second
CONNECT_TIMEOUT = datetime.timedelta(seconds=60)
ANSWER_TIMEOUT = datetime.timedelta(seconds=3)


class RollCall:
    """Beats from a daemon thread with ``phase()`` (where training is). A store operation can block
    for good on a frozen rank 0 (TCPStore retries past its timeout), so none runs on a thread that
    must go on: beats have their own, and ``lost()`` waits for its reader with a deadline."""

    def __init__(self, store: Any, address: tuple[str, int], rank: int, peers: list[tuple[str, int]],
                 phase: Callable[[], str]) -> None:
        self.store, self.address, self.rank, self.peers, self.phase = store, address, rank, peers, phase
        self.interval = max(BEAT_SECONDS, len(peers) / RANKS_PER_BEAT_SECOND)
        self.leaving: Optional[str] = None
        self._beats = 0
        self._beat()   # every rank's key exists before anyone reads it
        store.set_timeout(ANSWER_TIMEOUT)
        threading.Thread(target=self._beat_on, name="ssd-rollcall", daemon=True).start()

    @classmethod
    def start(cls, comm: Communicator, phase: Callable[[], str]) -> Optional["RollCall"]:
        """Collective over ``comm``; None (said once, on rank 0) where rank 0 cannot serve it."""
        peers = [tuple(p) for p in comm.allgather_object((socket.gethostname(), os.getpid()))]
        try:
            store, host, port = serve_from_rank0(comm, len({h for h, _ in peers}), CONNECT_TIMEOUT)
        except StoreUnavailable as exc:
            if comm.rank == 0:
                print(f"ssd_allreduce: no roll call (a lost rank will not be named): {exc}", file=sys.stderr)
            return None
        rollcall = cls(store, (host, port), comm.rank, peers, phase)
        comm.allgather_object(None)
        return rollcall

    @property
    def watch_seconds(self) -> float:
        """How long ``lost()`` watches a peer's beat before naming it (three beats)."""
        return 3 * self.interval

    @property
    def longest_answer(self) -> float:
        """The most ``lost()`` takes."""
        return ANSWER_TIMEOUT.total_seconds() + self.watch_seconds

    def leave(self, why: str) -> None:
        """This rank stops on purpose (its own error, or the end): peers do not name it as lost.
        It beats on until the process ends, so a peer watching still sees it."""
        self.leaving = why
        beat = threading.Thread(target=self._beat_quietly, name="ssd-rollcall-leave", daemon=True)
        beat.start()
        beat.join(ANSWER_TIMEOUT.total_seconds())

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(f"beat/{self.rank}", json.dumps({"n": self._beats, "phase": self.phase(),
                                                        "leaving": self.leaving}))

    def _beat_quietly(self) -> bool:
        try:
            self._beat()
            return True
        except Exception:   # rank 0 and its store are gone: a peer's lost() says so
            return False

    def _beat_on(self) -> None:
        while True:
            time.sleep(self.interval)
            if not self._beat_quietly():
                return

    def lost(self) -> str:
        """"; lost: ..." naming the peers whose beat stopped, or "" when every peer beats or is
        leaving. Returns as soon as every peer was seen alive, at the latest after
        ``longest_answer`` seconds."""
        answered, found = threading.Event(), []
        reader = threading.Thread(target=self._watch, args=(answered, found), name="ssd-rollcall-read", daemon=True)
        reader.start()
        if answered.wait(ANSWER_TIMEOUT.total_seconds()):
            reader.join(self.watch_seconds + 1.0)
        if found:
            return found[0]
        return "" if self.rank == 0 else f"; lost: {self._who(0)}, which keeps the roll call, does not answer"

    def _watch(self, answered: threading.Event, found: list[str]) -> None:
        """Read the beats until every peer beat again or is leaving (rank 0, whose store the others
        read, waits for them to be leaving), or ``watch_seconds`` passed; ``found`` gets the verdict."""
        import torch.distributed as dist

        keys = [f"beat/{r}" for r in range(len(self.peers))]
        peers = [r for r in range(len(self.peers)) if r != self.rank]
        try:
            reader = dist.TCPStore(*self.address, is_master=False, timeout=ANSWER_TIMEOUT)
            first = now = [json.loads(v) for v in reader.multi_get(keys)]
            answered.set()
            deadline = time.monotonic() + self.watch_seconds
            while time.monotonic() < deadline:
                silent = [r for r in peers if now[r]["n"] == first[r]["n"] and not now[r]["leaving"]]
                staying = [r for r in peers if not now[r]["leaving"]] if self.rank == 0 else []
                if not silent and not staying:
                    break
                time.sleep(0.2)
                now = [json.loads(v) for v in reader.multi_get(keys)]
        except (RuntimeError, OSError):   # rank 0's store went away
            if not answered.is_set() or not now[0]["leaving"]:
                return                    # the caller names rank 0
            silent = [r for r in peers if r != 0 and now[r]["n"] == first[r]["n"] and not now[r]["leaving"]]
        found.append("; lost: " + ", ".join(f"{self._who(r)}, silent since it was at {first[r]['phase']}"
                                            for r in silent) if silent else "")

    def _who(self, rank: int) -> str:
        host, pid = self.peers[rank]
        return f"rank {rank} (pid {pid} on {host})"
