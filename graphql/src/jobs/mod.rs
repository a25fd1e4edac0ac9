//! OTA jobs in the schema: creating a firmware job for a set of things and reading its
//! progress.

use std::collections::HashMap;
use std::sync::Arc;

use std::future::ready;

use async_graphql::futures_util::FutureExt;
use async_graphql::futures_util::stream::{self, Stream, StreamExt};
use async_graphql::{ID, Json, Union};
use serde_json::{Map, Value, json};
use twin_actors::FleetHandle;
use twin_model::job::{JobDefinition, JobStatus, Timeouts};
use twin_model::progress::{JobState, Progress};
use twin_model::rollout::{AbortPolicy, HealthGate, Pace, Rollout};
use twin_model::{DeviceId, TwinEvent};

use crate::error::{ApiError, ApiResult};
use crate::schema::{DateTime, Lagged, lagging, parse_filter};
use crate::signing::Signer;

pub mod resolvers;
mod types;

pub use types::*;

/// Most things one job may target.
pub const MAX_TARGETS: usize = 100_000;

/// The pace, abort policy and health gate asked for, checked; none for all at once.
type Paced = (Pace, Option<AbortPolicy>, Option<HealthGate>);

fn rollout(r: OtaRollout) -> ApiResult<Option<Paced>> {
    let health = match r.health_gate {
        Some(g) => {
            parse_filter(Some(&g.filter))?;
            Some(HealthGate {
                filter: g.filter,
                window_ms: g.window_seconds.saturating_mul(1000),
            })
        }
        None => None,
    };
    let abort = r.abort.map(|a| AbortPolicy {
        failure_percent: a.failure_percent,
        min_finished: a.min_finished,
    });
    if abort.is_some_and(|a| a.failure_percent > 100) {
        return Err(ApiError::invalid("abort.failurePercent must be 0 to 100"));
    }
    let pace = match (r.waves, r.rate) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid("a rollout has waves or a rate, not both"));
        }
        (Some(percents), None) => Pace::Waves { percents },
        (None, Some(rate)) => Pace::Rate {
            base_per_minute: rate.base_per_minute,
            factor: rate.factor,
            max_per_minute: rate.max_per_minute,
        },
        (None, None) if abort.is_some() || health.is_some() => Pace::All,
        (None, None) => return Ok(None),
    };
    pace.check().map_err(ApiError::invalid)?;
    Ok(Some((pace, abort, health)))
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

fn job_document(firmware: &FirmwareInput, extra: Option<Value>) -> ApiResult<Value> {
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
        if fleet.queries().thing(&thing).is_none() {
            return Err(ApiError::not_found(format!(
                "thing {thing} is not registered"
            )));
        }
        things.push(thing);
    }
    if let Some(filter) = parse_filter(targets.filter.as_deref())? {
        let page = fleet.queries().query(Some(&filter), None, MAX_TARGETS + 1);
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

/// Creates the job (and its rollback job) and releases its first executions: with no
/// pace, every target's.
pub async fn create(
    fleet: &FleetHandle,
    signer: &Signer,
    new: NewJob,
    now: u64,
) -> ApiResult<OtaJob> {
    let job_id = job_id(&new.job_id)?;
    let minutes = |m: Option<u64>| m.unwrap_or(0).saturating_mul(60_000);
    let paced = rollout(new.rollout)?;
    let OtaDocument {
        firmware,
        data,
        rollback_to,
    } = new.document;
    let rollback_document = match rollback_to {
        Some(previous) => Some(signer.sign(job_document(&previous, None)?)),
        None => None,
    };
    let (pace, abort, health) = match paced {
        Some((pace, abort, health)) => (Some(pace), abort, health),
        None => (None, None, None),
    };
    let (job, rollback) = twin_model::new_job::NewJob {
        job_id: job_id.clone(),
        document: signer.sign(job_document(&firmware, data.map(|d| d.0))?),
        rollback_document,
        retries: new.executions.retries.unwrap_or(0),
        timeouts: Timeouts {
            in_progress_ms: minutes(new.executions.in_progress_minutes),
            step_ms: minutes(new.executions.step_minutes),
        },
        targets: resolve(fleet, &new.targets)?,
        pace,
        abort,
        health,
    }
    .into_definitions(now)
    .map_err(ApiError::invalid)?;
    let (job, rollback) = (Arc::new(job), rollback.map(Arc::new));
    fleet
        .jobs()
        .create(job, rollback)
        .await
        .map_err(ApiError::from)?;
    progress(fleet, &job_id)
        .await?
        .ok_or_else(|| ApiError::not_found("the job disappeared"))
}

/// A job with its executions counted per status.
pub async fn progress(fleet: &FleetHandle, job_id: &str) -> ApiResult<Option<OtaJob>> {
    let Some(job) = fleet.jobs().get(job_id).await.map_err(ApiError::from)? else {
        return Ok(None);
    };
    let statuses = fleet
        .jobs()
        .statuses(job_id)
        .await
        .map_err(ApiError::from)?;
    Ok(Some(summary(job, &statuses)))
}

/// Counts `statuses`; `targets` more than there are statuses are not released yet.
fn count<'a>(statuses: impl Iterator<Item = &'a JobStatus>, targets: u64) -> OtaJobCounts {
    let mut counts = OtaJobCounts::default();
    let mut seen = 0;
    for status in statuses {
        seen += 1;
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
    counts.not_released = targets.saturating_sub(seen);
    counts
}

/// Per-wave counts of a job rolled out in waves.
fn wave_counts(rollout: &Rollout, statuses: &[(DeviceId, JobStatus)]) -> Vec<OtaWave> {
    let Pace::Waves { percents } = &rollout.pace else {
        return Vec::new();
    };
    let by_thing: HashMap<&DeviceId, JobStatus> = statuses.iter().map(|(t, s)| (t, *s)).collect();
    let total = rollout.total();
    let mut start = 0u64;
    let mut waves = Vec::with_capacity(percents.len());
    for p in percents {
        let end = (total * u64::from(*p)).div_ceil(100).max(start);
        let members = &rollout.targets[start as usize..end as usize];
        let counts = count(members.iter().filter_map(|t| by_thing.get(t)), end - start);
        waves.push(OtaWave {
            percent: *p,
            targets: end - start,
            counts,
        });
        start = end;
    }
    waves
}

fn summary(job: JobDefinition, statuses: &[(DeviceId, JobStatus)]) -> OtaJob {
    let progress = Progress::of(&job, statuses);
    let targets = progress.targets;
    let mut counts = count(statuses.iter().map(|(_, s)| s), targets);
    counts.unhealthy = job.rollout.as_ref().map_or(0, |r| r.unhealthy.len() as u64);
    let status = match job.state(&progress) {
        JobState::InProgress => OtaJobStatus::InProgress,
        JobState::Paused => OtaJobStatus::Paused,
        JobState::Completed => OtaJobStatus::Completed,
        JobState::Canceled => OtaJobStatus::Canceled,
        JobState::Aborted => OtaJobStatus::Aborted,
    };
    let waves = job
        .rollout
        .as_ref()
        .map_or_else(Vec::new, |r| wave_counts(r, statuses));
    OtaJob {
        job_id: ID(job.job_id),
        status,
        rollback_job_id: job.rollback_job.map(ID),
        document: Json(job.document),
        created_at: DateTime(job.created_at),
        targets,
        counts,
        waves,
    }
}

/// Pauses or resumes a paced job; returns it as it is afterwards.
pub async fn pause(fleet: &FleetHandle, job_id: &str, paused: bool) -> ApiResult<OtaJob> {
    fleet
        .jobs()
        .pause(job_id, paused)
        .await
        .map_err(ApiError::from)?;
    progress(fleet, job_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no job {job_id}")))
}

/// Cancels a job; returns it as it is afterwards.
pub async fn cancel(fleet: &FleetHandle, job_id: &str, force: bool) -> ApiResult<OtaJob> {
    fleet
        .jobs()
        .cancel(job_id, force)
        .await
        .map_err(ApiError::from)?;
    progress(fleet, job_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no job {job_id}")))
}

/// `removeOtaJobTargets`: takes things out of a job (see `Jobs::remove_targets`).
pub async fn remove_targets(
    fleet: &FleetHandle,
    job_id: &str,
    thing_ids: &[ID],
    force: bool,
) -> ApiResult<OtaJob> {
    if thing_ids.is_empty() || thing_ids.len() > MAX_TARGETS {
        return Err(ApiError::invalid(format!(
            "thingIds takes 1 to {MAX_TARGETS} things"
        )));
    }
    let things = thing_ids
        .iter()
        .map(|id| DeviceId::parse(id))
        .collect::<Result<_, _>>()
        .map_err(ApiError::from)?;
    fleet
        .jobs()
        .remove_targets(job_id, things, force)
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
    let jobs = fleet
        .jobs()
        .list(after, first)
        .await
        .map_err(ApiError::from)?;
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        let statuses = fleet
            .jobs()
            .statuses(&job.job_id)
            .await
            .map_err(ApiError::from)?;
        out.push(summary(job, &statuses));
    }
    Ok(out)
}

/// `otaJobProgress`: the job now, then again after every change of it or of one of its
/// executions (`Lagged` when the subscriber falls behind: read `otaJob`). A store error
/// is the stream's last item: the client sees it, and the subscription ends.
pub fn watch(
    fleet: FleetHandle,
    job_id: String,
) -> impl Stream<Item = async_graphql::Result<OtaJobEvent>> + use<> {
    // What wakes the watch: `None` for a change of the job, `Some(skipped)` for a gap.
    let id = job_id.clone();
    let executions = lagging(fleet.queries().subscribe()).filter_map(move |change| {
        ready(match change {
            Ok(c) => {
                matches!(&*c.event, TwinEvent::Job { execution, .. } if execution.job_id == id)
                    .then_some(None)
            }
            Err(skipped) => Some(Some(skipped)),
        })
    });
    let id = job_id.clone();
    let definitions = lagging(fleet.jobs().changes()).filter_map(move |changed| {
        ready(match changed {
            Ok(changed) => (*changed == *id).then_some(None),
            Err(skipped) => Some(Some(skipped)),
        })
    });
    let wakes = Box::pin(stream::select(executions, definitions));
    stream::unfold(
        (wakes, fleet, job_id, Watch::First),
        |(mut wakes, fleet, job_id, watch)| async move {
            match watch {
                Watch::Failed => return None,
                Watch::First => {}
                Watch::Next => {
                    if let Some(skipped) = wakes.next().await? {
                        let lagged = OtaJobEvent::Lagged(Lagged {
                            skipped,
                            resume_from_version: None,
                            thing_id: None,
                        });
                        return Some((Ok(lagged), (wakes, fleet, job_id, Watch::Next)));
                    }
                    // One count for a burst: what has already arrived is in the job
                    // counted below, which is a whole snapshot.
                    while let Some(Some(_)) = wakes.next().now_or_never() {}
                }
            }
            match progress(&fleet, &job_id).await {
                Ok(Some(job)) => Some((
                    Ok(OtaJobEvent::OtaJob(job)),
                    (wakes, fleet, job_id, Watch::Next),
                )),
                Ok(None) => None,
                Err(e) => Some((Err(e.into()), (wakes, fleet, job_id, Watch::Failed))),
            }
        },
    )
}

/// Where a watch stands.
enum Watch {
    First,
    Next,
    /// It delivered an error: it ends.
    Failed,
}

/// What `otaJobProgress` delivers.
#[derive(Union)]
pub enum OtaJobEvent {
    OtaJob(OtaJob),
    Lagged(Lagged),
}

#[cfg(test)]
mod tests {
    use super::*;
    use twin_model::job::RetryPolicy;

    fn sum(c: &OtaJobCounts) -> u64 {
        c.not_released
            + c.queued
            + c.in_progress
            + c.succeeded
            + c.failed
            + c.timed_out
            + c.rejected
            + c.removed
            + c.canceled
    }

    #[test]
    fn counts_add_up_to_the_targets_for_the_job_and_each_wave() {
        let all = [
            JobStatus::Queued,
            JobStatus::InProgress,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::TimedOut,
            JobStatus::Rejected,
            JobStatus::Removed,
            JobStatus::Canceled,
        ];
        for total in [0u64, 1, 3, 7, 50, 101] {
            for released in [0, total / 3, total] {
                let targets: Vec<DeviceId> = (0..total)
                    .map(|i| DeviceId::parse(&format!("t{i}")).unwrap())
                    .collect();
                let statuses: Vec<(DeviceId, JobStatus)> = targets[..released as usize]
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.clone(), all[i % all.len()]))
                    .collect();
                let job = JobDefinition {
                    job_id: "j".into(),
                    document: Value::Null,
                    retry: RetryPolicy::default(),
                    timeouts: Timeouts::default(),
                    created_at: 0,
                    canceled_at: None,
                    rollback_job: None,
                    rollout: Some(Rollout {
                        pace: Pace::Waves {
                            percents: vec![1, 10, 100],
                        },
                        abort: None,
                        targets,
                        released,
                        started_at: 0,
                        paused_at: None,
                        aborted_at: None,
                        health: None,
                        healthy: Vec::new(),
                        unhealthy: Vec::new(),
                    }),
                };
                let s = summary(job, &statuses);
                assert_eq!(sum(&s.counts), total, "total {total}, released {released}");
                assert_eq!(s.waves.iter().map(|w| w.targets).sum::<u64>(), total);
                for w in &s.waves {
                    assert_eq!(sum(&w.counts), w.targets, "a wave's counts add up");
                }
            }
        }
    }
}
