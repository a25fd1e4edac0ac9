//! Scenarios that drive Doppel through its GraphQL API, as application developers do.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Map, Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{Conn, Incoming};
use crate::graphql::{Connection, GraphQlError, Pool};
use crate::report::{Machine, Report};
use crate::scenarios::{
    Fleet, Pace, command_line, connect_failures, connected, now_epoch, progress, report,
};
use crate::stats::{Pacer, Recorder};
use crate::watch::Watcher;

/// Where the GraphQL API is and who calls it.
#[derive(Debug, Clone, clap::Args)]
pub struct Api {
    /// Doppel's HTTP address (the GraphQL API is at /graphql)
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// API token (operator role for desired updates, admin to register things)
    #[arg(long, env = "DOPPEL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// HTTP connections shared by the simulated API callers
    #[arg(long, default_value_t = 16)]
    pub http_connections: usize,
}

impl Api {
    pub(crate) fn pool(&self) -> Pool {
        Pool::new(self.http, self.token.clone(), self.http_connections)
    }
}

/// A device's wait for one step, so that a lost answer fails the round instead of
/// hanging the device.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

const UPDATE_DESIRED: &str =
    "mutation($id: ID!, $desired: JSON!) { updateDesired(id: $id, desired: $desired) { version } }";

/// One round of one device: the mutation, the delta reaching the device, the device's
/// report of the new value being accepted, and the subscriber seeing the twin in sync.
/// Times are from `t0`, when the mutation was due.
struct Round {
    answered: Duration,
    delta: Duration,
    accepted: Duration,
    seen: Duration,
}

/// Waits for the delta that carries `setpoint = seq`.
async fn delta_of(conn: &mut Conn, topic: &str, seq: u64) -> anyhow::Result<Instant> {
    loop {
        if let Incoming::Publish { topic: t, payload } = conn.next().await?
            && t == topic
        {
            let delta: Value = serde_json::from_slice(&payload)?;
            if delta["state"]["setpoint"] == json!(seq) {
                return Ok(Instant::now());
            }
        }
    }
}

async fn round(
    pool: &Pool,
    watcher: &Watcher,
    conn: &mut Conn,
    id: &str,
    seq: u64,
    t0: Instant,
) -> anyhow::Result<Round> {
    let base = format!("$aws/things/{id}/shadow/update");
    let delta_topic = format!("{base}/delta");
    let vars = json!({"id": id, "desired": {"setpoint": seq}});
    // The delta may reach the device before the mutation's answer reaches the caller:
    // wait for both at once.
    let (answered, delivered) = {
        let mut mutation = pin!(pool.execute(UPDATE_DESIRED, vars));
        let mut delta = pin!(delta_of(conn, &delta_topic, seq));
        let mut deadline = pin!(tokio::time::sleep(STEP_TIMEOUT));
        let (mut answered, mut delivered) = (None, None);
        loop {
            if let (Some(a), Some(d)) = (answered, delivered) {
                break (a, d);
            }
            tokio::select! {
                r = &mut mutation, if answered.is_none() => {
                    r?;
                    answered = Some(t0.elapsed());
                }
                r = &mut delta, if delivered.is_none() => delivered = Some(r?.duration_since(t0)),
                () = &mut deadline => bail!("no delta and answer within {STEP_TIMEOUT:?}"),
            }
        }
    };
    // The device applies the value and reports it, as a real one does.
    let token = seq.to_string();
    let seen = watcher.converged(id, &token);
    let report = json!({"state": {"reported": {"setpoint": seq}}, "clientToken": token});
    conn.publish(&base, &serde_json::to_vec(&report)?).await?;
    let accepted = tokio::time::timeout(STEP_TIMEOUT, async {
        loop {
            match conn.next().await? {
                Incoming::Publish { topic, .. } if topic == format!("{base}/accepted") => {
                    return Ok(t0.elapsed());
                }
                Incoming::Publish { topic, payload } if topic == format!("{base}/rejected") => {
                    bail!("report rejected: {}", String::from_utf8_lossy(&payload))
                }
                _ => {}
            }
        }
    })
    .await??;
    let seen = tokio::time::timeout(STEP_TIMEOUT, seen)
        .await
        .map_err(|_| {
            anyhow::anyhow!("the subscriber did not see the report within {STEP_TIMEOUT:?}")
        })?
        .map_err(|_| anyhow::anyhow!("the subscription ended"))?;
    Ok(Round {
        answered,
        delta: delivered,
        accepted,
        seen: seen.duration_since(t0),
    })
}

/// "p50 …, p99 …, max …" of a recorder's latencies.
fn spread(r: &Recorder) -> String {
    r.latency().map_or_else(String::new, |l| {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            l.p50 as f64 / 1000.0,
            l.p99 as f64 / 1000.0,
            l.max as f64 / 1000.0
        )
    })
}

const LATEST: &str = "query($id: ID!) { thing(id: $id) { telemetry { key value timestamp } } }";

/// `telemetry`, with `readers` API callers reading devices' latest values
/// (`Thing.telemetry`) one after the other meanwhile; reads of a thing that has no
/// telemetry yet (the fleet still connecting) are not counted.
pub async fn telemetry(
    fleet: &Fleet,
    pace: &Pace,
    api: &Api,
    readers: usize,
) -> anyhow::Result<Report> {
    let reads = Arc::new(Recorder::new(Instant::now()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ids: Arc<[String]> = (0..fleet.devices).map(|i| fleet.id(i)).collect();
    let mut tasks = JoinSet::new();
    for r in 0..readers {
        let (reads, stop, ids) = (reads.clone(), stop.clone(), ids.clone());
        let (http, token) = (api.http, api.token.clone());
        tasks.spawn(async move {
            let mut conn = Connection::connect(http, token.as_deref()).await?;
            let mut n = r;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n = (n + 7919) % ids.len().max(1);
                let t0 = Instant::now();
                let data = conn.execute(LATEST, json!({"id": ids[n]})).await?;
                let took = t0.elapsed();
                if data["thing"]["telemetry"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
                {
                    reads.success(Instant::now(), took);
                }
            }
            anyhow::Ok(())
        });
    }
    let run = crate::scenarios::telemetry(fleet, pace).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(reader) = tasks.join_next().await {
        reader??;
    }
    let mut report = run?;
    if readers > 0 {
        let count = reads.ok.load(std::sync::atomic::Ordering::Relaxed);
        report.figures.insert(
            "latest_reads".into(),
            json!(format!(
                "{count} reads of Thing.telemetry by {readers} callers: {}",
                spread(&reads)
            )),
        );
    }
    Ok(report)
}

/// `desired-roundtrip`: an application sets a device's desired state through GraphQL;
/// the device gets the delta over MQTT, applies it and reports it back, and a GraphQL
/// subscriber (`thingsChanged`) sees the twin in sync. The latency is that whole loop,
/// from the mutation to the subscriber; the figures break it down.
pub async fn desired_roundtrip(fleet: &Fleet, pace: &Pace, api: &Api) -> anyhow::Result<Report> {
    let (conns, failures) = connected(fleet).await?;
    let mut devices = Vec::with_capacity(conns.len());
    for (i, mut conn) in conns {
        let base = format!("$aws/things/{}/shadow/update", fleet.id(i));
        for channel in ["accepted", "rejected", "delta"] {
            conn.subscribe(&format!("{base}/{channel}")).await?;
        }
        devices.push((i, conn));
    }
    let pool = Arc::new(api.pool());
    // Fail early and clearly on a bad token or address rather than with every round.
    if let Err(e) = pool
        .execute("{ things(first: 1) { totalCount } }", json!({}))
        .await
    {
        bail!("the GraphQL API at {} refused a query: {e:#}", api.http);
    }
    let watcher = Arc::new(Watcher::start(api.http, api.token.as_deref()).await?);
    let started_at = now_epoch();
    let start = Instant::now();
    let recorder = Arc::new(Recorder::new(start));
    // Breakdowns: mutation answered, delta at the device, device's report accepted.
    let steps = Arc::new([
        Recorder::new(start),
        Recorder::new(start),
        Recorder::new(start),
    ]);
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let (bar, ticker) = progress(&recorder, "rounds seen by the subscriber");
    let deadline = start + pace.duration;
    let mut tasks = JoinSet::new();
    let count = fleet.devices;
    for (i, mut conn) in devices {
        let (pool, watcher, recorder, steps, first_error) = (
            pool.clone(),
            watcher.clone(),
            recorder.clone(),
            steps.clone(),
            first_error.clone(),
        );
        let (id, rate) = (fleet.id(i), pace.rate);
        tasks.spawn(async move {
            let mut pacer = Pacer::new(rate, count, start, i);
            let mut seq = 0u64;
            loop {
                let due = pacer.next_due(Instant::now());
                if due >= deadline {
                    return;
                }
                tokio::time::sleep_until(due.into()).await;
                seq += 1;
                let t0 = if rate > 0.0 { due } else { Instant::now() };
                match round(&pool, &watcher, &mut conn, &id, seq, t0).await {
                    Ok(r) => {
                        let now = Instant::now();
                        recorder.success(now, r.seen);
                        steps[0].success(now, r.answered);
                        steps[1].success(now, r.delta);
                        steps[2].success(now, r.accepted);
                    }
                    Err(e) => {
                        recorder.failure(Instant::now());
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert_with(|| format!("{id}: {e:#}"));
                        // The connection's state is unknown after a failed round.
                        return;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    ticker.abort();
    bar.finish_and_clear();
    let mut figures = Map::new();
    figures.insert("mutation_answered".into(), json!(spread(&steps[0])));
    figures.insert("delta_at_device".into(), json!(spread(&steps[1])));
    figures.insert("device_report_accepted".into(), json!(spread(&steps[2])));
    if let Ok(w) = Arc::try_unwrap(watcher)
        && let Some(e) = w.failure().await
    {
        figures.insert("subscriber_failure".into(), json!(format!("{e:#}")));
    }
    figures.insert("http_connections".into(), json!(api.http_connections));
    if let Some(e) = first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        figures.insert("first_error".into(), json!(e));
    }
    connect_failures(&failures, &mut figures);
    Ok(report(
        "desired-roundtrip",
        fleet,
        start,
        started_at,
        &recorder,
        figures,
    ))
}

/// Registration and desired state for thing `i` of a `fleet-query` fleet: 100 sites, 4
/// models, levels 0-999, so that each filter below selects a known share.
fn fleet_thing(prefix: &str, i: usize) -> (String, Value, Value) {
    let model = ["m1", "m2", "m3", "m4"][i % 4];
    (
        format!("{prefix}-{:07}", i + 1),
        json!({"site": format!("plant-{}", i % 100), "model": model}),
        json!({"level": i % 1000, "mode": if i.is_multiple_of(2) { "eco" } else { "boost" }}),
    )
}

/// The timed filters, from very selective to a full scan.
fn fleet_filters(prefix: &str, count: usize) -> Vec<String> {
    let (middle, _, _) = fleet_thing(prefix, count / 2);
    let mut filters = vec![format!(r#"id = "{middle}""#)];
    filters.extend(FLEET_FILTERS.iter().map(|f| f.to_string()));
    filters
}

const FLEET_FILTERS: &[&str] = &[
    r#"attributes.site = "plant-97" AND desired.level > 990"#,
    r#"attributes.site = "plant-7""#,
    r#"desired.level >= 995"#,
    r#"attributes.site IN ("plant-1", "plant-2") AND attributes.model = "m2""#,
    r#"attributes.site = "plant-7" OR desired.level < 3"#,
    r#"NOT attributes.site = "plant-7" AND desired.mode = "eco""#,
];

/// Registers things `0..count` and sets their desired state; things already registered
/// keep their registration.
async fn populate(pool: &Arc<Pool>, prefix: &str, count: usize) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let (pool, gate, prefix) = (pool.clone(), gate.clone(), prefix.to_owned());
        let permit = gate.acquire_owned().await?;
        tasks.spawn(async move {
            let _permit = permit;
            let (id, attributes, desired) = fleet_thing(&prefix, i);
            let registered = pool
                .execute(
                    "mutation($id: ID!, $a: JSON) { registerThing(id: $id, attributes: $a) { thing { id } } }",
                    json!({"id": id, "a": attributes}),
                )
                .await;
            match registered {
                Ok(_) => {}
                Err(e) if e.downcast_ref::<GraphQlError>().is_some_and(|g| g.code == "VERSION_CONFLICT") => {}
                Err(e) => return Err(e.context(format!("registering {id}"))),
            }
            pool.execute(UPDATE_DESIRED, json!({"id": id, "desired": desired}))
                .await
                .map_err(|e| e.context(format!("setting {id}'s desired state")))?;
            anyhow::Ok(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(t0.elapsed())
}

/// `fleet-query`: registers `count` things (unless they exist) and times `things(filter)`
/// queries over them, each `repeat` times, one at a time.
pub async fn fleet_query(
    api: &Api,
    prefix: &str,
    count: usize,
    repeat: usize,
) -> anyhow::Result<Report> {
    let pool = Arc::new(api.pool());
    let setup = populate(&pool, prefix, count).await?;
    let mut figures = Map::new();
    figures.insert(
        "setup".into(),
        json!(format!(
            "{count} things registered and given desired state in {:.1} s",
            setup.as_secs_f64()
        )),
    );
    let mut conn = Connection::connect(api.http, api.token.as_deref()).await?;
    let query =
        "query($f: String) { things(filter: $f, first: 100) { totalCount edges { node { id } } } }";
    let started_at = now_epoch();
    let start = Instant::now();
    let all = Recorder::new(start);
    for (n, filter) in fleet_filters(prefix, count).iter().enumerate() {
        let one = Recorder::new(start);
        let mut matches = 0;
        for _ in 0..repeat.max(1) {
            let t0 = Instant::now();
            let data = conn.execute(query, json!({"f": filter})).await?;
            let took = t0.elapsed();
            one.success(Instant::now(), took);
            all.success(Instant::now(), took);
            matches = data["things"]["totalCount"].as_u64().unwrap_or(0);
        }
        figures.insert(
            format!("q{}", n + 1),
            json!(format!("{filter}: {matches} matches, {}", spread(&one))),
        );
    }
    let duration = start.elapsed().as_secs_f64();
    let ok = all.ok.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Report {
        scenario: "fleet-query".into(),
        target: api.http.to_string(),
        protocol: "graphql".into(),
        devices: count,
        command: command_line(),
        started_at,
        duration_secs: duration,
        ok,
        errors: 0,
        throughput: ok as f64 / duration.max(1e-9),
        latency_us: all.latency(),
        timeline: all.timeline(),
        figures,
        machine: Machine::this(),
    })
}

/// A device's side of a job rollout: it starts its next job whenever told (and once at
/// connect), reports SUCCEEDED (or FAILED when `fails`), and records, for each job,
/// the time from hearing of it to its final status being accepted.
async fn run_jobs(
    mut conn: Conn,
    id: String,
    fails: bool,
    recorder: Arc<Recorder>,
    stop: Arc<tokio::sync::Notify>,
) {
    let base = format!("$aws/things/{id}/jobs");
    let start = format!("{base}/start-next");
    if conn.publish(&start, b"{}").await.is_err() {
        return;
    }
    let mut heard: Option<Instant> = None;
    loop {
        let incoming = tokio::select! {
            () = stop.notified() => return,
            i = conn.next() => i,
        };
        let Ok(Incoming::Publish { topic, payload }) = incoming else {
            if incoming.is_err() {
                recorder.failure(Instant::now());
                return;
            }
            continue;
        };
        let v: Value = serde_json::from_slice(&payload).unwrap_or_default();
        let sent = if topic.ends_with("/notify-next") && v.get("execution").is_some() {
            heard.get_or_insert_with(Instant::now);
            conn.publish(&start, b"{}").await
        } else if topic.ends_with("/start-next/accepted") {
            match v["execution"]["jobId"].as_str() {
                Some(job) => {
                    heard.get_or_insert_with(Instant::now);
                    let status = if fails { "FAILED" } else { "SUCCEEDED" };
                    let body = json!({"status": status, "statusDetails": {"step": "download"}});
                    conn.publish(&format!("{base}/{job}/update"), body.to_string().as_bytes())
                        .await
                }
                None => Ok(()),
            }
        } else if topic.ends_with("/update/accepted") {
            if let Some(t0) = heard.take() {
                recorder.success(Instant::now(), t0.elapsed());
            }
            conn.publish(&start, b"{}").await
        } else {
            Ok(())
        };
        if sent.is_err() {
            recorder.failure(Instant::now());
            return;
        }
    }
}

/// The server's CPU time so far (user + system), from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("bad /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("bad /proc/{pid}/stat"))?
            .parse::<f64>()?)
    };
    // Clock ticks are 100 per second on Linux.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// How `ota-rollout` rolls out.
#[derive(Debug, Clone, clap::Args)]
pub struct RolloutArgs {
    /// Cumulative wave percentages, such as 1,10,100 (all at once without waves or a rate)
    #[arg(long, value_delimiter = ',')]
    pub waves: Vec<u32>,
    /// Executions per minute at first (with --rate-factor and --rate-max)
    #[arg(long)]
    pub rate_base: Option<u32>,
    #[arg(long, default_value_t = 2.0)]
    pub rate_factor: f64,
    #[arg(long, default_value_t = 100_000)]
    pub rate_max: u32,
    /// Share of devices whose update fails, in percent (spread evenly over the fleet)
    #[arg(long, default_value_t = 0)]
    pub fail_percent: u32,
    /// Give up after this long
    #[arg(long, default_value = "10m", value_parser = crate::scenarios::parse_duration)]
    pub timeout: Duration,
    /// Process id of the server (same machine), to report its CPU time per execution
    #[arg(long)]
    pub server_pid: Option<u32>,
}

/// `ota-rollout`: every device runs the jobs device API; an operator creates one
/// firmware job for the whole fleet through GraphQL and the run lasts until the job has
/// ended. Measures devices updated per minute, the device-side time per update, and the
/// server's CPU time per execution.
pub async fn ota_rollout(fleet: &Fleet, api: &Api, args: &RolloutArgs) -> anyhow::Result<Report> {
    let (conns, failures) = connected(fleet).await?;
    let mut devices = Vec::with_capacity(conns.len());
    for (i, mut conn) in conns {
        let base = format!("$aws/things/{}/jobs", fleet.id(i));
        for channel in ["notify-next", "start-next/accepted", "+/update/accepted"] {
            conn.subscribe(&format!("{base}/{channel}")).await?;
        }
        devices.push((i, conn));
    }
    let pool = api.pool();
    let ids: Vec<String> = devices.iter().map(|(i, _)| fleet.id(*i)).collect();
    let job_id = format!("{}-{}", fleet.prefix, now_epoch());
    let mut rollout = Map::new();
    if !args.waves.is_empty() {
        rollout.insert("waves".into(), json!(args.waves));
    }
    if let Some(base) = args.rate_base {
        rollout.insert(
            "rate".into(),
            json!({"basePerMinute": base, "factor": args.rate_factor, "maxPerMinute": args.rate_max}),
        );
    }
    let recorder = Arc::new(Recorder::new(Instant::now()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut tasks = JoinSet::new();
    for (i, conn) in devices {
        // Spread evenly: exactly fail_percent of every hundred devices (37 is coprime to 100).
        let fails = (i * 37) % 100 < args.fail_percent as usize;
        tasks.spawn(run_jobs(
            conn,
            fleet.id(i),
            fails,
            recorder.clone(),
            stop.clone(),
        ));
    }
    let cpu_before = args.server_pid.map(cpu_seconds).transpose()?;
    let started_at = now_epoch();
    let start = Instant::now();
    let (bar, ticker) = progress(&recorder, "devices updated");
    let create = "mutation($id: ID!, $ids: [ID!], $rollout: OtaRollout) { createOtaJob(jobId: $id, targets: {thingIds: $ids}, document: {firmware: {version: \"9.0.0\", url: \"https://fw.example/9.0.0.bin\", sha256: \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\", size: 1048576}}, rollout: $rollout) { targets } }";
    let rollout = (!rollout.is_empty()).then_some(Value::Object(rollout));
    pool.execute(
        create,
        json!({"id": job_id, "ids": ids, "rollout": rollout}),
    )
    .await
    .map_err(|e| e.context("creating the job"))?;
    let created = start.elapsed();
    let watch = "query($id: ID!) { otaJob(jobId: $id) { status counts { succeeded failed timedOut rejected } } }";
    let final_state = loop {
        let job = pool.execute(watch, json!({"id": job_id})).await?;
        let status = job["otaJob"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if status != "IN_PROGRESS" || start.elapsed() > args.timeout {
            break job["otaJob"].clone();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let elapsed = start.elapsed();
    // The job ends when the server accepts the last updates; let the devices read their
    // answers before they stop.
    let ended = ["succeeded", "failed", "timedOut", "rejected"]
        .iter()
        .filter_map(|k| final_state["counts"][k].as_u64())
        .sum::<u64>();
    while recorder.ok.load(std::sync::atomic::Ordering::Relaxed) < ended
        && start.elapsed() < args.timeout
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.notify_waiters();
    ticker.abort();
    bar.finish_and_clear();
    while tasks.join_next().await.is_some() {}
    let mut figures = Map::new();
    figures.insert("job".into(), json!(job_id));
    figures.insert("final_status".into(), final_state["status"].clone());
    figures.insert(
        "succeeded".into(),
        final_state["counts"]["succeeded"].clone(),
    );
    figures.insert("failed".into(), final_state["counts"]["failed"].clone());
    figures.insert(
        "create_job_ms".into(),
        json!((created.as_secs_f64() * 1000.0).round()),
    );
    let updated = recorder.ok.load(std::sync::atomic::Ordering::Relaxed);
    figures.insert(
        "devices_updated_per_minute".into(),
        json!((updated as f64 / elapsed.as_secs_f64() * 60.0).round()),
    );
    if let (Some(before), Some(pid)) = (cpu_before, args.server_pid) {
        let used = cpu_seconds(pid)? - before;
        figures.insert(
            "server_cpu_seconds".into(),
            json!((used * 100.0).round() / 100.0),
        );
        figures.insert(
            "server_cpu_ms_per_execution".into(),
            json!((used * 1000.0 / updated.max(1) as f64 * 100.0).round() / 100.0),
        );
    }
    connect_failures(&failures, &mut figures);
    Ok(report(
        "ota-rollout",
        fleet,
        start,
        started_at,
        &recorder,
        figures,
    ))
}
