"""The roll call's goodbye (train/rollcall.py): a rank that printed why it stops waits, briefly, for
the peers stopping too to print theirs, since the first rank to exit makes the launcher end the rest;
and when the watchdog asks it who is lost."""
from __future__ import annotations

import datetime
import threading
import time
from typing import Iterator

import pytest
import torch.distributed as dist

from ssd_allreduce.train.rollcall import RollCall
from ssd_allreduce.train.watchdog import Watchdog

PEERS = [("node", 101), ("node", 102)]


@pytest.fixture
def ranks() -> Iterator[tuple[RollCall, RollCall]]:
    """Rank 0 (serving the store) and rank 1, as two roll calls in this process."""
    timeout = datetime.timedelta(seconds=5)
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    client = dist.TCPStore("127.0.0.1", master.port, is_master=False, timeout=timeout)
    address = ("127.0.0.1", master.port)
    pair = (RollCall(master, address, 0, PEERS, lambda: "step 7"),
            RollCall(client, address, 1, PEERS, lambda: "step 7"))
    yield pair
    for rollcall in reversed(pair):
        rollcall.close()


def test_a_rank_that_said_why_waits_for_a_leaving_peer_to_say_its_own(ranks):
    first, second = ranks[1], ranks[0]
    first.leave("CheckpointError")
    second.leave("CheckpointError")
    returned: list[float] = []
    waiter = threading.Thread(target=lambda: (first.said(within=10), returned.append(time.monotonic())))
    waiter.start()
    time.sleep(1)                          # the peer still watching the roll call, its message not out
    assert not returned, "exited before its leaving peer had said why"
    second_said = time.monotonic()
    second.said()
    waiter.join(10)
    assert returned and 0 <= returned[0] - second_said < 2, "did not go once its peer had said why"


@pytest.mark.parametrize("peer", [None, "finished"])
def test_a_peer_training_on_or_finished_is_not_waited_for(ranks, peer):
    alone, other = ranks[1], ranks[0]
    if peer:
        other.leave(peer)                  # it ended its run normally: it never says why it stops
    alone.leave("ValueError")              # a rank that raised alone
    started = time.monotonic()
    alone.said(within=10)
    assert time.monotonic() - started < 2


def test_a_leaving_peer_that_never_says_is_waited_for_within_the_bound_only(ranks):
    alone, other = ranks[1], ranks[0]
    other.leave("ValueError")
    alone.leave("ValueError")
    started = time.monotonic()
    alone.said(within=1)
    assert 0.9 < time.monotonic() - started < 3


def test_where_rank_0_did_not_answer_the_roll_call_nobody_is_waited_for(ranks):
    alone, other = ranks[1], ranks[0]
    other.leave("ValueError")
    alone.store_answers = False            # what lost() found: a frozen rank 0 would block each store call
    started = time.monotonic()
    alone.said(within=10)
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("bound", [4.0, 9.0])
def test_the_watchdog_asks_the_roll_call_three_quarters_of_a_short_bound_before_it(bound, monkeypatch):
    """The roll call's watch runs after rank 0's store answers and needs beats' time: the watchdog
    asks min(longest answer, 3/4 of the bound) before the bound, more than half of it. The fake roll
    call stops the watchdog once asked; an ask that never comes reaches the bound's stop, made to
    raise here instead of ending the process."""
    asked: list[float] = []

    class RecordingRollCall:
        longest_answer = 6.5

        def lost(self, within: float) -> str:
            asked.append(within)
            watchdog.stop()
            return ""

    def exit_raises(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr("ssd_allreduce.train.watchdog.os._exit", exit_raises)
    watchdog = Watchdog(bound, rank=0)
    watchdog.rollcall = RecordingRollCall()
    watchdog.progress("step 30")
    watchdog._thread.join(bound + 5)
    # the ask comes at the first tick (bound / 10) past its time: 2.6-3.0 s and 5.6-6.5 s before
    assert len(asked) == 1 and bound / 2 + 0.2 < asked[0] <= min(6.5, 0.75 * bound) + 0.05, asked
