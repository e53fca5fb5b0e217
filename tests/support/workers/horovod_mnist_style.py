"""A Horovod training script in the shape of Horovod's PyTorch MNIST and ImageNet examples (the
digits bundled with scikit-learn stand in for MNIST), where ``--optimizer ssd`` switches the one
line that builds the distributed optimizer. Every other line is what a Horovod user writes:
DistributedSampler, lr scaled by the world size, broadcasts before wrapping, fp16 compression,
gradient accumulation with backward_passes_per_step, hvd.broadcast_object of the start epoch,
per-batch lr adjustment or an LR scheduler built before wrapping, and metric averaging with
hvd.allreduce.
"""
import argparse

import horovod.torch as hvd
import torch
import torch.nn.functional as F
import torch.utils.data.distributed
from sklearn.datasets import load_digits
from torch import nn

import ssd_allreduce

parser = argparse.ArgumentParser()
parser.add_argument("--optimizer", choices=("horovod", "ssd"), default="horovod")
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--batches-per-allreduce", type=int, default=1)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--lr", type=float, default=0.02)
parser.add_argument("--momentum", type=float, default=0.5)
parser.add_argument("--fp16-allreduce", action="store_true")
parser.add_argument("--gradient-predivide-factor", type=float, default=1.0)
parser.add_argument("--scheduler", action="store_true", help="an LR scheduler built before wrapping")
args = parser.parse_args()

hvd.init()
torch.manual_seed(42)
torch.set_num_threads(1)

digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
y = torch.tensor(digits.target)
train_dataset = torch.utils.data.TensorDataset(x[:1500], y[:1500])
test_dataset = torch.utils.data.TensorDataset(x[1500:], y[1500:])
train_sampler = torch.utils.data.distributed.DistributedSampler(train_dataset, num_replicas=hvd.size(),
                                                                rank=hvd.rank())
train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size * args.batches_per_allreduce,
                                           sampler=train_sampler)
test_sampler = torch.utils.data.distributed.DistributedSampler(test_dataset, num_replicas=hvd.size(),
                                                               rank=hvd.rank())
test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=64, sampler=test_sampler)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return F.log_softmax(self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1)), dim=1)


model = Net()
lr_scaler = hvd.size() * args.batches_per_allreduce
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * lr_scaler, momentum=args.momentum)

resume_from_epoch = hvd.broadcast_object(0, root_rank=0, name="resume_from_epoch")
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)

scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7) if args.scheduler else None
compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
if args.optimizer == "horovod":
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression, op=hvd.Average,
                                         backward_passes_per_step=args.batches_per_allreduce,
                                         gradient_predivide_factor=args.gradient_predivide_factor)
else:   # the one line that changes
    optimizer = ssd_allreduce.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                   compression=compression, op=hvd.Average,
                                                   backward_passes_per_step=args.batches_per_allreduce,
                                                   gradient_predivide_factor=args.gradient_predivide_factor,
                                                   named_buffers=model.named_buffers(),
                                                   sync_every=4, warmup_steps=10)


def adjust_learning_rate(epoch, batch_idx):
    warm = min(1.0, (epoch * len(train_loader) + batch_idx + 1) / len(train_loader))
    for group in optimizer.param_groups:
        group["lr"] = args.lr * lr_scaler * warm


def metric_average(value, name):
    return hvd.allreduce(torch.tensor(value), name=name).item()


for epoch in range(resume_from_epoch, args.epochs):
    model.train()
    train_sampler.set_epoch(epoch)
    for batch_idx, (data, target) in enumerate(train_loader):
        if scheduler is None:
            adjust_learning_rate(epoch, batch_idx)
        optimizer.zero_grad()
        for i in range(0, len(data), args.batch_size):   # gradient accumulation, as in the ImageNet example
            loss = F.nll_loss(model(data[i:i + args.batch_size]), target[i:i + args.batch_size])
            (loss / args.batches_per_allreduce).backward()
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if hasattr(optimizer, "finish"):
        optimizer.finish()
    model.eval()
    correct = 0.0
    with torch.no_grad():
        for data, target in test_loader:
            correct += float((model(data).argmax(1) == target).sum())
    accuracy = metric_average(correct / len(test_sampler), "avg_accuracy")
    if hvd.rank() == 0:
        print(f"epoch {epoch}: test accuracy {accuracy:.4f}", flush=True)
