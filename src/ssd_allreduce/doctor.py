"""Environment report for debugging a cluster: ``python -m ssd_allreduce.doctor [--json]``.

Prints Python, PyTorch/CUDA/NCCL, Horovod build, MPI, launchers on PATH, the GPU this rank takes,
the Slurm, launcher and CUDA/NCCL/Gloo variables of this process, and the ssd_allreduce version. Every probe catches its
own errors and reports them as values, so the report itself never crashes. Run it inside a job
step (``srun python -m ssd_allreduce.doctor``) to see what each rank sees.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Callable, Optional, Sequence

Section = dict[str, str]

TITLES: dict[str, str] = {
    "python": "Python",
    "torch": "PyTorch",
    "horovod": "Horovod",
    "mpi": "MPI",
    "launchers": "Launchers on PATH",
    "gpu": "GPU this rank takes",
    "nodes": "Nodes (hierarchical SSD-SGD)",
    "slurm": "Slurm environment",
    "launcher_env": "Horovod / launcher environment",
    "device_env": "CUDA / NCCL / Gloo environment",
    "ssd_allreduce": "ssd_allreduce",
}

SLURM_VARS = (
    "SLURM_CONF", "SLURM_CLUSTER_NAME", "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION",
    "SLURM_RESTART_COUNT", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID",
    "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
    "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_NODELIST", "SLURM_JOB_NODELIST",
    "SLURMD_NODENAME", "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", "SLURM_JOB_CPUS_PER_NODE",
    "SLURM_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK",
    "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_MPI_TYPE", "SLURM_SUBMIT_DIR", "SLURM_SUBMIT_HOST",
    "SLURM_TIMELIMIT", "SRUN_CPUS_PER_TASK",
)
LAUNCHER_VARS = (
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "PMIX_NAMESPACE",
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)
LAUNCHER_PREFIXES = ("HOROVOD_", "OMPI_MCA_", "PMIX_MCA_")
DEVICE_VARS = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "ROCR_VISIBLE_DEVICES", "OMP_NUM_THREADS")
DEVICE_PREFIXES = ("NCCL_", "GLOO_")
LAUNCHERS = ("horovodrun", "srun", "sbatch", "torchrun", "mpirun", "mpiexec")


def _err(exc: BaseException) -> str:
    """One-line description of an exception."""
    msg = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _yn(flag: object) -> str:
    """Render a boolean-ish value as ``true``/``false``."""
    return "true" if flag else "false"


def _first_line(text: str) -> str:
    """First non-empty line of a text, stripped."""
    for line in text.replace("\0", "").splitlines():  # Open MPI's library version ends in NUL
        if line.strip():
            return line.strip()
    return ""


def _virtualenv() -> str:
    """The virtual environment this interpreter runs in, whether or not it was activated."""
    if sys.prefix != sys.base_prefix:
        return sys.prefix
    return os.environ.get("CONDA_PREFIX") or "(none)"


def _env(names: Sequence[str], prefixes: Sequence[str] = ()) -> Section:
    """The named variables that are set, then every variable with one of the prefixes, sorted."""
    out: Section = {n: os.environ[n] for n in names if n in os.environ}
    for key in sorted(os.environ):
        if key.startswith(tuple(prefixes)) and key not in out:
            out[key] = os.environ[key]
    return out or {"(none set)": ""}


def probe_python() -> Section:
    """Python interpreter version, executable and platform."""
    return {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "prefix": sys.prefix,
        "virtualenv": _virtualenv(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }


def probe_torch() -> Section:
    """torch version, the CUDA it was built with, visible GPUs and NCCL."""
    out: Section = {}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - report, never crash
        return {"version": "not installed", "import_error": _err(exc)}
    out["version"] = str(torch.__version__)
    out["built_with_cuda"] = str(getattr(torch.version, "cuda", None) or "none (CPU build)")
    hip = getattr(torch.version, "hip", None)
    if hip:
        out["built_with_hip"] = str(hip)
    try:
        available = torch.cuda.is_available()
        out["cuda_available"] = _yn(available)
        count = torch.cuda.device_count() if available else 0
        out["gpu_count"] = str(count)
        for i in range(count):
            try:
                out[f"gpu{i}"] = torch.cuda.get_device_name(i)
            except Exception as exc:  # noqa: BLE001
                out[f"gpu{i}"] = _err(exc)
        if available:
            try:
                ver = torch.cuda.nccl.version()
                out["nccl_version"] = ".".join(map(str, ver)) if isinstance(ver, tuple) else str(ver)
            except Exception as exc:  # noqa: BLE001
                out["nccl_version"] = _err(exc)
        else:
            out["nccl_version"] = "n/a (no CUDA)"
    except Exception as exc:  # noqa: BLE001
        out["cuda"] = _err(exc)
    try:
        import torch.distributed as dist
        out["distributed_available"] = _yn(dist.is_available())
        if dist.is_available():
            out["distributed_backends"] = ", ".join(
                b for b, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available()),
                                ("mpi", dist.is_mpi_available())) if ok) or "(none)"
    except Exception as exc:  # noqa: BLE001
        out["distributed"] = _err(exc)
    return out


def probe_horovod() -> Section:
    """Horovod version and what it was built with (frameworks, controllers, tensor operations)."""
    try:
        import horovod
    except Exception as exc:  # noqa: BLE001
        return {"version": "not installed", "import_error": _err(exc)}
    out: Section = {"version": str(getattr(horovod, "__version__", "unknown"))}
    pkg = os.path.dirname(getattr(horovod, "__file__", "") or "")
    out["location"] = pkg or "unknown"
    # Frameworks: look for the compiled extensions, without importing TensorFlow or MXNet.
    frameworks = [name for name, sub in (("PyTorch", "torch"), ("TensorFlow", "tensorflow"),
                                         ("MXNet", "mxnet"))
                  if pkg and glob.glob(os.path.join(pkg, sub, "mpi_lib*"))]
    out["frameworks"] = ", ".join(frameworks) or "(none)"
    try:
        import horovod.torch as hvd
    except Exception as exc:  # noqa: BLE001
        out["horovod.torch"] = f"import failed: {_err(exc)}"
        return out
    checks: dict[str, Callable[[], object]] = {
        "mpi_built": hvd.mpi_built, "gloo_built": hvd.gloo_built, "nccl_built": hvd.nccl_built,
        "ddl_built": hvd.ddl_built, "ccl_built": hvd.ccl_built, "cuda_built": hvd.cuda_built,
        "rocm_built": hvd.rocm_built,
    }
    built: dict[str, object] = {}
    for key, fn in checks.items():
        try:
            val = fn()
            built[key] = val
            # nccl_built() returns the NCCL version number (0 when not built).
            out[key] = _yn(val) if isinstance(val, bool) or not val else f"true ({val})"
        except Exception as exc:  # noqa: BLE001
            out[key] = _err(exc)
    out["controllers"] = ", ".join(n for n, k in (("MPI", "mpi_built"), ("Gloo", "gloo_built"))
                                   if built.get(k)) or "(none)"
    out["tensor_ops"] = ", ".join(n for n, k in (("NCCL", "nccl_built"), ("DDL", "ddl_built"),
                                                ("CCL", "ccl_built"), ("MPI", "mpi_built"),
                                                ("Gloo", "gloo_built")) if built.get(k)) or "(none)"
    return out


def _run_first_line(cmd: Sequence[str], timeout: float = 15) -> str:
    """First line of a command's output, or what went wrong."""
    try:
        proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"error: timed out after {timeout:.0f} s"
    except Exception as exc:  # noqa: BLE001
        return _err(exc)
    if proc.returncode == 0:
        return _first_line(proc.stdout)
    last = _first_line("\n".join(reversed(proc.stdout.splitlines())))  # the last line says most
    return f"error: exit {proc.returncode}: {last}"


_MPI_SNIPPET = """
import json, mpi4py
mpi4py.rc.initialize = False  # Get_version/Get_library_version are legal before MPI_Init
mpi4py.rc.finalize = False
from mpi4py import MPI
print(json.dumps([mpi4py.__version__, MPI.Get_library_version(), list(MPI.Get_version())]))
"""


def probe_mpi() -> Section:
    """MPI library seen by mpi4py (without initialising MPI) and ``mpirun --version``.

    mpi4py is asked in a child interpreter unless this process already imported ``mpi4py.MPI``:
    importing it here with or without MPI_Init would change how the caller's MPI behaves.
    """
    out: Section = {}
    try:
        if "mpi4py.MPI" in sys.modules:
            import mpi4py
            from mpi4py import MPI
            ver, lib, std = mpi4py.__version__, MPI.Get_library_version(), list(MPI.Get_version())
        else:
            proc = subprocess.run([sys.executable, "-c", _MPI_SNIPPET], capture_output=True, text=True,
                                  timeout=60, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise RuntimeError(_first_line("\n".join(reversed(proc.stderr.splitlines())))
                                   or f"exit {proc.returncode}")
            ver, lib, std = json.loads(proc.stdout.strip().splitlines()[-1])
        out["mpi4py_version"] = str(ver)
        out["library"] = _first_line(lib)
        out["standard"] = ".".join(map(str, std))
    except Exception as exc:  # noqa: BLE001
        out["mpi4py"] = f"not available: {_err(exc)}"
    mpirun = shutil.which("mpirun")
    out["mpirun"] = mpirun or "not on PATH"
    if mpirun:
        out["mpirun_version"] = _run_first_line([mpirun, "--version"])
    return out


def probe_launchers() -> Section:
    """Which launchers are on PATH (and where); also those beside the interpreter (an inactive venv)."""
    out: Section = {}
    bindir = os.path.dirname(sys.executable)
    for name in LAUNCHERS:
        found = shutil.which(name)
        beside = os.path.join(bindir, name)
        if found:
            out[name] = found
        elif os.access(beside, os.X_OK):
            out[name] = f"not on PATH (but {beside} exists: activate the venv)"
        else:
            out[name] = "not on PATH"
    srun = shutil.which("srun")
    if srun:
        out["srun_version"] = _run_first_line([srun, "--version"])
    return out


def probe_gpu() -> Section:
    """Which GPU this rank takes, as the driver chooses it (``gpu_binding``): its local rank, the
    GPUs it sees, the choice and why."""
    from .gpu_binding import VISIBLE_VARS, choose_gpu, local_rank_from_env

    local_rank = local_rank_from_env()
    out: Section = {"local_rank": "not given by a launcher (0)" if local_rank is None else str(local_rank)}
    out.update({name: os.environ[name] for name in VISIBLE_VARS if name in os.environ})
    try:
        import torch
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # noqa: BLE001
        out["takes"] = f"unknown: {_err(exc)}"
        return out
    out["gpus_seen"] = str(count)
    if count == 0:
        out["takes"] = "no GPU: this rank trains on the CPU"
        return out
    choice = choose_gpu(local_rank or 0, count)
    out["takes"] = choice.describe()
    try:
        props = torch.cuda.get_device_properties(choice.index)
        out["name"] = str(props.name)
        if getattr(props, "uuid", None) is not None:
            out["uuid"] = str(props.uuid)
    except Exception as exc:  # noqa: BLE001
        out["name"] = _err(exc)
    return out


def probe_ssd_allreduce() -> Section:
    """The installed ssd_allreduce version and location."""
    try:
        import ssd_allreduce
        return {"version": str(ssd_allreduce.__version__),
                "location": os.path.dirname(ssd_allreduce.__file__ or "")}
    except Exception as exc:  # noqa: BLE001
        return {"version": _err(exc)}


def probe_nodes() -> Section:
    """This rank's node and the layout the launcher gives (hierarchical SSD-SGD's automatic choice)."""
    from .topology import NODE_ENV, launcher_layout, node_name

    out: Section = {"node": node_name() + (f" (${NODE_ENV})" if os.environ.get(NODE_ENV) else " (host name)")}
    layout = launcher_layout()
    if layout is None:
        out["layout"] = "not given by a launcher here (the optimizer gathers every rank's node when it is built)"
        return out
    nodes, per_node, launcher = layout
    out["layout"] = f"{nodes} node(s) x {per_node} rank(s), from {launcher}"
    out["local_sync_auto"] = ("on: gradients averaged inside each node, windows between nodes"
                              if nodes > 1 and per_node > 1 else "off: flat SSD-SGD (one node, or one rank a node)")
    return out


PROBES: dict[str, Callable[[], Section]] = {
    "python": probe_python,
    "torch": probe_torch,
    "horovod": probe_horovod,
    "mpi": probe_mpi,
    "launchers": probe_launchers,
    "gpu": probe_gpu,
    "nodes": probe_nodes,
    "slurm": lambda: _env(SLURM_VARS),
    "launcher_env": lambda: _env(LAUNCHER_VARS, LAUNCHER_PREFIXES),
    "device_env": lambda: _env(DEVICE_VARS, DEVICE_PREFIXES),
    "ssd_allreduce": probe_ssd_allreduce,
}


def collect() -> dict[str, dict[str, str]]:
    """Run every probe; a probe that raises is reported as ``{"error": ...}`` in its section."""
    report: dict[str, dict[str, str]] = {}
    for key, probe in PROBES.items():
        try:
            report[key] = {str(k): str(v) for k, v in probe().items()}
        except BaseException as exc:  # noqa: BLE001 - even SystemExit from a broken import
            if isinstance(exc, KeyboardInterrupt):
                raise
            report[key] = {"error": _err(exc)}
    return report


def format_text(report: dict[str, dict[str, str]]) -> str:
    """Human-readable report: a heading per section, one ``key: value`` per line."""
    lines: list[str] = []
    for key, section in report.items():
        lines.append(f"== {TITLES.get(key, key)} ==")
        for k, v in section.items():
            lines.append(f"{k}: {v}" if v != "" else k)
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: print the report as text, or as one JSON object with ``--json``."""
    parser = argparse.ArgumentParser(prog="python -m ssd_allreduce.doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    report = collect()
    try:
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(format_text(report), end="")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head: not an error of the report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
