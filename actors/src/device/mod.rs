//! `DeviceTwin`: one actor per thing, the single writer of its shadows, presence and
//! registry record.
//!
//! Messages: [`DeviceMsg`]. No children. The state is loaded from the store on the first
//! message (so spawning never blocks the shard), and every accepted change is committed
//! durably before the twin replies or emits its event: the mailbox order is the order of
//! the twin's versions. A twin that panics is restarted from the store by its shard.

mod commands;
mod jobs;
mod messages;
mod telemetry;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{Map, Value};
use tracing::Instrument as _;
use twin_model::command::CommandExecution;
use twin_model::history::Origin;
use twin_model::job::{JobDefinition, JobExecution};
use twin_model::route::EventType;
use twin_model::telemetry::Latest;
use twin_model::{
    Connectivity, DeviceId, Rejection, RejectionKind, Shadow, ShadowChange, ShadowName, TwinEvent,
    json,
};
use twin_store::routes::OutboxRecord;
use twin_store::{StoreError, ThingRecord, TwinSnapshot, Write, secret};

pub use jobs::JobAnswer;
pub use messages::{
    AnswerPort, Credential, DeviceMsg, Ending, Mail, RegistryOp, Running, TelemetryMessage,
};

/// Certificates attached to one thing, at most (its record is read at every login).
pub const MAX_CERTIFICATES: usize = 10;

use crate::error::FleetError;
use crate::fleet::{ConnectOk, TwinContext};
use crate::pipeline::Committed;
use crate::routing;
use crate::telemetry::{Caller, shadow_answered};
use twin_model::topic::ShadowOp;

pub struct DeviceTwin;

pub struct DeviceArgs {
    pub thing: DeviceId,
    pub ctx: Arc<TwinContext>,
    /// Where the twin publishes its next deadline (0: none), for its shard to wake it
    /// after a passivation.
    pub next_deadline: Arc<AtomicU64>,
}

pub struct DeviceState {
    thing: DeviceId,
    ctx: Arc<TwinContext>,
    loaded: Option<Loaded>,
    /// Increases with every accepted connection, so that a late disconnect of a
    /// taken-over session does not mark the device offline.
    session: u64,
    /// The current session subscribed to its command requests.
    listening: bool,
    /// When the twin's command and job timer fires, if one is set.
    alarm_at: Option<u64>,
    /// The next deadline, for the shard.
    next_deadline: Arc<AtomicU64>,
    /// Job definitions the twin has needed, by job id.
    documents: HashMap<String, Arc<JobDefinition>>,
    /// The number of the twin's newest event in the outbox. Taken before the commit that
    /// writes an event, so that a commit of unknown outcome never leaves a number used
    /// twice.
    event_seq: AtomicU64,
    /// Set when the store refused a write because another node holds the twin's shard
    /// now: what is in memory may be older than what that node wrote since, so it is
    /// forgotten after the message and loaded again for the next.
    fenced: AtomicBool,
    myself: ActorRef<Mail>,
}

#[derive(Default)]
struct Loaded {
    record: Option<ThingRecord>,
    connectivity: Connectivity,
    shadows: HashMap<ShadowName, Arc<Shadow>>,
    /// Command executions that have not ended, by id.
    commands: BTreeMap<String, CommandExecution>,
    /// Every job execution of the thing, by job id.
    jobs: BTreeMap<String, JobExecution>,
    /// The latest value of each telemetry key.
    telemetry: Arc<Latest>,
}

fn thing_not_found() -> FleetError {
    FleetError::Rejected(Rejection::new(RejectionKind::NotFound, "Thing not found"))
}

/// A refused shadow request, at `debug` (logged inside the request's span, so that the
/// line of a traced request names its trace).
fn log_refused<T>(thing: &DeviceId, op: ShadowOp, result: &Result<T, FleetError>) {
    if let Err(e) = result {
        tracing::debug!(%thing, ?op, error = %e, "shadow request refused");
    }
}

impl DeviceState {
    async fn load(&mut self) -> Result<&mut Loaded, FleetError> {
        if self.loaded.is_none() {
            let snap: TwinSnapshot = self.ctx.store().load(&self.thing).await?;
            self.event_seq.store(snap.event_seq, Ordering::Relaxed);
            self.loaded = Some(Loaded {
                record: snap.record,
                connectivity: snap.connectivity,
                shadows: snap
                    .shadows
                    .into_iter()
                    .map(|(n, s)| (n, Arc::new(s)))
                    .collect(),
                commands: snap
                    .pending_commands
                    .into_iter()
                    .map(|c| (c.execution_id.clone(), c))
                    .collect(),
                jobs: snap
                    .job_executions
                    .into_iter()
                    .map(|e| (e.job_id.clone(), e))
                    .collect(),
                telemetry: Arc::new(snap.telemetry),
            });
            self.set_alarm();
        }
        Ok(self.loaded.as_mut().expect("loaded above"))
    }

    /// The twin's version: the sum of its shadows' versions.
    fn version(&self) -> u64 {
        self.loaded.as_ref().map_or(0, |l| {
            twin_model::event::twin_version(l.shadows.values().map(|s| &**s))
        })
    }

    /// Commits `writes` with the outbox events they make for the routes in force.
    async fn commit(&self, mut writes: Vec<Write>) -> Result<(), FleetError> {
        let events = self.outbox_events(&writes);
        writes.extend(events);
        let appends = writes.iter().any(|w| matches!(w, Write::Event(_)));
        self.ctx
            .committer
            .commit(writes)
            .instrument(twin_telemetry::trace::child(|| {
                tracing::debug_span!("store.commit")
            }))
            .await
            .map_err(|e| {
                if matches!(*e, StoreError::Fenced { .. }) {
                    self.fenced.store(true, Ordering::Relaxed);
                }
                FleetError::from(e)
            })?;
        if appends {
            self.ctx.routes.note_appended();
        }
        Ok(())
    }

    /// The outbox events `writes` make: one per write whose event type a route takes,
    /// naming the routes whose filter matches the thing right after that write.
    fn outbox_events(&self, writes: &[Write]) -> Vec<Write> {
        let routes = &self.ctx.routes;
        if !writes.iter().any(|w| {
            routing::kind_of(w).is_some_and(|kinds| kinds.iter().any(|k| routes.wants(*k)))
        }) {
            return Vec::new();
        }
        let loaded = self.loaded.as_ref();
        let mut after = routing::After {
            record: loaded.and_then(|l| l.record.clone()),
            connectivity: loaded.map(|l| l.connectivity.clone()).unwrap_or_default(),
            shadows: loaded.map(|l| l.shadows.clone()).unwrap_or_default(),
            telemetry: loaded.map(|l| l.telemetry.clone()).unwrap_or_default(),
        };
        let at = self.ctx.now_millis();
        let mut events = Vec::new();
        for w in writes {
            let before = matches!(w, Write::DeleteThing(_)).then(|| after.view());
            let Some((kind, data)) = after.apply(w) else {
                continue;
            };
            if !routes.wants(kind) {
                continue;
            }
            let view = before.unwrap_or_else(|| after.view());
            let matched = routes.matching(kind, view.as_ref());
            if matched.is_empty() {
                continue;
            }
            events.push(self.event(kind, at, data, matched));
        }
        events
    }

    /// The outbox event of `kind` for `routes`, numbered next.
    fn event(&self, kind: EventType, at: u64, data: Value, routes: Vec<String>) -> Write {
        let seq = self.event_seq.fetch_add(1, Ordering::Relaxed) + 1;
        Write::Event(Arc::new(OutboxRecord {
            thing: self.thing.clone(),
            seq,
            kind,
            at,
            data,
            routes,
        }))
    }

    /// Makes an accepted shadow change: durable first, then visible, then announced.
    async fn change_shadow(
        &mut self,
        name: ShadowName,
        previous: Arc<Shadow>,
        change: ShadowChange,
        next: Shadow,
    ) -> Result<Arc<ShadowChange>, FleetError> {
        let current = Arc::new(next);
        let change = Arc::new(change);
        self.commit(vec![Write::Shadow {
            thing: self.thing.clone(),
            shadow: name.clone(),
            state: current.clone(),
            change: change.clone(),
        }])
        .await?;
        if let Some(l) = self.loaded.as_mut() {
            l.shadows.insert(name.clone(), current.clone());
        }
        self.ctx.publish_event(TwinEvent::Shadow {
            thing: self.thing.clone(),
            shadow: name,
            change: change.clone(),
            previous,
            current,
            version: self.version(),
            trace: twin_telemetry::trace::outgoing(),
        });
        Ok(change)
    }

    /// The shadow as it is now (a never-created one is the default, version 0).
    async fn current(&mut self, name: &ShadowName) -> Result<Arc<Shadow>, FleetError> {
        Ok(self
            .registered()
            .await?
            .shadows
            .get(name)
            .cloned()
            .unwrap_or_default())
    }

    async fn registered(&mut self) -> Result<&mut Loaded, FleetError> {
        let loaded = self.load().await?;
        if loaded.record.is_none() {
            return Err(thing_not_found());
        }
        Ok(loaded)
    }

    async fn update(
        &mut self,
        name: ShadowName,
        request: twin_model::UpdateRequest,
        by: Origin,
    ) -> Result<Arc<ShadowChange>, FleetError> {
        let limits = self.ctx.config.limits;
        let previous = self.current(&name).await?;
        let now = self.ctx.now_millis();
        let (mut change, next) = previous.update(&request, now / 1000, &limits)?;
        change.at = now;
        change.by = Some(by);
        self.change_shadow(name, previous, change, next).await
    }

    async fn get(&mut self, name: &ShadowName) -> Result<Arc<Shadow>, FleetError> {
        let shadow = self.registered().await?.shadows.get(name).cloned();
        match shadow {
            Some(s) if s.exists => Ok(s),
            _ => Err(Rejection::no_shadow(name.name().unwrap_or(self.thing.as_str())).into()),
        }
    }

    async fn delete(
        &mut self,
        name: ShadowName,
        client_token: Option<String>,
        by: Origin,
    ) -> Result<Arc<ShadowChange>, FleetError> {
        let previous = self.current(&name).await?;
        let now = self.ctx.now_millis();
        let mut change = previous.decide_delete(
            name.name().unwrap_or(self.thing.as_str()),
            client_token,
            now / 1000,
        )?;
        change.at = now;
        change.by = Some(by);
        // A deleted shadow keeps only its version: nothing of the old one to copy.
        let mut next = Shadow::default();
        next.apply(&change);
        self.change_shadow(name, previous, change, next).await
    }

    async fn register(
        &mut self,
        attributes: Map<String, Value>,
    ) -> Result<(ThingRecord, String), FleetError> {
        if self.load().await?.record.is_some() {
            return Err(Rejection::new(
                RejectionKind::VersionConflict,
                format!("thing {} is already registered", self.thing),
            )
            .into());
        }
        let mut attrs = Map::new();
        json::merge(&mut attrs, &attributes);
        self.check_attributes(&attrs)?;
        let (mut record, secret) = ThingRecord::new(self.thing.clone(), self.ctx.now_millis())?;
        record.attributes = attrs;
        self.save_record(record.clone(), None).await?;
        Ok((record, secret))
    }

    fn check_attributes(&self, attributes: &Map<String, Value>) -> Result<(), FleetError> {
        let limits = self.ctx.config.limits;
        let value = Value::Object(attributes.clone());
        if json::encoded_len(&value) > limits.max_state_bytes {
            return Err(Rejection::new(
                RejectionKind::PayloadTooLarge,
                format!(
                    "attributes are larger than {} bytes",
                    limits.max_state_bytes
                ),
            )
            .into());
        }
        if json::depth(&value) > limits.max_depth {
            return Err(Rejection::bad_request(format!(
                "attributes nest deeper than {} levels",
                limits.max_depth
            ))
            .into());
        }
        Ok(())
    }

    /// Makes a registry record durable, then current, then published; `ends_session`
    /// ends the device's live session, for that reason.
    async fn save_record(
        &mut self,
        record: ThingRecord,
        ends_session: Option<&'static str>,
    ) -> Result<(), FleetError> {
        self.commit(vec![Write::Thing(record.clone())]).await?;
        if let Some(l) = self.loaded.as_mut() {
            l.record = Some(record.clone());
        }
        self.ctx.publish(
            &self.thing,
            Committed::Record {
                record,
                ends_session,
            },
        );
        Ok(())
    }

    async fn registry(&mut self, op: RegistryOp) -> Result<Option<String>, FleetError> {
        if let RegistryOp::Register(attributes) = op {
            return self.register(attributes).await.map(|(_, s)| Some(s));
        }
        let mut record = self
            .registered()
            .await?
            .record
            .clone()
            .ok_or_else(thing_not_found)?;
        match op {
            RegistryOp::Register(_) => unreachable!("handled above"),
            RegistryOp::SetEnabled(enabled) => {
                record.enabled = enabled;
                let ends_session = (!enabled).then_some("thing disabled");
                self.save_record(record, ends_session).await?;
                Ok(None)
            }
            RegistryOp::MergeAttributes(patch) => {
                json::merge(&mut record.attributes, &patch);
                self.check_attributes(&record.attributes)?;
                self.save_record(record, None).await?;
                Ok(None)
            }
            RegistryOp::AttachCertificate(id) => {
                if !record.certificates.contains(&id) {
                    if record.certificates.len() >= MAX_CERTIFICATES {
                        return Err(Rejection::bad_request(format!(
                            "a thing has at most {MAX_CERTIFICATES} certificates attached; detach one first"
                        ))
                        .into());
                    }
                    record.certificates.push(id);
                    self.save_record(record, None).await?;
                }
                Ok(None)
            }
            RegistryOp::DetachCertificate(id) => {
                if record.certificates.contains(&id) {
                    record.certificates.retain(|c| *c != id);
                    self.save_record(record, None).await?;
                }
                Ok(None)
            }
            RegistryOp::RotateSecret => {
                let secret = secret::generate()?;
                record.secret_hash = secret::hash(&secret);
                self.save_record(record, Some("thing secret rotated"))
                    .await?;
                Ok(Some(secret))
            }
            RegistryOp::Delete => {
                // Its unfinished job executions end REMOVED first: the jobs keep a final
                // status for every target, so their counts add up and rollouts finish.
                let unfinished: Vec<String> = self
                    .registered()
                    .await?
                    .jobs
                    .values()
                    .filter(|e| !e.status.is_terminal())
                    .map(|e| e.job_id.clone())
                    .collect();
                for job in unfinished {
                    if let Err(e) = self.end_job(&job, Ending::Removed, Running::Ended).await? {
                        return Err(FleetError::Inconsistent(e.message));
                    }
                }
                self.commit(vec![Write::DeleteThing(self.thing.clone())])
                    .await?;
                self.loaded = Some(Loaded::default());
                self.ctx.publish(&self.thing, Committed::Deleted);
                Ok(None)
            }
        }
    }

    async fn connect(&mut self, credential: Credential) -> Result<ConnectOk, FleetError> {
        let auto_register = self.ctx.config.auto_register;
        let mut registered_now = false;
        let record = match (self.load().await?.record.clone(), &credential) {
            (Some(r), _) => r,
            (None, Credential::Password(_)) if auto_register => {
                registered_now = true;
                self.register(Map::new()).await?.0
            }
            (None, Credential::Certificate(_)) => {
                return Err(Rejection::new(
                    RejectionKind::Unauthorized,
                    "the thing is not registered",
                )
                .into());
            }
            (None, _) => {
                return Err(Rejection::new(RejectionKind::Unauthorized, "Unauthorized").into());
            }
        };
        match &credential {
            Credential::Password(_) if registered_now || auto_register => {}
            Credential::Password(password) => {
                let ok = password
                    .as_deref()
                    .is_some_and(|p| secret::verify(p, &record.secret_hash));
                if !ok {
                    return Err(Rejection::new(RejectionKind::Unauthorized, "Unauthorized").into());
                }
            }
            Credential::Certificate(id) => {
                if !record.certificates.contains(id) {
                    return Err(Rejection::new(
                        RejectionKind::Unauthorized,
                        format!("certificate {id} is not attached to the thing"),
                    )
                    .into());
                }
            }
        }
        if !record.enabled {
            return Err(Rejection::new(RejectionKind::Forbidden, "thing is disabled").into());
        }
        self.session += 1;
        self.listening = false;
        self.set_connectivity(Connectivity {
            connected: true,
            since: self.ctx.now_millis(),
            disconnect_reason: None,
        })
        .await?;
        Ok(ConnectOk {
            session: self.session,
            registered_now,
        })
    }

    async fn set_connectivity(&mut self, connectivity: Connectivity) -> Result<(), FleetError> {
        self.commit(vec![Write::Connectivity {
            thing: self.thing.clone(),
            connectivity: connectivity.clone(),
        }])
        .await?;
        if let Some(l) = self.loaded.as_mut() {
            l.connectivity = connectivity.clone();
        }
        self.ctx.publish_event(TwinEvent::Connectivity {
            thing: self.thing.clone(),
            connectivity,
            version: self.version(),
        });
        Ok(())
    }
}

impl DeviceState {
    async fn on(&mut self, msg: DeviceMsg) {
        match msg {
            DeviceMsg::Update {
                shadow,
                request,
                by,
                span,
                reply,
                permit,
            } => {
                let caller = Caller::of(&by);
                let result = span
                    .run(async {
                        let result = self.update(shadow, *request, by).await;
                        log_refused(&self.thing, ShadowOp::Update, &result);
                        result
                    })
                    .await;
                shadow_answered(caller, ShadowOp::Update, &result);
                answer(reply, result);
                drop(permit);
            }
            DeviceMsg::Get {
                shadow,
                span,
                reply,
                permit,
            } => {
                let result = span
                    .run(async {
                        let result = self.get(&shadow).await;
                        log_refused(&self.thing, ShadowOp::Get, &result);
                        result
                    })
                    .await;
                // Only devices read a shadow through its twin (the API reads the index).
                shadow_answered(Caller::Device, ShadowOp::Get, &result);
                answer(reply, result);
                drop(permit);
            }
            DeviceMsg::Delete {
                shadow,
                client_token,
                by,
                span,
                reply,
                permit,
            } => {
                let caller = Caller::of(&by);
                let result = span
                    .run(async {
                        let result = self.delete(shadow, client_token, by).await;
                        log_refused(&self.thing, ShadowOp::Delete, &result);
                        result
                    })
                    .await;
                shadow_answered(caller, ShadowOp::Delete, &result);
                answer(reply, result);
                drop(permit);
            }
            DeviceMsg::Connect {
                credential,
                reply,
                permit,
            } => {
                answer(reply, self.connect(credential).await);
                drop(permit);
            }
            DeviceMsg::Disconnected { session, reason } => {
                if session == self.session {
                    self.listening = false;
                    // Loaded first: on a cluster's fenced store, loading is what raises
                    // the twin's fence to this node's epoch, which its writes need.
                    match self.load().await {
                        Ok(l) if !l.connectivity.connected => return,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(thing = %self.thing, error = %e, "could not record a disconnect");
                            return;
                        }
                    }
                    let c = Connectivity {
                        connected: false,
                        since: self.ctx.now_millis(),
                        disconnect_reason: Some(reason),
                    };
                    if let Err(e) = self.set_connectivity(c).await {
                        tracing::warn!(thing = %self.thing, error = %e, "could not record a disconnect");
                    }
                }
            }
            DeviceMsg::Registry { op, reply, permit } => {
                answer(reply, self.registry(op).await);
                drop(permit);
            }
            DeviceMsg::SendCommand {
                request,
                span,
                reply,
                permit,
            } => {
                answer(reply, span.run(self.send_command(*request)).await);
                drop(permit);
            }
            DeviceMsg::CommandResponse {
                execution_id,
                response,
                span,
                reply,
                permit,
            } => {
                let answered = span
                    .run(self.command_response(&execution_id, *response))
                    .await;
                answer(reply, answered);
                drop(permit);
            }
            DeviceMsg::Command {
                execution_id,
                reply,
                permit,
            } => {
                answer(reply, self.command(&execution_id).await);
                drop(permit);
            }
            DeviceMsg::CommandsWanted { session } => {
                if let Err(e) = self.commands_wanted(session).await {
                    tracing::warn!(thing = %self.thing, error = %e, "could not deliver pending commands");
                }
            }
            DeviceMsg::QueueJob {
                job,
                span,
                reply,
                permit,
            } => {
                answer(reply, span.run(self.queue_job(job)).await);
                drop(permit);
            }
            DeviceMsg::EndJob {
                job_id,
                ending,
                running,
                reply,
                permit,
            } => {
                answer(reply, self.end_job(&job_id, ending, running).await);
                drop(permit);
            }
            DeviceMsg::JobRequest {
                op,
                body,
                span,
                reply,
                permit,
            } => {
                answer(reply, span.run(self.job_request(op, body)).await);
                drop(permit);
            }
            DeviceMsg::Telemetry {
                message,
                reply,
                permit,
            } => {
                answer(reply, self.telemetry(*message).await);
                drop(permit);
            }
            DeviceMsg::Clock => {
                if let Err(e) = self.on_clock().await {
                    tracing::warn!(thing = %self.thing, error = %e, "could not time out commands or jobs");
                }
            }
            #[cfg(test)]
            DeviceMsg::Crash => panic!("test-induced panic in twin {}", self.thing),
        }
    }
}

fn answer<T>(reply: AnswerPort<T>, result: Result<T, FleetError>) {
    // The caller may have given up (timeout, closed connection); nothing to do then.
    let _ = reply.send(result);
}

impl Actor for DeviceTwin {
    type Msg = Mail;
    type State = DeviceState;
    type Arguments = DeviceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Mail>,
        args: DeviceArgs,
    ) -> Result<DeviceState, ActorProcessingErr> {
        Ok(DeviceState {
            thing: args.thing,
            ctx: args.ctx,
            loaded: None,
            session: 0,
            listening: false,
            alarm_at: None,
            next_deadline: args.next_deadline,
            documents: HashMap::new(),
            event_seq: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            myself,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Mail>,
        mail: Mail,
        state: &mut DeviceState,
    ) -> Result<(), ActorProcessingErr> {
        // The work is boxed: an idle twin's task then keeps a pointer, not the largest
        // in-flight state of any message.
        Box::pin(state.on(mail.take())).await;
        if state.fenced.swap(false, Ordering::Relaxed) {
            state.loaded = None;
            state.set_alarm();
        }
        Ok(())
    }
}
