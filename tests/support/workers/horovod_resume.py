"""Horovod's usual resume (its ImageNet example): rank 0 alone loads the checkpoint, then
hvd.broadcast_parameters and hvd.broadcast_optimizer_state; compared with every rank loading it.

    horovod_resume.py --out DIR   # 8 steps, rank 0 saves DIR/ckpt.pt; then each way of resuming on
                                  # a fresh model and optimizer, 6 more steps, DIR/{way}_rank{r}.pt
"""
import argparse
import os
import sys

import horovod.torch as hvd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import problem  # noqa: E402

import ssd_allreduce  # noqa: E402

SAVE_AT, STEPS = 8, 14          # k=3, d=2, warm-up 2: a window launched at step 7 is in flight at 8


def build():
    model = problem.make_model()
    # no weight decay: Horovod's state initialisation (a step on zero gradients) then moves nothing
    sgd = torch.optim.SGD(model.parameters(), lr=problem.LR, momentum=problem.MOMENTUM)
    opt = ssd_allreduce.DistributedOptimizer(sgd, named_parameters=model.named_parameters(),
                                             named_buffers=model.named_buffers(), sync_every=3, delay=2,
                                             warmup_steps=2)
    return model, opt


def train(model, opt, start, stop):
    for step in range(start, stop):
        x, y = problem.batch(hvd.rank(), step)
        opt.zero_grad()
        problem.loss_fn(model(x), y).backward()
        opt.step()


def resume(ckpt, way):
    """A fresh model and optimizer resumed from ``ckpt`` in ``way``, trained to STEPS; its results."""
    model, opt = build()
    if way == "everyone" or hvd.rank() == 0:
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    if way == "broadcast":
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
    train(model, opt, SAVE_AT, STEPS)
    opt.finish()
    return {"final": problem.model_tensors(model), "W": [w.clone() for w in opt.global_weights],
            "steps": opt.ssd_stats.steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    model, opt = build()
    ckpt = os.path.join(args.out, "ckpt.pt")
    train(model, opt, 0, SAVE_AT)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}   # a window in flight
    if hvd.rank() == 0:
        torch.save(state, ckpt)
    opt.finish()
    hvd.allreduce(torch.zeros(1), name="saved")   # the file is there before any rank reads it
    for way in ("broadcast", "everyone"):
        result = resume(ckpt, way)
        torch.save(result, os.path.join(args.out, f"{way}_rank{hvd.rank()}.pt"))
        print(f"rank {hvd.rank()} resumed by {way}: {result['steps']} steps", flush=True)


if __name__ == "__main__":
    main()
