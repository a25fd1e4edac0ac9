//! Creating jobs: an id is created once, and a job reaches every target however the server
//! stops during its fan-out.

use std::sync::Arc;
use std::time::Duration;

use twin_model::job::{JobStatus, RetryPolicy, Timeouts};
use twin_model::rollout::{HealthGate, Pace};
use twin_model::{DeviceId, RejectionKind};
use twin_store::testing::CrashAfter;
use twin_store::{Committer, EmbeddedStore};

use super::jobs::{firmware_job, paced_job};
use super::{fleet, fleet_in, registered, stop};
use crate::{FleetConfig, FleetHandle};

#[tokio::test]
async fn a_job_id_is_created_once_even_by_concurrent_calls() {
    let f = fleet(FleetConfig::default()).await;
    for round in 0..20 {
        let job = firmware_job(
            &format!("fw-{round}"),
            RetryPolicy::default(),
            Timeouts::default(),
        );
        let (a, b) = tokio::join!(
            f.fleet.jobs().create(job.clone(), None),
            f.fleet.jobs().create(job.clone(), None)
        );
        let refused: Vec<_> = [a, b].into_iter().filter_map(Result::err).collect();
        assert_eq!(
            refused.len(),
            1,
            "round {round}: exactly one of the two is refused"
        );
        assert_eq!(refused[0].kind(), RejectionKind::VersionConflict);
    }
}

#[tokio::test]
async fn a_job_and_its_rollback_job_are_created_together_or_not_at_all() {
    let f = fleet(FleetConfig::default()).await;
    let job = firmware_job("fw-1", RetryPolicy::default(), Timeouts::default());
    f.fleet.jobs().create(job.clone(), None).await.unwrap();
    let rollback = firmware_job("fw-1-rollback", RetryPolicy::default(), Timeouts::default());
    let refused = f
        .fleet
        .jobs()
        .create(job, Some(rollback))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), RejectionKind::VersionConflict);
    assert!(
        f.fleet.jobs().get("fw-1-rollback").await.unwrap().is_none(),
        "the rollback job of a refused job was not created"
    );
}

const TARGETS: [&str; 5] = ["t1", "t2", "t3", "t4", "t5"];

#[tokio::test]
async fn a_job_whose_health_gate_does_not_parse_is_refused_not_stalled() {
    let f = fleet(FleetConfig::default()).await;
    registered(&f.fleet, &["t1"]).await;
    let mut job = (*paced_job(&f.fleet, "fw-gate", &["t1".into()], Pace::All)).clone();
    if let Some(r) = job.rollout.as_mut() {
        r.health = Some(HealthGate {
            filter: "reported.selfTest =".into(),
            window_ms: 1000,
        });
    }
    let refused = f
        .fleet
        .jobs()
        .create(Arc::new(job), None)
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), RejectionKind::BadRequest, "{refused}");
    assert!(refused.to_string().contains("health gate"), "{refused}");
    assert!(f.fleet.jobs().get("fw-gate").await.unwrap().is_none());
}

/// Creates an un-paced job over `TARGETS` on a store that dies after `commits` more
/// commits; then starts again on what reached the disk, as a restarted server does.
/// Returns the job's execution statuses once every target has one (or what there is
/// after ten seconds), and whether the job exists.
async fn fan_out_killed_after(commits: usize) -> (bool, Vec<(DeviceId, JobStatus)>) {
    let dir = tempfile::tempdir().unwrap();
    let config = FleetConfig::default();
    let (f, done) = fleet_in(dir.path(), &config).await;
    registered(&f, &TARGETS).await;
    stop(f, done).await;

    let store = Arc::new(CrashAfter::new(
        Arc::new(EmbeddedStore::open(dir.path(), 100).unwrap()),
        commits,
    ));
    let (committer, done) = Committer::start(store, 1024, 1024);
    let f = FleetHandle::start(config.clone(), committer).await.unwrap();
    let names = TARGETS.map(String::from);
    let _ = f
        .jobs()
        .create(paced_job(&f, "fw-all", &names, Pace::All), None)
        .await;
    stop(f, done).await;

    let (f, done) = fleet_in(dir.path(), &config).await;
    let mut events = f.queries().subscribe();
    f.jobs().resume_rollouts().await.unwrap();
    let exists = f.jobs().get("fw-all").await.unwrap().is_some();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let statuses = loop {
        let statuses = f.jobs().statuses("fw-all").await.unwrap();
        if !exists || statuses.len() == TARGETS.len() {
            break statuses;
        }
        // Wait for the next execution to be queued, up to the deadline.
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(_)) => {}
            _ => break statuses,
        }
    };
    stop(f, done).await;
    (exists, statuses)
}

#[tokio::test]
async fn an_unpaced_job_reaches_every_target_however_its_fan_out_was_cut_short() {
    // The definition, one execution per target, and the persisted release: a kill after
    // any of them, and after all.
    for commits in 0..=TARGETS.len() + 2 {
        let (exists, statuses) = fan_out_killed_after(commits).await;
        if commits == 0 {
            assert!(
                !exists,
                "a job whose definition never reached the disk is not there"
            );
            continue;
        }
        assert!(exists, "killed after {commits} commits: the job is there");
        let things: Vec<&str> = statuses.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            things, TARGETS,
            "killed after {commits} commits: every target, once"
        );
        assert!(
            statuses.iter().all(|(_, s)| *s == JobStatus::Queued),
            "killed after {commits} commits: {statuses:?}"
        );
    }
}
