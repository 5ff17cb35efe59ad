#!/usr/bin/env bash
# stop.sh - stop the local Slurm daemons that start.sh started, and only those:
# it reads their pid files in $SLURM_LOCAL_DIR/run, checks that each pid is
# still the expected program (/proc/PID/comm), sends TERM, waits, then KILL.
# No pkill/killall. A munged that start.sh merely reused is left running.
#   SLURM_LOCAL_CANCEL_JOBS=1 (default): scancel this cluster's jobs first, so
#   no slurmstepd/job processes outlive slurmd.
#   SLURM_LOCAL_PURGE=1: also delete $SLURM_LOCAL_DIR (state, logs, spool).
set -uo pipefail
BASE=${SLURM_LOCAL_DIR:-/tmp/zerolaunch-slurm}
RUN=$BASE/run
CONF=${SLURM_CONF_PATH:-$BASE/slurm.conf}
[ "$CONF" = /etc/slurm/slurm.conf ] || export SLURM_CONF=$CONF
log() { echo "[zerolaunch-slurm stop] $*"; }

# shellcheck source=tests/slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
stop_pidfile() {
  local f=$1 want=$2 pid i
  if ! alive "$f" "$want"; then
    [ -e "$f" ] && { log "$(basename "$f"): not running (stale pid file removed)"; rm -f "$f"; }
    return 0
  fi
  pid=$(tr -dc 0-9 <"$f")
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 150); do running "$pid" "$want" || break; sleep 0.1; done
  if running "$pid" "$want"; then
    log "$want pid $pid ignored TERM for 15 s, sending KILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.2
  fi
  rm -f "$f"
  log "stopped $want (pid $pid)"
}

[ -d "$RUN" ] || { log "nothing to stop ($RUN does not exist)"; exit 0; }

# 1. cancel jobs of this cluster (only if our slurmctld is the one answering)
if [ "${SLURM_LOCAL_CANCEL_JOBS:-1}" = 1 ] && alive "$RUN/slurmctld.pid" slurmctld \
   && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
  jobs=$(timeout 5 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    timeout 10 scancel $jobs 2>/dev/null
    for i in $(seq 100); do [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

# 2. slurmd(s), then slurmctld, then munged (only if start.sh started it)
for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f" slurmd; done
stop_pidfile "$RUN/slurmctld.pid" slurmctld
stop_pidfile "$RUN/munge/munged.pid" munged

if [ "${SLURM_LOCAL_PURGE:-0}" = 1 ]; then rm -rf "$BASE"; log "removed $BASE"; fi
log "done"
