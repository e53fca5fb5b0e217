"""Leaves training with a window in flight and without calling finish(): the interpreter-exit hook
must land it on every rank (reported by an atexit handler registered before it, so it runs after)."""
import atexit
import os
import sys

import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import problem  # noqa: E402

import ssd_allreduce  # noqa: E402

hvd.init()
held = {}
atexit.register(lambda: print(f"rank {hvd.rank()} at exit: landed {held['opt'].ssd_stats.windows_landed}, "
                              f"in flight {held['opt'].window_in_flight}", flush=True))
model = problem.make_model()
opt = held["opt"] = ssd_allreduce.DistributedOptimizer(problem.make_sgd(model.parameters()),
                                                       named_parameters=model.named_parameters(),
                                                       sync_every=3, delay=3, warmup_steps=0)
for step in range(4):                      # the window launched at step 2 is still in flight
    x, y = problem.batch(hvd.rank(), step)
    opt.zero_grad()
    problem.loss_fn(model(x), y).backward()
    opt.step()
print(f"rank {hvd.rank()} leaving with a window in flight: {opt.window_in_flight}", flush=True)
