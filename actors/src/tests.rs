//! Actor tests, through `FleetHandle` only.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use twin_model::history::Origin;
use twin_model::{ChangeOp, DeviceId, Limits, RejectionKind, ShadowName, TwinEvent, UpdateRequest};
use twin_store::testing::GatedStore;
use twin_store::{Committer, EmbeddedStore, StoreError, TwinStore};

use twin_model::command::{
    CommandError, CommandExecution, CommandStatus, DeviceResponse, NewCommand,
};
use twin_model::job::{
    JobDefinition, JobErrorCode, JobExecution, JobStatus, RetryPolicy, Timeouts,
};
use twin_model::rollout::{Pace, Rollout};
use twin_model::topic::JobOp;

use crate::{Change, Clock, FleetConfig, FleetError, FleetHandle, RegistryOp};

mod commands;
mod creation;
mod jobs;
mod routes;

use commands::{command_of, new_command};

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn reported(n: i64) -> UpdateRequest {
    UpdateRequest::parse(
        json!({"state": {"reported": {"n": n}}})
            .to_string()
            .as_bytes(),
        &Limits::default(),
    )
    .unwrap()
}

struct Fleet {
    fleet: FleetHandle,
    _dir: tempfile::TempDir,
}

/// A fleet over the store in `dir`, with the task that commits for it.
async fn fleet_in(
    dir: &std::path::Path,
    config: &FleetConfig,
) -> (FleetHandle, tokio::task::JoinHandle<()>) {
    let store: Arc<dyn TwinStore> = Arc::new(EmbeddedStore::open(dir, 100).unwrap());
    let (committer, commits) = Committer::start(store, 1024, 1024);
    let fleet = FleetHandle::start(config.clone(), committer).await.unwrap();
    (fleet, commits)
}

/// Stops a fleet like a server does; the store is closed when this returns.
async fn stop(fleet: FleetHandle, commits: tokio::task::JoinHandle<()>) {
    fleet.shutdown().await;
    drop(fleet);
    // The commit loop ends with the last handle, releasing the store.
    commits.await.unwrap();
}

async fn fleet(config: FleetConfig) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _) = fleet_in(dir.path(), &config).await;
    Fleet { fleet, _dir: dir }
}

async fn registered(f: &FleetHandle, names: &[&str]) {
    for n in names {
        f.registry()
            .register(&id(n), Default::default())
            .await
            .unwrap();
    }
}

async fn n_of(f: &FleetHandle, thing: &str) -> (u64, serde_json::Value) {
    let s = f
        .shadows()
        .get(&id(thing), ShadowName::classic())
        .await
        .unwrap();
    (
        s.version,
        serde_json::Value::Object(s.reported.clone().unwrap())["n"].clone(),
    )
}

#[tokio::test]
async fn updates_need_a_registered_thing_and_are_answered_in_mailbox_order() {
    let f = fleet(FleetConfig::default()).await;
    let err = f
        .fleet
        .shadows()
        .update(
            &id("ghost"),
            ShadowName::classic(),
            reported(1),
            Origin::Device,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RejectionKind::NotFound);

    registered(&f.fleet, &["t1"]).await;
    // Send 100 updates before awaiting any: versions follow the order of sending.
    let replies: Vec<_> = (0..100)
        .map(|i| {
            f.fleet.shadows().update(
                &id("t1"),
                ShadowName::classic(),
                reported(i),
                Origin::Device,
            )
        })
        .collect();
    for (i, reply) in replies.into_iter().enumerate() {
        let change = reply.await.unwrap();
        assert_eq!(change.version, i as u64 + 1);
    }
    assert_eq!(n_of(&f.fleet, "t1").await, (100, json!(99)));
    let err = f
        .fleet
        .shadows()
        .get(&id("t1"), ShadowName::named("other").unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_rejection().message,
        "No shadow exists with name: 'other'"
    );
}

#[tokio::test]
async fn least_recently_used_twins_are_passivated_and_reload_their_state() {
    let f = fleet(FleetConfig {
        shards: 1,
        max_resident_twins: 2,
        ..FleetConfig::default()
    })
    .await;
    registered(&f.fleet, &["a", "b", "c"]).await;
    assert_eq!(
        f.fleet.resident_twins().await,
        2,
        "registering three things keeps only two resident"
    );
    for (i, t) in ["a", "b", "c"].iter().enumerate() {
        f.fleet
            .shadows()
            .update(
                &id(t),
                ShadowName::classic(),
                reported(i as i64),
                Origin::Device,
            )
            .await
            .unwrap();
    }
    assert_eq!(f.fleet.resident_twins().await, 2);
    // "a" was passivated; it comes back with its persisted state and can go on.
    assert_eq!(n_of(&f.fleet, "a").await, (1, json!(0)));
    let change = f
        .fleet
        .shadows()
        .update(&id("a"), ShadowName::classic(), reported(7), Origin::Device)
        .await
        .unwrap();
    assert_eq!(change.version, 2);
    assert_eq!(f.fleet.resident_twins().await, 2);
    assert_eq!(n_of(&f.fleet, "b").await, (1, json!(1)));
}

#[tokio::test]
async fn idle_twins_are_passivated() {
    let idle = Duration::from_secs(60);
    let f = fleet(FleetConfig {
        shards: 2,
        idle_timeout: idle,
        ..FleetConfig::default()
    })
    .await;
    registered(&f.fleet, &["x", "y"]).await;
    f.fleet
        .shadows()
        .update(&id("x"), ShadowName::classic(), reported(5), Origin::Device)
        .await
        .unwrap();
    assert_eq!(f.fleet.resident_twins().await, 2);

    // Paused time, stepped by the tick period (idle / 4): every shard sees several ticks
    // after the twins have been idle for `idle`.
    tokio::time::pause();
    for _ in 0..8 {
        tokio::time::advance(idle / 4).await;
        tokio::task::yield_now().await;
    }
    assert_eq!(f.fleet.resident_twins().await, 0);
    tokio::time::resume();

    assert_eq!(n_of(&f.fleet, "x").await, (1, json!(5)));
    assert_eq!(f.fleet.resident_twins().await, 1);
}

#[tokio::test(start_paused = true)]
async fn a_twin_that_panics_restarts_from_its_persisted_state() {
    let f = fleet(on_tokio_time()).await;
    registered(&f.fleet, &["p"]).await;
    f.fleet
        .shadows()
        .update(&id("p"), ShadowName::classic(), reported(3), Origin::Device)
        .await
        .unwrap();
    // An undelivered command that expires in a minute: its timer lives in the twin.
    let command = f
        .fleet
        .commands()
        .send(&id("p"), new_command(30, 60))
        .await
        .unwrap();
    let mut events = f.fleet.queries().subscribe();
    f.fleet.crash(&id("p"));
    // Nothing asks for the twin again: its supervisor takes its persisted deadline, and
    // the restarted twin expires the command on time (well before the twin would have
    // been passivated, at ten minutes).
    let expired = next_event(&mut events, 5 * MINUTE, |e| {
        command_of(e).filter(|c| c.status.is_terminal())
    })
    .await
    .expect("the command expires after the panic");
    assert_eq!(expired.execution_id, command.execution_id);
    assert_eq!(expired.reason.as_ref().unwrap().reason_code, "EXPIRED");
    let late = expired.completed_at.unwrap() - command.created_at;
    assert!(
        (60_000..=90_000).contains(&late),
        "expired {late} ms after it was sent: within one shard tick of the minute"
    );
    // The state it had persisted is there, and it goes on from it.
    assert_eq!(n_of(&f.fleet, "p").await, (1, json!(3)));
    let change = f
        .fleet
        .shadows()
        .update(&id("p"), ShadowName::classic(), reported(4), Origin::Device)
        .await
        .unwrap();
    assert_eq!(change.version, 2);
}

/// Opens a gated store's gate when dropped.
struct OpenOnDrop(Arc<GatedStore>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.released.store(true, Ordering::SeqCst);
    }
}

/// A fleet on a store that holds every commit until its gate opens (when the returned
/// guard drops, at the latest: a failed assertion must not leave a commit blocked, or
/// the runtime would wait for it).
async fn gated_fleet() -> (Arc<GatedStore>, OpenOnDrop, FleetHandle) {
    let store = Arc::new(GatedStore::registered());
    let open = OpenOnDrop(store.clone());
    let (committer, _) = Committer::start(store.clone(), 16, 16);
    let fleet = FleetHandle::start(FleetConfig::default(), committer)
        .await
        .unwrap();
    (store, open, fleet)
}

#[tokio::test]
async fn a_twin_answers_only_once_its_change_is_durable() {
    let (store, _open, fleet) = gated_fleet().await;
    let mut events = fleet.queries().subscribe();
    let update = tokio::spawn(fleet.shadows().update(
        &id("d"),
        ShadowName::classic(),
        reported(1),
        Origin::Device,
    ));
    // The change is at the store, which holds it: no answer, no event yet.
    tokio::time::timeout(Duration::from_secs(10), store.arrived.notified())
        .await
        .expect("the change reaches the store");
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        !update.is_finished(),
        "answered before the commit was durable"
    );
    assert!(
        events.try_recv().is_err(),
        "an event before the commit was durable"
    );
    store.released.store(true, Ordering::SeqCst);
    assert_eq!(update.await.unwrap().unwrap().version, 1);
    assert!(events.recv().await.is_ok());
}

#[tokio::test]
async fn requests_behind_a_busy_twin_are_counted_in_its_mailbox() {
    use crate::telemetry::{Mailbox, mailbox_messages};
    let (store, _open, fleet) = gated_fleet().await;
    let updates: Vec<_> = (1..=5)
        .map(|n| {
            tokio::spawn(fleet.shadows().update(
                &id("busy"),
                ShadowName::classic(),
                reported(n),
                Origin::Device,
            ))
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(10), store.arrived.notified())
        .await
        .expect("the first change reaches the store");
    // The twin waits for its first commit; the four behind it wait in its mailbox (other
    // tests in this process count theirs too, so the figure is at least ours).
    tokio::time::timeout(Duration::from_secs(10), async {
        while mailbox_messages(Mailbox::Twin) < 4 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the waiting requests are counted");
    store.released.store(true, Ordering::SeqCst);
    for update in updates {
        update.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_change_whose_commit_fails_is_refused_and_changes_nothing() {
    let store = Arc::new(GatedStore::registered());
    store.released.store(true, Ordering::SeqCst);
    let (committer, _) = Committer::start(store.clone(), 16, 16);
    let fleet = FleetHandle::start(FleetConfig::default(), committer)
        .await
        .unwrap();
    let mut events = fleet.queries().subscribe();
    store.fail.store(true, Ordering::SeqCst);
    let refused = fleet
        .shadows()
        .update(&id("f"), ShadowName::classic(), reported(1), Origin::Device)
        .await
        .unwrap_err();
    // The store's own error comes through as the cause, not as flattened text.
    match &refused {
        FleetError::Store(cause) => {
            assert!(matches!(**cause, StoreError::Engine(ref m) if m == "disk on fire"))
        }
        other => panic!("expected a store failure, got {other}"),
    }
    assert!(
        events.try_recv().is_err(),
        "no event for a change that was not stored"
    );
    // The twin kept nothing of it: no shadow, and the next change is version 1.
    let missing = fleet
        .shadows()
        .get(&id("f"), ShadowName::classic())
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), RejectionKind::NotFound);
    store.fail.store(false, Ordering::SeqCst);
    let change = fleet
        .shadows()
        .update(&id("f"), ShadowName::classic(), reported(2), Origin::Device)
        .await
        .unwrap();
    assert_eq!(change.version, 1);
}

#[tokio::test]
async fn overload_is_refused_at_once_not_queued() {
    let store = Arc::new(GatedStore::registered());
    let (committer, _) = Committer::start(store.clone(), 16, 16);
    let fleet = FleetHandle::start(
        FleetConfig {
            max_pending: 2,
            ..FleetConfig::default()
        },
        committer,
    )
    .await
    .unwrap();
    let first =
        fleet
            .shadows()
            .update(&id("o"), ShadowName::classic(), reported(1), Origin::Device);
    let second =
        fleet
            .shadows()
            .update(&id("o"), ShadowName::classic(), reported(2), Origin::Device);
    let third = fleet
        .shadows()
        .update(&id("o"), ShadowName::classic(), reported(3), Origin::Device)
        .await;
    assert!(matches!(third.unwrap_err(), FleetError::Overloaded));
    assert_eq!(FleetError::Overloaded.to_rejection().code(), 429);
    store.released.store(true, Ordering::SeqCst);
    assert_eq!(first.await.unwrap().version, 1);
    assert_eq!(second.await.unwrap().version, 2);
    // Permits are back: new requests go through.
    assert_eq!(
        fleet
            .shadows()
            .update(&id("o"), ShadowName::classic(), reported(4), Origin::Device)
            .await
            .unwrap()
            .version,
        3
    );
}

#[tokio::test]
async fn devices_authenticate_with_their_secret_and_presence_is_recorded() {
    let f = fleet(FleetConfig::default()).await;
    let mut events = f.fleet.queries().subscribe();
    let thing = id("dev-1");
    assert_eq!(
        f.fleet
            .sessions()
            .connect(&thing, Some("x".into()))
            .await
            .unwrap_err()
            .kind(),
        RejectionKind::Unauthorized
    );
    let secret = f
        .fleet
        .registry()
        .register(&thing, Default::default())
        .await
        .unwrap();
    assert_eq!(
        f.fleet
            .registry()
            .register(&thing, Default::default())
            .await
            .unwrap_err()
            .kind(),
        RejectionKind::VersionConflict
    );
    assert_eq!(
        f.fleet
            .sessions()
            .connect(&thing, Some("wrong".into()))
            .await
            .unwrap_err()
            .kind(),
        RejectionKind::Unauthorized
    );
    assert_eq!(
        f.fleet
            .sessions()
            .connect(&thing, None)
            .await
            .unwrap_err()
            .kind(),
        RejectionKind::Unauthorized
    );
    let first = f
        .fleet
        .sessions()
        .connect(&thing, Some(secret.clone()))
        .await
        .unwrap();
    let second = f
        .fleet
        .sessions()
        .connect(&thing, Some(secret.clone()))
        .await
        .unwrap();
    assert!(second.session > first.session);
    // The first session's late disconnect must not mark the device offline.
    f.fleet
        .sessions()
        .disconnected(&thing, first.session, "session taken over");
    f.fleet
        .shadows()
        .update(&thing, ShadowName::classic(), reported(1), Origin::Device)
        .await
        .unwrap();
    assert!(
        f.fleet
            .store()
            .load(&thing)
            .await
            .unwrap()
            .connectivity
            .connected
    );
    f.fleet
        .sessions()
        .disconnected(&thing, second.session, "keep-alive timeout");
    f.fleet
        .shadows()
        .update(&thing, ShadowName::classic(), reported(2), Origin::Device)
        .await
        .unwrap();
    let presence = f.fleet.store().load(&thing).await.unwrap().connectivity;
    assert!(!presence.connected);
    assert_eq!(
        presence.disconnect_reason.as_deref(),
        Some("keep-alive timeout")
    );

    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(match &*e.event {
            TwinEvent::Connectivity { connectivity, .. } => {
                format!("connected={}", connectivity.connected)
            }
            TwinEvent::Shadow { change, .. } => match change.op {
                ChangeOp::Update { .. } => format!("v{}", change.version),
                ChangeOp::Delete => "delete".into(),
            },
            TwinEvent::Command { execution, .. } => execution.status.as_str().into(),
            TwinEvent::Job { execution, .. } => execution.status.as_str().into(),
            TwinEvent::Telemetry { topic, .. } => format!("telemetry on {topic}"),
        });
    }
    assert_eq!(
        seen,
        [
            "connected=true",
            "connected=true",
            "v1",
            "connected=false",
            "v2"
        ]
    );

    f.fleet.registry().set_enabled(&thing, false).await.unwrap();
    assert_eq!(
        f.fleet
            .sessions()
            .connect(&thing, Some(secret))
            .await
            .unwrap_err()
            .kind(),
        RejectionKind::Forbidden
    );
}

#[tokio::test]
async fn auto_register_creates_unknown_devices_on_connect() {
    let f = fleet(FleetConfig {
        auto_register: true,
        ..FleetConfig::default()
    })
    .await;
    let ok = f
        .fleet
        .sessions()
        .connect(&id("new-dev"), None)
        .await
        .unwrap();
    assert!(ok.registered_now);
    assert!(
        f.fleet
            .store()
            .thing(&id("new-dev"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        !f.fleet
            .sessions()
            .connect(&id("new-dev"), None)
            .await
            .unwrap()
            .registered_now
    );
}

/// A fleet on tokio's clock: under paused time, deadlines minutes or hours away pass at
/// once and exactly.
fn on_tokio_time() -> FleetConfig {
    FleetConfig {
        clock: Clock::tokio(),
        ..FleetConfig::default()
    }
}

/// The next event `pick` takes, or None once `limit` of (paused) time has passed.
async fn next_event<T>(
    events: &mut tokio::sync::broadcast::Receiver<Change>,
    limit: Duration,
    pick: impl Fn(&TwinEvent) -> Option<T>,
) -> Option<T> {
    tokio::time::timeout(limit, async {
        loop {
            if let Some(t) = pick(&events.recv().await.unwrap().event) {
                return t;
            }
        }
    })
    .await
    .ok()
}

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);
