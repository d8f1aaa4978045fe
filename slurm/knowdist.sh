#!/usr/bin/env bash
# KnowDist on a SLURM cluster: multi-node DeepSpeed training of the student (launchers/knowdist.py)
# with one rank per GPU on every node (one rank per node without GPUs). No Ray: the teacher is
# co-located with each rank, or its corpus was harvested before (slurm/harvest.sh). It never
# installs anything: PYTHON must already have this repo installed.
#
#   sbatch slurm/knowdist.sh                                  # built-in tiny default, any allocation (CPU too)
#   sbatch -N 2 --gres=gpu:8 --export=ALL,CONFIG=launchers/configs/qwen2.5-7b-instruct_to_qwen2.5-0.5b_knowdist.yaml \
#          slurm/knowdist.sh --data.path=/data/kd/corpus     # 16 ranks; args go to launchers/knowdist.py
#   sbatch -N 2 slurm/knowdist.sh --train.steps=3 --train.warmup_steps=1   # a short smoke run (2 nodes x 1 CPU rank)
#
# Variables (environment; sbatch passes yours by default, or use --export=ALL,NAME=value):
#   CONFIG=launchers/configs/x.yaml   run config for launchers/knowdist.py; empty (default) = built-in tiny default
#   EXTRA_ARGS="--train.lr=1e-5"      more launcher arguments (after CONFIG; script arguments come last)
#   OUT_DIR=/scratch/runs/kd1         run folder (--run.out_dir); default: the config's run.out_dir (resubmitting resumes there)
#   PYTHON=/opt/venv/bin/python       interpreter with this repo installed; default `python` from PATH
#   REPO_ROOT=/home/me/distill        repo checkout; default: found from the submitted script's path or SLURM_SUBMIT_DIR
#   GPUS_PER_NODE=8                   GPUs per node; default SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES, else nvidia-smi, else 0
#   STUDENT_TASKS_PER_NODE=8          ranks per node; default GPUS_PER_NODE, or 1 without GPUs
#   MASTER_ADDR=10.0.0.6              torch.distributed rendezvous host; default the first node's name
#   MASTER_PORT=29512                 rendezvous port; default 29500 + SLURM_JOB_ID % 1000
#   GLOO_SOCKET_IFNAME=ib0            network interface for gloo (CPU collectives); NCCL_SOCKET_IFNAME,
#   NCCL_IB_HCA=mlx5                  NCCL_IB_HCA and the other NCCL_* variables pass through to every rank as well
#   OMP_NUM_THREADS=8                 threads per rank; default CPUs per node / ranks per node
#   STOP_TIMEOUT=20                   seconds the ranks get to stop on scancel before SIGKILL (default 20; keep it well below KillWait)
#   FRESH=1                           start over: --checkpoint.overwrite=true (earlier checkpoints moved aside);
#                                     default: --checkpoint.resume=latest (a requeued or resubmitted job continues)
#   REQUEUE=0                         on SIGUSR1 checkpoint and exit 75 without `scontrol requeue` (default 1: requeue)
#
# The ranks are one `srun` with SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID mapped to RANK /
# WORLD_SIZE / LOCAL_RANK (slurm/lib/step.sh) and MASTER_ADDR / MASTER_PORT from the first node;
# DeepSpeed's init_distributed reads them (no ssh, no hostfile, no `deepspeed` launcher needed).
# Time limit and preemption: `--signal=B:USR1@300` sends this script SIGUSR1 300 s before the limit
# (scancel --signal=USR1 -b JOBID does the same); the ranks then checkpoint after their current step
# and exit 75, and the job is requeued (`--requeue`) and resumes from that checkpoint (docs/slurm.md).
#SBATCH --job-name=knowdist
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
    if [ -f "$d/launchers/knowdist.py" ] && [ -f "$d/slurm/lib/common.sh" ]; then REPO_ROOT="$(cd "$d" && pwd)"; break; fi
  done
fi
[ -n "${REPO_ROOT:-}" ] || { echo "knowdist.sh: cannot find the repo (set REPO_ROOT or submit from the checkout)" >&2; exit 2; }
SD_NAME=knowdist
# shellcheck source=lib/common.sh
source "$REPO_ROOT/slurm/lib/common.sh"
sd_install_traps
sd_init

# Every GPU of every node trains the student.
TEACHER_GPUS_PER_NODE=0
unset TEACHER_GPUS
sd_split_gpus

args=()
[ -z "${CONFIG:-}" ] || args+=(--config "$CONFIG")
[ -z "${OUT_DIR:-}" ] || args+=(--run.out_dir="$OUT_DIR")
sd_resume_args
args+=("${SD_RESUME_ARGS[@]}")
# shellcheck disable=SC2206  # EXTRA_ARGS is a word list on purpose
extra=(${EXTRA_ARGS:-})
rc=0
sd_launch_students "$PYTHON" -u "$REPO_ROOT/launchers/knowdist.py" "${args[@]}" "${extra[@]}" "$@" || rc=$?
sd_requeue_if_stopped "$rc"
[ "$rc" -eq 0 ] || sd_die "training ranks failed (exit $rc); checkpoints so far in ${OUT_DIR:-the run.out_dir of the config}"
sd_log "KnowDist done: student in ${OUT_DIR:-the run.out_dir of the config}/export"
