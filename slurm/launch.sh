#!/usr/bin/env bash
# slurm/launch.sh - the body of every slurm/*.sbatch: run zerolaunch across a Slurm allocation,
# save and requeue on the time-limit or preemption signal. The .sbatch files `exec` it from the
# repository root, so this shell *is* the batch shell: the signals Slurm sends it land here.
#
# Inputs (environment; arguments are passed on to launcher/run.py after these):
#   SPEC        run spec YAML             (default: launcher/run.py's, the Shakespeare demo)
#   DS_CONFIG   DeepSpeed JSON            (default ds_configs/zero2.json)
#   SET_ARGS    extra run.py arguments, shell-quoted: "--set train.max_steps=100 --set out_dir=x"
#   PYTHON      interpreter               (default: the active virtualenv's, ./.venv's, python3)
#   SITE_ENV    file sourced first: module loads, NCCL settings (default slurm/env/site.sh if
#               it exists; see slurm/env/example-*.sh)
#   LAUNCH_MODE srun (one task per device, the default) or deepspeed (one `deepspeed` runner per
#               node with a hostfile made from the allocation; submit with --ntasks-per-node=1)
#   DEVICES_PER_NODE  deepspeed mode: processes per node (default: GPUs on the node, or 2)
#   REQUEUE     1 (default): requeue the job after a save on a signal or time limit; 0: don't
#   MAX_REQUEUES      stop requeueing after this many restarts (default 100)
#   MASTER_PORT rendezvous port on the first node (default: a free one)
set -uo pipefail

# Everything is inside main, which bash parses whole before running: editing or updating this
# file while jobs run cannot change what a running job executes next.
main() {

  EXIT_USAGE=2
  EXIT_REQUEUE=75 # launcher/run.py saved early (signal, time limit): run again to continue

  log() { echo "[zerolaunch-slurm $(date +%H:%M:%S)] $*"; }
  die() { log "error: $*" >&2; exit "$EXIT_USAGE"; }

  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with sbatch slurm/train.sbatch"
  [ -f launcher/run.py ] || die "$(pwd) is not a zerolaunch checkout: submit from the repository root or set ZEROLAUNCH_DIR"

  # --- the site's modules and network settings, then the Python environment -------------------
  site_env=${SITE_ENV:-slurm/env/site.sh}
  if [ -n "${SITE_ENV:-}" ] && [ ! -f "$SITE_ENV" ]; then die "SITE_ENV=$SITE_ENV does not exist"; fi
  if [ -f "$site_env" ]; then
    log "sourcing $site_env"
    # shellcheck disable=SC1090
    source "$site_env" || die "sourcing $site_env failed"
  fi
  if [ -z "${PYTHON:-}" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PYTHON=$VIRTUAL_ENV/bin/python
    elif [ -x .venv/bin/python ]; then PYTHON=$(pwd)/.venv/bin/python
    else PYTHON=$(command -v python3) || die "no python3 on PATH: set PYTHON=/path/to/python"
    fi
  fi
  [ -x "$PYTHON" ] || die "PYTHON=$PYTHON is not an executable"

  # --- rendezvous: the first node's address as Slurm knows it (names need not resolve) ---------
  first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_ADDR=$(scontrol show node -o "$first_node" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
  MASTER_ADDR=${MASTER_ADDR:-$first_node}
  # This script runs on the first node, so a port free here is free where rank 0 listens.
  MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
  export MASTER_ADDR MASTER_PORT
  # Rank 0 (on this node) polls this file at every step: a signal reaches it even when a wrapper
  # such as the deepspeed runner would swallow it. One per attempt: a requeued job keeps its id.
  export ZEROLAUNCH_STOP_FILE=${TMPDIR:-/tmp}/zerolaunch-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}.stop
  rm -f "$ZEROLAUNCH_STOP_FILE"

  # --- the command ----------------------------------------------------------------------------
  eval "set_args=(${SET_ARGS:-})" || die "SET_ARGS is not valid shell words: $SET_ARGS"
  run_args=(${SPEC:+--spec "$SPEC"} --ds_config "${DS_CONFIG:-ds_configs/zero2.json}" "${set_args[@]}" "$@")
  mode=${LAUNCH_MODE:-srun}
  nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  case "$mode" in
    srun)
      # One task per device; ranks come from SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS.
      # A rank that fails ends the others instead of leaving them in a collective.
      cmd=(srun --kill-on-bad-exit=1 "$PYTHON" -u launcher/run.py "${run_args[@]}")
      ;;
    deepspeed)
      per_node=${DEVICES_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}}
      [ "${per_node:-0}" -gt 0 ] 2>/dev/null || per_node=2
      # One runner per node, told its node rank: no ssh, no pdsh. Each writes the hostfile (every
      # node of the allocation, per_node slots) to its own node's disk before it starts.
      cmd=(srun --kill-on-bad-exit=1 --ntasks-per-node=1 --ntasks="$nodes" bash -c
        'hostfile=${TMPDIR:-/tmp}/zerolaunch-$SLURM_JOB_ID-$SLURM_NODEID.hostfile
         scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$1/" >"$hostfile" || exit 2
         exec "$0" -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh \
           --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
           launcher/run.py "${@:2}"'
        "$PYTHON" "$per_node" "${run_args[@]}")
      ;;
    *) die "LAUNCH_MODE=$mode: use srun or deepspeed" ;;
  esac

  # --- signals: ask for a save at the next step boundary; the trap never kills anything --------
  child=""
  got_signal=""
  cancelled=""
  on_signal() {
    got_signal=$1
    log "received SIG$1: asking every rank to save at the next step boundary"
    echo "SIG$1 to the batch shell" >"$ZEROLAUNCH_STOP_FILE"
    # srun hands USR1/TERM on to every task; the deepspeed runner would die of USR1 instead.
    if [ -n "$child" ] && [ "$mode" = srun ]; then kill -"$1" "$child" 2>/dev/null || true; fi
    # TERM comes with scancel, preemption and the hard time limit alike. A job already
    # COMPLETING for any reason but its time limit is being cancelled: save, but do not
    # resurrect it with a requeue.
    if [ "$1" = TERM ]; then
      local info
      info=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null)
      if [[ "$info" == *JobState=COMPLETING* || "$info" == *JobState=CANCELLED* ]] \
        && [[ "$info" != *Reason=TimeLimit* ]]; then
        cancelled=1
        log "the job is being cancelled: saving, and not requeueing"
      fi
    fi
  }
  # proctrack/linuxproc loses processes reparented to init: end our own children before leaving.
  on_exit() {
    rm -f "$ZEROLAUNCH_STOP_FILE"
    [ -n "$child" ] && kill -0 "$child" 2>/dev/null || return 0
    log "ending the training step (pid $child)"
    kill -TERM "$child" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$child" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL "$child" 2>/dev/null
  }
  trap 'on_signal USR1' USR1
  trap 'on_signal TERM' TERM
  trap on_exit EXIT

  log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $nodes node(s), rendezvous $MASTER_ADDR:$MASTER_PORT, python $PYTHON"
  log "$(printf '%q ' "${cmd[@]}")"
  "${cmd[@]}" &
  child=$!
  # `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until the
  # step is really gone.
  while :; do
    wait "$child"
    rc=$?
    [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null && continue
    break
  done
  child=""

  if [ "$rc" = "$EXIT_REQUEUE" ]; then
    restarts=${SLURM_RESTART_COUNT:-0}
    if [ -n "$cancelled" ]; then
      log "saved early; the job was cancelled: not requeueing. Resubmit the same command to continue."
    elif [ "${REQUEUE:-1}" != 1 ]; then
      log "saved early${got_signal:+ on SIG$got_signal}; REQUEUE=${REQUEUE}: not requeueing. Resubmit the same command to continue."
    elif [ "$restarts" -ge "${MAX_REQUEUES:-100}" ]; then
      log "saved early; the job was already requeued $restarts times (MAX_REQUEUES): not again"
    elif trap '' TERM USR1 && scontrol requeue "$SLURM_JOB_ID"; then
      # (Slurm TERMs this shell as the requeue takes effect: nothing is left to save.)
      log "saved early${got_signal:+ on SIG$got_signal}; requeued job $SLURM_JOB_ID: it resumes from the checkpoint"
      exit 0
    else
      log "saved early, but 'scontrol requeue $SLURM_JOB_ID' failed (cancelled, or not requeueable): resubmit to continue"
    fi
  fi
  log "training step ended with exit code $rc"
  exit "$rc"
}

main "$@"
