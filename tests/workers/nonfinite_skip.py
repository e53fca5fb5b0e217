"""nonfinite="skip" on real ranks: rank 1's weights go non-finite once; that window is skipped on
every rank, rank 1 goes back to W, and the windows after it land."""
import os
import sys

import horovod.torch as hvd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import problem  # noqa: E402

import ssd_allreduce  # noqa: E402

hvd.init()
torch.set_num_threads(1)
model = problem.make_model()
opt = ssd_allreduce.DistributedOptimizer(problem.make_sgd(model.parameters()),
                                         named_parameters=model.named_parameters(),
                                         named_buffers=model.named_buffers(), sync_every=2, delay=1,
                                         warmup_steps=2, nonfinite="skip")
for step in range(18):                      # 8 windows: launched at 3, 5, ..., 17
    if step == 4 and hvd.rank() == 1:
        with torch.no_grad():
            model[0].weight[0, 0, 0, 0] = float("nan")
    x, y = problem.batch(hvd.rank(), step)
    opt.zero_grad()
    problem.loss_fn(model(x), y).backward()
    opt.step()
opt.finish()
finite = all(bool(torch.isfinite(t).all()) for t in problem.model_tensors(model))
checksum = sum(float(w.double().sum()) for w in opt.global_weights)
s = opt.ssd_stats
print(f"rank {hvd.rank()}: landed {s.windows_landed}, skipped {s.windows_skipped}, finite {finite}, "
      f"W {checksum:.12e}", flush=True)
