# shellcheck shell=bash
# Shared by slurm/icldist.sh, slurm/knowdist.sh and slurm/harvest.sh (sourced, never run):
# allocation discovery, the teacher/student GPU split, a Ray cluster over the allocation (head on
# the first node, one worker per other node, each an `srun --overlap` step we hold by pid), the
# student launch (srun, SLURM task ids -> RANK/WORLD_SIZE/LOCAL_RANK), and cleanup on any exit.
# Every variable is documented in the header of the script that sources this file and in docs/slurm.md.

SD_NAME="${SD_NAME:-slurm}"
SD_STEP_PIDS=()      # srun pids of long-running steps (students, Ray workers, Ray head), in start order
SD_STEP_NAMES=()
SD_RAY_STARTED=0
SD_CLEANED=0
SD_PREEMPTED=0
SD_STUDENTS_PID=""
SD_REQUEUE_EXIT=75   # the trainer's exit status after it checkpointed on SIGUSR1/SIGTERM (Trainer.REQUEUE_EXIT)

sd_log() { printf '[%s %s] %s\n' "$(date -u +%H:%M:%S)" "$SD_NAME" "$*"; }
sd_die() { sd_log "ERROR: $*" >&2; exit 1; }

# ----------------------------------------------------------------------------------------------
# Allocation
# ----------------------------------------------------------------------------------------------

# sd_init: nodes, GPUs per node, CPUs, python, run folders. Needs REPO_ROOT (set by the caller).
sd_init() {
  [ -n "${SLURM_JOB_ID:-}" ] || sd_die "not inside a SLURM job: submit with sbatch (or run inside salloc)"
  cd "$REPO_ROOT"
  PYTHON="${PYTHON:-python}"
  command -v "$PYTHON" >/dev/null 2>&1 || sd_die "PYTHON=$PYTHON not found on $(hostname) (set PYTHON to your environment's interpreter)"
  "$PYTHON" -c "import distill" 2>/dev/null \
    || sd_die "'$PYTHON -c \"import distill\"' fails on $(hostname): activate the environment where 'pip install -e $REPO_ROOT' was done (this script never installs)"

  mapfile -t NODES < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
  NNODES="${#NODES[@]}"
  [ "$NNODES" -ge 1 ] || sd_die "empty node list in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
  CPUS_ON_NODE="${SLURM_CPUS_ON_NODE:-$(nproc)}"

  if [ -z "${GPUS_PER_NODE:-}" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
      GPUS_PER_NODE="$SLURM_GPUS_ON_NODE"
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != "NoDevFiles" ]; then
      GPUS_PER_NODE="$(awk -F, '{print NF}' <<< "$CUDA_VISIBLE_DEVICES")"
    elif command -v nvidia-smi >/dev/null 2>&1; then
      GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
    else
      GPUS_PER_NODE=0
    fi
  fi
  export GPUS_PER_NODE
  # Steps ask for the node's GPUs explicitly only when the job holds them as GRES.
  SD_GRES=()
  if [ "$GPUS_PER_NODE" -gt 0 ] && [ -n "${SLURM_GPUS_ON_NODE:-}${SLURM_JOB_GPUS:-}" ]; then
    SD_GRES=(--gres="gpu:$GPUS_PER_NODE")
  fi
  export PYTHONUNBUFFERED=1
  sd_log "job $SLURM_JOB_ID: $NNODES node(s) [${NODES[*]}], $GPUS_PER_NODE GPU(s) and $CPUS_ON_NODE CPU(s) per node, repo $REPO_ROOT, python $(command -v "$PYTHON")"
}

# sd_split_gpus: TEACHER_NODES (whole nodes for the teacher, the first ones) and per-node
# TEACHER_GPUS_PER_NODE / STUDENT_GPUS_PER_NODE from TEACHER_GPUS (total), and the student ranks
# STUDENT_NODES[] x STUDENT_TASKS_PER_NODE.
sd_split_gpus() {
  local G="$GPUS_PER_NODE"
  TEACHER_NODES=0
  if [ -n "${TEACHER_GPUS_PER_NODE:-}" ]; then
    [ -z "${TEACHER_GPUS:-}" ] || sd_die "set TEACHER_GPUS or TEACHER_GPUS_PER_NODE, not both"
  else
    if [ -z "${TEACHER_GPUS:-}" ]; then
      if [ "$G" -eq 0 ]; then TEACHER_GPUS=0
      elif [ "$NNODES" -gt 1 ]; then TEACHER_GPUS="$G"          # the first node serves the teacher
      elif [ "$G" -ge 2 ]; then TEACHER_GPUS=$(( G / 2 ))       # one node: half and half
      else TEACHER_GPUS=0; fi
    fi
    if [ "$TEACHER_GPUS" -eq 0 ]; then
      TEACHER_GPUS_PER_NODE=0
    elif [ "$G" -gt 0 ] && [ $(( TEACHER_GPUS % G )) -eq 0 ]; then
      TEACHER_NODES=$(( TEACHER_GPUS / G )); TEACHER_GPUS_PER_NODE=0
      [ "$TEACHER_NODES" -lt "$NNODES" ] \
        || sd_die "TEACHER_GPUS=$TEACHER_GPUS takes all $NNODES node(s) x $G GPU(s): nothing left for the student (ask for more nodes with -N)"
    elif [ $(( TEACHER_GPUS % NNODES )) -eq 0 ] && [ $(( TEACHER_GPUS / NNODES )) -lt "$G" ]; then
      TEACHER_GPUS_PER_NODE=$(( TEACHER_GPUS / NNODES ))
    else
      sd_die "TEACHER_GPUS=$TEACHER_GPUS cannot be split evenly over $NNODES node(s) x $G GPU(s): use a multiple of $G (whole teacher nodes) or of $NNODES below $(( NNODES * G )) (the same share on every node)"
    fi
  fi
  [ "$TEACHER_GPUS_PER_NODE" -le "$G" ] || sd_die "TEACHER_GPUS_PER_NODE=$TEACHER_GPUS_PER_NODE > $G GPUs per node"
  STUDENT_GPUS_PER_NODE=$(( G - TEACHER_GPUS_PER_NODE ))
  STUDENT_NODES=("${NODES[@]:$TEACHER_NODES}")
  if [ "$G" -gt 0 ]; then
    [ "$STUDENT_GPUS_PER_NODE" -gt 0 ] || sd_die "TEACHER_GPUS_PER_NODE=$TEACHER_GPUS_PER_NODE leaves no GPU for the student on $G-GPU nodes"
    STUDENT_TASKS_PER_NODE="${STUDENT_TASKS_PER_NODE:-$STUDENT_GPUS_PER_NODE}"
  else
    STUDENT_TASKS_PER_NODE="${STUDENT_TASKS_PER_NODE:-1}"
  fi
  STUDENT_WORLD_SIZE=$(( ${#STUDENT_NODES[@]} * STUDENT_TASKS_PER_NODE ))
  sd_log "GPU split: teacher $TEACHER_NODES whole node(s) + $TEACHER_GPUS_PER_NODE GPU(s) on every other node;" \
         "student ${#STUDENT_NODES[@]} node(s) x $STUDENT_TASKS_PER_NODE rank(s) = $STUDENT_WORLD_SIZE rank(s)"
}

# Teacher GPUs a Ray node gets: all of a whole teacher node, else the per-node share.
sd_teacher_gpus_of_node() {
  if [ "$1" -lt "${TEACHER_NODES:-0}" ]; then echo "$GPUS_PER_NODE"; else echo "${TEACHER_GPUS_PER_NODE:-0}"; fi
}

# ----------------------------------------------------------------------------------------------
# Long-running steps and cleanup
# ----------------------------------------------------------------------------------------------

# sd_step NAME LOGFILE SRUN_ARGS... -- CMD...: start `srun --overlap ...` in the background, keep its pid.
sd_step() {
  local name="$1" logfile="$2"; shift 2
  local srun_args=()
  while [ "$1" != "--" ]; do srun_args+=("$1"); shift; done
  shift
  if [ -n "$logfile" ]; then
    srun --overlap "${SD_GRES[@]}" "${srun_args[@]}" "$@" >"$logfile" 2>&1 &
  else
    srun --overlap "${SD_GRES[@]}" "${srun_args[@]}" "$@" &
  fi
  SD_STEP_PIDS+=("$!")
  SD_STEP_NAMES+=("$name")
}

sd_alive() { kill -0 "$1" 2>/dev/null; }

# EXIT trap: stop every step this job started (students, Ray workers, Ray head), all at once since
# SLURM gives a cancelled job only KillWait (often 30 s) before SIGKILL. SIGTERM to an srun is
# forwarded to its tasks; `ray start --block` then stops the Ray processes it started. Steps still
# running after STOP_TIMEOUT get SIGKILL (slurmd then kills what is left of them).
sd_cleanup() {
  local rc=$?
  [ "$SD_CLEANED" = 0 ] || return 0
  SD_CLEANED=1
  trap - ERR
  # A second signal (e.g. scancel during an error exit) must not cut the teardown short.
  trap 'sd_log "signal during teardown: still stopping"' TERM INT
  set +e
  local i pid live=() names=()
  for (( i = ${#SD_STEP_PIDS[@]} - 1; i >= 0; i-- )); do
    pid="${SD_STEP_PIDS[$i]}"
    if sd_alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null
      live+=("$pid"); names+=("${SD_STEP_NAMES[$i]}")
    fi
  done
  [ "${#live[@]}" -eq 0 ] || sd_log "stopping ${names[*]}"
  local t=0 left
  while :; do
    left=()
    for i in "${!live[@]}"; do sd_alive "${live[$i]}" && left+=("${names[$i]}"); done
    [ "${#left[@]}" -gt 0 ] && [ "$t" -lt "$(( ${STOP_TIMEOUT:-20} * 10 ))" ] || break
    sleep 0.1; t=$(( t + 1 ))
  done
  for i in "${!live[@]}"; do
    if sd_alive "${live[$i]}"; then
      sd_log "${names[$i]} did not stop within ${STOP_TIMEOUT:-20}s: SIGKILL"
      kill -KILL "${live[$i]}" 2>/dev/null
    fi
  done
  for pid in "${SD_STEP_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  if [ "$SD_RAY_STARTED" = 1 ]; then
    sd_log "Ray stopped: head and $(( NNODES - 1 )) worker(s) of this job (only what this job started)"
  fi
  sd_log "exit $rc"
  exit "$rc"
}

sd_install_traps() {
  set -Eeuo pipefail
  trap sd_cleanup EXIT
  trap 'sd_log "SIGTERM (scancel or time limit): shutting down"; exit 143' TERM
  trap 'sd_log "SIGINT: shutting down"; exit 130' INT
  trap sd_on_usr1 USR1
  trap 'sd_log "command failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
}

# sd_wait_step PID NAME: wait for a background step (so the TERM trap runs at once), return its rc.
# A trapped USR1 interrupts `wait` (status 128+10) while the step runs on: wait again then.
sd_wait_step() {
  local rc
  while :; do
    rc=0
    wait "$1" || rc=$?
    if [ "$rc" -gt 128 ] && sd_alive "$1"; then continue; fi
    return "$rc"
  done
}

# USR1 trap (`#SBATCH --signal=B:USR1@SECONDS`: the time limit is near, or a preemption notice):
# forward it to the training ranks (srun passes it to every task); each checkpoints after its current
# optimizer step and exits with SD_REQUEUE_EXIT, which sd_requeue_if_stopped turns into a requeue.
sd_on_usr1() {
  SD_PREEMPTED=1
  sd_log "SIGUSR1 (time limit near or preemption): asking the training ranks to checkpoint and stop"
  [ -z "$SD_STUDENTS_PID" ] || kill -USR1 "$SD_STUDENTS_PID" 2>/dev/null || true
}

# sd_requeue_if_stopped RC: the ranks stopped after a checkpoint (RC = SD_REQUEUE_EXIT): requeue this job
# (`scontrol requeue`; it then resumes from the newest checkpoint), else exit SD_REQUEUE_EXIT so that a
# resubmission resumes. Any other RC: return.
sd_requeue_if_stopped() {
  [ "$1" -eq "$SD_REQUEUE_EXIT" ] || return 0
  sd_log "training checkpointed and stopped on a signal (exit $SD_REQUEUE_EXIT)"
  if [ "${REQUEUE:-1}" != 0 ] && scontrol requeue "$SLURM_JOB_ID"; then
    sd_log "requeued job $SLURM_JOB_ID (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 ))): it resumes from the newest checkpoint"
    exit 0
  fi
  sd_log "not requeued (REQUEUE=0, or the job is not requeueable: submit with --requeue); resubmit the same command to resume" >&2
  exit "$SD_REQUEUE_EXIT"
}

# sd_resume_args: --checkpoint.resume=latest (the default: a requeued or resubmitted job continues from
# the newest complete checkpoint; none yet = a fresh start), or with FRESH=1 a fresh run that moves
# the run folder's earlier checkpoints aside (--checkpoint.overwrite=true). Sets SD_RESUME_ARGS.
sd_resume_args() {
  if [ "${FRESH:-0}" != 0 ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
    SD_RESUME_ARGS=(--checkpoint.overwrite=true)
  else
    SD_RESUME_ARGS=(--checkpoint.resume=latest)
  fi
}

# ----------------------------------------------------------------------------------------------
# Ray over the allocation
# ----------------------------------------------------------------------------------------------

# Address Ray node I binds to: RAY_NODE_IP_<I>, else item I of RAY_NODE_IPS, else (head only)
# RAY_HEAD_IP or the first address of `hostname -I` on the first node; workers: Ray's own choice.
sd_ray_node_ip() {
  local i="$1" var="RAY_NODE_IP_$1"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  if [ -n "${RAY_NODE_IPS:-}" ]; then
    local ips
    read -r -a ips <<< "${RAY_NODE_IPS//,/ }"
    if [ -n "${ips[$i]:-}" ]; then echo "${ips[$i]}"; return; fi
  fi
  if [ "$i" = 0 ]; then
    if [ -n "${RAY_HEAD_IP:-}" ]; then echo "$RAY_HEAD_IP"; return; fi
    local ip
    ip="$(hostname -I 2>/dev/null | awk '{print $1}')"
    echo "${ip:-$(hostname --ip-address | awk '{print $1}')}"
  fi
}

# sd_ray_start: Ray head on node 0, a worker on every other node; waits until all have joined.
# Sets RAY_ADDRESS_FOR_JOB=HEAD_IP:RAY_PORT.
sd_ray_start() {
  RAY_PORT="${RAY_PORT:-6379}"
  RAY_TEMP_DIR="${RAY_TEMP_DIR:-/tmp/ray-$SLURM_JOB_ID}"
  RAY_START_TIMEOUT="${RAY_START_TIMEOUT:-300}"
  RAY_LOG_DIR="${RAY_LOG_DIR:-$LOG_DIR}"
  mkdir -p "$RAY_LOG_DIR"
  # Each job gets its own token: only processes holding it (this job's) can talk to its Ray.
  if [ "${RAY_AUTH_MODE:-token}" = token ]; then
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN="${RAY_AUTH_TOKEN:-$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')}"
  fi
  local ray=("$PYTHON" -m ray.scripts.scripts)
  local head_ip
  head_ip="$(sd_ray_node_ip 0)"
  [ -n "$head_ip" ] || sd_die "cannot tell the first node's address: set RAY_HEAD_IP or RAY_NODE_IP_0"
  RAY_ADDRESS_FOR_JOB="$head_ip:$RAY_PORT"
  local i ip tg cpus common ray_extra
  read -r -a ray_extra <<< "${RAY_START_ARGS:-}"
  SD_RAY_STARTED=1
  for (( i = 0; i < NNODES; i++ )); do
    ip="$(sd_ray_node_ip "$i")"
    tg="$(sd_teacher_gpus_of_node "$i")"
    cpus="${RAY_CPUS_PER_NODE:-$CPUS_ON_NODE}"
    common=(--block --disable-usage-stats --temp-dir "$RAY_TEMP_DIR-$i" --num-cpus "$cpus" --num-gpus "$tg")
    [ -z "$ip" ] || common+=(--node-ip-address "$ip")
    [ -z "${RAY_OBJECT_STORE_BYTES:-}" ] || common+=(--object-store-memory "$RAY_OBJECT_STORE_BYTES")
    if [ "$i" = 0 ]; then
      sd_step "ray-head" "$RAY_LOG_DIR/ray-node0.log" --nodes=1 --ntasks=1 -w "${NODES[0]}" -- \
        bash "$REPO_ROOT/slurm/lib/step.sh" --gpus "0:$tg" -- \
        "${ray[@]}" start --head --port "$RAY_PORT" --include-dashboard=false "${common[@]}" "${ray_extra[@]}"
      sd_log "starting Ray head on ${NODES[0]} at $RAY_ADDRESS_FOR_JOB ($tg GPU(s), $cpus CPU(s)); log $RAY_LOG_DIR/ray-node0.log"
      local t0=$SECONDS
      until timeout 30 "${ray[@]}" health-check --address "$RAY_ADDRESS_FOR_JOB" >/dev/null 2>&1; do
        if ! sd_alive "${SD_STEP_PIDS[-1]}"; then
          tail -n 30 "$RAY_LOG_DIR/ray-node0.log" >&2 || true
          sd_die "the Ray head exited during start-up (log above: $RAY_LOG_DIR/ray-node0.log)"
        fi
        (( SECONDS - t0 < RAY_START_TIMEOUT )) || sd_die "Ray head not healthy after ${RAY_START_TIMEOUT}s (RAY_START_TIMEOUT); see $RAY_LOG_DIR/ray-node0.log"
        sleep 2
      done
      sd_log "Ray head started on ${NODES[0]} ($RAY_ADDRESS_FOR_JOB) in $(( SECONDS - t0 ))s"
    else
      sd_step "ray-worker-$i" "$RAY_LOG_DIR/ray-node$i.log" --nodes=1 --ntasks=1 -w "${NODES[$i]}" -- \
        bash "$REPO_ROOT/slurm/lib/step.sh" --gpus "0:$tg" -- \
        "${ray[@]}" start --address "$RAY_ADDRESS_FOR_JOB" "${common[@]}" "${ray_extra[@]}"
      sd_log "starting Ray worker $i on ${NODES[$i]}${ip:+ at $ip} ($tg GPU(s)); log $RAY_LOG_DIR/ray-node$i.log"
    fi
  done
  if [ "$NNODES" -gt 1 ]; then
    local t0=$SECONDS
    "$PYTHON" - "$RAY_ADDRESS_FOR_JOB" "$NNODES" "$RAY_START_TIMEOUT" "$head_ip" <<'EOF' || sd_die "Ray workers did not all join (logs: $RAY_LOG_DIR/ray-node*.log)"
import sys, time
import ray
address, want, timeout, ip = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ray.init(address=address, _node_ip_address=ip, log_to_driver=False, logging_level="ERROR")
deadline = time.monotonic() + timeout
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want:
        break
    if time.monotonic() > deadline:
        sys.exit(f"only {len(alive)} of {want} Ray nodes alive after {timeout:.0f}s")
    time.sleep(1)
for n in alive:
    r = n["Resources"]
    print(f"  ray node {n['NodeManagerAddress']}: {r.get('GPU', 0):g} GPU, {r.get('CPU', 0):g} CPU", flush=True)
EOF
    sd_log "Ray cluster up: $NNODES node(s) joined in $(( SECONDS - t0 ))s"
  fi
  export RAY_ADDRESS_FOR_JOB
}

# ----------------------------------------------------------------------------------------------
# Students
# ----------------------------------------------------------------------------------------------

# sd_launch_students CMD...: one srun over the student nodes, STUDENT_TASKS_PER_NODE tasks each,
# GPUs TEACHER_GPUS_PER_NODE.. of every node, rank env mapped; waits and returns its exit status.
sd_launch_students() {
  local nodelist
  nodelist="$(IFS=','; echo "${STUDENT_NODES[*]}")"
  export MASTER_ADDR="${MASTER_ADDR:-${STUDENT_NODES[0]}}"
  export MASTER_PORT="${MASTER_PORT:-$(( 29500 + SLURM_JOB_ID % 1000 ))}"
  export WORLD_SIZE="$STUDENT_WORLD_SIZE"
  export RANK_OFFSET=0
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    export OMP_NUM_THREADS=$(( CPUS_ON_NODE / STUDENT_TASKS_PER_NODE > 0 ? CPUS_ON_NODE / STUDENT_TASKS_PER_NODE : 1 ))
  fi
  # Each rank's Ray driver binds the address of its node's Ray node (RAY_NODE_IP, set by step.sh).
  if [ "${SD_RAY_STARTED:-0}" = 1 ]; then
    local i ip map=()
    for (( i = 0; i < NNODES; i++ )); do
      ip="$(sd_ray_node_ip "$i")"
      [ -z "$ip" ] || map+=("${NODES[$i]}=$ip")
    done
    SD_RAY_IP_MAP="$(IFS=','; echo "${map[*]}")"
    export SD_RAY_IP_MAP
  fi
  local gpu_args=()
  [ "$GPUS_PER_NODE" -eq 0 ] || gpu_args=(--gpus "$TEACHER_GPUS_PER_NODE:$STUDENT_GPUS_PER_NODE")
  [ "$SD_PREEMPTED" = 0 ] || { sd_log "SIGUSR1 came before the ranks started: not starting them"; return "$SD_REQUEUE_EXIT"; }
  sd_log "launching $STUDENT_WORLD_SIZE student rank(s) on [$nodelist] (master $MASTER_ADDR:$MASTER_PORT): $*"
  sd_step "students" "" --kill-on-bad-exit=1 --nodes="${#STUDENT_NODES[@]}" --ntasks="$STUDENT_WORLD_SIZE" \
    --ntasks-per-node="$STUDENT_TASKS_PER_NODE" -w "$nodelist" -- \
    bash "$REPO_ROOT/slurm/lib/step.sh" "${gpu_args[@]}" --rank-env -- "$@"
  SD_STUDENTS_PID="${SD_STEP_PIDS[-1]}"
  local rc=0
  sd_wait_step "$SD_STUDENTS_PID" || rc=$?
  SD_STUDENTS_PID=""
  return "$rc"
}
