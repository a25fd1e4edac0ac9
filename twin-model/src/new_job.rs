//! A job as an operator asks for it: [`NewJob`] becomes the job's definition and, when it
//! has one, its rollback job's, by the same rules whichever API asked. The fleet's Jobs
//! service then creates both in one commit and fans the job out.

use serde_json::Value;

use crate::DeviceId;
use crate::job::{JobDefinition, MAX_RETRIES, RetryPolicy, Timeouts};
use crate::rollout::{AbortPolicy, HealthGate, Pace, Rollout};
use crate::topic::valid_job_id;

#[derive(Debug, Clone)]
pub struct NewJob {
    pub job_id: String,
    /// What devices receive as `jobDocument`.
    pub document: Value,
    /// The document of the job that takes a device back when its execution fails after
    /// installing (`rollback: auto`); the rollback job is `{job_id}-rollback`.
    pub rollback_document: Option<Value>,
    /// Retries after `FAILED` and after `TIMED_OUT`, each.
    pub retries: u32,
    pub timeouts: Timeouts,
    /// In the order they get their executions.
    pub targets: Vec<DeviceId>,
    /// `None`: every target at once.
    pub pace: Option<Pace>,
    pub abort: Option<AbortPolicy>,
    pub health: Option<HealthGate>,
}

/// The suffix of a rollback job's id.
pub const ROLLBACK_SUFFIX: &str = "-rollback";

impl NewJob {
    /// The job's definition and its rollback job's, created at `now`; or what is wrong.
    pub fn into_definitions(
        self,
        now: u64,
    ) -> Result<(JobDefinition, Option<JobDefinition>), String> {
        if !valid_job_id(&self.job_id) {
            return Err("jobId must be 1 to 64 of A-Z a-z 0-9 _ -".into());
        }
        if self.retries > MAX_RETRIES {
            return Err(format!("retries must be at most {MAX_RETRIES}"));
        }
        let rollback = match self.rollback_document {
            Some(document) => {
                let job_id = format!("{}{ROLLBACK_SUFFIX}", self.job_id);
                if !valid_job_id(&job_id) {
                    return Err(format!(
                        "with a rollback, jobId must be at most {} characters",
                        64 - ROLLBACK_SUFFIX.len()
                    ));
                }
                Some(JobDefinition {
                    job_id,
                    document,
                    retry: RetryPolicy::default(),
                    timeouts: Timeouts::default(),
                    created_at: now,
                    canceled_at: None,
                    rollback_job: None,
                    rollout: None,
                })
            }
            None => None,
        };
        let job = JobDefinition {
            rollback_job: rollback.as_ref().map(|r| r.job_id.clone()),
            job_id: self.job_id,
            document: self.document,
            retry: RetryPolicy {
                on_failure: self.retries,
                on_timeout: self.retries,
            },
            timeouts: self.timeouts,
            created_at: now,
            canceled_at: None,
            // Without a pace, every target at once: the job's rollout controller fans out
            // either way, so that the fan-out survives a restart.
            rollout: Some(Rollout {
                pace: self.pace.unwrap_or(Pace::All),
                abort: self.abort,
                targets: self.targets,
                released: 0,
                started_at: now,
                paused_at: None,
                aborted_at: None,
                health: self.health,
                healthy: Vec::new(),
                unhealthy: Vec::new(),
            }),
        };
        Ok((job, rollback))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_job(id: &str, rollback: bool) -> NewJob {
        NewJob {
            job_id: id.into(),
            document: serde_json::json!({"firmware": {"version": "2"}}),
            rollback_document: rollback.then(|| serde_json::json!({"firmware": {"version": "1"}})),
            retries: 2,
            timeouts: Timeouts::default(),
            targets: vec![DeviceId::parse("t1").unwrap()],
            pace: None,
            abort: None,
            health: None,
        }
    }

    #[test]
    fn a_job_with_a_rollback_names_it_and_fans_out_all_at_once_without_a_pace() {
        let (job, rollback) = new_job("fw-2", true).into_definitions(7).unwrap();
        let rollback = rollback.unwrap();
        assert_eq!(rollback.job_id, "fw-2-rollback");
        assert_eq!(job.rollback_job.as_deref(), Some("fw-2-rollback"));
        assert_eq!(rollback.document["firmware"]["version"], "1");
        let rollout = job.rollout.unwrap();
        assert_eq!(
            (rollout.pace, rollout.released, rollout.started_at),
            (Pace::All, 0, 7)
        );
        assert_eq!((job.retry.on_failure, job.retry.on_timeout), (2, 2));
    }

    #[test]
    fn ids_too_long_for_their_rollback_and_too_many_retries_are_refused() {
        let long = "j".repeat(60);
        assert!(new_job(&long, false).into_definitions(0).is_ok());
        let err = new_job(&long, true).into_definitions(0).unwrap_err();
        assert!(err.contains("at most 55"), "{err}");
        let mut many = new_job("fw", false);
        many.retries = MAX_RETRIES + 1;
        assert!(many.into_definitions(0).is_err());
    }
}
