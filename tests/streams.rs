//! Routes to Redis Streams and Kafka, end to end: the real binary, a real `redis-server`
//! (Debian's package) and a real Apache Kafka 4 broker in KRaft mode (`tools/kafka.sh`, or
//! `DOPPEL_KAFKA_BROKERS`), read back with independent clients (`redis-cli`, `kcat`), the
//! signatures checked with the official Standard Webhooks library.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use common::{Server, graphql, register, start, update_desired, ws_as};

/// How long the events of a test may take to arrive.
const ARRIVE: Duration = Duration::from_secs(90);

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of the test's own, without persistence.
struct Redis {
    _child: tokio::process::Child,
    port: u16,
}

impl Redis {
    async fn start(dir: &Path, port: u16) -> Self {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server runs (Debian's redis-server package)");
        let redis = Self {
            _child: child,
            port,
        };
        let deadline = tokio::time::Instant::now() + common::WAIT;
        while redis.cli(&["PING"]) != "PONG" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not answer in time"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        redis
    }

    /// `redis-cli` with `args`; its output, trimmed.
    fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs (Debian's redis-tools package)");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Every entry of `stream`, oldest first, its fields as an object.
    fn entries(&self, stream: &str) -> Vec<Value> {
        let out = self.cli(&["--json", "XRANGE", stream, "-", "+"]);
        let all: Value = serde_json::from_str(&out).unwrap_or(json!([]));
        all.as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|entry| {
                let fields = entry[1].as_array().unwrap();
                let object: serde_json::Map<String, Value> = fields
                    .chunks(2)
                    .map(|kv| (kv[0].as_str().unwrap().to_owned(), kv[1].clone()))
                    .collect();
                Value::Object(object)
            })
            .collect()
    }
}

/// The Kafka broker of this run: `DOPPEL_KAFKA_BROKERS`, or one `tools/kafka.sh` starts.
fn kafka_brokers() -> String {
    static BROKERS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BROKERS
        .get_or_init(|| {
            if let Ok(brokers) = std::env::var("DOPPEL_KAFKA_BROKERS") {
                return brokers;
            }
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/kafka.sh");
            let started = std::process::Command::new(script).arg("start").status();
            assert!(
                started.as_ref().is_ok_and(|s| s.success()),
                "the Kafka route tests need a broker: {script} start failed ({started:?}); it needs Java 17 and Maven, or set DOPPEL_KAFKA_BROKERS"
            );
            "127.0.0.1:9092".into()
        })
        .clone()
}

/// Every message of `topic` (from the beginning to its end now), read with `kcat`: its
/// partition, key, headers, value as sent (`raw`) and parsed (`event`).
fn kafka_messages(brokers: &str, topic: &str) -> Vec<Value> {
    let out = std::process::Command::new("kcat")
        .args([
            "-C",
            "-b",
            brokers,
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-J",
        ])
        .output()
        .expect("kcat runs (Debian's kcat package)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|m| {
            let headers: serde_json::Map<String, Value> = m["headers"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .chunks(2)
                .map(|kv| (kv[0].as_str().unwrap().to_owned(), kv[1].clone()))
                .collect();
            let raw = m["payload"].as_str().unwrap().to_owned();
            json!({
                "partition": m["partition"],
                "key": m["key"],
                "headers": headers,
                "event": serde_json::from_str::<Value>(&raw).unwrap(),
                "raw": raw,
            })
        })
        .collect()
}

async fn create_route(server: &Server, token: &str, destination: Value) -> (String, String) {
    let r = graphql(
        &server.http,
        Some(token),
        r#"mutation($d: DestinationInput!) { createRoute(name: "stream", events: [SHADOW_CHANGED],
            destination: $d) { secret route { id state } } }"#,
        json!({"d": destination}),
    )
    .await
    .json();
    let created = &r["data"]["createRoute"];
    let id = created["route"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"));
    (
        id.to_owned(),
        created["secret"].as_str().unwrap().to_owned(),
    )
}

/// The route's status (`health`, `lastError`), or null.
async fn status(server: &Server, token: &str, id: &str) -> Value {
    let r = graphql(
        &server.http,
        Some(token),
        "query($id: ID!) { route(id: $id) { status { health lastError } } }",
        json!({"id": id}),
    )
    .await
    .json();
    r["data"]["route"]["status"].clone()
}

/// Waits until `read` gives events (`event` objects) with every `(thing, seq)` of
/// `want`; returns them all, in the order read.
async fn wait_for_all(
    want: &HashSet<(String, u64)>,
    mut read: impl FnMut() -> Vec<Value>,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + ARRIVE;
    loop {
        let got = read();
        let seen: HashSet<(String, u64)> = got
            .iter()
            .map(|m| {
                let e = &m["event"];
                (
                    e["thing"].as_str().unwrap().to_owned(),
                    e["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        if want.is_subset(&seen) {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} events arrived in {ARRIVE:?}",
            want.intersection(&seen).count(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks order per thing (in `messages`' order, a seq comes only after every seq before
/// it) and that a duplicate is the same event (one id per thing and seq); returns the
/// number of duplicates.
fn check_order_and_ids(messages: &[Value]) -> usize {
    let mut seen: BTreeMap<String, HashSet<u64>> = BTreeMap::new();
    let mut ids: HashMap<String, (String, u64)> = HashMap::new();
    for m in messages {
        let e = &m["event"];
        let thing = e["thing"].as_str().unwrap().to_owned();
        let seq = e["seq"].as_u64().unwrap();
        let mine = seen.entry(thing.clone()).or_default();
        assert!(
            (1..seq).all(|s| mine.contains(&s)),
            "{thing}: seq {seq} arrived before an earlier one"
        );
        mine.insert(seq);
        let id = e["id"].as_str().unwrap().to_owned();
        let previous = ids.insert(id, (thing, seq));
        assert!(previous.is_none_or(|p| p == (e["thing"].as_str().unwrap().to_owned(), seq)));
    }
    messages.len() - ids.len()
}

/// Checks each message's signature with the official Standard Webhooks library, as a
/// consumer would: `id`, `timestamp`, `signature` and `body` of each.
fn verify_signatures(secret: &str, messages: &[(String, String, String, String)]) {
    let python = common::python_venv("webhooks-venv", "standardwebhooks==1.1.0").join("bin/python");
    let input: String = messages
        .iter()
        .map(|(id, ts, sig, body)| {
            json!({"id": id, "timestamp": ts, "signature": sig, "body": body}).to_string() + "\n"
        })
        .collect();
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
hook = Webhook(sys.argv[1])
n = 0
for line in sys.stdin:
    m = json.loads(line)
    hook.verify(m["body"], {"webhook-id": m["id"], "webhook-timestamp": m["timestamp"],
                            "webhook-signature": m["signature"]})
    n += 1
print(n)
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script, secret])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "a signature did not verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        messages.len().to_string()
    );
}

#[tokio::test]
async fn a_redis_stream_route_waits_out_redis_being_down_and_loses_nothing() {
    const THINGS: usize = 3;
    const UPDATES: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), &[]).await;
    let token = server.admin_token.clone().unwrap();
    let things: Vec<String> = (0..THINGS).map(|i| format!("pump-{i}")).collect();
    for t in &things {
        register(&server.http, &token, t, json!({})).await;
    }
    // Redis is not there yet: the route takes the events and keeps trying.
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let (id, secret) = create_route(
        &server,
        &token,
        json!({"redisStream": {"url": url, "stream": "doppel:events", "maxLength": 1000}}),
    )
    .await;
    let mut ws = ws_as(&server.http, &token, None).await;
    ws.start(
        "s",
        &format!(
            r#"subscription {{ routeStatusChanged(id: "{id}") {{ routeId health lastError }} }}"#
        ),
    )
    .await;
    for n in 1..=UPDATES {
        for t in &things {
            update_desired(&server.http, &token, t, n).await;
        }
    }
    // Healthy until its first attempt failed.
    let mut retrying = ws.data().await;
    if retrying["routeStatusChanged"]["health"] == "HEALTHY" {
        retrying = ws.data().await;
    }
    assert_eq!(
        retrying["routeStatusChanged"]["health"], "RETRYING",
        "{retrying}"
    );
    let error = retrying["routeStatusChanged"]["lastError"]
        .as_str()
        .unwrap();
    assert!(error.starts_with("Redis:"), "{error}");
    assert_eq!(status(&server, &token, &id).await["health"], "RETRYING");

    let redis = Redis::start(dir.path(), port).await;
    let want: HashSet<(String, u64)> = things
        .iter()
        .flat_map(|t| (1..=UPDATES).map(move |n| (t.clone(), n)))
        .collect();
    let entries = wait_for_all(&want, || {
        redis
            .entries("doppel:events")
            .into_iter()
            .map(|mut f| {
                let raw = f["event"].as_str().unwrap().to_owned();
                f["event"] = serde_json::from_str(&raw).unwrap();
                f["raw"] = json!(raw);
                f
            })
            .collect()
    })
    .await;
    let healthy = ws.data().await;
    assert_eq!(
        healthy["routeStatusChanged"]["health"], "HEALTHY",
        "{healthy}"
    );

    let duplicates = check_order_and_ids(&entries);
    for e in &entries {
        assert_eq!(e["id"], e["event"]["id"]);
        assert_eq!(e["thing"], e["event"]["thing"]);
        assert_eq!(e["type"], "SHADOW_CHANGED");
    }
    let signed: Vec<_> = entries
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap().to_owned();
            (
                field("id"),
                field("webhook-timestamp"),
                field("webhook-signature"),
                field("raw"),
            )
        })
        .collect();
    verify_signatures(&secret, &signed);
    println!("{} entries, {duplicates} duplicates", entries.len());
    server.terminate().await;
}

#[tokio::test]
async fn a_kafka_route_keeps_each_thing_in_order_through_a_sigkill() {
    const THINGS: usize = 4;
    const BEFORE: u64 = 15;
    const AFTER: u64 = 10;
    let brokers = kafka_brokers();
    let topic = format!("doppel-test-{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data, &[]).await;
    let token = server.admin_token.clone().unwrap();
    let things: Vec<String> = (0..THINGS).map(|i| format!("valve-{i}")).collect();
    for t in &things {
        register(&server.http, &token, t, json!({})).await;
    }
    let (id, secret) = create_route(
        &server,
        &token,
        json!({"kafka": {"brokers": brokers, "topic": topic}}),
    )
    .await;
    for n in 1..=BEFORE {
        for t in &things {
            update_desired(&server.http, &token, t, n).await;
        }
    }
    // Killed while deliveries are under way: every update above was acknowledged.
    let mut server = server;
    server.child.kill().await.unwrap();
    let server = start(&data, &[]).await;
    for n in BEFORE + 1..=BEFORE + AFTER {
        for t in &things {
            update_desired(&server.http, &token, t, n).await;
        }
    }
    let want: HashSet<(String, u64)> = things
        .iter()
        .flat_map(|t| (1..=BEFORE + AFTER).map(move |n| (t.clone(), n)))
        .collect();
    let messages = wait_for_all(&want, || kafka_messages(&brokers, &topic)).await;

    // kcat reads partition by partition: order holds within each, and a thing's
    // messages are all in one (its id is the key).
    let mut partition_of: HashMap<String, String> = HashMap::new();
    for m in &messages {
        let thing = m["event"]["thing"].as_str().unwrap().to_owned();
        assert_eq!(m["key"], thing);
        assert_eq!(m["headers"]["webhook-id"], m["event"]["id"]);
        assert_eq!(m["headers"]["type"], "SHADOW_CHANGED");
        let p = m["partition"].to_string();
        assert_eq!(partition_of.entry(thing.clone()).or_insert(p.clone()), &p);
    }
    let duplicates = check_order_and_ids(&messages);
    let signed: Vec<_> = messages
        .iter()
        .map(|m| {
            let h = |k: &str| m["headers"][k].as_str().unwrap().to_owned();
            (
                h("webhook-id"),
                h("webhook-timestamp"),
                h("webhook-signature"),
                m["raw"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    verify_signatures(&secret, &signed);
    assert_eq!(status(&server, &token, &id).await["health"], "HEALTHY");
    println!(
        "{} messages, {duplicates} duplicates (after a SIGKILL)",
        messages.len()
    );
    server.terminate().await;
}
