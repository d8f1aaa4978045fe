#!/usr/bin/env bash
# One srun task of a slurm/*.sh job: select this task's GPUs, map SLURM's task ids to the
# torch.distributed variables, then exec the command. Not meant to be called by hand.
#
#   srun ... bash slurm/lib/step.sh [--gpus FIRST:COUNT] [--rank-env] -- CMD ARGS...
#
# --gpus FIRST:COUNT  keep GPUs FIRST..FIRST+COUNT-1 of the ones this step can see
#                     (CUDA_VISIBLE_DEVICES as SLURM set it for the step, else 0..GPUS_PER_NODE-1);
#                     COUNT=0 hides every GPU. Without --gpus, CUDA_VISIBLE_DEVICES is left alone.
# --rank-env          RANK = RANK_OFFSET + SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS (unless set),
#                     LOCAL_RANK = SLURM_LOCALID, LOCAL_WORLD_SIZE = tasks on this node,
#                     NODE_RANK = SLURM_NODEID; MASTER_ADDR / MASTER_PORT come from the caller;
#                     SIGUSR1 ignored until the trainer installs its handler.
# SD_RAY_IP_MAP="n1=127.0.0.2,n2=127.0.0.3" (set by the caller): RAY_NODE_IP = this node's entry, the
#                     address of the job's Ray node here, which a Ray driver on this node must use.
set -euo pipefail

gpus=""
rank_env=0
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus="$2"; shift 2 ;;
    --rank-env) rank_env=1; shift ;;
    --) shift; break ;;
    *) echo "step.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "step.sh: no command given" >&2; exit 2; }

if [ -n "$gpus" ]; then
  first="${gpus%%:*}"
  count="${gpus##*:}"
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]; then
    IFS=',' read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
  else
    visible=()
    for ((g = 0; g < ${GPUS_PER_NODE:-0}; g++)); do visible+=("$g"); done
  fi
  if (( first + count > ${#visible[@]} )); then
    echo "step.sh: asked for GPUs $first..$((first + count - 1)) but this step sees ${#visible[@]}" \
         "(CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES:-}') on $(hostname)" >&2
    exit 2
  fi
  CUDA_VISIBLE_DEVICES="$(IFS=','; echo "${visible[*]:first:count}")"
  export CUDA_VISIBLE_DEVICES
fi

if [ "$rank_env" = 1 ]; then
  export RANK=$(( ${RANK_OFFSET:-0} + SLURM_PROCID ))
  export WORLD_SIZE="${WORLD_SIZE:-$SLURM_NTASKS}"
  export LOCAL_RANK="$SLURM_LOCALID"
  # SLURM_STEP_TASKS_PER_NODE is e.g. "2(x3)" or "2,1": this node's entry is SLURM_NODEID's.
  export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-${SLURM_STEP_TASKS_PER_NODE%%[(,]*}}"
  export NODE_RANK="$SLURM_NODEID"
  # A training rank installs its SIGUSR1 handler (checkpoint, then exit for requeue) when training
  # starts; until then a forwarded USR1 is ignored rather than killing the rank during start-up.
  trap '' USR1
fi

if [ -n "${SD_RAY_IP_MAP:-}" ]; then
  IFS=',' read -r -a pairs <<< "$SD_RAY_IP_MAP"
  for kv in "${pairs[@]}"; do
    if [ "${kv%%=*}" = "${SLURMD_NODENAME:-$(hostname -s)}" ]; then export RAY_NODE_IP="${kv#*=}"; fi
  done
fi

exec "$@"
