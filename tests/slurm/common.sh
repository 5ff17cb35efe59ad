# common.sh - pid helpers shared by start.sh and stop.sh (sourced, not run).

# running PID COMM-PREFIX: PID exists, is COMM, and is not a zombie
# (a killed daemon stays a zombie until PID 1 reaps it, which can be lazy)
running() {
  local comm
  comm=$(cat "/proc/$1/comm" 2>/dev/null) || return 1
  [[ "$comm" == "$2"* ]] || return 1
  [[ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null)" != Z* ]]
}
# alive PIDFILE COMM-PREFIX: the pid in PIDFILE is running and is COMM
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -dc 0-9 <"$1"); [ -n "$pid" ] || return 1
  running "$pid" "$2"
}
