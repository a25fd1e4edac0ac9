//! Routes (`fleet.routes()`): what integrators receive, kept in the store and in force in
//! every twin at once (see [`crate::routing`]).

use std::time::Duration;

use base64::Engine as _;
use twin_model::route::{EventType, Network, may_send_to};
use twin_model::{Filter, Rejection, RejectionKind};
use twin_store::routes::{
    DeliveryKey, DeliveryRecord, Destination, Replay, RouteRecord, SigningSecret,
};
use twin_store::secret;

use crate::error::FleetError;
use crate::fleet::FleetHandle;
use crate::routing::LiveRoute;

/// Routes a fleet may have.
pub const MAX_ROUTES: usize = 100;
/// A webhook's longest timeout, in seconds.
pub const MAX_TIMEOUT_SECS: u32 = 60;
/// A webhook's timeout when none is given, in seconds (as Standard Webhooks senders do).
pub const DEFAULT_TIMEOUT_SECS: u32 = 15;

/// What a new route is, or what an update changes (`None`: unchanged).
#[derive(Debug, Clone, Default)]
pub struct RouteSpec {
    pub name: Option<String>,
    pub events: Option<Vec<EventType>>,
    /// `Some(None)` removes the filter.
    pub filter: Option<Option<String>>,
    pub destination: Option<Destination>,
}

#[derive(Clone, Copy)]
pub struct Routes<'a>(pub(crate) &'a FleetHandle);

fn invalid(message: impl Into<String>) -> FleetError {
    Rejection::bad_request(message).into()
}

fn no_route(id: &str) -> FleetError {
    Rejection::new(RejectionKind::NotFound, format!("no route {id}")).into()
}

/// A new `whsec_` secret: 24 random bytes, base64, as Standard Webhooks has them.
fn new_secret() -> Result<String, FleetError> {
    let bytes = secret::random::<24>()?;
    Ok(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// A Redis stream's longest `MAXLEN`.
pub const MAX_STREAM_LEN: u64 = 1_000_000_000;

/// Checks a destination. A webhook: an absolute http(s) URL without credentials, to a
/// host that is not on a refused network when it is an address (or `localhost`); names
/// are checked again, resolved, at each delivery. Redis and Kafka are the operator's own
/// infrastructure, usually on a private network: their addresses are not restricted.
pub fn check_destination(d: &Destination, allowed: &[Network]) -> Result<(), String> {
    match d {
        Destination::Webhook { url, timeout_secs } => check_webhook(url, *timeout_secs, allowed),
        Destination::RedisStream {
            url,
            stream,
            max_len,
        } => {
            check_redis_url(url)?;
            if stream.is_empty() || stream.len() > 256 || stream.chars().any(char::is_control) {
                return Err(
                    "a Redis stream's name is 1 to 256 bytes, without control characters".into(),
                );
            }
            if !(1..=MAX_STREAM_LEN).contains(max_len) {
                return Err(format!(
                    "a Redis stream's maxLength is 1 to {MAX_STREAM_LEN}"
                ));
            }
            Ok(())
        }
        Destination::Kafka { brokers, topic } => {
            check_brokers(brokers)?;
            // Kafka's own rule for topic names.
            let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if topic.is_empty()
                || topic.len() > 249
                || !topic.chars().all(legal)
                || topic == "."
                || topic == ".."
            {
                return Err(
                    "a Kafka topic is 1 to 249 of a-z, A-Z, 0-9, '.', '_' and '-' (not . or ..)"
                        .into(),
                );
            }
            Ok(())
        }
    }
}

fn check_webhook(url: &str, timeout_secs: u32, allowed: &[Network]) -> Result<(), String> {
    if !(1..=MAX_TIMEOUT_SECS).contains(&timeout_secs) {
        return Err(format!(
            "a webhook's timeout is 1 to {MAX_TIMEOUT_SECS} seconds"
        ));
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("the URL does not parse: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("a webhook URL is http:// or https://".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("a webhook URL carries no credentials: the signature authenticates".into());
    }
    let ip = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
        Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost") => {
            Some(std::net::Ipv4Addr::LOCALHOST.into())
        }
        Some(url::Host::Domain(_)) => None,
        None => return Err("a webhook URL names a host".into()),
    };
    if let Some(ip) = ip
        && !may_send_to(ip, allowed)
    {
        return Err(format!(
            "{ip} is a loopback, private, link-local or other non-public address; allow its network with the setting webhook_allowed_networks"
        ));
    }
    Ok(())
}

/// `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS.
fn check_redis_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("the Redis URL does not parse: {e}"))?;
    if !matches!(parsed.scheme(), "redis" | "rediss") {
        return Err("a Redis URL is redis:// or rediss://".into());
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("a Redis URL names a host".into());
    }
    let db = parsed.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err(format!(
            "a Redis URL's path is a database number, not {db:?}"
        ));
    }
    Ok(())
}

/// `host:port`, comma-separated.
fn check_brokers(brokers: &str) -> Result<(), String> {
    let all: Vec<&str> = brokers.split(',').map(str::trim).collect();
    if all.len() > 32 {
        return Err("at most 32 Kafka brokers".into());
    }
    for broker in all {
        let (host, port) = broker
            .rsplit_once(':')
            .ok_or_else(|| format!("a Kafka broker is host:port, not {broker:?}"))?;
        let host_ok = !host.is_empty()
            && host.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':')
            });
        if !host_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("a Kafka broker is host:port, not {broker:?}"));
        }
    }
    Ok(())
}

impl Routes<'_> {
    fn store(&self) -> &dyn twin_store::TwinStore {
        &**self.0.store()
    }

    /// Every route, oldest first.
    pub fn list(&self) -> Vec<RouteRecord> {
        self.0
            .twins
            .routes
            .all()
            .iter()
            .map(|r| r.record.clone())
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<RouteRecord> {
        self.0.twins.routes.get(id).map(|r| r.record.clone())
    }

    /// The route table twins read, for the delivery of routes.
    pub fn table(&self) -> &std::sync::Arc<crate::routing::RouteTable> {
        &self.0.twins.routes
    }

    fn checked(&self, mut route: RouteRecord, spec: RouteSpec) -> Result<LiveRoute, FleetError> {
        if let Some(name) = spec.name {
            route.name = name;
        }
        if let Some(mut events) = spec.events {
            events.sort();
            events.dedup();
            route.events = events;
        }
        if let Some(filter) = spec.filter {
            route.filter = filter.filter(|f| !f.trim().is_empty());
        }
        if let Some(destination) = spec.destination {
            route.destination = destination;
        }
        let name = route.name.trim();
        if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
            return Err(invalid(
                "a route's name is 1 to 128 characters, without control characters",
            ));
        }
        if route.events.is_empty() {
            return Err(invalid("a route takes at least one event type"));
        }
        if let Some(f) = &route.filter {
            Filter::parse(f).map_err(|e| invalid(format!("the filter does not parse: {e}")))?;
        }
        check_destination(
            &route.destination,
            &self.0.config().webhook_allowed_networks,
        )
        .map_err(|e| invalid(format!("destination: {e}")))?;
        LiveRoute::new(route).map_err(invalid)
    }

    async fn save(&self, live: LiveRoute) -> Result<RouteRecord, FleetError> {
        self.store().put_route(&live.record).await?;
        let record = live.record.clone();
        self.0.twins.routes.set(&record.id, Some(live));
        Ok(record)
    }

    /// Creates a route; the answer has its signing secret, shown this once.
    pub async fn create(&self, spec: RouteSpec) -> Result<(RouteRecord, String), FleetError> {
        let _writing = self.0.route_lock.lock().await;
        if self.0.twins.routes.all().len() >= MAX_ROUTES {
            return Err(invalid(format!(
                "a fleet has at most {MAX_ROUTES} routes; delete one first"
            )));
        }
        let now = self.0.now_millis();
        let secret = new_secret()?;
        let blank = RouteRecord {
            id: format!("rt_{}", secret::random_hex::<8>()?),
            name: String::new(),
            events: Vec::new(),
            filter: None,
            destination: Destination::Webhook {
                url: String::new(),
                timeout_secs: DEFAULT_TIMEOUT_SECS,
            },
            secrets: vec![SigningSecret {
                secret: secret.clone(),
                expires_at: None,
            }],
            paused: false,
            disabled: None,
            replay: None,
            start: self.store().outbox_end().await?,
            created_at: now,
            updated_at: now,
        };
        let live = self.checked(blank, spec)?;
        Ok((self.save(live).await?, secret))
    }

    /// Changes what `spec` names.
    pub async fn update(&self, id: &str, spec: RouteSpec) -> Result<RouteRecord, FleetError> {
        self.change(id, |r| Ok((r, spec))).await
    }

    async fn change(
        &self,
        id: &str,
        f: impl FnOnce(RouteRecord) -> Result<(RouteRecord, RouteSpec), FleetError>,
    ) -> Result<RouteRecord, FleetError> {
        let _writing = self.0.route_lock.lock().await;
        let route = self.get(id).ok_or_else(|| no_route(id))?;
        let (mut route, spec) = f(route)?;
        route.updated_at = self.0.now_millis();
        let live = self.checked(route, spec)?;
        self.save(live).await
    }

    /// Pauses a route (its events wait in the outbox), or resumes it (a disabled route
    /// too: it goes on from where it stopped).
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<RouteRecord, FleetError> {
        self.change(id, |mut r| {
            r.paused = paused;
            if !paused {
                r.disabled = None;
            }
            Ok((r, RouteSpec::default()))
        })
        .await
    }

    /// Disables a route, saying why (its delivery does this).
    pub async fn disable(&self, id: &str, why: String) -> Result<RouteRecord, FleetError> {
        self.change(id, |mut r| {
            r.disabled = Some(why);
            Ok((r, RouteSpec::default()))
        })
        .await
    }

    /// A new signing secret, shown this once; the previous one keeps signing for
    /// `overlap` (Standard Webhooks receivers accept any of the signatures sent).
    pub async fn rotate_secret(
        &self,
        id: &str,
        overlap: Duration,
    ) -> Result<(RouteRecord, String), FleetError> {
        let secret = new_secret()?;
        let now = self.0.now_millis();
        let until = now.saturating_add(overlap.as_millis() as u64);
        let record = self
            .change(id, |mut r| {
                r.secrets.retain(|s| s.expires_at.is_none_or(|at| at > now));
                for s in &mut r.secrets {
                    s.expires_at = Some(s.expires_at.map_or(until, |at| at.min(until)));
                }
                r.secrets.insert(
                    0,
                    SigningSecret {
                        secret: secret.clone(),
                        expires_at: None,
                    },
                );
                Ok((r, RouteSpec::default()))
            })
            .await?;
        Ok((record, secret))
    }

    /// Delivers again the route's events written between `since` and `until`
    /// (milliseconds), in order per thing, then goes on from where it was.
    pub async fn replay(
        &self,
        id: &str,
        since: u64,
        until: u64,
    ) -> Result<RouteRecord, FleetError> {
        if since > until {
            return Err(invalid("a replay's since is after its until"));
        }
        let route = self.get(id).ok_or_else(|| no_route(id))?;
        let store = self.store();
        let upto = store.cursor(id).await?.unwrap_or(route.start);
        let from = before_time(store, since).await?;
        self.rewind(id, from, upto, since, until, None).await
    }

    /// Delivers the event at outbox `position` again (once more, out of its order), then
    /// goes on from where it was. `NOT_FOUND` when the route never took it or it is no
    /// longer kept.
    pub async fn redeliver(&self, id: &str, position: u64) -> Result<RouteRecord, FleetError> {
        let route = self.get(id).ok_or_else(|| no_route(id))?;
        let store = self.store();
        let upto = store.cursor(id).await?.unwrap_or(route.start);
        let event = store
            .outbox(position.saturating_sub(1), 1)
            .await?
            .into_iter()
            .find(|(p, e)| *p == position && e.routes.contains(&route.id))
            .ok_or_else(|| {
                FleetError::from(Rejection::new(
                    RejectionKind::NotFound,
                    format!(
                        "route {id} has no event {} (not taken by the route, or older than route_retention)",
                        twin_model::route::event_id(position)
                    ),
                ))
            })?;
        let at = event.1.at;
        self.rewind(id, position - 1, upto, at, at, Some(position))
            .await
    }

    async fn rewind(
        &self,
        id: &str,
        from: u64,
        upto: u64,
        since: u64,
        until: u64,
        only: Option<u64>,
    ) -> Result<RouteRecord, FleetError> {
        // Never past the cursor: what came after it is not delivered yet.
        let from = from.min(upto);
        self.store().put_cursor(id, from).await?;
        let replay = Replay {
            id: self.0.now_millis(),
            from,
            upto,
            since,
            until,
            only,
        };
        self.change(id, |mut r| {
            r.replay = Some(replay);
            Ok((r, RouteSpec::default()))
        })
        .await
    }

    /// A route's delivery log, newest first, before `before`.
    pub async fn deliveries(
        &self,
        id: &str,
        before: Option<DeliveryKey>,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, FleetError> {
        Ok(self.store().deliveries(id, before, limit).await?)
    }

    /// Deletes a route with its cursor and delivery log; `false` if there was none.
    pub async fn delete(&self, id: &str) -> Result<bool, FleetError> {
        let _writing = self.0.route_lock.lock().await;
        if self.get(id).is_none() {
            return Ok(false);
        }
        self.store().delete_route(id).await?;
        self.0.twins.routes.set(id, None);
        Ok(true)
    }
}

/// The outbox position just before the first event written at or after `since`
/// (milliseconds), or the outbox's end when there is none. Positions follow commit order,
/// and so (but for clock steps) time: a binary search over positions finds it in a few
/// dozen reads of one event, however many days of events the outbox keeps. Positions
/// that were pruned or expired read as the next event kept.
async fn before_time(
    store: &dyn twin_store::TwinStore,
    since: u64,
) -> Result<u64, twin_store::StoreError> {
    let (mut lo, mut hi) = (1, store.outbox_end().await? + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match store.outbox(mid - 1, 1).await?.first() {
            // Every position up to that event's is older than `since`.
            Some((position, event)) if event.at < since => lo = position + 1,
            _ => hi = mid,
        }
    }
    Ok(lo - 1)
}

#[cfg(test)]
mod tests {
    use twin_store::conformance::event;
    use twin_store::{EmbeddedStore, RouteStore, TwinStateStore};

    use super::before_time;

    /// The search lands where a scan of every event would, pruned positions included.
    #[tokio::test]
    async fn a_replay_starts_just_before_the_first_event_of_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 3).unwrap();
        // 1,000 events, ten to a millisecond from 1,000 ms on; the first 100 pruned.
        for n in 0..1000u64 {
            store
                .commit(vec![event("t1", n + 1, 1000 + n / 10, &["r"])])
                .await
                .unwrap();
        }
        assert_eq!(store.prune_routes(1010, 0).await.unwrap(), 100);
        // Position p (from 1) was written at 1000 + (p - 1) / 10: the first event read
        // after the place found is the first of its time (or the first kept).
        for (since, first) in [(0, 101), (1010, 101), (1011, 111), (1055, 551), (1099, 991)] {
            let from = before_time(&store, since).await.unwrap();
            let read = store.outbox(from, 1).await.unwrap();
            assert_eq!(read[0].0, first, "since {since}");
        }
        // Nothing written since: nothing to read.
        let from = before_time(&store, 5000).await.unwrap();
        assert!(store.outbox(from, 1).await.unwrap().is_empty());
    }
}
