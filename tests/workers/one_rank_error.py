"""Rank 1 calls optimizer.step() without a backward pass at step --at: every rank must stop with
the same error (in the warm-up at once, in the delay stage at the window's landing)."""
import argparse
import os
import sys

import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import problem  # noqa: E402

import ssd_allreduce  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--at", type=int, required=True)
args = ap.parse_args()
hvd.init()
model = problem.make_model()
opt = ssd_allreduce.DistributedOptimizer(problem.make_sgd(model.parameters()),
                                         named_parameters=model.named_parameters(),
                                         sync_every=2, delay=2, warmup_steps=4)
try:
    for step in range(12):
        x, y = problem.batch(hvd.rank(), step)
        opt.zero_grad(set_to_none=True)
        if not (hvd.rank() == 1 and step == args.at):
            problem.loss_fn(model(x), y).backward()
        opt.step()
except RuntimeError as exc:
    print(f"rank {hvd.rank()} stopped at step {step}: {exc}", flush=True)
    sys.exit(3)
print(f"rank {hvd.rank()} finished", flush=True)
