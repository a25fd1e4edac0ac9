#!/usr/bin/env bash
# A real Apache Cassandra 5.0 node for the tests: the stand-in for ScyllaDB, which cannot
# be installed here (same CQL protocol; the `scylla` driver's own CI runs on Cassandra).
#
#   tools/cassandra.sh start    # fetches cassandra-all from Maven Central once, starts the
#                               # node on 127.0.0.1:9042, returns once it answers CQL
#   tools/cassandra.sh stop
#   tools/cassandra.sh status   # exit 0 when the node answers
#
# Java (17) and Maven are test infrastructure only; Doppel never needs them. The node's
# data, log and configuration live in $CASSANDRA_DIR (default: $TMPDIR/doppel-cassandra).
# A second node for a test of its own takes other ports: $CASSANDRA_PORT (CQL, 9042),
# $CASSANDRA_STORAGE_PORT (7000) and $CASSANDRA_JMX_PORT (7199), and another directory.
#
# With CASSANDRA_SECURE=1 the node takes only TLS connections with a client certificate,
# and only logins by password (user cassandra, password cassandra). The script makes the
# keys first, with openssl and keytool, in $CASSANDRA_DIR/tls: ca.pem (the CA that signed
# the node's certificate, for 127.0.0.1, and the client's), client.pem and client.key.
set -euo pipefail
# shellcheck source=tools/daemon.sh
. "$(dirname "$0")/daemon.sh"
here="$(cd "$(dirname "$0")/cassandra" && pwd)"
state="${CASSANDRA_DIR:-${TMPDIR:-/tmp}/doppel-cassandra}"
port="${CASSANDRA_PORT:-9042}"
storage_port="${CASSANDRA_STORAGE_PORT:-7000}"
jmx_port="${CASSANDRA_JMX_PORT:-7199}"
secure="${CASSANDRA_SECURE:-}"
tls="$state/tls"

answers() {
  # Plain: a CQL OPTIONS frame (protocol v4), answered with SUPPORTED. Secure: over TLS
  # with the client certificate, a STARTUP and a password login, answered AUTH_SUCCESS.
  python3 - "$port" "$secure" "$tls" <<'PY' 2>/dev/null
import socket, ssl, struct, sys
port, secure, tls = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socket.create_connection(("127.0.0.1", port), timeout=2)
def read(n):
    got = b""
    while len(got) < n:
        more = s.recv(n - len(got))
        if not more:
            sys.exit(1)
        got += more
    return got
def frame(opcode, body=b""):
    # Sends a frame; returns the answer's opcode, its body read and dropped.
    s.sendall(struct.pack(">BBhBI", 4, 0, 0, opcode, len(body)) + body)
    head = read(9)
    read(struct.unpack(">I", head[5:9])[0])
    return head[4]
if not secure:
    sys.exit(0 if frame(0x05) == 0x06 else 1)
ctx = ssl.create_default_context(cafile=f"{tls}/ca.pem")
ctx.load_cert_chain(f"{tls}/client.pem", f"{tls}/client.key")
s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
text = lambda t: struct.pack(">H", len(t)) + t
if frame(0x01, struct.pack(">H", 1) + text(b"CQL_VERSION") + text(b"3.0.0")) != 0x03:
    sys.exit(1)
token = b"\0cassandra\0cassandra"
sys.exit(0 if frame(0x0F, struct.pack(">i", len(token)) + token) == 0x10 else 1)
PY
}

# The secure node's keys: a CA, the node's certificate for 127.0.0.1 in a PKCS12
# keystore, the CA in a PKCS12 truststore, and a client certificate.
make_keys() {
  [ -f "$tls/truststore.p12" ] && return 0
  mkdir -p "$tls"
  (
    cd "$tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
      -subj "/CN=doppel test CA" -keyout ca.key -out ca.pem 2>/dev/null
    for who in node client; do
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=$who" -keyout "$who.key" -out "$who.csr" 2>/dev/null
      printf 'subjectAltName=IP:127.0.0.1\n' >"$who.ext"
      openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
        -extfile "$who.ext" -out "$who.pem" 2>/dev/null
    done
    openssl pkcs12 -export -in node.pem -inkey node.key -name node \
      -passout pass:changeit -out keystore.p12
    keytool -importcert -noprompt -alias ca -file ca.pem -storetype PKCS12 \
      -keystore truststore.p12 -storepass changeit >/dev/null
  )
}

case "${1:-}" in
start)
  if answers; then
    echo "cassandra: already answering on 127.0.0.1:$port"
    exit 0
  fi
  if [ ! -d "$here/target/lib" ]; then
    echo "cassandra: fetching cassandra-all and its dependencies (Maven Central)"
    mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies -DoutputDirectory="$here/target/lib"
  fi
  mkdir -p "$state"
  sed -e "s/^native_transport_port: .*/native_transport_port: $port/" \
    -e "s/^storage_port: .*/storage_port: $storage_port/" \
    -e "s/127.0.0.1:7000/127.0.0.1:$storage_port/" \
    "$here/cassandra.yaml" >"$state/cassandra.yaml"
  if [ -n "$secure" ]; then
    make_keys
    sed -i -e "s/^authenticator: .*/authenticator: PasswordAuthenticator/" "$state/cassandra.yaml"
    cat >>"$state/cassandra.yaml" <<YAML
client_encryption_options:
  enabled: true
  optional: false
  keystore: $tls/keystore.p12
  keystore_password: changeit
  store_type: PKCS12
  require_client_auth: true
  truststore: $tls/truststore.p12
  truststore_password: changeit
YAML
  fi
  # JVM options after Cassandra's jvm17-server.options: the module exports and opens it
  # needs on Java 17, G1, and a small heap for a test node.
  java -Xms1g -Xmx1g -XX:+UseG1GC -XX:+AlwaysPreTouch -Xss256k \
    -Djava.net.preferIPv4Stack=true -Djdk.attach.allowAttachSelf=true \
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED \
    --add-exports java.base/jdk.internal.ref=ALL-UNNAMED \
    --add-exports java.base/sun.nio.ch=ALL-UNNAMED \
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED \
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED \
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED \
    --add-exports java.sql/java.sql=ALL-UNNAMED \
    --add-opens java.base/java.lang.module=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED \
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED \
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED \
    --add-opens java.base/java.io=ALL-UNNAMED \
    --add-opens java.base/java.nio=ALL-UNNAMED \
    --add-opens java.base/java.util.concurrent=ALL-UNNAMED \
    --add-opens java.base/java.util=ALL-UNNAMED \
    --add-opens java.base/java.util.concurrent.atomic=ALL-UNNAMED \
    --add-opens java.base/java.lang=ALL-UNNAMED \
    --add-opens java.base/java.math=ALL-UNNAMED \
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED \
    --add-opens java.base/java.net=ALL-UNNAMED \
    -Dcassandra.config="file://$state/cassandra.yaml" \
    -Dlogback.configurationFile="$here/logback.xml" \
    -Dcassandra.storagedir="$state" \
    -Dcassandra-foreground=yes \
    -Dcassandra.skip_wait_for_gossip_to_settle=0 \
    -Dcassandra.ring_delay_ms=100 \
    -Dcassandra.superuser_setup_delay_ms=0 \
    -Dcassandra.jmx.local.port="$jmx_port" \
    -cp "$here/target/lib/*" org.apache.cassandra.service.CassandraDaemon \
    >"$state/cassandra.log" 2>&1 &
  echo $! >"$state/pid"
  wait_answering cassandra node "$state/pid" "$state/cassandra.log" 180 "127.0.0.1:$port"
  ;;
stop)
  stop_pid cassandra "$state/pid"
  ;;
status)
  answers
  ;;
*)
  echo "usage: tools/cassandra.sh start|stop|status" >&2
  exit 2
  ;;
esac
