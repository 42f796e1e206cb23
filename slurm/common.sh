# Shared by slurm/*.sbatch (sourced, not run): launch one `accelerate launch` per node of the
# allocation and turn SLURM's time-limit warning into a checkpoint + requeue.
#
# Inputs (environment; all optional):
#   ACCELERATE_CONFIG  accelerate config file; default by size: configs/accelerate/single.yaml
#                      (1 process), multi_gpu.yaml (1 node), multi_node.yaml (several nodes)
#   PROCS_PER_NODE     processes per node; default: GPUs on the node (SLURM_GPUS_ON_NODE), else 1
#   MAIN_PORT          rendezvous port on the first node; default 20000 + job id % 20000
#   LOG_DIR            per-node launcher logs; default logs/slurm
#   MAX_REQUEUES       stop requeueing after this many restarts; default 20
#   DERADIFF_ROOT      checkout with train/ and configs/; default the submit directory

DERADIFF_ROOT="${DERADIFF_ROOT:-$SLURM_SUBMIT_DIR}"
LOG_DIR="${LOG_DIR:-logs/slurm}"
MAX_REQUEUES="${MAX_REQUEUES:-20}"

_sbatch_log() { echo "[$(date +%H:%M:%S) ${SLURM_JOB_NAME:-job} ${SLURM_JOB_ID}] $*"; }

# Run `accelerate launch ... train/align.py "$@"` on every node of the allocation, wait for it,
# and requeue the job if the time-limit warning (SIGUSR1, `#SBATCH --signal=B:USR1@secs`)
# arrived before training finished. Returns the launchers' exit status.
deradiff_launch() {
  local procs="${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}" config
  export DERADIFF_NUM_PROCESSES=$((SLURM_NNODES * procs))
  if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
    config="$ACCELERATE_CONFIG"
  elif ((DERADIFF_NUM_PROCESSES == 1)); then
    config="$DERADIFF_ROOT/configs/accelerate/single.yaml"
  elif ((SLURM_NNODES == 1)); then
    config="$DERADIFF_ROOT/configs/accelerate/multi_gpu.yaml"
  else
    config="$DERADIFF_ROOT/configs/accelerate/multi_node.yaml"
  fi
  [[ -f "$config" ]] || { _sbatch_log "error: accelerate config $config not found; set ACCELERATE_CONFIG"; return 2; }
  export DERADIFF_ACCELERATE_CONFIG="$config"
  # The first host of the allocation runs machine rank 0 and the rendezvous store.
  DERADIFF_MAIN_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
  export DERADIFF_MAIN_HOST
  export DERADIFF_MAIN_PORT="${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
  export DERADIFF_ROOT
  mkdir -p "$LOG_DIR"
  # Named like the batch log: <name>-<job id> or, for array tasks, <name>-<array job id>_<task>.
  local node_log="$LOG_DIR/${SLURM_JOB_NAME}-${SLURM_JOB_ID}"
  [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]] && node_log="$LOG_DIR/${SLURM_JOB_NAME}-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  _sbatch_log "restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NNODES node(s) ($SLURM_JOB_NODELIST) x $procs process(es)," \
    "main $DERADIFF_MAIN_HOST:$DERADIFF_MAIN_PORT, config $config; node logs ${node_log}-node<N>.out"
  _sbatch_log "train/align.py $*"

  # One task per node. The single quotes matter: each node's shell expands its own
  # SLURM_NODEID. USR1 is ignored in the launchers (their default action would kill them); the
  # trainer installs its own handler and checkpoints on it.
  srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --open-mode=append \
    --output="${node_log}-node%n.out" \
    bash -c 'trap "" USR1; exec accelerate launch --config_file "$DERADIFF_ACCELERATE_CONFIG" \
      --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" --num_processes "$DERADIFF_NUM_PROCESSES" \
      --main_process_ip "$DERADIFF_MAIN_HOST" --main_process_port "$DERADIFF_MAIN_PORT" --deepspeed_multinode_launcher standard \
      "$DERADIFF_ROOT/train/align.py" "$@"' align "$@" &
  local pid=$! rc=0
  # `wait` returns early whenever a trapped signal arrives; keep waiting for srun itself.
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  wait "$pid" || rc=$?
  trap - USR1
  if ((_deradiff_warned && rc != 0)); then
    if ((${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES)); then
      _sbatch_log "not requeueing: already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES=$MAX_REQUEUES)"
      return "$rc"
    fi
    _sbatch_log "requeueing; the next start resumes from the checkpoint just saved"
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60 # the requeue ends this script; do not let it exit first with a failure status
  fi
  _sbatch_log "launchers exited with status $rc"
  return "$rc"
}

_deradiff_forward_warning() {
  _deradiff_warned=1
  _sbatch_log "time-limit warning (SIGUSR1): asking the trainer to checkpoint and stop"
  # Without --batch, scancel signals every process of the job's steps (launchers and
  # trainers), not this script.
  scancel --signal=USR1 "$SLURM_JOB_ID" || true
}

# From the moment this file is sourced: bash's default action for SIGUSR1 would end the script
# (and the job, unrequeued).
_deradiff_warned=0
trap _deradiff_forward_warning USR1
