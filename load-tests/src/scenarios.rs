//! The benchmark scenarios. Each connects a fleet of simulated devices (one MQTT
//! connection each), runs, and returns a [`Report`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{Conn, Incoming, Protocol, source_addr};
use crate::report::{Machine, Report};
use crate::stats::{Pacer, Recorder};

/// Parses `30s`, `2m`, `500ms`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: use 30s, 2m, 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// The simulated fleet, common to every scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct Fleet {
    /// MQTT server to load (Doppel with --auto-register, or any broker for `baseline`)
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub target: SocketAddr,
    /// Simulated devices, one MQTT connection each
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    #[arg(long, value_enum, default_value_t = Protocol::V4)]
    pub protocol: Protocol,
    /// Spread connections over this many loopback source addresses (127.0.0.1, .2, ...), to
    /// go past one address's ephemeral ports; 0 lets the OS choose
    #[arg(long, default_value_t = 8)]
    pub source_addrs: usize,
    /// Device ids are PREFIX-0000001, PREFIX-0000002, ...
    #[arg(long, default_value = "load")]
    pub prefix: String,
    /// Connections being opened at once
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// MQTT password of every device (Doppel with --auto-register does not check it)
    #[arg(long)]
    pub password: Option<String>,
}

impl Fleet {
    pub(crate) fn id(&self, i: usize) -> String {
        format!("{}-{:07}", self.prefix, i + 1)
    }

    /// Connects every device; failed connections are counted in `recorder` and left out.
    async fn connect(
        &self,
        recorder: Option<&Arc<Recorder>>,
        keep_alive: Duration,
    ) -> (Vec<(usize, Conn)>, Vec<String>) {
        let gate = Arc::new(Semaphore::new(self.connect_concurrency.max(1)));
        let mut tasks = JoinSet::new();
        for i in 0..self.devices {
            let gate = gate.clone();
            let (target, protocol, bind) = (
                self.target,
                self.protocol,
                source_addr(i, self.source_addrs),
            );
            let (id, password) = (self.id(i), self.password.clone());
            let recorder = recorder.cloned();
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await;
                let t0 = Instant::now();
                let conn =
                    Conn::connect(target, bind, protocol, &id, password.as_deref(), keep_alive)
                        .await;
                if let Some(r) = &recorder {
                    match &conn {
                        Ok(_) => r.success(Instant::now(), t0.elapsed()),
                        Err(_) => r.failure(Instant::now()),
                    }
                }
                (i, conn)
            });
        }
        let mut conns = Vec::with_capacity(self.devices);
        let mut failures = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((i, Ok(c))) => conns.push((i, c)),
                Ok((i, Err(e))) => failures.push(format!("{}: {e:#}", self.id(i))),
                Err(e) => failures.push(format!("connect task: {e}")),
            }
        }
        conns.sort_by_key(|(i, _)| *i);
        (conns, failures)
    }
}

/// How long and how fast.
#[derive(Debug, Clone, clap::Args)]
pub struct Pace {
    /// How long to run (30s, 2m, ...)
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Target operations per second across all devices; 0 runs flat out (each device
    /// sends its next request when the previous one is answered)
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
}

pub(crate) fn progress(
    recorder: &Arc<Recorder>,
    label: &'static str,
) -> (ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let (b, r) = (bar.clone(), recorder.clone());
    let ticker = tokio::spawn(async move {
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let ok = r.ok.load(Ordering::Relaxed);
            let rate = (ok - last.1) as f64 / last.0.elapsed().as_secs_f64();
            last = (Instant::now(), ok);
            b.set_message(format!(
                "{label}: {ok} ({rate:.0}/s), errors: {}",
                r.errors.load(Ordering::Relaxed)
            ));
            b.tick();
        }
    });
    (bar, ticker)
}

pub(crate) fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

pub(crate) fn report(
    scenario: &str,
    fleet: &Fleet,
    start: Instant,
    started_at: u64,
    recorder: &Recorder,
    figures: Map<String, Value>,
) -> Report {
    let duration = start.elapsed().as_secs_f64();
    let ok = recorder.ok.load(Ordering::Relaxed);
    Report {
        scenario: scenario.into(),
        target: fleet.target.to_string(),
        protocol: format!("{:?}", fleet.protocol).to_lowercase(),
        devices: fleet.devices,
        command: command_line(),
        started_at,
        duration_secs: duration,
        ok,
        errors: recorder.errors.load(Ordering::Relaxed),
        throughput: ok as f64 / duration.max(1e-9),
        latency_us: recorder.latency(),
        timeline: recorder.timeline(),
        figures,
        machine: Machine::this(),
    }
}

pub(crate) fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The topics of one device's request/response loop.
struct Topics {
    request: String,
    /// The answer's topic; empty: the PUBACK answers (telemetry).
    ok: String,
    err: String,
    /// Desired-state deltas the device applies and reports back (shadow devices only).
    delta: Option<String>,
}

/// A simulated device's own state: what it reports, including the desired values it has
/// applied, as a real device does.
#[derive(Default)]
struct DeviceState {
    applied: Map<String, Value>,
}

impl DeviceState {
    /// Takes on the desired values of a delta (`{"state": {...}}`).
    fn apply_delta(&mut self, payload: &[u8]) {
        if let Ok(Value::Object(mut delta)) = serde_json::from_slice::<Value>(payload)
            && let Some(Value::Object(state)) = delta.remove("state")
        {
            self.applied.extend(state);
        }
    }

    /// A telemetry reading, as a meter sends one.
    fn reading(seq: u64) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "seq": seq,
            "temp": 20.5 + (seq % 10) as f64,
            "power": {"watts": 100 + seq % 50, "volts": 230},
            "status": "running",
        }))
        .unwrap_or_default()
    }

    fn report(&self, seq: u64) -> Vec<u8> {
        let mut reported = self.applied.clone();
        reported.insert("seq".into(), json!(seq));
        reported.insert("temp".into(), json!(20.5 + (seq % 10) as f64));
        reported.insert("status".into(), json!("running"));
        serde_json::to_vec(
            &json!({"state": {"reported": reported}, "clientToken": seq.to_string()}),
        )
        .unwrap_or_default()
    }
}

/// A request/response loop run by every device: publish a report, wait for the answer,
/// apply any delta that arrives meanwhile.
async fn request_loop(
    fleet: &Fleet,
    pace: &Pace,
    devices: Vec<(usize, Conn, DeviceState)>,
    recorder: Arc<Recorder>,
    start: Instant,
    topics: impl Fn(&str) -> Topics + Send + Sync + 'static,
) {
    let deadline = start + pace.duration;
    let topics = Arc::new(topics);
    let count = fleet.devices;
    let mut tasks = JoinSet::new();
    for (i, mut conn, mut state) in devices {
        let (recorder, topics, rate) = (recorder.clone(), topics.clone(), pace.rate);
        let id = fleet.id(i);
        tasks.spawn(async move {
            let t = topics(&id);
            let mut pacer = Pacer::new(rate, count, start, i);
            let mut seq = 0u64;
            loop {
                let due = pacer.next_due(Instant::now());
                if due >= deadline {
                    return;
                }
                tokio::time::sleep_until(due.into()).await;
                seq += 1;
                // Paced runs measure from when the request was due, so a slow server is
                // not hidden by requests that were never sent (coordinated omission).
                let t0 = if rate > 0.0 { due } else { Instant::now() };
                let payload = if t.ok.is_empty() {
                    DeviceState::reading(seq)
                } else {
                    state.report(seq)
                };
                if conn.publish(&t.request, &payload).await.is_err() {
                    recorder.failure(Instant::now());
                    return;
                }
                loop {
                    match conn.next().await {
                        Ok(Incoming::Publish { topic, .. }) if topic == t.ok => {
                            recorder.success(Instant::now(), t0.elapsed());
                            break;
                        }
                        Ok(Incoming::PubAck(_, true)) if t.ok.is_empty() => {
                            recorder.success(Instant::now(), t0.elapsed());
                            break;
                        }
                        Ok(Incoming::PubAck(_, false)) if t.ok.is_empty() => {
                            recorder.failure(Instant::now());
                            break;
                        }
                        Ok(Incoming::Publish { topic, .. }) if topic == t.err => {
                            recorder.failure(Instant::now());
                            break;
                        }
                        Ok(Incoming::Publish { topic, payload })
                            if Some(&topic) == t.delta.as_ref() =>
                        {
                            state.apply_delta(&payload)
                        }
                        Ok(_) => {}
                        Err(_) => {
                            recorder.failure(Instant::now());
                            return;
                        }
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Connects the fleet for a request scenario; fails when no device could connect.
pub(crate) async fn connected(fleet: &Fleet) -> anyhow::Result<(Vec<(usize, Conn)>, Vec<String>)> {
    let (conns, failures) = fleet.connect(None, Duration::from_secs(60)).await;
    if conns.is_empty() {
        bail!(
            "no device could connect to {}: {}",
            fleet.target,
            failures.first().map_or("", String::as_str)
        );
    }
    Ok((conns, failures))
}

/// Runs the request loop of every device for the run's duration and reports it.
async fn measure(
    scenario: &str,
    label: &'static str,
    fleet: &Fleet,
    pace: &Pace,
    devices: Vec<(usize, Conn, DeviceState)>,
    failures: &[String],
    topics: impl Fn(&str) -> Topics + Send + Sync + 'static,
) -> Report {
    let started_at = now_epoch();
    let start = Instant::now();
    let recorder = Arc::new(Recorder::new(start));
    let (bar, ticker) = progress(&recorder, label);
    request_loop(fleet, pace, devices, recorder.clone(), start, topics).await;
    ticker.abort();
    bar.finish_and_clear();
    let mut figures = Map::new();
    connect_failures(failures, &mut figures);
    report(scenario, fleet, start, started_at, &recorder, figures)
}

pub(crate) fn connect_failures(failures: &[String], figures: &mut Map<String, Value>) {
    if !failures.is_empty() {
        figures.insert("connect_failures".into(), json!(failures.len()));
        figures.insert("first_connect_failure".into(), json!(failures[0]));
    }
}

/// `shadow-update`: every device publishes reported updates to its shadow and waits for
/// `update/accepted`.
pub async fn shadow_update(fleet: &Fleet, pace: &Pace) -> anyhow::Result<Report> {
    let (conns, failures) = connected(fleet).await?;
    // As the AWS IoT Device SDK's shadow sample does: subscribe to accepted, rejected and
    // delta (not documents, which doubles the traffic and which devices rarely want), then
    // get the shadow once and take on what is desired.
    let mut devices = Vec::with_capacity(conns.len());
    for (i, mut conn) in conns {
        let base = format!("$aws/things/{}/shadow", fleet.id(i));
        for channel in [
            "update/accepted",
            "update/rejected",
            "update/delta",
            "get/accepted",
            "get/rejected",
        ] {
            conn.subscribe(&format!("{base}/{channel}")).await?;
        }
        conn.publish(&format!("{base}/get"), b"{}").await?;
        let (topic, payload) = conn
            .publish_where(|t| t.starts_with(&format!("{base}/get/")))
            .await?;
        let mut state = DeviceState::default();
        if topic.ends_with("/accepted")
            && let Ok(doc) = serde_json::from_slice::<Value>(&payload)
            && let Some(delta) = doc["state"].get("delta")
        {
            state.apply_delta(&serde_json::to_vec(&json!({ "state": delta }))?);
        }
        devices.push((i, conn, state));
    }
    Ok(measure(
        "shadow-update",
        "accepted",
        fleet,
        pace,
        devices,
        &failures,
        |id| {
            let base = format!("$aws/things/{id}/shadow/update");
            Topics {
                request: base.clone(),
                ok: format!("{base}/accepted"),
                err: format!("{base}/rejected"),
                delta: Some(format!("{base}/delta")),
            }
        },
    )
    .await)
}

/// `telemetry`: every device publishes telemetry readings on `dt/load/{id}/meter` at QoS
/// 1 and waits for the PUBACK, which Doppel sends once the reading is durable.
pub async fn telemetry(fleet: &Fleet, pace: &Pace) -> anyhow::Result<Report> {
    let (conns, failures) = connected(fleet).await?;
    let devices = conns
        .into_iter()
        .map(|(i, c)| (i, c, DeviceState::default()))
        .collect();
    Ok(measure(
        "telemetry",
        "acknowledged",
        fleet,
        pace,
        devices,
        &failures,
        |id| Topics {
            request: format!("dt/load/{id}/meter"),
            ok: String::new(),
            err: String::new(),
            delta: None,
        },
    )
    .await)
}

/// `baseline`: the same devices and payloads as `shadow-update`, against any MQTT broker,
/// as a QoS 1 echo: each device subscribes to `load/{id}` and publishes to it.
pub async fn baseline(fleet: &Fleet, pace: &Pace) -> anyhow::Result<Report> {
    let (mut conns, failures) = connected(fleet).await?;
    for (i, conn) in &mut conns {
        conn.subscribe(&format!("load/{}", fleet.id(*i))).await?;
    }
    let devices = conns
        .into_iter()
        .map(|(i, c)| (i, c, DeviceState::default()))
        .collect();
    Ok(measure(
        "baseline",
        "echoed",
        fleet,
        pace,
        devices,
        &failures,
        |id| {
            let topic = format!("load/{id}");
            Topics {
                request: topic.clone(),
                ok: topic,
                err: String::new(),
                delta: None,
            }
        },
    )
    .await)
}

/// `connect-storm`: connects every device as fast as the server accepts them.
pub async fn connect_storm(fleet: &Fleet, hold: Duration) -> anyhow::Result<Report> {
    let started_at = now_epoch();
    let start = Instant::now();
    let recorder = Arc::new(Recorder::new(start));
    let (bar, ticker) = progress(&recorder, "connected");
    let (conns, failures) = fleet
        .connect(Some(&recorder), Duration::from_secs(300))
        .await;
    let elapsed = start.elapsed().as_secs_f64();
    ticker.abort();
    bar.finish_and_clear();
    let mut figures = Map::new();
    figures.insert("connected".into(), json!(conns.len()));
    figures.insert(
        "seconds_to_connect_all".into(),
        json!((elapsed * 100.0).round() / 100.0),
    );
    figures.insert(
        "connections_per_sec".into(),
        json!((conns.len() as f64 / elapsed).round()),
    );
    connect_failures(&failures, &mut figures);
    tokio::time::sleep(hold).await;
    let r = report(
        "connect-storm",
        fleet,
        start,
        started_at,
        &recorder,
        figures,
    );
    drop(conns);
    Ok(r)
}

/// The resident set of process `pid`, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// `idle-fleet`: connects every device, activates its twin with one update, then holds
/// the fleet idle (pinging) and reports the server's memory per resident twin.
pub async fn idle_fleet(fleet: &Fleet, hold: Duration, server_pid: u32) -> anyhow::Result<Report> {
    let rss_before = rss_bytes(server_pid)?;
    let started_at = now_epoch();
    let start = Instant::now();
    let recorder = Arc::new(Recorder::new(start));
    let (bar, ticker) = progress(&recorder, "twins activated");
    let keep_alive = Duration::from_secs(60);
    let (conns, failures) = fleet.connect(None, keep_alive).await;
    let gate = Arc::new(Semaphore::new(fleet.connect_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let hold_until = Arc::new(tokio::sync::Notify::new());
    let connected = conns.len();
    let (activated_tx, mut activated_rx) = tokio::sync::mpsc::channel::<()>(1024);
    for (i, mut conn) in conns {
        let (recorder, gate, id, hold_until) = (
            recorder.clone(),
            gate.clone(),
            fleet.id(i),
            hold_until.clone(),
        );
        let activated_tx = activated_tx.clone();
        tasks.spawn(async move {
            let activated = {
                let _permit = gate.acquire().await;
                let base = format!("$aws/things/{id}/shadow/update");
                let t0 = Instant::now();
                let ok = async {
                    conn.subscribe(&format!("{base}/accepted")).await?;
                    conn.publish(
                        &base,
                        br#"{"state":{"reported":{"online":true,"fw":"1.0.0"}}}"#,
                    )
                    .await?;
                    conn.publish_where(|t| t.ends_with("/accepted")).await
                }
                .await;
                match ok {
                    Ok(_) => {
                        recorder.success(Instant::now(), t0.elapsed());
                        true
                    }
                    Err(_) => {
                        recorder.failure(Instant::now());
                        false
                    }
                }
            };
            let _ = activated_tx.send(()).await;
            if !activated {
                return;
            }
            // Idle: a ping every half keep-alive until the measurement is taken.
            loop {
                tokio::select! {
                    () = hold_until.notified() => return,
                    () = tokio::time::sleep(keep_alive / 2) => {
                        if conn.ping().await.is_err() {
                            return;
                        }
                        while !matches!(conn.next().await, Ok(Incoming::PingResp) | Err(_)) {}
                    }
                }
            }
        });
    }
    // Every device reports once, activated or not.
    for _ in 0..connected {
        activated_rx.recv().await;
    }
    ticker.abort();
    bar.finish_and_clear();
    tokio::time::sleep(hold).await;
    let rss_after = rss_bytes(server_pid)?;
    let twins = recorder.ok.load(Ordering::Relaxed);
    let mut figures = Map::new();
    figures.insert("resident_twins".into(), json!(twins));
    figures.insert("server_rss_before_mib".into(), json!(rss_before >> 20));
    figures.insert("server_rss_after_mib".into(), json!(rss_after >> 20));
    figures.insert(
        "server_bytes_per_connected_twin".into(),
        json!(rss_after.saturating_sub(rss_before) / twins.max(1)),
    );
    connect_failures(&failures, &mut figures);
    let r = report("idle-fleet", fleet, start, started_at, &recorder, figures);
    hold_until.notify_waiters();
    drop(tasks);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn a_device_reports_the_desired_values_it_was_sent() {
        let mut d = DeviceState::default();
        d.apply_delta(br#"{"version":3,"state":{"mode":"eco","fan":{"speed":2}}}"#);
        d.apply_delta(b"not json");
        let report: Value = serde_json::from_slice(&d.report(7)).unwrap();
        assert_eq!(report["state"]["reported"]["mode"], "eco");
        assert_eq!(report["state"]["reported"]["fan"], json!({"speed": 2}));
        assert_eq!(report["state"]["reported"]["seq"], 7);
        assert_eq!(report["clientToken"], "7");
    }

    #[test]
    fn rss_of_this_process() {
        assert!(rss_bytes(std::process::id()).unwrap() > 1 << 20);
    }
}
