"""A GAN-style loop: two SSD-SGD optimizers in one process, both with a window in flight at once,
ranks slightly out of step. Prints each optimizer's landings and a checksum of its W."""
import os
import sys
import time

import horovod.torch as hvd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import problem  # noqa: E402

import ssd_allreduce  # noqa: E402

hvd.init()
torch.set_num_threads(1)
models = {"D": problem.make_model(), "G": problem.make_model()}
opts = {name: ssd_allreduce.DistributedOptimizer(problem.make_sgd(m.parameters()),
                                                 named_parameters=m.named_parameters(),
                                                 named_buffers=m.named_buffers(),
                                                 sync_every=2, delay=2, warmup_steps=1)
        for name, m in models.items()}
for step in range(9):
    for name, model in models.items():
        x, y = problem.batch(hvd.rank(), step)
        opts[name].zero_grad()
        problem.loss_fn(model(x), y).backward()
        opts[name].step()
        if hvd.rank() == 1:
            time.sleep(0.02)        # rank 1 lags: rank 0 launches the next name while this one waits
ssd_allreduce.finish()
for name, opt in opts.items():
    checksum = sum(float(w.double().sum()) for w in opt.global_weights)
    print(f"rank {hvd.rank()} {name}: landed {opt.ssd_stats.windows_landed}, W checksum {checksum:.12e}",
          flush=True)
