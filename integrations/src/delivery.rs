//! Delivering routes: one task per route reads the outbox after the route's cursor and
//! sends the events that name the route.
//!
//! - **Order per thing**: a thing's events go one at a time, in outbox order (its own
//!   order); the next waits until the one before is delivered or given up.
//! - **Things in parallel**: up to `parallel` requests at once, each for another thing,
//!   so a failing thing or a slow receiver holds up only its own events, until the
//!   route's window (`window` events read and not done) is full: that bounds how far the
//!   others run ahead of the oldest event not done.
//! - **At least once**: the cursor (every event at or before it is done) is written
//!   after the events, so a restart sends again, with the same ids, what it cannot know
//!   was done.
//! - Each attempt goes to the delivery log (written in batches); a failed webhook
//!   attempt is tried again on the [`schedule`](crate::schedule), then given up (logged
//!   `FAILED`); a 410 disables the route, as does failing for longer than
//!   `disable_after`. A Redis or Kafka attempt is tried again with backoff until it goes
//!   through.
//! - Each route's health (healthy, retrying, disabled, with the last error) is reported
//!   to the route table when it changes, for `routeStatusChanged`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ring::hmac;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use twin_actors::FleetHandle;
use twin_actors::routing::{RouteHealth, RouteStatus, RouteTable};
use twin_model::DeviceId;
use twin_model::route::{Network, event_id};
use twin_store::routes::{
    DeliveryRecord, DeliveryStatus, Destination, OutboxRecord, Replay, RouteRecord,
};
use twin_store::{StoreError, TwinStore};

use crate::Message;
use crate::schedule;
use crate::sink::Sink;
use crate::webhook::{Attempt, Verdict, WebhookClient};

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Waits before each retry (`webhook_retry_schedule`).
    pub schedule: Vec<Duration>,
    /// A route failing for longer is disabled (`webhook_disable_after`).
    pub disable_after: Duration,
    /// How long events and delivery records are kept (`route_retention`).
    pub retention: Duration,
    /// Events read and not yet done, per route.
    pub window: usize,
    /// Requests in flight, per webhook route.
    pub parallel: usize,
    /// Messages in flight, per Redis or Kafka route (each a round trip on one
    /// connection, so many more than HTTP requests).
    pub stream_parallel: usize,
    pub allowed_networks: Vec<Network>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            schedule: schedule::STANDARD.to_vec(),
            disable_after: Duration::from_secs(5 * 86_400),
            retention: Duration::from_secs(7 * 86_400),
            window: 10_000,
            parallel: 64,
            stream_parallel: 1024,
            allowed_networks: Vec::new(),
        }
    }
}

/// The delivery of every route, while it runs.
pub struct Deliveries {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Deliveries {
    pub fn start(fleet: FleetHandle, config: DeliveryConfig) -> Result<Self, String> {
        let webhooks = WebhookClient::new(config.allowed_networks.clone())?;
        let (stop, stopped) = watch::channel(false);
        let shared = Arc::new(Shared {
            fleet,
            webhooks,
            config,
        });
        let task = tokio::spawn(supervise(shared, stopped));
        Ok(Self { stop, task })
    }

    /// Stops every route's delivery, its cursor saved.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

struct Shared {
    fleet: FleetHandle,
    webhooks: WebhookClient,
    config: DeliveryConfig,
}

impl Shared {
    fn store(&self) -> &Arc<dyn TwinStore> {
        self.fleet.store()
    }
}

/// One delivery task per route; old events and delivery records pruned hourly.
async fn supervise(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let table = shared.fleet.routes().table().clone();
    let mut changes = table.changes();
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut prune = tokio::time::interval(Duration::from_secs(3600));
    // A route's task ends when its route is deleted; one that ended otherwise (a bug
    // made it panic) is started again, from its cursor, at the next check.
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        changes.borrow_and_update();
        running.retain(|id, task| {
            let ended = task.is_finished();
            if ended && table.get(id).is_some() {
                tracing::error!(route = %id, "a route's delivery stopped unexpectedly; it starts again from its cursor");
            }
            !ended
        });
        for route in table.all().iter() {
            let id = route.record.id.clone();
            running
                .entry(id.clone())
                .or_insert_with(|| tokio::spawn(deliver(shared.clone(), id, stopped.clone())));
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = prune.tick() => prune_old(&shared).await,
            _ = check.tick() => {}
            _ = stopped.changed() => break,
        }
    }
    for (_, task) in running {
        let _ = task.await;
    }
}

/// Drops events and delivery records older than the retention, delivered or not: a
/// route paused (or failing) for longer loses what it did not deliver, so the outbox stays
/// bounded however long a route waits.
async fn prune_old(shared: &Shared) {
    let store = shared.store();
    let now = shared.fleet.now_millis();
    let before = now.saturating_sub(shared.config.retention.as_millis() as u64);
    match store.prune_routes(before, before).await {
        Ok(n) if n > 0 => tracing::info!(records = n, "pruned old route events and deliveries"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot prune old route events"),
    }
}

/// An event read and not done yet.
struct Pending {
    event: Arc<OutboxRecord>,
    attempts: u32,
    /// Not before this (a retry's wait).
    next: Instant,
}

/// A route's delivery state in memory; rebuilt from the cursor at start and at a replay.
struct Route {
    id: String,
    /// Every event at or before it is done; `saved` is what the store has.
    saved: u64,
    saved_at: Instant,
    /// The outbox is read up to here.
    read: u64,
    /// The outbox had nothing more when last read.
    caught_up: bool,
    /// The outbox may have events not read yet (at start, after a replay, when a read
    /// was cut short by the window or failed).
    stale: bool,
    pending: BTreeMap<u64, Pending>,
    queues: HashMap<DeviceId, VecDeque<u64>>,
    busy: HashSet<DeviceId>,
    replay: Option<Replay>,
    /// When its failures began (no success since), milliseconds.
    failing_since: Option<u64>,
    /// What the last failed attempt met.
    last_error: Option<String>,
    /// The health last reported, with its error.
    reported: Option<(RouteHealth, Option<String>)>,
}

impl Route {
    fn new(id: String, cursor: u64, replay: Option<Replay>) -> Self {
        Self {
            id,
            saved: cursor,
            saved_at: Instant::now(),
            read: cursor,
            caught_up: false,
            stale: true,
            pending: BTreeMap::new(),
            queues: HashMap::new(),
            busy: HashSet::new(),
            replay,
            failing_since: None,
            last_error: None,
            reported: None,
        }
    }

    /// Every event at or before it is done.
    fn cursor(&self) -> u64 {
        self.pending
            .keys()
            .next()
            .map_or(self.read, |first| first - 1)
    }

    /// Whether a replay says to skip the event at `position` (delivered before, and
    /// written outside the replay's time range).
    fn skipped(&self, position: u64, event: &OutboxRecord) -> bool {
        self.replay.is_some_and(|r| !r.includes(position, event.at))
    }

    fn take(&mut self, position: u64, event: OutboxRecord) {
        self.read = position;
        if !event.routes.contains(&self.id) || self.skipped(position, &event) {
            return;
        }
        self.queues
            .entry(event.thing.clone())
            .or_default()
            .push_back(position);
        self.pending.insert(
            position,
            Pending {
                event: Arc::new(event),
                attempts: 0,
                next: Instant::now(),
            },
        );
    }

    /// The event at the head of its thing's queue is done.
    fn done(&mut self, position: u64) {
        if let Some(p) = self.pending.remove(&position) {
            let thing = &p.event.thing;
            self.busy.remove(thing);
            if let Some(q) = self.queues.get_mut(thing) {
                q.pop_front();
                if q.is_empty() {
                    self.queues.remove(thing);
                }
            }
        }
    }

    /// Heads of things' queues that may go now, and when the next waiting one may.
    fn ready(&self, limit: usize) -> (Vec<u64>, Option<Instant>) {
        let now = Instant::now();
        let mut ready = Vec::new();
        let mut next: Option<Instant> = None;
        for (thing, q) in &self.queues {
            if self.busy.contains(thing) {
                continue;
            }
            let Some(&head) = q.front() else { continue };
            let at = self.pending[&head].next;
            if at <= now {
                if ready.len() < limit {
                    ready.push(head);
                }
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        ready.sort_unstable();
        (ready, next)
    }
}

/// Retries a store call until it answers or delivery stops.
async fn patiently<T, F: std::future::Future<Output = Result<T, StoreError>>>(
    what: &str,
    stopped: &mut watch::Receiver<bool>,
    mut call: impl FnMut() -> F,
) -> Option<T> {
    let mut wait = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(v) => return Some(v),
            Err(e) => tracing::warn!(error = %e, "{what}; trying again in {wait:?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped.changed() => return None,
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

async fn deliver(shared: Arc<Shared>, id: String, mut stopped: watch::Receiver<bool>) {
    let table = shared.fleet.routes().table().clone();
    let store = shared.store().clone();
    let mut appended = table.appended();
    let mut changes = table.changes();
    let Some(live) = table.get(&id) else { return };
    let start = live.record.start;
    let Some(cursor) = patiently("cannot read a route's cursor", &mut stopped, || {
        store.cursor(&id)
    })
    .await
    else {
        return;
    };
    let replay = live.record.replay;
    let mut route = Route::new(id.clone(), cursor.unwrap_or(start), replay);
    let log = delivery_log(store.clone());
    let mut flights: JoinSet<(u64, Attempt)> = JoinSet::new();
    let config = &shared.config;
    let mut sink: Option<(Destination, Sink)> = None;
    loop {
        changes.borrow_and_update();
        let Some(live) = table.get(&id) else {
            flights.abort_all();
            return;
        };
        let record = &live.record;
        if sink.as_ref().is_none_or(|(d, _)| *d != record.destination) {
            match Sink::new(&record.destination, &id, &shared.webhooks) {
                Ok(s) => sink = Some((record.destination.clone(), s)),
                Err(e) => {
                    tracing::warn!(route = %id, error = %e, "cannot make the route's destination ready; trying again in 5 s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                        _ = stopped.changed() => {
                            save_cursor(&store, &mut route, true).await;
                            return;
                        }
                    }
                }
            }
        }
        let Some((_, sink)) = &sink else { continue };
        if record.replay.map(|r| r.id) != route.replay.map(|r| r.id)
            && let Some(mut replay) = record.replay
        {
            // Start over from the replay's place, once the attempts in flight are settled
            // (each ends within its timeout): what they delivered is not sent again as new,
            // nor is what was done after the cursor the replay was asked at.
            while let Some(done) = flights.join_next().await {
                if let Ok((position, attempt)) = done {
                    settle(&shared, &mut route, record, sink, position, attempt, &log).await;
                }
            }
            replay.upto = replay.upto.max(route.cursor());
            route = Route::new(id.clone(), replay.from, Some(replay));
            // Written at the next save whatever the store has: a cursor saved by this
            // task after the replay was asked must not stand.
            route.saved = u64::MAX;
        }
        report_health(&table, &mut route, record, shared.fleet.now_millis());
        let active = !record.paused && record.disabled.is_none();
        let unread = route.stale || appended.has_changed().unwrap_or(false);
        if active && unread && route.pending.len() < config.window {
            appended.borrow_and_update();
            route.stale = false;
            let want = config.window - route.pending.len();
            let read = route.read;
            match store.outbox(read, want).await {
                Ok(events) => {
                    route.caught_up = events.len() < want;
                    route.stale = !route.caught_up;
                    for (position, event) in events {
                        route.take(position, event);
                    }
                }
                Err(e) => {
                    tracing::warn!(route = %id, error = %e, "cannot read the outbox");
                    route.caught_up = true;
                    route.stale = true;
                }
            }
        }
        let mut next_try = None;
        if active {
            let parallel = if sink.is_webhook() {
                config.parallel
            } else {
                config.stream_parallel
            };
            let room = parallel.saturating_sub(flights.len());
            let (ready, next) = route.ready(room);
            next_try = next;
            let keys = keys(record, shared.fleet.now_millis());
            for position in ready {
                let pending = &route.pending[&position];
                route.busy.insert(pending.event.thing.clone());
                let event = pending.event.clone();
                let sink = sink.clone();
                let keys = keys.clone();
                let now = shared.fleet.now_millis() / 1000;
                flights.spawn(async move {
                    let message = Message::new(position, &event, now, &keys);
                    (position, sink.send(&message).await)
                });
            }
        }
        save_cursor(&store, &mut route, false).await;
        let more = active && !route.caught_up && route.pending.len() < config.window;
        if more && flights.is_empty() {
            continue;
        }
        tokio::select! {
            Some(done) = flights.join_next(), if !flights.is_empty() => {
                let mut done = Some(done);
                while let Some(finished) = done {
                    if let Ok((position, attempt)) = finished {
                        settle(&shared, &mut route, record, sink, position, attempt, &log).await;
                    }
                    done = flights.try_join_next();
                }
                // The window moved: there may be room for what the outbox holds.
                route.stale = true;
            }
            _ = appended.changed(), if active && route.pending.len() < config.window => {
                route.stale = true;
            }
            _ = changes.changed() => {}
            _ = sleep_until(next_try), if next_try.is_some() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)), if route.cursor() != route.saved => {}
            _ = stopped.changed() => {
                save_cursor(&store, &mut route, true).await;
                return;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// The keys to sign with: every secret still in force.
fn keys(route: &RouteRecord, now: u64) -> Arc<[hmac::Key]> {
    route
        .secrets
        .iter()
        .filter(|s| s.expires_at.is_none_or(|at| at > now))
        .filter_map(|s| crate::signing::key(&s.secret))
        .collect()
}

/// Tells the route table how the route is going, when that changed: disabled, retrying
/// (no success since a failure), or healthy.
fn report_health(table: &RouteTable, route: &mut Route, record: &RouteRecord, now: u64) {
    let now_is = match &record.disabled {
        Some(why) => (RouteHealth::Disabled, Some(why.clone())),
        None if route.failing_since.is_some() => (RouteHealth::Retrying, route.last_error.clone()),
        None => (RouteHealth::Healthy, route.last_error.clone()),
    };
    if route.reported.as_ref() == Some(&now_is) {
        return;
    }
    table.report(RouteStatus {
        route: record.id.clone(),
        health: now_is.0,
        last_error: now_is.1.clone(),
        since: now,
    });
    route.reported = Some(now_is);
}

/// Writes the cursor when it moved: at most every 200 ms while busy, or `now`.
async fn save_cursor(store: &Arc<dyn TwinStore>, route: &mut Route, now: bool) {
    let cursor = route.cursor();
    if cursor == route.saved {
        return;
    }
    if !now && route.saved_at.elapsed() < Duration::from_millis(200) && !route.pending.is_empty() {
        return;
    }
    match store.put_cursor(&route.id, cursor).await {
        Ok(()) => {
            route.saved = cursor;
            route.saved_at = Instant::now();
        }
        Err(e) => tracing::warn!(route = %route.id, error = %e, "cannot save a route's cursor"),
    }
}

/// Attempts on their way to the delivery log.
const LOG_QUEUE: usize = 4096;
/// The most attempts written to the log in one batch.
const LOG_BATCH: usize = 1024;

/// A task that writes a route's delivery log, so that the route's delivery does not wait
/// for each write: whatever has queued up while the last batch was written goes in the
/// next, one store write for many attempts. It ends when the route's delivery does,
/// after the last record.
fn delivery_log(store: Arc<dyn TwinStore>) -> mpsc::Sender<DeliveryRecord> {
    let (tx, mut rx) = mpsc::channel::<DeliveryRecord>(LOG_QUEUE);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(LOG_BATCH);
        while rx.recv_many(&mut batch, LOG_BATCH).await > 0 {
            if let Err(e) = store.put_deliveries(&batch).await {
                tracing::warn!(route = %batch[0].route, records = batch.len(), error = %e, "cannot write the delivery log");
            }
            batch.clear();
        }
    });
    tx
}

/// Records an attempt and decides what comes next for its event.
async fn settle(
    shared: &Shared,
    route: &mut Route,
    record: &RouteRecord,
    sink: &Sink,
    position: u64,
    attempt: Attempt,
    log: &mpsc::Sender<DeliveryRecord>,
) {
    let now = shared.fleet.now_millis();
    let Some(pending) = route.pending.get_mut(&position) else {
        return;
    };
    pending.attempts += 1;
    let event = pending.event.clone();
    let mut disable = None;
    let status = match attempt.verdict {
        Verdict::Delivered => {
            route.failing_since = None;
            DeliveryStatus::Delivered
        }
        Verdict::Gone => {
            disable = Some("the endpoint answered 410 Gone".to_owned());
            DeliveryStatus::Retrying
        }
        Verdict::Retry if !sink.is_webhook() => {
            route.failing_since.get_or_insert(now);
            let random = twin_store::secret::random::<2>().map_or(0, u16::from_be_bytes);
            pending.next = Instant::now() + schedule::backoff(pending.attempts, random);
            DeliveryStatus::Retrying
        }
        Verdict::Retry => {
            let since = *route.failing_since.get_or_insert(now);
            if now.saturating_sub(since) > shared.config.disable_after.as_millis() as u64 {
                disable = Some(format!(
                    "failing since {} (longer than webhook_disable_after)",
                    twin_model::rfc3339(since)
                ));
            }
            let random = twin_store::secret::random::<2>().map_or(0, u16::from_be_bytes);
            match schedule::next(
                &shared.config.schedule,
                pending.attempts,
                attempt.retry_after,
                random,
            ) {
                Some(wait) => {
                    pending.next = Instant::now() + wait;
                    DeliveryStatus::Retrying
                }
                None => DeliveryStatus::Failed,
            }
        }
    };
    let attempts = pending.attempts;
    if status != DeliveryStatus::Delivered {
        route.last_error = Some(match (&attempt.error, attempt.status) {
            (Some(e), _) => e.clone(),
            (None, Some(code)) => format!("HTTP {code}"),
            (None, None) => "failed".to_owned(),
        });
    }
    match status {
        DeliveryStatus::Delivered | DeliveryStatus::Failed => route.done(position),
        DeliveryStatus::Retrying => {
            route.busy.remove(&event.thing);
        }
    }
    if status == DeliveryStatus::Failed {
        tracing::warn!(
            route = %record.id,
            event = %event_id(position),
            thing = %event.thing,
            attempts,
            "an event was given up after its last retry"
        );
    }
    let entry = DeliveryRecord {
        route: record.id.clone(),
        position,
        thing: event.thing.clone(),
        seq: event.seq,
        kind: event.kind,
        attempt: attempts,
        at: now,
        status,
        http_status: attempt.status,
        error: attempt.error,
        latency_ms: attempt.latency.as_millis() as u64,
        response: attempt.response,
    };
    // Waits only when the log's writer is behind by a whole queue.
    let _ = log.send(entry).await;
    if let Some(why) = disable {
        tracing::warn!(route = %record.id, reason = %why, "route disabled");
        if let Err(e) = shared.fleet.routes().disable(&record.id, why).await {
            tracing::warn!(route = %record.id, error = %e, "cannot disable the route");
        }
    }
}
