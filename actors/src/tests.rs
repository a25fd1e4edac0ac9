//! Actor tests, through `FleetHandle` only.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
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

mod creation;

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
        .update(&id("ghost"), ShadowName::classic(), reported(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RejectionKind::NotFound);

    registered(&f.fleet, &["t1"]).await;
    // Send 100 updates before awaiting any: versions follow the order of sending.
    let replies: Vec<_> = (0..100)
        .map(|i| {
            f.fleet
                .shadows()
                .update(&id("t1"), ShadowName::classic(), reported(i))
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
            .update(&id(t), ShadowName::classic(), reported(i as i64))
            .await
            .unwrap();
    }
    assert_eq!(f.fleet.resident_twins().await, 2);
    // "a" was passivated; it comes back with its persisted state and can go on.
    assert_eq!(n_of(&f.fleet, "a").await, (1, json!(0)));
    let change = f
        .fleet
        .shadows()
        .update(&id("a"), ShadowName::classic(), reported(7))
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
        .update(&id("x"), ShadowName::classic(), reported(5))
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
        .update(&id("p"), ShadowName::classic(), reported(3))
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
        .update(&id("p"), ShadowName::classic(), reported(4))
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

#[tokio::test]
async fn a_twin_answers_only_once_its_change_is_durable() {
    let store = Arc::new(GatedStore::registered());
    // A failed assertion must not leave the commit blocked: the runtime would wait for it.
    let _open = OpenOnDrop(store.clone());
    let (committer, _) = Committer::start(store.clone(), 16, 16);
    let fleet = FleetHandle::start(FleetConfig::default(), committer)
        .await
        .unwrap();
    let mut events = fleet.queries().subscribe();
    let update = tokio::spawn(
        fleet
            .shadows()
            .update(&id("d"), ShadowName::classic(), reported(1)),
    );
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
        .update(&id("f"), ShadowName::classic(), reported(1))
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
        .update(&id("f"), ShadowName::classic(), reported(2))
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
    let first = fleet
        .shadows()
        .update(&id("o"), ShadowName::classic(), reported(1));
    let second = fleet
        .shadows()
        .update(&id("o"), ShadowName::classic(), reported(2));
    let third = fleet
        .shadows()
        .update(&id("o"), ShadowName::classic(), reported(3))
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
            .update(&id("o"), ShadowName::classic(), reported(4))
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
        .update(&thing, ShadowName::classic(), reported(1))
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
        .update(&thing, ShadowName::classic(), reported(2))
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

/// The next command event of the fleet, as (status, deliver).
async fn command_event(
    events: &mut tokio::sync::broadcast::Receiver<Change>,
) -> (Arc<CommandExecution>, bool) {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an event in time")
            .unwrap();
        if let TwinEvent::Command {
            execution, deliver, ..
        } = &*e.event
        {
            return (execution.clone(), *deliver);
        }
    }
}

fn new_command(timeout_seconds: u64, expires_in_seconds: u64) -> NewCommand {
    NewCommand {
        name: "reboot".into(),
        payload: json!({"delay": 1}),
        timeout_seconds,
        expires_in_seconds,
    }
}

fn device_says(status: &str) -> Result<DeviceResponse, CommandError> {
    DeviceResponse::parse(json!({"status": status}).to_string().as_bytes())
}

#[tokio::test]
async fn a_command_waits_for_a_listening_device_and_runs_to_success() {
    let f = fleet(FleetConfig::default()).await;
    let thing = id("lamp");
    let secret = f
        .fleet
        .registry()
        .register(&thing, Default::default())
        .await
        .unwrap();
    let mut events = f.fleet.queries().subscribe();
    // Offline: the command is created and waits.
    let c = f
        .fleet
        .commands()
        .send(&thing, new_command(30, 600))
        .await
        .unwrap();
    assert_eq!(c.status, CommandStatus::Created);
    assert!(!command_event(&mut events).await.1);
    let ok = f
        .fleet
        .sessions()
        .connect(&thing, Some(secret))
        .await
        .unwrap();
    // Connected is not enough: the device gets it once it subscribes.
    f.fleet.sessions().commands_wanted(&thing, ok.session);
    let (delivered, deliver) = command_event(&mut events).await;
    assert!(deliver);
    assert_eq!(delivered.execution_id, c.execution_id);
    assert!(delivered.delivered_at.is_some());
    // A second command while listening goes out at once.
    let second = f
        .fleet
        .commands()
        .send(&thing, new_command(30, 600))
        .await
        .unwrap();
    assert!(second.delivered_at.is_some());
    assert!(command_event(&mut events).await.1);

    for status in ["IN_PROGRESS", "SUCCEEDED"] {
        let r = f
            .fleet
            .commands()
            .respond(&thing, c.execution_id.clone(), device_says(status))
            .await
            .unwrap();
        assert_eq!(r.status.as_str(), status);
    }
    let late = f
        .fleet
        .commands()
        .respond(&thing, c.execution_id.clone(), device_says("FAILED"))
        .await
        .unwrap_err();
    assert_eq!(late.kind(), RejectionKind::VersionConflict);
    let unknown = f
        .fleet
        .commands()
        .respond(&thing, "nope".into(), device_says("FAILED"))
        .await
        .unwrap_err();
    assert_eq!(unknown.kind(), RejectionKind::NotFound);
    let bad = f
        .fleet
        .commands()
        .respond(&thing, second.execution_id.clone(), device_says("CREATED"))
        .await
        .unwrap_err();
    assert_eq!(bad.kind(), RejectionKind::BadRequest);

    let found = f.fleet.commands().get(&c.execution_id).await.unwrap();
    assert_eq!(found.status, CommandStatus::Succeeded);
    let listed = f.fleet.commands().list(&thing, None, 10).await.unwrap();
    let ids: Vec<_> = listed.iter().map(|c| c.execution_id.as_str()).collect();
    assert_eq!(ids, [second.execution_id.as_str(), c.execution_id.as_str()]);
    let ghost = f
        .fleet
        .commands()
        .send(&id("ghost"), new_command(1, 1))
        .await
        .unwrap_err();
    assert_eq!(ghost.kind(), RejectionKind::NotFound);
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

fn command_of(e: &TwinEvent) -> Option<Arc<CommandExecution>> {
    match e {
        TwinEvent::Command { execution, .. } => Some(execution.clone()),
        _ => None,
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn commands_time_out_on_the_clock_even_after_their_twin_was_passivated() {
    let dir = tempfile::tempdir().unwrap();
    let config = on_tokio_time();
    let (fleet, commits) = fleet_in(dir.path(), &config).await;
    let thing = id("pump");
    let secret = fleet
        .registry()
        .register(&thing, Default::default())
        .await
        .unwrap();
    let mut events = fleet.queries().subscribe();
    let offline = fleet
        .commands()
        .send(&thing, new_command(300, 3600))
        .await
        .unwrap();
    // Nobody listens. After the idle timeout (10 minutes) the twin is passivated, and
    // its shard wakes it for the expiry an hour after the command was sent.
    tokio::time::sleep(15 * MINUTE).await;
    assert_eq!(fleet.resident_twins().await, 0);
    let created = command_of(&events.recv().await.unwrap().event).unwrap();
    assert_eq!(created.status, CommandStatus::Created);
    let expired = next_event(&mut events, 2 * HOUR, command_of)
        .await
        .expect("the command expires");
    assert_eq!(expired.execution_id, offline.execution_id);
    assert_eq!(expired.status, CommandStatus::TimedOut);
    assert_eq!(expired.reason.as_ref().unwrap().reason_code, "EXPIRED");
    let late = expired.completed_at.unwrap() - offline.created_at;
    assert!(
        (3_600_000..=3_630_000).contains(&late),
        "expired {late} ms after it was sent: within one shard tick of the hour"
    );

    // Delivered and never answered: the device has `timeoutSeconds`, to the millisecond.
    let ok = fleet
        .sessions()
        .connect(&thing, Some(secret.clone()))
        .await
        .unwrap();
    fleet.sessions().commands_wanted(&thing, ok.session);
    let silent = fleet
        .commands()
        .send(&thing, new_command(300, 3600))
        .await
        .unwrap();
    let delivered_at = silent.delivered_at.expect("delivered at once");
    tokio::time::sleep(Duration::from_secs(299)).await;
    let waiting = fleet.commands().get(&silent.execution_id).await.unwrap();
    assert!(!waiting.status.is_terminal(), "{:?}", waiting.status);
    let timed_out = next_event(&mut events, MINUTE, |e| {
        command_of(e).filter(|c| c.status.is_terminal())
    })
    .await
    .expect("the device's time runs out");
    assert_eq!(timed_out.execution_id, silent.execution_id);
    assert_eq!(
        timed_out.reason.as_ref().unwrap().reason_code,
        "DEVICE_TIMEOUT"
    );
    assert_eq!(timed_out.completed_at.unwrap() - delivered_at, 300_000);

    // A pending command survives a restart and reaches the device when it listens.
    let pending = fleet
        .commands()
        .send(&thing, new_command(300, 3600))
        .await
        .unwrap();
    stop(fleet, commits).await;
    let (fleet, _commits) = fleet_in(dir.path(), &config).await;
    let mut events = fleet.queries().subscribe();
    let ok = fleet
        .sessions()
        .connect(&thing, Some(secret))
        .await
        .unwrap();
    fleet.sessions().commands_wanted(&thing, ok.session);
    let (delivered, deliver) = command_event(&mut events).await;
    assert!(deliver);
    assert_eq!(delivered.execution_id, pending.execution_id);
    assert_eq!(
        fleet
            .commands()
            .get(&offline.execution_id)
            .await
            .unwrap()
            .status,
        CommandStatus::TimedOut
    );
}
#[tokio::test(start_paused = true)]
async fn deadlines_pending_at_a_restart_are_met_without_waking_the_twins_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = on_tokio_time();
    let (fleet, commits) = fleet_in(dir.path(), &config).await;
    registered(&fleet, &["pump", "fan"]).await;
    let command = fleet
        .commands()
        .send(&id("pump"), new_command(300, 3600))
        .await
        .unwrap();
    let job = firmware_job(
        "fw-9",
        RetryPolicy::default(),
        Timeouts {
            in_progress_ms: 0,
            step_ms: 30 * 60_000,
        },
    );
    fleet.jobs().create(job.clone(), None).await.unwrap();
    fleet.jobs().queue(&id("fan"), job).await.unwrap();
    fleet
        .jobs()
        .request(&id("fan"), JobOp::StartNext, json!({}))
        .await
        .unwrap()
        .unwrap();
    stop(fleet, commits).await;

    // Nothing asks for either twin after the restart: the shards wake them when due.
    let (fleet, _commits) = fleet_in(dir.path(), &config).await;
    let mut events = fleet.queries().subscribe();
    let step = next_event(&mut events, HOUR, job_of)
        .await
        .expect("the step times out");
    assert_eq!(
        (step.thing.as_str(), step.status),
        ("fan", JobStatus::TimedOut)
    );
    let expired = next_event(&mut events, 2 * HOUR, command_of)
        .await
        .expect("the command expires");
    assert_eq!(expired.execution_id, command.execution_id);
    assert_eq!(expired.status, CommandStatus::TimedOut);
    let late = expired.completed_at.unwrap() - command.created_at;
    assert!((3_600_000..=3_630_000).contains(&late), "{late} ms");
}

fn firmware_job(id: &str, retry: RetryPolicy, timeouts: Timeouts) -> Arc<JobDefinition> {
    Arc::new(JobDefinition {
        job_id: id.into(),
        document: json!({"firmware": {"version": "2.0.1", "url": "https://fw.example/2.0.1.bin", "sha256": "ab", "size": 1024}}),
        retry,
        timeouts,
        created_at: 0,
        canceled_at: None,
        rollback_job: None,
        rollout: None,
    })
}

#[tokio::test]
async fn a_device_runs_its_jobs_through_the_jobs_api() {
    let f = fleet(FleetConfig::default()).await;
    let thing = id("pump");
    registered(&f.fleet, &["pump"]).await;
    let job = firmware_job("fw-2", RetryPolicy::default(), Timeouts::default());
    f.fleet.jobs().create(job.clone(), None).await.unwrap();
    let again = f.fleet.jobs().create(job.clone(), None).await.unwrap_err();
    assert_eq!(again.kind(), RejectionKind::VersionConflict);
    let mut events = f.fleet.queries().subscribe();
    f.fleet.jobs().queue(&thing, job.clone()).await.unwrap();
    let (notify, next) = loop {
        let e = events.recv().await.unwrap();
        if let TwinEvent::Job {
            notify,
            notify_next,
            ..
        } = &*e.event
        {
            break (notify.clone(), notify_next.clone());
        }
    };
    assert_eq!(notify["jobs"]["QUEUED"][0]["jobId"], "fw-2");
    let next = next.expect("the next job changed");
    assert_eq!(
        next["execution"]["jobDocument"]["firmware"]["version"],
        "2.0.1"
    );

    let ask = |op: JobOp, body: serde_json::Value| f.fleet.jobs().request(&thing, op, body);
    let pending = ask(JobOp::GetPending, json!({"clientToken": "c1"}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pending["queuedJobs"][0]["jobId"], "fw-2");
    assert_eq!(pending["clientToken"], "c1");
    let started = ask(
        JobOp::StartNext,
        json!({"statusDetails": {"step": "download"}}),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(started["execution"]["status"], "IN_PROGRESS");
    assert_eq!(started["execution"]["versionNumber"], 2);
    // After a reboot the device finds its running job again.
    let resumed = ask(JobOp::Describe("$next".into()), json!({}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resumed["execution"]["jobId"], "fw-2");
    assert_eq!(resumed["execution"]["statusDetails"]["step"], "download");
    let stale = ask(
        JobOp::Update("fw-2".into()),
        json!({"status": "IN_PROGRESS", "expectedVersion": 1}),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(stale.code, JobErrorCode::VersionMismatch);
    let done = ask(
        JobOp::Update("fw-2".into()),
        json!({"status": "SUCCEEDED", "expectedVersion": 2, "includeJobExecutionState": true}),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(done["executionState"]["status"], "SUCCEEDED");
    // The installed firmware is now reported state.
    let shadow = f
        .fleet
        .shadows()
        .get(&thing, ShadowName::classic())
        .await
        .unwrap();
    assert_eq!(
        serde_json::Value::Object(shadow.reported.clone().unwrap())["firmware"]["version"],
        "2.0.1"
    );
    let none = ask(JobOp::StartNext, json!({})).await.unwrap().unwrap();
    assert!(none.get("execution").is_none());
    let unknown = ask(JobOp::Describe("other".into()), json!({}))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(unknown.code, JobErrorCode::ResourceNotFound);
    assert_eq!(
        f.fleet.jobs().statuses("fw-2").await.unwrap(),
        [(thing.clone(), JobStatus::Succeeded)]
    );
}

fn job_of(e: &TwinEvent) -> Option<Arc<JobExecution>> {
    match e {
        TwinEvent::Job { execution, .. } => Some(execution.clone()),
        _ => None,
    }
}

/// The end of a job attempt: queued again (with the next execution number) or, past the
/// retry limit, the end of the execution.
async fn attempt_ended(
    events: &mut tokio::sync::broadcast::Receiver<Change>,
) -> Option<Arc<JobExecution>> {
    next_event(events, 2 * HOUR, |e| {
        job_of(e).filter(|x| x.status != JobStatus::InProgress)
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn job_attempts_time_out_and_retry_on_the_clock_up_to_their_limits() {
    let f = fleet(on_tokio_time()).await;
    let thing = id("fan");
    registered(&f.fleet, &["fan"]).await;
    let job = firmware_job(
        "fw-3",
        RetryPolicy {
            on_failure: 1,
            on_timeout: 2,
        },
        Timeouts {
            in_progress_ms: 30 * 60_000,
            step_ms: 5 * 60_000,
        },
    );
    f.fleet.jobs().create(job.clone(), None).await.unwrap();
    f.fleet.jobs().queue(&thing, job).await.unwrap();
    let mut events = f.fleet.queries().subscribe();
    let ask = |op: JobOp, body: serde_json::Value| f.fleet.jobs().request(&thing, op, body);
    let start = || async {
        let started = ask(JobOp::StartNext, json!({})).await.unwrap().unwrap();
        assert_eq!(started["execution"]["status"], "IN_PROGRESS");
        f.fleet.now_millis()
    };

    // 1: the device starts and goes quiet: the 5-minute step timeout.
    let started = start().await;
    let retry = attempt_ended(&mut events).await.unwrap();
    assert_eq!(
        (retry.status, retry.execution_number),
        (JobStatus::Queued, 2)
    );
    assert_eq!(retry.last_updated_at - started, 5 * 60_000);

    // 2: the device re-arms its step timer every 4 minutes (as AWS devices do, with
    // `stepTimeoutInMinutes`), but the attempt as a whole has 30 minutes.
    let started = start().await;
    for _ in 0..7 {
        tokio::time::sleep(4 * MINUTE).await;
        ask(
            JobOp::Update("fw-3".into()),
            json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": 5, "statusDetails": {"step": "download"}}),
        )
        .await
        .unwrap()
        .unwrap();
    }
    let retry = attempt_ended(&mut events).await.unwrap();
    assert_eq!(
        (retry.status, retry.execution_number),
        (JobStatus::Queued, 3)
    );
    assert_eq!(retry.last_updated_at - started, 30 * 60_000);

    // 3: the device fails: its one retry after a failure.
    start().await;
    ask(JobOp::Update("fw-3".into()), json!({"status": "FAILED"}))
        .await
        .unwrap()
        .unwrap();
    let retry = attempt_ended(&mut events).await.unwrap();
    assert_eq!(
        (retry.status, retry.execution_number),
        (JobStatus::Queued, 4)
    );

    // 4: a third timeout is one more than the two retries allow: the execution ends.
    let started = start().await;
    let last = attempt_ended(&mut events).await.unwrap();
    assert_eq!(
        (last.status, last.execution_number),
        (JobStatus::TimedOut, 4)
    );
    assert_eq!(last.last_updated_at - started, 5 * 60_000);
    assert_eq!(
        (last.retries_after_timeout, last.retries_after_failure),
        (2, 1)
    );
    // Nothing more happens to it, however long we wait.
    assert!(next_event(&mut events, 24 * HOUR, job_of).await.is_none());
    assert_eq!(
        f.fleet.jobs().statuses("fw-3").await.unwrap(),
        [(thing.clone(), JobStatus::TimedOut)]
    );
}

/// A firmware job rolled out to `targets` at `pace`, starting now on the fleet's clock.
fn paced_job(f: &FleetHandle, id_: &str, targets: &[String], pace: Pace) -> Arc<JobDefinition> {
    let mut job = (*firmware_job(id_, RetryPolicy::default(), Timeouts::default())).clone();
    job.rollout = Some(Rollout {
        pace,
        abort: None,
        targets: targets.iter().map(|n| id(n)).collect(),
        released: 0,
        started_at: f.now_millis(),
        paused_at: None,
        aborted_at: None,
        health: None,
        healthy: vec![],
        unhealthy: vec![],
    });
    Arc::new(job)
}

/// A job in two waves over a, b, c and d, created once its first wave (a, b) is queued.
async fn two_waves(f: &FleetHandle, job_id: &str) -> tokio::sync::broadcast::Receiver<Change> {
    let names = ["a", "b", "c", "d"].map(String::from);
    for n in &names {
        f.registry()
            .register(&id(n), Default::default())
            .await
            .unwrap();
    }
    let pace = Pace::Waves {
        percents: vec![50, 100],
    };
    let mut events = f.queries().subscribe();
    f.jobs()
        .create(paced_job(f, job_id, &names, pace), None)
        .await
        .unwrap();
    for _ in 0..2 {
        next_event(&mut events, MINUTE, job_of).await.unwrap();
    }
    events
}

#[tokio::test(start_paused = true)]
async fn a_rate_paced_rollout_releases_on_the_clock_and_resumes_without_a_burst() {
    let f = fleet(on_tokio_time()).await;
    let names: Vec<String> = (0..200).map(|i| format!("dev-{i:03}")).collect();
    for n in &names {
        f.fleet
            .registry()
            .register(&id(n), Default::default())
            .await
            .unwrap();
    }
    let rate = Pace::Rate {
        base_per_minute: 10,
        factor: 2.0,
        max_per_minute: 40,
    };
    let t0 = tokio::time::Instant::now();
    f.fleet
        .jobs()
        .create(paced_job(&f.fleet, "fw-rate", &names, rate), None)
        .await
        .unwrap();
    // The controller looks every 200 ms from t0: each count is read 100 ms after a look.
    let released_at = async |at: Duration| {
        tokio::time::sleep_until(t0 + at + Duration::from_millis(100)).await;
        let job = f.fleet.jobs().get("fw-rate").await.unwrap().unwrap();
        let released = job.rollout.unwrap().released;
        let queued = f.fleet.jobs().statuses("fw-rate").await.unwrap();
        assert_eq!(
            queued.len() as u64,
            released,
            "every release has its execution"
        );
        released
    };
    assert_eq!(released_at(Duration::ZERO).await, 1, "the first at once");
    assert_eq!(released_at(MINUTE).await, 10);
    assert_eq!(released_at(2 * MINUTE).await, 10 + 20);
    f.fleet.jobs().pause("fw-rate", true).await.unwrap();
    assert_eq!(released_at(20 * MINUTE).await, 30, "nothing while paused");
    assert_eq!(released_at(32 * MINUTE).await, 30);
    f.fleet.jobs().pause("fw-rate", false).await.unwrap();
    // The 30 paused minutes do not count: the third minute of running releases 40.
    assert_eq!(released_at(33 * MINUTE).await, 30 + 40);
    assert_eq!(
        released_at(34 * MINUTE).await,
        70 + 40,
        "capped at 40 a minute"
    );
    assert_eq!(released_at(36 * MINUTE).await, 110 + 80);
    assert_eq!(released_at(37 * MINUTE).await, 200);
}

#[tokio::test(start_paused = true)]
async fn a_rate_paced_rollout_goes_on_after_a_restart_without_catching_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = on_tokio_time();
    let (fleet, commits) = fleet_in(dir.path(), &config).await;
    let names: Vec<String> = (0..200).map(|i| format!("dev-{i:03}")).collect();
    for n in &names {
        fleet
            .registry()
            .register(&id(n), Default::default())
            .await
            .unwrap();
    }
    let rate = Pace::Rate {
        base_per_minute: 10,
        factor: 2.0,
        max_per_minute: 40,
    };
    let released = async |fleet: &FleetHandle| {
        let job = fleet.jobs().get("fw-rate").await.unwrap().unwrap();
        job.rollout.unwrap().released
    };
    fleet
        .jobs()
        .create(paced_job(&fleet, "fw-rate", &names, rate), None)
        .await
        .unwrap();
    tokio::time::sleep(2 * MINUTE + Duration::from_millis(100)).await;
    assert_eq!(released(&fleet).await, 30);
    stop(fleet, commits).await;

    // Down for an hour: 200 would be due by the clock, but the rate goes on from 30.
    tokio::time::sleep(HOUR).await;
    let (fleet, _commits) = fleet_in(dir.path(), &config).await;
    assert_eq!(fleet.jobs().resume_rollouts().await.unwrap(), 1);
    tokio::time::sleep(MINUTE).await;
    let after = released(&fleet).await;
    assert!(
        (60..=70).contains(&after),
        "{after} released a minute after the restart"
    );
}

#[tokio::test(start_paused = true)]
async fn things_taken_out_of_a_job_end_removed_or_never_get_an_execution() {
    let f = fleet(on_tokio_time()).await;
    let mut events = two_waves(&f.fleet, "fw-out").await;
    f.fleet
        .jobs()
        .request(&id("a"), JobOp::StartNext, json!({}))
        .await
        .unwrap()
        .unwrap();
    let statuses = async || {
        let mut s = f.fleet.jobs().statuses("fw-out").await.unwrap();
        s.sort();
        s
    };
    let out = |things: &[&str]| things.iter().map(|t| id(t)).collect();
    let before = statuses().await;

    let running = f
        .fleet
        .jobs()
        .remove_targets("fw-out", out(&["a", "b"]), false)
        .await
        .unwrap_err();
    assert_eq!(running.kind(), RejectionKind::VersionConflict);
    let stranger = f
        .fleet
        .jobs()
        .remove_targets("fw-out", out(&["b", "ghost"]), false)
        .await
        .unwrap_err();
    assert_eq!(stranger.kind(), RejectionKind::NotFound);
    assert_eq!(statuses().await, before, "a refusal changes nothing");

    // b has an execution: REMOVED, and its device hears that nothing is pending. d has
    // none yet: it never gets one.
    f.fleet
        .jobs()
        .remove_targets("fw-out", out(&["b", "d"]), false)
        .await
        .unwrap();
    let (removed, notify) = next_event(&mut events, MINUTE, |e| match e {
        TwinEvent::Job {
            execution, notify, ..
        } if execution.thing.as_str() == "b" => Some((execution.clone(), notify.clone())),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(removed.status, JobStatus::Removed);
    assert_eq!(
        notify["jobs"],
        json!({"QUEUED": [], "IN_PROGRESS": []}),
        "nothing pending"
    );
    let targets = f
        .fleet
        .jobs()
        .get("fw-out")
        .await
        .unwrap()
        .unwrap()
        .rollout
        .unwrap()
        .targets;
    assert_eq!(targets, [id("a"), id("b"), id("c")]);

    // With force, a running execution too; then the first wave has ended and c is next.
    f.fleet
        .jobs()
        .remove_targets("fw-out", out(&["a"]), true)
        .await
        .unwrap();
    let queued = next_event(&mut events, MINUTE, |e| {
        job_of(e).filter(|x| x.status == JobStatus::Queued)
    })
    .await
    .expect("the next wave opens");
    assert_eq!(queued.thing, id("c"));
    assert_eq!(
        statuses().await,
        [
            (id("a"), JobStatus::Removed),
            (id("b"), JobStatus::Removed),
            (id("c"), JobStatus::Queued)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_rollout_whose_targets_are_deleted_still_finishes_with_counts_that_add_up() {
    let f = fleet(on_tokio_time()).await;
    let mut events = two_waves(&f.fleet, "fw-del").await;
    let succeed = async |thing: &str| {
        let ask = |op, body| f.fleet.jobs().request(&id(thing), op, body);
        ask(JobOp::StartNext, json!({})).await.unwrap().unwrap();
        ask(
            JobOp::Update("fw-del".into()),
            json!({"status": "SUCCEEDED"}),
        )
        .await
        .unwrap()
        .unwrap();
    };
    // b is deleted with its execution queued, d before its wave.
    for gone in ["b", "d"] {
        f.fleet
            .registry()
            .apply(&id(gone), RegistryOp::Delete)
            .await
            .unwrap();
    }
    let removed = next_event(&mut events, MINUTE, job_of).await.unwrap();
    assert_eq!(
        (removed.thing.as_str(), removed.status),
        ("b", JobStatus::Removed)
    );
    succeed("a").await;
    let queued = next_event(&mut events, MINUTE, |e| {
        job_of(e).filter(|x| x.status == JobStatus::Queued)
    })
    .await
    .expect("the second wave opens");
    assert_eq!(queued.thing, id("c"));
    succeed("c").await;

    // The controller sees that every target has ended, and stops.
    tokio::time::sleep(MINUTE).await;
    assert!(f.fleet.job_state.rollouts.is_empty(), "the rollout is over");
    let rollout = f
        .fleet
        .jobs()
        .get("fw-del")
        .await
        .unwrap()
        .unwrap()
        .rollout
        .unwrap();
    assert_eq!(rollout.targets, [id("a"), id("b"), id("c")]);
    assert_eq!(rollout.released, 3);
    let mut statuses = f.fleet.jobs().statuses("fw-del").await.unwrap();
    statuses.sort();
    assert_eq!(
        statuses,
        [
            (id("a"), JobStatus::Succeeded),
            (id("b"), JobStatus::Removed),
            (id("c"), JobStatus::Succeeded)
        ]
    );
}
