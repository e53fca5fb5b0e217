"""The GPU a rank takes under each Slurm GPU layout, as a pure function of the environment and the
device count (no GPU needed), and what the doctor reports of it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ssd_allreduce import doctor
from ssd_allreduce.gpu_binding import choose_gpu, local_rank_from_env
from ssd_allreduce.train import launch


def test_gpus_per_node_every_task_sees_the_node_s_gpus_and_takes_its_local_rank():
    """--gpus-per-node=4 --ntasks-per-node=4: each task sees 0,1,2,3."""
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_LOCALID": "0"}
    choices = [choose_gpu(local_rank, 4, env) for local_rank in range(4)]
    assert [c.index for c in choices] == [0, 1, 2, 3]
    assert [c.physical for c in choices] == ["0", "1", "2", "3"]
    assert not any(c.shared for c in choices)
    assert choices[2].describe() == "cuda:2 (GPU 2 of the machine): local rank 2 of the 4 GPUs the node's ranks share"


@pytest.mark.parametrize("visible", ["0", "2", "GPU-5e1d0c3a-8b2f-4c1e-9a7d-3f6b2e1c0d9f"])
def test_gpus_per_task_one_each_task_takes_the_only_gpu_it_sees(visible: str):
    """--gpus-per-task=1 or --gpu-bind=single:1: task i sees one GPU (renumbered 0 where Slurm
    constrains devices, its own number or UUID where not); local rank 1 must not ask for cuda:1."""
    env = {"CUDA_VISIBLE_DEVICES": visible, "SLURM_GPUS_PER_TASK": "1", "SLURM_LOCALID": "1"}
    for local_rank in range(4):
        choice = choose_gpu(local_rank, 1, env)
        assert choice.index == 0 and choice.physical == visible and not choice.shared
    assert "the only GPU this rank sees" in choose_gpu(3, 1, env).describe()


def test_cuda_visible_devices_set_per_task_by_a_wrapper():
    """A wrapper exports CUDA_VISIBLE_DEVICES=$SLURM_LOCALID for each task: one GPU seen, taken."""
    for local_rank in range(4):
        env = {"CUDA_VISIBLE_DEVICES": str(local_rank), "LOCAL_RANK": str(local_rank)}
        choice = choose_gpu(local_rank, 1, env)
        assert (choice.index, choice.physical) == (0, str(local_rank))


def test_more_ranks_than_gpus_share_them_round_robin():
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "LOCAL_WORLD_SIZE": "4"}
    choices = [choose_gpu(local_rank, 2, env) for local_rank in range(4)]
    assert [c.index for c in choices] == [0, 1, 0, 1]
    assert all(c.shared for c in choices)
    assert "ranks share GPUs" in choices[3].describe()


def test_without_cuda_visible_devices_the_index_is_the_physical_gpu():
    assert choose_gpu(1, 4, {}).physical == "1"


def test_no_gpu_seen_says_what_to_do():
    with pytest.raises(ValueError, match=r"sees no GPU \(CUDA_VISIBLE_DEVICES=''\).*--gpus-per-task.*--device cpu"):
        choose_gpu(0, 0, {"CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(ValueError, match="local rank is 0 or more"):
        choose_gpu(-1, 2, {})


@pytest.mark.parametrize("env, expected", [
    ({"LOCAL_RANK": "3", "SLURM_LOCALID": "0"}, 3),                 # torchrun (inside an srun step)
    ({"HOROVOD_LOCAL_RANK": "1", "SLURM_LOCALID": "0"}, 1),         # horovodrun inside a job
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "2", "SLURM_LOCALID": "0"}, 2),  # mpirun inside a job
    ({"MPI_LOCALRANKID": "1"}, 1),                                  # MPICH / Intel MPI
    ({"SLURM_LOCALID": "1"}, 1),                                    # srun alone
    ({}, None),
])
def test_local_rank_from_each_launcher(env: dict, expected):
    assert local_rank_from_env(env) == expected


def test_the_driver_pins_the_gpu_it_can_see(monkeypatch):
    """launch.cuda_index is what init_distributed passes to torch.cuda.set_device."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert launch.cuda_index(1) == 0      # not 1: "invalid device ordinal" with one GPU per task
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert launch.cuda_index(3) == 3


def test_the_doctor_reports_the_gpu_this_rank_takes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name=f"Fake GPU {i}", uuid="u"))
    for name in ("LOCAL_RANK", "HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    section = doctor.probe_gpu()
    assert section["local_rank"] == "3" and section["gpus_seen"] == "2" and section["name"] == "Fake GPU 1"
    assert section["takes"].startswith("cuda:1 (GPU 5 of the machine)")
