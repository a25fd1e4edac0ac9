//! Jobs: creation (with a rollback job), the fan-out by a rollout controller (paced or not), pause, cancel, taking targets out, the device's Jobs API, and reading definitions, statuses and counts. Job status rules live in `twin_model::progress`.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use ractor::concurrency::oneshot;
use serde_json::Value;
use tokio::sync::{Notify, broadcast, mpsc};
use twin_model::job::{JobDefinition, JobError, JobExecution, JobStatus};
use twin_model::topic::JobOp;
use twin_model::{DeviceId, Filter, Rejection, RejectionKind};
use twin_store::Write;
use twin_telemetry::trace;

use crate::device::{DeviceMsg, Ending, Running};
use crate::error::{FleetError, JobRequestError};
use crate::fleet::{FleetHandle, Reply, no_job};
use crate::pipeline::RolloutLink;
use crate::rollout::{self, Control};

/// Jobs (`fleet.jobs()`).
#[derive(Clone, Copy)]
pub struct Jobs<'a>(pub(crate) &'a FleetHandle);

impl Jobs<'_> {
    /// Stores a new job's definition (and starts its rollout, if paced); fails when the
    /// job id is taken.
    pub async fn create(
        self,
        job: Arc<JobDefinition>,
        rollback: Option<Arc<JobDefinition>>,
    ) -> Result<(), FleetError> {
        // A gate whose filter does not parse would hold every success unjudged for ever.
        if let Some(gate) = job.rollout.as_ref().and_then(|r| r.health.as_ref()) {
            Filter::parse(&gate.filter).map_err(|e| {
                Rejection::new(
                    RejectionKind::BadRequest,
                    format!("the health gate's filter is invalid: {e}"),
                )
            })?;
        }
        let jobs: Vec<Arc<JobDefinition>> = rollback.into_iter().chain([job.clone()]).collect();
        {
            // A job id is created once: no other creation runs between the check and the
            // commit. (A store shared by several nodes will need a conditional write.)
            let _creating = self.0.job_state.creating.lock().await;
            for j in &jobs {
                if self.get(&j.job_id).await?.is_some() {
                    return Err(Rejection::new(
                        RejectionKind::VersionConflict,
                        format!("job {} already exists", j.job_id),
                    )
                    .into());
                }
            }
            // The job and its rollback job in one atomic commit.
            self.0
                .twins
                .committer
                .commit(jobs.into_iter().map(Write::Job).collect())
                .await?;
        }
        // Its controller releases the executions, persisting each release, so that a
        // restart at any point goes on where the fan-out stood. The first release (every
        // target, for a job without a pace) is made before this returns.
        if let Some(first_release) = self.start_rollout((*job).clone()) {
            let _ = first_release.await;
        }
        Ok(())
    }

    /// Queues a job's execution for `thing`; the device hears of it on `jobs/notify`.
    pub fn queue(self, thing: &DeviceId, job: Arc<JobDefinition>) -> Reply<Arc<JobExecution>> {
        let span = trace::Carried::child(
            || tracing::debug_span!("twin.job.queue", %thing, job = %job.job_id),
        );
        self.0.request(thing, |reply, permit| DeviceMsg::QueueJob {
            job,
            span,
            reply,
            permit,
        })
    }

    /// Cancels a job: no more executions, and every queued one (with `force`, every
    /// in-progress one too) ends `CANCELED`.
    pub async fn cancel(self, job_id: &str, force: bool) -> Result<(), FleetError> {
        if let Some(control) = self.controller(job_id) {
            let (tx, rx) = oneshot();
            if control.send(Control::Cancel(force, tx)).await.is_ok() {
                return rx.await.map_err(|_| FleetError::Stopped("the rollout"))?;
            }
        }
        let mut job = self.get(job_id).await?.ok_or_else(|| no_job(job_id))?;
        if job.canceled_at.is_none() {
            job.canceled_at = Some(self.0.now_millis());
            self.save(job).await?;
        }
        self.cancel_executions(job_id, force).await.map(drop)
    }

    /// Takes things out of a job: those not released yet never get an execution, and
    /// the others' executions end `REMOVED` (in-progress ones only with `force`). Refused
    /// as a whole, before any change, when a thing is not a target of the job or (without
    /// `force`) its execution is in progress.
    pub async fn remove_targets(
        self,
        job_id: &str,
        things: HashSet<DeviceId>,
        force: bool,
    ) -> Result<(), FleetError> {
        let job = self.get(job_id).await?.ok_or_else(|| no_job(job_id))?;
        let statuses: HashMap<DeviceId, JobStatus> =
            self.statuses(job_id).await?.into_iter().collect();
        let unreleased: HashSet<&DeviceId> = job.rollout.as_ref().map_or_else(HashSet::new, |r| {
            r.targets.iter().skip(r.released as usize).collect()
        });
        for thing in &things {
            match statuses.get(thing) {
                Some(JobStatus::InProgress) if !force => {
                    return Err(Rejection::new(
                        RejectionKind::VersionConflict,
                        format!("{thing} is running job {job_id}: remove it with force"),
                    )
                    .into());
                }
                Some(_) => {}
                None if unreleased.contains(thing) => {}
                None => {
                    return Err(Rejection::new(
                        RejectionKind::NotFound,
                        format!("{thing} is not a target of job {job_id}"),
                    )
                    .into());
                }
            }
        }
        if !unreleased.is_empty() {
            // Withdrawn first, so that the rollout does not release them meanwhile.
            if let Some(control) = self.controller(job_id) {
                let (tx, rx) = oneshot();
                control
                    .send(Control::Withdraw(things.clone(), tx))
                    .await
                    .map_err(|_| FleetError::Stopped("the rollout"))?;
                rx.await.map_err(|_| FleetError::Stopped("the rollout"))??;
            } else {
                let mut job = job;
                if job
                    .rollout
                    .as_mut()
                    .is_some_and(|r| r.withdraw(&things) > 0)
                {
                    self.save(job).await?;
                }
            }
        }
        // Read again: the rollout may have released some of them before the withdrawal.
        for (thing, status) in self.statuses(job_id).await? {
            if status.is_terminal() || !things.contains(&thing) {
                continue;
            }
            let ended = self
                .end_execution(&thing, job_id, Ending::Removed, Running::ended_if(force))
                .await?;
            if let Err(e) = ended {
                return Err(Rejection::new(
                    RejectionKind::VersionConflict,
                    format!("{thing}: {}", e.message),
                )
                .into());
            }
        }
        Ok(())
    }

    /// Stores a job's changed definition and tells `job_changes` subscribers.
    pub(crate) async fn save(self, job: JobDefinition) -> Result<(), FleetError> {
        let id: Arc<str> = job.job_id.as_str().into();
        self.0
            .twins
            .committer
            .commit(vec![Write::Job(Arc::new(job))])
            .await?;
        let _ = self.0.job_state.changed.send(id);
        Ok(())
    }

    /// Ids of jobs whose definition changed: paused, resumed, released more targets,
    /// aborted or canceled. (Execution changes are `TwinEvent::Job`s.)
    pub fn changes(self) -> broadcast::Receiver<Arc<str>> {
        self.0.job_state.changed.subscribe()
    }

    /// Pauses (or resumes) a paced job's rollout: no new executions meanwhile.
    pub async fn pause(self, job_id: &str, paused: bool) -> Result<(), FleetError> {
        let control = self.controller(job_id).ok_or_else(|| {
            FleetError::Rejected(Rejection::new(
                RejectionKind::VersionConflict,
                format!("job {job_id} has no rollout in progress"),
            ))
        })?;
        let (tx, rx) = oneshot();
        control
            .send(Control::Pause(paused, tx))
            .await
            .map_err(|_| FleetError::Stopped("the rollout"))?;
        rx.await.map_err(|_| FleetError::Stopped("the rollout"))?
    }

    fn controller(self, job_id: &str) -> Option<mpsc::Sender<Control>> {
        self.0.job_state.rollouts.control(job_id)
    }

    /// Starts the controller of a job with a rollout still under way; the receiver hears
    /// when its first look at the job (and release) is done.
    pub fn start_rollout(self, job: JobDefinition) -> Option<tokio::sync::oneshot::Receiver<()>> {
        if !job.rollout_under_way() || self.0.job_state.rollouts.contains(&job.job_id) {
            return None;
        }
        let (control, rx) = mpsc::channel(16);
        let changed = Arc::new(Notify::new());
        let link = RolloutLink {
            control,
            changed: changed.clone(),
        };
        self.0.job_state.rollouts.insert(job.job_id.clone(), link);
        let (first_step, first_step_done) = oneshot();
        tokio::spawn(rollout::run(self.0.clone(), job, rx, changed, first_step));
        Some(first_step_done)
    }

    /// Picks up every rollout (every fan-out, paced or not) that was under way (at start).
    /// A rate goes on from where its releases stood: the time the server was down does
    /// not count.
    pub async fn resume_rollouts(self) -> Result<usize, FleetError> {
        self.rollouts_under_way(true).await
    }

    /// Counts the rollouts under way (and, with `resume`, starts each again).
    pub async fn rollouts_under_way(self, resume: bool) -> Result<usize, FleetError> {
        let (mut after, mut resumed) = (None, 0);
        loop {
            let page = self.list(after.clone(), 500).await?;
            let Some(last) = page.last() else {
                return Ok(resumed);
            };
            after = Some(last.job_id.clone());
            for mut job in page {
                if job.rollout_under_way() {
                    resumed += 1;
                    if !resume {
                        continue;
                    }
                    if let Some(r) = job.rollout.as_mut() {
                        r.restart(self.0.now_millis());
                    }
                    self.start_rollout(job);
                }
            }
        }
    }

    /// Ends every queued execution of a job (with `force`, in-progress ones too) as
    /// `CANCELED`; returns how many still run.
    /// Ends `thing`'s execution of a job early; the twin's refusal (an in-progress one
    /// spared) is the inner error.
    fn end_execution(
        self,
        thing: &DeviceId,
        job_id: &str,
        ending: Ending,
        running: Running,
    ) -> Reply<Result<Arc<JobExecution>, JobError>> {
        let job_id = job_id.to_owned();
        self.0.request(thing, |reply, permit| DeviceMsg::EndJob {
            job_id,
            ending,
            running,
            reply,
            permit,
        })
    }

    pub(crate) async fn cancel_executions(
        self,
        job_id: &str,
        force: bool,
    ) -> Result<usize, FleetError> {
        let mut running = 0;
        for (thing, status) in self.statuses(job_id).await? {
            if status.is_terminal() {
                continue;
            }
            let canceled = self
                .end_execution(&thing, job_id, Ending::Canceled, Running::ended_if(force))
                .await?;
            if canceled.is_err() {
                running += 1;
            }
        }
        Ok(running)
    }

    /// A device request on its jobs topics: the `accepted` payload, or why not.
    pub fn request(
        self,
        thing: &DeviceId,
        op: JobOp,
        body: Value,
    ) -> Pin<Box<dyn Future<Output = Result<Value, JobRequestError>> + Send>> {
        let span =
            trace::Carried::child(|| tracing::debug_span!("twin.job.request", %thing, op = ?op));
        let answer = self
            .0
            .request(thing, |reply, permit| DeviceMsg::JobRequest {
                op,
                body,
                span,
                reply,
                permit,
            });
        Box::pin(async move { answer.await?.map_err(JobRequestError::Refused) })
    }

    /// A job's definition.
    pub async fn get(self, job_id: &str) -> Result<Option<JobDefinition>, FleetError> {
        Ok(self.0.twins.store().job(job_id).await?)
    }

    /// Job definitions in id order, after `after`.
    pub async fn list(
        self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<JobDefinition>, FleetError> {
        Ok(self.0.twins.store().jobs(after.as_deref(), limit).await?)
    }

    /// The status of every execution of a job, in thing order (read a page at a time).
    pub async fn statuses(self, job_id: &str) -> Result<Vec<(DeviceId, JobStatus)>, FleetError> {
        let mut all: Vec<(DeviceId, JobStatus)> = Vec::new();
        loop {
            let after = all.last().map(|(thing, _)| thing);
            let page = self
                .0
                .twins
                .store()
                .job_statuses(job_id, after, 1000)
                .await?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }
}
