//! End-to-end tests of the real `doppel` binary: started as a process on port 0, driven
//! by a real MQTT client, killed with SIGKILL.

mod common;

use common::{WAIT, client, next_on, start};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[tokio::test]
async fn sigkill_loses_no_accepted_version() {
    sigkill_loses_nothing(&["--auto-register", NO_PUBLISH_LIMIT[0], NO_PUBLISH_LIMIT[1]]).await;
}

/// One device streaming updates as fast as the store takes them publishes more than AWS
/// IoT's 100 a second, the default limit; these tests are about durability.
const NO_PUBLISH_LIMIT: [&str; 2] = ["--mqtt-max-publishes-per-second", "0"];

#[tokio::test]
async fn sigkill_loses_no_accepted_version_on_scylladb() {
    let args = common::scylla_args();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.push("--auto-register");
    args.extend(NO_PUBLISH_LIMIT);
    sigkill_loses_nothing(&args).await;
}

/// Kills the server (SIGKILL) in the middle of a stream of updates, then restarts it on
/// the same store: every version acknowledged before the kill is there.
async fn sigkill_loses_nothing(args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), args).await;
    let (c, mut el) = client(&server.mqtt, "crashy", None).await;
    let topic = "$aws/things/crashy/shadow/update";
    // A stream of updates, eight in flight at a time; kill right after the 150th accepted.
    let send = async |c: &AsyncClient, n: u64| {
        let body = format!(r#"{{"state":{{"reported":{{"n":{n}}}}}}}"#);
        c.publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .unwrap();
    };
    let mut accepted: Vec<(u64, u64)> = Vec::new();
    let mut sent = 0u64;
    for _ in 0..8 {
        send(&c, sent).await;
        sent += 1;
    }
    while accepted.len() < 150 {
        let a = next_on(&mut el, "/update/accepted").await;
        accepted.push((
            a["version"].as_u64().unwrap(),
            a["state"]["reported"]["n"].as_u64().unwrap(),
        ));
        send(&c, sent).await;
        sent += 1;
    }
    server.child.start_kill().unwrap(); // SIGKILL
    server.child.wait().await.unwrap();
    drop(el);

    let versions: Vec<u64> = accepted.iter().map(|(v, _)| *v).collect();
    assert_eq!(
        versions,
        (1..=150).collect::<Vec<_>>(),
        "one version per accepted update, in order"
    );
    let (last_version, _) = *accepted.last().unwrap();

    let server = start(dir.path(), args).await;
    let (c, mut el) = client(&server.mqtt, "crashy", None).await;
    c.publish("$aws/things/crashy/shadow/get", QoS::AtLeastOnce, false, "")
        .await
        .unwrap();
    let doc = next_on(&mut el, "/get/accepted").await;
    let version = doc["version"].as_u64().unwrap();
    let n = doc["state"]["reported"]["n"].as_u64().unwrap();
    assert!(
        version >= last_version,
        "accepted version {last_version} lost: found {version}"
    );
    // Version v was the update that carried n = v - 1 (sent in order, one twin, one mailbox).
    assert_eq!(n, version - 1, "the state belongs to the version");
    assert!(version <= sent, "no version beyond what was sent");
}

#[tokio::test]
async fn health_endpoints_and_the_device_registry_cli() {
    let dir = tempfile::tempdir().unwrap();
    // The first start makes the data directory; the device commands need one.
    assert!(start(dir.path(), &[]).await.terminate().await.success());
    let add = common::doppel(&["device", "add", "meter-7"], dir.path());
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let out = String::from_utf8(add.stdout).unwrap();
    let secret = out
        .lines()
        .find_map(|l| l.rsplit_once(": ").map(|(_, s)| s.to_owned()))
        .unwrap();
    assert_eq!(secret.len(), 64, "{out}");

    let again = common::doppel(&["device", "add", "meter-7"], dir.path());
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already registered"));
    let disabled = common::doppel(&["device", "disable", "meter-7"], dir.path());
    assert!(disabled.status.success());
    let listing =
        String::from_utf8(common::doppel(&["device", "list"], dir.path()).stdout).unwrap();
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("meter-7") && l.contains("false")),
        "{listing}"
    );
    assert!(
        common::doppel(&["device", "enable", "meter-7"], dir.path())
            .status
            .success()
    );
    let unknown = common::doppel(&["device", "disable", "nobody"], dir.path());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("thing nobody is not registered"));
    let bad = common::doppel(&["device", "add", "bad/id"], dir.path());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("thing name contains '/'"));

    let server = start(dir.path(), &[]).await;
    for path in ["/healthz", "/readyz"] {
        let status = http_get(&server.http, path).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{path}: {status}");
    }
    // The running server holds the directory: the CLI says so instead of corrupting it.
    let busy = common::doppel(&["device", "list"], dir.path());
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use by a running doppel server"));

    // The registered device connects with its secret.
    let (host, port) = server.mqtt.rsplit_once(':').unwrap();
    let mut o = MqttOptions::new("meter-7", host, port.parse().unwrap());
    o.set_credentials("meter-7", secret);
    let (_c, mut el) = AsyncClient::new(o, 10);
    assert!(matches!(
        tokio::time::timeout(WAIT, el.poll()).await.unwrap(),
        Ok(Event::Incoming(Packet::ConnAck(_)))
    ));

    // SIGTERM stops it cleanly; then the registry is readable again.
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");
    let list = common::doppel(&["device", "list"], dir.path());
    let listing = String::from_utf8(list.stdout).unwrap();
    assert!(
        listing.contains("meter-7") && listing.contains("1 device(s)"),
        "{listing}"
    );
}

/// `doppel device import` registers a fleet from JSON lines, skips things already
/// registered, hands out each new secret once, and stops at a bad line naming it.
#[tokio::test]
async fn devices_are_imported_in_bulk_from_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    assert!(start(dir.path(), &[]).await.terminate().await.success());
    assert!(
        common::doppel(&["device", "add", "pump-2"], dir.path())
            .status
            .success()
    );
    let input = dir.path().join("fleet.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"pump-1\", \"attributes\": {\"site\": \"north\"}}\n\n{\"id\": \"pump-2\"}\n{\"id\": \"pump-3\"}\n{\"id\": \"pump-1\"}\n",
    )
    .unwrap();
    let out = common::doppel(&["device", "import", input.to_str().unwrap()], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("registered 2 device(s); 2 already registered"),
        "{stderr}"
    );
    let secrets: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = secrets.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["pump-1", "pump-3"]);

    std::fs::write(&input, "{\"id\": \"pump-4\"}\n{\"id\": \"bad/id\"}\n").unwrap();
    let bad = common::doppel(&["device", "import", input.to_str().unwrap()], dir.path());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("line 2: not imported, nor anything after it (0 registered before it)")
            && stderr.contains("thing name contains '/'"),
        "{stderr}"
    );
    let listing =
        String::from_utf8(common::doppel(&["device", "list"], dir.path()).stdout).unwrap();
    assert!(listing.contains("3 device(s)"), "{listing}");

    // An imported device connects with the secret it was given.
    let server = start(dir.path(), &[]).await;
    let secret = secrets[0]["secret"].as_str().unwrap();
    let (host, port) = server.mqtt.rsplit_once(':').unwrap();
    let mut o = MqttOptions::new("pump-1", host, port.parse().unwrap());
    o.set_credentials("pump-1", secret);
    let (_c, mut el) = AsyncClient::new(o, 10);
    assert!(matches!(
        tokio::time::timeout(WAIT, el.poll()).await.unwrap(),
        Ok(Event::Incoming(Packet::ConnAck(_)))
    ));
    server.terminate().await;
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn serves_mqtt_over_tls_with_the_configured_certificate() {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (cert_file, key_file) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    let data = dir.path().join("data");
    let args = [
        "--auto-register",
        "--mqtt-tls-listen",
        "127.0.0.1:0",
        "--tls-cert-file",
        cert_file.to_str().unwrap(),
        "--tls-key-file",
        key_file.to_str().unwrap(),
    ];
    let server = start(&data, &args).await;
    let mqtts = server.mqtts.clone().expect("doppel logs its TLS address");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&mqtts).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut connect = bytes::BytesMut::new();
    rumqttc::mqttbytes::v4::Connect::new("tls-device")
        .write(&mut connect)
        .unwrap();
    tls.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, tls.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        connack,
        [0x20, 0x02, 0x00, 0x00],
        "CONNACK accepted over TLS"
    );

    // A bad certificate path is refused at start, naming the setting.
    let out = common::doppel(
        &[
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-tls-listen",
            "127.0.0.1:0",
            "--tls-cert-file",
            "/nonexistent.pem",
            "--tls-key-file",
            "/nonexistent.key",
        ],
        &dir.path().join("other"),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read tls_cert_file /nonexistent.pem")
    );
}

/// Durable calls (fsync and kin) in an strace output.
fn syncs(trace: &std::path::Path) -> usize {
    std::fs::read_to_string(trace)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("sync") && l.contains("= 0"))
        .count()
}

#[tokio::test]
async fn every_acknowledged_update_was_synced_to_disk_first() {
    // SIGKILL keeps the page cache, so the crash test cannot tell a synced commit from a
    // buffered one; a power cut could. This test watches the calls that make data
    // durable: one update at a time, each must have had its own sync before its answer.
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("syncs.txt");
    let data = dir.path().join("data");
    let mut server = common::start_traced(&data, &["--auto-register"], &trace).await;
    let (c, mut el) = client(&server.mqtt, "durable", None).await;
    let before = syncs(&trace);
    let updates = 10;
    for n in 0..updates {
        let body = format!(r#"{{"state":{{"reported":{{"n":{n}}}}}}}"#);
        c.publish(
            "$aws/things/durable/shadow/update",
            QoS::AtLeastOnce,
            false,
            body,
        )
        .await
        .unwrap();
        next_on(&mut el, "/update/accepted").await;
    }
    let synced = syncs(&trace) - before;
    assert!(
        synced >= updates,
        "{updates} updates acknowledged one after another, but only {synced} syncs"
    );
    // A killed strace leaves its tracee running: stop the server itself, then strace.
    let strace = server.child.id().unwrap().to_string();
    let tracee = std::process::Command::new("pgrep")
        .args(["-P", &strace])
        .output()
        .unwrap();
    for pid in String::from_utf8(tracee.stdout).unwrap().split_whitespace() {
        std::process::Command::new("kill")
            .args(["-TERM", pid])
            .status()
            .unwrap();
    }
    let status = tokio::time::timeout(common::WAIT, server.child.wait())
        .await
        .expect("the server and strace stop")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn doppel_audit_verify_names_the_entry_that_was_changed_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let admin = server.admin_token.clone().unwrap();
    common::register(&server.http, &admin, "audited-1", serde_json::json!({})).await;
    let disable = "mutation { disableThing(id: \"audited-1\") { id } }";
    let r = common::graphql(&server.http, Some(&admin), disable, serde_json::json!({}))
        .await
        .json();
    assert!(r["errors"].is_null(), "{r}");
    // The CLI beside the running server leaves its entry in the inbox the server drains.
    let token = common::doppel(&["token", "create", "--role", "viewer"], dir.path());
    assert!(token.status.success());
    let log = "{ auditLog { edges { node { actor action } } } }";
    let logged = tokio::time::timeout(WAIT, async {
        loop {
            let r = common::graphql(&server.http, Some(&admin), log, serde_json::json!({}))
                .await
                .json();
            let edges = r["data"]["auditLog"]["edges"].clone();
            if edges.as_array().is_some_and(|e| e.len() == 3) {
                return edges;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the server appends the CLI's entry");
    assert_eq!(
        logged[2]["node"],
        serde_json::json!({"actor": "cli", "action": "token create"})
    );
    assert!(server.terminate().await.success());
    let add = common::doppel(&["device", "add", "audited-2"], dir.path());
    assert!(add.status.success());

    let verify = || common::doppel(&["audit", "verify"], dir.path());
    let ok = verify();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.contains("audit log verified: 4 entries"), "{stdout}");

    // Someone with access to the store rewrites what the second action was.
    {
        let store = twin_store::EmbeddedStore::open(dir.path(), 10).unwrap();
        use twin_store::AuditStore as _;
        let mut entry = store.audit_entries(Some(1), 1).await.unwrap().remove(0);
        assert_eq!((entry.seq, entry.action.as_str()), (2, "disableThing"));
        entry.action = "enableThing".into();
        store.put_audit(&entry).await.unwrap();
    }
    let broken = verify();
    assert!(!broken.status.success());
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(
        stderr.contains("audit entry 2 does not match: its content does not hash to its hash"),
        "{stderr}"
    );
}
