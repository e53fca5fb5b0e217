# shellcheck shell=bash
# The launch paths of the slurm/*.sbatch templates, sourced by each: how a job's ranks start (srun
# with an MPI plugin, horovodrun over ssh, torchrun per node, mpirun), the environment they start
# in, the job's log in its run directory, the relay of the time-limit signal, and the requeue.
#
# The template sets these first (each documented in the template's header):
#   PROJECT_DIR VENV RUN_DIR LAUNCHER MPI_PLUGIN MPIRUN_AGENT HOROVODRUN_CONTROLLER LAUNCHER_ARGS
#   NETWORK_INTERFACE MODULES SETUP_SCRIPT RENDEZVOUS_PORT MAX_REQUEUES
# then calls, in order:
#   ssd_start_job NAME             log to $RUN_DIR, environment, launcher; prints what was chosen
#   ssd_launch PYTHON_ARGS...      start the job's ranks, e.g. ssd_launch -m ssd_allreduce.train --out DIR
#                                  (returns the launcher's exit code)
#   ssd_end_job RC CHECKPOINTS     requeue after a time-limit signal or a lost rank, else exit RC

SSD_LAUNCHERS="srun horovodrun torchrun mpirun"
SSD_TEMPLATE=${SSD_TEMPLATE:-slurm/${SLURM_JOB_NAME:-job}.sbatch}

ssd_say() { printf '== %s\n' "$*"; }

ssd_stop() {  # ssd_stop <what is wrong and what to set>: the job ends here, before any rank starts
  printf '== STOP: %s\n' "$*" >&2
  exit 2
}

# ------------------------------------------------------------------------------ the job's place
ssd_open_log() {  # the job's whole output goes to its run directory (appended across requeues)
  mkdir -p "$RUN_DIR" 2>/dev/null || ssd_stop "cannot create RUN_DIR=$RUN_DIR: set RUN_DIR to a directory every node can write (a shared file system)"
  RUN_DIR=$(cd "$RUN_DIR" && pwd)
  SSD_LOG=$RUN_DIR/slurm-${SLURM_JOB_ID:-local}.out
  ssd_say "job ${SLURM_JOB_ID:-?}: output goes to $SSD_LOG"
  exec >>"$SSD_LOG" 2>&1
}

ssd_setup_environment() {
  if [ -n "${MODULES:-}" ]; then
    if ! command -v module >/dev/null 2>&1 && [ -r "${MODULESHOME:-/nonexistent}/init/bash" ]; then
      # shellcheck disable=SC1091
      source "$MODULESHOME/init/bash"   # batch shells of some sites lack the module function
    fi
    command -v module >/dev/null 2>&1 || ssd_stop "MODULES='$MODULES' is set but this node has no \`module\` command: empty MODULES, or load them in SETUP_SCRIPT"
    # shellcheck disable=SC2086
    module load $MODULES || ssd_stop "module load $MODULES failed (its message is above): fix MODULES (module avail lists them)"
  fi
  if [ -n "${SETUP_SCRIPT:-}" ]; then
    [ -r "$SETUP_SCRIPT" ] || ssd_stop "SETUP_SCRIPT=$SETUP_SCRIPT does not exist: point it at your site's environment file, or leave it empty"
    # shellcheck disable=SC1090
    source "$SETUP_SCRIPT"
  fi
  [ -r "$VENV/bin/activate" ] || ssd_stop "no virtual environment at VENV=$VENV: run scripts/setup.sh on the login node (it makes $PROJECT_DIR/.venv), or set VENV"
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  export PYTHONUNBUFFERED=1
  # Each rank takes its task's CPUs, not every core of the node (oversubscribed ranks crawl); an
  # MPI rank waiting on another yields its core instead of spinning on it.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export OMPI_MCA_mpi_yield_when_idle=${OMPI_MCA_mpi_yield_when_idle:-1}
  # Slurm 22.05+ srun no longer inherits --cpus-per-task from sbatch
  export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
  if [ -n "${NETWORK_INTERFACE:-}" ]; then
    [ -e "/sys/class/net/$NETWORK_INTERFACE" ] || ssd_stop "NETWORK_INTERFACE=$NETWORK_INTERFACE does not exist on $(hostname) (it has: $(cd /sys/class/net && echo *)): set it to the interface the nodes reach each other on, or leave it empty"
    export NCCL_SOCKET_IFNAME=$NETWORK_INTERFACE GLOO_SOCKET_IFNAME=$NETWORK_INTERFACE
    export HOROVOD_GLOO_IFACE=$NETWORK_INTERFACE
    export OMPI_MCA_btl_tcp_if_include=$NETWORK_INTERFACE OMPI_MCA_oob_tcp_if_include=$NETWORK_INTERFACE
  fi
}

# ------------------------------------------------------------------------------ the allocation
ssd_hosts() { scontrol show hostnames "$SLURM_JOB_NODELIST"; }

ssd_tasks_per_node() {  # one number for every node, from SLURM_TASKS_PER_NODE ("2(x2)", "2,2" or "2")
  local spec=${SLURM_TASKS_PER_NODE:-} counts="" part n times
  [ -n "$spec" ] || ssd_stop "SLURM_TASKS_PER_NODE is not set: submit with sbatch (this runs inside a job)"
  IFS=, read -r -a parts <<<"$spec"
  for part in "${parts[@]}"; do
    n=${part%%(*}
    times=1
    [[ $part != *"(x"* ]] || times=${part#*(x} times=${times%)}
    for _ in $(seq 1 "$times"); do counts="$counts $n"; done
  done
  # shellcheck disable=SC2086
  set -- $counts
  local first=$1
  for n in "$@"; do
    [ "$n" = "$first" ] || ssd_stop "the nodes got different numbers of tasks (SLURM_TASKS_PER_NODE=$spec): submit with --ntasks-per-node so that every node runs as many ranks"
  done
  printf '%s' "$first"
}

ssd_offered_mpi_plugins() { srun --mpi=list 2>&1 | sed -n 's/^[[:space:]]*\([a-z0-9_]*\)$/\1/p; s/.*versions available: *//p' | tr ',' '\n' | tr -d ' ' | sort -u; }

ssd_pick_mpi_plugin() {  # MPI_PLUGIN=auto: pmix, else pmi2, else what the site offers besides none
  local offered
  offered=$(ssd_offered_mpi_plugins)
  if [ "${MPI_PLUGIN:-auto}" != auto ]; then
    grep -qx -- "$MPI_PLUGIN" <<<"$offered" \
      || ssd_stop "MPI_PLUGIN=$MPI_PLUGIN is not offered by this Slurm (srun --mpi=list: $(echo "$offered" | tr '\n' ' ')): set MPI_PLUGIN to one of them"
    return
  fi
  for MPI_PLUGIN in pmix pmix_v5 pmix_v4 pmix_v3 pmi2 cray_shasta; do
    grep -qx -- "$MPI_PLUGIN" <<<"$offered" && return
  done
  ssd_stop "srun offers no MPI plugin (srun --mpi=list: $(echo "$offered" | tr '\n' ' ')): use LAUNCHER=horovodrun or torchrun, or ask your site for PMIx"
}

ssd_horovod_has_mpi() { python -c 'import horovod.torch as h, sys; sys.exit(0 if h.mpi_built() else 1)' 2>/dev/null; }

ssd_pick_launcher() {
  case "${LAUNCHER:-auto}" in
    auto)
      if ssd_horovod_has_mpi && ssd_offered_mpi_plugins | grep -qvx none; then LAUNCHER=srun
      elif command -v horovodrun >/dev/null; then LAUNCHER=horovodrun   # a Horovod built with Gloo alone
      else LAUNCHER=torchrun; fi ;;
    srun|horovodrun|torchrun|mpirun) ;;
    *) ssd_stop "LAUNCHER=$LAUNCHER: set it to auto or one of: $SSD_LAUNCHERS (at the top of $SSD_TEMPLATE)" ;;
  esac
  case "$LAUNCHER" in
    srun) ssd_pick_mpi_plugin ;;
    horovodrun)
      command -v horovodrun >/dev/null || ssd_stop "LAUNCHER=horovodrun but horovodrun is not in $VENV: run scripts/setup.sh (it builds Horovod), or pick another LAUNCHER"
      case "${HOROVODRUN_CONTROLLER:-gloo}" in gloo|mpi) ;; *) ssd_stop "HOROVODRUN_CONTROLLER=$HOROVODRUN_CONTROLLER: set it to gloo or mpi" ;; esac ;;
    mpirun)
      command -v mpirun >/dev/null || ssd_stop "LAUNCHER=mpirun but there is no mpirun on PATH: load your MPI module (MODULES), or pick another LAUNCHER"
      mpirun --version 2>&1 | grep -q "Open MPI" || ssd_stop "LAUNCHER=mpirun uses Open MPI's flags, and this mpirun is not Open MPI ($(mpirun --version 2>&1 | head -n 1)): use LAUNCHER=srun with MPI_PLUGIN=pmi2 or pmix instead"
      case "${MPIRUN_AGENT:-auto}" in auto|slurm|ssh) ;; *) ssd_stop "MPIRUN_AGENT=$MPIRUN_AGENT: set it to auto, slurm or ssh" ;; esac ;;
  esac
}

# ------------------------------------------------------------------------------ one launch per path
SSD_LAUNCHES=0

ssd_launch_command() {  # fills SSD_CMD: the launcher's command line for python "$@"
  local hosts tasks nodes first slots
  mapfile -t hosts < <(ssd_hosts)
  nodes=${#hosts[@]}
  tasks=$(ssd_tasks_per_node)
  first=${hosts[0]}
  slots=$(printf "%s:$tasks," "${hosts[@]}")
  slots=${slots%,}
  # shellcheck disable=SC2206
  local extra=(${LAUNCHER_ARGS:-})
  local rank=(bash "$PROJECT_DIR/slurm/rank.sh")   # says where each rank landed, then runs python
  case "$LAUNCHER" in
    srun)
      SSD_CMD=(srun --mpi="$MPI_PLUGIN" --kill-on-bad-exit=1 --cpus-per-task="$SRUN_CPUS_PER_TASK" "${extra[@]}" "${rank[@]}" "$@") ;;
    horovodrun)
      # ranks on this node start here, the others through ssh; slots = tasks per node
      SSD_CMD=(horovodrun -np $((nodes * tasks)) -H "$slots" "--${HOROVODRUN_CONTROLLER:-gloo}" --start-timeout 120)
      [ -z "${NETWORK_INTERFACE:-}" ] || SSD_CMD+=(--network-interface "$NETWORK_INTERFACE")
      SSD_CMD+=("${extra[@]}" "${rank[@]}" "$@") ;;
    torchrun)
      # one torchrun per node, as a task of one step; the first node serves the c10d rendezvous.
      # Its task takes the CPUs of the node's tasks: srun warns that this exceeds the job's
      # --cpus-per-task ("may never run"), but the node has exactly those CPUs, and it runs.
      local port=$((RENDEZVOUS_PORT + (${SLURM_JOB_ID:-0} * 16 + SSD_LAUNCHES) % 1000))
      SSD_CMD=(env -u SLURM_GPUS_PER_TASK -u SLURM_CPUS_PER_TASK srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --mpi=none
               --kill-on-bad-exit=1 --cpus-per-task=$((SRUN_CPUS_PER_TASK * tasks))
               python -m torch.distributed.run --nnodes="$nodes" --nproc-per-node="$tasks" --max-restarts=0
               --rdzv-backend=c10d --rdzv-endpoint="$first:$port" --rdzv-id="${SLURM_JOB_ID:-0}-$SSD_LAUNCHES"
               "${extra[@]}" --no-python "${rank[@]}" "$@") ;;
    mpirun)
      SSD_CMD=(mpirun -np $((nodes * tasks)) --map-by "ppr:$tasks:node" --bind-to none)
      local name
      for name in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV PYTHONUNBUFFERED OMP_NUM_THREADS \
                  NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME HOROVOD_GLOO_IFACE SSD_FAULT_TIMEOUT; do
        [ -z "${!name:-}" ] || SSD_CMD+=(-x "$name")
      done
      if [ "${MPIRUN_AGENT:-auto}" = ssh ]; then   # daemons reach the nodes by ssh, not by srun
        SSD_CMD+=(--mca plm rsh -H "$slots")
      fi
      SSD_CMD+=("${extra[@]}" "${rank[@]}" "$@") ;;
  esac
}

ssd_relay_signal() {  # the time-limit signal (--signal=B:USR1@...) reaches the batch shell: pass it on to the ranks
  [ -n "${SSD_LAUNCHER_PID:-}" ] || return 0
  ssd_say "$1 received at $(date -Is): asking the ranks to checkpoint and stop"
  case "$LAUNCHER" in
    srun|mpirun) kill -USR1 "$SSD_LAUNCHER_PID" 2>/dev/null || true ;;   # both forward USR1 to every rank
    torchrun) kill -TERM "$SSD_LAUNCHER_PID" 2>/dev/null || true ;;     # torchrun forwards TERM to its workers and waits
    horovodrun)   # horovodrun forwards nothing: signal the ranks of this job on every node
      # shellcheck disable=SC2016
      srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --mpi=none bash -c '
        for env in /proc/[0-9]*/environ; do
          if grep -qzx "SSD_JOB_TAG=$0" "$env" 2>/dev/null && grep -qz "^HOROVOD_RANK=" "$env" 2>/dev/null; then
            pid=${env#/proc/}; kill -USR1 "${pid%/environ}" 2>/dev/null || true
          fi
        done' "$SSD_JOB_TAG" || true ;;
  esac
}

ssd_launch() {  # ssd_launch PYTHON_ARGS...: returns the launcher's exit code
  ssd_launch_command "$@"
  SSD_LAUNCHES=$((SSD_LAUNCHES + 1))
  ssd_say "launch ($LAUNCHER) at $(date -Is): ${SSD_CMD[*]}"
  local rc=0
  "${SSD_CMD[@]}" &
  SSD_LAUNCHER_PID=$!
  # wait returns early (above 128) when a trapped signal arrives: wait again until the launcher ends
  while :; do
    rc=0
    wait "$SSD_LAUNCHER_PID" || rc=$?
    kill -0 "$SSD_LAUNCHER_PID" 2>/dev/null || break
  done
  SSD_LAUNCHER_PID=
  ssd_say "$LAUNCHER exited with $rc at $(date -Is)"
  return "$rc"
}

# ------------------------------------------------------------------------------ start and end
ssd_start_job() {  # ssd_start_job <template name>
  SSD_TEMPLATE=slurm/$1.sbatch
  [ -n "${SLURM_JOB_ID:-}" ] || ssd_stop "submit this with sbatch: sbatch $SSD_TEMPLATE ..."
  ssd_open_log
  ssd_setup_environment
  ssd_pick_launcher
  export SSD_JOB_TAG=${SLURM_JOB_ID}
  case "$RENDEZVOUS_PORT" in ''|*[!0-9]*) ssd_stop "RENDEZVOUS_PORT=$RENDEZVOUS_PORT: set it to a port number (torchrun's rendezvous on the first node)" ;; esac
  case "$MAX_REQUEUES" in ''|*[!0-9]*) ssd_stop "MAX_REQUEUES=$MAX_REQUEUES: set it to a number (0: never requeue after a failure)" ;; esac
  trap 'ssd_relay_signal USR1' USR1
  trap 'ssd_relay_signal TERM' TERM
  ssd_say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $(ssd_hosts | wc -l) node(s) x $(ssd_tasks_per_node) task(s), launcher $LAUNCHER$([ "$LAUNCHER" != srun ] || echo " (--mpi=$MPI_PLUGIN)"), run dir $RUN_DIR, $(date -Is)"
}

ssd_latest_checkpoint() {  # ssd_latest_checkpoint <run dir>...: the newest checkpoint names, one a line
  local dir
  for dir in "$@"; do cat "$dir/checkpoints/latest" 2>/dev/null || true; echo; done
}

ssd_end_job() {  # ssd_end_job <exit code> <checkpoints before the launch> [run dirs...]
  local rc=$1 before=$2 dir preempted=0
  shift 2
  for dir in "$@"; do
    if tail -n 1 "$dir/metrics.jsonl" 2>/dev/null | grep -q '"kind": *"preempted"'; then preempted=1; fi
  done
  if [ $preempted = 1 ]; then
    ssd_say "training checkpointed on a signal (exit $rc): requeueing job $SLURM_JOB_ID, it resumes on restart"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  if [ "$rc" != 0 ] && [ "$(ssd_latest_checkpoint "$@")" != "$before" ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
    ssd_say "training failed (exit $rc) after writing a new checkpoint (a rank or node lost?): requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)) of at most $MAX_REQUEUES), it resumes from that checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  ssd_say "training exited with $rc at $(date -Is)"
  exit "$rc"
}
