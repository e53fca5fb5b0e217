"""nn.Embedding(sparse=True) under SSD-SGD on real ranks, beside a dense twin: the sparse gradients
are averaged sparse in the warm-up, and both models stay equal step for step."""
import sys

import horovod.torch as hvd
import torch
from torch import nn

import ssd_allreduce

hvd.init()
torch.set_num_threads(1)


def build(sparse: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 4, sparse=sparse), nn.Flatten(), nn.Linear(12, 3))
    opt = ssd_allreduce.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                             named_parameters=model.named_parameters(),
                                             sync_every=2, delay=1, warmup_steps=3)
    return model, opt


(sparse, sparse_opt), (dense, dense_opt) = build(True), build(False)
worst = 0.0
for step in range(9):
    g = torch.Generator().manual_seed(100 * hvd.rank() + step)
    x, y = torch.randint(0, 20, (5, 3), generator=g), torch.randint(0, 3, (5,), generator=g)
    for model, opt in ((sparse, sparse_opt), (dense, dense_opt)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert sparse[0].weight.grad.is_sparse
    worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(sparse.parameters(), dense.parameters())))
ssd_allreduce.finish()
print(f"rank {hvd.rank()}: max |sparse - dense| {worst:.3g}, warm-up allreduces "
      f"{sparse_opt.ssd_stats.warmup_allreduces}", flush=True)
sys.exit(0 if worst < 1e-6 else 1)
