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

/// A scrape's text.
async fn scrape_text(addr: &str, accept: Option<&str>) -> String {
    String::from_utf8(scrape(addr, accept).await.body).unwrap()
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
    let command = graphql(
        &server.http,
        Some(&admin),
        r#"mutation { sendCommand(thingId: "meter-1", name: "reset", timeoutSeconds: 60) { status } }"#,
        serde_json::json!({}),
    )
    .await;
    assert_eq!(
        command.json()["data"]["sendCommand"]["status"],
        "CREATED",
        "{}",
        command.json()
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
            2.0,
        ),
        (
            r#"doppel_graphql_requests_total{type="query",outcome="error"}"#,
            1.0,
        ),
        ("doppel_twins_resident", 1.0),
        (r#"doppel_command_executions_total{status="CREATED"}"#, 1.0),
        ("doppel_ready", 1.0),
        // Everything was answered: nothing waits in a mailbox.
        (r#"doppel_mailbox_messages{mailbox="shard"}"#, 0.0),
        (r#"doppel_mailbox_messages{mailbox="twin"}"#, 0.0),
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

/// The value of a PromQL query's first result, if any yet (none while Prometheus is
/// still starting: 503).
async fn query(prometheus: &str, promql: &str) -> Option<f64> {
    tokio::net::TcpStream::connect(prometheus).await.ok()?;
    let path = format!("/api/v1/query?query={}", url_escape(promql));
    let r = http(prometheus, "GET", &path, &[], b"").await;
    if r.status != 200 {
        return None;
    }
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

/// A real Prometheus server scraping `target` every second (with exemplar storage on),
/// and the address of its HTTP API.
async fn prometheus(dir: &Path, target: &str) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt as _;
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: doppel\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg("--web.listen-address=127.0.0.1:0")
        .arg("--enable-feature=exemplar-storage")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // It logs the port it was given: `msg="Listening on" address=127.0.0.1:PORT`.
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let web = tokio::time::timeout(common::WAIT, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("prometheus runs");
            if line.contains("msg=\"Listening on\"") {
                return line.rsplit("address=").next().unwrap().trim().to_owned();
            }
        }
    })
    .await
    .expect("prometheus listens");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, web)
}

#[tokio::test]
async fn a_real_prometheus_scrapes_doppel_and_sees_shadow_requests_rise_and_their_traces() {
    let (_receiver, dir, server) =
        traced_server(Transport::Http, &["--trace-sample-ratio", "0"]).await;
    let (mut prometheus, web) = prometheus(dir.path(), &server.http).await;
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

    // A traced update: Prometheus keeps the exemplar that names its trace, with the
    // commit's latency bucket.
    let (traced, mut answers) = device_v5(&server.mqtt, "meter-3").await;
    let trace_id = "3e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b";
    publish_traced(
        &traced,
        "$aws/things/meter-3/shadow/update",
        r#"{"state":{"reported":{"kwh":1}}}"#,
        Some(format!("00-{trace_id}-00f067aa0ba902b7-01")),
    )
    .await;
    next_v5(&mut answers, "/update/accepted").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let path = format!(
        "/api/v1/query_exemplars?query=doppel_commit_duration_seconds_bucket&start={}&end={}",
        now - 600,
        now + 600
    );
    let exemplars = tokio::time::timeout(scrapes, async {
        loop {
            let found = http(&web, "GET", &path, &[], b"").await.json();
            let named = found["data"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|series| {
                    series["exemplars"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| e["labels"]["trace_id"] == trace_id)
                });
            if named {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await
    .expect("Prometheus stores the exemplar");
    assert_eq!(exemplars["status"], "success");
    prometheus.kill().await.unwrap();
    drop((device, traced));
    server.terminate().await;
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_event_fields_and_the_trace() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args([
            "serve",
            "--log-format",
            "json",
            "--auto-register",
            "--trace-sample-ratio",
            "0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .args(["--http-listen", "127.0.0.1:0", "--otlp-endpoint"])
        .arg(format!("http://127.0.0.1:{}", receiver.http))
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("DOPPEL_SCYLLA_NODES")
        .env("RUST_LOG", "info,twin_actors=debug")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (seen, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let lines = tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut all = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = seen.send(line.clone());
            all.push(line);
        }
        all
    });
    // The bound addresses, from the JSON lines as they come.
    let (mut mqtt, mut http_addr) = (None, None);
    tokio::time::timeout(common::WAIT, async {
        while mqtt.is_none() || http_addr.is_none() {
            let line = seen_rx.recv().await.expect("doppel logs its addresses");
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            let message = event["message"].as_str().unwrap_or_default();
            if let Some(a) = message.strip_prefix("mqtt listening on ") {
                mqtt = Some(a.to_owned());
            } else if let Some(a) = message.strip_prefix("http listening on ") {
                http_addr = Some(a.to_owned());
            }
        }
    })
    .await
    .expect("doppel listens");
    let (mqtt, http_addr) = (mqtt.unwrap(), http_addr.unwrap());
    // Two updates the twin refuses (a version conflict), one in the device's trace: its
    // line names the trace.
    let (device, mut answers) = device_v5(&mqtt, "lamp-12").await;
    let trace_id = "7c4a1f0e3b2d4c5a8e9f0a1b2c3d4e5f";
    for traceparent in [Some(format!("00-{trace_id}-00f067aa0ba902b7-01")), None] {
        publish_traced(
            &device,
            "$aws/things/lamp-12/shadow/update",
            r#"{"state":{"desired":{"on":true}},"version":99}"#,
            traceparent,
        )
        .await;
        next_v5(&mut answers, "/update/rejected").await;
    }
    let refused: Vec<serde_json::Value> = tokio::time::timeout(common::WAIT, async {
        let mut refused = Vec::new();
        while refused.len() < 2 {
            let line = seen_rx.recv().await.expect("doppel logs the refusals");
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            if event["message"] == "shadow request refused" {
                refused.push(event);
            }
        }
        refused
    })
    .await
    .expect("both refusals are logged");
    assert_eq!(refused[0]["trace_id"], trace_id, "{}", refused[0]);
    assert_eq!(refused[0]["thing"], "lamp-12");
    assert_eq!(refused[0]["level"], "DEBUG");
    let spans: Vec<&str> = refused[0]["spans"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", refused[0]))
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(spans, ["mqtt.publish", "twin.update"], "{}", refused[0]);
    assert!(
        refused[1].get("trace_id").is_none(),
        "an untraced request's line names no trace: {}",
        refused[1]
    );
    drop(device);
    // A refused device whose client id tries to forge a second line.
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

/// `tools/otlp_receiver.py`: an OTLP trace receiver (HTTP and gRPC) built on the official
/// opentelemetry-proto definitions, and the spans it has received so far.
struct Receiver {
    _child: tokio::process::Child,
    http: u16,
    grpc: u16,
    spans: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Receiver {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// The receiver with `args` (`--tls CERT KEY CLIENT_CA`).
    async fn start_with(args: &[&Path]) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        common::python_venv("otlp-venv", "opentelemetry-proto==1.45.2");
        let venv = common::python_venv("otlp-venv", "grpcio==1.85.1");
        let mut child = tokio::process::Command::new(venv.join("bin/python"))
            .arg(Path::new(ROOT).join("tools/otlp_receiver.py"))
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let ports: serde_json::Value = tokio::time::timeout(common::WAIT, lines.next_line())
            .await
            .expect("the receiver says its ports")
            .unwrap()
            .map(|l| serde_json::from_str(&l).unwrap())
            .expect("the receiver runs");
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let collected = spans.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                collected
                    .lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        });
        Self {
            _child: child,
            http: ports["http"].as_u64().unwrap() as u16,
            grpc: ports["grpc"].as_u64().unwrap() as u16,
            spans,
        }
    }

    /// The spans of `trace_id`, once `names` are all among them.
    async fn trace(&self, trace_id: &str, names: &[&str]) -> Vec<serde_json::Value> {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let trace: Vec<serde_json::Value> = self
                    .spans
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|s| s["trace_id"] == trace_id)
                    .cloned()
                    .collect();
                if names.iter().all(|n| trace.iter().any(|s| s["name"] == *n)) {
                    return trace;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no trace {trace_id} with {names:?}; received: {:#?}",
                self.spans.lock().unwrap()
            )
        })
    }
}

fn span<'a>(trace: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    trace.iter().find(|s| s["name"] == name).unwrap()
}

/// The span id in a `traceparent`, after checking its trace id.
fn span_id_of(traceparent: &str, trace_id: &str) -> String {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1], trace_id, "{traceparent} continues the trace");
    parts[2].to_owned()
}

/// An MQTT 5 device subscribed to its shadow's answers.
async fn device_v5(addr: &str, id: &str) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    device_v5_on(addr, id, &format!("$aws/things/{id}/shadow/update/#")).await
}

/// An MQTT 5 device subscribed to `filter`.
async fn device_v5_on(
    addr: &str,
    id: &str,
    filter: &str,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let (host, port) = addr.rsplit_once(':').unwrap();
    let (client, mut events) =
        AsyncClient::new(MqttOptions::new(id, host, port.parse().unwrap()), 10);
    client
        .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::timeout(common::WAIT, async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
                return;
            }
        }
    })
    .await
    .expect("subscribed");
    (client, events)
}

/// The next publish on a topic ending with `suffix`, and its `traceparent` user property.
async fn next_v5(events: &mut rumqttc::v5::EventLoop, suffix: &str) -> Option<String> {
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::v5::Packet;
    tokio::time::timeout(common::WAIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await.unwrap()
                && p.topic.ends_with(suffix.as_bytes())
            {
                return p.properties.and_then(|pr| {
                    pr.user_properties
                        .into_iter()
                        .find(|(k, _)| k == "traceparent")
                        .map(|(_, v)| v)
                });
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("nothing on {suffix}"))
}

/// Whether an answer's `traceparent` belongs to the sampled trace `trace_id` (an answer
/// to an untraced update has none).
fn traceparent_was_sampled(answered: &Option<String>, trace_id: &str) -> bool {
    answered
        .as_deref()
        .is_some_and(|t| t.contains(trace_id) && t.ends_with("-01"))
}

/// Publishes `body` on `topic` at QoS 1 with `traceparent` as an MQTT 5 user property.
async fn publish_traced(
    device: &rumqttc::v5::AsyncClient,
    topic: impl Into<String>,
    body: &'static str,
    traceparent: Option<String>,
) {
    let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: traceparent
            .map(|t| ("traceparent".into(), t))
            .into_iter()
            .collect(),
        ..Default::default()
    };
    device
        .publish_with_properties(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            body,
            properties,
        )
        .await
        .unwrap();
}

/// `POST /graphql` as the admin, with a `traceparent` header.
async fn traced_graphql(
    server: &common::Server,
    query: &str,
    traceparent: &str,
) -> common::HttpResponse {
    let auth = format!("Bearer {}", server.admin_token.as_deref().unwrap());
    let body = serde_json::json!({ "query": query }).to_string();
    http(
        &server.http,
        "POST",
        "/graphql",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
            ("traceparent", traceparent),
        ],
        body.as_bytes(),
    )
    .await
}

/// Spans leave in batches; a short delay keeps the tests quick.
const QUICK_BATCHES: [(&str, &str); 1] = [("OTEL_BSP_SCHEDULE_DELAY", "100")];

#[derive(Clone, Copy)]
enum Transport {
    Http,
    Grpc,
}

/// A receiver, and a doppel (registering devices as they connect) that exports its spans
/// to it over `transport`, with `extra` settings.
async fn traced_server(
    transport: Transport,
    extra: &[&str],
) -> (Receiver, tempfile::TempDir, common::Server) {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (protocol, port) = match transport {
        Transport::Http => ("http", receiver.http),
        Transport::Grpc => ("grpc", receiver.grpc),
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut args = vec![
        "--auto-register",
        "--otlp-protocol",
        protocol,
        "--otlp-endpoint",
        &endpoint,
    ];
    args.extend_from_slice(extra);
    let server = common::start_with_env(dir.path(), &args, &QUICK_BATCHES).await;
    (receiver, dir, server)
}

#[tokio::test]
async fn a_devices_trace_runs_through_the_twin_and_the_commit_and_comes_back_with_the_answer() {
    let (receiver, _dir, server) = traced_server(
        Transport::Http,
        &[
            "--otlp-resource-attributes",
            "deployment.environment=test",
            // Nothing that starts here is traced: the device's sampled flag decides.
            "--trace-sample-ratio",
            "0",
        ],
    )
    .await;
    let (device, mut events) = device_v5(&server.mqtt, "lamp-9").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let device_span = "00f067aa0ba902b7";
    publish_traced(
        &device,
        "$aws/things/lamp-9/shadow/update",
        r#"{"state":{"desired":{"on":true}}}"#,
        Some(format!("00-{trace_id}-{device_span}-01")),
    )
    .await;
    let accepted = next_v5(&mut events, "/update/accepted")
        .await
        .expect("a traceparent on accepted");
    let delta = next_v5(&mut events, "/update/delta")
        .await
        .expect("a traceparent on the delta");
    assert_eq!(accepted, delta, "both come from the same change");

    let trace = receiver
        .trace(
            trace_id,
            &[
                "mqtt.publish",
                "twin.update",
                "store.commit",
                "mqtt.deliver",
            ],
        )
        .await;
    let (publish, update, commit) = (
        span(&trace, "mqtt.publish"),
        span(&trace, "twin.update"),
        span(&trace, "store.commit"),
    );
    let delivered: Vec<&str> = trace
        .iter()
        .filter(|s| s["name"] == "mqtt.deliver" && s["parent_span_id"] == update["span_id"])
        .filter_map(|s| s["attributes"]["topic"].as_str())
        .collect();
    assert!(
        delivered.contains(&"$aws/things/lamp-9/shadow/update/accepted"),
        "the answer's delivery is in the trace: {trace:#?}"
    );
    assert_eq!(
        publish["parent_span_id"], device_span,
        "the device's span is the parent"
    );
    assert_eq!(update["parent_span_id"], publish["span_id"]);
    assert_eq!(commit["parent_span_id"], update["span_id"]);
    assert_eq!(
        span_id_of(&accepted, trace_id),
        update["span_id"].as_str().unwrap()
    );
    assert_eq!(publish["attributes"]["thing"], "lamp-9");
    assert_eq!(publish["service"], "doppel");
    assert_eq!(publish["resource"]["deployment.environment"], "test");
    assert_eq!(publish["transport"], "http");

    // The commit's latency names the trace (an exemplar), for a scraper that asks for
    // OpenMetrics; the Prometheus text format has no exemplars.
    let open = scrape_text(&server.http, Some("application/openmetrics-text")).await;
    let exemplar = format!(" # {{trace_id=\"{trace_id}\"}} ");
    let commit_buckets: Vec<&str> = open
        .lines()
        .filter(|l| {
            l.starts_with("doppel_commit_duration_seconds_bucket{") && l.contains(&exemplar)
        })
        .collect();
    assert_eq!(commit_buckets.len(), 1, "{open}");
    assert!(!scrape_text(&server.http, None).await.contains(" # {"));

    // A trace the device does not sample is not traced here either, and neither is an
    // update without a traceparent (the ratio is 0): the unsampled one's answer carries
    // the device's traceparent on unchanged, as W3C asks. Spans leave in the order they
    // end, so once a later sampled update's spans are in, theirs would be too.
    let later = "0af7651916cd43dd8448eb211c80319c";
    let unsampled = format!("00-{trace_id}-{device_span}-00");
    for traceparent in [
        Some(unsampled.clone()),
        None,
        Some(format!("00-{later}-{device_span}-01")),
    ] {
        publish_traced(
            &device,
            "$aws/things/lamp-9/shadow/update",
            r#"{"state":{"reported":{"on":true}}}"#,
            traceparent.clone(),
        )
        .await;
        let answered = next_v5(&mut events, "/update/accepted").await;
        match traceparent {
            Some(sent) if sent == unsampled => assert_eq!(answered, Some(sent)),
            None => assert_eq!(answered, None),
            Some(_) => assert!(traceparent_was_sampled(&answered, later), "{answered:?}"),
        }
    }
    receiver
        .trace(
            later,
            &[
                "mqtt.publish",
                "twin.update",
                "store.commit",
                "mqtt.deliver",
            ],
        )
        .await;
    let all = receiver.spans.lock().unwrap().clone();
    let handled = all.iter().filter(|s| s["name"] != "mqtt.deliver").count();
    assert!(
        handled == 6
            && all
                .iter()
                .all(|s| s["trace_id"] == trace_id || s["trace_id"] == later),
        "only the sampled updates' spans: {all:#?}"
    );
    drop(device);
    server.terminate().await;
}

#[tokio::test]
async fn an_applications_trace_reaches_the_device_with_its_delta_over_grpc() {
    let (receiver, _dir, server) = traced_server(Transport::Grpc, &[]).await;
    let (device, mut events) = device_v5(&server.mqtt, "lamp-10").await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let app_span = "b7ad6b7169203331";
    let r = traced_graphql(
        &server,
        r#"mutation { updateDesired(id: "lamp-10", desired: {on: true}) { version } }"#,
        &format!("00-{trace_id}-{app_span}-01"),
    )
    .await;
    assert_eq!(
        r.json()["data"]["updateDesired"]["version"],
        1,
        "{}",
        r.json()
    );
    let delta = next_v5(&mut events, "/update/delta")
        .await
        .expect("a traceparent on the delta");

    let trace = receiver
        .trace(
            trace_id,
            &[
                "graphql.request",
                "graphql.resolve",
                "twin.update",
                "store.commit",
            ],
        )
        .await;
    let (request, resolve, update) = (
        span(&trace, "graphql.request"),
        span(&trace, "graphql.resolve"),
        span(&trace, "twin.update"),
    );
    assert_eq!(
        request["parent_span_id"], app_span,
        "the caller's span is the parent"
    );
    assert_eq!(resolve["parent_span_id"], request["span_id"]);
    assert_eq!(resolve["attributes"]["field"], "updateDesired");
    assert_eq!(update["parent_span_id"], resolve["span_id"]);
    let open = scrape_text(&server.http, Some("application/openmetrics-text")).await;
    assert!(
        open.lines().any(|l| {
            l.starts_with("doppel_graphql_request_duration_seconds_bucket{")
                && l.contains("type=\"mutation\"")
                && l.contains(&format!(" # {{trace_id=\"{trace_id}\"}} "))
        }),
        "the request's latency names its trace: {open}"
    );
    assert_eq!(
        span_id_of(&delta, trace_id),
        update["span_id"].as_str().unwrap()
    );
    assert_eq!(request["transport"], "grpc");
    drop(device);
    server.terminate().await;
}

#[test]
fn the_dashboard_is_valid_against_grafanas_published_schema() {
    // tools/grafana-schema pins @grafana/schema (Grafana's dashboard type), a generator
    // that turns it into a JSON Schema, and Ajv; installed from npm into the target dir.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("grafana-schema");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["package.json", "package-lock.json", "check.js"] {
        std::fs::copy(
            Path::new(ROOT).join("tools/grafana-schema").join(file),
            dir.join(file),
        )
        .unwrap();
    }
    if !dir.join("node_modules/@grafana/schema").exists() {
        let npm = std::process::Command::new("npm")
            .args(["ci", "--silent", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status();
        assert!(
            npm.is_ok_and(|s| s.success()),
            "npm ci in {} failed: this test needs Node.js and npm",
            dir.display()
        );
    }
    let check = |dashboard: &Path| {
        let out = std::process::Command::new("node")
            .arg(dir.join("check.js"))
            .arg(dashboard)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let shipped = Path::new(ROOT).join("deploy/grafana/doppel.json");
    let generated = std::process::Command::new("python3")
        .arg(Path::new(ROOT).join("tools/grafana_dashboard.py"))
        .output()
        .unwrap();
    assert!(
        generated.stdout == std::fs::read(&shipped).unwrap(),
        "deploy/grafana/doppel.json is not what tools/grafana_dashboard.py prints: regenerate it"
    );
    let (valid, said) = check(&shipped);
    assert!(valid, "deploy/grafana/doppel.json:\n{said}");

    // The check is not a formality: a panel with a misspelt field fails it.
    let mut broken: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&shipped).unwrap()).unwrap();
    broken["panels"][0]["gridpos"] = broken["panels"][0]["gridPos"].take();
    let file = dir.join("broken.json");
    std::fs::write(&file, broken.to_string()).unwrap();
    let (valid, said) = check(&file);
    assert!(!valid && said.contains("gridpos"), "{said}");
}

#[tokio::test]
async fn a_commands_trace_goes_to_the_device_and_comes_back_with_its_response() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let (receiver, _dir, server) = traced_server(Transport::Http, &[]).await;
    let (host, port) = server.mqtt.rsplit_once(':').unwrap();
    let (device, mut events) =
        AsyncClient::new(MqttOptions::new("pump-1", host, port.parse().unwrap()), 10);
    device
        .subscribe(
            "$aws/commands/things/pump-1/executions/+/request/#",
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let next = async |events: &mut rumqttc::v5::EventLoop| {
        tokio::time::timeout(common::WAIT, async {
            loop {
                match events.poll().await.unwrap() {
                    Event::Incoming(Packet::SubAck(_)) => return None,
                    Event::Incoming(Packet::Publish(p)) => return Some(p),
                    _ => {}
                }
            }
        })
        .await
        .expect("a packet for the device")
    };
    assert!(next(&mut events).await.is_none(), "subscribed");

    let trace_id = "5b8aa5a2d2c872e8321cf37308d69df2";
    let app_span = "051581bf3cb55c13";
    let r = traced_graphql(
        &server,
        r#"mutation { sendCommand(thingId: "pump-1", name: "reboot", timeoutSeconds: 60) { executionId } }"#,
        &format!("00-{trace_id}-{app_span}-01"),
    )
    .await;
    let id = r.json()["data"]["sendCommand"]["executionId"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", r.json()))
        .to_owned();
    let request = next(&mut events).await.expect("the command request");
    let delivered = request
        .properties
        .and_then(|p| {
            p.user_properties
                .into_iter()
                .find(|(k, _)| k == "traceparent")
        })
        .map(|(_, v)| v)
        .expect("the command request carries a traceparent");
    let send_span = span_id_of(&delivered, trace_id);

    // The device answers in the same trace, as a child of what it received.
    publish_traced(
        &device,
        format!("$aws/commands/things/pump-1/executions/{id}/response/json"),
        r#"{"status":"SUCCEEDED"}"#,
        Some(delivered.clone()),
    )
    .await;
    tokio::time::timeout(common::WAIT, async {
        while !matches!(
            events.poll().await.unwrap(),
            Event::Incoming(Packet::PubAck(_))
        ) {}
    })
    .await
    .expect("the response is acknowledged");
    let trace = receiver
        .trace(
            trace_id,
            &[
                "graphql.resolve",
                "twin.command.send",
                "mqtt.publish",
                "twin.command.respond",
            ],
        )
        .await;
    let (resolve, send, publish, respond) = (
        span(&trace, "graphql.resolve"),
        span(&trace, "twin.command.send"),
        span(&trace, "mqtt.publish"),
        span(&trace, "twin.command.respond"),
    );
    assert_eq!(send["parent_span_id"], resolve["span_id"]);
    assert_eq!(send["span_id"], send_span.as_str());
    assert_eq!(
        publish["parent_span_id"],
        send_span.as_str(),
        "the device's answer continues it"
    );
    assert_eq!(respond["parent_span_id"], publish["span_id"]);
    let commits: Vec<_> = trace
        .iter()
        .filter(|s| s["name"] == "store.commit")
        .collect();
    assert!(
        commits
            .iter()
            .any(|c| c["parent_span_id"] == send["span_id"])
            && commits
                .iter()
                .any(|c| c["parent_span_id"] == respond["span_id"]),
        "both changes are committed in the trace: {trace:#?}"
    );
    drop(device);
    server.terminate().await;
}

#[tokio::test]
async fn a_rollouts_release_is_a_trace_that_reaches_the_device_with_its_job() {
    let (receiver, _dir, server) = traced_server(Transport::Http, &[]).await;
    let (device, mut events) = device_v5_on(
        &server.mqtt,
        "valve-1",
        "$aws/things/valve-1/jobs/notify-next",
    )
    .await;
    let create = r#"mutation { createOtaJob(jobId: "fw-9", targets: {thingIds: ["valve-1"]}, document: {firmware: {version: "9.0", url: "https://fw.example/9.0", sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", size: 1}}) { jobId } }"#;
    let r = http(
        &server.http,
        "POST",
        "/graphql",
        &[
            ("Content-Type", "application/json"),
            (
                "Authorization",
                &format!("Bearer {}", server.admin_token.as_deref().unwrap()),
            ),
        ],
        serde_json::json!({ "query": create })
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(
        r.json()["data"]["createOtaJob"]["jobId"],
        "fw-9",
        "{}",
        r.json()
    );
    let notified = next_v5(&mut events, "/jobs/notify-next")
        .await
        .expect("the notification carries the release's traceparent");
    let trace_id = notified.split('-').nth(1).unwrap().to_owned();
    let trace = receiver
        .trace(
            &trace_id,
            &["rollout.release", "twin.job.queue", "store.commit"],
        )
        .await;
    let (release, queue) = (
        span(&trace, "rollout.release"),
        span(&trace, "twin.job.queue"),
    );
    assert_eq!(
        release["parent_span_id"], "",
        "a release starts its own trace"
    );
    assert_eq!(release["attributes"]["job"], "fw-9");
    assert_eq!(queue["parent_span_id"], release["span_id"]);
    assert_eq!(
        span_id_of(&notified, &trace_id),
        queue["span_id"].as_str().unwrap(),
        "the device hears of its job from the twin's span"
    );
    assert!(
        trace
            .iter()
            .any(|s| s["name"] == "store.commit" && s["parent_span_id"] == queue["span_id"]),
        "{trace:#?}"
    );
    drop(device);
    server.terminate().await;
}

/// A CA, and PEM files of a certificate it signed for `names` and its key, in `dir`
/// (named `{stem}.pem`, `{stem}.key`).
fn signed(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    dir: &Path,
    stem: &str,
    names: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let mut params = rcgen::CertificateParams::new(names).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, stem);
    let cert = params.signed_by(&key, issuer).unwrap();
    let files = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&files.0, cert.pem()).unwrap();
    std::fs::write(&files.1, key.serialize_pem()).unwrap();
    files
}

/// A CA's certificate (written to `dir/{stem}.pem`) and the issuer that signs with it.
fn ca(dir: &Path, stem: &str) -> (std::path::PathBuf, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Each certificate needs a name of its own: with rcgen's default one for all, a
    // certificate would look as if it had signed itself.
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, stem);
    let cert = params.self_signed(&key).unwrap();
    let file = dir.join(format!("{stem}.pem"));
    std::fs::write(&file, cert.pem()).unwrap();
    (file, rcgen::Issuer::new(params, key))
}

#[tokio::test]
async fn spans_reach_a_collector_over_mutual_tls_on_both_transports() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, server_issuer) = ca(dir.path(), "collector-ca");
    let (client_ca, client_issuer) = ca(dir.path(), "doppel-ca");
    let (cert, key) = signed(&server_issuer, dir.path(), "collector", &["127.0.0.1"]);
    let (doppel_cert, doppel_key) = signed(&client_issuer, dir.path(), "doppel", &["doppel"]);
    let receiver = Receiver::start_with(&[Path::new("--tls"), &cert, &key, &client_ca]).await;
    for (protocol, port, trace_id) in [
        ("http", receiver.http, "1d2c3b4a59687f8e9d0c1b2a39485766"),
        ("grpc", receiver.grpc, "2e3d4c5b6a798f0e1d2c3b4a59687f8e"),
    ] {
        let data = dir.path().join(protocol);
        let endpoint = format!("https://127.0.0.1:{port}");
        let server = common::start_with_env(
            &data,
            &[
                "--auto-register",
                "--otlp-protocol",
                protocol,
                "--otlp-endpoint",
                &endpoint,
                "--otlp-tls-ca-file",
                server_ca.to_str().unwrap(),
                "--otlp-tls-cert-file",
                doppel_cert.to_str().unwrap(),
                "--otlp-tls-key-file",
                doppel_key.to_str().unwrap(),
            ],
            &QUICK_BATCHES,
        )
        .await;
        let (device, mut events) = device_v5(&server.mqtt, "lamp-20").await;
        publish_traced(
            &device,
            "$aws/things/lamp-20/shadow/update",
            r#"{"state":{"reported":{"on":true}}}"#,
            Some(format!("00-{trace_id}-00f067aa0ba902b7-01")),
        )
        .await;
        next_v5(&mut events, "/update/accepted").await;
        let trace = receiver
            .trace(trace_id, &["mqtt.publish", "twin.update", "store.commit"])
            .await;
        assert_eq!(span(&trace, "mqtt.publish")["transport"], protocol);
        drop(device);
        server.terminate().await;
    }
}
