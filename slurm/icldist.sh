#!/usr/bin/env bash
# ICLDist on a SLURM cluster: a Ray cluster over the allocation (head on the first node, a worker on
# every other node), the teacher service on the GPUs reserved for it, the DeepSpeed student on the
# rest, then the SentiBench report; Ray is torn down however the job ends (success, error, scancel,
# time limit). It never installs anything: PYTHON must already have this repo installed.
#
#   sbatch slurm/icldist.sh                                   # built-in tiny default, any allocation (CPU too)
#   sbatch -N 4 --gres=gpu:8 --export=ALL,TEACHER_GPUS=8,CONFIG=launchers/configs/llama-3.1-8b-instruct_to_qwen2.5-0.5b_icldist.yaml \
#          slurm/icldist.sh                                   # node 0 = teacher (8 GPUs), 3 x 8 student ranks
#   sbatch -N 1 --gres=gpu:8 slurm/icldist.sh --config FILE --train.lr=1e-5   # args go to launchers/icldist.py
#
# Variables (environment; sbatch passes yours by default, or use --export=ALL,NAME=value):
#   CONFIG=launchers/configs/x.yaml   run config for launchers/icldist.py; empty (default) = built-in tiny default
#   EXTRA_ARGS="--train.steps=20"     more launcher arguments (after CONFIG; script arguments come last)
#   OUT_DIR=/scratch/runs/icl1        run folder (--run.out_dir); default: the config's run.out_dir (resubmitting resumes there)
#   PYTHON=/opt/venv/bin/python       interpreter with this repo installed; default `python` from PATH
#   REPO_ROOT=/home/me/distill        repo checkout; default: found from the submitted script's path or SLURM_SUBMIT_DIR
#   GPUS_PER_NODE=8                   GPUs per node; default SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES, else nvidia-smi, else 0
#   TEACHER_GPUS=8                    GPUs for the teacher service in total: a multiple of GPUS_PER_NODE = that many
#                                     whole nodes (the first ones); else the same share on every node.
#                                     Default: 0 without GPUs, GPUS_PER_NODE with 2+ nodes, GPUS_PER_NODE/2 on one node
#   TEACHER_GPUS_PER_NODE=2           instead of TEACHER_GPUS: this many GPUs of every node for the teacher
#   STUDENT_TASKS_PER_NODE=1          student ranks per student node; default its student GPUs, or 1 without GPUs
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
#   MASTER_ADDR=10.0.0.6              torch.distributed rendezvous host; default the first student node's name
#   MASTER_PORT=29512                 rendezvous port; default 29500 + SLURM_JOB_ID % 1000
#   GLOO_SOCKET_IFNAME=ib0            network interface for gloo (CPU collectives); NCCL_SOCKET_IFNAME,
#   NCCL_IB_HCA=mlx5                  NCCL_IB_HCA and the other NCCL_* variables pass through to every rank as well
#   OMP_NUM_THREADS=8                 threads per student rank; default CPUs per node / ranks per node
#   LOG_DIR=/scratch/logs             Ray node logs; default $OUT_DIR/slurm-$SLURM_JOB_ID (OUT_DIR unset: $SLURM_SUBMIT_DIR/runs/...)
#   STOP_TIMEOUT=20                   seconds each step gets to stop on teardown before SIGKILL (default 20; keep it well below KillWait)
#   FRESH=1                           start over: --checkpoint.overwrite=true (earlier checkpoints moved aside);
#                                     default: --checkpoint.resume=latest (a requeued or resubmitted job continues)
#   REQUEUE=0                         on SIGUSR1 checkpoint and exit 75 without `scontrol requeue` (default 1: requeue)
#
# The student ranks are one `srun` over the student nodes with SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID mapped to RANK / WORLD_SIZE / LOCAL_RANK (slurm/lib/step.sh); they connect to the
# job's Ray cluster with --teacher.ray_address=HEAD_IP:RAY_PORT and rank 0 starts the teacher
# service there (its actors ask Ray for GPUs, which only the teacher's share of GPUs provides).
# Time limit and preemption: `--signal=B:USR1@300` sends this script SIGUSR1 300 s before the limit
# (scancel --signal=USR1 -b JOBID does the same); the ranks then checkpoint after their current step
# and exit 75, and the job is requeued (`--requeue`) and resumes from that checkpoint (docs/slurm.md).
#SBATCH --job-name=icldist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

# Repo root: REPO_ROOT, else the submitted script's folder (sbatch runs a copy, so ask scontrol for
# the original path), else SLURM_SUBMIT_DIR or its parent.
if [ -z "${REPO_ROOT:-}" ]; then
  for d in "$(dirname "$(readlink -f "$0")")/.." \
           "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')" 2>/dev/null)/.." \
           "${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/.."; do
    if [ -f "$d/launchers/icldist.py" ] && [ -f "$d/slurm/lib/common.sh" ]; then REPO_ROOT="$(cd "$d" && pwd)"; break; fi
  done
fi
[ -n "${REPO_ROOT:-}" ] || { echo "icldist.sh: cannot find the repo (set REPO_ROOT or submit from the checkout)" >&2; exit 2; }
SD_NAME=icldist
# shellcheck source=lib/common.sh
source "$REPO_ROOT/slurm/lib/common.sh"
sd_install_traps
sd_init

LOG_DIR="${LOG_DIR:-${OUT_DIR:-${SLURM_SUBMIT_DIR:-$REPO_ROOT}/runs}/slurm-$SLURM_JOB_ID}"
mkdir -p "$LOG_DIR"

sd_split_gpus
sd_ray_start

args=()
[ -z "${CONFIG:-}" ] || args+=(--config "$CONFIG")
[ -z "${OUT_DIR:-}" ] || args+=(--run.out_dir="$OUT_DIR")
args+=(--teacher.ray_address="$RAY_ADDRESS_FOR_JOB")
sd_resume_args
args+=("${SD_RESUME_ARGS[@]}")
# shellcheck disable=SC2206  # EXTRA_ARGS is a word list on purpose
extra=(${EXTRA_ARGS:-})
rc=0
sd_launch_students "$PYTHON" -u "$REPO_ROOT/launchers/icldist.py" "${args[@]}" "${extra[@]}" "$@" || rc=$?
sd_requeue_if_stopped "$rc"
if [ "$rc" -ne 0 ]; then
  sd_die "student ranks failed (exit $rc); outputs so far in ${OUT_DIR:-the run.out_dir of the config}"
fi
sd_log "ICLDist done: student and report in ${OUT_DIR:-the run.out_dir of the config}/export"
