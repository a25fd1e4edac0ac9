//! Where a job stands: the one place that decides when a job is complete, aborted,
//! paused or canceled, and what counts as finished or failed. The rollout controller
//! (to stop or abort) and the API (to show a status) both ask [`Progress::of`] and
//! [`JobDefinition::state`]; neither decides on its own.

use crate::DeviceId;
use crate::job::{JobDefinition, JobStatus};

/// What a job's executions add up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Things the job is for.
    pub targets: u64,
    /// Targets with an execution.
    pub released: u64,
    /// Executions that ended, and, under a health gate, a succeeded one also judged.
    pub finished: u64,
    /// Executions that failed, timed out or were rejected, and succeeded targets judged
    /// unhealthy: what an abort policy counts.
    pub failed: u64,
    /// A health gate still has succeeded targets to judge.
    pub awaiting_verdicts: bool,
}

/// A job as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Some executions have not ended, or the rollout has targets left.
    InProgress,
    /// The rollout releases no new executions until resumed.
    Paused,
    /// Every target's execution ended (and was judged, under a health gate).
    Completed,
    /// An operator canceled it.
    Canceled,
    /// Too many executions failed: the abort policy stopped it.
    Aborted,
}

impl Progress {
    /// Adds up `statuses`, the job's executions by thing.
    pub fn of(job: &JobDefinition, statuses: &[(DeviceId, JobStatus)]) -> Self {
        let rollout = job.rollout.as_ref();
        let gate = rollout.filter(|r| r.health.is_some());
        let judged = |thing: &DeviceId| {
            gate.is_none_or(|r| r.healthy.contains(thing) || r.unhealthy.contains(thing))
        };
        let mut progress = Self {
            targets: rollout.map_or(statuses.len() as u64, |r| r.total()),
            released: statuses.len() as u64,
            finished: 0,
            failed: rollout.map_or(0, |r| r.unhealthy.len() as u64),
            awaiting_verdicts: false,
        };
        for (thing, status) in statuses {
            let unjudged = *status == JobStatus::Succeeded && !judged(thing);
            progress.awaiting_verdicts |= unjudged;
            if status.is_terminal() && !unjudged {
                progress.finished += 1;
            }
            if matches!(
                status,
                JobStatus::Failed | JobStatus::TimedOut | JobStatus::Rejected
            ) {
                progress.failed += 1;
            }
        }
        progress
    }

    /// Every target has an execution, and every execution finished.
    pub fn complete(&self) -> bool {
        self.released >= self.targets && self.finished == self.released
    }
}

impl JobDefinition {
    /// The job's state, given its [`Progress`].
    pub fn state(&self, progress: &Progress) -> JobState {
        let rollout = self.rollout.as_ref();
        if self.canceled_at.is_some() {
            JobState::Canceled
        } else if rollout.is_some_and(|r| r.aborted_at.is_some()) {
            JobState::Aborted
        } else if progress.complete() {
            JobState::Completed
        } else if rollout.is_some_and(|r| r.paused_at.is_some()) {
            JobState::Paused
        } else {
            JobState::InProgress
        }
    }

    /// Whether the job still needs its rollout controller: it has targets to release or
    /// executions to watch, and was neither canceled nor aborted.
    pub fn rollout_under_way(&self) -> bool {
        self.canceled_at.is_none()
            && self
                .rollout
                .as_ref()
                .is_some_and(|r| r.aborted_at.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{RetryPolicy, Timeouts};
    use crate::rollout::{HealthGate, Pace, Rollout};

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn job(targets: &[&str], gated: bool) -> JobDefinition {
        JobDefinition {
            job_id: "j".into(),
            document: serde_json::json!({}),
            retry: RetryPolicy::default(),
            timeouts: Timeouts::default(),
            created_at: 0,
            canceled_at: None,
            rollback_job: None,
            rollout: Some(Rollout {
                pace: Pace::All,
                abort: None,
                targets: targets.iter().map(|t| id(t)).collect(),
                released: targets.len() as u64,
                started_at: 0,
                paused_at: None,
                aborted_at: None,
                health: gated.then(|| HealthGate {
                    filter: "reported.ok = true".into(),
                    window_ms: 1000,
                }),
                healthy: vec![],
                unhealthy: vec![],
            }),
        }
    }

    #[test]
    fn a_job_is_complete_once_every_target_ended() {
        let j = job(&["a", "b"], false);
        let one = [(id("a"), JobStatus::Succeeded)];
        assert_eq!(j.state(&Progress::of(&j, &one)), JobState::InProgress);
        let running = [
            (id("a"), JobStatus::Succeeded),
            (id("b"), JobStatus::InProgress),
        ];
        assert_eq!(j.state(&Progress::of(&j, &running)), JobState::InProgress);
        let ended = [
            (id("a"), JobStatus::Succeeded),
            (id("b"), JobStatus::Failed),
        ];
        let p = Progress::of(&j, &ended);
        assert_eq!((p.finished, p.failed), (2, 1));
        assert_eq!(j.state(&p), JobState::Completed);
    }

    #[test]
    fn under_a_health_gate_a_success_finishes_once_judged_and_unhealthy_counts_as_failed() {
        let mut j = job(&["a"], true);
        let done = [(id("a"), JobStatus::Succeeded)];
        let p = Progress::of(&j, &done);
        assert!(p.awaiting_verdicts);
        assert_eq!(j.state(&p), JobState::InProgress);
        j.rollout.as_mut().unwrap().unhealthy.push(id("a"));
        let p = Progress::of(&j, &done);
        assert_eq!((p.finished, p.failed, p.awaiting_verdicts), (1, 1, false));
        assert_eq!(j.state(&p), JobState::Completed);
    }

    #[test]
    fn canceled_and_aborted_win_over_progress_and_paused_over_in_progress() {
        let mut j = job(&["a"], false);
        let none: [(DeviceId, JobStatus); 0] = [];
        j.rollout.as_mut().unwrap().paused_at = Some(1);
        assert_eq!(j.state(&Progress::of(&j, &none)), JobState::Paused);
        j.rollout.as_mut().unwrap().aborted_at = Some(2);
        assert_eq!(j.state(&Progress::of(&j, &none)), JobState::Aborted);
        assert!(!j.rollout_under_way());
        j.canceled_at = Some(3);
        assert_eq!(j.state(&Progress::of(&j, &none)), JobState::Canceled);
    }
}
