//! The real `doppel` binary probed at its edges as an attacker or a new user would: idle
//! HTTP floods, forged client ids in the log, the first admin token, mistyped data
//! directories and listen addresses.

mod common;

use std::time::Duration;

use common::{WAIT, start, start_with_nofile};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The CONNACK code a client id gets from the server at `addr`.
async fn connack(addr: &str, client_id: &str) -> ConnectReturnCode {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let o = MqttOptions::new(client_id, host, port.parse().unwrap());
    let (_c, mut el) = AsyncClient::new(o, 10);
    match tokio::time::timeout(WAIT, el.poll()).await.unwrap() {
        Ok(Event::Incoming(Packet::ConnAck(ack))) => ack.code,
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => code,
        other => panic!("no CONNACK: {other:?}"),
    }
}

#[tokio::test]
async fn idle_http_connections_are_closed_and_never_lock_out_health_checks_or_devices() {
    let dir = tempfile::tempdir().unwrap();
    // As in the report: the process may open 1,024 files in all.
    let server = start_with_nofile(
        dir.path(),
        &[
            "--auto-register",
            "--http-max-connections",
            "500",
            "--http-header-timeout-secs",
            "2",
        ],
        1024,
    )
    .await;
    let warning = server.log.line_with("the open-file limit is below").await;
    assert!(warning.contains("limit=1024"), "{warning}");

    let started = tokio::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(tokio::net::TcpStream::connect(&server.http).await.unwrap());
    }
    // Health checks and devices get through the flood.
    let health = common::http(&server.http, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200);
    assert_eq!(
        connack(&server.mqtt, "flood-ok").await,
        ConnectReturnCode::Success
    );

    // Every idle connection is closed by the server: evicted for a newer one, or at the
    // 2 s header timeout.
    let closed = futures_util::future::join_all(idle.into_iter().map(|mut s| async move {
        let mut buf = [0u8; 64];
        tokio::time::timeout(WAIT, s.read(&mut buf)).await.is_ok()
    }))
    .await;
    assert!(
        closed.iter().all(|c| *c),
        "{} still open",
        closed.iter().filter(|c| !**c).count()
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "closed within the timeout (and the test's slack): {:?}",
        started.elapsed()
    );
    assert!(
        server
            .log
            .lines()
            .iter()
            .all(|l| !l.contains("Too many open files")),
        "{:#?}",
        server.log.lines()
    );
}

#[tokio::test]
async fn a_forged_client_id_gives_one_escaped_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--auto-register"]).await;
    let forged = "evil\n2026-01-01T00:00:00Z  INFO doppel: FAKE admin token dpl_x\x1b[2J";
    assert_eq!(
        connack(&server.mqtt, forged).await,
        ConnectReturnCode::BadClientId
    );
    let line = server.log.line_with("connection refused").await;
    assert!(
        line.contains(
            r"client_id=evil\n2026-01-01T00:00:00Z  INFO doppel: FAKE admin token dpl_x\u{1b}[2J"
        ),
        "{line}"
    );
    let lines = server.log.lines();
    assert!(
        lines
            .iter()
            .all(|l| !l.starts_with("2026-01-01") && !l.contains('\x1b')),
        "{lines:#?}"
    );

    // A 500-character id is logged cut, saying how much was left out.
    let long = "x".repeat(500);
    assert_eq!(
        connack(&server.mqtt, &long).await,
        ConnectReturnCode::BadClientId
    );
    let line = server.log.line_with("[244 more bytes]").await;
    assert!(
        line.contains(&format!("client_id={}…", "x".repeat(256))),
        "{line}"
    );
}

#[tokio::test]
async fn the_first_admin_token_goes_to_an_owner_only_file_not_to_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let token = server
        .admin_token
        .clone()
        .expect("the token file was announced");
    assert!(token.starts_with("dpl_"), "{token}");
    let lines = server.log.lines();
    assert!(lines.iter().all(|l| !l.contains("dpl_")), "{lines:#?}");
    let file = dir.path().join("admin-token");
    let announced = server.log.line_with("an admin API token was written").await;
    assert!(
        announced.contains(&file.display().to_string()),
        "{announced}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let r = common::graphql(
        &server.http,
        Some(&token),
        "{ things { totalCount } }",
        serde_json::json!({}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test]
async fn commands_other_than_serve_refuse_a_directory_that_is_not_a_data_directory() {
    let missing = std::path::Path::new("/no/such/dir");
    let empty = tempfile::tempdir().unwrap();
    for args in [
        &["token", "create", "--role", "admin"][..],
        &["device", "list"],
        &["device", "add", "lamp-1"],
        &["device", "disable", "lamp-1"],
        &["signing-key"],
    ] {
        for (dir, why) in [
            (missing, "does not exist"),
            (empty.path(), "is not a Doppel data directory"),
        ] {
            let out = common::doppel(args, dir);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?}");
            assert!(
                err.contains(&format!("data_dir {} {why}", dir.display())),
                "{args:?}: {err}"
            );
            assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
        }
    }
    assert!(!missing.exists());
    assert_eq!(
        std::fs::read_dir(empty.path()).unwrap().count(),
        0,
        "nothing was created"
    );
}

#[tokio::test]
async fn listen_addresses_take_port_only_and_host_name_forms() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args([
            "serve",
            "--mqtt-listen",
            "localhost:0",
            "--http-listen",
            ":0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut mqtt, mut http) = (None, None);
    tokio::time::timeout(WAIT, async {
        while mqtt.is_none() || http.is_none() {
            let line = lines.next_line().await.unwrap().expect("doppel is running");
            if let Some((_, a)) = line.split_once("mqtt listening on ") {
                mqtt = Some(a.to_owned());
            } else if let Some((_, a)) = line.split_once("http listening on ") {
                http = Some(a.to_owned());
            }
        }
    })
    .await
    .expect("both listeners up");
    let mqtt = mqtt.unwrap();
    assert!(
        mqtt.starts_with("127.0.0.1:") || mqtt.starts_with("[::1]:"),
        "{mqtt}"
    );
    assert!(http.unwrap().starts_with("0.0.0.0:"));
    child.kill().await.unwrap();

    let bad = common::doppel(&["serve", "--http-listen", "8080"], dir.path());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(err.contains("http_listen"), "{err}");
    assert!(
        err.contains("expected IP:PORT, HOST:PORT or :PORT"),
        "{err}"
    );
}

#[tokio::test]
async fn a_half_sent_http_request_is_closed_at_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--http-header-timeout-secs", "1"]).await;
    let mut s = tokio::net::TcpStream::connect(&server.http).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("closed by the server")
        .ok();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn publishes_the_device_api_does_not_take_are_logged_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--auto-register"]).await;
    let (c, mut el) = common::client(&server.mqtt, "stray", None).await;
    for topic in [
        "$aws/things/stray/shadow/foo",
        "$aws/things/stray/shadow/update/accepted",
    ] {
        c.publish(topic, rumqttc::QoS::AtLeastOnce, false, "{}")
            .await
            .unwrap();
    }
    // Both are acknowledged (they go nowhere); the first is logged, the second counted.
    let mut acks = 0;
    while acks < 2 {
        if let Event::Incoming(Packet::PubAck(_)) = tokio::time::timeout(WAIT, el.poll())
            .await
            .unwrap()
            .unwrap()
        {
            acks += 1;
        }
    }
    let line = server.log.line_with("publish ignored").await;
    assert!(
        line.contains("topic=\"$aws/things/stray/shadow/foo\""),
        "{line}"
    );
    assert!(line.contains("ignored_total=1"), "{line}");
    let update = "$aws/things/stray/shadow/update";
    c.publish(
        update,
        rumqttc::QoS::AtLeastOnce,
        false,
        r#"{"state":{"reported":{"a":1}}}"#,
    )
    .await
    .unwrap();
    common::next_on(&mut el, "/update/accepted").await;
    assert_eq!(
        server
            .log
            .lines()
            .iter()
            .filter(|l| l.contains("publish ignored"))
            .count(),
        1,
        "one line per 10 s, however many publishes"
    );
}
