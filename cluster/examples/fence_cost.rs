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
//!   row before the acknowledgements (fencing by a lease check per group commit).
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
    Ok(())
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
