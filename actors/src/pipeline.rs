//! The post-commit change pipeline: every change a twin makes durable goes through
//! [`Pipeline::publish`], once, in the twin's order, and nowhere else.
//!
//! The pipeline first applies the change to the fleet index (before the twin answers, so
//! that a query never lags an acknowledged change), then numbers it, attaches the twin's
//! view right after it, and hands it to every [`Consumer`] in turn:
//!
//! - [`DeviceLinks`]: the connected device's MQTT session (events, and the end of the
//!   session when its thing is disabled, re-keyed or deleted);
//! - [`Subscribers`]: the fleet-wide broadcast that GraphQL subscriptions read;
//! - [`Rollouts`]: the rollout controller of a job whose execution changed.
//!
//! A new consumer (a webhook outbox, telemetry, metrics, another node) is one more
//! [`Consumer`] given to [`Pipeline::new`]; no twin code changes. Consumers run on the
//! twin's task: they must not block, and hand work elsewhere when it is slow.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use tokio::sync::{Notify, broadcast, mpsc};
use twin_model::{ChangeOp, DeviceId, TwinEvent};
use twin_store::ThingRecord;

use crate::index::{FleetIndex, TwinView};
use crate::rollout::Control;

/// What a twin made durable.
#[derive(Debug, Clone)]
pub enum Committed {
    /// A change its subscribers see: a shadow, presence, a command, a job execution or a
    /// telemetry reading.
    Event(Arc<TwinEvent>),
    /// The thing's registry record as it is now. `ends_session`: the device's live
    /// session must end, for this reason (disabled, secret rotated).
    Record {
        record: ThingRecord,
        ends_session: Option<&'static str>,
    },
    /// The thing is gone, with all it had.
    Deleted,
}

/// A committed change as consumers get it.
#[derive(Debug, Clone)]
pub struct CommittedChange {
    /// Numbers every change published on this node, in order: a consumer that sees a
    /// gap knows it missed something.
    pub seq: u64,
    pub thing: DeviceId,
    pub what: Committed,
    /// The twin as the index shows it right after this change (`None` once deleted).
    pub view: Option<Arc<TwinView>>,
}

impl CommittedChange {
    /// The event, for a change subscribers see.
    pub fn event(&self) -> Option<&Arc<TwinEvent>> {
        match &self.what {
            Committed::Event(e) => Some(e),
            _ => None,
        }
    }
}

/// Something that reacts to committed changes. Called on the twin's task, in change
/// order per twin: must not block.
pub trait Consumer: Send + Sync + 'static {
    fn consume(&self, change: &CommittedChange);
}

/// Why a device's connection is ended by its twin's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// Its thing was disabled, re-keyed or deleted: it may no longer connect as before.
    Revoked,
    /// Its twin moved to another cluster node: it should connect again.
    Moved,
}

/// Where a connected device's events go: its MQTT session. Must not block.
pub trait DeviceLink: Send + Sync + 'static {
    fn deliver(&self, event: Arc<TwinEvent>);
    /// Ends the device's connection.
    fn end_session(&self, why: SessionEnd, reason: &str);
}

pub struct Pipeline {
    index: FleetIndex,
    consumers: Vec<Arc<dyn Consumer>>,
    seq: AtomicU64,
}

impl Pipeline {
    pub fn new(index: FleetIndex, consumers: Vec<Arc<dyn Consumer>>) -> Self {
        Self {
            index,
            consumers,
            seq: AtomicU64::new(0),
        }
    }

    pub fn index(&self) -> &FleetIndex {
        &self.index
    }

    /// Hands on a durable change of `thing`. The twin calls this once per change, after
    /// the commit and before it answers; it is the change's only writer, so the view
    /// taken here is the one right after the change.
    pub fn publish(&self, thing: &DeviceId, what: Committed) {
        self.apply_to_index(thing, &what);
        let change = CommittedChange {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            thing: thing.clone(),
            view: self.index.get(thing),
            what,
        };
        for consumer in &self.consumers {
            consumer.consume(&change);
        }
    }

    fn apply_to_index(&self, thing: &DeviceId, what: &Committed) {
        match what {
            Committed::Event(event) => match &**event {
                TwinEvent::Shadow {
                    shadow,
                    change,
                    current,
                    ..
                } => {
                    let reported_at = match &change.op {
                        ChangeOp::Update {
                            reported: Some(_), ..
                        } => Some(change.timestamp * 1000),
                        _ => None,
                    };
                    self.index
                        .set_shadow(thing, shadow.clone(), current.clone(), reported_at);
                }
                TwinEvent::Connectivity { connectivity, .. } => {
                    self.index.set_connectivity(thing, connectivity.clone());
                }
                TwinEvent::Telemetry { latest, at, .. } => {
                    self.index.set_telemetry(thing, latest.clone(), *at);
                }
                TwinEvent::Command { .. } | TwinEvent::Job { .. } => {}
            },
            Committed::Record { record, .. } => self.index.put_record(record.clone()),
            Committed::Deleted => self.index.remove(thing),
        }
    }
}

/// The connected devices' sessions, by thing.
#[derive(Default)]
pub struct DeviceLinks {
    links: DashMap<DeviceId, Arc<dyn DeviceLink>>,
}

impl DeviceLinks {
    /// Routes the events of `thing` to `link` (replacing a previous link).
    pub fn attach(&self, thing: &DeviceId, link: Arc<dyn DeviceLink>) {
        self.links.insert(thing.clone(), link);
    }

    /// Stops routing to `link`, if it is still the thing's link.
    pub fn detach(&self, thing: &DeviceId, link: &Arc<dyn DeviceLink>) {
        self.links.remove_if(thing, |_, l| Arc::ptr_eq(l, link));
    }

    /// Ends the connections of the devices whose things are in placement partition
    /// `partition`; returns how many.
    pub fn end_partition(&self, partition: u16, reason: &str) -> usize {
        let ending: Vec<Arc<dyn DeviceLink>> = self
            .links
            .iter()
            .filter(|l| l.key().partition() == partition)
            .map(|l| l.value().clone())
            .collect();
        for link in &ending {
            link.end_session(SessionEnd::Moved, reason);
        }
        ending.len()
    }

    /// Whether `thing`'s device is connected to this node.
    pub(crate) fn is_linked(&self, thing: &DeviceId) -> bool {
        self.links.contains_key(thing)
    }

    fn get(&self, thing: &DeviceId) -> Option<Arc<dyn DeviceLink>> {
        self.links.get(thing).map(|l| l.value().clone())
    }
}

impl Consumer for DeviceLinks {
    fn consume(&self, change: &CommittedChange) {
        let Some(link) = self.get(&change.thing) else {
            return;
        };
        match &change.what {
            // The device sent its readings: nothing of them goes back to it.
            Committed::Event(event) if matches!(**event, TwinEvent::Telemetry { .. }) => {}
            Committed::Event(event) => link.deliver(event.clone()),
            Committed::Record {
                ends_session: Some(reason),
                ..
            } => link.end_session(SessionEnd::Revoked, reason),
            Committed::Record { .. } => {}
            Committed::Deleted => link.end_session(SessionEnd::Revoked, "thing deleted"),
        }
    }
}

/// A change subscribers see, as the fleet-wide stream carries it: what happened, and the
/// twin's view right after it (`None` once the thing is deleted). Filters on the fleet's
/// state look at `view`, never at the index as it is when the subscriber reads, which may
/// already be later.
#[derive(Debug, Clone)]
pub struct Change {
    /// The pipeline's sequence number of the change.
    pub seq: u64,
    pub event: Arc<TwinEvent>,
    pub view: Option<Arc<TwinView>>,
}

/// The fleet-wide event streams: what GraphQL subscriptions read. A receiver that falls
/// behind by more than the buffer gets `Lagged` and must resynchronize. Telemetry
/// readings have a stream of their own: at thousands a second they would push a
/// subscriber of shadow changes out of its buffer.
pub struct Subscribers {
    events: broadcast::Sender<Change>,
    telemetry: broadcast::Sender<Change>,
}

impl Subscribers {
    pub fn new(buffer: usize) -> Self {
        Self {
            events: broadcast::channel(buffer.max(16)).0,
            telemetry: broadcast::channel(buffer.max(16)).0,
        }
    }

    /// Every event but telemetry readings.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.events.subscribe()
    }

    /// Telemetry readings.
    pub fn subscribe_telemetry(&self) -> broadcast::Receiver<Change> {
        self.telemetry.subscribe()
    }
}

impl Consumer for Subscribers {
    fn consume(&self, change: &CommittedChange) {
        if let Some(event) = change.event() {
            let stream = match **event {
                TwinEvent::Telemetry { .. } => &self.telemetry,
                _ => &self.events,
            };
            // No subscriber is fine: nobody is watching.
            let _ = stream.send(Change {
                seq: change.seq,
                event: event.clone(),
                view: change.view.clone(),
            });
        }
    }
}

/// The controllers of the jobs whose rollout is under way, by job id.
#[derive(Default)]
pub struct Rollouts {
    controllers: DashMap<String, RolloutLink>,
}

/// What the fleet keeps of a running controller.
pub(crate) struct RolloutLink {
    pub control: mpsc::Sender<Control>,
    /// Pinged when one of the job's executions changed.
    pub changed: Arc<Notify>,
}

impl Rollouts {
    pub(crate) fn insert(&self, job_id: String, link: RolloutLink) {
        self.controllers.insert(job_id, link);
    }

    pub(crate) fn contains(&self, job_id: &str) -> bool {
        self.controllers.contains_key(job_id)
    }

    pub(crate) fn control(&self, job_id: &str) -> Option<mpsc::Sender<Control>> {
        self.controllers.get(job_id).map(|c| c.control.clone())
    }

    pub(crate) fn remove(&self, job_id: &str) {
        self.controllers.remove(job_id);
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.controllers.is_empty()
    }

    /// Drops every controller (at shutdown: each holds the fleet open).
    pub(crate) fn clear(&self) {
        self.controllers.clear();
    }
}

impl Consumer for Rollouts {
    fn consume(&self, change: &CommittedChange) {
        if let Some(event) = change.event()
            && let TwinEvent::Job { execution, .. } = &**event
            && let Some(link) = self.controllers.get(&execution.job_id)
        {
            link.changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use twin_model::Connectivity;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, bool, Option<bool>)>>);

    impl Consumer for Recorder {
        /// Its sequence number, whether it is an event, and whether the view it carries
        /// is connected.
        fn consume(&self, change: &CommittedChange) {
            self.0.lock().unwrap().push((
                change.seq,
                change.event().is_some(),
                change.view.as_ref().map(|v| v.connectivity.connected),
            ));
        }
    }

    #[test]
    fn changes_reach_the_index_first_then_every_consumer_numbered_with_the_view_after() {
        let thing = DeviceId::parse("t1").unwrap();
        let (a, b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        let pipeline = Pipeline::new(FleetIndex::default(), vec![a.clone(), b.clone()]);
        let (record, _) = ThingRecord::new(thing.clone(), 1).unwrap();
        pipeline.publish(
            &thing,
            Committed::Record {
                record,
                ends_session: None,
            },
        );
        let connected = Connectivity {
            connected: true,
            since: 2,
            disconnect_reason: None,
        };
        pipeline.publish(
            &thing,
            Committed::Event(Arc::new(TwinEvent::Connectivity {
                thing: thing.clone(),
                connectivity: connected,
                version: 0,
            })),
        );
        pipeline.publish(&thing, Committed::Deleted);
        let expected = vec![
            (1, false, Some(false)),
            (2, true, Some(true)),
            (3, false, None),
        ];
        assert_eq!(*a.0.lock().unwrap(), expected);
        assert_eq!(*b.0.lock().unwrap(), expected);
        assert!(pipeline.index().get(&thing).is_none());
    }
}
