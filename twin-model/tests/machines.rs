//! Properties of the command and job execution state machines under any sequence of
//! device messages, operator actions and clock ticks.

use proptest::prelude::*;
use serde_json::json;
use twin_model::DeviceId;
use twin_model::command::{CommandExecution, CommandStatus, DeviceResponse, NewCommand};
use twin_model::job::{
    ExecutionUpdate, JobExecution, JobStatus, RetryPolicy, Timeouts, Transition,
};

#[derive(Debug, Clone)]
enum JobOp {
    Start(Option<i64>),
    Update {
        status: &'static str,
        expected: Option<u64>,
        execution: Option<u64>,
        step: Option<i64>,
    },
    Tick,
    Cancel(bool),
    Remove(bool),
}

fn job_op() -> impl Strategy<Value = JobOp> {
    let status = prop::sample::select(vec![
        "IN_PROGRESS",
        "IN_PROGRESS",
        "SUCCEEDED",
        "FAILED",
        "FAILED",
        "REJECTED",
        "QUEUED",
        "TIMED_OUT",
        "CANCELED",
    ]);
    let minutes = prop::option::of(prop_oneof![Just(-1i64), 0i64..3, Just(20_000)]);
    prop_oneof![
        3 => minutes.clone().prop_map(JobOp::Start),
        6 => (status, prop::option::of(0u64..12), prop::option::of(0u64..4), minutes)
            .prop_map(|(status, expected, execution, step)| JobOp::Update { status, expected, execution, step }),
        3 => Just(JobOp::Tick),
        1 => any::<bool>().prop_map(JobOp::Cancel),
        1 => any::<bool>().prop_map(JobOp::Remove),
    ]
}

proptest! {
    #[test]
    fn job_executions_keep_their_invariants(
        on_failure in 0u32..4,
        on_timeout in 0u32..4,
        in_progress_min in 0u64..3,
        step_min in 0u64..3,
        ops in prop::collection::vec((job_op(), 0u64..200_000), 0..40),
    ) {
        let retry = RetryPolicy { on_failure, on_timeout };
        let timeouts = Timeouts { in_progress_ms: in_progress_min * 60_000, step_ms: step_min * 60_000 };
        let mut e = JobExecution::new("j".into(), DeviceId::parse("t").unwrap(), retry, timeouts, 0);
        let mut now = 0u64;
        let mut ended: Option<JobStatus> = None;
        for (op, dt) in ops {
            now += dt;
            let before = e.clone();
            let clocked = matches!(op, JobOp::Start(_) | JobOp::Update { .. } | JobOp::Tick);
            let outcome = match op {
                JobOp::Start(m) => Some(e.start(None, m, now).map_err(|_| ())),
                JobOp::Update { status, expected, execution, step } => {
                    let body = json!({
                        "status": status, "expectedVersion": expected,
                        "executionNumber": execution, "stepTimeoutInMinutes": step,
                        "statusDetails": {"step": "install"},
                    });
                    let u = ExecutionUpdate::parse(body.to_string().as_bytes()).unwrap();
                    Some(e.update(&u, now).map_err(|_| ()))
                }
                JobOp::Tick => e.tick(now).map(Ok),
                JobOp::Cancel(force) => Some(e.cancel(force, now).map_err(|_| ())),
                JobOp::Remove(force) => Some(e.remove(force, now).map_err(|_| ())),
            };
            // Once ended for good, nothing changes it again.
            if let Some(status) = ended {
                prop_assert_eq!(e.status, status);
                prop_assert_eq!(&e, &before);
            }
            if let Some(Ok(Transition::Ended(status))) = outcome {
                prop_assert_eq!(e.status, status);
                prop_assert!(status.is_terminal());
                ended = Some(status);
            }
            if e.status.is_terminal() {
                ended = Some(e.status);
            }
            // Retries never exceed their limits, and every retry is a new attempt.
            prop_assert!(e.retries_after_failure <= on_failure);
            prop_assert!(e.retries_after_timeout <= on_timeout);
            prop_assert_eq!(
                e.execution_number,
                1 + u64::from(e.retries_after_failure + e.retries_after_timeout)
            );
            // Versions only grow, and grow with every change.
            prop_assert!(e.version_number >= before.version_number);
            if e.status != before.status || e.status_details != before.status_details {
                prop_assert!(e.version_number > before.version_number);
            }
            // Only a running execution has a deadline, and once the clock was applied
            // it lies ahead.
            if e.status != JobStatus::InProgress {
                prop_assert_eq!(e.deadline(), None);
            }
            if clocked && let Some(d) = e.deadline() {
                prop_assert!(d > now, "deadline {} at {}", d, now);
            }
        }
    }

    #[test]
    fn commands_keep_their_invariants(
        timeout_s in 1u64..100,
        expires_s in 1u64..100,
        ops in prop::collection::vec((0u8..4, 0u8..5, 0u64..60_000), 0..20),
    ) {
        let new = NewCommand { name: "c".into(), payload: json!({}), timeout_seconds: timeout_s, expires_in_seconds: expires_s };
        let mut c = CommandExecution::new("e".into(), DeviceId::parse("t").unwrap(), new, 0).unwrap();
        let mut now = 0u64;
        for (kind, status, dt) in ops {
            now += dt;
            let before = c.clone();
            match kind {
                0 => { c.delivered(now); }
                1 => { c.expire(now); }
                _ => {
                    let status = ["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"][usize::from(status)];
                    if let Ok(r) = DeviceResponse::parse(json!({"status": status}).to_string().as_bytes()) {
                        let _ = c.respond(r, now);
                    }
                }
            }
            if before.status.is_terminal() {
                prop_assert_eq!(&c, &before, "a terminal command never changes");
            }
            prop_assert_eq!(c.completed_at.is_some(), c.status.is_terminal());
            prop_assert!(c.version >= before.version);
            if c.status != before.status {
                prop_assert!(c.version > before.version);
            }
            if c.status == CommandStatus::TimedOut {
                let code = c.reason.as_ref().map(|r| r.reason_code.as_str());
                prop_assert!(matches!(code, Some("EXPIRED" | "DEVICE_TIMEOUT")));
            }
        }
    }
}

fn pace() -> impl Strategy<Value = twin_model::rollout::Pace> {
    use twin_model::rollout::Pace;
    prop_oneof![
        Just(Pace::All),
        prop::collection::btree_set(1u32..=100, 1..4).prop_map(|s| Pace::Waves {
            percents: s.into_iter().collect()
        }),
        (1u32..50, 1.0f64..3.0, 0u32..100).prop_map(|(b, f, extra)| Pace::Rate {
            base_per_minute: b,
            factor: f,
            max_per_minute: b + extra
        }),
    ]
}

proptest! {
    #[test]
    fn a_rollout_releases_monotonically_and_never_past_its_targets(
        pace in pace(),
        total in 0u64..500,
        steps in prop::collection::vec((0u64..120_000, 0u64..50), 1..30),
    ) {
        let (mut released, mut finished, mut elapsed) = (0u64, 0u64, 0u64);
        for (dt, done) in steps {
            elapsed += dt;
            finished = (finished + done).min(released);
            let allowed = pace.allowed(total, released, finished, elapsed);
            prop_assert!(allowed >= released, "never takes back a release");
            prop_assert!(allowed <= total, "{} > {}", allowed, total);
            released = allowed;
        }
        // Once what was released has ended, waves and time bring in every target the
        // pace covers (the last wave's share).
        let covered = match &pace {
            twin_model::rollout::Pace::Waves { percents } => {
                (total * u64::from(*percents.last().unwrap())).div_ceil(100)
            }
            _ => total,
        };
        for _ in 0..5 {
            released = pace.allowed(total, released, released, elapsed + 1_000 * 60_000);
        }
        prop_assert!(released >= covered, "{} of {} covered", released, covered);
    }
}
