//! Actor tests, through `FleetHandle` only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use twin_model::{
    ChangeOp, DeviceId, Limits, RejectionKind, ShadowChange, ShadowName, TwinEvent, UpdateRequest,
};
use twin_store::{
    Committer, EmbeddedStore, StoreError, ThingRecord, TwinSnapshot, TwinStore, Write,
};

use twin_model::command::{
    CommandError, CommandExecution, CommandStatus, DeviceResponse, NewCommand,
};
use twin_model::job::{JobDefinition, JobErrorCode, JobStatus, RetryPolicy, Timeouts};
use twin_model::topic::JobOp;

use crate::{FleetConfig, FleetError, FleetHandle};

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

async fn fleet(config: FleetConfig) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn TwinStore> = Arc::new(EmbeddedStore::open(dir.path(), 100).unwrap());
    let (committer, _) = Committer::start(store, 1024, 1024).unwrap();
    Fleet {
        fleet: FleetHandle::start(config, committer).await.unwrap(),
        _dir: dir,
    }
}

async fn registered(f: &FleetHandle, names: &[&str]) {
    for n in names {
        f.register(&id(n), Default::default()).await.unwrap();
    }
}

async fn n_of(f: &FleetHandle, thing: &str) -> (u64, serde_json::Value) {
    let s = f
        .get_shadow(&id(thing), ShadowName::classic())
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
        .update_shadow(&id("ghost"), ShadowName::classic(), reported(1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RejectionKind::NotFound);

    registered(&f.fleet, &["t1"]).await;
    // Send 100 updates before awaiting any: versions follow the order of sending.
    let replies: Vec<_> = (0..100)
        .map(|i| {
            f.fleet
                .update_shadow(&id("t1"), ShadowName::classic(), reported(i))
        })
        .collect();
    for (i, reply) in replies.into_iter().enumerate() {
        let change = reply.await.unwrap();
        assert_eq!(change.version, i as u64 + 1);
    }
    assert_eq!(n_of(&f.fleet, "t1").await, (100, json!(99)));
    let err = f
        .fleet
        .get_shadow(&id("t1"), ShadowName::named("other").unwrap())
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
            .update_shadow(&id(t), ShadowName::classic(), reported(i as i64))
            .await
            .unwrap();
    }
    assert_eq!(f.fleet.resident_twins().await, 2);
    // "a" was passivated; it comes back with its persisted state and can go on.
    assert_eq!(n_of(&f.fleet, "a").await, (1, json!(0)));
    let change = f
        .fleet
        .update_shadow(&id("a"), ShadowName::classic(), reported(7))
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
        .update_shadow(&id("x"), ShadowName::classic(), reported(5))
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

#[tokio::test]
async fn a_twin_that_panics_restarts_from_its_persisted_state() {
    let f = fleet(FleetConfig::default()).await;
    registered(&f.fleet, &["p"]).await;
    f.fleet
        .update_shadow(&id("p"), ShadowName::classic(), reported(3))
        .await
        .unwrap();
    f.fleet.crash(&id("p"));
    // A request already queued behind the panic is lost with the mailbox and says so.
    match f.fleet.get_shadow(&id("p"), ShadowName::classic()).await {
        Ok(s) => assert_eq!(s.version, 1),
        Err(e) => assert!(matches!(e, FleetError::Unavailable(_)), "{e}"),
    }
    assert_eq!(n_of(&f.fleet, "p").await, (1, json!(3)));
    let change = f
        .fleet
        .update_shadow(&id("p"), ShadowName::classic(), reported(4))
        .await
        .unwrap();
    assert_eq!(change.version, 2);
}

/// A registry where every thing exists and every commit waits until released.
#[derive(Default)]
struct Stalled {
    released: AtomicBool,
}

impl TwinStore for Stalled {
    fn load(&self, thing: &DeviceId) -> Result<TwinSnapshot, StoreError> {
        Ok(TwinSnapshot {
            record: Some(ThingRecord {
                id: thing.clone(),
                secret_hash: String::new(),
                enabled: true,
                created_at: 0,
                attributes: Default::default(),
            }),
            ..TwinSnapshot::default()
        })
    }
    fn commit(&self, _: &[Write]) -> Result<(), StoreError> {
        while !self.released.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
    fn history(
        &self,
        _: &DeviceId,
        _: &ShadowName,
        _: usize,
    ) -> Result<Vec<ShadowChange>, StoreError> {
        Ok(vec![])
    }
    fn scan(&self, _: &mut dyn FnMut(twin_store::Scanned)) -> Result<(), StoreError> {
        Ok(())
    }
    fn thing(&self, _: &DeviceId) -> Result<Option<ThingRecord>, StoreError> {
        Ok(None)
    }
    fn job(&self, _: &str) -> Result<Option<twin_model::job::JobDefinition>, StoreError> {
        Ok(None)
    }
    fn jobs(
        &self,
        _: Option<&str>,
        _: usize,
    ) -> Result<Vec<twin_model::job::JobDefinition>, StoreError> {
        Ok(vec![])
    }
    fn job_statuses(
        &self,
        _: &str,
    ) -> Result<Vec<(DeviceId, twin_model::job::JobStatus)>, StoreError> {
        Ok(vec![])
    }
    fn command(
        &self,
        _: &str,
    ) -> Result<Option<twin_model::command::CommandExecution>, StoreError> {
        Ok(None)
    }
    fn commands(
        &self,
        _: &DeviceId,
        _: Option<&str>,
        _: usize,
    ) -> Result<Vec<twin_model::command::CommandExecution>, StoreError> {
        Ok(vec![])
    }
    fn things(&self, _: Option<&DeviceId>, _: usize) -> Result<Vec<ThingRecord>, StoreError> {
        Ok(vec![])
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[tokio::test]
async fn overload_is_refused_at_once_not_queued() {
    let store = Arc::new(Stalled::default());
    let (committer, _) = Committer::start(store.clone(), 16, 16).unwrap();
    let fleet = FleetHandle::start(
        FleetConfig {
            max_pending: 2,
            ..FleetConfig::default()
        },
        committer,
    )
    .await
    .unwrap();
    let first = fleet.update_shadow(&id("o"), ShadowName::classic(), reported(1));
    let second = fleet.update_shadow(&id("o"), ShadowName::classic(), reported(2));
    let third = fleet
        .update_shadow(&id("o"), ShadowName::classic(), reported(3))
        .await;
    assert_eq!(third.unwrap_err(), FleetError::Overloaded);
    assert_eq!(FleetError::Overloaded.to_rejection().code(), 429);
    store.released.store(true, Ordering::SeqCst);
    assert_eq!(first.await.unwrap().version, 1);
    assert_eq!(second.await.unwrap().version, 2);
    // Permits are back: new requests go through.
    assert_eq!(
        fleet
            .update_shadow(&id("o"), ShadowName::classic(), reported(4))
            .await
            .unwrap()
            .version,
        3
    );
}

#[tokio::test]
async fn devices_authenticate_with_their_secret_and_presence_is_recorded() {
    let f = fleet(FleetConfig::default()).await;
    let mut events = f.fleet.subscribe();
    let thing = id("dev-1");
    assert_eq!(
        f.fleet
            .connect(&thing, Some("x".into()))
            .await
            .unwrap_err()
            .kind(),
        RejectionKind::Unauthorized
    );
    let secret = f.fleet.register(&thing, Default::default()).await.unwrap();
    assert_eq!(
        f.fleet
            .register(&thing, Default::default())
            .await
            .unwrap_err()
            .kind(),
        RejectionKind::VersionConflict
    );
    assert_eq!(
        f.fleet
            .connect(&thing, Some("wrong".into()))
            .await
            .unwrap_err()
            .kind(),
        RejectionKind::Unauthorized
    );
    assert_eq!(
        f.fleet.connect(&thing, None).await.unwrap_err().kind(),
        RejectionKind::Unauthorized
    );
    let first = f.fleet.connect(&thing, Some(secret.clone())).await.unwrap();
    let second = f.fleet.connect(&thing, Some(secret.clone())).await.unwrap();
    assert!(second.session > first.session);
    // The first session's late disconnect must not mark the device offline.
    f.fleet
        .disconnected(&thing, first.session, "session taken over");
    f.fleet
        .update_shadow(&thing, ShadowName::classic(), reported(1))
        .await
        .unwrap();
    assert!(f.fleet.store().load(&thing).unwrap().connectivity.connected);
    f.fleet
        .disconnected(&thing, second.session, "keep-alive timeout");
    f.fleet
        .update_shadow(&thing, ShadowName::classic(), reported(2))
        .await
        .unwrap();
    let presence = f.fleet.store().load(&thing).unwrap().connectivity;
    assert!(!presence.connected);
    assert_eq!(
        presence.disconnect_reason.as_deref(),
        Some("keep-alive timeout")
    );

    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(match &*e {
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

    f.fleet.set_enabled(&thing, false).await.unwrap();
    assert_eq!(
        f.fleet
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
    let ok = f.fleet.connect(&id("new-dev"), None).await.unwrap();
    assert!(ok.registered_now);
    assert!(f.fleet.store().thing(&id("new-dev")).unwrap().is_some());
    assert!(
        !f.fleet
            .connect(&id("new-dev"), None)
            .await
            .unwrap()
            .registered_now
    );
}

/// The next command event of the fleet, as (status, deliver).
async fn command_event(
    events: &mut tokio::sync::broadcast::Receiver<Arc<TwinEvent>>,
) -> (Arc<CommandExecution>, bool) {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an event in time")
            .unwrap();
        if let TwinEvent::Command {
            execution, deliver, ..
        } = &*e
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
    let secret = f.fleet.register(&thing, Default::default()).await.unwrap();
    let mut events = f.fleet.subscribe();
    // Offline: the command is created and waits.
    let c = f
        .fleet
        .send_command(&thing, new_command(30, 600))
        .await
        .unwrap();
    assert_eq!(c.status, CommandStatus::Created);
    assert!(!command_event(&mut events).await.1);
    let ok = f.fleet.connect(&thing, Some(secret)).await.unwrap();
    // Connected is not enough: the device gets it once it subscribes.
    f.fleet.commands_wanted(&thing, ok.session);
    let (delivered, deliver) = command_event(&mut events).await;
    assert!(deliver);
    assert_eq!(delivered.execution_id, c.execution_id);
    assert!(delivered.delivered_at.is_some());
    // A second command while listening goes out at once.
    let second = f
        .fleet
        .send_command(&thing, new_command(30, 600))
        .await
        .unwrap();
    assert!(second.delivered_at.is_some());
    assert!(command_event(&mut events).await.1);

    for status in ["IN_PROGRESS", "SUCCEEDED"] {
        let r = f
            .fleet
            .command_response(&thing, c.execution_id.clone(), device_says(status))
            .await
            .unwrap();
        assert_eq!(r.status.as_str(), status);
    }
    let late = f
        .fleet
        .command_response(&thing, c.execution_id.clone(), device_says("FAILED"))
        .await
        .unwrap_err();
    assert_eq!(late.kind(), RejectionKind::VersionConflict);
    let unknown = f
        .fleet
        .command_response(&thing, "nope".into(), device_says("FAILED"))
        .await
        .unwrap_err();
    assert_eq!(unknown.kind(), RejectionKind::NotFound);
    let bad = f
        .fleet
        .command_response(&thing, second.execution_id.clone(), device_says("CREATED"))
        .await
        .unwrap_err();
    assert_eq!(bad.kind(), RejectionKind::BadRequest);

    let found = f.fleet.command(&c.execution_id).await.unwrap();
    assert_eq!(found.status, CommandStatus::Succeeded);
    let listed = f.fleet.commands(&thing, None, 10).await.unwrap();
    let ids: Vec<_> = listed.iter().map(|c| c.execution_id.as_str()).collect();
    assert_eq!(ids, [second.execution_id.as_str(), c.execution_id.as_str()]);
    let ghost = f
        .fleet
        .send_command(&id("ghost"), new_command(1, 1))
        .await
        .unwrap_err();
    assert_eq!(ghost.kind(), RejectionKind::NotFound);
}

#[tokio::test]
async fn commands_time_out_undelivered_and_unanswered_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let start = || async {
        let store: Arc<dyn TwinStore> = Arc::new(EmbeddedStore::open(dir.path(), 100).unwrap());
        let (committer, thread) = Committer::start(store, 1024, 1024).unwrap();
        let fleet = FleetHandle::start(FleetConfig::default(), committer)
            .await
            .unwrap();
        (fleet, thread)
    };
    let (fleet, thread) = start().await;
    let thing = id("pump");
    let secret = fleet.register(&thing, Default::default()).await.unwrap();
    let mut events = fleet.subscribe();
    let offline = fleet
        .send_command(&thing, new_command(60, 1))
        .await
        .unwrap();
    command_event(&mut events).await;
    // Nobody listens: it expires on the twin's own timer.
    let (expired, _) = command_event(&mut events).await;
    assert_eq!(expired.execution_id, offline.execution_id);
    assert_eq!(expired.status, CommandStatus::TimedOut);
    assert_eq!(expired.reason.as_ref().unwrap().reason_code, "EXPIRED");

    let ok = fleet.connect(&thing, Some(secret.clone())).await.unwrap();
    fleet.commands_wanted(&thing, ok.session);
    let silent = fleet
        .send_command(&thing, new_command(1, 600))
        .await
        .unwrap();
    assert!(command_event(&mut events).await.1);
    let (timed_out, _) = command_event(&mut events).await;
    assert_eq!(timed_out.execution_id, silent.execution_id);
    assert_eq!(
        timed_out.reason.as_ref().unwrap().reason_code,
        "DEVICE_TIMEOUT"
    );

    // A pending command survives a restart and reaches the device when it listens.
    let waiting = fleet
        .send_command(&thing, new_command(60, 600))
        .await
        .unwrap();
    fleet.shutdown().await;
    drop(fleet);
    // The commit thread ends with the last handle, releasing the store.
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
    let (fleet, _thread) = start().await;
    let mut events = fleet.subscribe();
    let ok = fleet.connect(&thing, Some(secret)).await.unwrap();
    fleet.commands_wanted(&thing, ok.session);
    let (delivered, deliver) = command_event(&mut events).await;
    assert!(deliver);
    assert_eq!(delivered.execution_id, waiting.execution_id);
    assert_eq!(
        fleet.command(&offline.execution_id).await.unwrap().status,
        CommandStatus::TimedOut
    );
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
    f.fleet.create_job(job.clone()).await.unwrap();
    let again = f.fleet.create_job(job.clone()).await.unwrap_err();
    assert_eq!(again.kind(), RejectionKind::VersionConflict);
    let mut events = f.fleet.subscribe();
    f.fleet.queue_job(&thing, job.clone()).await.unwrap();
    let (notify, next) = loop {
        let e = events.recv().await.unwrap();
        if let TwinEvent::Job {
            notify,
            notify_next,
            ..
        } = &*e
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

    let ask = |op: JobOp, body: serde_json::Value| f.fleet.job_request(&thing, op, body);
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
        .get_shadow(&thing, ShadowName::classic())
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
        f.fleet.job_statuses("fw-2").await.unwrap(),
        [(thing.clone(), JobStatus::Succeeded)]
    );
}

#[tokio::test]
async fn a_job_step_times_out_and_is_retried_on_the_twin_timer() {
    let f = fleet(FleetConfig::default()).await;
    let thing = id("fan");
    registered(&f.fleet, &["fan"]).await;
    let job = firmware_job(
        "fw-3",
        RetryPolicy {
            on_failure: 0,
            on_timeout: 1,
        },
        Timeouts {
            in_progress_ms: 0,
            step_ms: 300,
        },
    );
    f.fleet.create_job(job.clone()).await.unwrap();
    f.fleet.queue_job(&thing, job).await.unwrap();
    let mut events = f.fleet.subscribe();
    let start = || f.fleet.job_request(&thing, JobOp::StartNext, json!({}));
    start().await.unwrap().unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("the step timer fires")
            .unwrap();
        if let TwinEvent::Job { execution, .. } = &*e {
            seen.push((execution.status, execution.execution_number));
            if execution.status == JobStatus::Queued && execution.execution_number == 2 {
                start().await.unwrap().unwrap();
            }
        }
    }
    assert_eq!(
        seen,
        [
            (JobStatus::InProgress, 1),
            (JobStatus::Queued, 2),
            (JobStatus::InProgress, 2)
        ]
    );
    let e = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let TwinEvent::Job { execution, .. } = &*events.recv().await.unwrap() {
                return execution.clone();
            }
        }
    })
    .await
    .unwrap();
    assert_eq!((e.status, e.execution_number), (JobStatus::TimedOut, 2));
}
