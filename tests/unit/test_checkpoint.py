"""Checkpoint writing in one process, with a stand-in for the ranks' allgather."""
from __future__ import annotations

import pytest
import torch

from ssd_allreduce.train import checkpoint


def test_a_write_that_fails_on_one_rank_stops_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    alone = lambda obj: [obj]  # noqa: E731
    checkpoint.save(root, 10, 0, 1, {"w": torch.ones(2)}, {"model": "m"}, alone)
    (root / "step-00000020" / "rank-0.pt").mkdir(parents=True)       # the write cannot replace this
    (root / "step-00000020" / "rank-0.pt" / "x").write_text("")
    seen = []

    def two_ranks(obj):   # rank 1 wrote its file; this rank's failure must reach every rank
        seen.append(obj)
        return [obj, ("0" * 64, None)]

    with pytest.raises(checkpoint.CheckpointError, match=r"could not be written \(rank 0: IsADirectoryError"):
        checkpoint.save(root, 20, 0, 2, {"w": torch.zeros(2)}, {"model": "m"}, two_ranks)
    assert seen[0][0] is None and "IsADirectoryError" in seen[0][1]
    assert [d.name for d in checkpoint.complete(root)] == ["step-00000010"]
    assert (root / "latest").read_text() == "step-00000010"
