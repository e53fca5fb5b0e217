"""Who is still there: every rank beats into a store that rank 0 serves, so a rank that stops on a
lost peer can name it (its rank, pid and host, and the step of its last beat). The backends cannot:
Gloo reports a closed connection, a frozen peer only a timeout, MPI nothing at all.

A peer is lost when its beat does not move while this rank watches (three beats' time) and it did
not say it was leaving; rank 0 is lost when its store does not answer. A beat goes once a second,
less often past 256 ranks (rank 0's store takes about 256 a second).
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
READ_KEY = "ssd.rollcall.read"   # counts the peers whose watch is over (rank 0 serves until then)


class RollCall:
    """Beats from a daemon thread with ``phase()`` (where training is). A store operation can block
    for good on a frozen rank 0 (TCPStore retries past its timeout), so none runs on a thread that
    must go on: beats have their own, and ``lost()`` waits for its reader with a deadline."""

    def __init__(self, store: Any, address: tuple[str, int], rank: int, peers: list[tuple[str, int]],
                 phase: Callable[[], str]) -> None:
        self.store, self.address, self.rank, self.peers, self.phase = store, address, rank, peers, phase
        self.interval = max(BEAT_SECONDS, len(peers) / RANKS_PER_BEAT_SECOND)
        self.leaving: Optional[str] = None
        self.has_said = False   # why it stops is printed (see ``said``)
        self.store_answers = True   # False once ``lost()`` found rank 0's store silent
        self._beats = 0
        self._beat_lock = threading.Lock()   # a beat from any thread carries the latest state
        self._beat()   # every rank's key exists before anyone reads it
        store.set_timeout(ANSWER_TIMEOUT)
        self._stopped = threading.Event()
        self._beating = threading.Thread(target=self._beat_on, name="ssd-rollcall", daemon=True)
        self._beating.start()

    @classmethod
    def start(cls, comm: Communicator, phase: Callable[[], str]) -> Optional["RollCall"]:
        """Collective over ``comm``; None on every rank (said once, on rank 0) where a rank cannot
        reach rank 0's store: naming a lost rank is worth no failed run."""
        peers = [tuple(p) for p in comm.allgather_object((socket.gethostname(), os.getpid()))]
        problem, store = None, None
        try:
            store, host, port = serve_from_rank0(comm, len({h for h, _ in peers}), CONNECT_TIMEOUT)
        except StoreUnavailable as exc:   # rank 0's, told to every rank
            problem = str(exc)
        except (RuntimeError, OSError) as exc:
            problem = f"rank {comm.rank} cannot reach rank 0's store: {exc}"
        problems = [p for p in comm.allgather_object(problem) if p]
        if problems:
            if comm.rank == 0:
                print(f"ssd_allreduce: no roll call (a lost rank will not be named): {problems[0]}", file=sys.stderr)
            return None
        rollcall = cls(store, (host, port), comm.rank, peers, phase)
        comm.allgather_object(None)
        return rollcall

    @property
    def longest_answer(self) -> float:
        """What ``lost()`` takes at most unless told less: rank 0's answer, then three beats' watch."""
        return ANSWER_TIMEOUT.total_seconds() + 3 * self.interval + 0.5

    def leave(self, why: str) -> None:
        """This rank stops on purpose (its own error, or the end): peers do not name it as lost.
        It beats on until the process ends, so a peer watching still sees it."""
        self.leaving = why
        beat = threading.Thread(target=self._beat_quietly, name="ssd-rollcall-leave", daemon=True)
        beat.start()
        beat.join(ANSWER_TIMEOUT.total_seconds())

    def said(self, within: float = ANSWER_TIMEOUT.total_seconds()) -> None:
        """This rank (leaving) has printed why it stops: tell the peers, then wait, at most ``within``
        seconds, until every peer that is leaving too has printed its own. A launcher ends every rank
        once one exits (horovodrun, torchrun, mpirun), so the first to exit would cut short a peer
        still watching the roll call before its message. Peers training on, lost or finished are not
        waited for."""
        self.has_said = True
        if not self.store_answers:
            return
        waiting = threading.Thread(target=self._wait_for_leaving_peers, args=(time.monotonic() + within,),
                                   name="ssd-rollcall-said", daemon=True)
        waiting.start()
        waiting.join(within)

    def _wait_for_leaving_peers(self, deadline: float) -> None:
        pending = [r for r in range(len(self.peers)) if r != self.rank]
        self._beat_quietly()
        try:
            reader = self._reader()
            while pending and time.monotonic() < deadline:
                # a peer training on, lost, or finished ("finished" never says) is not waited for
                pending = [r for r, b in _read_beats(reader, pending).items()
                           if b["leaving"] not in (None, "finished") and not b.get("said")]
                if pending:
                    time.sleep(max(0.05, len(pending) / RANKS_PER_BEAT_SECOND))
        except Exception:   # rank 0 (the store) is gone, or busy past its timeout: stop waiting
            return

    def _beat(self) -> None:
        with self._beat_lock:
            self._beats += 1
            self.store.set(f"beat/{self.rank}", json.dumps({"n": self._beats, "phase": self.phase(),
                                                            "leaving": self.leaving, "said": self.has_said}))

    def _beat_quietly(self) -> None:
        try:
            self._beat()
        except Exception:   # rank 0 busy or gone: the next beat tries again
            pass

    def _beat_on(self) -> None:
        while not self._stopped.wait(self.interval):
            self._beat_quietly()

    def close(self) -> None:
        """Stop beating and let go of the store, here and now (the end of a run): a store left to
        the interpreter's exit would be torn down while its threads still run."""
        self._stopped.set()
        self._beating.join(ANSWER_TIMEOUT.total_seconds() + self.interval)
        self.store = None

    def lost(self, within: Optional[float] = None) -> str:
        """The peers whose beat stopped, as "; lost: rank R (pid P on HOST), last heard at PHASE"
        (or rank 0 whose store does not answer); "" where every peer beats, is leaving, or could
        not be watched long enough to tell. Takes at most ``within`` seconds (default
        ``longest_answer``), less once every peer was seen."""
        within = self.longest_answer if within is None else within
        t0 = time.monotonic()
        answered, found = threading.Event(), []
        reader = threading.Thread(target=self._watch, args=(answered, found, t0 + within),
                                  name="ssd-rollcall-read", daemon=True)
        reader.start()
        if answered.wait(min(ANSWER_TIMEOUT.total_seconds(), within / 2)):
            reader.join(max(0.0, t0 + within - time.monotonic()))
        if not answered.is_set() or (found and found[0] is None):
            self.store_answers = False
            return "" if self.rank == 0 else f"; lost: {self._who(0)}, which keeps the roll call, does not answer"
        return found[0] if found else ""   # rank 0 answered, then no verdict in time: name nobody

    def _watch(self, answered: threading.Event, found: list[Optional[str]], deadline: float) -> None:
        """Watch the peers' beats until each beat again or said it is leaving, or ``deadline``;
        rank 0 also waits for the peers watching it to finish (it serves their store)."""
        peers = [r for r in range(len(self.peers)) if r != self.rank]
        try:
            reader = self._reader()
            first = _read_beats(reader, peers)
        except (RuntimeError, OSError):
            found.append(None)   # rank 0's store does not answer
            answered.set()
            return
        answered.set()
        try:
            started, now = time.monotonic(), dict(first)
            silent = [r for r in peers if not first[r]["leaving"]]
            while True:
                silent = [r for r in silent if now[r]["n"] == first[r]["n"] and not now[r]["leaving"]]
                watching = self.rank == 0 and reader.add(READ_KEY, 0) < len(peers) - len(silent)
                seen_enough = time.monotonic() - started >= 3 * self.interval   # three beats missed
                if ((not silent or seen_enough) and not watching) or time.monotonic() + self.interval / 2 > deadline:
                    break
                time.sleep(self.interval / 2)
                now.update(_read_beats(reader, silent))
            if self.rank != 0:
                reader.add(READ_KEY, 1)
        except (RuntimeError, OSError):   # rank 0 left (after serving, or lost): name nobody
            return
        if silent and time.monotonic() - started < 1.5 * self.interval:
            silent = []   # a live peer may not have beaten yet
        found.append("; lost: " + ", ".join(f"{self._who(r)}, last heard at {first[r]['phase']}" for r in silent)
                     if silent else "")

    def _reader(self) -> Any:
        """A client of rank 0's store of its own (for a thread that may block on it)."""
        import torch.distributed as dist

        return dist.TCPStore(*self.address, is_master=False, timeout=ANSWER_TIMEOUT)

    def _who(self, rank: int) -> str:
        host, pid = self.peers[rank]
        return f"rank {rank} (pid {pid} on {host})"


def _read_beats(reader: Any, ranks: list[int]) -> dict[int, dict]:
    """The last beat of each of ``ranks``."""
    return dict(zip(ranks, (json.loads(v) for v in reader.multi_get([f"beat/{r}" for r in ranks]))))
