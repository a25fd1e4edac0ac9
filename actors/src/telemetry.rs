//! The twins' metrics: shadow requests, overload rejections, twins in memory, command
//! and job executions, rollouts. Label values are fixed lists (no per-device labels).
//!
//! `doppel_shadow_requests_total` and `doppel_overload_rejections_total` are recorded by
//! the edges too (the gateway answers some requests itself: malformed, no room), so they
//! live here, in the crate both edges build on.

use std::sync::LazyLock;

use twin_model::TwinEvent;
use twin_model::command::CommandStatus;
use twin_model::history::Origin;
use twin_model::job::JobStatus;
use twin_model::topic::ShadowOp;
use twin_telemetry::{
    ByLabel, Counter, Family, Gauge, LabelValues as _, Labels, Registry, StripedGauge, children,
    label_values,
};

use crate::error::FleetError;
use crate::pipeline::{CommittedChange, Consumer};

label_values! {
    /// Who asked: a device (MQTT), an application with an API token (GraphQL), or a job.
    pub enum Caller { Device = "device", ApiToken = "api_token", Job = "job" }
}

impl Caller {
    pub fn of(origin: &Origin) -> Self {
        match origin {
            Origin::Device => Self::Device,
            Origin::Token { .. } => Self::ApiToken,
            Origin::Job { .. } => Self::Job,
        }
    }
}

label_values! {
    /// Why a request was refused with 429 (or its MQTT and GraphQL equivalents).
    pub enum OverloadCause {
        /// The fleet's bound on requests in flight to twins (`max_pending_requests`).
        TwinRequests = "twin_requests",
        /// A connection's bound on its requests in flight (`mqtt_max_inflight_requests`).
        DeviceInFlight = "device_in_flight",
        /// A subscription client sent messages faster than allowed (WebSocket 4429).
        SubscriptionMessages = "subscription_messages",
    }
}

label_values! {
    /// How a rollout controller ended on this node.
    pub(crate) enum RolloutEnd {
        /// Every target finished.
        Completed = "completed",
        /// Its abort policy stopped the job.
        Aborted = "aborted",
        /// An operator canceled the job.
        Canceled = "canceled",
        /// The node stopped; the rollout goes on at the next start.
        Stopped = "stopped",
    }
}

const OPS: [(ShadowOp, &str); 3] = [
    (ShadowOp::Get, "get"),
    (ShadowOp::Update, "update"),
    (ShadowOp::Delete, "delete"),
];

/// The result codes a shadow request can end with: 200 and each rejection's code.
const CODES: [(u16, &str); 11] = [
    (200, "200"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (409, "409"),
    (413, "413"),
    (415, "415"),
    (429, "429"),
    (500, "500"),
    (503, "503"),
];

type Labels3 = [(&'static str, &'static str); 3];

struct Metrics {
    shadow_requests_family: Family<Labels3, Counter>,
    /// Indexed by caller, op and code (see [`shadow_request`]).
    shadow_requests: Vec<Counter>,
    overload_family: Family<Labels, Counter>,
    overload: ByLabel<OverloadCause, Counter>,
    twins_resident: Gauge,
    twins_activated: Counter,
    twins_passivated: Counter,
    commands_family: Family<Labels, Counter>,
    commands: Vec<Counter>,
    job_executions_family: Family<Labels, Counter>,
    job_executions: Vec<Counter>,
    rollouts_active: Gauge,
    rollouts_ended_family: Family<Labels, Counter>,
    rollouts_ended: ByLabel<RolloutEnd, Counter>,
    mailbox_family: Family<Labels, StripedGauge>,
    mailbox: ByLabel<Mailbox, StripedGauge>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let shadow_requests_family = Family::<Labels3, Counter>::default();
    let mut sets = Vec::new();
    for caller in Caller::ALL {
        for (_, op) in OPS {
            for (_, code) in CODES {
                sets.push([("caller", caller.label()), ("op", op), ("code", code)]);
            }
        }
    }
    let shadow_requests = children(&shadow_requests_family, sets);
    let overload_family = Family::<Labels, Counter>::default();
    let overload = ByLabel::new(&overload_family, "cause");
    let commands_family = Family::<Labels, Counter>::default();
    let commands = children(
        &commands_family,
        CommandStatus::ALL.map(|s| [("status", s.as_str())]),
    );
    let rollouts_ended_family = Family::<Labels, Counter>::default();
    let mailbox_family = Family::<Labels, StripedGauge>::default();
    let job_executions_family = Family::<Labels, Counter>::default();
    let job_executions = children(
        &job_executions_family,
        JobStatus::ALL.map(|s| [("status", s.as_str())]),
    );
    Metrics {
        shadow_requests_family,
        shadow_requests,
        overload_family,
        overload,
        twins_resident: Gauge::default(),
        twins_activated: Counter::default(),
        twins_passivated: Counter::default(),
        commands_family,
        commands,
        job_executions_family,
        job_executions,
        rollouts_active: Gauge::default(),
        rollouts_ended: ByLabel::new(&rollouts_ended_family, "outcome"),
        rollouts_ended_family,
        mailbox: ByLabel::new(&mailbox_family, "mailbox"),
        mailbox_family,
    }
});

/// Registers the twins' metrics (under the registry's `doppel_` prefix).
pub fn register(registry: &mut Registry) {
    let m = &*METRICS;
    registry.register(
        "shadow_requests",
        "Shadow requests answered (by the twin, or refused at the edge before it), by caller, operation and result code (200, or the rejection's code)",
        m.shadow_requests_family.clone(),
    );
    registry.register(
        "overload_rejections",
        "Requests refused because a bound was reached (429), by cause",
        m.overload_family.clone(),
    );
    registry.register(
        "twins_resident",
        "Twins in memory (with an actor)",
        m.twins_resident.clone(),
    );
    registry.register(
        "twins_activated",
        "Twins brought into memory",
        m.twins_activated.clone(),
    );
    registry.register(
        "twins_passivated",
        "Twins taken out of memory (idle, or to make room)",
        m.twins_passivated.clone(),
    );
    registry.register(
        "command_executions",
        "Command execution changes made durable, by the status they reached",
        m.commands_family.clone(),
    );
    registry.register(
        "job_executions",
        "Job execution changes made durable, by the status they reached",
        m.job_executions_family.clone(),
    );
    registry.register(
        "rollouts_active",
        "Jobs whose rollout controller runs on this node",
        m.rollouts_active.clone(),
    );
    registry.register(
        "rollouts_ended",
        "Rollout controllers that ended on this node, by outcome (stopped: the node stopped and the rollout resumes at its next start)",
        m.rollouts_ended_family.clone(),
    );
    registry.register(
        "mailbox_messages",
        "Messages waiting in actors' mailboxes, summed over the shards' and over the twins'",
        m.mailbox_family.clone(),
    );
}

label_values! {
    /// Whose mailbox a message waits in.
    pub enum Mailbox {
        /// A shard's: requests on their way to a twin.
        Shard = "shard",
        /// A twin's: its requests, commits' results and timers.
        Twin = "twin",
    }
}

/// A message in a mailbox: counted in `doppel_mailbox_messages` from when it is sent until
/// it is taken out (or dropped with an actor that stopped). Every request makes two, so
/// the count is striped: no counter shared by all threads on the hot path.
#[derive(Debug)]
pub struct Queued(Mailbox, u8);

impl Queued {
    pub(crate) fn new(mailbox: Mailbox) -> Self {
        let stripe = StripedGauge::stripe();
        METRICS.mailbox.get(mailbox).add(stripe, 1);
        Self(mailbox, stripe)
    }
}

/// Messages waiting in `mailbox` now.
#[cfg(test)]
pub(crate) fn mailbox_messages(mailbox: Mailbox) -> i64 {
    METRICS.mailbox.get(mailbox).get()
}

impl Drop for Queued {
    fn drop(&mut self) {
        METRICS.mailbox.get(self.0).add(self.1, -1);
    }
}

/// Counts a shadow request's answer: `code` is 200 or the rejection's code.
pub fn shadow_request(caller: Caller, op: ShadowOp, code: u16) {
    let (Some(o), Some(c)) = (
        OPS.iter().position(|(o, _)| *o == op),
        CODES.iter().position(|(n, _)| *n == code),
    ) else {
        debug_assert!(false, "unlisted shadow result code {code}");
        return;
    };
    let i = (caller.index() * OPS.len() + o) * CODES.len() + c;
    METRICS.shadow_requests[i].inc();
}

/// Counts a twin's answer to a shadow request.
pub(crate) fn shadow_answered<T>(caller: Caller, op: ShadowOp, answer: &Result<T, FleetError>) {
    let code = answer
        .as_ref()
        .map_or_else(|e| e.to_rejection().code(), |_| 200);
    shadow_request(caller, op, code);
}

pub fn overloaded(cause: OverloadCause) {
    METRICS.overload.get(cause).inc();
}

pub(crate) fn twin_activated() {
    METRICS.twins_activated.inc();
    METRICS.twins_resident.inc();
}

pub(crate) fn twin_passivated() {
    METRICS.twins_passivated.inc();
}

pub(crate) fn twin_stopped() {
    METRICS.twins_resident.dec();
}

/// Counts a rollout controller while it runs, and how it ended.
pub(crate) struct RolloutRunning;

impl RolloutRunning {
    pub(crate) fn start() -> Self {
        METRICS.rollouts_active.inc();
        Self
    }

    pub(crate) fn end(self, how: RolloutEnd) {
        METRICS.rollouts_ended.get(how).inc();
    }
}

/// Rollouts that ended `how` in this process so far.
#[cfg(test)]
pub(crate) fn rollouts_ended(how: RolloutEnd) -> u64 {
    METRICS.rollouts_ended.get(how).get()
}

impl Drop for RolloutRunning {
    fn drop(&mut self) {
        METRICS.rollouts_active.dec();
    }
}

/// The pipeline consumer that counts command and job execution changes.
pub struct ExecutionCounter;

impl Consumer for ExecutionCounter {
    fn consume(&self, change: &CommittedChange) {
        match change.event().map(|e| &**e) {
            Some(TwinEvent::Command { execution, .. }) => {
                count(&METRICS.commands, &CommandStatus::ALL, execution.status);
            }
            Some(TwinEvent::Job { execution, .. }) => {
                count(&METRICS.job_executions, &JobStatus::ALL, execution.status);
            }
            _ => {}
        }
    }
}

/// Increments the child for `status`, resolved in the order of `all`.
fn count<S: PartialEq>(children: &[Counter], all: &[S], status: S) {
    if let Some(i) = all.iter().position(|s| *s == status) {
        children[i].inc();
    }
}
