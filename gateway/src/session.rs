//! MQTT sessions: what outlives a connection.
//!
//! One [`Slot`] per client id holds the subscriptions, the QoS 1 messages sent but not
//! acknowledged, the messages waiting to be sent, and the [`Link`] the device's twin
//! delivers events into. A persistent session (`clean session = 0`, or an MQTT 5 session
//! expiry) keeps its slot after the connection ends, until it expires; the twin keeps
//! delivering into it meanwhile (bounded: the oldest messages are dropped first).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::time::Instant;
use twin_actors::{DeviceLink, FleetHandle};
use twin_model::{DeviceId, TwinEvent};

use crate::codec::DisconnectCode;

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the data is
/// plain queues and maps, valid at every step).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Tells one connection to close, and tells whoever asked when it has.
#[derive(Default)]
pub(crate) struct Kick {
    pub(crate) fire: Notify,
    reason: Mutex<Option<(DisconnectCode, String)>>,
    pub(crate) finished: Notify,
    done: AtomicBool,
}

impl Kick {
    pub(crate) fn fire(&self, code: DisconnectCode, reason: &str) {
        *lock(&self.reason) = Some((code, reason.to_owned()));
        self.fire.notify_one();
    }

    pub(crate) fn reason(&self) -> (DisconnectCode, String) {
        lock(&self.reason).clone().unwrap_or((
            DisconnectCode::Administrative,
            "closed by the server".into(),
        ))
    }

    pub(crate) fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.finished.notify_waiters();
    }

    /// Waits until the connection has closed (at most `limit`).
    pub(crate) async fn wait_finished(&self, limit: Duration) {
        let wait = self.finished.notified();
        if self.done.load(Ordering::SeqCst) {
            return;
        }
        let _ = tokio::time::timeout(limit, wait).await;
    }
}

/// Where the twin delivers a device's events. Never blocks the twin.
pub(crate) struct Link {
    events: Mutex<VecDeque<Arc<TwinEvent>>>,
    pub(crate) notify: Notify,
    cap: usize,
    pub(crate) dropped: AtomicU64,
    pub(crate) active: Mutex<Option<Arc<Kick>>>,
}

impl Link {
    fn new(cap: usize) -> Self {
        Self {
            events: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            cap: cap.max(1),
            dropped: AtomicU64::new(0),
            active: Mutex::new(None),
        }
    }

    pub(crate) fn pop(&self) -> Option<Arc<TwinEvent>> {
        lock(&self.events).pop_front()
    }

    pub(crate) fn is_empty(&self) -> bool {
        lock(&self.events).is_empty()
    }
}

impl DeviceLink for Link {
    fn deliver(&self, event: Arc<TwinEvent>) {
        {
            let mut q = lock(&self.events);
            if q.len() >= self.cap {
                q.pop_front();
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped % 1000 == 1 {
                    tracing::warn!(
                        dropped,
                        cap = self.cap,
                        "twin events for an absent device dropped: its session queue is full"
                    );
                }
            }
            q.push_back(event);
        }
        self.notify.notify_one();
    }

    fn kick(&self, reason: &str) {
        if let Some(k) = lock(&self.active).clone() {
            k.fire(DisconnectCode::NotAuthorized, reason);
        }
    }
}

/// A message on its way to the device.
#[derive(Debug, Clone)]
pub(crate) struct OutMsg {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) qos: u8,
    /// MQTT 5: echoed from the request this answers.
    pub(crate) correlation_data: Option<Bytes>,
}

#[derive(Default)]
pub(crate) struct SessionState {
    pub(crate) subscriptions: Vec<(String, u8)>,
    /// QoS 1 messages sent and not yet acknowledged, by packet id.
    pub(crate) inflight: BTreeMap<u16, OutMsg>,
    /// Messages waiting for the connection or for room in the inflight window.
    pub(crate) pending: VecDeque<OutMsg>,
    next_pkid: u16,
    pub(crate) expiry: Duration,
    pub(crate) dropped: u64,
}

impl SessionState {
    /// The QoS a message on `topic` is delivered with, if any subscription matches.
    pub(crate) fn qos_for(&self, topic: &str) -> Option<u8> {
        self.subscriptions
            .iter()
            .filter(|(f, _)| crate::acl::matches(f, topic))
            .map(|(_, q)| *q)
            .max()
    }

    pub(crate) fn next_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    pub(crate) fn push(&mut self, thing: &DeviceId, msg: OutMsg, cap: usize) {
        if self.pending.len() >= cap {
            self.pending.pop_front();
            self.dropped += 1;
            if self.dropped % 1000 == 1 {
                tracing::warn!(%thing, dropped = self.dropped, cap, "session queue full: dropping its oldest messages (the device is away or not reading)");
            }
        }
        self.pending.push_back(msg);
    }
}

pub(crate) struct Slot {
    pub(crate) thing: DeviceId,
    pub(crate) link: Arc<Link>,
    pub(crate) dyn_link: Arc<dyn DeviceLink>,
    pub(crate) state: Mutex<SessionState>,
    pub(crate) expires_at: Mutex<Option<Instant>>,
}

/// Every session, by client id.
pub(crate) struct Sessions {
    map: DashMap<DeviceId, Arc<Slot>>,
    queue_cap: usize,
}

impl Sessions {
    pub(crate) fn new(queue_cap: usize) -> Self {
        Self {
            map: DashMap::new(),
            queue_cap,
        }
    }

    /// Takes over the client id's session: the live connection (if any) is told to close
    /// and waited for. With `clean`, a stored session is discarded. Returns the slot and
    /// whether a stored session was resumed.
    pub(crate) async fn take(
        &self,
        fleet: &FleetHandle,
        thing: &DeviceId,
        clean: bool,
        kick: &Arc<Kick>,
    ) -> (Arc<Slot>, bool) {
        if let Some(old) = self.map.get(thing).map(|s| s.value().clone()) {
            let previous = lock(&old.link.active).take();
            if let Some(previous) = previous {
                previous.fire(DisconnectCode::SessionTakenOver, "session taken over");
                previous.wait_finished(Duration::from_secs(5)).await;
            }
        }
        let existing = self.map.get(thing).map(|s| s.value().clone());
        let (slot, resumed) = match existing {
            Some(slot) if !clean && lock(&slot.expires_at).is_none_or(|t| t > Instant::now()) => {
                (slot, true)
            }
            _ => {
                let link = Arc::new(Link::new(self.queue_cap));
                let dyn_link: Arc<dyn DeviceLink> = link.clone();
                let slot = Arc::new(Slot {
                    thing: thing.clone(),
                    link,
                    dyn_link,
                    state: Mutex::new(SessionState::default()),
                    expires_at: Mutex::new(None),
                });
                if let Some(old) = self.map.insert(thing.clone(), slot.clone()) {
                    fleet.detach(thing, &old.dyn_link);
                }
                (slot, false)
            }
        };
        *lock(&slot.expires_at) = None;
        *lock(&slot.link.active) = Some(kick.clone());
        fleet.attach(thing, slot.dyn_link.clone());
        (slot, resumed)
    }

    /// The connection holding `kick` ended: keep the session until it expires, or drop it.
    pub(crate) fn release(&self, fleet: &FleetHandle, slot: &Arc<Slot>, kick: &Arc<Kick>) {
        {
            let mut active = lock(&slot.link.active);
            if !active.as_ref().is_some_and(|a| Arc::ptr_eq(a, kick)) {
                return; // A newer connection owns the session now.
            }
            *active = None;
        }
        let expiry = lock(&slot.state).expiry;
        if expiry.is_zero() {
            self.remove(fleet, slot);
        } else {
            *lock(&slot.expires_at) = Some(Instant::now() + expiry);
        }
    }

    fn remove(&self, fleet: &FleetHandle, slot: &Arc<Slot>) {
        if self
            .map
            .remove_if(&slot.thing, |_, s| Arc::ptr_eq(s, slot))
            .is_some()
        {
            fleet.detach(&slot.thing, &slot.dyn_link);
        }
    }

    /// Drops sessions whose expiry has passed. Returns how many.
    pub(crate) fn sweep(&self, fleet: &FleetHandle) -> usize {
        let now = Instant::now();
        let expired: Vec<Arc<Slot>> = self
            .map
            .iter()
            .filter(|s| lock(&s.expires_at).is_some_and(|t| t <= now))
            .map(|s| s.value().clone())
            .collect();
        for slot in &expired {
            self.remove(fleet, slot);
        }
        expired.len()
    }

    /// Tells every live connection to close.
    pub(crate) fn kick_all(&self, code: DisconnectCode, reason: &str) -> Vec<Arc<Kick>> {
        let mut kicks = Vec::new();
        for slot in self.map.iter() {
            if let Some(k) = lock(&slot.link.active).clone() {
                k.fire(code, reason);
                kicks.push(k);
            }
        }
        kicks
    }
}
