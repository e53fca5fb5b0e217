"""The package as users install and type it: what importing the library loads, which way imports
flow between its wings, and every command name that users and the sbatch templates type."""
from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest

from launchers import BIN, PYTHON, REPO

PACKAGE = REPO / "src" / "ssd_allreduce"
WINGS = ("train", "bench")
pytestmark = pytest.mark.timeout(120)


def _library_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] in WINGS or parts[-1] == "__main__":
            continue
        names.append(".".join(("ssd_allreduce",) + tuple(p for p in parts if p != "__init__")))
    return names


def _run(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=90, cwd=REPO)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_importing_the_library_loads_neither_the_driver_nor_the_benchmark():
    modules = _library_modules()
    assert {"ssd_allreduce.optimizer", "ssd_allreduce.delay.stage", "ssd_allreduce.comm.horovod"} <= set(modules)
    probe = (f"import importlib, json, sys\n"
             f"for m in {modules!r}: importlib.import_module(m)\n"
             f"import ssd_allreduce; ssd_allreduce.DistributedOptimizer\n"
             f"print(json.dumps(sorted(sys.modules)))")
    loaded = set(json.loads(_run(PYTHON, "-c", probe).stdout))
    wings = sorted(m for m in loaded if m.startswith(tuple(f"ssd_allreduce.{w}" for w in WINGS)))
    assert wings == [], f"the library imported {wings}"
    by_torch = set(json.loads(_run(PYTHON, "-c", "import json, sys, torch; print(json.dumps(sorted(sys.modules)))").stdout))
    extras = sorted((loaded - by_torch) & {"tqdm", "sklearn", "matplotlib", "numpy"})
    assert extras == [], f"the library imported the [train] extra's {extras} (torch alone does not)"


def test_loading_the_digits_imports_no_scikit_learn():
    """Every rank loads them: scikit-learn's import (about 2 s) would add to each rank's start."""
    probe = ("import sys; from ssd_allreduce.train.data import load_dataset; load_dataset('digits'); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))")
    assert _run(PYTHON, "-c", probe).stdout.strip() == "[]"


def _imports(path: Path) -> list[str]:
    """Absolute names of what a module of the package imports (relative imports resolved)."""
    package = ".".join(("ssd_allreduce",) + path.relative_to(PACKAGE).parent.parts)
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_the_driver_never_imports_the_benchmark():
    offenders = {str(p.relative_to(PACKAGE)): [n for n in _imports(p) if n.startswith("ssd_allreduce.bench")]
                 for p in (PACKAGE / "train").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_installed_commands_work():
    usage = _run(str(BIN / "ssd-allreduce"), "--help").stdout
    assert all(f"  {c}" in usage for c in ("doctor", "train", "bench", "costmodel", "convergence"))
    unknown = _run(str(BIN / "ssd-allreduce"), "fly", ok=False)
    assert unknown.returncode == 2 and "unknown command 'fly'" in unknown.stderr
    report = json.loads(_run(str(BIN / "ssd-allreduce"), "doctor", "--json").stdout)
    assert report["python"]["executable"] == PYTHON
    table = _run(str(BIN / "ssd-allreduce"), "costmodel", "--model", "resnet50", "--ranks", "8",
                 "--bandwidths", "10gbit").stdout
    assert table.count("\n| 8 | 10 |") == 1
    assert "--sync-every" in _run(str(BIN / "ssd-train"), "--help").stdout
    assert "--bandwidths" in _run(str(BIN / "ssd-bench"), "compare", "--help").stdout


@pytest.mark.parametrize("module, args, expect", [
    ("ssd_allreduce.train", ["--help"], "--sync-every"),
    ("ssd_allreduce.bench", ["--help"], "ablation"),
    ("ssd_allreduce.bench", ["synthetic", "--help"], "--num-batches-per-iter"),
    ("ssd_allreduce.bench", ["costmodel", "--model", "resnet50", "--ranks", "8", "--bandwidths", "10gbit"], "| 8 | 10 |"),
    ("ssd_allreduce.doctor", [], "== PyTorch =="),
    ("ssd_allreduce.bench", ["convergence", "--ranks", "2", "--epochs", "1", "--warmup-steps", "2"], '"windows"'),
])
def test_the_module_commands_users_type_keep_working(module, args, expect):
    assert expect in _run(PYTHON, "-m", module, *args).stdout


def test_python_requirement_matches_the_readme_and_torch_floor_the_code():
    cfg = (REPO / "setup.cfg").read_text()
    assert "python_requires = >=3.9" in cfg and "Python 3.9 or newer" in (REPO / "README.md").read_text()
    import torch
    assert hasattr(torch.Tensor, "register_post_accumulate_grad_hook")   # why torch >= 2.1
    assert "torch>=2.1" in cfg
    for path in PACKAGE.rglob("*.py"):    # the syntax the package uses is Python 3.9's
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


def test_the_scripts_use_the_environment_ssd_venv_names(tmp_path):
    """SSD_VENV picks the virtual environment for set-up and for the suite alike."""
    venv = Path(PYTHON).parent.parent
    link = tmp_path / "venv-elsewhere"
    link.symlink_to(venv)
    proc = subprocess.run([str(REPO / "scripts" / "test.sh"), "--fast", "-q", "-p", "no:cacheprovider",
                           "tests/unit/test_algorithm.py::test_the_clock_launches_every_k_steps_after_the_warmup_and_lands_d_later"],
                          env={**os.environ, "SSD_VENV": str(link), "SSD_TEST_WORKERS": "0"},
                          capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"setup: ready ({link};" in proc.stdout + proc.stderr
    assert f"test.sh: running the suite with {link}/bin/python" in proc.stdout
    assert "1 passed" in proc.stdout
