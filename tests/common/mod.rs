//! Shared by the binary's end-to-end tests: start the real `doppel serve` on free ports.

#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const WAIT: Duration = Duration::from_secs(20);

/// Runs `doppel ARGS --data-dir DIR` to completion.
pub fn doppel(args: &[&str], dir: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("DOPPEL_SCYLLA_NODES")
        .output()
        .unwrap()
}

pub struct Server {
    pub child: Child,
    /// Every line the server logged so far.
    pub log: Log,
    pub mqtt: String,
    pub http: String,
    /// The MQTT-over-TLS address, when started with `--mqtt-tls-listen`.
    pub mqtts: Option<String>,
    /// The admin token printed on a data directory's first start.
    pub admin_token: Option<String>,
}

impl Server {
    /// Sends SIGTERM and waits (at most `WAIT`) for the server to exit; returns its status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap();
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the server stops within the wait")
            .unwrap()
    }
}

/// The server's log lines, as they come.
#[derive(Clone, Default)]
pub struct Log {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    added: std::sync::Arc<tokio::sync::Notify>,
}

impl Log {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.added.notify_waiters();
    }

    /// The lines logged so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (at most `WAIT`) for a line containing `text`.
    pub async fn line_with(&self, text: &str) -> String {
        tokio::time::timeout(WAIT, async {
            loop {
                let added = self.added.notified();
                if let Some(l) = self.lines().into_iter().find(|l| l.contains(text)) {
                    return l;
                }
                added.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no log line with {text:?} in {:#?}", self.lines()))
    }
}

/// Starts `doppel serve` on free ports and waits for it to log both addresses.
pub async fn start(dir: &Path, extra: &[&str]) -> Server {
    start_with(Command::new(env!("CARGO_BIN_EXE_doppel")), dir, extra).await
}

/// `start` with these environment variables set for the server.
pub async fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_doppel"));
    command.envs(env.iter().copied());
    start_with(command, dir, extra).await
}

/// `start` with the process's open-file limit (soft and hard) set to `nofile`.
pub async fn start_with_nofile(dir: &Path, extra: &[&str], nofile: u32) -> Server {
    let mut shell = Command::new("bash");
    shell.args([
        "-c",
        &format!("ulimit -n {nofile} && exec \"$0\" \"$@\""),
        env!("CARGO_BIN_EXE_doppel"),
    ]);
    start_with(shell, dir, extra).await
}

/// `start` under `strace`, which writes the server's calls that make files durable
/// (fsync, fdatasync, syncfs, sync_file_range) to `trace`.
pub async fn start_traced(dir: &Path, extra: &[&str], trace: &Path) -> Server {
    let mut strace = Command::new("strace");
    strace
        .args(["-f", "-qq", "-e", "signal=none", "-e"])
        .arg("trace=fsync,fdatasync,syncfs,sync_file_range")
        .arg("-o")
        .arg(trace)
        .args(["--", env!("CARGO_BIN_EXE_doppel")]);
    start_with(strace, dir, extra).await
}

async fn start_with(mut command: Command, dir: &Path, extra: &[&str]) -> Server {
    let mut child = command
        .args([
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .args(extra)
        // The harness's CQL node is passed as a flag where a test wants it.
        .env_remove("DOPPEL_SCYLLA_NODES")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let log = Log::default();
    let (mut mqtt, mut http, mut mqtts, mut admin_token) = (None, None, None, None);
    tokio::time::timeout(WAIT, async {
        while mqtt.is_none() || http.is_none() {
            let line = lines.next_line().await.unwrap().unwrap_or_else(|| {
                panic!("doppel exited before it was listening: {:#?}", log.lines())
            });
            log.push(line.clone());
            let addr = || line.rsplit(' ').next().unwrap().to_owned();
            if line.contains("an admin API token was written") {
                let file = dir.join("admin-token");
                admin_token = Some(std::fs::read_to_string(file).unwrap().trim().to_owned());
            } else if line.contains("mqtts listening on ") {
                mqtts = Some(addr());
            } else if line.contains("mqtt listening on ") {
                mqtt = Some(addr());
            } else if line.contains("http listening on ") {
                http = Some(addr());
            }
        }
    })
    .await
    .expect("doppel logs its addresses");
    // Keep draining the log so the server never blocks on a full pipe.
    let collected = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            collected.push(line);
        }
    });
    Server {
        child,
        log,
        mqtt: mqtt.unwrap(),
        http: http.unwrap(),
        mqtts,
        admin_token,
    }
}

/// A device connected with rumqttc and subscribed to its shadow topics.
pub async fn client(
    addr: &str,
    id: &str,
    password: Option<&str>,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    client_on(addr, id, password, &[&format!("$aws/things/{id}/shadow/#")]).await
}

/// A device connected with rumqttc and subscribed to `filters`.
pub async fn client_on(
    addr: &str,
    id: &str,
    password: Option<&str>,
    filters: &[&str],
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut o = MqttOptions::new(id, host, port.parse().unwrap());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    if let Some(p) = password {
        o.set_credentials(id, p);
    }
    let (c, mut el) = AsyncClient::new(o, 100);
    match tokio::time::timeout(WAIT, el.poll()).await.unwrap() {
        Ok(Event::Incoming(Packet::ConnAck(_))) => {}
        other => panic!("no CONNACK: {other:?}"),
    }
    for f in filters {
        c.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
    }
    let mut acks = 0;
    while acks < filters.len() {
        match tokio::time::timeout(WAIT, el.poll()).await.unwrap() {
            Ok(Event::Incoming(Packet::SubAck(_))) => acks += 1,
            Ok(_) => {}
            Err(e) => panic!("device connection failed: {e}"),
        }
    }
    (c, el)
}

/// The next message on a topic ending with `suffix`.
pub async fn next_on(el: &mut rumqttc::EventLoop, suffix: &str) -> serde_json::Value {
    use rumqttc::{Event, Packet};
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic.ends_with(suffix) => {
                    return serde_json::from_slice(&p.payload).unwrap();
                }
                Ok(_) => {}
                Err(e) => panic!("connection failed: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("nothing on {suffix}"))
}

/// An HTTP/1.1 answer.
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`).
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // A server may answer (413) before it has read the whole body and then close.
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("an HTTP answer")
        .unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// `POST /graphql` with a bearer token.
pub async fn graphql(
    addr: &str,
    token: Option<&str>,
    query: &str,
    variables: serde_json::Value,
) -> HttpResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    let body = serde_json::json!({"query": query, "variables": variables}).to_string();
    http(addr, "POST", "/graphql", &headers, body.as_bytes()).await
}

/// A GraphQL WebSocket client (`graphql-transport-ws` or the legacy `graphql-ws`).
pub struct Ws {
    pub socket: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    legacy: bool,
}

impl Ws {
    /// Connects to `/graphql/ws` and sends `connection_init` with `payload`.
    /// `recv_buffer` shrinks the socket's receive buffer (a slow reader).
    pub async fn connect(
        addr: &str,
        protocol: &str,
        payload: serde_json::Value,
        recv_buffer: Option<u32>,
    ) -> Self {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let stream = socket.connect(addr.parse().unwrap()).await.unwrap();
        let mut request = format!("ws://{addr}/graphql/ws")
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
        let (socket, response) = tokio_tungstenite::client_async(request, stream)
            .await
            .unwrap();
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            protocol,
            "the server speaks the requested protocol"
        );
        let mut ws = Self {
            socket,
            legacy: protocol == "graphql-ws",
        };
        ws.socket
            .send(tokio_tungstenite::tungstenite::Message::text(
                serde_json::json!({"type": "connection_init", "payload": payload}).to_string(),
            ))
            .await
            .unwrap();
        ws
    }

    /// The next protocol message (keep-alives skipped), or `Err((code, reason))` once
    /// the server closes the socket.
    pub async fn next(&mut self) -> Result<serde_json::Value, (u16, String)> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let msg = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("a WebSocket message in time");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "ka" || v["type"] == "ping" || v["type"] == "pong" {
                        continue;
                    }
                    return Ok(v);
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new())));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err((1006, e.to_string())),
                None => return Err((1006, "closed".into())),
            }
        }
    }

    /// Waits for `connection_ack`.
    pub async fn acked(mut self) -> Self {
        let ack = self.next().await.expect("connection_ack");
        assert_eq!(ack["type"], "connection_ack", "{ack}");
        self
    }

    /// Starts a subscription and waits for its first event, `Subscribed` (the query must
    /// select `__typename`): from then on the subscription is live.
    pub async fn subscribe(&mut self, id: &str, query: &str) {
        self.start(id, query).await;
        let first = self.data().await;
        let event = first.as_object().and_then(|o| o.values().next());
        assert_eq!(
            event.map(|e| &e["__typename"]),
            Some(&serde_json::json!("Subscribed")),
            "{first}"
        );
    }

    /// Starts a subscription without waiting for its first event.
    pub async fn start(&mut self, id: &str, query: &str) {
        use futures_util::SinkExt;
        let kind = if self.legacy { "start" } else { "subscribe" };
        let msg = serde_json::json!({"id": id, "type": kind, "payload": {"query": query}});
        self.socket
            .send(tokio_tungstenite::tungstenite::Message::text(
                msg.to_string(),
            ))
            .await
            .unwrap();
    }

    /// The next subscription result's `data`.
    pub async fn data(&mut self) -> serde_json::Value {
        let msg = self.next().await.expect("an event");
        let kind = if self.legacy { "data" } else { "next" };
        assert_eq!(msg["type"], kind, "{msg}");
        assert!(msg["payload"]["errors"].is_null(), "{msg}");
        msg["payload"]["data"].clone()
    }
}

const REGISTER: &str =
    "mutation($id: ID!, $a: JSON) { registerThing(id: $id, attributes: $a) { secret } }";

/// Registers a thing through GraphQL; returns its secret.
pub async fn register(addr: &str, token: &str, id: &str, attributes: serde_json::Value) -> String {
    let r = graphql(
        addr,
        Some(token),
        REGISTER,
        serde_json::json!({"id": id, "a": attributes}),
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    v["data"]["registerThing"]["secret"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_owned()
}

/// Sets the desired `n` of a thing's shadow through GraphQL.
pub async fn update_desired(addr: &str, token: &str, thing: &str, n: u64) {
    let r = graphql(
        addr,
        Some(token),
        r#"mutation($id: ID!, $n: Int!) { updateDesired(id: $id, desired: {n: $n}) { version } }"#,
        serde_json::json!({"id": thing, "n": n}),
    )
    .await
    .json();
    assert!(r["errors"].is_null(), "{r}");
}

/// A graphql-transport-ws connection authenticated with `token`, acknowledged.
pub async fn ws_as(addr: &str, token: &str, recv_buffer: Option<u32>) -> Ws {
    Ws::connect(
        addr,
        "graphql-transport-ws",
        serde_json::json!({"Authorization": format!("Bearer {token}")}),
        recv_buffer,
    )
    .await
    .acked()
    .await
}

/// A Python virtual environment under Cargo's target directory with `package` installed
/// from PyPI, made on first use (kept between runs); its path.
pub fn python_venv(name: &str, package: &str) -> std::path::PathBuf {
    // Tests of one binary run in parallel and may share a venv: one makes it at a time.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let marker = venv.join(package);
    if !marker.exists() {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "cannot create a Python venv: install python3 and python3-venv"
        );
        let pip = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", package])
            .status();
        assert!(
            pip.is_ok_and(|s| s.success()),
            "cannot install {package} from PyPI into {}",
            venv.display()
        );
        std::fs::write(&marker, "").unwrap();
    }
    venv
}

/// The flags that put a server on a fresh keyspace of the test CQL node (see
/// `twin_store::conformance::scylla_nodes`).
pub fn scylla_args() -> Vec<String> {
    vec![
        "--store".into(),
        "scylla".into(),
        "--scylla-nodes".into(),
        twin_store::conformance::scylla_nodes().join(","),
        "--scylla-keyspace".into(),
        twin_store::conformance::fresh_keyspace(),
    ]
}
