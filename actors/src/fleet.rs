//! [`FleetHandle`]: the API to every twin. Callers never see actors or messages.
//!
//! Each request takes a permit from a fleet-wide semaphore of `max_pending`; when none is
//! left the request is refused at once with [`FleetError::Overloaded`] (429) instead of
//! queueing without bound. The request is handed to its shard synchronously, so requests
//! made one after another for the same twin are handled in that order; the returned
//! [`Reply`] then waits (at most `request_timeout`) for the answer.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef, RpcReplyPort, concurrency::oneshot};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use twin_model::command::{CommandError, CommandExecution, DeviceResponse, NewCommand};
use twin_model::job::{JobDefinition, JobExecution, JobStatus};
use twin_model::topic::JobOp;
use twin_model::{
    DeviceId, Limits, Rejection, RejectionKind, Shadow, ShadowChange, ShadowName, TwinEvent,
    UpdateRequest,
};
use twin_store::{Committer, TwinStore, Write};

use serde_json::{Map, Value};
use twin_model::Filter;

use crate::clock::Clock;
use crate::device::{AnswerPort, DeviceMsg, Ending, JobAnswer, RegistryOp, Running};
use crate::error::FleetError;
use crate::index::{FleetIndex, Page, TwinView};
use crate::loading;
use crate::pipeline::{
    Change, Committed, Consumer, DeviceLink, DeviceLinks, Pipeline, RolloutLink, Rollouts,
    Subscribers,
};
use crate::rollout::{self, Control};
use crate::shard::{ShardArgs, ShardMsg, ShardSupervisor, shard_for};

/// Settings of the twin layer.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub shards: usize,
    /// Across all shards.
    pub max_resident_twins: usize,
    pub idle_timeout: Duration,
    pub max_pending: usize,
    pub request_timeout: Duration,
    pub limits: Limits,
    /// Development only: unknown devices are registered on connect, passwords unchecked.
    pub auto_register: bool,
    pub event_buffer: usize,
    pub clock: Clock,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            shards: 64,
            max_resident_twins: 1_000_000,
            idle_timeout: Duration::from_secs(600),
            max_pending: 100_000,
            request_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            auto_register: false,
            event_buffer: 65_536,
            clock: Clock::System,
        }
    }
}

/// A successful device connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOk {
    /// Pass back to [`FleetHandle::disconnected`].
    pub session: u64,
    /// The device was unknown and `auto_register` created it.
    pub registered_now: bool,
}

pub type Reply<T> = Pin<Box<dyn Future<Output = Result<T, FleetError>> + Send>>;

/// What every twin is given: where it commits, reads and publishes its changes, and the
/// fleet's settings. Nothing else: devices, subscribers and rollouts hear of a twin's
/// changes through the [`Pipeline`]'s consumers.
pub struct TwinContext {
    pub(crate) committer: Committer,
    pub(crate) config: FleetConfig,
    pub(crate) pipeline: Pipeline,
}

impl TwinContext {
    pub(crate) fn now_millis(&self) -> u64 {
        self.config.clock.now_millis()
    }

    /// The store, for reads (writes go through the committer).
    pub(crate) fn store(&self) -> &dyn TwinStore {
        &**self.committer.store()
    }

    /// Hands a durable change of `thing` to the pipeline.
    pub(crate) fn publish(&self, thing: &DeviceId, what: Committed) {
        self.pipeline.publish(thing, what);
    }

    /// Hands a durable change subscribers see to the pipeline.
    pub(crate) fn publish_event(&self, event: TwinEvent) {
        let thing = event.thing().clone();
        self.pipeline
            .publish(&thing, Committed::Event(Arc::new(event)));
    }
}

/// The jobs' state outside the twins: their rollout controllers, who hears of a changed
/// definition, and the lock that creates an id once.
pub(crate) struct JobsState {
    pub(crate) rollouts: Arc<Rollouts>,
    /// Ids of jobs whose definition changed (paused, resumed, released, aborted, canceled).
    pub(crate) changed: broadcast::Sender<Arc<str>>,
    /// Held while a job is checked and created, so that an id is created once.
    creating: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
pub struct FleetHandle {
    shards: Arc<[ActorRef<ShardMsg>]>,
    pub(crate) twins: Arc<TwinContext>,
    links: Arc<DeviceLinks>,
    subscribers: Arc<Subscribers>,
    pub(crate) jobs: Arc<JobsState>,
    pending: Arc<Semaphore>,
}

impl FleetHandle {
    /// Loads the fleet index from `committer`'s store and starts the shards.
    pub async fn start(config: FleetConfig, committer: Committer) -> Result<Self, FleetError> {
        let index = Arc::new(FleetIndex::default());
        let partitions = (0..twin_model::PARTITIONS).collect();
        let deadlines = loading::load(committer.store().clone(), index.clone(), partitions).await?;
        let index = Arc::into_inner(index).ok_or_else(|| {
            FleetError::Inconsistent("the fleet index is still being loaded".into())
        })?;
        tracing::info!(things = index.len(), "fleet index loaded");
        let links = Arc::new(DeviceLinks::default());
        let subscribers = Arc::new(Subscribers::new(config.event_buffer));
        let rollouts = Arc::new(Rollouts::default());
        // Every consumer of committed changes, in the order each change reaches them.
        let consumers: Vec<Arc<dyn Consumer>> =
            vec![links.clone(), subscribers.clone(), rollouts.clone()];
        let twins = Arc::new(TwinContext {
            committer,
            config: config.clone(),
            pipeline: Pipeline::new(index, consumers),
        });
        let jobs = Arc::new(JobsState {
            rollouts,
            changed: broadcast::channel(1024).0,
            creating: tokio::sync::Mutex::new(()),
        });
        let shard_count = config.shards.max(1);
        let per_shard = config.max_resident_twins.div_ceil(shard_count).max(1);
        let mut shards = Vec::with_capacity(shard_count);
        for _ in 0..shard_count {
            let args = ShardArgs {
                ctx: twins.clone(),
                max_resident: per_shard,
                idle_timeout: config.idle_timeout,
            };
            let (shard, _) = Actor::spawn(None, ShardSupervisor, args)
                .await
                .map_err(|e| FleetError::Inconsistent(format!("cannot start a shard: {e}")))?;
            shards.push(shard);
        }
        // Twins are loaded on demand; their shards wake those with a deadline for it.
        tracing::info!(
            deadlines = deadlines.len(),
            "command and job deadlines loaded"
        );
        for twin_store::Deadline { thing, at, .. } in deadlines {
            let shard = &shards[shard_for(&thing, shard_count)];
            let _ = shard.send_message(ShardMsg::Alarm(at, thing));
        }
        Ok(Self {
            shards: shards.into(),
            twins,
            links,
            subscribers,
            jobs,
            pending: Arc::new(Semaphore::new(config.max_pending.max(1))),
        })
    }

    pub fn config(&self) -> &FleetConfig {
        &self.twins.config
    }

    /// The fleet's time, in milliseconds since the Unix epoch (see [`Clock`]).
    pub fn now_millis(&self) -> u64 {
        self.twins.now_millis()
    }

    pub fn store(&self) -> &Arc<dyn TwinStore> {
        self.twins.committer.store()
    }

    fn permit(&self) -> Result<OwnedSemaphorePermit, FleetError> {
        self.pending
            .clone()
            .try_acquire_owned()
            .map_err(|_| FleetError::Overloaded)
    }

    fn route(&self, thing: &DeviceId, msg: DeviceMsg) -> Result<(), FleetError> {
        let shard = &self.shards[shard_for(thing, self.shards.len())];
        shard
            .send_message(ShardMsg::Route(thing.clone(), msg))
            .map_err(|_| FleetError::Stopped("the fleet"))
    }

    /// Sends a request built by `make` and returns the pending answer.
    fn request<T: Send + 'static>(
        &self,
        thing: &DeviceId,
        make: impl FnOnce(AnswerPort<T>, OwnedSemaphorePermit) -> DeviceMsg,
    ) -> Reply<T> {
        let sent = self.permit().and_then(|permit| {
            let (tx, rx) = oneshot();
            self.route(thing, make(RpcReplyPort::from(tx), permit))
                .map(|()| rx)
        });
        let timeout = self.twins.config.request_timeout;
        Box::pin(async move {
            let rx = sent?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(FleetError::Stopped("the twin")),
                Err(_) => Err(FleetError::Timeout(timeout)),
            }
        })
    }

    pub fn update_shadow(
        &self,
        thing: &DeviceId,
        shadow: ShadowName,
        request: UpdateRequest,
    ) -> Reply<Arc<ShadowChange>> {
        self.request(thing, |reply, permit| DeviceMsg::Update {
            shadow,
            request: Box::new(request),
            reply,
            permit,
        })
    }

    pub fn get_shadow(&self, thing: &DeviceId, shadow: ShadowName) -> Reply<Arc<Shadow>> {
        self.request(thing, |reply, permit| DeviceMsg::Get {
            shadow,
            reply,
            permit,
        })
    }

    pub fn delete_shadow(
        &self,
        thing: &DeviceId,
        shadow: ShadowName,
        client_token: Option<String>,
    ) -> Reply<Arc<ShadowChange>> {
        self.request(thing, |reply, permit| DeviceMsg::Delete {
            shadow,
            client_token,
            reply,
            permit,
        })
    }

    /// Authenticates a device and marks it connected.
    pub fn connect(&self, thing: &DeviceId, password: Option<String>) -> Reply<ConnectOk> {
        self.request(thing, |reply, permit| DeviceMsg::Connect {
            password,
            reply,
            permit,
        })
    }

    /// Marks the device disconnected, unless a newer session has replaced `session`.
    pub fn disconnected(&self, thing: &DeviceId, session: u64, reason: impl Into<String>) {
        let msg = DeviceMsg::Disconnected {
            session,
            reason: reason.into(),
        };
        if let Err(e) = self.route(thing, msg) {
            tracing::debug!(%thing, error = %e, "disconnect not recorded");
        }
    }

    /// Changes a thing's registry record; see [`RegistryOp`]. The answer is the new
    /// secret for `Register` and `RotateSecret` (not stored: it cannot be shown again).
    pub fn registry(&self, thing: &DeviceId, op: RegistryOp) -> Reply<Option<String>> {
        self.request(thing, |reply, permit| DeviceMsg::Registry {
            op,
            reply,
            permit,
        })
    }

    /// Registers a thing; the answer is its secret.
    pub fn register(&self, thing: &DeviceId, attributes: Map<String, Value>) -> Reply<String> {
        let answer = self.registry(thing, RegistryOp::Register(attributes));
        Box::pin(async move {
            answer
                .await?
                .ok_or_else(|| FleetError::Inconsistent("registration made no secret".into()))
        })
    }

    /// Enables or disables a thing; disabling ends its live connection.
    pub fn set_enabled(&self, thing: &DeviceId, enabled: bool) -> Reply<()> {
        let answer = self.registry(thing, RegistryOp::SetEnabled(enabled));
        Box::pin(async move { answer.await.map(drop) })
    }

    /// Creates a command execution for `thing`; it reaches the device once the device
    /// subscribes to its command requests (at once if it already has).
    pub fn send_command(
        &self,
        thing: &DeviceId,
        request: NewCommand,
    ) -> Reply<Arc<CommandExecution>> {
        self.request(thing, |reply, permit| DeviceMsg::SendCommand {
            request,
            reply,
            permit,
        })
    }

    /// The device's answer to a command.
    pub fn command_response(
        &self,
        thing: &DeviceId,
        execution_id: String,
        response: Result<DeviceResponse, CommandError>,
    ) -> Reply<Arc<CommandExecution>> {
        self.request(thing, |reply, permit| DeviceMsg::CommandResponse {
            execution_id,
            response,
            reply,
            permit,
        })
    }

    /// The connection of `session` subscribed to its thing's command requests.
    pub fn commands_wanted(&self, thing: &DeviceId, session: u64) {
        if let Err(e) = self.route(thing, DeviceMsg::CommandsWanted { session }) {
            tracing::debug!(%thing, error = %e, "pending commands not delivered");
        }
    }

    /// A command execution by id, as its twin sees it now (its deadlines applied).
    pub async fn command(&self, execution_id: &str) -> Result<Arc<CommandExecution>, FleetError> {
        let stored = self
            .twins
            .store()
            .command(execution_id)
            .await?
            .ok_or_else(|| {
                FleetError::Rejected(Rejection::new(
                    RejectionKind::NotFound,
                    format!("no command execution {execution_id}"),
                ))
            })?;
        let id = execution_id.to_owned();
        self.request(&stored.thing, |reply, permit| DeviceMsg::Command {
            execution_id: id,
            reply,
            permit,
        })
        .await
    }

    /// A thing's command executions, newest first, before the execution id `before`.
    pub async fn commands(
        &self,
        thing: &DeviceId,
        before: Option<String>,
        limit: usize,
    ) -> Result<Vec<CommandExecution>, FleetError> {
        Ok(self
            .twins
            .store()
            .commands(thing, before.as_deref(), limit)
            .await?)
    }

    /// Stores a new job's definition (and starts its rollout, if paced); fails when the
    /// job id is taken.
    pub async fn create_job(
        &self,
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
            let _creating = self.jobs.creating.lock().await;
            for j in &jobs {
                if self.job(&j.job_id).await?.is_some() {
                    return Err(Rejection::new(
                        RejectionKind::VersionConflict,
                        format!("job {} already exists", j.job_id),
                    )
                    .into());
                }
            }
            // The job and its rollback job in one atomic commit.
            self.twins
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
    pub fn queue_job(&self, thing: &DeviceId, job: Arc<JobDefinition>) -> Reply<Arc<JobExecution>> {
        self.request(thing, |reply, permit| DeviceMsg::QueueJob {
            job,
            reply,
            permit,
        })
    }

    /// Cancels a job: no more executions, and every queued one (with `force`, every
    /// in-progress one too) ends `CANCELED`.
    pub async fn cancel_job(&self, job_id: &str, force: bool) -> Result<(), FleetError> {
        if let Some(control) = self.controller(job_id) {
            let (tx, rx) = oneshot();
            if control.send(Control::Cancel(force, tx)).await.is_ok() {
                return rx.await.map_err(|_| FleetError::Stopped("the rollout"))?;
            }
        }
        let mut job = self.job(job_id).await?.ok_or_else(|| no_job(job_id))?;
        if job.canceled_at.is_none() {
            job.canceled_at = Some(self.now_millis());
            self.save_job(job).await?;
        }
        self.cancel_executions(job_id, force).await.map(drop)
    }

    /// Takes things out of a job: those not released yet never get an execution, and
    /// the others' executions end `REMOVED` (in-progress ones only with `force`). Refused
    /// as a whole, before any change, when a thing is not a target of the job or (without
    /// `force`) its execution is in progress.
    pub async fn remove_from_job(
        &self,
        job_id: &str,
        things: HashSet<DeviceId>,
        force: bool,
    ) -> Result<(), FleetError> {
        let job = self.job(job_id).await?.ok_or_else(|| no_job(job_id))?;
        let statuses: HashMap<DeviceId, JobStatus> =
            self.job_statuses(job_id).await?.into_iter().collect();
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
                    self.save_job(job).await?;
                }
            }
        }
        // Read again: the rollout may have released some of them before the withdrawal.
        for (thing, status) in self.job_statuses(job_id).await? {
            if status.is_terminal() || !things.contains(&thing) {
                continue;
            }
            let id = job_id.to_owned();
            let ended = self
                .request(&thing, |reply, permit| DeviceMsg::EndJob {
                    job_id: id,
                    ending: Ending::Removed,
                    running: Running::ended_if(force),
                    reply,
                    permit,
                })
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
    pub(crate) async fn save_job(&self, job: JobDefinition) -> Result<(), FleetError> {
        let id: Arc<str> = job.job_id.as_str().into();
        self.twins
            .committer
            .commit(vec![Write::Job(Arc::new(job))])
            .await?;
        let _ = self.jobs.changed.send(id);
        Ok(())
    }

    /// Ids of jobs whose definition changed: paused, resumed, released more targets,
    /// aborted or canceled. (Execution changes are `TwinEvent::Job`s.)
    pub fn job_changes(&self) -> broadcast::Receiver<Arc<str>> {
        self.jobs.changed.subscribe()
    }

    /// Pauses (or resumes) a paced job's rollout: no new executions meanwhile.
    pub async fn pause_job(&self, job_id: &str, paused: bool) -> Result<(), FleetError> {
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

    fn controller(&self, job_id: &str) -> Option<mpsc::Sender<Control>> {
        self.jobs.rollouts.control(job_id)
    }

    /// Starts the controller of a job with a rollout still under way; the receiver hears
    /// when its first look at the job (and release) is done.
    pub fn start_rollout(&self, job: JobDefinition) -> Option<tokio::sync::oneshot::Receiver<()>> {
        if !job.rollout_under_way() || self.jobs.rollouts.contains(&job.job_id) {
            return None;
        }
        let (control, rx) = mpsc::channel(16);
        let changed = Arc::new(Notify::new());
        let link = RolloutLink {
            control,
            changed: changed.clone(),
        };
        self.jobs.rollouts.insert(job.job_id.clone(), link);
        let (first_step, first_step_done) = oneshot();
        tokio::spawn(rollout::run(self.clone(), job, rx, changed, first_step));
        Some(first_step_done)
    }

    /// Picks up every rollout (every fan-out, paced or not) that was under way (at start).
    /// A rate goes on from where its releases stood: the time the server was down does
    /// not count.
    pub async fn resume_rollouts(&self) -> Result<usize, FleetError> {
        let (mut after, mut resumed) = (None, 0);
        loop {
            let page = self.jobs(after.clone(), 500).await?;
            let Some(last) = page.last() else {
                return Ok(resumed);
            };
            after = Some(last.job_id.clone());
            for mut job in page {
                if job.rollout_under_way() {
                    if let Some(r) = job.rollout.as_mut() {
                        r.restart(self.now_millis());
                    }
                    resumed += 1;
                    self.start_rollout(job);
                }
            }
        }
    }

    /// Ends every queued execution of a job (with `force`, in-progress ones too) as
    /// `CANCELED`; returns how many still run.
    pub(crate) async fn cancel_executions(
        &self,
        job_id: &str,
        force: bool,
    ) -> Result<usize, FleetError> {
        let mut running = 0;
        for (thing, status) in self.job_statuses(job_id).await? {
            if status.is_terminal() {
                continue;
            }
            let id = job_id.to_owned();
            let canceled = self
                .request(&thing, |reply, permit| DeviceMsg::EndJob {
                    job_id: id,
                    ending: Ending::Canceled,
                    running: Running::ended_if(force),
                    reply,
                    permit,
                })
                .await?;
            if canceled.is_err() {
                running += 1;
            }
        }
        Ok(running)
    }

    /// A device request on its jobs topics.
    pub fn job_request(&self, thing: &DeviceId, op: JobOp, body: Value) -> Reply<JobAnswer> {
        self.request(thing, |reply, permit| DeviceMsg::JobRequest {
            op,
            body,
            reply,
            permit,
        })
    }

    /// A job's definition.
    pub async fn job(&self, job_id: &str) -> Result<Option<JobDefinition>, FleetError> {
        Ok(self.twins.store().job(job_id).await?)
    }

    /// Job definitions in id order, after `after`.
    pub async fn jobs(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<JobDefinition>, FleetError> {
        Ok(self.twins.store().jobs(after.as_deref(), limit).await?)
    }

    /// The status of every execution of a job, in thing order (read a page at a time).
    pub async fn job_statuses(
        &self,
        job_id: &str,
    ) -> Result<Vec<(DeviceId, JobStatus)>, FleetError> {
        let mut all: Vec<(DeviceId, JobStatus)> = Vec::new();
        loop {
            let after = all.last().map(|(thing, _)| thing);
            let page = self.twins.store().job_statuses(job_id, after, 1000).await?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// How many of a job's executions have each status.
    pub async fn job_counts(&self, job_id: &str) -> Result<twin_store::JobCounts, FleetError> {
        Ok(self.twins.store().job_counts(job_id).await?)
    }

    /// A registered twin as it is now (resident or not).
    pub fn thing(&self, thing: &DeviceId) -> Option<Arc<TwinView>> {
        self.twins.pipeline.index().get(thing)
    }

    /// Registered twins matching `filter`, in id order after `after`.
    pub fn query(&self, filter: Option<&Filter>, after: Option<&DeviceId>, first: usize) -> Page {
        self.twins.pipeline.index().query(filter, after, first)
    }

    /// Whether a registered twin matches `filter` now.
    pub fn matches(&self, thing: &DeviceId, filter: &Filter) -> bool {
        self.twins.pipeline.index().matches(thing, filter)
    }

    /// Every change of every twin. A receiver that falls behind by more than the buffer
    /// gets `RecvError::Lagged` and must resynchronize.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.subscribers.subscribe()
    }

    /// Routes the events of `thing` to `link` (replacing a previous link).
    pub fn attach(&self, thing: &DeviceId, link: Arc<dyn DeviceLink>) {
        self.links.attach(thing, link);
    }

    /// Stops routing to `link`, if it is still the thing's link.
    pub fn detach(&self, thing: &DeviceId, link: &Arc<dyn DeviceLink>) {
        self.links.detach(thing, link);
    }

    /// Twins currently in memory.
    pub async fn resident_twins(&self) -> usize {
        let mut total = 0;
        for shard in self.shards.iter() {
            if let Ok(ractor::rpc::CallResult::Success(n)) = shard
                .call(ShardMsg::Resident, Some(Duration::from_secs(5)))
                .await
            {
                total += n;
            }
        }
        total
    }

    /// Stops every twin (each finishes its mailbox) and every shard.
    pub async fn shutdown(&self) {
        // Rollout controllers stop first: each holds the fleet (and so the store) open.
        // Their jobs are persisted as they stand and go on at the next start.
        self.jobs.rollouts.clear();
        for shard in self.shards.iter() {
            shard
                .drain_children_and_wait(Some(Duration::from_secs(10)))
                .await;
            let _ = shard
                .stop_and_wait(None, Some(Duration::from_secs(5)))
                .await;
        }
    }

    #[cfg(test)]
    pub(crate) fn crash(&self, thing: &DeviceId) {
        self.route(thing, DeviceMsg::Crash).unwrap();
    }
}

fn no_job(job_id: &str) -> FleetError {
    FleetError::Rejected(Rejection::new(
        RejectionKind::NotFound,
        format!("no job {job_id}"),
    ))
}
