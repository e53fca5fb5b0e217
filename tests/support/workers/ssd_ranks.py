"""Runs on every rank of a test job (horovodrun, torchrun or mpirun) and saves what it saw.

    ssd_ranks.py --backend horovod --out DIR --configs "k,d,beta,warmup[,wire];..." --steps N
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import problem  # noqa: E402

import ssd_allreduce  # noqa: E402


def init_backend(name: str, subset: int, torch_backend: str, process_set: str = ""):
    """Initialise the backend; returns (rank, size, backend argument) or None if not a member.
    With a Horovod ``process_set`` ("2,3"), members return their rank in the set, the others
    their global rank, size 1 and the set (their optimizer must step alone, as Horovod's does)."""
    if name == "horovod":
        import horovod.torch as hvd
        if process_set:
            ps = hvd.ProcessSet([int(r) for r in process_set.split(",")])
            hvd.init(process_sets=[ps])
            return (ps.rank(), ps.size(), ps) if ps.included() else (hvd.rank(), 1, ps)
        if subset:  # Horovod on a sub-communicator of mpi4py: the first `subset` ranks only
            from mpi4py import MPI
            world = MPI.COMM_WORLD
            sub = world.Split(0 if world.Get_rank() < subset else 1, world.Get_rank())
            if world.Get_rank() >= subset:
                return None
            hvd.init(comm=sub)
        else:
            hvd.init()
        return hvd.rank(), hvd.size(), "horovod"
    if name == "torch":
        import torch.distributed as dist
        dist.init_process_group(torch_backend)
        return dist.get_rank(), dist.get_world_size(), "torch"
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), "mpi"


LOCAL_SYNC = {"auto": None, "on": True, "off": False}


def build(backend, k: int, d: int, beta: float, warmup: int, big: int, device: str,
          compression: str = "none", optimizer: str = "sgd", local_sync: str = "off"):
    """``backend``: a backend name, or a Horovod process set (the optimizer runs on it)."""
    model = problem.make_model(big).to(device)
    where = dict(backend=backend) if isinstance(backend, str) else dict(backend="horovod", process_set=backend)
    opt = ssd_allreduce.DistributedOptimizer(
        problem.OPTIMIZERS[optimizer](model.parameters()), named_parameters=model.named_parameters(),
        named_buffers=model.named_buffers(), sync_every=k, delay=d, warmup_steps=warmup,
        glu_beta=beta, compression=getattr(ssd_allreduce.Compression, compression),
        local_sync=LOCAL_SYNC[local_sync], **where)
    return model, opt


def train_step(model, opt, rank: int, step: int, device: str = "cpu") -> None:
    x, y = (t.to(device) for t in problem.batch(rank, step))
    opt.zero_grad()
    problem.loss_fn(model(x), y).backward()
    opt.step()


def allocated_by(run) -> int:
    """Bytes the CPU allocator handed out while ``run()`` ran (the profiler's own count)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def run_config(args, rank: int, backend: str, k: int, d: int, beta: float, warmup: int, wire: str) -> dict:
    model, opt = build(backend, k, d, beta, warmup, args.big, args.device, wire, args.optimizer, args.local_sync)
    if args.resume_from:
        ckpt = torch.load(os.path.join(args.resume_from, f"ckpt_rank{rank}.pt"), weights_only=False,
                          map_location=args.device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["next_step"]
    else:
        start = 0
    record = {"after_step": [], "global_weights": [], "landed_at": []}
    landed = opt.ssd_stats.windows_landed
    data_rank = 0 if args.same_data else rank
    for step in range(start, args.steps):
        launches, landings = opt.ssd_stats.windows_launched, opt.ssd_stats.windows_landed
        if args.profile_memory and opt.global_weights is not None:
            x, y = problem.batch(data_rank, step)
            opt.zero_grad()
            problem.loss_fn(model(x), y).backward()
            allocated = allocated_by(opt.step)
            busy = (opt.ssd_stats.windows_launched, opt.ssd_stats.windows_landed) != (launches, landings)
            record.setdefault("window_step_allocated" if busy else "plain_step_allocated", []).append(allocated)
        else:
            train_step(model, opt, data_rank, step, args.device)
        inflight = opt._ssd_engine.state.window.inflight if opt.window_in_flight else None
        if opt.ssd_stats.windows_launched != launches and inflight is not None and backend in ("torch", "mpi"):
            record["collective_on_delta"] = all(f.data_ptr() == d.data_ptr() for f, d in zip(
                inflight.handles[0].flats, opt._ssd_engine.state.delta.buffers))
        record["after_step"].append(problem.model_tensors(model))
        if opt.ssd_stats.windows_landed != landed:
            landed = opt.ssd_stats.windows_landed
            record["global_weights"].append([w.cpu().clone() for w in opt.global_weights])
            record["landed_at"].append(step)
        if args.save_at is not None and step == args.save_at:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "next_step": step + 1},
                       os.path.join(args.out, f"ckpt_rank{rank}.pt"))
    record["in_flight_at_end"] = opt.window_in_flight
    opt.finish()
    record["final"] = problem.model_tensors(model)
    record["stats"] = opt.ssd_stats.as_dict()
    record["local_sync"] = opt._ssd_settings.local_sync
    record["global_weights_at_end"] = None if opt.global_weights is None else [w.clone() for w in opt.global_weights]
    return record


def horovod_baseline(rank: int, steps: int, optimizer: str = "sgd") -> list:
    import horovod.torch as hvd
    model = problem.make_model()
    opt = hvd.DistributedOptimizer(problem.OPTIMIZERS[optimizer](model.parameters()),
                                   named_parameters=model.named_parameters())
    out = []
    for step in range(steps):
        train_step(model, opt, rank, step)
        out.append(problem.model_tensors(model))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=("horovod", "torch", "mpi"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="2,1,0.5,3", help="k,d,beta,warmup;...")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--big", type=int, default=0)
    ap.add_argument("--subset", type=int, default=0, help="Horovod on the first N ranks' sub-communicator")
    ap.add_argument("--horovod-baseline", action="store_true")
    ap.add_argument("--process-set", default="", help="Horovod: run the optimizers on these global ranks")
    ap.add_argument("--save-at", type=int)
    ap.add_argument("--resume-from")
    ap.add_argument("--compression", choices=("none", "fp16", "bf16", "int8"), default="none")
    ap.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="the wrapped optimizer")
    ap.add_argument("--same-data", action="store_true", help="every rank trains on rank 0's batches")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (every rank on the one visible GPU)")
    ap.add_argument("--torch-backend", default="gloo", help="torch.distributed backend: gloo or nccl")
    ap.add_argument("--ranks-per-node", type=int, default=0,
                    help="emulated nodes: rank r is on node r // N ($SSD_NODE)")
    ap.add_argument("--local-sync", choices=tuple(LOCAL_SYNC), default="off")
    ap.add_argument("--profile-memory", action="store_true",
                    help="count what each delay-stage opt.step() allocates (torch's profiler: MPI only; with "
                         "Gloo's threads it can crash)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    member = init_backend(args.backend, args.subset, args.torch_backend, args.process_set)
    if member is None:
        print("not a member of the sub-communicator; idle", flush=True)
        return
    rank, size, backend = member
    if args.ranks_per_node:
        os.environ["SSD_NODE"] = f"node{rank // args.ranks_per_node}"
    result = {"size": size, "configs": {}}
    for spec in args.configs.split(";"):
        k, d, beta, warmup, *wire = spec.split(",")
        result["configs"][spec] = run_config(args, rank, backend, int(k), int(d), float(beta), int(warmup),
                                             wire[0] if wire else args.compression)
    if args.horovod_baseline:   # after the SSD-SGD configs: it takes no part in their process sets
        result["horovod_baseline"] = horovod_baseline(0 if args.same_data else rank, args.steps, args.optimizer)
    if args.process_set:
        import horovod.torch as hvd
        hvd.allreduce(torch.zeros(1), name="done")   # every rank stays until the set has finished
        rank = hvd.rank()
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    print(f"rank {rank}/{size} done", flush=True)


if __name__ == "__main__":
    main()
