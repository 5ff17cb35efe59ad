#!/usr/bin/env bash
# start.sh - install, configure, start and health-check a local single-host
# Slurm cluster (Debian 12 slurm-wlm 22.05 + munge), no systemd, no cgroups.
#
# Idempotent: re-running it leaves a healthy cluster alone (only re-checks it);
# if the generated slurm.conf changed, it restarts the Slurm daemons it started.
#
# Environment knobs (all optional):
#   SLURM_LOCAL_DIR        state/log/pid directory        (default /tmp/zerolaunch-slurm)
#   SLURM_LOCAL_NODES      number of logical nodes (1..8) (default 1)
#                          1 -> NodeName=localhost; N>1 -> n1..nN, one slurmd each
#                          on ports 17001.. (multiple-slurmd mode, same host)
#   SLURM_LOCAL_PARTITION  partition name                 (default debug)
#   SLURM_LOCAL_CHECK      1 = run srun/sbatch health check (default 1)
#   SLURM_CONF_PATH        where to write slurm.conf      (default /etc/slurm/slurm.conf,
#                          the place sbatch/srun/sinfo look without SLURM_CONF)
# Only the daemons whose pid files are in $SLURM_LOCAL_DIR/run are managed;
# stop.sh ends exactly those.
set -euo pipefail

BASE=${SLURM_LOCAL_DIR:-/tmp/zerolaunch-slurm}
NODES=${SLURM_LOCAL_NODES:-1}
PART=${SLURM_LOCAL_PARTITION:-debug}
CHECK=${SLURM_LOCAL_CHECK:-1}
CONF=${SLURM_CONF_PATH:-$BASE/slurm.conf}
MARKER="# managed-by: zerolaunch-slurm start.sh"
RUN=$BASE/run
T0=$EPOCHREALTIME

log()  { printf '[zerolaunch-slurm %6ss] %s\n' "$(elapsed "$T0")" "$*"; }
die()  { log "ERROR: $*"; exit 1; }
elapsed() { local s=${1//[.,]/} e=${EPOCHREALTIME//[.,]/}; printf '%d.%01d' $(( (e - s) / 1000000 )) $(( (e - s) / 100000 % 10 )); }
step() { STEP_T=$EPOCHREALTIME; log "== $*"; }
done_step() { log "   done in $(elapsed "$STEP_T")s"; }

[ "$(id -u)" = 0 ] || die "must run as root"
[[ "$NODES" =~ ^[1-8]$ ]] || die "SLURM_LOCAL_NODES must be 1..8"
[ "$CONF" = /etc/slurm/slurm.conf ] || export SLURM_CONF=$CONF

# shellcheck source=tests/slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# port_busy PORT: true if something accepts TCP connections on 127.0.0.1:PORT
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# stop_pidfile PIDFILE COMM: TERM (then KILL after 15 s) the daemon in PIDFILE
stop_pidfile() {
  local f=$1 want=$2 pid i
  alive "$f" "$want" || { rm -f "$f"; return 0; }
  pid=$(tr -dc 0-9 <"$f")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 150); do running "$pid" "$want" || break; sleep 0.1; done
  if running "$pid" "$want"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
  rm -f "$f"
}

# ---------------------------------------------------------------- 1. install
step "install packages"
PKGS="slurmctld slurmd slurm-client munge"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  # keep maintainer scripts from starting the daemons via init.d
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"/tmp/zerolaunch-slurm-apt.log" 2>&1 || { tail -20 /tmp/zerolaunch-slurm-apt.log; [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get update failed"; }
  apt-get install -y -qq --no-install-recommends $PKGS >>"/tmp/zerolaunch-slurm-apt.log" 2>&1 || { tail -20 /tmp/zerolaunch-slurm-apt.log; [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install failed"; }
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
else
  log "already installed: $PKGS"
fi
done_step

# ---------------------------------------------------------------- 2. munge
step "munge"
mkdir -p "$RUN"
install -d -o munge -g munge -m 0755 "$RUN/munge" /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if alive "$RUN/munge/munged.pid" munged; then log "munged (ours, pid $(cat "$RUN/munge/munged.pid")) already running"
  else log "a munged not started by this script is already serving /run/munge; reusing it (stop.sh will leave it)"; fi
else
  rm -f "$RUN/munge/munged.pid"
  [ -S /run/munge/munge.socket.2 ] && rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged --pid-file="$RUN/munge/munged.pid" \
      || die "munged failed to start: $(tail -5 /var/log/munge/munged.log 2>/dev/null)"
  for i in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munge credential round trip failed"
  log "munged started, pid $(cat "$RUN/munge/munged.pid")"
fi
done_step

# ---------------------------------------------------------------- 3. config
step "slurm.conf"
mkdir -p "$BASE/state" "$BASE/log" "$BASE/spool" "$(dirname "$CONF")"
NCPU=$(nproc)
MEM=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
[ -n "$MEM" ] || MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))
NODELINES=""; NODENAMES=""
if [ "$NODES" = 1 ]; then
  NODELINES="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM State=UNKNOWN"
  NODENAMES="localhost"
else
  per=$(( MEM / NODES ))
  for i in $(seq 1 "$NODES"); do
    NODELINES+="NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$NCPU RealMemory=$per State=UNKNOWN"$'\n'
    NODENAMES+="${NODENAMES:+ }n$i"
  done
fi
NEW=$(mktemp)
cat >"$NEW" <<EOF
$MARKER
# Local single-host Slurm for CI. Generated; edits are overwritten.
ClusterName=localci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s, min 5)
AuthInfo=cred_expire=10
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
${NODELINES%$'\n'}
PartitionName=$PART Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
CHANGED=0
if [ -f "$CONF" ] && cmp -s "$NEW" "$CONF"; then
  rm -f "$NEW"; log "$CONF unchanged"
else
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    cp -p "$CONF" "$CONF.bak.$(date +%s)"; log "backed up foreign $CONF"
  fi
  mv "$NEW" "$CONF"; chmod 644 "$CONF"; CHANGED=1; log "wrote $CONF ($NODES node(s): $NODENAMES, CPUs=$NCPU each, RealMemory=${per:-$MEM} each)"
fi
# forget pid files of logical nodes that are no longer configured
for f in "$RUN"/slurmd-*.pid; do
  [ -e "$f" ] || continue
  n=${f##*/slurmd-}; n=${n%.pid}
  [[ " $NODENAMES " == *" $n "* ]] || { log "stopping slurmd for removed node $n"; stop_pidfile "$f" slurmd; }
done
done_step

# ---------------------------------------------------------------- 4. daemons
step "slurmctld + slurmd"
all_up=1
alive "$RUN/slurmctld.pid" slurmctld || all_up=0
for n in $NODENAMES; do alive "$RUN/slurmd-$n.pid" slurmd || all_up=0; done
if [ "$all_up" = 1 ] && [ "$CHANGED" = 0 ]; then
  log "already running (slurmctld pid $(cat "$RUN/slurmctld.pid"))"
else
  # (re)start only what we own
  for n in $NODENAMES; do stop_pidfile "$RUN/slurmd-$n.pid" slurmd; done
  stop_pidfile "$RUN/slurmctld.pid" slurmctld
  port_busy 6817 && die "port 6817 is in use by a slurmctld (or other program) this script did not start"
  for n in $NODENAMES; do
    p=6818; [ "$NODES" = 1 ] || p=$((17000 + ${n#n}))
    port_busy "$p" && die "port $p is in use by a program this script did not start"
  done
  slurmctld || die "slurmctld failed: $(tail -20 "$BASE/log/slurmctld.log" 2>/dev/null)"
  for i in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.1; done
  scontrol ping | grep -q 'is UP' || die "slurmctld not answering: $(tail -20 "$BASE/log/slurmctld.log")"
  for n in $NODENAMES; do
    mkdir -p "$BASE/spool/$n"
    slurmd -N "$n" || die "slurmd -N $n failed: $(tail -20 "$BASE/log/slurmd-$n.log" 2>/dev/null)"
  done
  log "started slurmctld pid $(cat "$RUN/slurmctld.pid"); slurmd: $(for n in $NODENAMES; do printf '%s=%s ' "$n" "$(cat "$RUN/slurmd-$n.pid" 2>/dev/null)"; done)"
fi
# wait until every node is usable
ok=0
for i in $(seq 150); do
  bad=$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 !~ /^(idle|mixed|allocated|completing)$/' | sort -u)
  [ -z "$bad" ] && [ -n "$(sinfo -h -N -o %N 2>/dev/null)" ] && { ok=1; break; }
  # a node left DOWN/DRAIN from an earlier run: resume it once
  if [ "$i" = 20 ]; then for n in $(echo "$bad" | awk '$2 ~ /down|drain/ {print $1}'); do scontrol update NodeName="$n" State=RESUME 2>/dev/null || true; done; fi
  sleep 0.2
done
[ "$ok" = 1 ] || { sinfo -N -l; die "nodes not ready: $bad"; }
sinfo
done_step

# ---------------------------------------------------------------- 5. health check
if [ "$CHECK" = 1 ]; then
  step "health check: srun"
  out=$(timeout 90 srun -N"$NODES" -n$((2 * NODES)) -t 1 hostname 2>"$BASE/log/check-srun.err") \
    || die "srun failed: $(cat "$BASE/log/check-srun.err") $out"
  [ "$(printf '%s\n' "$out" | grep -c .)" = $((2 * NODES)) ] || die "srun printed: $out $(cat "$BASE/log/check-srun.err")"
  log "srun -N$NODES -n$((2 * NODES)) hostname -> $(echo $out)"
  done_step

  step "health check: sbatch --ntasks=2 + polling"
  d=$(mktemp -d "$BASE/check.XXXXXX")
  cat >"$d/check.sbatch" <<'EOF'
#!/bin/bash
#SBATCH --job-name=zerolaunch-slurm-check
#SBATCH --ntasks=2
#SBATCH --time=00:01:00
#SBATCH --output=check-%j.out
srun -l hostname
echo "batch-ok job=$SLURM_JOB_ID ntasks=$SLURM_NTASKS nodes=$SLURM_JOB_NODELIST"
EOF
  jid=$(cd "$d" && sbatch --parsable check.sbatch) || die "sbatch failed"
  jid=${jid%%;*}; st=""
  for i in $(seq 300); do
    st=$(scontrol show job -o "$jid" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
    case "$st" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED) break;; esac
    sleep 0.2
  done
  [ "$st" = COMPLETED ] || die "check job $jid ended as '$st': $(cat "$d"/check-*.out 2>/dev/null)"
  grep -q '^batch-ok' "$d/check-$jid.out" || die "check job output wrong: $(cat "$d/check-$jid.out")"
  log "job $jid COMPLETED: $(grep '^batch-ok' "$d/check-$jid.out")"
  rm -rf "$d"
  done_step
fi
log "local Slurm ready in $(elapsed "$T0")s (config $CONF, logs $BASE/log, pids $RUN)"
