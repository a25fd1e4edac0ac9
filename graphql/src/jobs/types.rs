//! The GraphQL types of OTA jobs: what `createOtaJob` takes and what a job shows.

use async_graphql::{Enum, ID, InputObject, Json, SimpleObject};
use serde_json::Value;

use crate::schema::DateTime;

/// The firmware a job installs; devices find it under `jobDocument.firmware`.
#[derive(InputObject)]
pub struct FirmwareInput {
    pub version: String,
    /// Where the device downloads the image.
    pub url: String,
    /// The image's SHA-256, 64 hex digits.
    pub sha256: String,
    /// The image's size in bytes.
    pub size: u64,
}

/// The job document: the firmware, and any more JSON for the device.
#[derive(InputObject)]
pub struct OtaDocument {
    pub firmware: FirmwareInput,
    /// More fields of the document, beside `firmware`.
    pub data: Option<Json<Value>>,
    /// `rollback: auto`: a device whose execution fails after installing (its last
    /// `statusDetails.step` was install, reboot, verify or activate) gets the job
    /// `{jobId}-rollback`, which installs this firmware.
    pub rollback_to: Option<FirmwareInput>,
}

/// How each execution behaves: retries and time limits (none by default).
#[derive(InputObject, Default)]
pub struct OtaExecutions {
    /// Retries after FAILED and after TIMED_OUT (each), at most 10.
    pub retries: Option<u32>,
    /// From IN_PROGRESS to a terminal status.
    pub in_progress_minutes: Option<u64>,
    /// The step timeout `start-next` sets when the device asks for none.
    pub step_minutes: Option<u64>,
}

/// Executions per minute: `basePerMinute` at first, `factor` times more each minute, at
/// most `maxPerMinute`.
#[derive(InputObject)]
pub struct OtaRate {
    pub base_per_minute: u32,
    pub factor: f64,
    pub max_per_minute: u32,
}

/// Stop the job once `failurePercent` of at least `minFinished` ended executions failed
/// (FAILED, TIMED_OUT or REJECTED); its queued executions are canceled.
#[derive(InputObject)]
pub struct OtaAbort {
    pub failure_percent: u32,
    pub min_finished: u64,
}

/// After SUCCEEDED, a device must match `filter` (a fleet filter over its twin, such as
/// `reported.selfTest = "passed"`) within `windowSeconds`, or it counts as failed.
#[derive(InputObject)]
pub struct OtaHealthGate {
    pub filter: String,
    pub window_seconds: u64,
}

/// How the job reaches its targets: in waves (cumulative percentages, each wave once the
/// one before has ended) or at a rate; all at once without either.
#[derive(InputObject, Default)]
pub struct OtaRollout {
    pub waves: Option<Vec<u32>>,
    pub rate: Option<OtaRate>,
    pub abort: Option<OtaAbort>,
    pub health_gate: Option<OtaHealthGate>,
}

/// Which things a job targets: listed, matching a fleet filter, or both.
#[derive(InputObject)]
pub struct OtaTargets {
    pub thing_ids: Option<Vec<ID>>,
    pub filter: Option<String>,
}

#[derive(SimpleObject, Default)]
pub struct OtaJobCounts {
    /// Targets the rollout has not reached yet.
    pub not_released: u64,
    /// Succeeded, but failed the health gate (also counted in `succeeded`).
    pub unhealthy: u64,
    pub queued: u64,
    pub in_progress: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub rejected: u64,
    pub removed: u64,
    pub canceled: u64,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
pub enum OtaJobStatus {
    /// Some executions have not ended, or the rollout has targets left.
    InProgress,
    /// The rollout releases no new executions until resumed.
    Paused,
    /// Every target's execution ended.
    Completed,
    /// An operator canceled it (executions already running may still end otherwise).
    Canceled,
    /// Too many executions failed: the abort policy stopped it.
    Aborted,
}

#[derive(SimpleObject)]
pub struct OtaJob {
    pub job_id: ID,
    pub status: OtaJobStatus,
    /// The job that rolls failed devices back, if this one has one.
    pub rollback_job_id: Option<ID>,
    /// What devices receive as `jobDocument`, signed (see `signingKey`).
    pub document: Json<Value>,
    pub created_at: DateTime,
    /// Things the job is for.
    pub targets: u64,
    /// Targets per execution status (or not released); they add up to `targets`.
    pub counts: OtaJobCounts,
    /// For a rollout in waves: each wave's targets and counts.
    pub waves: Vec<OtaWave>,
}

#[derive(SimpleObject)]
pub struct OtaWave {
    /// The wave's cumulative percentage of the targets.
    pub percent: u32,
    /// Targets in this wave.
    pub targets: u64,
    pub counts: OtaJobCounts,
}

/// What `createOtaJob` asks for.
pub struct NewJob {
    pub job_id: String,
    pub targets: OtaTargets,
    pub document: OtaDocument,
    pub executions: OtaExecutions,
    pub rollout: OtaRollout,
}
