//! One device's execution of one job, with the semantics of the AWS IoT Jobs device API, as
//! a pure state machine with time passed in (milliseconds since the epoch).
//!
//! ```text
//!            device              device
//! QUEUED ─────────────▶ IN_PROGRESS ─────────▶ SUCCEEDED | FAILED | REJECTED
//!   │  └──────────── device ─────────────────▶ SUCCEEDED | FAILED | REJECTED
//!   │                   │ clock (step or in-progress timeout)
//!   │                   └──────────────────▶ TIMED_OUT
//!   └── operator ──▶ CANCELED (job canceled) | REMOVED (thing taken out of the job);
//!                    IN_PROGRESS too, with force
//! ```
//!
//! A `FAILED` or `TIMED_OUT` attempt with retries left starts a new attempt: back to
//! `QUEUED` with the next `executionNumber`. Terminal statuses never change again. Every
//! change bumps `versionNumber`; a device update may carry the `expectedVersion` and the
//! `executionNumber` it believes current, and is refused when either is stale.
//!
//! Over 600 lines: the job execution state machine and its AWS payloads are one unit (630
//! lines), followed by its unit tests.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::DeviceId;

/// Most `statusDetails` entries, and their key and value lengths.
pub const MAX_STATUS_DETAILS: usize = 10;
pub const MAX_DETAIL_KEY: usize = 128;
pub const MAX_DETAIL_VALUE: usize = 1024;
/// Longest step timeout a device may ask for: 7 days, in minutes.
pub const MAX_STEP_TIMEOUT_MINUTES: i64 = 10_080;
/// Most retries a job may configure.
pub const MAX_RETRIES: u32 = 10;
/// `statusDetails.step` values from which on a failed update has touched the installed
/// firmware, so that the device needs a rollback.
pub const AFTER_INSTALL_STEPS: &[&str] = &["install", "reboot", "verify", "activate"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    Queued,
    InProgress,
    Succeeded,
    Failed,
    TimedOut,
    Rejected,
    Removed,
    Canceled,
}

impl JobStatus {
    pub const ALL: [Self; 8] = [
        Self::Queued,
        Self::InProgress,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Rejected,
        Self::Removed,
        Self::Canceled,
    ];

    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::InProgress)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::InProgress => "IN_PROGRESS",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::TimedOut => "TIMED_OUT",
            Self::Rejected => "REJECTED",
            Self::Removed => "REMOVED",
            Self::Canceled => "CANCELED",
        }
    }

    /// Statuses a device may set with an update.
    fn from_device(s: &str) -> Option<Self> {
        Some(match s {
            "IN_PROGRESS" => Self::InProgress,
            "SUCCEEDED" => Self::Succeeded,
            "FAILED" => Self::Failed,
            "REJECTED" => Self::Rejected,
            _ => return None,
        })
    }
}

/// The `code` of a Jobs `rejected` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobErrorCode {
    InvalidTopic,
    InvalidJson,
    InvalidRequest,
    InvalidStateTransition,
    ResourceNotFound,
    VersionMismatch,
    InternalError,
    RequestThrottled,
    TerminalStateReached,
}

impl JobErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidTopic => "InvalidTopic",
            Self::InvalidJson => "InvalidJson",
            Self::InvalidRequest => "InvalidRequest",
            Self::InvalidStateTransition => "InvalidStateTransition",
            Self::ResourceNotFound => "ResourceNotFound",
            Self::VersionMismatch => "VersionMismatch",
            Self::InternalError => "InternalError",
            Self::RequestThrottled => "RequestThrottled",
            Self::TerminalStateReached => "TerminalStateReached",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub code: JobErrorCode,
    pub message: String,
    /// The execution as it is, for `InvalidStateTransition` and `VersionMismatch`.
    pub state: Option<ExecutionState>,
}

impl JobError {
    pub fn new(code: JobErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            state: None,
        }
    }

    /// The `rejected` answer.
    pub fn payload(&self, client_token: Option<&str>, now: u64) -> Value {
        let mut m = Map::new();
        m.insert("code".into(), self.code.as_str().into());
        m.insert("message".into(), self.message.clone().into());
        m.insert("timestamp".into(), (now / 1000).into());
        if let Some(t) = client_token {
            m.insert("clientToken".into(), t.into());
        }
        if let Some(s) = &self.state {
            m.insert("executionState".into(), s.to_json());
        }
        Value::Object(m)
    }
}

/// `executionState` in answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionState {
    pub status: JobStatus,
    pub status_details: Map<String, Value>,
    pub version_number: u64,
}

impl ExecutionState {
    pub fn to_json(&self) -> Value {
        json!({
            "status": self.status.as_str(),
            "statusDetails": self.status_details,
            "versionNumber": self.version_number,
        })
    }
}

/// How a job retries a device's failed attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after `FAILED`.
    pub on_failure: u32,
    /// Retries after `TIMED_OUT`.
    pub on_timeout: u32,
}

/// Time limits of a job's executions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// From `IN_PROGRESS` to a terminal status, in ms (none when 0).
    pub in_progress_ms: u64,
    /// Default step timeout for `start-next`, in ms (none when 0); a device may set its
    /// own with `stepTimeoutInMinutes`.
    pub step_ms: u64,
}

/// A device's update of its execution (`.../jobs/{jobId}/update`).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionUpdate {
    pub status: Option<String>,
    #[serde(default)]
    pub status_details: Option<Map<String, Value>>,
    pub expected_version: Option<u64>,
    pub execution_number: Option<u64>,
    pub step_timeout_in_minutes: Option<i64>,
    #[serde(default)]
    pub include_job_execution_state: bool,
    #[serde(default)]
    pub include_job_document: bool,
    pub client_token: Option<String>,
}

impl ExecutionUpdate {
    pub fn parse(body: &[u8]) -> Result<Self, JobError> {
        serde_json::from_slice(body).map_err(|e| {
            let code = if serde_json::from_slice::<Value>(body).is_ok() {
                JobErrorCode::InvalidRequest
            } else {
                JobErrorCode::InvalidJson
            };
            JobError::new(code, format!("the request is not valid: {e}"))
        })
    }
}

fn check_details(details: &Map<String, Value>) -> Result<(), JobError> {
    if details.len() > MAX_STATUS_DETAILS {
        return Err(JobError::new(
            JobErrorCode::InvalidRequest,
            format!("statusDetails has more than {MAX_STATUS_DETAILS} entries"),
        ));
    }
    for (k, v) in details {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_DETAIL_KEY
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-:".contains(&b));
        let value_ok = v
            .as_str()
            .is_some_and(|s| !s.is_empty() && s.len() <= MAX_DETAIL_VALUE);
        if !key_ok || !value_ok {
            return Err(JobError::new(
                JobErrorCode::InvalidRequest,
                format!(
                    "statusDetails entries are names of 1-{MAX_DETAIL_KEY} characters (A-Z, a-z, 0-9, _ - :) with string values of 1-{MAX_DETAIL_VALUE} bytes; {k:?} is not"
                ),
            ));
        }
    }
    Ok(())
}

/// A job: what every targeted device is to run, and how its executions behave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobDefinition {
    pub job_id: String,
    /// The job document devices receive (`jobDocument`).
    pub document: Value,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default)]
    pub timeouts: Timeouts,
    pub created_at: u64,
    /// When an operator canceled the job: its queued executions were canceled then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canceled_at: Option<u64>,
    /// A paced rollout; without one, every target got its execution at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::rollout::Rollout>,
    /// The job (back to the previous firmware) a device gets when its execution fails
    /// after installing (`rollback: auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_job: Option<String>,
}

impl JobDefinition {
    /// The firmware version the document installs, if it is a firmware update.
    pub fn firmware_version(&self) -> Option<&str> {
        self.document["firmware"]["version"].as_str()
    }
}

/// One thing's execution of one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobExecution {
    pub job_id: String,
    pub thing: DeviceId,
    pub status: JobStatus,
    pub status_details: Map<String, Value>,
    pub queued_at: u64,
    pub started_at: Option<u64>,
    pub last_updated_at: u64,
    pub version_number: u64,
    /// 1 for the first attempt, one more for every retry.
    pub execution_number: u64,
    pub retries_after_failure: u32,
    pub retries_after_timeout: u32,
    pub retry: RetryPolicy,
    pub timeouts: Timeouts,
    /// The running step must end by then.
    pub step_deadline: Option<u64>,
    /// `statusDetails.step` when the last attempt failed: a failure after install needs
    /// a rollback.
    pub failed_at_step: Option<String>,
}

/// What a transition did, for events and for the rollout controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The same attempt moved on (or only its details changed).
    Updated,
    /// The attempt ended and a new one was queued.
    Retried { ended: JobStatus },
    /// The execution ended for good.
    Ended(JobStatus),
}

impl JobExecution {
    pub fn new(
        job_id: String,
        thing: DeviceId,
        retry: RetryPolicy,
        timeouts: Timeouts,
        now: u64,
    ) -> Self {
        Self {
            job_id,
            thing,
            status: JobStatus::Queued,
            status_details: Map::new(),
            queued_at: now,
            started_at: None,
            last_updated_at: now,
            version_number: 1,
            execution_number: 1,
            retries_after_failure: 0,
            retries_after_timeout: 0,
            retry: RetryPolicy {
                on_failure: retry.on_failure.min(MAX_RETRIES),
                on_timeout: retry.on_timeout.min(MAX_RETRIES),
            },
            timeouts,
            step_deadline: None,
            failed_at_step: None,
        }
    }

    /// Whether this execution failed for good after installing.
    pub fn needs_rollback(&self) -> bool {
        self.status == JobStatus::Failed
            && self
                .failed_at_step
                .as_deref()
                .is_some_and(|s| AFTER_INSTALL_STEPS.contains(&s))
    }

    pub fn state(&self) -> ExecutionState {
        ExecutionState {
            status: self.status,
            status_details: self.status_details.clone(),
            version_number: self.version_number,
        }
    }

    fn refuse(&self, code: JobErrorCode, message: impl Into<String>) -> JobError {
        JobError {
            code,
            message: message.into(),
            state: Some(self.state()),
        }
    }

    /// When the clock next matters for this execution.
    pub fn deadline(&self) -> Option<u64> {
        if self.status != JobStatus::InProgress {
            return None;
        }
        let overall = (self.timeouts.in_progress_ms > 0).then(|| {
            self.started_at.unwrap_or(self.last_updated_at) + self.timeouts.in_progress_ms
        });
        match (overall, self.step_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Seconds before the execution times out, as `approximateSecondsBeforeTimedOut`.
    pub fn seconds_before_timeout(&self, now: u64) -> Option<u64> {
        self.deadline().map(|d| d.saturating_sub(now) / 1000)
    }

    /// The step deadline a device asks for: `minutes` from now, or none for -1.
    fn step_deadline_for(minutes: i64, now: u64) -> Result<Option<u64>, JobError> {
        match minutes {
            -1 => Ok(None),
            m if (1..=MAX_STEP_TIMEOUT_MINUTES).contains(&m) => Ok(Some(now + m as u64 * 60_000)),
            m => Err(JobError::new(
                JobErrorCode::InvalidRequest,
                format!(
                    "stepTimeoutInMinutes must be 1 to {MAX_STEP_TIMEOUT_MINUTES}, or -1 to stop the step timer; not {m}"
                ),
            )),
        }
    }

    /// `start-next`: a queued execution becomes `IN_PROGRESS`; one already in progress is
    /// returned as it is (a device resuming after a reboot).
    pub fn start(
        &mut self,
        details: Option<Map<String, Value>>,
        step_timeout_minutes: Option<i64>,
        now: u64,
    ) -> Result<Transition, JobError> {
        self.tick(now);
        match self.status {
            JobStatus::InProgress => return Ok(Transition::Updated),
            JobStatus::Queued => {}
            s => {
                return Err(self.refuse(
                    JobErrorCode::InvalidStateTransition,
                    format!("the execution ended {}", s.as_str()),
                ));
            }
        }
        if let Some(d) = &details {
            check_details(d)?;
        }
        self.step_deadline = match step_timeout_minutes {
            Some(m) => Self::step_deadline_for(m, now)?,
            None => (self.timeouts.step_ms > 0).then(|| now + self.timeouts.step_ms),
        };
        if let Some(d) = details {
            self.status_details = d;
        }
        self.status = JobStatus::InProgress;
        self.started_at = Some(now);
        self.touch(now);
        Ok(Transition::Updated)
    }

    /// A device's update.
    pub fn update(&mut self, u: &ExecutionUpdate, now: u64) -> Result<Transition, JobError> {
        self.tick(now);
        if let Some(n) = u.execution_number
            && n != self.execution_number
        {
            return Err(JobError::new(
                JobErrorCode::ResourceNotFound,
                format!(
                    "execution {n} of job {} does not exist; the current one is {}",
                    self.job_id, self.execution_number
                ),
            ));
        }
        if let Some(v) = u.expected_version
            && v != self.version_number
        {
            return Err(self.refuse(
                JobErrorCode::VersionMismatch,
                format!(
                    "expectedVersion {v} is not the current version {}",
                    self.version_number
                ),
            ));
        }
        let Some(status) = u.status.as_deref() else {
            return Err(JobError::new(
                JobErrorCode::InvalidRequest,
                "status is required",
            ));
        };
        let Some(next) = JobStatus::from_device(status) else {
            return Err(JobError::new(
                JobErrorCode::InvalidRequest,
                format!(
                    "status {status:?} cannot be set by a device: use IN_PROGRESS, SUCCEEDED, FAILED or REJECTED"
                ),
            ));
        };
        if self.status.is_terminal() {
            return Err(self.refuse(
                JobErrorCode::InvalidStateTransition,
                format!(
                    "the execution ended {}; it cannot become {status}",
                    self.status.as_str()
                ),
            ));
        }
        if let Some(d) = &u.status_details {
            check_details(d)?;
        }
        if next == JobStatus::InProgress {
            if let Some(m) = u.step_timeout_in_minutes {
                self.step_deadline = Self::step_deadline_for(m, now)?;
            }
            if self.status == JobStatus::Queued {
                self.started_at = Some(now);
            }
        }
        if let Some(d) = &u.status_details {
            self.status_details = d.clone();
        }
        self.status = next;
        self.touch(now);
        Ok(match next {
            JobStatus::InProgress => Transition::Updated,
            ended => self.ended(ended, now),
        })
    }

    /// Applies the clock: an `IN_PROGRESS` execution past its step or overall deadline
    /// times out. Returns what happened, if anything.
    pub fn tick(&mut self, now: u64) -> Option<Transition> {
        let deadline = self.deadline()?;
        if now < deadline {
            return None;
        }
        self.status = JobStatus::TimedOut;
        self.touch(now);
        Some(self.ended(JobStatus::TimedOut, now))
    }

    /// The operator cancels. An `IN_PROGRESS` execution is canceled only with `force`.
    pub fn cancel(&mut self, force: bool, now: u64) -> Result<Transition, JobError> {
        self.end_by_operator(JobStatus::Canceled, force, now)
    }

    /// The operator takes the thing out of the job. An `IN_PROGRESS` execution is removed
    /// only with `force`.
    pub fn remove(&mut self, force: bool, now: u64) -> Result<Transition, JobError> {
        self.end_by_operator(JobStatus::Removed, force, now)
    }

    fn end_by_operator(
        &mut self,
        status: JobStatus,
        force: bool,
        now: u64,
    ) -> Result<Transition, JobError> {
        match self.status {
            JobStatus::Queued => {}
            JobStatus::InProgress if force => {}
            JobStatus::InProgress => {
                return Err(self.refuse(
                    JobErrorCode::InvalidStateTransition,
                    "the execution is IN_PROGRESS: end it with force",
                ));
            }
            s => return Ok(Transition::Ended(s)),
        }
        self.status = status;
        self.step_deadline = None;
        self.touch(now);
        Ok(Transition::Ended(status))
    }

    /// After an attempt ended with `status`: retry when the policy allows.
    fn ended(&mut self, status: JobStatus, now: u64) -> Transition {
        self.step_deadline = None;
        if status == JobStatus::Failed || status == JobStatus::TimedOut {
            self.failed_at_step = self
                .status_details
                .get("step")
                .and_then(Value::as_str)
                .map(str::to_owned);
        }
        let retry = match status {
            JobStatus::Failed if self.retries_after_failure < self.retry.on_failure => {
                self.retries_after_failure += 1;
                true
            }
            JobStatus::TimedOut if self.retries_after_timeout < self.retry.on_timeout => {
                self.retries_after_timeout += 1;
                true
            }
            _ => false,
        };
        if !retry {
            return Transition::Ended(status);
        }
        self.status = JobStatus::Queued;
        self.execution_number += 1;
        self.status_details = Map::new();
        self.started_at = None;
        self.queued_at = now;
        self.touch(now);
        Transition::Retried { ended: status }
    }

    fn touch(&mut self, now: u64) {
        self.last_updated_at = self.last_updated_at.max(now);
        self.version_number += 1;
    }

    /// A `JobExecutionSummary` (in `get` and `notify`).
    pub fn summary(&self) -> Value {
        let mut m = Map::new();
        m.insert("jobId".into(), self.job_id.clone().into());
        m.insert("queuedAt".into(), (self.queued_at / 1000).into());
        if let Some(s) = self.started_at {
            m.insert("startedAt".into(), (s / 1000).into());
        }
        m.insert("lastUpdatedAt".into(), (self.last_updated_at / 1000).into());
        m.insert("versionNumber".into(), self.version_number.into());
        m.insert("executionNumber".into(), self.execution_number.into());
        Value::Object(m)
    }

    /// A `JobExecution` document with the job document (in `get`, `start-next`,
    /// `notify-next`).
    pub fn document(&self, job_document: &Value, now: u64) -> Value {
        let Value::Object(mut m) = self.summary() else {
            return Value::Null;
        };
        m.insert("thingName".into(), self.thing.as_str().into());
        m.insert("status".into(), self.status.as_str().into());
        m.insert(
            "statusDetails".into(),
            Value::Object(self.status_details.clone()),
        );
        m.insert("jobDocument".into(), job_document.clone());
        if let Some(s) = self.seconds_before_timeout(now) {
            m.insert("approximateSecondsBeforeTimedOut".into(), s.into());
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(retry: RetryPolicy, timeouts: Timeouts) -> JobExecution {
        JobExecution::new(
            "fw-2".into(),
            DeviceId::parse("pump-1").unwrap(),
            retry,
            timeouts,
            1_000,
        )
    }

    fn update(body: Value) -> ExecutionUpdate {
        ExecutionUpdate::parse(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_device_starts_reports_progress_and_succeeds() {
        let mut e = exec(RetryPolicy::default(), Timeouts::default());
        let details = json!({"step": "download", "percent": "10"});
        e.start(details.as_object().cloned(), Some(5), 2_000)
            .unwrap();
        assert_eq!(e.status, JobStatus::InProgress);
        assert_eq!(e.started_at, Some(2_000));
        assert_eq!(e.step_deadline, Some(2_000 + 5 * 60_000));
        assert_eq!(e.version_number, 2);
        // Resuming after a reboot: start-next gives the same execution back.
        assert_eq!(e.start(None, None, 3_000), Ok(Transition::Updated));
        assert_eq!(e.version_number, 2);
        let t = e
            .update(
                &update(json!({"status": "IN_PROGRESS", "statusDetails": {"step": "install", "percent": "80"}, "expectedVersion": 2})),
                4_000,
            )
            .unwrap();
        assert_eq!(t, Transition::Updated);
        assert_eq!(e.status_details["step"], "install");
        let t = e
            .update(
                &update(json!({"status": "SUCCEEDED", "executionNumber": 1})),
                5_000,
            )
            .unwrap();
        assert_eq!(t, Transition::Ended(JobStatus::Succeeded));
        assert_eq!(e.deadline(), None);
        let late = e
            .update(&update(json!({"status": "FAILED"})), 6_000)
            .unwrap_err();
        assert_eq!(late.code, JobErrorCode::InvalidStateTransition);
        assert_eq!(late.state.unwrap().status, JobStatus::Succeeded);
    }

    #[test]
    fn stale_versions_and_execution_numbers_are_refused() {
        let mut e = exec(RetryPolicy::default(), Timeouts::default());
        let err = e
            .update(
                &update(json!({"status": "IN_PROGRESS", "expectedVersion": 7})),
                2_000,
            )
            .unwrap_err();
        assert_eq!(err.code, JobErrorCode::VersionMismatch);
        assert_eq!(err.state.as_ref().unwrap().version_number, 1);
        let err = e
            .update(
                &update(json!({"status": "IN_PROGRESS", "executionNumber": 2})),
                2_000,
            )
            .unwrap_err();
        assert_eq!(err.code, JobErrorCode::ResourceNotFound);
        assert_eq!(e.version_number, 1, "a refused update changes nothing");
    }

    #[test]
    fn bad_updates_say_why() {
        let mut e = exec(RetryPolicy::default(), Timeouts::default());
        for (body, code, needle) in [
            (
                json!({"status": "QUEUED"}),
                JobErrorCode::InvalidRequest,
                "cannot be set",
            ),
            (
                json!({"status": "TIMED_OUT"}),
                JobErrorCode::InvalidRequest,
                "cannot be set",
            ),
            (json!({}), JobErrorCode::InvalidRequest, "required"),
            (
                json!({"status": "IN_PROGRESS", "statusDetails": {"percent": 10}}),
                JobErrorCode::InvalidRequest,
                "string values",
            ),
            (
                json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": 0}),
                JobErrorCode::InvalidRequest,
                "stepTimeoutInMinutes",
            ),
        ] {
            let err = e.update(&update(body.clone()), 2_000).unwrap_err();
            assert_eq!(err.code, code, "{body}");
            assert!(err.message.contains(needle), "{body}: {}", err.message);
        }
        let many: Map<String, Value> = (0..11).map(|i| (format!("k{i}"), json!("v"))).collect();
        let err = e
            .update(
                &update(json!({"status": "IN_PROGRESS", "statusDetails": many})),
                2_000,
            )
            .unwrap_err();
        assert!(err.message.contains("more than 10"));
        assert_eq!(
            ExecutionUpdate::parse(b"{nope").unwrap_err().code,
            JobErrorCode::InvalidJson
        );
        assert_eq!(
            ExecutionUpdate::parse(br#"{"expectedVersion": "x"}"#)
                .unwrap_err()
                .code,
            JobErrorCode::InvalidRequest
        );
        assert_eq!(e.status, JobStatus::Queued);
        assert_eq!(e.version_number, 1);
    }

    #[test]
    fn timeouts_end_attempts_and_retries_start_new_ones() {
        let retry = RetryPolicy {
            on_failure: 1,
            on_timeout: 1,
        };
        let timeouts = Timeouts {
            in_progress_ms: 60_000,
            step_ms: 10_000,
        };
        let mut e = exec(retry, timeouts);
        e.start(None, None, 0).unwrap();
        assert_eq!(e.deadline(), Some(10_000), "the step comes first");
        assert_eq!(e.seconds_before_timeout(4_000), Some(6));
        assert_eq!(e.tick(9_999), None);
        assert_eq!(
            e.tick(10_000),
            Some(Transition::Retried {
                ended: JobStatus::TimedOut
            })
        );
        assert_eq!((e.status, e.execution_number), (JobStatus::Queued, 2));
        // The second attempt: the device extends its step, then the overall limit hits.
        e.start(None, Some(-1), 20_000).unwrap();
        assert_eq!(e.deadline(), Some(80_000));
        e.update(
            &update(json!({"status": "IN_PROGRESS", "stepTimeoutInMinutes": 30})),
            21_000,
        )
        .unwrap();
        assert_eq!(e.tick(80_000), Some(Transition::Ended(JobStatus::TimedOut)));
        assert_eq!(e.retries_after_timeout, 1);

        let mut f = exec(retry, Timeouts::default());
        f.start(json!({"step": "install"}).as_object().cloned(), None, 0)
            .unwrap();
        let t = f.update(&update(json!({"status": "FAILED"})), 1).unwrap();
        assert_eq!(
            t,
            Transition::Retried {
                ended: JobStatus::Failed
            }
        );
        assert_eq!(f.failed_at_step.as_deref(), Some("install"));
        f.start(None, None, 2).unwrap();
        assert!(!f.needs_rollback(), "retried, not failed for good");
        let t = f.update(&update(json!({"status": "FAILED"})), 3).unwrap();
        assert_eq!(t, Transition::Ended(JobStatus::Failed));
        assert_eq!(f.execution_number, 2);
        assert!(
            !f.needs_rollback(),
            "the second attempt failed before installing"
        );
        let mut g = exec(RetryPolicy::default(), Timeouts::default());
        g.start(json!({"step": "verify"}).as_object().cloned(), None, 0)
            .unwrap();
        g.update(&update(json!({"status": "FAILED"})), 1).unwrap();
        assert!(g.needs_rollback());
    }

    #[test]
    fn cancel_needs_force_once_in_progress_and_remove_always_works() {
        let mut q = exec(RetryPolicy::default(), Timeouts::default());
        assert_eq!(
            q.cancel(false, 5),
            Ok(Transition::Ended(JobStatus::Canceled))
        );
        let mut p = exec(RetryPolicy::default(), Timeouts::default());
        p.start(None, None, 1).unwrap();
        let err = p.cancel(false, 2).unwrap_err();
        assert_eq!(err.code, JobErrorCode::InvalidStateTransition);
        assert_eq!(
            p.cancel(true, 3),
            Ok(Transition::Ended(JobStatus::Canceled))
        );
        let mut r = exec(RetryPolicy::default(), Timeouts::default());
        assert_eq!(
            r.remove(false, 4),
            Ok(Transition::Ended(JobStatus::Removed))
        );
        assert_eq!(
            p.remove(true, 5),
            Ok(Transition::Ended(JobStatus::Canceled)),
            "terminal stays"
        );
        let mut q = exec(RetryPolicy::default(), Timeouts::default());
        q.start(None, None, 1).unwrap();
        assert!(q.remove(false, 2).is_err());
        assert_eq!(q.remove(true, 3), Ok(Transition::Ended(JobStatus::Removed)));
    }

    #[test]
    fn documents_follow_the_aws_shapes() {
        let mut e = exec(
            RetryPolicy::default(),
            Timeouts {
                in_progress_ms: 120_000,
                step_ms: 0,
            },
        );
        e.start(
            json!({"step": "download"}).as_object().cloned(),
            None,
            2_000,
        )
        .unwrap();
        let doc = e.document(&json!({"firmware": {"version": "2.0"}}), 62_000);
        assert_eq!(
            doc,
            json!({
                "jobId": "fw-2", "queuedAt": 1, "startedAt": 2, "lastUpdatedAt": 2,
                "versionNumber": 2, "executionNumber": 1, "thingName": "pump-1",
                "status": "IN_PROGRESS", "statusDetails": {"step": "download"},
                "jobDocument": {"firmware": {"version": "2.0"}},
                "approximateSecondsBeforeTimedOut": 60
            })
        );
        let err = JobError {
            code: JobErrorCode::VersionMismatch,
            message: "stale".into(),
            state: Some(e.state()),
        };
        assert_eq!(
            err.payload(Some("t1"), 9_000),
            json!({"code": "VersionMismatch", "message": "stale", "timestamp": 9, "clientToken": "t1",
                   "executionState": {"status": "IN_PROGRESS", "statusDetails": {"step": "download"}, "versionNumber": 2}})
        );
    }
}
