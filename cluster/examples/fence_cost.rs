//! What fencing a twin's writes costs on ScyllaDB / Cassandra, two ways, back to back, in
//! a keyspace of its own that it drops at the end:
//!
//! - `plain`: a twin's commit as today, an unlogged single-partition batch (its shadow
//!   and history rows), from independent writers;
//! - `lwt`: the same batch made conditional on the twin's fence row (`IF value =
//!   <epoch>`): a lightweight transaction per twin commit;
//! - `group`: writers' batches committed in groups (as Doppel's group commit does: the
//!   group's twin batches in parallel, then the acknowledgements);
//! - `group+check`: the same groups, each followed by one SERIAL read of the node's lease
//!   row before the acknowledgements (fencing by a lease check per group commit);
//! - `store` and `store+fence`: Doppel's own `ScyllaStore::commit` of a shadow update
//!   (its shadow and history rows, a 13-key shadow), without and with fences.
//!
//! `cargo run --release -p twin-cluster --example fence_cost -- [NODE] [SECONDS] [CONCURRENCY]`
//! (defaults: 127.0.0.1:9042, 10, 64). Figures: load-tests/RESULTS.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::Consistency;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use twin_model::{DeviceId, Limits, Shadow, ShadowName, UpdateRequest};
use twin_store::scylla::{Fences, ScyllaConfig, ScyllaStore};
use twin_store::{TwinStateStore, Write};

const TWINS: usize = 1000;
const EPOCH: &str = "00000000000000000001";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    Lwt,
    Group,
    GroupChecked,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Lwt => "lwt",
            Mode::Group => "group",
            Mode::GroupChecked => "group+check",
        }
    }
}

#[derive(Clone)]
struct Statements {
    put: PreparedStatement,
    check: PreparedStatement,
    lease: PreparedStatement,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let node = args.next().unwrap_or_else(|| "127.0.0.1:9042".into());
    let seconds: u64 = args.next().map_or(Ok(10), |s| s.parse())?;
    let concurrency: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let session = Arc::new(SessionBuilder::new().known_node(&node).build().await?);
    let ks = format!("fence_cost_{}", std::process::id());
    session.query_unpaged(format!("CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 1}}"), ()).await?;
    session.query_unpaged(format!("CREATE TABLE {ks}.twin (thing text, kind text, key text, value text, PRIMARY KEY (thing, kind, key))"), ()).await?;
    session
        .query_unpaged(
            format!("CREATE TABLE {ks}.leases (node text PRIMARY KEY, generation bigint)"),
            (),
        )
        .await?;
    session
        .query_unpaged(
            format!("INSERT INTO {ks}.leases (node, generation) VALUES ('n1', 1) IF NOT EXISTS"),
            (),
        )
        .await?;
    let fence = session
        .prepare(format!(
            "INSERT INTO {ks}.twin (thing, kind, key, value) VALUES (?, 'fence', '', ?)"
        ))
        .await?;
    for t in 0..TWINS {
        session
            .execute_unpaged(&fence, (format!("thing-{t}"), EPOCH))
            .await?;
    }
    let mut lease = session
        .prepare(format!(
            "SELECT generation FROM {ks}.leases WHERE node = 'n1'"
        ))
        .await?;
    lease.set_consistency(Consistency::Serial);
    let st = Statements {
        put: session
            .prepare(format!("INSERT INTO {ks}.twin (thing, kind, key, value) VALUES (?, ?, ?, ?)"))
            .await?,
        check: session
            .prepare(format!("UPDATE {ks}.twin SET value = ? WHERE thing = ? AND kind = 'fence' AND key = '' IF value = ?"))
            .await?,
        lease,
    };
    println!("{node}, {TWINS} twins, {concurrency} writers, {seconds} s a run");
    println!("mode          commits/s     p50 ms   p99 ms   p99.9 ms");
    let modes = [Mode::Plain, Mode::Lwt, Mode::Group, Mode::GroupChecked];
    for mode in modes.iter().chain(&modes) {
        let (rate, h) = run(
            &session,
            &st,
            *mode,
            concurrency,
            Duration::from_secs(seconds),
        )
        .await?;
        println!(
            "{:<13} {rate:>9.0} {:>10.2} {:>8.2} {:>10.2}",
            mode.name(),
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.value_at_quantile(0.999) as f64 / 1000.0,
        );
    }
    session
        .query_unpaged(format!("DROP KEYSPACE {ks}"), ())
        .await?;
    for fenced in [false, true, false, true] {
        let (rate, h) =
            through_store(&node, fenced, concurrency, Duration::from_secs(seconds)).await?;
        println!(
            "{:<13} {rate:>9.0} {:>10.2} {:>8.2} {:>10.2}",
            if fenced { "store+fence" } else { "store" },
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.value_at_quantile(0.999) as f64 / 1000.0,
        );
    }
    Ok(())
}

/// Holds every shard at epoch 1.
struct AllShards;

impl Fences for AllShards {
    fn epoch(&self, _: u16) -> Option<u64> {
        Some(1)
    }
}

/// Shadow updates through `ScyllaStore::commit`, each writer updating its own twins in
/// turn, in a keyspace of its own.
async fn through_store(
    node: &str,
    fenced: bool,
    concurrency: usize,
    length: Duration,
) -> Result<(f64, Histogram<u64>), Box<dyn std::error::Error>> {
    let ks = format!("fence_cost_store_{}", std::process::id());
    let config = ScyllaConfig::single_node(vec![node.to_owned()], &ks, 10);
    let store = Arc::new(ScyllaStore::connect(&config).await?);
    if fenced {
        store.fence_with(Arc::new(AllShards))?;
    }
    let things: Vec<DeviceId> = (0..TWINS)
        .map(|t| DeviceId::parse(&format!("thing-{t}")).expect("an id"))
        .collect();
    // Loading raises each twin's fence, as a twin's activation does.
    for thing in &things {
        store.load(thing).await?;
    }
    let keys: String = (0..12).map(|k| format!("\"key{k}\":{k}.5,")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let writers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (store, stop, keys) = (store.clone(), stop.clone(), keys.clone());
            let mut mine: Vec<(DeviceId, Shadow)> = things
                .iter()
                .skip(w)
                .step_by(concurrency)
                .map(|t| (t.clone(), Shadow::default()))
                .collect();
            tokio::spawn(async move {
                let limits = Limits::default();
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) && !mine.is_empty() {
                    let len = mine.len();
                    let (thing, shadow) = &mut mine[n % len];
                    n += 1;
                    let body = format!(r#"{{"state":{{"reported":{{{keys}"n":{n}}}}}}}"#);
                    let req = UpdateRequest::parse(body.as_bytes(), &limits).expect("an update");
                    let (change, next) = shadow.update(&req, 1, &limits).expect("accepted");
                    *shadow = next;
                    let began = Instant::now();
                    store
                        .commit(vec![Write::Shadow {
                            thing: thing.clone(),
                            shadow: ShadowName::classic(),
                            state: Arc::new(shadow.clone()),
                            change: Arc::new(change),
                        }])
                        .await
                        .expect("a commit");
                    h.record(began.elapsed().as_micros() as u64)
                        .expect("in range");
                }
                h
            })
        })
        .collect();
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new(3)?;
    for w in writers {
        all.add(w.await?)?;
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    store
        .session()
        .query_unpaged(format!("DROP KEYSPACE {ks}"), ())
        .await?;
    Ok((rate, all))
}

/// One twin commit of `thing` at `version`; `true` when it was applied.
async fn commit(
    session: &Session,
    st: &Statements,
    lwt: bool,
    thing: String,
    version: u64,
) -> bool {
    let body = format!(
        "{{\"state\":{{\"reported\":{{\"temp\":21.5,\"pad\":\"{}\"}}}}}}",
        "x".repeat(512)
    );
    let mut batch = Batch::new(BatchType::Unlogged);
    batch.set_consistency(Consistency::LocalQuorum);
    batch.append_statement(st.put.clone());
    batch.append_statement(st.put.clone());
    let rows = (
        (thing.clone(), "shadow", "", body.clone()),
        (thing.clone(), "history", format!("{version:020}"), body),
    );
    if lwt {
        batch.append_statement(st.check.clone());
        let result = session
            .batch(&batch, (rows.0, rows.1, (EPOCH, thing, EPOCH)))
            .await
            .expect("a write");
        let rows = result.into_rows_result().expect("rows");
        let first = rows.rows::<scylla::value::Row>().expect("rows").next();
        first.and_then(|r| r.ok()?.columns.first().cloned().flatten()?.as_boolean()) == Some(true)
    } else {
        session.batch(&batch, rows).await.expect("a write");
        true
    }
}

async fn run(
    session: &Arc<Session>,
    st: &Statements,
    mode: Mode,
    concurrency: usize,
    length: Duration,
) -> Result<(f64, Histogram<u64>), Box<dyn std::error::Error>> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut all = Histogram::<u64>::new(3)?;
    if matches!(mode, Mode::Group | Mode::GroupChecked) {
        let mut version = 0u64;
        while started.elapsed() < length {
            version += 1;
            let began = Instant::now();
            let group: Vec<_> = (0..concurrency)
                .map(|w| {
                    let (session, st) = (session.clone(), st.clone());
                    let thing = format!("thing-{}", (version as usize * concurrency + w) % TWINS);
                    tokio::spawn(async move { commit(&session, &st, false, thing, version).await })
                })
                .collect();
            for w in group {
                w.await?;
            }
            if mode == Mode::GroupChecked {
                session.execute_unpaged(&st.lease, ()).await?;
            }
            all.record_n(began.elapsed().as_micros() as u64, concurrency as u64)?;
        }
    } else {
        let writers: Vec<_> = (0..concurrency)
            .map(|w| {
                let (session, st, stop) = (session.clone(), st.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut h = Histogram::<u64>::new(3).expect("histogram");
                    let (mut version, mut n) = (0u64, w);
                    while !stop.load(Ordering::Relaxed) {
                        let thing = format!("thing-{}", n % TWINS);
                        n += concurrency;
                        version += 1;
                        let began = Instant::now();
                        assert!(
                            commit(&session, &st, mode == Mode::Lwt, thing, version).await,
                            "a fenced write was refused"
                        );
                        h.record(began.elapsed().as_micros() as u64)
                            .expect("in range");
                    }
                    h
                })
            })
            .collect();
        tokio::time::sleep(length).await;
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            all.add(w.await?)?;
        }
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    Ok((rate, all))
}
