//! Commands: delivery to a listening device, answers, and deadlines on the clock, also
//! across passivation and restarts.

use super::jobs::{firmware_job, job_of};
use super::*;

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

pub(super) fn new_command(timeout_seconds: u64, expires_in_seconds: u64) -> NewCommand {
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

pub(super) fn command_of(e: &TwinEvent) -> Option<Arc<CommandExecution>> {
    match e {
        TwinEvent::Command { execution, .. } => Some(execution.clone()),
        _ => None,
    }
}

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
