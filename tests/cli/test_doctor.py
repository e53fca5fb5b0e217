"""``python -m ssd_allreduce.doctor`` reports the real environment, as JSON and as text."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd_allreduce import __version__
from ssd_allreduce.doctor import TITLES, collect, main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def _doctor(*args: str, extra_env: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> str:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "HOROVOD_", "NCCL_")) and k not in drop}
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "-m", "ssd_allreduce.doctor", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=REPO)
    assert proc.returncode == 0, f"doctor exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_json_has_real_values() -> None:
    extra = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "1", "SLURM_NTASKS": "8",
             "HOROVOD_CYCLE_TIME": "0.5", "NCCL_DEBUG": "INFO", "CUDA_VISIBLE_DEVICES": "0,1"}
    report = json.loads(_doctor("--json", extra_env=extra))
    assert set(report) == set(TITLES)
    assert all(isinstance(v, str) for sec in report.values() for v in sec.values())

    assert report["python"]["executable"] == sys.executable
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda_available"] == ("true" if torch.cuda.is_available() else "false")
    assert report["torch"]["gpu_count"] == str(torch.cuda.device_count())

    hvd = report["horovod"]
    assert hvd["version"] == "0.28.1"
    assert hvd["mpi_built"] == "true" and hvd["gloo_built"] == "true"
    assert "PyTorch" in hvd["frameworks"]
    assert "MPI" in hvd["controllers"] and "Gloo" in hvd["controllers"]
    assert report["mpi"]["library"].startswith("Open MPI"), report["mpi"]
    assert report["mpi"]["standard"].startswith("3.")

    assert report["slurm"]["SLURM_JOB_ID"] == "4242"
    assert report["slurm"]["SLURM_PROCID"] == "1"
    assert report["slurm"]["SLURM_NTASKS"] == "8"
    assert "SLURM_LOCALID" not in report["slurm"]
    assert report["launcher_env"]["HOROVOD_CYCLE_TIME"] == "0.5"
    assert report["device_env"]["NCCL_DEBUG"] == "INFO"
    assert report["device_env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert report["ssd_allreduce"]["version"] == __version__


def test_names_the_virtualenv_it_runs_in_without_activation() -> None:
    report = json.loads(_doctor("--json", drop=("VIRTUAL_ENV", "CONDA_PREFIX")))
    assert sys.prefix != sys.base_prefix, "the suite runs in the project's virtual environment"
    assert report["python"]["virtualenv"] == sys.prefix


def test_text_has_headings_and_values() -> None:
    out = _doctor(extra_env={"SLURM_JOB_ID": "4242"})
    for title in TITLES.values():
        assert f"== {title} ==" in out
    lines = out.splitlines()
    assert "SLURM_JOB_ID: 4242" in lines
    assert f"version: {torch.__version__}" in lines
    assert "version: 0.28.1" in lines
    assert "\0" not in out


def test_no_slurm_env_and_broken_probe_do_not_crash(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from ssd_allreduce import doctor

    def boom() -> dict[str, str]:
        raise RuntimeError("probe exploded")

    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    monkeypatch.setitem(doctor.PROBES, "mpi", boom)
    report = collect()
    assert report["mpi"] == {"error": "error: RuntimeError: probe exploded"}
    assert report["slurm"] == {"(none set)": ""}
    assert main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mpi"]["error"].endswith("probe exploded")


@pytest.mark.parametrize("env, layout", [
    ({"HOROVOD_LOCAL_SIZE": "4", "HOROVOD_CROSS_SIZE": "2", "HOROVOD_RANK": "5"}, "2 node(s) x 4 rank(s), from horovodrun"),
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "RANK": "3"}, "2 node(s) x 8 rank(s), from torchrun"),
    ({"SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS": "12", "SLURM_PROCID": "0"}, "3 node(s) x 4 rank(s), from slurm"),
])
def test_the_node_layout_the_launcher_gives(env, layout) -> None:
    report = json.loads(_doctor("--json", extra_env={**env, "SSD_NODE": "rack1-node7"},
                                drop=("WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE")))
    assert report["nodes"]["layout"] == layout
    assert report["nodes"]["node"] == "rack1-node7 ($SSD_NODE)"
    assert report["nodes"]["local_sync_auto"].startswith("on:")
    one_node = json.loads(_doctor("--json", extra_env={"HOROVOD_LOCAL_SIZE": "4", "HOROVOD_CROSS_SIZE": "1"}))
    assert one_node["nodes"]["local_sync_auto"].startswith("off:")
