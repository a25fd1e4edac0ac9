//! The real `doppel` binary on ScyllaDB's protocol, against a real Apache Cassandra 5.0
//! node of this test's own (`tools/cassandra.sh` on other ports), which the test stops
//! and starts again.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{WAIT, client, http, next_on, start};
use rumqttc::QoS;

/// A Cassandra node of this test's own: data in `dir`, CQL on `port`.
struct Node {
    dir: PathBuf,
    port: u16,
    /// TLS with client certificates and password logins only (`CASSANDRA_SECURE`).
    secure: bool,
}

impl Node {
    fn run(&self, what: &str) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/cassandra.sh");
        let status = std::process::Command::new(script)
            .arg(what)
            .env("CASSANDRA_DIR", &self.dir)
            .env("CASSANDRA_PORT", self.port.to_string())
            .env("CASSANDRA_STORAGE_PORT", (self.port - 2000).to_string())
            .env("CASSANDRA_JMX_PORT", (self.port - 1900).to_string())
            .env("CASSANDRA_SECURE", if self.secure { "1" } else { "" })
            .status()
            .unwrap();
        assert!(status.success(), "tools/cassandra.sh {what} failed");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.run("stop");
    }
}

/// `/readyz`'s status and body, until `want` holds, for at most `limit`.
async fn readyz_until(addr: &str, limit: Duration, want: impl Fn(u16) -> bool) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let r = http(addr, "GET", "/readyz", &[], b"").await;
        let seen = (r.status, String::from_utf8_lossy(&r.body).into_owned());
        if want(seen.0) || tokio::time::Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn losing_the_database_refuses_changes_and_service_comes_back_by_itself() {
    let node_dir = tempfile::tempdir().unwrap();
    let node = Node {
        dir: node_dir.path().join("cassandra"),
        port: 9142,
        secure: false,
    };
    node.run("start");
    let dir = tempfile::tempdir().unwrap();
    let nodes = format!("127.0.0.1:{}", node.port);
    let server = start(
        dir.path(),
        &[
            "--store",
            "scylla",
            "--scylla-nodes",
            &nodes,
            "--scylla-keyspace",
            "lost_and_found",
            "--scylla-request-timeout-secs",
            "2",
            "--auto-register",
        ],
    )
    .await;
    let (c, mut el) = client(&server.mqtt, "pump-1", None).await;
    let update = |n: u64| format!(r#"{{"state":{{"reported":{{"n":{n}}}}},"clientToken":"u{n}"}}"#);
    let topic = "$aws/things/pump-1/shadow/update";
    c.publish(topic, QoS::AtLeastOnce, false, update(1))
        .await
        .unwrap();
    assert_eq!(next_on(&mut el, "/update/accepted").await["version"], 1);

    node.run("stop");
    // Refused with a clear error, not acknowledged.
    c.publish(topic, QoS::AtLeastOnce, false, update(2))
        .await
        .unwrap();
    let refused = next_on(&mut el, "/update/rejected").await;
    assert_eq!(refused["code"], 503, "{refused}");
    assert_eq!(refused["message"], "store unavailable", "{refused}");
    assert_eq!(refused["clientToken"], "u2");
    let (status, body) = readyz_until(&server.http, WAIT, |s| s == 503).await;
    assert_eq!((status, body.as_str()), (503, "store unavailable\n"));

    node.run("start");
    let (status, _) = readyz_until(&server.http, Duration::from_secs(90), |s| s == 200).await;
    assert_eq!(status, 200, "ready again without a restart");
    // Nothing half-applied: the refused update left no version behind. (Until the driver
    // has its connections back, an update may still be refused: the device retries.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let accepted = loop {
        c.publish(topic, QoS::AtLeastOnce, false, update(3))
            .await
            .unwrap();
        let (topic, doc) = next_answer(&mut el).await;
        if topic.ends_with("/accepted") {
            break doc;
        }
        assert_eq!(doc["code"], 503, "{doc}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(accepted["version"], 2, "{accepted}");
    assert_eq!(accepted["state"]["reported"]["n"], 3);
    server.terminate().await;
}

/// The next answer to an update: its topic and payload.
async fn next_answer(el: &mut rumqttc::EventLoop) -> (String, serde_json::Value) {
    use rumqttc::{Event, Packet};
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p)))
                    if p.topic.ends_with("/update/accepted")
                        || p.topic.ends_with("/update/rejected") =>
                {
                    return (p.topic, serde_json::from_slice(&p.payload).unwrap());
                }
                Ok(_) => {}
                Err(e) => panic!("connection failed: {e}"),
            }
        }
    })
    .await
    .expect("an answer to the update")
}

/// `doppel migrate` against `node` with settings from the environment: its exit status
/// and standard error.
fn migrate(node: &Node, data_dir: &std::path::Path, env: &[(&str, String)]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(["migrate", "--data-dir"])
        .arg(data_dir)
        .env_remove("DOPPEL_SCYLLA_NODES")
        .env("DOPPEL_STORE", "scylla")
        .env("DOPPEL_SCYLLA_NODES", format!("127.0.0.1:{}", node.port))
        .env("DOPPEL_SCYLLA_KEYSPACE", "secured")
        .env("DOPPEL_SCYLLA_REQUEST_TIMEOUT_SECS", "5")
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A database that takes only TLS with a client certificate, and password logins: Doppel
/// connects with `scylla_tls_*` and `scylla_username` / `scylla_password`, and each
/// missing piece is refused with the nodes and the cause.
#[tokio::test]
async fn a_database_behind_tls_client_certificates_and_passwords() {
    let node_dir = tempfile::tempdir().unwrap();
    let node = Node {
        dir: node_dir.path().join("cassandra"),
        port: 9342,
        secure: true,
    };
    node.run("start");
    let tls = node.dir.join("tls");
    let file = |name: &str| tls.join(name).display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let password = ("DOPPEL_SCYLLA_PASSWORD", "cassandra".to_owned());
    let user = ("DOPPEL_SCYLLA_USERNAME", "cassandra".to_owned());
    let ca = ("DOPPEL_SCYLLA_TLS_CA_FILE", file("ca.pem"));
    let cert = ("DOPPEL_SCYLLA_TLS_CERT_FILE", file("client.pem"));
    let key = ("DOPPEL_SCYLLA_TLS_KEY_FILE", file("client.key"));

    let cases = [
        (
            vec![user.clone(), password.clone()],
            "no TLS",
            &["Connection reset"][..],
        ),
        (
            vec![user.clone(), password.clone(), ca.clone()],
            "no client certificate",
            // TLS 1.3 ends the client's handshake before the server checks for a
            // certificate: the server's alert races the client's first request, and the
            // reset of that connection can reach the client first.
            &["CertificateRequired", "Connection reset"],
        ),
        (
            vec![ca.clone(), cert.clone(), key.clone()],
            "no password",
            &["Authentication is required"],
        ),
        (
            vec![
                user.clone(),
                ("DOPPEL_SCYLLA_PASSWORD", "wrong".into()),
                ca.clone(),
                cert.clone(),
                key.clone(),
            ],
            "a wrong password",
            &["are incorrect"],
        ),
    ];
    for (env, case, cause) in cases {
        let (ok, err) = migrate(&node, dir.path(), &env);
        assert!(!ok, "{case}: connected");
        let error = err
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or(&err);
        assert!(
            error.contains(&format!("cannot reach ScyllaDB at 127.0.0.1:{}", node.port))
                && cause.iter().any(|c| error.contains(c)),
            "{case}: {err}"
        );
    }
    let all = [user, password, ca, cert, key];
    let (ok, err) = migrate(&node, dir.path(), &all);
    assert!(ok, "{err}");

    // The server on the same settings: an update is accepted and read back.
    let mut args = vec![
        "--store".to_owned(),
        "scylla".into(),
        "--scylla-nodes".into(),
        format!("127.0.0.1:{}", node.port),
        "--scylla-keyspace".into(),
        "secured".into(),
        "--auto-register".into(),
    ];
    for (name, value) in &all {
        let flag = name
            .trim_start_matches("DOPPEL_")
            .to_lowercase()
            .replace('_', "-");
        args.extend([format!("--{flag}"), value.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = start(dir.path(), &args).await;
    let (c, mut el) = client(&server.mqtt, "vault-1", None).await;
    c.publish(
        "$aws/things/vault-1/shadow/update",
        QoS::AtLeastOnce,
        false,
        r#"{"state":{"reported":{"locked":true}}}"#,
    )
    .await
    .unwrap();
    let accepted = next_on(&mut el, "/update/accepted").await;
    assert_eq!(accepted["version"], 1);
    server.terminate().await;
}
