# Sourced by tools/cassandra.sh and tools/kafka.sh: waiting for a server they started in
# the background to answer (their own `answers` function says whether it does), and
# stopping it.

# wait_answering NAME WHAT PIDFILE LOG SECONDS ADDRESS: exits 0 once `answers` succeeds,
# 1 (with the end of LOG) when the process exits first or SECONDS pass.
wait_answering() {
  local name=$1 what=$2 pidfile=$3 log=$4 seconds=$5 address=$6
  for _ in $(seq 1 "$seconds"); do
    if answers; then
      echo "$name: answering on $address (pid $(cat "$pidfile"), log $log)"
      exit 0
    fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "$name: the $what exited while starting; its log ends:" >&2
      tail -n 40 "$log" >&2
      exit 1
    fi
    sleep 1
  done
  echo "$name: no answer on $address after $seconds s; its log ends:" >&2
  tail -n 40 "$log" >&2
  exit 1
}

# stop_pid NAME PIDFILE: SIGTERM, up to 30 s to exit, then SIGKILL.
stop_pid() {
  local name=$1 pidfile=$2 pid
  if [ -f "$pidfile" ]; then
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  fi
  echo "$name: stopped"
}
