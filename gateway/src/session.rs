//! MQTT sessions: what outlives a connection.
//!
//! One [`Session`] per client id holds the subscriptions, the QoS 1 messages sent but not
//! acknowledged, the messages waiting to be sent, and the [`EventQueue`] the device's twin
//! delivers events into. A persistent session (`clean session = 0`, or an MQTT 5 session
//! expiry) outlives its connection until it expires; the twin keeps
//! delivering into it meanwhile (bounded: the oldest messages are dropped first).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::time::Instant;
use twin_actors::{DeviceLink, FleetHandle, SessionEnd};
use twin_model::{DeviceId, TwinEvent};

use crate::codec::DisconnectCode;

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the data is
/// plain queues and maps, valid at every step).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Tells one connection to close, and tells whoever asked when it has.
#[derive(Default)]
pub(crate) struct CloseSignal {
    pub(crate) fire: Notify,
    reason: Mutex<Option<(DisconnectCode, String)>>,
    pub(crate) finished: Notify,
    done: AtomicBool,
}

impl CloseSignal {
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
pub(crate) struct EventQueue {
    events: Mutex<VecDeque<Arc<TwinEvent>>>,
    pub(crate) notify: Notify,
    cap: usize,
    pub(crate) dropped: AtomicU64,
    pub(crate) active: Mutex<Option<Arc<CloseSignal>>>,
}

impl EventQueue {
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

impl DeviceLink for EventQueue {
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

    fn end_session(&self, why: SessionEnd, reason: &str) {
        let code = match why {
            SessionEnd::Revoked => DisconnectCode::NotAuthorized,
            SessionEnd::Moved => DisconnectCode::UseAnotherServer,
        };
        if let Some(k) = lock(&self.active).clone() {
            k.fire(code, reason);
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
    /// MQTT 5: the `traceparent` user property (see `api::Traced`).
    pub(crate) trace: Option<Arc<str>>,
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

pub(crate) struct Session {
    pub(crate) thing: DeviceId,
    pub(crate) events: Arc<EventQueue>,
    pub(crate) device_link: Arc<dyn DeviceLink>,
    pub(crate) state: Mutex<SessionState>,
    pub(crate) expires_at: Mutex<Option<Instant>>,
}

/// Every session, by client id.
pub(crate) struct Sessions {
    map: DashMap<DeviceId, Arc<Session>>,
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
    /// and waited for. With `clean`, a stored session is discarded. Returns the session and
    /// whether a stored session was resumed.
    pub(crate) async fn take(
        &self,
        fleet: &FleetHandle,
        thing: &DeviceId,
        clean: bool,
        close: &Arc<CloseSignal>,
    ) -> (Arc<Session>, bool) {
        if let Some(old) = self.map.get(thing).map(|s| s.value().clone()) {
            let previous = lock(&old.events.active).take();
            if let Some(previous) = previous {
                previous.fire(DisconnectCode::SessionTakenOver, "session taken over");
                previous.wait_finished(Duration::from_secs(5)).await;
            }
        }
        let existing = self.map.get(thing).map(|s| s.value().clone());
        let (session, resumed) = match existing {
            Some(session)
                if !clean && lock(&session.expires_at).is_none_or(|t| t > Instant::now()) =>
            {
                (session, true)
            }
            _ => {
                let events = Arc::new(EventQueue::new(self.queue_cap));
                let device_link: Arc<dyn DeviceLink> = events.clone();
                let session = Arc::new(Session {
                    thing: thing.clone(),
                    events,
                    device_link,
                    state: Mutex::new(SessionState::default()),
                    expires_at: Mutex::new(None),
                });
                if let Some(old) = self.map.insert(thing.clone(), session.clone()) {
                    fleet.sessions().detach(thing, &old.device_link);
                }
                (session, false)
            }
        };
        *lock(&session.expires_at) = None;
        *lock(&session.events.active) = Some(close.clone());
        fleet.sessions().attach(thing, session.device_link.clone());
        (session, resumed)
    }

    /// The connection holding `close` ended: keep the session until it expires, or drop it.
    pub(crate) fn release(
        &self,
        fleet: &FleetHandle,
        session: &Arc<Session>,
        close: &Arc<CloseSignal>,
    ) {
        {
            let mut active = lock(&session.events.active);
            if !active.as_ref().is_some_and(|a| Arc::ptr_eq(a, close)) {
                return; // A newer connection owns the session now.
            }
            *active = None;
        }
        let expiry = lock(&session.state).expiry;
        if expiry.is_zero() {
            self.remove(fleet, session);
        } else {
            *lock(&session.expires_at) = Some(Instant::now() + expiry);
        }
    }

    fn remove(&self, fleet: &FleetHandle, session: &Arc<Session>) {
        if self
            .map
            .remove_if(&session.thing, |_, s| Arc::ptr_eq(s, session))
            .is_some()
        {
            fleet
                .sessions()
                .detach(&session.thing, &session.device_link);
        }
    }

    /// Drops sessions whose expiry has passed. Returns how many.
    pub(crate) fn sweep(&self, fleet: &FleetHandle) -> usize {
        let now = Instant::now();
        let expired: Vec<Arc<Session>> = self
            .map
            .iter()
            .filter(|s| lock(&s.expires_at).is_some_and(|t| t <= now))
            .map(|s| s.value().clone())
            .collect();
        for session in &expired {
            self.remove(fleet, session);
        }
        expired.len()
    }

    /// Tells every live connection to close.
    pub(crate) fn close_all(&self, code: DisconnectCode, reason: &str) -> Vec<Arc<CloseSignal>> {
        let mut kicks = Vec::new();
        for session in self.map.iter() {
            if let Some(k) = lock(&session.events.active).clone() {
                k.fire(code, reason);
                kicks.push(k);
            }
        }
        kicks
    }
}
