"""Rank 1 builds another optimizer than rank 0 (--what settings: sync_every 3 instead of 2;
--what model: a wider layer), or every rank casts its model after wrapping (--what cast): every
rank must stop at the first step with the same error."""
import argparse
import os
import sys

import horovod.torch as hvd
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import problem  # noqa: E402

import ssd_allreduce  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--what", choices=("settings", "model", "cast"), required=True)
args = ap.parse_args()
hvd.init()
odd = hvd.rank() == 1
model = problem.make_model()
if args.what == "model" and odd:
    model[4] = nn.Linear(4 * 6 * 6, 12)
opt = ssd_allreduce.DistributedOptimizer(problem.make_sgd(model.parameters()),
                                         named_parameters=model.named_parameters(),
                                         sync_every=3 if args.what == "settings" and odd else 2, warmup_steps=2)
x, y = problem.batch(hvd.rank(), 0)
if args.what == "cast":
    model.double()
    x = x.double()
problem.loss_fn(model(x)[:, :10], y).backward()
try:
    opt.step()
except (ValueError, RuntimeError) as exc:
    print(f"rank {hvd.rank()} refused: {exc}", flush=True)
    sys.exit(3)
