#!/usr/bin/env bash
# One-command, idempotent set-up of ssd-allreduce on a Debian machine with Python 3.11+.
#
#   scripts/setup.sh            # system packages, .venv, torch, Horovod 0.28.1 (cached wheel)
#
# Environment knobs:
#   SSD_VENV=path               virtual environment to use (default: <repo>/.venv)
#   SSD_CACHE=path              where built Horovod wheels are cached (default: ~/.cache/ssd-allreduce)
#   SSD_SKIP_APT=1              do not touch system packages (no root, or a cluster's modules)
#   SSD_TORCH=spec              torch to install when none is importable (default: torch==2.13.0)
#   SSD_HOROVOD_SDIST=file      a local horovod-0.28.1.tar.gz (machines without the package index)
#   SSD_WHEELS=dir              install Python packages only from the wheels in dir (no package index;
#                               e.g. a cluster's compute nodes): `pip download -d dir cffi pycparser
#                               numpy mpi4py scikit-learn matplotlib tqdm pytest pytest-timeout psutil
#                               cloudpickle packaging pyyaml setuptools wheel pytest-xdist execnet` on a
#                               machine that has one
#   SSD_HOROVOD_WITHOUT_MPI=1   build Horovod with Gloo only (no MPI headers on the machine)
set -euo pipefail
trap 'echo "setup FAILED at line $LINENO: $BASH_COMMAND (see the output above)" >&2' ERR

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SSD_VENV:-$REPO/.venv}
CACHE=${SSD_CACHE:-$HOME/.cache/ssd-allreduce}
HOROVOD_VERSION=0.28.1
TORCH_SPEC=${SSD_TORCH:-torch==2.13.0}
PY=${PYTHON:-python3}

step() { printf '\n== setup: %s\n' "$*"; }
fail() {  # fail <step> <why> <what to do>
  printf '\nsetup FAILED at step "%s": %s\n  what to do: %s\n' "$1" "$2" "$3" >&2
  exit 1
}

# --- 1. system packages --------------------------------------------------------------------
APT_PACKAGES=(openmpi-bin libopenmpi-dev slurm-wlm munge iproute2 build-essential cmake openssh-server shellcheck)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "${SSD_SKIP_APT:-0}" = 1 ]; then
    echo "setup: SSD_SKIP_APT=1, not installing: ${missing[*]}"
  else
    step "system packages: ${missing[*]}"
    command -v apt-get >/dev/null || fail "system packages" "apt-get not found (not Debian/Ubuntu)" \
      "install OpenMPI (with headers), cmake and a C++ compiler yourself, then rerun with SSD_SKIP_APT=1"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq || fail "system packages" "apt-get update failed" \
      "check network access to the Debian mirrors, or install ${missing[*]} and rerun with SSD_SKIP_APT=1"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null \
      || fail "system packages" "apt-get install ${missing[*]} failed" "install them by hand, then rerun with SSD_SKIP_APT=1"
  fi
fi

# --- 2. virtual environment, keeping a torch that is already importable ---------------------
if [ ! -x "$VENV/bin/python" ]; then
  step "virtual environment $VENV"
  "$PY" -m venv "$VENV" || fail "virtual environment" "$PY -m venv failed" \
    "install the venv module (apt-get install python3-venv) or point PYTHON= at another interpreter"
  if "$PY" -c "import torch" 2>/dev/null; then
    # keep that torch (and its environment, which may itself be a venv or conda env) visible
    echo "setup: keeping the torch already importable by $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    # addsitedir (not a bare path) so that environment's own .pth files, e.g. setuptools'
    # distutils shim that horovodrun needs on Python >= 3.12, take effect too
    "$PY" -c "import site; print(''.join(f'import site; site.addsitedir({p!r})\n' for p in site.getsitepackages()))" \
      > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_ssd_parent_env.pth"
  fi
fi
# the venv's own directory, links resolved: the commands pip writes name their interpreter by it,
# so a venv reached through a link (SSD_VENV) keeps working once the link is gone
VPY=$(cd "$VENV" && pwd -P)/bin/python
PIP_SOURCE=()
[ -z "${SSD_WHEELS:-}" ] || PIP_SOURCE=(--no-index --find-links "$SSD_WHEELS")
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check ${PIP_SOURCE[@]+"${PIP_SOURCE[@]}"} "$@"; }

if ! "$VPY" -c "import torch" 2>/dev/null; then
  step "torch ($TORCH_SPEC)"
  pip_install "$TORCH_SPEC" || fail "torch" "pip could not install $TORCH_SPEC" \
    "check access to the package index, or install a torch for your CUDA and rerun (it is kept)"
fi

if ! "$VPY" -c "import numpy, mpi4py, sklearn, matplotlib, tqdm, pytest, pytest_timeout, psutil, cloudpickle" 2>/dev/null; then
  step "Python dependencies"
  pip_install numpy mpi4py scikit-learn matplotlib tqdm pytest pytest-timeout psutil cloudpickle packaging \
    || fail "Python dependencies" "pip install failed (mpi4py needs libopenmpi-dev and a compiler)" \
       "check access to the package index and that mpicc works"
fi
# optional: scripts/test.sh runs the suite on 2 workers with it, serially without it; tried once
NO_XDIST="$VENV/.ssd-no-xdist"
if [ ! -e "$NO_XDIST" ] && ! "$VPY" -c "import xdist" 2>/dev/null; then
  step "pytest-xdist"
  pip_install --retries 0 --timeout 10 pytest-xdist || { touch "$NO_XDIST"
    echo "setup: no pytest-xdist (no package index?): scripts/test.sh runs serially; rm $NO_XDIST to retry"; }
fi

# --- 3. Horovod 0.28.1 from source, wheel cached per (Horovod, torch, Python) -----------------
horovod_ok() {
  "$VPY" - <<'PY' 2>/dev/null
import horovod, horovod.torch as hvd
assert horovod.__version__ == "0.28.1"
import os
assert hvd.gloo_built() and (hvd.mpi_built() or os.environ.get("SSD_HOROVOD_WITHOUT_MPI") == "1")
PY
}
if ! horovod_ok; then
  read -r TORCH_VER PYTAG CUDA_VER TORCH_INC < <("$VPY" - <<'PY'
import sys, os, torch
inc = os.path.join(os.path.dirname(torch.__file__), "include")
print(torch.__version__, f"cp{sys.version_info[0]}{sys.version_info[1]}", torch.version.cuda or "none", inc)
PY
)
  KEY="horovod-$HOROVOD_VERSION-torch$TORCH_VER-$PYTAG"
  WHEEL_DIR=$CACHE/wheels/$KEY
  if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    step "building Horovod $HOROVOD_VERSION for torch $TORCH_VER (once per machine; about 5 min on 2 cores)"
    command -v c++ >/dev/null || fail "Horovod build" "no C++ compiler" "apt-get install build-essential"
    command -v cmake >/dev/null || pip_install cmake
    if [ "${SSD_HOROVOD_WITHOUT_MPI:-0}" = 1 ]; then
      export HOROVOD_WITHOUT_MPI=1
    else
      command -v mpicxx >/dev/null || fail "Horovod build" "mpicxx not found: Horovod's MPI controller needs MPI headers" \
        "apt-get install libopenmpi-dev, load your cluster's MPI module, or set SSD_HOROVOD_WITHOUT_MPI=1 (Gloo only)"
      export HOROVOD_WITH_MPI=1
    fi
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    if [ -n "${SSD_HOROVOD_SDIST:-}" ]; then
      cp "$SSD_HOROVOD_SDIST" "$BUILD/horovod-$HOROVOD_VERSION.tar.gz"
    else ( cd "$BUILD" && "$VPY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" ); fi \
      || fail "Horovod build" "could not download the horovod==$HOROVOD_VERSION source distribution" \
         "check access to the package index, or download horovod-$HOROVOD_VERSION.tar.gz and set SSD_HOROVOD_SDIST"
    tar xzf "$BUILD/horovod-$HOROVOD_VERSION.tar.gz" -C "$BUILD"
    SRC=$BUILD/horovod-$HOROVOD_VERSION
    # Horovod 0.28.1 compiles as C++14; use the oldest standard the installed torch's headers accept.
    printf '#include <c10/util/intrusive_ptr.h>\n#include <ATen/core/ivalue.h>\nint main() { return 0; }\n' > "$BUILD/probe.cpp"
    CXX_STD=
    for std in 17 20 23; do
      if c++ -std=c++$std -fsyntax-only -I"$TORCH_INC" "$BUILD/probe.cpp" 2>/dev/null; then CXX_STD=$std; break; fi
    done
    [ -n "$CXX_STD" ] || fail "Horovod build" "torch's headers compile with none of C++17/20/23 using $(c++ --version | head -1)" \
      "install a newer C++ compiler (g++ >= 10) and rerun"
    echo "setup: torch $TORCH_VER needs C++$CXX_STD"
    sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $CXX_STD)/" \
      "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    export HOROVOD_WITH_GLOO=1 CMAKE_POLICY_VERSION_MINIMUM=3.5
    # Horovod's CMake can miss the interpreter's headers (torch's python_headers.h needs Python.h)
    PY_INCLUDE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    export CPATH="$PY_INCLUDE${CPATH:+:$CPATH}"
    # Horovod 0.28.1 relies on transitive includes that GCC >= 13 no longer provides
    export CXXFLAGS="${CXXFLAGS:-} -include cstdint -include string -include stdexcept -include limits -include memory -include functional -include algorithm"
    MAKEFLAGS=-j$(nproc)
    export MAKEFLAGS
    if [ "$CUDA_VER" != none ]; then
      CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")}
      [ -x "$CUDA_HOME/bin/nvcc" ] || fail "Horovod build" "torch $TORCH_VER is a CUDA $CUDA_VER build but no CUDA toolkit (nvcc) was found" \
        "load your cluster's CUDA module or set CUDA_HOME to the toolkit, then rerun"
      NCCL_HOME=${HOROVOD_NCCL_HOME:-$("$VPY" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) if nvidia.nccl.__file__ else list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)}
      { [ -n "$NCCL_HOME" ] && [ -d "$NCCL_HOME/include" ]; } || fail "Horovod build" "CUDA found but no NCCL" \
        "pip install nvidia-nccl-cu${CUDA_VER%%.*} or set HOROVOD_NCCL_HOME to an NCCL with include/ and lib/"
      [ -e "$NCCL_HOME/lib/libnccl.so" ] || ln -sf libnccl.so.2 "$NCCL_HOME/lib/libnccl.so"
      export CUDA_HOME CUDAToolkit_ROOT=$CUDA_HOME HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME=$NCCL_HOME
      echo "setup: building with NCCL from $NCCL_HOME, CUDA from $CUDA_HOME"
    fi
    "$VPY" -c "import setuptools, wheel" 2>/dev/null || pip_install setuptools wheel
    # Horovod's setup.py needs cffi before it builds (setup_requires); setuptools would fetch it from
    # the package index, which compute nodes often cannot reach: install it first, the same way as
    # every other package
    "$VPY" -c "import cffi" 2>/dev/null || pip_install cffi || fail "Horovod build" \
      "could not install cffi, which Horovod's build needs first" \
      "check access to the package index, or put cffi and pycparser wheels in a folder and set SSD_WHEELS to it"
    mkdir -p "$WHEEL_DIR"
    LOG=$CACHE/horovod-build.log
    ( cd "$SRC" && "$VPY" -m pip wheel -v --no-deps --no-build-isolation -w "$WHEEL_DIR" . ) > "$LOG" 2>&1 || {
      grep -E -m 20 "error:|Error [0-9]|No such file|not found" "$LOG" >&2 || true
      tail -15 "$LOG" >&2
      fail "Horovod build" "compiling Horovod failed (first errors and last lines above; whole log: $LOG)" \
        "check the compiler, MPI headers and that torch's C++ standard ($CXX_STD) is supported by your compiler"
    }
  fi
  step "installing cached Horovod wheel $KEY"
  pip_install --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
  "$VPY" -c "import cloudpickle, psutil, yaml, packaging" 2>/dev/null || pip_install cloudpickle psutil pyyaml packaging
fi

# --- 4. the project, editable --------------------------------------------------------------
# again whenever setup.cfg changed (entry points), or the venv serves another checkout
INSTALLED_CFG=$VENV/.ssd_allreduce-setup.cfg
if ! cmp -s "$REPO/setup.cfg" "$INSTALLED_CFG" || [ "$("$VPY" -c 'import ssd_allreduce, os; print(os.path.realpath(ssd_allreduce.__file__))' 2>/dev/null)" != "$(realpath "$REPO/src/ssd_allreduce/__init__.py")" ]; then
  step "ssd_allreduce (editable)"
  pip_install --no-deps --no-build-isolation -e "$REPO" || fail "project install" "pip install -e failed" "see the error above"
  cp "$REPO/setup.cfg" "$INSTALLED_CFG"
fi

# --- 5. check ------------------------------------------------------------------------------
# (7 s: again only where Horovod was installed since the last check)
CHECKED=$VENV/horovod-check-build.txt
INSTALLED=$("$VPY" -c 'import importlib.util as u; print(u.find_spec("horovod").submodule_search_locations[0])' \
  2>/dev/null || true)
if [ ! -s "$CHECKED" ] || [ -z "$INSTALLED" ] || [ "$INSTALLED" -nt "$CHECKED" ]; then
  "$VENV/bin/horovodrun" --check-build > "$CHECKED.new" 2>&1 || true
  mv "$CHECKED.new" "$CHECKED"
fi
wanted=("X\] PyTorch" "X\] Gloo")
[ "${SSD_HOROVOD_WITHOUT_MPI:-0}" = 1 ] || wanted+=("X\] MPI")
for want in "${wanted[@]}"; do
  grep -q "$want" "$CHECKED" || {
    cat "$CHECKED" >&2
    rm -f "$CHECKED"   # checked afresh next time
    fail "check" "horovodrun --check-build does not list ${want#X\] }" "remove $CACHE/wheels and rerun to rebuild Horovod"
  }
done
echo "setup: ready ($VENV; $(grep -c 'X\]' "$CHECKED") Horovod features built)"
