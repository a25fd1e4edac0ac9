//! OTA jobs in the schema: creating a firmware job for a set of things and reading its
//! progress.

use std::sync::Arc;

use async_graphql::futures_util::stream::{self, Stream, StreamExt};
use async_graphql::{Enum, ID, InputObject, Json, SimpleObject, Union};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast::error::RecvError;
use twin_actors::FleetHandle;
use twin_model::job::{JobDefinition, JobStatus, MAX_RETRIES, RetryPolicy, Timeouts};
use twin_model::{DeviceId, TwinEvent};

use crate::error::{ApiError, ApiResult};
use crate::schema::{DateTime, Lagged, parse_filter};
use crate::signing::Signer;

/// Most things one job may target.
pub const MAX_TARGETS: usize = 100_000;
/// Executions queued at once while a job is created.
const QUEUE_CONCURRENCY: usize = 64;

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
}

/// Time limits of each execution; none by default.
#[derive(InputObject, Default)]
pub struct OtaTimeouts {
    /// From IN_PROGRESS to a terminal status.
    pub in_progress_minutes: Option<u64>,
    /// The step timeout `start-next` sets when the device asks for none.
    pub step_minutes: Option<u64>,
}

/// Which things a job targets: listed, matching a fleet filter, or both.
#[derive(InputObject)]
pub struct OtaTargets {
    pub thing_ids: Option<Vec<ID>>,
    pub filter: Option<String>,
}

#[derive(SimpleObject, Default)]
pub struct OtaJobCounts {
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
    /// Some executions have not ended.
    InProgress,
    /// Every execution ended.
    Completed,
    /// An operator canceled it (executions already running may still end otherwise).
    Canceled,
}

#[derive(SimpleObject)]
pub struct OtaJob {
    pub job_id: ID,
    pub status: OtaJobStatus,
    /// What devices receive as `jobDocument`, signed (see `signingKey`).
    pub document: Json<Value>,
    pub created_at: DateTime,
    /// Things with an execution of this job.
    pub targets: u64,
    /// Executions per status; they add up to `targets`.
    pub counts: OtaJobCounts,
}

/// What `createOtaJob` asks for.
pub struct NewJob {
    pub job_id: String,
    pub targets: OtaTargets,
    pub document: OtaDocument,
    pub timeouts: OtaTimeouts,
    pub retries: u32,
}

fn job_id(id: &str) -> ApiResult<String> {
    if twin_model::topic::valid_job_id(id) {
        Ok(id.to_owned())
    } else {
        Err(ApiError::invalid(
            "jobId must be 1-64 characters of A-Z, a-z, 0-9, _ and -",
        ))
    }
}

fn document(doc: OtaDocument) -> ApiResult<Value> {
    let (firmware, extra) = (&doc.firmware, doc.data.map(|d| d.0));
    let hex = firmware.sha256.len() == 64 && firmware.sha256.bytes().all(|b| b.is_ascii_hexdigit());
    if firmware.version.is_empty() || firmware.url.is_empty() || !hex || firmware.size == 0 {
        return Err(ApiError::invalid(
            "firmware needs a version, a url, a sha256 of 64 hex digits and a size over 0",
        ));
    }
    let mut doc = match extra {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(ApiError::invalid("document must be a JSON object")),
    };
    doc.insert(
        "firmware".into(),
        json!({"version": firmware.version, "url": firmware.url, "sha256": firmware.sha256.to_ascii_lowercase(), "size": firmware.size}),
    );
    Ok(Value::Object(doc))
}

/// The registered things a job targets, without duplicates.
fn resolve(fleet: &FleetHandle, targets: &OtaTargets) -> ApiResult<Vec<DeviceId>> {
    let mut things = Vec::new();
    for id in targets.thing_ids.iter().flatten() {
        let thing = DeviceId::parse(id).map_err(ApiError::from)?;
        if fleet.thing(&thing).is_none() {
            return Err(ApiError::not_found(format!(
                "thing {thing} is not registered"
            )));
        }
        things.push(thing);
    }
    if let Some(filter) = parse_filter(targets.filter.as_deref())? {
        let page = fleet.query(Some(&filter), None, MAX_TARGETS + 1);
        things.extend(page.items.iter().map(|v| v.id().clone()));
    }
    things.sort();
    things.dedup();
    if things.is_empty() {
        return Err(ApiError::invalid("the job targets no registered thing"));
    }
    if things.len() > MAX_TARGETS {
        return Err(ApiError::invalid(format!(
            "a job may target at most {MAX_TARGETS} things"
        )));
    }
    Ok(things)
}

/// Creates the job and queues an execution on every target.
pub async fn create(
    fleet: &FleetHandle,
    signer: &Signer,
    new: NewJob,
    now: u64,
) -> ApiResult<OtaJob> {
    let job_id = job_id(&new.job_id)?;
    if new.retries > MAX_RETRIES {
        return Err(ApiError::invalid(format!(
            "retries must be at most {MAX_RETRIES}"
        )));
    }
    let minutes = |m: Option<u64>| m.unwrap_or(0).saturating_mul(60_000);
    let timeouts = Timeouts {
        in_progress_ms: minutes(new.timeouts.in_progress_minutes),
        step_ms: minutes(new.timeouts.step_minutes),
    };
    let document = signer.sign(document(new.document)?);
    let things = resolve(fleet, &new.targets)?;
    let job = Arc::new(JobDefinition {
        job_id: job_id.clone(),
        document,
        retry: RetryPolicy {
            on_failure: new.retries,
            on_timeout: new.retries,
        },
        timeouts,
        created_at: now,
        canceled_at: None,
    });
    fleet
        .create_job(job.clone())
        .await
        .map_err(ApiError::from)?;
    let queued: Vec<_> = stream::iter(things)
        .map(|thing| {
            let job = job.clone();
            async move { fleet.queue_job(&thing, job).await }
        })
        .buffer_unordered(QUEUE_CONCURRENCY)
        .collect()
        .await;
    if let Some(Err(e)) = queued.into_iter().find(Result::is_err) {
        return Err(ApiError::from(e));
    }
    progress(fleet, &job_id)
        .await?
        .ok_or_else(|| ApiError::not_found("the job disappeared"))
}

/// A job with its executions counted per status.
pub async fn progress(fleet: &FleetHandle, job_id: &str) -> ApiResult<Option<OtaJob>> {
    let Some(job) = fleet.job(job_id).await.map_err(ApiError::from)? else {
        return Ok(None);
    };
    let statuses = fleet.job_statuses(job_id).await.map_err(ApiError::from)?;
    Ok(Some(summary(job, &statuses)))
}

fn summary(job: JobDefinition, statuses: &[(DeviceId, JobStatus)]) -> OtaJob {
    let mut counts = OtaJobCounts::default();
    for (_, status) in statuses {
        let n = match status {
            JobStatus::Queued => &mut counts.queued,
            JobStatus::InProgress => &mut counts.in_progress,
            JobStatus::Succeeded => &mut counts.succeeded,
            JobStatus::Failed => &mut counts.failed,
            JobStatus::TimedOut => &mut counts.timed_out,
            JobStatus::Rejected => &mut counts.rejected,
            JobStatus::Removed => &mut counts.removed,
            JobStatus::Canceled => &mut counts.canceled,
        };
        *n += 1;
    }
    let status = if job.canceled_at.is_some() {
        OtaJobStatus::Canceled
    } else if statuses.iter().all(|(_, s)| s.is_terminal()) {
        OtaJobStatus::Completed
    } else {
        OtaJobStatus::InProgress
    };
    OtaJob {
        job_id: ID(job.job_id),
        status,
        document: Json(job.document),
        created_at: DateTime(job.created_at),
        targets: statuses.len() as u64,
        counts,
    }
}

/// Cancels a job; returns it as it is afterwards.
pub async fn cancel(fleet: &FleetHandle, job_id: &str, force: bool) -> ApiResult<OtaJob> {
    fleet
        .cancel_job(job_id, force)
        .await
        .map_err(ApiError::from)?;
    progress(fleet, job_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no job {job_id}")))
}

/// Jobs in id order after `after`, with their counts.
pub async fn list(
    fleet: &FleetHandle,
    after: Option<String>,
    first: usize,
) -> ApiResult<Vec<OtaJob>> {
    let jobs = fleet.jobs(after, first).await.map_err(ApiError::from)?;
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        let statuses = fleet
            .job_statuses(&job.job_id)
            .await
            .map_err(ApiError::from)?;
        out.push(summary(job, &statuses));
    }
    Ok(out)
}

/// `otaJobProgress`: the job now, then again after every change of one of its
/// executions (ending with `Lagged` when the subscriber falls behind: read `otaJob`).
pub fn watch(fleet: FleetHandle, job_id: String) -> impl Stream<Item = OtaJobEvent> + use<> {
    let rx = fleet.subscribe();
    stream::unfold(
        (rx, fleet, job_id, true),
        |(mut rx, fleet, job_id, first)| async move {
            if !first {
                loop {
                    match rx.recv().await {
                        Ok(e) => {
                            if let TwinEvent::Job { execution, .. } = &*e
                                && execution.job_id == job_id
                            {
                                break;
                            }
                        }
                        Err(RecvError::Lagged(skipped)) => {
                            let lagged = Lagged {
                                skipped,
                                resume_from_version: None,
                                thing_id: None,
                            };
                            return Some((OtaJobEvent::Lagged(lagged), (rx, fleet, job_id, false)));
                        }
                        Err(RecvError::Closed) => return None,
                    }
                }
            }
            let job = progress(&fleet, &job_id).await.ok().flatten()?;
            Some((OtaJobEvent::OtaJob(job), (rx, fleet, job_id, false)))
        },
    )
}

/// What `otaJobProgress` delivers.
#[derive(Union)]
pub enum OtaJobEvent {
    OtaJob(OtaJob),
    Lagged(Lagged),
}
