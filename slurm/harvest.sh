#!/usr/bin/env bash
# KnowDist harvesting on a SLURM cluster: a Ray cluster over the whole allocation (head on the first
# node, a worker on every other node, every GPU given to Ray), then one driver on the first node
# (launchers/harvest.py) whose teacher service spreads its replicas over those GPUs. Ray is torn
# down however the job ends. Resubmitting with the same output folder resumes (finished shards are
# kept). It never installs anything: PYTHON must already have this repo installed.
#
#   sbatch slurm/harvest.sh                                   # built-in default (small teacher), any allocation
#   sbatch -N 4 --gres=gpu:8 --export=ALL,CONFIG=launchers/configs/qwen2.5-72b-instruct_harvest.yaml \
#          slurm/harvest.sh --teacher.replicas=8 --teacher.shards=4 --output.dir=/data/kd/corpus
#
# Variables (environment; sbatch passes yours by default, or use --export=ALL,NAME=value):
#   CONFIG=launchers/configs/x.yaml   config for launchers/harvest.py; empty (default) = built-in default
#   EXTRA_ARGS="--input.limit=1000"   more launcher arguments (after CONFIG; script arguments come last)
#   OUT_DIR=/data/kd/corpus           corpus folder (--output.dir); default: the config's output.dir
#   PYTHON=/opt/venv/bin/python       interpreter with this repo installed; default `python` from PATH
#   REPO_ROOT=/home/me/distill        repo checkout; default: found from the submitted script's path or SLURM_SUBMIT_DIR
#   GPUS_PER_NODE=8                   GPUs per node, all given to Ray; default SLURM_GPUS_ON_NODE, else
#                                     CUDA_VISIBLE_DEVICES, else nvidia-smi, else 0
#   RAY_PORT=6379                     Ray GCS port on the head node
#   RAY_HEAD_IP=10.0.0.5              address the head binds to and workers join; default first of `hostname -I` on node 0
#   RAY_NODE_IP_0=127.0.0.2           address Ray node I (I-th node of the allocation) binds to; overrides the next two
#   RAY_NODE_IPS="127.0.0.2 127.0.0.3"  addresses of Ray nodes 0,1,... in order (spaces or commas); workers
#                                     without one let Ray pick the address that routes to the head
#   RAY_CPUS_PER_NODE=16              CPUs each Ray node offers; default SLURM_CPUS_ON_NODE
#   RAY_OBJECT_STORE_BYTES=20000000000  object store size per node; default Ray's (30% of RAM)
#   RAY_TEMP_DIR=/tmp/ray-123         Ray temp dir prefix (node I uses PREFIX-I; keep it short); default /tmp/ray-$SLURM_JOB_ID
#   RAY_START_TIMEOUT=300             seconds to wait for the head to be healthy and every worker to join
#   RAY_START_ARGS="--resources={}"   more `ray start` arguments for every node
#   RAY_AUTH_MODE=token               token (default: a fresh random token per job, RAY_AUTH_TOKEN) or disabled
#   LOG_DIR=/scratch/logs             Ray node logs; default $OUT_DIR/slurm-$SLURM_JOB_ID (OUT_DIR unset: $SLURM_SUBMIT_DIR/runs/...)
#   STOP_TIMEOUT=20                   seconds each step gets to stop on teardown before SIGKILL (default 20; keep it well below KillWait)
#SBATCH --job-name=harvest
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=%x-%j.out

# Repo root: REPO_ROOT, else the submitted script's folder (sbatch runs a copy, so ask scontrol for
# the original path), else SLURM_SUBMIT_DIR or its parent.
if [ -z "${REPO_ROOT:-}" ]; then
  for d in "$(dirname "$(readlink -f "$0")")/.." \
           "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')" 2>/dev/null)/.." \
           "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
    if [ -f "$d/launchers/harvest.py" ] && [ -f "$d/slurm/lib/common.sh" ]; then REPO_ROOT="$(cd "$d" && pwd)"; break; fi
  done
fi
[ -n "${REPO_ROOT:-}" ] || { echo "harvest.sh: cannot find the repo (set REPO_ROOT or submit from the checkout)" >&2; exit 2; }
SD_NAME=harvest
# shellcheck source=lib/common.sh
source "$REPO_ROOT/slurm/lib/common.sh"
sd_install_traps
sd_init

LOG_DIR="${LOG_DIR:-${OUT_DIR:-${SLURM_SUBMIT_DIR:-$REPO_ROOT}/runs}/slurm-$SLURM_JOB_ID}"
mkdir -p "$LOG_DIR"
# Every GPU of every node belongs to the teacher.
TEACHER_NODES="$NNODES"
sd_log "teacher: all $(( NNODES * GPUS_PER_NODE )) GPU(s) of $NNODES node(s) go to Ray"
sd_ray_start

args=()
[ -z "${CONFIG:-}" ] || args+=(--config "$CONFIG")
[ -z "${OUT_DIR:-}" ] || args+=(--output.dir="$OUT_DIR")
args+=(--teacher.ray_address="$RAY_ADDRESS_FOR_JOB")
# shellcheck disable=SC2206  # EXTRA_ARGS is a word list on purpose
extra=(${EXTRA_ARGS:-})
# The driver runs on the first node and sees its GPUs, so the service knows it may ask Ray for GPUs.
sd_log "harvest driver on ${NODES[0]}: $PYTHON launchers/harvest.py ${args[*]} ${extra[*]} $*"
sd_step "driver" "" --nodes=1 --ntasks=1 -w "${NODES[0]}" -- "$PYTHON" -u "$REPO_ROOT/launchers/harvest.py" "${args[@]}" "${extra[@]}" "$@"
rc=0
sd_wait_step "${SD_STEP_PIDS[-1]}" || rc=$?
[ "$rc" -eq 0 ] || sd_die "harvest driver failed (exit $rc); finished shards are kept in ${OUT_DIR:-the output.dir of the config} (resubmit to resume)"
sd_log "harvest done: corpus in ${OUT_DIR:-the output.dir of the config}"
