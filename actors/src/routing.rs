//! The twin's side of routes: which routes an event goes to, and the event's data.
//!
//! Twins write each event a route wants into the outbox in the same commit as the
//! change (see `twin_store::routes`). The routes in force are kept here, in memory, so
//! that a twin decides without a read: by the event's type first (one atomic load when no
//! route wants it), then by each route's filter on the thing as it is right after the
//! change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, RwLock};

use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use twin_model::route::EventType;
use twin_model::telemetry::Latest;
use twin_model::{Connectivity, Filter, Shadow, ShadowName};
use twin_store::routes::RouteRecord;
use twin_store::{ThingRecord, Write};

use crate::index::TwinView;

/// A route as twins match it.
pub struct LiveRoute {
    pub record: RouteRecord,
    filter: Option<Filter>,
    bits: u16,
}

impl LiveRoute {
    /// `record`'s filter must parse (it was checked when the route was written).
    pub fn new(record: RouteRecord) -> Result<Self, String> {
        let filter = match &record.filter {
            Some(f) => Some(Filter::parse(f).map_err(|e| e.to_string())?),
            None => None,
        };
        let bits = record.events.iter().fold(0, |b, t| b | t.bit());
        Ok(Self {
            record,
            filter,
            bits,
        })
    }
}

/// How a route's delivery is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteHealth {
    /// Its last attempt went through (or it has had none).
    Healthy,
    /// Its last attempt failed; the event is tried again.
    Retrying,
    /// It delivers nothing until resumed (a 410, or failing too long).
    Disabled,
}

/// A route's health as its delivery last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStatus {
    pub route: String,
    pub health: RouteHealth,
    /// The last failure (an HTTP status, a transport error, the reason it was disabled).
    pub last_error: Option<String>,
    /// When it changed to this health, milliseconds since the epoch.
    pub since: u64,
}

/// Status changes a slow subscriber may fall behind by before it misses some.
const STATUS_BACKLOG: usize = 1024;

/// The routes in force, and a signal for their delivery: `changes` moves on when a route
/// changes, `appended` when a twin has written an event to the outbox.
pub struct RouteTable {
    routes: RwLock<Arc<[Arc<LiveRoute>]>>,
    wanted: AtomicU16,
    changes: watch::Sender<u64>,
    appended: watch::Sender<u64>,
    health: RwLock<HashMap<String, RouteStatus>>,
    health_changes: broadcast::Sender<RouteStatus>,
}

impl Default for RouteTable {
    fn default() -> Self {
        Self {
            routes: RwLock::new(Arc::new([])),
            wanted: AtomicU16::new(0),
            changes: watch::channel(0).0,
            appended: watch::channel(0).0,
            health: RwLock::default(),
            health_changes: broadcast::channel(STATUS_BACKLOG).0,
        }
    }
}

impl RouteTable {
    pub fn all(&self) -> Arc<[Arc<LiveRoute>]> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<LiveRoute>> {
        self.all().iter().find(|r| r.record.id == id).cloned()
    }

    /// Puts `route` in force (replacing the route of its id), or removes the route `id`.
    pub(crate) fn set(&self, id: &str, route: Option<LiveRoute>) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let mut next: Vec<Arc<LiveRoute>> = routes
            .iter()
            .filter(|r| r.record.id != id)
            .cloned()
            .collect();
        next.extend(route.map(Arc::new));
        next.sort_by_key(|a| a.record.created_at);
        self.wanted
            .store(next.iter().fold(0, |b, r| b | r.bits), Ordering::Release);
        *routes = next.into();
        drop(routes);
        if !self.all().iter().any(|r| r.record.id == id) {
            self.health
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        }
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn wants(&self, kind: EventType) -> bool {
        self.wanted.load(Ordering::Acquire) & kind.bit() != 0
    }

    /// The ids of the routes that take an event of `kind` of a thing now as `view` shows
    /// it (`None`: the thing is not registered; only routes without a filter take it).
    pub fn matching(&self, kind: EventType, view: Option<&TwinView>) -> Vec<String> {
        self.all()
            .iter()
            .filter(|r| r.bits & kind.bit() != 0)
            .filter(|r| match (&r.filter, view) {
                (None, _) => true,
                (Some(f), Some(v)) => f.matches(v),
                (Some(_), None) => false,
            })
            .map(|r| r.record.id.clone())
            .collect()
    }

    /// The ids of the routes named `name` whose filter takes the thing as `view` shows it,
    /// whatever events they take: AWS IoT Basic Ingest sends a reading to them alone.
    pub fn named(&self, name: &str, view: &TwinView) -> Vec<String> {
        self.all()
            .iter()
            .filter(|r| r.record.name == name)
            .filter(|r| r.filter.as_ref().is_none_or(|f| f.matches(view)))
            .map(|r| r.record.id.clone())
            .collect()
    }

    /// Whether a route is named `name`.
    pub fn has_name(&self, name: &str) -> bool {
        self.all().iter().any(|r| r.record.name == name)
    }

    /// Moves on when a route changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Moves on when an event is appended to the outbox.
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// A route's health now; `None` before its delivery first reported.
    pub fn status(&self, id: &str) -> Option<RouteStatus> {
        self.health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Delivery reports a route's health; subscribers hear of it when it changed.
    pub fn report(&self, status: RouteStatus) {
        let mut health = self.health.write().unwrap_or_else(|p| p.into_inner());
        let changed = health
            .get(&status.route)
            .is_none_or(|s| s.health != status.health);
        if changed {
            health.insert(status.route.clone(), status.clone());
            drop(health);
            let _ = self.health_changes.send(status);
        } else if let Some(s) = health.get_mut(&status.route) {
            s.last_error = status.last_error;
        }
    }

    /// Every change of a route's health, from now on.
    pub fn status_changes(&self) -> broadcast::Receiver<RouteStatus> {
        self.health_changes.subscribe()
    }

    pub(crate) fn note_appended(&self) {
        self.appended.send_modify(|n| *n += 1);
    }
}

/// The event types a write can make (a telemetry message's event is made with it: see
/// the twin's telemetry).
pub(crate) fn kind_of(w: &Write) -> Option<&'static [EventType]> {
    Some(match w {
        Write::Shadow { .. } => &[EventType::ShadowChanged],
        Write::Connectivity { .. } => &[EventType::ConnectivityChanged],
        Write::Thing(_) => &[EventType::ThingRegistered, EventType::ThingUpdated],
        Write::Command(_) => &[EventType::CommandUpdated],
        Write::JobExecution(_) => &[EventType::JobExecutionUpdated],
        Write::DeleteThing(_) => &[EventType::ThingDeleted],
        Write::Job(_) | Write::Event(_) | Write::Telemetry { .. } => return None,
    })
}

/// A twin's state as it is being changed by a commit's writes, for routes' filters.
pub(crate) struct After {
    pub record: Option<ThingRecord>,
    pub connectivity: Connectivity,
    pub shadows: HashMap<ShadowName, Arc<Shadow>>,
    pub telemetry: Arc<Latest>,
}

impl After {
    pub(crate) fn view(&self) -> Option<TwinView> {
        let record = self.record.clone()?;
        Some(TwinView::assemble(
            Arc::new(record),
            self.connectivity.clone(),
            self.shadows.iter().map(|(n, s)| (n.clone(), s.clone())),
            self.telemetry.clone(),
        ))
    }

    /// The event `w` makes, if any, with the state after it. `THING_DELETED` is matched
    /// on the thing as it was just before.
    pub(crate) fn apply(&mut self, w: &Write) -> Option<(EventType, Value)> {
        Some(match w {
            Write::Shadow {
                shadow,
                state,
                change,
                ..
            } => {
                self.shadows.insert(shadow.clone(), state.clone());
                let data = json!({
                    "shadow": shadow.name(),
                    "version": change.version,
                    "change": change.op,
                    "state": state.exists.then(|| json!({
                        "desired": state.desired,
                        "reported": state.reported,
                    })),
                    "delta": state.delta(),
                    "clientToken": change.client_token,
                });
                (EventType::ShadowChanged, data)
            }
            Write::Connectivity { connectivity, .. } => {
                self.connectivity = connectivity.clone();
                let data = json!({
                    "connected": connectivity.connected,
                    "since": connectivity.since,
                    "disconnectReason": connectivity.disconnect_reason,
                });
                (EventType::ConnectivityChanged, data)
            }
            Write::Thing(record) => {
                let kind = if self.record.is_some() {
                    EventType::ThingUpdated
                } else {
                    EventType::ThingRegistered
                };
                self.record = Some(record.clone());
                let data = json!({
                    "enabled": record.enabled,
                    "attributes": record.attributes,
                    "certificates": record.certificates,
                    "createdAt": record.created_at,
                });
                (kind, data)
            }
            Write::Command(c) => (
                EventType::CommandUpdated,
                serde_json::to_value(&**c).unwrap_or(Value::Null),
            ),
            Write::JobExecution(e) => (
                EventType::JobExecutionUpdated,
                serde_json::to_value(&**e).unwrap_or(Value::Null),
            ),
            Write::DeleteThing(_) => (EventType::ThingDeleted, json!({})),
            Write::Telemetry { latest, .. } => {
                self.telemetry = latest.clone();
                return None;
            }
            Write::Job(_) | Write::Event(_) => return None,
        })
    }
}
