//! The twin's job executions, with the AWS IoT Jobs device API: the device asks for its
//! pending executions, starts the next one, describes and updates them; the twin keeps
//! every execution of its thing, applies their timeouts and retries, and tells the device
//! (`notify`, `notify-next`) when they change. A firmware job that succeeds writes the
//! installed version into the thing's reported state; one that fails after installing
//! queues the job's rollback job for the device, if it has one.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use twin_model::history::Origin;
use twin_model::job::{
    ExecutionUpdate, JobDefinition, JobError, JobErrorCode, JobExecution, JobStatus,
};
use twin_model::topic::JobOp;
use twin_model::{Rejection, RejectionKind, ShadowName, TwinEvent, UpdateRequest};
use twin_store::Write;

use super::{DeviceState, Ending, Running};
use crate::error::FleetError;

/// What a device request gets: the `accepted` payload, or why it was rejected.
pub type JobAnswer = Result<Value, JobError>;

fn client_token(body: &Value) -> Option<Value> {
    body.get("clientToken").filter(|t| t.is_string()).cloned()
}

fn accepted(mut m: Map<String, Value>, body: &Value, now: u64) -> Value {
    m.insert("timestamp".into(), (now / 1000).into());
    if let Some(t) = client_token(body) {
        m.insert("clientToken".into(), t);
    }
    Value::Object(m)
}

fn not_found(job: &str) -> JobError {
    JobError::new(
        JobErrorCode::ResourceNotFound,
        format!("no execution of job {job} for this thing"),
    )
}

/// The pending executions in the order a device works through them: in progress first,
/// then queued, each oldest first.
fn pending(executions: &[&JobExecution]) -> Vec<JobExecution> {
    let mut v: Vec<JobExecution> = executions
        .iter()
        .filter(|e| !e.status.is_terminal())
        .map(|e| (*e).clone())
        .collect();
    v.sort_by_key(|e| {
        (
            e.status != JobStatus::InProgress,
            e.queued_at,
            e.job_id.clone(),
        )
    });
    v
}

impl DeviceState {
    /// Queues a job's execution for this thing.
    pub(super) async fn queue_job(
        &mut self,
        job: Arc<JobDefinition>,
    ) -> Result<Arc<JobExecution>, FleetError> {
        let loaded = self.registered().await?;
        if loaded.jobs.contains_key(&job.job_id) {
            return Err(Rejection::new(
                RejectionKind::VersionConflict,
                format!("job {} is already queued for this thing", job.job_id),
            )
            .into());
        }
        let execution = JobExecution::new(
            job.job_id.clone(),
            self.thing.clone(),
            job.retry,
            job.timeouts,
            self.ctx.now_millis(),
        );
        self.documents.insert(job.job_id.clone(), job);
        self.save_job(execution).await
    }

    /// Ends this thing's execution of `job` as `ending` says; an `IN_PROGRESS` one only
    /// when `running` is `Ended`.
    pub(super) async fn end_job(
        &mut self,
        job: &str,
        ending: Ending,
        running: Running,
    ) -> Result<Result<Arc<JobExecution>, JobError>, FleetError> {
        let Some(mut execution) = self.registered().await?.jobs.get(job).cloned() else {
            return Ok(Err(not_found(job)));
        };
        if execution.status.is_terminal() {
            return Ok(Ok(Arc::new(execution)));
        }
        let now = self.ctx.now_millis();
        let force = running == Running::Ended;
        let ended = match ending {
            Ending::Removed => execution.remove(force, now),
            Ending::Canceled => execution.cancel(force, now),
        };
        if let Err(e) = ended {
            return Ok(Err(e));
        }
        self.save_job(execution).await.map(Ok)
    }

    /// A device request on the jobs topics; `body` is its JSON payload.
    pub(super) async fn job_request(
        &mut self,
        op: JobOp,
        body: Value,
    ) -> Result<JobAnswer, FleetError> {
        self.expire_jobs().await?;
        let now = self.ctx.now_millis();
        let answer = match op {
            JobOp::GetPending => {
                let loaded = self.registered().await?;
                let all: Vec<&JobExecution> = loaded.jobs.values().collect();
                let (running, queued): (Vec<_>, Vec<_>) = pending(&all)
                    .into_iter()
                    .partition(|e| e.status == JobStatus::InProgress);
                let mut m = Map::new();
                m.insert(
                    "inProgressJobs".into(),
                    running.iter().map(JobExecution::summary).collect(),
                );
                m.insert(
                    "queuedJobs".into(),
                    queued.iter().map(JobExecution::summary).collect(),
                );
                Ok(accepted(m, &body, now))
            }
            JobOp::StartNext => self.start_next(&body, now).await?,
            JobOp::Describe(job) => self.describe(&job, &body, now).await?,
            JobOp::Update(job) => self.update_job(&job, &body, now).await?,
            JobOp::Notify | JobOp::NotifyNext => Err(JobError::new(
                JobErrorCode::InvalidTopic,
                "notify topics are published by Doppel, not requests",
            )),
        };
        Ok(answer)
    }

    async fn next_pending(&mut self) -> Result<Option<JobExecution>, FleetError> {
        let loaded = self.registered().await?;
        let all: Vec<&JobExecution> = loaded.jobs.values().collect();
        Ok(pending(&all).into_iter().next())
    }

    async fn start_next(&mut self, body: &Value, now: u64) -> Result<JobAnswer, FleetError> {
        let details = match body.get("statusDetails") {
            None | Some(Value::Null) => None,
            Some(Value::Object(d)) => Some(d.clone()),
            Some(_) => {
                return Ok(Err(JobError::new(
                    JobErrorCode::InvalidRequest,
                    "statusDetails must be an object",
                )));
            }
        };
        let minutes = body.get("stepTimeoutInMinutes").and_then(Value::as_i64);
        let Some(mut next) = self.next_pending().await? else {
            return Ok(Ok(accepted(Map::new(), body, now)));
        };
        if let Err(e) = next.start(details, minutes, now) {
            return Ok(Err(e));
        }
        let next = self.save_job(next).await?;
        let doc = self.job_document(&next.job_id).await?;
        let mut m = Map::new();
        m.insert("execution".into(), next.document(&doc, now));
        Ok(Ok(accepted(m, body, now)))
    }

    async fn describe(
        &mut self,
        job: &str,
        body: &Value,
        now: u64,
    ) -> Result<JobAnswer, FleetError> {
        let execution = if job == "$next" {
            self.next_pending().await?
        } else {
            self.registered().await?.jobs.get(job).cloned()
        };
        let Some(execution) = execution else {
            return Ok(Err(not_found(job)));
        };
        if let Some(n) = body.get("executionNumber").and_then(Value::as_u64)
            && n != execution.execution_number
        {
            return Ok(Err(not_found(job)));
        }
        let mut doc = execution.document(&self.job_document(&execution.job_id).await?, now);
        if body.get("includeJobDocument") == Some(&Value::Bool(false))
            && let Value::Object(m) = &mut doc
        {
            m.remove("jobDocument");
        }
        let mut m = Map::new();
        m.insert("execution".into(), doc);
        Ok(Ok(accepted(m, body, now)))
    }

    async fn update_job(
        &mut self,
        job: &str,
        body: &Value,
        now: u64,
    ) -> Result<JobAnswer, FleetError> {
        let update = match ExecutionUpdate::parse(body.to_string().as_bytes()) {
            Ok(u) => u,
            Err(e) => return Ok(Err(e)),
        };
        let Some(mut execution) = self.registered().await?.jobs.get(job).cloned() else {
            return Ok(Err(not_found(job)));
        };
        if let Err(e) = execution.update(&update, now) {
            return Ok(Err(e));
        }
        let execution = self.save_job(execution).await?;
        if execution.status == JobStatus::Succeeded {
            self.record_firmware(&execution.job_id).await?;
        }
        if execution.needs_rollback() {
            self.roll_back(job).await?;
        }
        let mut m = Map::new();
        if update.include_job_execution_state {
            m.insert("executionState".into(), execution.state().to_json());
        }
        if update.include_job_document {
            m.insert("jobDocument".into(), self.job_document(job).await?);
        }
        Ok(Ok(accepted(m, body, now)))
    }

    /// The device failed after installing: it gets the job's rollback job, if it has one.
    async fn roll_back(&mut self, job: &str) -> Result<(), FleetError> {
        self.job_document(job).await?;
        let Some(rollback) = self.documents.get(job).and_then(|d| d.rollback_job.clone()) else {
            return Ok(());
        };
        self.job_document(&rollback).await?;
        let Some(definition) = self.documents.get(&rollback).cloned() else {
            return Ok(());
        };
        match self.queue_job(definition).await {
            // Queued, or already queued by an earlier failure.
            Ok(_) | Err(FleetError::Rejected(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A firmware job succeeded: the installed version becomes reported state.
    async fn record_firmware(&mut self, job: &str) -> Result<(), FleetError> {
        let Some(version) = self
            .documents
            .get(job)
            .and_then(|d| d.firmware_version().map(str::to_owned))
        else {
            return Ok(());
        };
        let body = json!({"state": {"reported": {"firmware": {"version": version}}}});
        let request = UpdateRequest::parse(body.to_string().as_bytes(), &self.ctx.config.limits)
            .map_err(FleetError::Rejected)?;
        let by = Origin::Job { id: job.to_owned() };
        self.update(ShadowName::classic(), request, by)
            .await
            .map(drop)
    }

    /// A job's document, from the twin's cache or the store.
    async fn job_document(&mut self, job: &str) -> Result<Value, FleetError> {
        if let Some(d) = self.documents.get(job) {
            return Ok(d.document.clone());
        }
        let found = self
            .ctx
            .store()
            .job(job)
            .await?
            .ok_or_else(|| FleetError::Inconsistent(format!("job {job} has no definition")))?;
        let document = found.document.clone();
        self.documents.insert(job.to_owned(), Arc::new(found));
        Ok(document)
    }

    /// Applies the clock to the running executions.
    pub(super) async fn expire_jobs(&mut self) -> Result<(), FleetError> {
        let now = self.ctx.now_millis();
        let due: Vec<JobExecution> = match self.loaded.as_ref() {
            Some(l) => l
                .jobs
                .values()
                .filter(|e| e.deadline().is_some_and(|d| d <= now))
                .cloned()
                .collect(),
            None => return Ok(()),
        };
        for mut e in due {
            e.tick(now);
            self.save_job(e).await?;
        }
        Ok(())
    }

    /// Makes an execution's new state durable, then current, then announced (with the
    /// `notify` and, when the next execution changed, `notify-next` payloads).
    async fn save_job(&mut self, execution: JobExecution) -> Result<Arc<JobExecution>, FleetError> {
        let execution = Arc::new(execution);
        self.commit(vec![Write::JobExecution(execution.clone())])
            .await?;
        let now = self.ctx.now_millis();
        let before = self.next_pending().await?;
        self.registered()
            .await?
            .jobs
            .insert(execution.job_id.clone(), (*execution).clone());
        let after = self.next_pending().await?;
        let loaded = self.registered().await?;
        let all: Vec<&JobExecution> = loaded.jobs.values().collect();
        let pending = pending(&all);
        let list = |status: JobStatus| -> Value {
            pending
                .iter()
                .filter(|e| e.status == status)
                .map(JobExecution::summary)
                .collect()
        };
        let notify = json!({
            "timestamp": now / 1000,
            "jobs": {"QUEUED": list(JobStatus::Queued), "IN_PROGRESS": list(JobStatus::InProgress)},
        });
        let head =
            |e: &Option<JobExecution>| e.as_ref().map(|e| (e.job_id.clone(), e.execution_number));
        let notify_next = if head(&before) != head(&after) {
            let mut m = Map::new();
            m.insert("timestamp".into(), (now / 1000).into());
            if let Some(next) = &after {
                let doc = self.job_document(&next.job_id).await?;
                m.insert("execution".into(), next.document(&doc, now));
            }
            Some(Arc::new(Value::Object(m)))
        } else {
            None
        };
        self.ctx.publish_event(TwinEvent::Job {
            thing: self.thing.clone(),
            execution: execution.clone(),
            notify: Arc::new(notify),
            notify_next,
            version: self.version(),
            trace: twin_telemetry::trace::outgoing(),
        });
        self.set_alarm();
        Ok(execution)
    }
}
