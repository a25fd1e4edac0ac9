#!/usr/bin/env bash
# A real Apache Kafka 4 broker for the tests, in KRaft mode (broker and controller in one
# process, no ZooKeeper), on loopback.
#
#   tools/kafka.sh start    # fetches kafka_2.13 from Maven Central once, formats the log
#                           # directory, starts the broker on 127.0.0.1:9092, returns once
#                           # it answers the Kafka protocol
#   tools/kafka.sh stop
#   tools/kafka.sh status   # exit 0 when the broker answers
#
# Java (17) and Maven are test infrastructure only; Doppel never needs them. The broker's
# data, log and configuration live in $KAFKA_DIR (default: $TMPDIR/doppel-kafka); its
# ports are $KAFKA_PORT (9092) and $KAFKA_CONTROLLER_PORT (9093).
set -euo pipefail
# shellcheck source=tools/daemon.sh
. "$(dirname "$0")/daemon.sh"
here="$(cd "$(dirname "$0")/kafka" && pwd)"
state="${KAFKA_DIR:-${TMPDIR:-/tmp}/doppel-kafka}"
port="${KAFKA_PORT:-9092}"
controller_port="${KAFKA_CONTROLLER_PORT:-9093}"

answers() {
  # An ApiVersions request (v0), answered with error code 0 by a broker that is up.
  python3 - "$port" <<'PY' 2>/dev/null
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
client = b"doppel-check"
body = struct.pack(">hhih", 18, 0, 7, len(client)) + client
s.sendall(struct.pack(">i", len(body)) + body)
head = b""
while len(head) < 10:
    more = s.recv(10 - len(head))
    if not more:
        sys.exit(1)
    head += more
size, correlation, error = struct.unpack(">iih", head)
sys.exit(0 if correlation == 7 and error == 0 else 1)
PY
}

# Runs Java in place of the (sub)shell it is called in, so that a broker started in the
# background has its own pid in $!: the pid `stop` kills.
java_run() {
  exec java -Xms512m -Xmx512m -XX:+UseG1GC -Djava.net.preferIPv4Stack=true \
    -Dlog4j2.configurationFile="$here/log4j2.properties" \
    -cp "$here/target/lib/*" "$@"
}

case "${1:-}" in
start)
  if answers; then
    echo "kafka: already answering on 127.0.0.1:$port"
    exit 0
  fi
  if [ ! -d "$here/target/lib" ]; then
    echo "kafka: fetching kafka_2.13 and its dependencies (Maven Central)"
    mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies -DoutputDirectory="$here/target/lib"
  fi
  mkdir -p "$state"
  sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$controller_port|g" \
    -e "s|@DATA@|$state/data|g" "$here/server.properties" >"$state/server.properties"
  if [ ! -f "$state/data/meta.properties" ]; then
    cluster="$(java_run kafka.tools.StorageTool random-uuid | tail -n 1)"
    (java_run kafka.tools.StorageTool format -t "$cluster" -c "$state/server.properties") \
      >"$state/format.log" 2>&1 || {
      echo "kafka: formatting the log directory failed:" >&2
      cat "$state/format.log" >&2
      exit 1
    }
  fi
  java_run kafka.Kafka "$state/server.properties" >"$state/kafka.log" 2>&1 &
  echo $! >"$state/pid"
  wait_answering kafka broker "$state/pid" "$state/kafka.log" 120 "127.0.0.1:$port"
  ;;
stop)
  stop_pid kafka "$state/pid"
  ;;
status)
  answers
  ;;
*)
  echo "usage: tools/kafka.sh start|stop|status" >&2
  exit 2
  ;;
esac
