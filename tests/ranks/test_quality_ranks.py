"""The quality study's real ranks follow its simulator: the same scheduled run of SSD-SGD (the
library's defaults for beta and the local learning rate, AdamW with its moments averaged, SGD with
the drift correction, and both at 4 ranks) and of Horovod's optimizer, on 2 and 4 ranks under
horovodrun, evaluated at the same steps, give the simulator's losses. So the simulator's tables at
8 and 16 ranks stand for real ranks."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from launchers import horovodrun, run_ranks
from ssd_allreduce.bench.quality import parse_variant
from ssd_allreduce.bench.quality_run import RunSpec, simulate

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("ranks, optimizer, variant", [(2, "adamw", "2:2:auto:auto+am"), (2, "sgd", "sync"),
                                                       (2, "sgd", "2:1+dc"), (4, "adamw", "3:3+am+dc")])
def test_real_ranks_follow_the_simulator(tmp_path, ranks, optimizer, variant):
    spec = RunSpec("regression", ranks, optimizer, "non-iid", 0, 24, 6, parse_variant(variant), evals=4)
    out = tmp_path / "result.json"
    run_ranks(horovodrun(ranks, "-m", "ssd_allreduce.bench.quality_run", json.dumps(asdict(spec)), str(out)))
    ranks = json.loads(out.read_text())
    sim = simulate(spec)
    assert [step for step, _ in ranks["curve"]] == [step for step, _ in sim.curve] == [6, 12, 18, 24]
    for (step, real), (_, simulated) in zip(ranks["curve"], sim.curve):
        assert real["val_loss"] == pytest.approx(simulated["val_loss"], rel=1e-4), step
