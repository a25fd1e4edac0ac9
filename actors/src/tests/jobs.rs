//! Jobs: the device's Jobs API, attempts and retries on the clock, paced rollouts across
//! restarts, and taking targets out.

use super::*;

pub(super) fn firmware_job(id: &str, retry: RetryPolicy, timeouts: Timeouts) -> Arc<JobDefinition> {
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
        .unwrap();
    assert_eq!(pending["queuedJobs"][0]["jobId"], "fw-2");
    assert_eq!(pending["clientToken"], "c1");
    let started = ask(
        JobOp::StartNext,
        json!({"statusDetails": {"step": "download"}}),
    )
    .await
    .unwrap();
    assert_eq!(started["execution"]["status"], "IN_PROGRESS");
    assert_eq!(started["execution"]["versionNumber"], 2);
    // After a reboot the device finds its running job again.
    let resumed = ask(JobOp::Describe("$next".into()), json!({}))
        .await
        .unwrap();
    assert_eq!(resumed["execution"]["jobId"], "fw-2");
    assert_eq!(resumed["execution"]["statusDetails"]["step"], "download");
    let stale = ask(
        JobOp::Update("fw-2".into()),
        json!({"status": "IN_PROGRESS", "expectedVersion": 1}),
    )
    .await
    .unwrap_err()
    .into_refusal()
    .unwrap();
    assert_eq!(stale.code, JobErrorCode::VersionMismatch);
    let done = ask(
        JobOp::Update("fw-2".into()),
        json!({"status": "SUCCEEDED", "expectedVersion": 2, "includeJobExecutionState": true}),
    )
    .await
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
    let none = ask(JobOp::StartNext, json!({})).await.unwrap();
    assert!(none.get("execution").is_none());
    let unknown = ask(JobOp::Describe("other".into()), json!({}))
        .await
        .unwrap_err()
        .into_refusal()
        .unwrap();
    assert_eq!(unknown.code, JobErrorCode::ResourceNotFound);
    assert_eq!(
        f.fleet.jobs().statuses("fw-2").await.unwrap(),
        [(thing.clone(), JobStatus::Succeeded)]
    );
}

pub(super) fn job_of(e: &TwinEvent) -> Option<Arc<JobExecution>> {
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
        let started = ask(JobOp::StartNext, json!({})).await.unwrap();
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
        ;
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
pub(super) fn paced_job(
    f: &FleetHandle,
    id_: &str,
    targets: &[String],
    pace: Pace,
) -> Arc<JobDefinition> {
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
    // The executions are read after the count, and the controller may release more in
    // between (paused time jumps to its next look while a read waits on the store), so
    // every counted release has its execution, and there may be more.
    let released_at = async |at: Duration| {
        tokio::time::sleep_until(t0 + at + Duration::from_millis(100)).await;
        let job = f.fleet.jobs().get("fw-rate").await.unwrap().unwrap();
        let released = job.rollout.unwrap().released;
        let queued = f.fleet.jobs().statuses("fw-rate").await.unwrap();
        assert!(
            queued.len() as u64 >= released,
            "every release has its execution: {} executions for {released} released",
            queued.len()
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
    let completed_before =
        crate::telemetry::rollouts_ended(crate::telemetry::RolloutEnd::Completed);
    let f = fleet(on_tokio_time()).await;
    let mut events = two_waves(&f.fleet, "fw-del").await;
    let succeed = async |thing: &str| {
        let ask = |op, body| f.fleet.jobs().request(&id(thing), op, body);
        ask(JobOp::StartNext, json!({})).await.unwrap();
        ask(
            JobOp::Update("fw-del".into()),
            json!({"status": "SUCCEEDED"}),
        )
        .await
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
    // Other tests may end rollouts meanwhile (the metrics are the process's): at least this one.
    assert!(
        crate::telemetry::rollouts_ended(crate::telemetry::RolloutEnd::Completed)
            > completed_before,
        "doppel_rollouts_ended_total{{outcome=\"completed\"}} counts it"
    );
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
