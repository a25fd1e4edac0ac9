//! `/metrics` as an operator meets it: what devices and applications did shows up in a
//! scrape, the scrape passes `promtool check metrics`, a real Prometheus server scrapes a
//! running `doppel` and sees shadow requests rise, and every metric the shipped Grafana
//! dashboard and alert rules use exists. Prometheus and promtool come from Debian's
//! `prometheus` package (`.ci/run` installs it).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{client, graphql, http, next_on, start};
use rumqttc::QoS;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A tool the tests need, or a failure that says how to get it (never a silent skip).
fn tool(name: &str) -> String {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is not installed: apt-get install prometheus (.ci/run does)"
    );
    String::from_utf8(found.stdout).unwrap().trim().to_owned()
}

async fn scrape(addr: &str, accept: Option<&str>) -> common::HttpResponse {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
    let r = http(addr, "GET", "/metrics", &headers, b"").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r
}

/// The value of the sample written exactly as `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.split(' ').next().unwrap().parse().unwrap())
}

/// `promtool check metrics` on a scrape: the exit status and what it said.
fn promtool_check_metrics(scrape: &[u8]) -> (bool, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(scrape).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test]
async fn a_scrape_shows_what_devices_and_applications_did_and_promtool_accepts_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        &["--auto-register", "--metrics-listen", "127.0.0.1:0"],
    )
    .await;
    let (device, mut events) = client(&server.mqtt, "meter-1", None).await;
    let update = "$aws/things/meter-1/shadow/update";
    device
        .publish(
            update,
            QoS::AtLeastOnce,
            false,
            r#"{"state":{"reported":{"kwh":1}}}"#,
        )
        .await
        .unwrap();
    next_on(&mut events, "/update/accepted").await;
    device
        .publish(update, QoS::AtLeastOnce, false, "{not json")
        .await
        .unwrap();
    assert_eq!(next_on(&mut events, "/update/rejected").await["code"], 400);
    let admin = server.admin_token.clone().unwrap();
    let ok = graphql(
        &server.http,
        Some(&admin),
        "{ things(first: 1) { totalCount } }",
        serde_json::json!({}),
    )
    .await;
    assert_eq!(ok.status, 200);
    graphql(
        &server.http,
        Some(&admin),
        "{ noSuchField }",
        serde_json::json!({}),
    )
    .await;
    let steer = graphql(
        &server.http,
        Some(&admin),
        r#"mutation { updateDesired(id: "meter-1", desired: {kwh: 0}) { version } }"#,
        serde_json::json!({}),
    )
    .await;
    assert_eq!(
        steer.json()["data"]["updateDesired"]["version"],
        2,
        "{}",
        steer.json()
    );

    let text = scrape(&server.http, None).await;
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let body = String::from_utf8(text.body.clone()).unwrap();
    for (series, expected) in [
        (
            r#"doppel_shadow_requests_total{caller="device",op="update",code="200"}"#,
            1.0,
        ),
        (
            r#"doppel_shadow_requests_total{caller="device",op="update",code="400"}"#,
            1.0,
        ),
        (
            r#"doppel_shadow_requests_total{caller="api_token",op="update",code="200"}"#,
            1.0,
        ),
        ("doppel_mqtt_connections", 1.0),
        (r#"doppel_mqtt_connects_total{result="accepted"}"#, 1.0),
        (r#"doppel_mqtt_packets_received_total{type="publish"}"#, 2.0),
        (
            r#"doppel_graphql_requests_total{type="query",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"doppel_graphql_requests_total{type="mutation",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"doppel_graphql_requests_total{type="query",outcome="error"}"#,
            1.0,
        ),
        ("doppel_twins_resident", 1.0),
        ("doppel_ready", 1.0),
    ] {
        assert_eq!(sample(&body, series), Some(expected), "{series} in\n{body}");
    }
    let commits = sample(&body, "doppel_commit_duration_seconds_count").unwrap();
    assert!(commits >= 1.0);
    assert_eq!(
        sample(&body, r#"doppel_commit_duration_seconds_bucket{le="+Inf"}"#),
        Some(commits)
    );
    assert!(sample(&body, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(sample(&body, "process_open_fds").unwrap() > 3.0);
    let (clean, said) = promtool_check_metrics(&text.body);
    assert!(clean, "promtool check metrics:\n{said}\non\n{body}");

    // Prometheus asks for OpenMetrics first; it gets it.
    let om = scrape(
        &server.http,
        Some("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3"),
    )
    .await;
    assert!(
        om.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0")
    );
    assert!(String::from_utf8_lossy(&om.body).ends_with("# EOF\n"));

    // The second listener serves the same metrics, and nothing else.
    let line = server.log.line_with("metrics listening on ").await;
    let metrics_addr = line.rsplit(' ').next().unwrap().to_owned();
    let there = scrape(&metrics_addr, None).await;
    assert!(String::from_utf8_lossy(&there.body).contains("doppel_mqtt_connections 1"));
    assert_eq!(
        http(&metrics_addr, "POST", "/graphql", &[], b"{}")
            .await
            .status,
        404
    );
    drop(device);
    server.terminate().await;
}

/// Names of series that `expr` (PromQL) reads: `doppel_…` and `process_…`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let starts = (rest.starts_with("doppel_") || rest.starts_with("process_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.push(rest[..len].to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression in the dashboard and the alert rules.
fn shipped_expressions() -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/doppel.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            exprs.push((
                format!("dashboard panel {title:?}"),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let rules =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yml")).unwrap();
    // The rules file is YAML; each `expr:` is either inline or a folded block below it.
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let mut expr = value.trim().trim_start_matches(">-").to_owned();
        let indent = line.len() - line.trim_start().len();
        while let Some(next) = lines.peek() {
            if next.trim().is_empty() || next.len() - next.trim_start().len() <= indent {
                break;
            }
            expr.push(' ');
            expr.push_str(next.trim());
            lines.next();
        }
        exprs.push(("alert rule".to_owned(), expr));
    }
    exprs
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alert_rules_use_exists_and_the_rules_check() {
    let exprs = shipped_expressions();
    assert!(exprs.len() > 20, "{exprs:#?}");
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--auto-register"]).await;
    let body = String::from_utf8(scrape(&server.http, None).await.body).unwrap();
    let series: std::collections::HashSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for (place, expr) in &exprs {
        for name in metric_names(expr) {
            // The memory limit exists only where the process has one (a container).
            if name == "doppel_memory_limit_bytes" {
                continue;
            }
            assert!(
                series.contains(name.as_str()),
                "{place} uses {name}, which the scrape lacks:\n{expr}"
            );
        }
    }
    server.terminate().await;

    for args in [
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["check", "config", "deploy/prometheus/prometheus.yml"],
    ] {
        let out = std::process::Command::new(tool("promtool"))
            .args(args)
            .current_dir(ROOT)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A free TCP port on the loopback interface.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of a PromQL query's first result, if any yet (none while Prometheus is
/// still starting).
async fn query(prometheus: &str, promql: &str) -> Option<f64> {
    tokio::net::TcpStream::connect(prometheus).await.ok()?;
    let path = format!("/api/v1/query?query={}", url_escape(promql));
    let r = http(prometheus, "GET", &path, &[], b"").await;
    let v = r.json();
    let value = v["data"]["result"].get(0)?["value"][1].as_str()?.to_owned();
    value.parse().ok()
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `promql` until `done` holds for its value, within `within`.
async fn until(
    prometheus: &str,
    promql: &str,
    within: Duration,
    done: impl Fn(f64) -> bool,
) -> f64 {
    tokio::time::timeout(within, async {
        loop {
            if let Some(v) = query(prometheus, promql).await
                && done(v)
            {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{promql} never got there within {within:?}"))
}

#[tokio::test]
async fn a_real_prometheus_scrapes_doppel_and_sees_shadow_requests_rise() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--auto-register"]).await;
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: doppel\n    static_configs:\n      - targets: [\"{}\"]\n",
            server.http
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let mut prometheus = tokio::process::Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let scrapes = Duration::from_secs(60);
    until(&web, r#"up{job="doppel"}"#, scrapes, |v| v == 1.0).await;
    let total = r#"sum(doppel_shadow_requests_total{op="update",code="200"})"#;
    let before = until(&web, total, scrapes, |_| true).await;

    let (device, mut events) = client(&server.mqtt, "meter-2", None).await;
    for kwh in 0..3 {
        device
            .publish(
                "$aws/things/meter-2/shadow/update",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"state":{{"reported":{{"kwh":{kwh}}}}}}}"#),
            )
            .await
            .unwrap();
        next_on(&mut events, "/update/accepted").await;
    }
    let after = until(&web, total, scrapes, |v| v >= before + 3.0).await;
    assert_eq!(after, before + 3.0);
    prometheus.kill().await.unwrap();
    drop(device);
    server.terminate().await;
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_event_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, http_addr) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(["serve", "--log-format", "json", "--mqtt-listen", &mqtt])
        .args(["--http-listen", &http_addr, "--data-dir"])
        .arg(dir.path())
        .env_remove("DOPPEL_SCYLLA_NODES")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut all = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push(line);
        }
        all
    });
    // A refused device whose client id tries to forge a second line.
    tokio::time::timeout(common::WAIT, async {
        while tokio::net::TcpStream::connect(&mqtt).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("doppel listens");
    let (host, port) = mqtt.rsplit_once(':').unwrap();
    let opts = rumqttc::MqttOptions::new("bad\nid", host, port.parse().unwrap());
    let (_c, mut el) = rumqttc::AsyncClient::new(opts, 10);
    let _ = tokio::time::timeout(common::WAIT, el.poll()).await;
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::timeout(common::WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    let lines = lines.await.unwrap();
    assert!(lines.len() > 3, "{lines:#?}");
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for e in &events {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(e[key].is_string(), "{key} missing from {e}");
        }
    }
    let refused = events
        .iter()
        .find(|e| e["message"] == "connection refused")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(refused["client_id"], "bad\nid");
    assert_eq!(refused["level"], "INFO");
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "http listening on ".to_owned() + &http_addr)
    );
}

#[test]
fn the_version_names_the_commit_it_was_built_from() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(ROOT)
        .output()
        .unwrap();
    let head = String::from_utf8(head.stdout).unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!(
            "doppel {} (commit {})\n",
            env!("CARGO_PKG_VERSION"),
            head.trim()
        )
    );
}
