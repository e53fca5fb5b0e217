#!/bin/bash
# Every rank of a slurm/*.sbatch job starts through this: it says where it landed (rank, host,
# address, local rank, the GPUs it sees), whichever launcher started it, then runs `python "$@"`.
rank=${HOROVOD_RANK:-${OMPI_COMM_WORLD_RANK:-${RANK:-${PMIX_RANK:-${PMI_RANK:-${SLURM_PROCID:-?}}}}}}
size=${HOROVOD_SIZE:-${OMPI_COMM_WORLD_SIZE:-${WORLD_SIZE:-${PMI_SIZE:-${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:-?}}}}}}
local_rank=${HOROVOD_LOCAL_RANK:-${OMPI_COMM_WORLD_LOCAL_RANK:-${LOCAL_RANK:-${MPI_LOCALRANKID:-${SLURM_LOCALID:-?}}}}}
host=$(hostname)
address=$(getent hosts "$host" 2>/dev/null | awk '{print $1; exit}')
printf '== rank %s of %s on %s (%s), local rank %s, CUDA_VISIBLE_DEVICES=%s\n' \
  "$rank" "$size" "$host" "${address:-no address}" "$local_rank" "${CUDA_VISIBLE_DEVICES-unset}" >&2
exec python "$@"
