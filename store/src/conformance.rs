//! One conformance suite for every [`TwinStore`] backend (feature `test-util`): what the
//! twins and the API rely on, checked the same way for each. A backend runs it with
//! [`conformance_suite!`](crate::conformance_suite), given a function that makes an empty
//! store keeping `history` changes per shadow; a new backend starts by passing it.

use std::sync::Arc;

use twin_model::certificate::{CertificateId, CertificateStatus};
use twin_model::command::CommandExecution;
use twin_model::job::{JobDefinition, JobStatus};
use twin_model::{ChangeOp, Connectivity, DeviceId, Limits, Shadow, ShadowName, UpdateRequest};

use crate::audit::{Action, AuditLog};
use crate::routes::{DeliveryRecord, DeliveryStatus, Destination, OutboxRecord, RouteRecord};
use crate::{CaRecord, CertificateRecord, ThingRecord, TwinSnapshot, TwinStore, Write};
use twin_model::route::EventType;

/// An empty store under test, with what must live as long as it (a directory), and what
/// to do once a check passed (drop a keyspace, so that a test node stays small).
pub struct Backend {
    pub store: Arc<dyn TwinStore>,
    pub keep: Box<dyn std::any::Any>,
    pub cleanup: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

/// Runs every check of the suite as its own test, on stores from `$make(history).await`.
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        mod conformance {
            use super::*;

            async fn backend(history: u64) -> $crate::conformance::Backend {
                ($make)(history).await
            }

            #[tokio::test]
            async fn loads_what_was_committed_and_keeps_bounded_history() {
                let b = backend(3).await;
                $crate::conformance::loads_what_was_committed_and_keeps_bounded_history(&*b.store).await;
                if let Some(cleanup) = b.cleanup {
                    cleanup.await;
                }
            }

            #[tokio::test]
            async fn index_and_deadlines_list_by_partition_and_delete_thing_removes_everything() {
                let b = backend(10).await;
                $crate::conformance::index_and_deadlines_list_by_partition_and_delete_thing_removes_everything(&*b.store).await;
                if let Some(cleanup) = b.cleanup {
                    cleanup.await;
                }
            }

            #[tokio::test]
            async fn commands_list_newest_first_and_go_with_their_thing() {
                let b = backend(10).await;
                $crate::conformance::commands_list_newest_first_and_go_with_their_thing(&*b.store).await;
                if let Some(cleanup) = b.cleanup {
                    cleanup.await;
                }
            }

            #[tokio::test]
            async fn jobs_and_their_executions_persist_and_count() {
                let b = backend(10).await;
                $crate::conformance::jobs_and_their_executions_persist_and_count(&*b.store).await;
                if let Some(cleanup) = b.cleanup {
                    cleanup.await;
                }
            }

            #[tokio::test]
            async fn certificates_persist_change_status_and_list_in_pages() {
                let b = backend(10).await;
                $crate::conformance::certificates_persist_change_status_and_list_in_pages(&*b.store).await;
                if let Some(cleanup) = b.cleanup {
                    cleanup.await;
                }
            }

            #[tokio::test]
            async fn the_audit_log_appends_in_order_and_a_changed_entry_is_found() {
                let b = backend(10).await;
                $crate::conformance::the_audit_log_appends_in_order_and_a_changed_entry_is_found(b.store.clone()).await;
                if let Some(cleanup) = b.cleanup {
                    cleanup.await;
                }
            }

            #[tokio::test]
            async fn telemetry_keeps_latest_values_and_series_and_goes_with_its_thing() {
                let b = backend(10).await;
                $crate::conformance::telemetry_keeps_latest_values_and_series_and_goes_with_its_thing(&*b.store).await;
                if let Some(cleanup) = b.cleanup {
                    cleanup.await;
                }
            }

            #[tokio::test]
            async fn events_keep_commit_order_and_routes_keep_cursors_and_delivery_logs() {
                let b = backend(10).await;
                $crate::conformance::events_keep_commit_order_and_routes_keep_cursors_and_delivery_logs(&*b.store).await;
                if let Some(cleanup) = b.cleanup {
                    cleanup.await;
                }
            }

            #[tokio::test]
            async fn lists_things_in_pages() {
                let b = backend(10).await;
                $crate::conformance::lists_things_in_pages(&*b.store).await;
                if let Some(cleanup) = b.cleanup {
                    cleanup.await;
                }
            }
        }
    };
}

/// The CQL nodes the ScyllaDB store's tests run against: `DOPPEL_SCYLLA_NODES` (a real
/// ScyllaDB, comma-separated `host:port`), or else the local Apache Cassandra node of
/// `tools/cassandra.sh`, started now when it does not answer (and left running;
/// `tools/cassandra.sh stop` stops it). Fails, saying what is missing, when neither works.
pub fn scylla_nodes() -> Vec<String> {
    static NODES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    NODES
        .get_or_init(|| {
            if let Ok(nodes) = std::env::var("DOPPEL_SCYLLA_NODES") {
                return nodes.split(',').map(|n| n.trim().to_owned()).collect();
            }
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/cassandra.sh");
            let started = std::process::Command::new(script).arg("start").status();
            assert!(
                started.as_ref().is_ok_and(|s| s.success()),
                "the ScyllaDB store's tests need a CQL node: {script} start failed ({started:?}); it needs Java 17 and Maven, or set DOPPEL_SCYLLA_NODES"
            );
            vec!["127.0.0.1:9042".into()]
        })
        .clone()
}

/// A keyspace name no other test of this run uses.
pub fn fresh_keyspace() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("t{}_{n}_{nanos}", std::process::id())
}

/// Drops a keyspace a test made (named by [`fresh_keyspace`]).
pub async fn drop_keyspace(keyspace: &str) {
    let config = crate::scylla::ScyllaConfig::single_node(scylla_nodes(), keyspace, 10);
    let store = crate::scylla::ScyllaStore::connect(&config).await.unwrap();
    store
        .session()
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await
        .unwrap();
}

/// A thing id the checks use.
pub fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

/// Applies an update (`body`) to `shadow` and returns its write for thing `t1`.
pub fn change(shadow: &mut Shadow, body: &str, now: u64) -> Write {
    let req = UpdateRequest::parse(body.as_bytes(), &Limits::default()).unwrap();
    let c = shadow.decide_update(&req, now, &Limits::default()).unwrap();
    shadow.apply(&c);
    Write::Shadow {
        thing: id("t1"),
        shadow: ShadowName::classic(),
        state: Arc::new(shadow.clone()),
        change: Arc::new(c),
    }
}

pub fn command(thing: &str, n: u64) -> CommandExecution {
    use twin_model::command::NewCommand;
    CommandExecution::new(
        format!("{n:04}"),
        id(thing),
        NewCommand {
            name: "reboot".into(),
            payload: serde_json::json!({"n": n}),
            timeout_seconds: 10,
            expires_in_seconds: 10,
        },
        n,
    )
    .unwrap()
}

/// Registered things are listed by placement partition, a page at a time, with their
/// presence and shadows; pending deadlines are listed the same way and follow their
/// executions; deleting a thing removes all of it.
pub async fn index_and_deadlines_list_by_partition_and_delete_thing_removes_everything(
    store: &dyn TwinStore,
) {
    let mut shadow = Shadow::default();
    let (record, _) = ThingRecord::new(id("t1"), 1).unwrap();
    // Three more things in the partition of t1, to page through.
    let partition = id("t1").partition();
    let mates: Vec<DeviceId> = (0..)
        .map(|n| id(&format!("m{n}")))
        .filter(|m| m.partition() == partition)
        .take(3)
        .collect();
    let mut writes = vec![
        Write::Thing(record.clone()),
        change(&mut shadow, r#"{"state":{"reported":{"a":1}}}"#, 2),
        Write::Connectivity {
            thing: id("t1"),
            connectivity: Connectivity {
                connected: true,
                since: 3,
                disconnect_reason: None,
            },
        },
        // Pending, so it has a deadline: created at 7, expiring 10 s later.
        Write::Command(Arc::new(command("t1", 7))),
        Write::Command(Arc::new(command("t1", 8))),
    ];
    for m in &mates {
        writes.push(Write::Thing(ThingRecord::new(m.clone(), 1).unwrap().0));
    }
    store.commit(writes).await.unwrap();

    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .index_page(partition, after.as_ref(), 2)
            .await
            .unwrap();
        assert!(page.twins.len() <= 2);
        listed.extend(page.twins);
        after = page.next;
        if after.is_none() {
            break;
        }
    }
    // Each thing once, in an order of the backend's (id order embedded, token order on
    // ScyllaDB).
    let mut expected: Vec<&DeviceId> = mates.iter().chain([&record.id]).collect();
    expected.sort();
    let mut ids: Vec<&DeviceId> = listed.iter().map(|t| &t.record.id).collect();
    ids.sort();
    assert_eq!(ids, expected);
    let t1 = listed.iter().find(|t| t.record.id == record.id).unwrap();
    assert_eq!(t1.record, record);
    assert!(t1.connectivity.connected);
    assert_eq!(t1.shadows, vec![(ShadowName::classic(), shadow.clone())]);
    let other = (partition + 1) % twin_model::PARTITIONS;
    assert!(
        store
            .index_page(other, None, 100)
            .await
            .unwrap()
            .twins
            .iter()
            .all(|t| t.record.id.partition() == other)
    );

    let deadlines = |after: Option<(DeviceId, String)>| async move {
        store
            .pending_deadlines(partition, after.as_ref().map(|(t, i)| (t, i.as_str())), 1)
            .await
            .unwrap()
    };
    let first = deadlines(None).await;
    assert_eq!(
        first
            .iter()
            .map(|d| (d.thing.as_str(), d.at))
            .collect::<Vec<_>>(),
        [("t1", 10_007)]
    );
    let second = deadlines(Some((first[0].thing.clone(), first[0].item.clone()))).await;
    assert_eq!(
        second
            .iter()
            .map(|d| (d.thing.as_str(), d.at))
            .collect::<Vec<_>>(),
        [("t1", 10_008)]
    );
    // An ended command has no deadline left.
    let mut ended = command("t1", 7);
    ended.expire(1_000_000);
    store
        .commit(vec![Write::Command(Arc::new(ended))])
        .await
        .unwrap();
    assert_eq!(
        deadlines(None)
            .await
            .iter()
            .map(|d| d.at)
            .collect::<Vec<_>>(),
        [10_008]
    );

    store
        .commit(vec![Write::DeleteThing(id("t1"))])
        .await
        .unwrap();
    assert!(deadlines(None).await.is_empty());
    assert!(
        store
            .index_page(partition, None, 100)
            .await
            .unwrap()
            .twins
            .iter()
            .all(|t| t.record.id != record.id)
    );
    assert_eq!(
        store.load(&id("t1")).await.unwrap(),
        TwinSnapshot::default()
    );
    assert!(
        store
            .history(&id("t1"), &ShadowName::classic(), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Commands are kept as they are now, listed newest first, found by id, and go with
/// their thing.
pub async fn commands_list_newest_first_and_go_with_their_thing(store: &dyn TwinStore) {
    {
        let mut writes: Vec<Write> = (1..=5)
            .map(|n| Write::Command(Arc::new(command("t1", n))))
            .collect();
        writes.push(Write::Command(Arc::new(command("t10", 9))));
        store.commit(writes).await.unwrap();
        // Command 2 ends; the newer state replaces the older.
        let mut done = command("t1", 2);
        done.expire(1_000_000);
        store
            .commit(vec![Write::Command(Arc::new(done))])
            .await
            .unwrap();
    }
    let ids = |v: Vec<CommandExecution>| -> Vec<String> {
        v.into_iter().map(|c| c.execution_id).collect()
    };
    assert_eq!(
        ids(store.commands(&id("t1"), None, 3).await.unwrap()),
        ["0005", "0004", "0003"]
    );
    assert_eq!(
        ids(store.commands(&id("t1"), Some("0003"), 10).await.unwrap()),
        ["0002", "0001"]
    );
    let pending = store.load(&id("t1")).await.unwrap().pending_commands;
    assert_eq!(ids(pending), ["0001", "0003", "0004", "0005"]);
    let two = store.command("0002").await.unwrap().unwrap();
    assert_eq!(
        (two.thing.as_str(), two.status),
        ("t1", twin_model::command::CommandStatus::TimedOut)
    );
    assert_eq!(
        store.command("0009").await.unwrap().unwrap().thing.as_str(),
        "t10"
    );
    assert_eq!(store.command("nope").await.unwrap(), None);
    store
        .commit(vec![Write::DeleteThing(id("t1"))])
        .await
        .unwrap();
    assert!(
        store
            .commands(&id("t1"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.command("0002").await.unwrap(), None);
    assert_eq!(
        ids(store.commands(&id("t10"), None, 10).await.unwrap()),
        ["0009"]
    );
}

/// Job definitions and executions are kept, paged and counted; a job keeps how a
/// deleted thing's execution ended.
pub async fn jobs_and_their_executions_persist_and_count(store: &dyn TwinStore) {
    use twin_model::job::{JobExecution, RetryPolicy, Timeouts};
    let job = JobDefinition {
        job_id: "fw-2".into(),
        document: serde_json::json!({"firmware": {"version": "2.0"}}),
        retry: RetryPolicy::default(),
        timeouts: Timeouts::default(),
        created_at: 1,
        canceled_at: None,
        rollback_job: None,
        rollout: None,
    };
    let exec = |thing: &str| {
        JobExecution::new(
            "fw-2".into(),
            id(thing),
            RetryPolicy::default(),
            Timeouts::default(),
            1,
        )
    };
    let mut done = exec("t2");
    done.start(None, None, 2).unwrap();
    let succeeded = serde_json::json!({"status": "SUCCEEDED"}).to_string();
    done.update(
        &twin_model::job::ExecutionUpdate::parse(succeeded.as_bytes()).unwrap(),
        3,
    )
    .unwrap();
    store
        .commit(vec![
            Write::Job(Arc::new(job.clone())),
            Write::JobExecution(Arc::new(exec("t1"))),
            Write::JobExecution(Arc::new(done.clone())),
            Write::JobExecution(Arc::new(exec("t3"))),
        ])
        .await
        .unwrap();
    assert_eq!(store.job("fw-2").await.unwrap(), Some(job));
    assert_eq!(store.job("nope").await.unwrap(), None);
    assert_eq!(store.jobs(None, 10).await.unwrap().len(), 1);
    assert!(store.jobs(Some("fw-2"), 10).await.unwrap().is_empty());
    assert_eq!(
        store.job_statuses("fw-2", None, 2).await.unwrap(),
        [
            (id("t1"), JobStatus::Queued),
            (id("t2"), JobStatus::Succeeded)
        ]
    );
    assert_eq!(
        store
            .job_statuses("fw-2", Some(&id("t2")), 2)
            .await
            .unwrap(),
        [(id("t3"), JobStatus::Queued)]
    );
    assert!(
        store
            .job_statuses("fw-", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let counts = store.job_counts("fw-2").await.unwrap();
    assert_eq!(
        (
            counts.get(JobStatus::Queued),
            counts.get(JobStatus::Succeeded),
            counts.total()
        ),
        (2, 1, 3)
    );
    assert_eq!(store.load(&id("t2")).await.unwrap().job_executions, [done]);
    store
        .commit(vec![Write::DeleteThing(id("t2"))])
        .await
        .unwrap();
    assert_eq!(
        all_statuses(store, "fw-2", 2).await,
        [
            (id("t1"), JobStatus::Queued),
            (id("t2"), JobStatus::Succeeded),
            (id("t3"), JobStatus::Queued)
        ],
        "the job keeps how a deleted thing ended"
    );
    assert!(
        store
            .load(&id("t2"))
            .await
            .unwrap()
            .job_executions
            .is_empty()
    );
}

/// Every status of a job, read `page` at a time (in the backend's order), sorted by thing;
/// no page is longer than asked and no thing comes twice.
async fn all_statuses(store: &dyn TwinStore, job: &str, page: usize) -> Vec<(DeviceId, JobStatus)> {
    let mut all: Vec<(DeviceId, JobStatus)> = Vec::new();
    loop {
        let after = all.last().map(|(t, _)| t.clone());
        let next = store.job_statuses(job, after.as_ref(), page).await.unwrap();
        assert!(next.len() <= page);
        if next.is_empty() {
            break;
        }
        all.extend(next);
    }
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup_by(|a, b| a.0 == b.0);
    assert_eq!(sorted.len(), all.len(), "no thing comes twice: {all:?}");
    sorted
}

/// Registered things come a page at a time, each once.
/// A telemetry write keeps the thing's latest values (loaded with the twin and listed
/// with the index) and its numeric points, which a series buckets by time; a point sent
/// again is counted once; pruning drops whole days (a store whose points expire by TTL
/// drops none); deleting the thing removes both.
pub async fn telemetry_keeps_latest_values_and_series_and_goes_with_its_thing(
    store: &dyn TwinStore,
) {
    use twin_model::telemetry::{Latest, Reading, Series};
    const DAY: u64 = 86_400_000;
    let now = crate::now_millis();
    let today = now - now % DAY;
    let yesterday = today - DAY;
    let (record, _) = ThingRecord::new(id("t1"), 1).unwrap();
    let (other, _) = ThingRecord::new(id("t2"), 1).unwrap();
    store
        .commit(vec![Write::Thing(record.clone()), Write::Thing(other)])
        .await
        .unwrap();
    let reading = |at: u64, body: serde_json::Value| {
        let mut map = body.as_object().unwrap().clone();
        map.insert("timestamp".into(), at.into());
        Reading::parse(
            serde_json::Value::Object(map).to_string().as_bytes(),
            now,
            8,
        )
        .unwrap()
    };
    let write = |thing: &str, latest: &Latest, reading: &Reading| Write::Telemetry {
        thing: id(thing),
        latest: Arc::new(latest.clone()),
        points: reading
            .numbers()
            .map(|(key, value)| crate::Point {
                key: key.into(),
                at: reading.at,
                value,
            })
            .collect(),
    };
    let first = reading(
        yesterday + 1000,
        serde_json::json!({"temp": 20, "gps": {"lat": 48.1}}),
    );
    let second = reading(
        today + 2000,
        serde_json::json!({"temp": 30.5, "mode": "eco"}),
    );
    let latest1 = Latest::default().with(&first).unwrap();
    let latest2 = latest1.with(&second).unwrap();
    store
        .commit(vec![write("t1", &latest1, &first)])
        .await
        .unwrap();
    // The second reading twice, as a device resends it: counted once.
    for _ in 0..2 {
        store
            .commit(vec![
                write("t1", &latest2, &second),
                write("t2", &latest1, &first),
            ])
            .await
            .unwrap();
    }

    let loaded = store.load(&id("t1")).await.unwrap();
    assert_eq!(loaded.telemetry, latest2);
    let keys: Vec<&str> = loaded.telemetry.keys().collect();
    assert_eq!(keys, ["gps.lat", "mode", "temp"]);
    let page = store
        .index_page(record.id.partition(), None, 1000)
        .await
        .unwrap();
    let listed = page
        .twins
        .iter()
        .find(|t| t.record.id == record.id)
        .unwrap();
    assert_eq!(listed.telemetry, latest2);

    let series = |key: &'static str, since: u64| async move {
        store
            .telemetry_series(
                &id("t1"),
                key,
                Series::new(since, today + DAY, DAY).unwrap(),
            )
            .await
            .unwrap()
            .buckets()
    };
    let days = series("temp", yesterday).await;
    assert_eq!(days.len(), 2);
    assert_eq!(
        (days[0].start, days[0].count, days[0].max),
        (yesterday, 1, 20.0)
    );
    assert_eq!(
        (days[1].start, days[1].count, days[1].max),
        (today, 1, 30.5)
    );
    let hours = store
        .telemetry_series(
            &id("t1"),
            "temp",
            Series::new(today, today + 3_600_000, 1000).unwrap(),
        )
        .await
        .unwrap()
        .buckets();
    assert_eq!(
        hours[2].count, 1,
        "the reading at today + 2 s is in its second"
    );
    assert_eq!(hours.iter().map(|b| b.count).sum::<u64>(), 1);
    assert_eq!(series("gps.lat", yesterday).await[0].count, 1);
    // Strings are latest values only, not points.
    assert_eq!(series("mode", yesterday).await[1].count, 0);

    let pruned = store.prune_telemetry(today).await.unwrap();
    let left = series("temp", yesterday).await;
    if pruned > 0 {
        assert_eq!(
            (left[0].count, left[1].count),
            (0, 1),
            "yesterday is pruned"
        );
    } else {
        assert_eq!(
            (left[0].count, left[1].count),
            (1, 1),
            "points expire by TTL"
        );
    }

    store
        .commit(vec![Write::DeleteThing(id("t1"))])
        .await
        .unwrap();
    assert!(store.load(&id("t1")).await.unwrap().telemetry.is_empty());
    assert!(series("temp", yesterday).await.iter().all(|b| b.count == 0));
    assert_eq!(
        store.load(&id("t2")).await.unwrap().telemetry,
        latest1,
        "another thing keeps its telemetry"
    );
}

pub async fn lists_things_in_pages(store: &dyn TwinStore) {
    let names = ["c", "a", "b", "d", "e"];
    let writes: Vec<Write> = names
        .iter()
        .map(|n| {
            Write::Thing(ThingRecord {
                id: id(n),
                secret_hash: String::new(),
                enabled: true,
                created_at: 0,
                attributes: Default::default(),
                certificates: Vec::new(),
            })
        })
        .collect();
    store.commit(writes).await.unwrap();
    let mut seen: Vec<String> = Vec::new();
    let mut after: Option<DeviceId> = None;
    loop {
        let page = store.things(after.as_ref(), 2).await.unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        seen.extend(page.into_iter().map(|r| r.id.to_string()));
    }
    let count = seen.len();
    seen.sort();
    seen.dedup();
    assert_eq!(count, seen.len(), "each thing once");
    assert_eq!(seen, ["a", "b", "c", "d", "e"]);
}

/// Audit entries append with consecutive numbers, read back in order a page at a time,
/// and the chain verifies; an entry changed in the store is named by `verify`.
pub async fn the_audit_log_appends_in_order_and_a_changed_entry_is_found(
    store: Arc<dyn TwinStore>,
) {
    assert_eq!(store.last_audit().await.unwrap(), None);
    let log = AuditLog::new(store.clone());
    for n in 0..5 {
        let entry = log
            .append(Action {
                actor: "cli".into(),
                action: "device add".into(),
                arguments: serde_json::json!({"id": format!("t{n}")}),
                outcome: "ok".into(),
                at: n,
            })
            .await
            .unwrap();
        assert_eq!(entry.seq, n + 1);
    }
    // A second writer (a restart) continues the chain.
    let again = AuditLog::new(store.clone());
    let sixth = again
        .append(Action {
            actor: "token:abc".into(),
            action: "registerThing".into(),
            arguments: serde_json::json!({"id": "t5"}),
            outcome: "ok".into(),
            at: 5,
        })
        .await
        .unwrap();
    assert_eq!(sixth.seq, 6);
    assert_eq!(store.last_audit().await.unwrap(), Some(sixth.clone()));
    // The first writer's head is stale: its next entry goes after the sixth, not over it.
    let seventh = log
        .append(Action {
            actor: "cli".into(),
            action: "device add".into(),
            arguments: serde_json::json!({"id": "t6"}),
            outcome: "ok".into(),
            at: 6,
        })
        .await
        .unwrap();
    assert_eq!((seventh.seq, &seventh.prev_hash), (7, &sixth.hash));
    assert!(
        !store.append_audit(&sixth).await.unwrap(),
        "a taken seq is not overwritten"
    );
    let page = store.audit_entries(Some(2), 3).await.unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(crate::audit::verify(&*store).await.unwrap(), Ok(7));

    let mut forged = store.audit_entries(Some(3), 1).await.unwrap().remove(0);
    forged.arguments = serde_json::json!({"id": "someone-else"});
    store.put_audit(&forged).await.unwrap();
    let broken = crate::audit::verify(&*store).await.unwrap().unwrap_err();
    assert_eq!(broken.seq, 4, "{broken}");
}

/// A certificate reads back as written, a new status replaces the old, and the listing
/// pages through every certificate once; a thing's record keeps its attachments; a CA
/// record reads back, replaced by its newer version.
pub async fn certificates_persist_change_status_and_list_in_pages(store: &dyn TwinStore) {
    let cert = |n: u8| CertificateRecord {
        id: CertificateId::from_digest(&[n; 32]),
        pem: format!("pem {n}"),
        status: CertificateStatus::Active,
        created_at: u64::from(n),
        updated_at: u64::from(n),
        not_after: 1_000_000,
        provisioning_template: None,
    };
    assert_eq!(store.certificate(&cert(1).id).await.unwrap(), None);
    for n in [3, 1, 2, 5, 4] {
        store.put_certificate(&cert(n)).await.unwrap();
    }
    assert_eq!(store.certificate(&cert(1).id).await.unwrap(), Some(cert(1)));
    let revoked = CertificateRecord {
        status: CertificateStatus::Revoked,
        updated_at: 9,
        ..cert(2)
    };
    store.put_certificate(&revoked).await.unwrap();
    assert_eq!(store.certificate(&revoked.id).await.unwrap(), Some(revoked));

    let mut seen = Vec::new();
    let mut after: Option<CertificateId> = None;
    loop {
        let page = store.certificates(after.as_ref(), 2).await.unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        seen.extend(page.into_iter().map(|c| c.created_at));
    }
    seen.sort_unstable();
    assert_eq!(seen, [1, 2, 3, 4, 5], "each certificate once");

    let record = ThingRecord {
        id: id("holder"),
        secret_hash: String::new(),
        enabled: true,
        created_at: 0,
        attributes: Default::default(),
        certificates: vec![cert(1).id, cert(3).id],
    };
    store
        .commit(vec![Write::Thing(record.clone())])
        .await
        .unwrap();
    assert_eq!(store.thing(&id("holder")).await.unwrap(), Some(record));

    assert_eq!(store.ca_certificates().await.unwrap(), []);
    let ca = CaRecord {
        id: CertificateId::from_digest(&[9; 32]),
        pem: "ca pem".into(),
        status: CertificateStatus::Active,
        auto_registration: true,
        created_at: 1,
        updated_at: 1,
    };
    store.put_ca_certificate(&ca).await.unwrap();
    let off = CaRecord {
        auto_registration: false,
        updated_at: 2,
        ..ca
    };
    store.put_ca_certificate(&off).await.unwrap();
    assert_eq!(store.ca_certificates().await.unwrap(), [off]);

    assert_eq!(store.templates().await.unwrap(), []);
    let template = twin_model::provisioning::ProvisioningTemplate {
        name: "lamps".into(),
        thing_name: "lamp-{{Serial}}".into(),
        attributes: Default::default(),
        pre_provisioning_check: None,
        device_configuration: Default::default(),
        enabled: true,
    };
    store.put_template(&template).await.unwrap();
    let claim = CertificateRecord {
        provisioning_template: Some("lamps".into()),
        ..cert(7)
    };
    store.put_certificate(&claim).await.unwrap();
    assert_eq!(store.certificate(&claim.id).await.unwrap(), Some(claim));
    assert_eq!(store.templates().await.unwrap(), [template]);
}

/// A twin loads as it was committed, and each shadow keeps its newest changes (the
/// store was made to keep 3): a delete keeps its version and takes its own slot.
pub async fn loads_what_was_committed_and_keeps_bounded_history(store: &dyn TwinStore) {
    let mut shadow = Shadow::default();
    {
        let record = ThingRecord {
            id: id("t1"),
            secret_hash: "h".into(),
            enabled: true,
            created_at: 1,
            attributes: Default::default(),
            certificates: Vec::new(),
        };
        store.commit(vec![Write::Thing(record)]).await.unwrap();
        for i in 0..5 {
            let w = change(
                &mut shadow,
                &format!(r#"{{"state":{{"reported":{{"n":{i}}}}}}}"#),
                10 + i,
            );
            store.commit(vec![w]).await.unwrap();
        }
        store
            .commit(vec![Write::Connectivity {
                thing: id("t1"),
                connectivity: Connectivity {
                    connected: true,
                    since: 5,
                    disconnect_reason: None,
                },
            }])
            .await
            .unwrap();
    }
    let snap = store.load(&id("t1")).await.unwrap();
    assert_eq!(snap.shadows, vec![(ShadowName::classic(), shadow.clone())]);
    assert!(snap.connectivity.connected);
    assert!(snap.record.unwrap().enabled);
    let history = store
        .history(&id("t1"), &ShadowName::classic(), None, 10)
        .await
        .unwrap();
    let versions: Vec<u64> = history.iter().map(|e| e.change.version).collect();
    assert_eq!(versions, vec![5, 4, 3], "newest first");
    // Each change is kept with the shadow it produced (what time travel answers).
    assert_eq!(history[0].shadow.as_ref(), Some(&shadow));
    let third = history[2].shadow.as_ref().unwrap();
    assert_eq!(third.version, 3);
    assert_eq!(third.reported.as_ref().unwrap()["n"], 2);
    // Paging: the changes before the 4th, at most one.
    let page = store
        .history(
            &id("t1"),
            &ShadowName::classic(),
            Some(history[1].position()),
            1,
        )
        .await
        .unwrap();
    assert_eq!(page, history[2..]);

    // A delete keeps the version and takes its own slot: the update it follows stays.
    let del = shadow.decide_delete("t1", None, 20).unwrap();
    shadow.apply(&del);
    store
        .commit(vec![Write::Shadow {
            thing: id("t1"),
            shadow: ShadowName::classic(),
            state: Arc::new(shadow.clone()),
            change: Arc::new(del),
        }])
        .await
        .unwrap();
    let ops: Vec<(u64, bool)> = store
        .history(&id("t1"), &ShadowName::classic(), None, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| (e.change.version, matches!(e.change.op, ChangeOp::Delete)))
        .collect();
    assert_eq!(ops, vec![(5, true), (5, false), (4, false)]);
    assert_eq!(
        store.load(&id("nobody")).await.unwrap(),
        TwinSnapshot::default()
    );
}

/// An event for a route, as a twin writes it.
pub fn event(thing: &str, seq: u64, at: u64, routes: &[&str]) -> Write {
    Write::Event(Arc::new(OutboxRecord {
        thing: id(thing),
        seq,
        kind: EventType::ShadowChanged,
        at,
        data: serde_json::json!({"n": seq}),
        routes: routes.iter().map(|r| r.to_string()).collect(),
    }))
}

/// A route to a webhook, as `createRoute` writes it.
pub fn route(id: &str) -> RouteRecord {
    RouteRecord {
        id: id.into(),
        name: id.into(),
        events: vec![EventType::ShadowChanged],
        filter: None,
        destination: Destination::Webhook {
            url: "https://example.com/".into(),
            timeout_secs: 15,
        },
        secrets: Vec::new(),
        paused: false,
        disabled: None,
        start: 0,
        replay: None,
        created_at: 1,
        updated_at: 1,
    }
}

/// A delivered attempt of the event at `position`, ended at `at`.
pub fn delivery(route: &str, position: u64, at: u64) -> DeliveryRecord {
    DeliveryRecord {
        route: route.into(),
        position,
        thing: id("t1"),
        seq: position,
        kind: EventType::ShadowChanged,
        attempt: 1,
        at,
        status: DeliveryStatus::Delivered,
        http_status: Some(204),
        error: None,
        latency_ms: 3,
        response: None,
    }
}

/// Events get outbox positions in commit order, with each thing's number kept past its
/// deletion; routes keep their cursor and a delivery log read newest first, in pages,
/// across days; deleting a route removes its cursor and log and no other route's.
pub async fn events_keep_commit_order_and_routes_keep_cursors_and_delivery_logs(
    store: &dyn TwinStore,
) {
    assert_eq!(store.outbox_end().await.unwrap(), 0);
    let (record, _) = ThingRecord::new(id("t1"), 1).unwrap();
    store
        .commit(vec![Write::Thing(record), event("t1", 1, 10, &["r"])])
        .await
        .unwrap();
    store
        .commit(vec![event("t2", 1, 11, &["r"]), event("t1", 2, 12, &["r"])])
        .await
        .unwrap();
    assert_eq!(store.outbox_end().await.unwrap(), 3);
    store
        .commit(vec![Write::DeleteThing(id("t1"))])
        .await
        .unwrap();
    // A thing's number outlives it; a thing without events has none.
    assert_eq!(store.load(&id("t1")).await.unwrap().event_seq, 2);
    assert_eq!(store.load(&id("t1")).await.unwrap().record, None);
    assert_eq!(store.load(&id("t2")).await.unwrap().event_seq, 1);
    assert_eq!(store.load(&id("t3")).await.unwrap().event_seq, 0);
    // Deleted with the event that says so: the number is the event's.
    store
        .commit(vec![
            Write::DeleteThing(id("t2")),
            event("t2", 2, 13, &["r"]),
        ])
        .await
        .unwrap();
    assert_eq!(store.load(&id("t2")).await.unwrap().event_seq, 2);
    let all = store.outbox(0, 10).await.unwrap();
    let order: Vec<(u64, &str, u64)> = all
        .iter()
        .map(|(p, e)| (*p, e.thing.as_str(), e.seq))
        .collect();
    assert_eq!(
        order,
        [(1, "t1", 1), (2, "t2", 1), (3, "t1", 2), (4, "t2", 2)]
    );
    assert_eq!(
        all[0].1,
        match event("t1", 1, 10, &["r"]) {
            Write::Event(e) => (*e).clone(),
            _ => unreachable!(),
        }
    );
    let page: Vec<u64> = store
        .outbox(1, 2)
        .await
        .unwrap()
        .iter()
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(page, [2, 3]);
    assert!(store.outbox(4, 10).await.unwrap().is_empty());

    store.put_route(&route("a")).await.unwrap();
    store.put_route(&route("b")).await.unwrap();
    let mut changed = route("b");
    changed.paused = true;
    store.put_route(&changed).await.unwrap();
    let mut routes = store.routes().await.unwrap();
    routes.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(routes, [route("a"), changed]);
    assert_eq!(store.cursor("a").await.unwrap(), None);
    store.put_cursor("a", 7).await.unwrap();
    store.put_cursor("a", 9).await.unwrap();
    assert_eq!(store.cursor("a").await.unwrap(), Some(9));
    // Yesterday's attempt and today's: a page can span days.
    let now = crate::now_millis();
    let ats = [now - 86_400_000 - 5, now - 2000, now - 1000];
    for (i, at) in ats.into_iter().enumerate() {
        store
            .put_deliveries(&[delivery("a", i as u64 + 1, at)])
            .await
            .unwrap();
    }
    store
        .put_deliveries(&[delivery("b", 9, now - 1500)])
        .await
        .unwrap();
    let newest: Vec<u64> = store
        .deliveries("a", None, 2)
        .await
        .unwrap()
        .iter()
        .map(|d| d.at)
        .collect();
    assert_eq!(newest, [ats[2], ats[1]]);
    let next = store
        .deliveries("a", Some(delivery("a", 2, ats[1]).key()), 5)
        .await
        .unwrap();
    assert_eq!(next, [delivery("a", 1, ats[0])]);
    assert_eq!(store.deliveries("b", None, 5).await.unwrap().len(), 1);

    store.delete_route("a").await.unwrap();
    assert_eq!(store.cursor("a").await.unwrap(), None);
    assert!(store.deliveries("a", None, 5).await.unwrap().is_empty());
    let left: Vec<String> = store
        .routes()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(left, ["b"]);
    assert_eq!(store.deliveries("b", None, 5).await.unwrap().len(), 1);
}
