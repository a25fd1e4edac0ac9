//! [`FleetHandle`]: the API to every twin. Callers never see actors or messages.
//!
//! Each request takes a permit from a fleet-wide semaphore of `max_pending`; when none is
//! left the request is refused at once with [`FleetError::Overloaded`] (429) instead of
//! queueing without bound. The request is handed to its shard synchronously, so requests
//! made one after another for the same twin are handled in that order; the returned
//! [`Reply`] then waits (at most `request_timeout`) for the answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef, RpcReplyPort, concurrency::oneshot};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use twin_model::{DeviceId, Limits, Rejection, RejectionKind, TwinEvent};
use twin_store::{Committer, TwinStore};

use crate::clock::Clock;
use crate::device::{AnswerPort, DeviceMsg};
use crate::error::FleetError;
use crate::index::FleetIndex;
use crate::loading;
use crate::pipeline::{Committed, Consumer, DeviceLinks, Pipeline, Rollouts, Subscribers};
use crate::routing::{LiveRoute, RouteTable};
use crate::services::{
    CertificateState, Certificates, Commands, DeviceSessions, Jobs, Provisioning, Queries,
    Registry, Routes, Shadows, Telemetry,
};
use crate::shard::{ShardArgs, ShardMsg, ShardSupervisor, shard_for};
use crate::telemetry::{self, OverloadCause};

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
    /// How long a shadow's changes stay in its history; `None`: until `history_per_shadow`
    /// newer ones replace them.
    pub history_retention: Option<Duration>,
    /// Where the built-in device CA is (`doppel ca init`); `None`: no device CA.
    pub device_ca_dir: Option<std::path::PathBuf>,
    /// Non-public networks webhooks may still be sent to (see
    /// [`may_send_to`](twin_model::route::may_send_to)).
    pub webhook_allowed_networks: Vec<twin_model::route::Network>,
    /// Whether start-up reads every partition's pending deadlines (command and job
    /// timeouts). A cluster node does not: it reads a shard's when it takes the shard
    /// ([`FleetHandle::take_partition`]).
    pub deadlines_at_start: bool,
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
            history_retention: None,
            device_ca_dir: None,
            webhook_allowed_networks: Vec::new(),
            deadlines_at_start: true,
        }
    }
}

/// A successful device connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOk {
    /// Pass back to [`DeviceSessions::disconnected`](crate::services::DeviceSessions::disconnected).
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
    /// The routes in force: which events twins write to the outbox.
    pub(crate) routes: Arc<RouteTable>,
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
    pub(crate) creating: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
pub struct FleetHandle {
    shards: Arc<[ActorRef<ShardMsg>]>,
    pub(crate) twins: Arc<TwinContext>,
    pub(crate) links: Arc<DeviceLinks>,
    pub(crate) subscribers: Arc<Subscribers>,
    pub(crate) job_state: Arc<JobsState>,
    pub(crate) certs: Arc<CertificateState>,
    /// The one writer of the audit log in this process (each entry needs the one before).
    audit: Arc<twin_store::audit::AuditLog>,
    /// Held while a route is written, so that a route's changes do not overwrite each other.
    pub(crate) route_lock: Arc<tokio::sync::Mutex<()>>,
    pending: Arc<Semaphore>,
}

impl FleetHandle {
    /// Loads the fleet index from `committer`'s store and starts the shards.
    pub async fn start(config: FleetConfig, committer: Committer) -> Result<Self, FleetError> {
        let index = Arc::new(FleetIndex::default());
        let partitions = (0..twin_model::PARTITIONS).collect();
        let deadlines = loading::load(
            committer.store().clone(),
            index.clone(),
            partitions,
            config.deadlines_at_start,
        )
        .await?;
        let index = Arc::into_inner(index).ok_or_else(|| {
            FleetError::Inconsistent("the fleet index is still being loaded".into())
        })?;
        tracing::info!(things = index.len(), "fleet index loaded");
        let routes = Arc::new(RouteTable::default());
        for record in committer.store().routes().await? {
            let id = record.id.clone();
            let live = LiveRoute::new(record).map_err(|e| {
                FleetError::Inconsistent(format!(
                    "route {id} has a filter that does not parse: {e}"
                ))
            })?;
            routes.set(&id, Some(live));
        }
        let links = Arc::new(DeviceLinks::default());
        let subscribers = Arc::new(Subscribers::new(config.event_buffer));
        let rollouts = Arc::new(Rollouts::default());
        // Every consumer of committed changes, in the order each change reaches them.
        let consumers: Vec<Arc<dyn Consumer>> = vec![
            links.clone(),
            subscribers.clone(),
            rollouts.clone(),
            Arc::new(telemetry::ExecutionCounter),
        ];
        let twins = Arc::new(TwinContext {
            committer,
            config: config.clone(),
            pipeline: Pipeline::new(index, consumers),
            routes,
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
        let audit = Arc::new(twin_store::audit::AuditLog::new(
            twins.committer.store().clone(),
        ));
        Ok(Self {
            shards: shards.into(),
            twins,
            links,
            subscribers,
            job_state: jobs,
            certs: Arc::new(CertificateState::new(config.device_ca_dir.clone())),
            audit,
            route_lock: Arc::default(),
            pending: Arc::new(Semaphore::new(config.max_pending.max(1))),
        })
    }

    pub fn shadows(&self) -> Shadows<'_> {
        Shadows(self)
    }

    pub fn registry(&self) -> Registry<'_> {
        Registry(self)
    }

    /// The audit log: every operator action, and every device provisioning itself.
    pub fn audit(&self) -> &twin_store::audit::AuditLog {
        &self.audit
    }

    pub fn provisioning(&self) -> Provisioning<'_> {
        Provisioning(self)
    }

    pub fn routes(&self) -> Routes<'_> {
        Routes(self)
    }

    pub fn telemetry(&self) -> Telemetry<'_> {
        Telemetry(self)
    }

    pub fn certificates(&self) -> Certificates<'_> {
        Certificates(self)
    }

    pub fn sessions(&self) -> DeviceSessions<'_> {
        DeviceSessions(self)
    }

    pub fn commands(&self) -> Commands<'_> {
        Commands(self)
    }

    pub fn jobs(&self) -> Jobs<'_> {
        Jobs(self)
    }

    pub fn queries(&self) -> Queries<'_> {
        Queries(self)
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

    /// Reads the number of requests sent to twins and not answered yet (bounded by
    /// `max_pending`); it does not keep the fleet alive.
    pub fn requests_in_flight(&self) -> impl Fn() -> usize + Send + Sync + 'static {
        let (pending, max) = (self.pending.clone(), self.config().max_pending.max(1));
        move || max - pending.available_permits()
    }

    pub(crate) fn permit(&self) -> Result<OwnedSemaphorePermit, FleetError> {
        self.pending.clone().try_acquire_owned().map_err(|_| {
            telemetry::overloaded(OverloadCause::TwinRequests);
            FleetError::Overloaded
        })
    }

    pub(crate) fn route(&self, thing: &DeviceId, msg: DeviceMsg) -> Result<(), FleetError> {
        let shard = &self.shards[shard_for(thing, self.shards.len())];
        shard
            .send_message(ShardMsg::Route(
                thing.clone(),
                msg,
                telemetry::Queued::new(telemetry::Mailbox::Shard),
            ))
            .map_err(|_| FleetError::Stopped("the fleet"))
    }

    /// Sends a request built by `make` and returns the pending answer.
    pub(crate) fn request<T: Send + 'static>(
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

    /// Takes placement partition `partition` on (a cluster node that just got its
    /// shard): refreshes the index with its twins as stored, records as disconnected the
    /// devices stored as connected that are not connected here (their connections were
    /// to the shard's previous node, which ended them or died), and wakes the twins at
    /// their command and job deadlines (read from the store); returns how many deadlines.
    pub async fn take_partition(&self, partition: u16) -> Result<usize, FleetError> {
        let connected = crate::loading::refresh_partition(
            &**self.store(),
            self.twins.pipeline.index(),
            partition,
        )
        .await?;
        for thing in connected.iter().filter(|t| !self.links.is_linked(t)) {
            // Session 0: the twin's, as loaded here, until its device connects here.
            let gone = DeviceMsg::Disconnected {
                session: 0,
                reason: "its connection was to another cluster node".into(),
            };
            self.route(thing, gone)?;
        }
        let deadlines = crate::loading::partition_deadlines(&**self.store(), partition).await?;
        let found = deadlines.len();
        for twin_store::Deadline { thing, at, .. } in deadlines {
            self.shards[shard_for(&thing, self.shards.len())]
                .send_message(ShardMsg::Alarm(at, thing))
                .map_err(|_| FleetError::Stopped("the fleet"))?;
        }
        Ok(found)
    }

    /// Passivates the twins of placement partition `partition` (each finishes its
    /// mailbox, so that its acknowledged changes are durable) and returns once they have
    /// stopped, or after `deadline`; their command and job deadlines are left to the
    /// partition's next owner. Then ends the connections of their devices here, so that
    /// they connect again and find the twins' new node. A message for one of the twins
    /// afterwards activates it again: on a store fenced by the cluster's leases, its
    /// load is then refused while this node does not hold the partition.
    pub async fn give_up_partition(&self, partition: u16, deadline: Duration) {
        self.stop_partition(partition, deadline).await;
        let ended = self
            .links
            .end_partition(partition, "its twin moved to another node");
        if ended > 0 {
            tracing::info!(
                partition,
                devices = ended,
                "devices disconnected: their twins moved to another node"
            );
        }
    }

    async fn stop_partition(&self, partition: u16, deadline: Duration) {
        let mut answers = Vec::with_capacity(self.shards.len());
        for shard in self.shards.iter() {
            let (tx, rx) = oneshot();
            if shard
                .send_message(ShardMsg::GiveUp(partition, RpcReplyPort::from(tx)))
                .is_ok()
            {
                answers.push(rx);
            }
        }
        let all = async {
            for answer in answers {
                let _ = answer.await;
            }
        };
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!(
                partition,
                "twins of a given-up partition not all stopped in time"
            );
        }
    }

    /// Stops every twin (each finishes its mailbox) and every shard.
    pub async fn shutdown(&self) {
        // Rollout controllers stop first: each holds the fleet (and so the store) open.
        // Their jobs are persisted as they stand and go on at the next start.
        self.job_state.rollouts.clear();
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

pub(crate) fn no_job(job_id: &str) -> FleetError {
    FleetError::Rejected(Rejection::new(
        RejectionKind::NotFound,
        format!("no job {job_id}"),
    ))
}
