//! One controller per job with targets: it releases executions at the job's pace (all at
//! once for a job without one), judges the
//! health of succeeded devices when the job has a health gate, stops the job when its
//! abort policy trips, and takes pause, resume and cancel from operators. It is
//! the only writer of its job's definition while it runs, and it persists every change, so
//! a restarted server picks the rollout up where it was (`Jobs::resume_rollouts`).

use std::sync::Arc;
use std::time::Duration;

use std::collections::{HashMap, HashSet};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::MissedTickBehavior;
use tracing::Instrument as _;
use twin_model::job::{JobDefinition, JobStatus};
use twin_model::progress::Progress;
use twin_model::rollout::{Pace, Rollout};
use twin_model::{DeviceId, Filter, RejectionKind};
use twin_telemetry::trace;

use crate::error::FleetError;
use crate::fleet::FleetHandle;
use crate::telemetry::{self, RolloutEnd};

/// How often a controller may look at its job's executions. It looks only when one of
/// them changed, or when time matters (a rate, a health window).
const TICK: Duration = Duration::from_millis(200);
/// Executions queued at once when a wave opens.
const RELEASE_BATCH: usize = 64;

pub enum Control {
    /// Pause (true) or resume (false) releasing executions.
    Pause(bool, oneshot::Sender<Result<(), FleetError>>),
    /// Cancel the job (and its in-progress executions with `force`).
    Cancel(bool, oneshot::Sender<Result<(), FleetError>>),
    /// Take these things out of the targets not released yet.
    Withdraw(HashSet<DeviceId>, oneshot::Sender<Result<(), FleetError>>),
}

pub(crate) async fn run(
    fleet: FleetHandle,
    mut job: JobDefinition,
    mut control: mpsc::Receiver<Control>,
    changed: Arc<Notify>,
    first_step: oneshot::Sender<()>,
) {
    let running = telemetry::RolloutRunning::start();
    let mut ended = RolloutEnd::Stopped;
    let mut first_step = Some(first_step);
    let id = job.job_id.clone();
    let mut tick = tokio::time::interval(TICK);
    // A look skipped while nothing changed is not made up for later.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Something changed since the last look, or the next look is due on time alone.
    let (mut dirty, mut poll) = (true, false);
    // When this controller first saw each target SUCCEEDED (after a restart, the health
    // window starts again for those still undecided).
    let mut succeeded_at: HashMap<DeviceId, u64> = HashMap::new();
    loop {
        tokio::select! {
            msg = control.recv() => match msg {
                Some(Control::Pause(paused, reply)) => {
                    if let Some(r) = job.rollout.as_mut() {
                        r.pause(paused, fleet.now_millis());
                    }
                    dirty = true;
                    let _ = reply.send(fleet.jobs().save(job.clone()).await);
                }
                Some(Control::Withdraw(things, reply)) => {
                    let withdrawn = job.rollout.as_mut().map_or(0, |r| r.withdraw(&things));
                    let saved = if withdrawn > 0 {
                        fleet.jobs().save(job.clone()).await
                    } else {
                        Ok(())
                    };
                    let _ = reply.send(saved);
                }
                Some(Control::Cancel(force, reply)) => {
                    job.canceled_at = Some(fleet.now_millis());
                    let done = match fleet.jobs().save(job.clone()).await {
                        Ok(()) => fleet.jobs().cancel_executions(&id, force).await.map(drop),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(done);
                    ended = RolloutEnd::Canceled;
                    break;
                }
                None => break,
            },
            () = changed.notified() => dirty = true,
            _ = tick.tick(), if dirty || poll => {
                dirty = false;
                let stepped = step(&fleet, &mut job, &mut succeeded_at).await;
                if let Some(done) = first_step.take() {
                    let _ = done.send(());
                }
                match stepped {
                    Ok(Some(again)) => poll = again,
                    Ok(None) => {
                        ended = if job.rollout.as_ref().is_some_and(|r| r.aborted_at.is_some()) {
                            RolloutEnd::Aborted
                        } else {
                            RolloutEnd::Completed
                        };
                        break;
                    }
                    Err(e) => {
                        dirty = true;
                        tracing::warn!(job = %id, error = %e, "rollout step failed; retrying");
                    }
                }
            }
        }
    }
    fleet.job_state.rollouts.remove(&id);
    running.end(ended);
}

/// Gives succeeded targets their health verdict: healthy once they match the gate's
/// filter, unhealthy when its window passes first. True when a verdict was given.
fn judge_health(
    fleet: &FleetHandle,
    job: &mut JobDefinition,
    statuses: &[(DeviceId, JobStatus)],
    succeeded_at: &mut HashMap<DeviceId, u64>,
) -> bool {
    let Some(rollout) = job.rollout.as_mut() else {
        return false;
    };
    let Some(gate) = rollout.health.clone() else {
        return false;
    };
    // Checked when the job was created; a stored one that no longer parses (a newer
    // filter syntax, read by an older build) is said, not passed over in silence.
    let filter = match Filter::parse(&gate.filter) {
        Ok(filter) => filter,
        Err(e) => {
            tracing::error!(job = %job.job_id, error = %e, "the health gate's filter does not parse; no target is judged");
            return false;
        }
    };
    let now = fleet.now_millis();
    let mut changed = false;
    for (thing, status) in statuses {
        if *status != JobStatus::Succeeded
            || rollout.healthy.contains(thing)
            || rollout.unhealthy.contains(thing)
        {
            continue;
        }
        let since = *succeeded_at.entry(thing.clone()).or_insert(now);
        if fleet.queries().matches(thing, &filter) {
            rollout.healthy.push(thing.clone());
            changed = true;
        } else if now.saturating_sub(since) >= gate.window_ms {
            rollout.unhealthy.push(thing.clone());
            changed = true;
        }
    }
    changed
}

/// One look at the job: abort, or release what the pace allows. None once the rollout is
/// over; otherwise whether to look again on time alone (a rate still releasing, a health
/// verdict pending), not only when an execution changes.
async fn step(
    fleet: &FleetHandle,
    job: &mut JobDefinition,
    succeeded_at: &mut HashMap<DeviceId, u64>,
) -> Result<Option<bool>, FleetError> {
    if job.rollout.is_none() {
        return Ok(None);
    }
    let statuses = fleet.jobs().statuses(&job.job_id).await?;
    if judge_health(fleet, job, &statuses, succeeded_at) {
        fleet.jobs().save(job.clone()).await?;
    }
    let Some(rollout) = job.rollout.clone() else {
        return Ok(None);
    };
    let progress = Progress::of(job, &statuses);
    let Progress {
        finished,
        failed,
        awaiting_verdicts,
        ..
    } = progress;
    if rollout.abort.is_some_and(|a| a.tripped(finished, failed)) {
        let span = trace::entry(
            None,
            || tracing::debug_span!("rollout.abort", job = %job.job_id, finished, failed),
        );
        async {
            if let Some(r) = job.rollout.as_mut() {
                r.aborted_at = Some(fleet.now_millis());
            }
            fleet.jobs().save(job.clone()).await?;
            fleet.jobs().cancel_executions(&job.job_id, false).await?;
            tracing::warn!(job = %job.job_id, finished, failed, "rollout aborted: too many failures");
            Ok::<_, FleetError>(())
        }
        .instrument(span)
        .await?;
        return Ok(None);
    }
    if rollout.released == rollout.total() {
        return Ok((!progress.complete()).then_some(awaiting_verdicts));
    }
    if rollout.paused_at.is_some() {
        return Ok(Some(awaiting_verdicts));
    }
    let rate = matches!(rollout.pace, Pace::Rate { .. });
    let elapsed = rollout.running_ms(fleet.now_millis());
    let allowed = rollout
        .pace
        .allowed(rollout.total(), rollout.released, finished, elapsed);
    if allowed == rollout.released {
        return Ok(Some(rate || awaiting_verdicts));
    }
    // A release is a trace of its own (sampled by trace_sample_ratio): the twins queue
    // the executions in it, and the notifications devices get carry it.
    let span = trace::entry(None, || {
        tracing::debug_span!(
            "rollout.release",
            job = %job.job_id,
            from = rollout.released,
            to = allowed
        )
    });
    release(fleet, job, &rollout, allowed)
        .instrument(span)
        .await?;
    Ok(Some(rate || awaiting_verdicts))
}

/// Releases the executions of the targets from `rollout.released` to `allowed`.
async fn release(
    fleet: &FleetHandle,
    job: &mut JobDefinition,
    rollout: &Rollout,
    allowed: u64,
) -> Result<(), FleetError> {
    let definition = Arc::new(job.clone());
    let batch = &rollout.targets[rollout.released as usize..allowed as usize];
    let mut gone = HashSet::new();
    for chunk in batch.chunks(RELEASE_BATCH) {
        let queued: Vec<_> = chunk
            .iter()
            .map(|thing| fleet.jobs().queue(thing, definition.clone()))
            .collect();
        for (thing, q) in chunk.iter().zip(queued) {
            match q.await {
                Ok(_) => {}
                // Deleted before its turn: it leaves the job.
                Err(e) if e.kind() == RejectionKind::NotFound => {
                    gone.insert(thing.clone());
                }
                // Already queued: the release was not yet persisted when the server stopped.
                Err(FleetError::Rejected(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    if let Some(r) = job.rollout.as_mut() {
        r.release(allowed, &gone);
    }
    fleet.jobs().save(job.clone()).await
}
