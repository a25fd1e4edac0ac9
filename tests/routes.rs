//! Routes end to end, with the real binary and a receiver that checks every request with
//! the official Standard Webhooks library (`tools/webhook_receiver.py`, in a venv made
//! once per build directory; it needs `python3` with `venv` and access to PyPI).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;

use common::{Server, WAIT, graphql, register, start, update_desired};

const LIBRARY: &str = "standardwebhooks==1.1.0";

/// Retries come quickly here (the default schedule waits 5 s, then 5 min, ...).
const FAST_RETRIES: &[&str] = &[
    "--webhook-allowed-networks",
    "127.0.0.0/8",
    "--webhook-retry-schedule",
    "20ms,50ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms",
];

/// A webhook receiver in its own process.
struct Receiver {
    _child: tokio::process::Child,
    url: String,
    secret: PathBuf,
    log: PathBuf,
}

impl Receiver {
    async fn start(dir: &Path, options: &[&str]) -> Self {
        let python = common::python_venv("webhooks-venv", LIBRARY).join("bin/python");
        let (secret, log) = (dir.join("secret"), dir.join("received.jsonl"));
        let mut child = tokio::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tools/webhook_receiver.py"
            ))
            .arg(&secret)
            .arg(&log)
            .args(options)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let port = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the receiver says its port in time")
            .unwrap()
            .expect("the receiver printed its port");
        Self {
            _child: child,
            url: format!("http://127.0.0.1:{port}/hook"),
            secret,
            log,
        }
    }

    /// Every request the receiver answered, in the order it answered them.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The requests it accepted (2xx).
    fn accepted(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r["status"]
                    .as_u64()
                    .is_some_and(|s| (200..300).contains(&s))
            })
            .collect()
    }

    /// Waits until `done` holds for the requests (at most `within`).
    async fn wait_for(&self, within: Duration, done: impl Fn(&[Value]) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let requests = self.requests();
            if done(&requests) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the receiver did not get what was expected in {within:?}; it got {} requests",
                requests.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Creates a route of `events` to the receiver; writes its secret where the receiver
/// reads it; returns the route's id.
async fn route_to(server: &Server, token: &str, receiver: &Receiver, events: &str) -> String {
    let r = graphql(
        &server.http,
        Some(token),
        &format!(
            r#"mutation($url: String!) {{ createRoute(name: "test", events: [{events}],
                destination: {{webhook: {{url: $url, timeoutSeconds: 1}}}})
                {{ secret route {{ id state }} }} }}"#
        ),
        json!({"url": receiver.url}),
    )
    .await
    .json();
    let created = &r["data"]["createRoute"];
    let secret = created["secret"].as_str().unwrap_or_else(|| panic!("{r}"));
    std::fs::write(&receiver.secret, secret).unwrap();
    assert_eq!(created["route"]["state"], "ACTIVE");
    created["route"]["id"].as_str().unwrap().to_owned()
}

/// Per thing, the seqs accepted, in the order accepted (duplicates included).
fn by_thing(accepted: &[Value]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in accepted {
        out.entry(r["thing"].as_str().unwrap().to_owned())
            .or_default()
            .push(r["seq"].as_u64().unwrap());
    }
    out
}

#[tokio::test]
async fn every_event_arrives_in_order_through_failures_and_a_sigkill() {
    every_event_arrives_through_failures_and_a_sigkill(&[]).await;
}

#[tokio::test]
async fn every_event_arrives_in_order_through_failures_and_a_sigkill_on_scylladb() {
    every_event_arrives_through_failures_and_a_sigkill(&common::scylla_args()).await;
}

/// The server's flags: `FAST_RETRIES` and `store`'s.
fn with_store(store: &[String]) -> Vec<&str> {
    FAST_RETRIES
        .iter()
        .copied()
        .chain(store.iter().map(String::as_str))
        .collect()
}

async fn every_event_arrives_through_failures_and_a_sigkill(store: &[String]) {
    const THINGS: usize = 4;
    const BEFORE: u64 = 15;
    const AFTER: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    // 20% of requests fail, 5% sleep past the route's 1 s timeout.
    let receiver = Receiver::start(
        dir.path(),
        &[
            "--fail-rate",
            "0.2",
            "--slow-rate",
            "0.05",
            "--slow-secs",
            "1.5",
        ],
    )
    .await;
    let data = dir.path().join("data");
    let args = with_store(store);
    let server = start(&data, &args).await;
    let token = server.admin_token.clone().unwrap();
    let things: Vec<String> = (0..THINGS).map(|i| format!("pump-{i}")).collect();
    for t in &things {
        register(&server.http, &token, t, json!({})).await;
    }
    route_to(&server, &token, &receiver, "SHADOW_CHANGED").await;
    for n in 1..=BEFORE {
        for t in &things {
            update_desired(&server.http, &token, t, n).await;
        }
    }
    // Killed while deliveries are under way: every update above was acknowledged.
    let mut server = server;
    server.child.kill().await.unwrap();
    let accepted_at_kill = receiver.accepted().len();
    let server = start(&data, &args).await;
    for n in BEFORE + 1..=BEFORE + AFTER {
        for t in &things {
            update_desired(&server.http, &token, t, n).await;
        }
    }
    let want: HashSet<u64> = (1..=BEFORE + AFTER).collect();
    receiver
        .wait_for(Duration::from_secs(60), |_| {
            let got = by_thing(&receiver.accepted());
            things.iter().all(|t| {
                got.get(t)
                    .is_some_and(|seqs| seqs.iter().copied().collect::<HashSet<_>>() == want)
            })
        })
        .await;

    let requests = receiver.requests();
    let bad: Vec<&Value> = requests.iter().filter(|r| r["verified"] != true).collect();
    assert!(bad.is_empty(), "signatures that did not verify: {bad:?}");
    // Order per thing: a seq is accepted only after every seq before it.
    for (thing, seqs) in by_thing(&receiver.accepted()) {
        let mut seen = HashSet::new();
        for seq in seqs {
            assert!(
                (1..seq).all(|s| seen.contains(&s)),
                "{thing}: seq {seq} arrived before an earlier one"
            );
            seen.insert(seq);
        }
    }
    // A duplicate is the same event: one id per (thing, seq), and the body's id is the
    // header's.
    let mut ids: HashMap<String, (String, u64)> = HashMap::new();
    for r in &requests {
        assert_eq!(r["id"], r["event"], "{r}");
        let key = (
            r["thing"].as_str().unwrap().to_owned(),
            r["seq"].as_u64().unwrap(),
        );
        let previous = ids.insert(r["id"].as_str().unwrap().to_owned(), key.clone());
        assert!(previous.is_none_or(|p| p == key), "{r}");
    }
    let accepted = receiver.accepted().len();
    let unique = ids.len();
    let failed = requests.len() - accepted;
    println!(
        "{} events; {accepted} accepted ({} duplicates), {failed} failed or timed out; {accepted_at_kill} accepted before the SIGKILL",
        unique,
        accepted - unique
    );
    assert_eq!(unique, THINGS * (BEFORE + AFTER) as usize);
    server.terminate().await;
}

#[tokio::test]
async fn a_gone_endpoint_disables_the_route_and_its_log_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), &["--status", "410"]).await;
    let server = start(&dir.path().join("data"), FAST_RETRIES).await;
    let token = server.admin_token.clone().unwrap();
    register(&server.http, &token, "lamp-1", json!({})).await;
    let route = route_to(&server, &token, &receiver, "SHADOW_CHANGED").await;
    update_desired(&server.http, &token, "lamp-1", 1).await;
    receiver.wait_for(WAIT, |r| !r.is_empty()).await;

    let state = r#"query($id: ID!) { route(id: $id) { state disabledReason }
        routeDeliveries(route: $id) { edges { node { eventId thingId seq eventType attempt status httpStatus } } } }"#;
    let deadline = tokio::time::Instant::now() + WAIT;
    let v = loop {
        let v = graphql(&server.http, Some(&token), state, json!({"id": route}))
            .await
            .json();
        if v["data"]["route"]["state"] == "DISABLED" {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "not disabled: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        v["data"]["route"]["disabledReason"],
        "the endpoint answered 410 Gone"
    );
    let attempt = &v["data"]["routeDeliveries"]["edges"][0]["node"];
    assert_eq!(attempt["httpStatus"], 410, "{v}");
    assert_eq!(attempt["thingId"], "lamp-1");
    assert_eq!(attempt["seq"], 1);
    assert_eq!(attempt["eventType"], "SHADOW_CHANGED");
    assert_eq!(attempt["attempt"], 1);
    // Disabled: no more attempts, however long.
    let sent = receiver.requests().len();
    update_desired(&server.http, &token, "lamp-1", 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.requests().len(), sent);

    // Bad routes are refused with the reason.
    for (events, url, filter, why) in [
        (
            "SHADOW_CHANGED",
            "http://10.1.2.3/",
            None,
            "webhook_allowed_networks",
        ),
        (
            "SHADOW_CHANGED",
            "http://169.254.169.254/",
            None,
            "webhook_allowed_networks",
        ),
        ("SHADOW_CHANGED", "gopher://x/", None, "http:// or https://"),
        (
            "SHADOW_CHANGED",
            "https://example.com/",
            Some("reported.n >"),
            "filter",
        ),
        ("", "https://example.com/", None, "at least one event type"),
    ] {
        let r = graphql(
            &server.http,
            Some(&token),
            &format!(
                r#"mutation($url: String!, $filter: String) {{ createRoute(name: "bad", events: [{events}],
                    filter: $filter, destination: {{webhook: {{url: $url}}}}) {{ secret }} }}"#
            ),
            json!({"url": url, "filter": filter}),
        )
        .await
        .json();
        let error = &r["errors"][0];
        assert_eq!(error["extensions"]["code"], "INVALID_ARGUMENT", "{r}");
        assert!(error["message"].as_str().unwrap().contains(why), "{r}");
    }
    let r = graphql(
        &server.http,
        Some(&token),
        r#"mutation { createRoute(name: "bad", events: [SHADOW_MOVED], destination: {webhook: {url: "https://example.com/"}}) { secret } }"#,
        json!({}),
    )
    .await
    .json();
    assert!(
        r["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("SHADOW_MOVED"),
        "{r}"
    );
    server.terminate().await;
}

#[tokio::test]
async fn a_replay_delivers_the_time_range_again_with_the_same_ids() {
    a_replay_delivers_again(&[]).await;
}

#[tokio::test]
async fn a_replay_delivers_the_time_range_again_with_the_same_ids_on_scylladb() {
    a_replay_delivers_again(&common::scylla_args()).await;
}

async fn a_replay_delivers_again(store: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), &[]).await;
    let server = start(&dir.path().join("data"), &with_store(store)).await;
    let token = server.admin_token.clone().unwrap();
    register(&server.http, &token, "lamp-1", json!({})).await;
    let route = route_to(&server, &token, &receiver, "SHADOW_CHANGED, THING_UPDATED").await;
    for n in 1..=3 {
        update_desired(&server.http, &token, "lamp-1", n).await;
    }
    receiver.wait_for(WAIT, |r| r.len() == 3).await;
    let first: Vec<Value> = receiver
        .requests()
        .iter()
        .map(|r| r["id"].clone())
        .collect();

    let r = graphql(
        &server.http,
        Some(&token),
        r#"mutation($id: ID!) { replayRoute(id: $id, since: "2020-01-01T00:00:00Z", until: "2100-01-01T00:00:00Z") { state } }"#,
        json!({"id": route}),
    )
    .await
    .json();
    assert_eq!(r["data"]["replayRoute"]["state"], "ACTIVE", "{r}");
    receiver.wait_for(WAIT, |r| r.len() == 6).await;
    let again: Vec<Value> = receiver.requests()[3..]
        .iter()
        .map(|r| r["id"].clone())
        .collect();
    assert_eq!(again, first);
    // Then it goes on as before.
    update_desired(&server.http, &token, "lamp-1", 4).await;
    receiver.wait_for(WAIT, |r| r.len() == 7).await;
    assert_eq!(receiver.requests()[6]["seq"], 4);

    // One event again, by its id; then nothing else.
    let second = first[1].as_str().unwrap();
    let r = graphql(
        &server.http,
        Some(&token),
        r#"mutation($id: ID!, $event: String!) { redeliver(route: $id, eventId: $event) { state } }"#,
        json!({"id": route, "event": second}),
    )
    .await
    .json();
    assert_eq!(r["data"]["redeliver"]["state"], "ACTIVE", "{r}");
    receiver.wait_for(WAIT, |r| r.len() == 8).await;
    assert_eq!(receiver.requests()[7]["id"], second);
    update_desired(&server.http, &token, "lamp-1", 5).await;
    receiver.wait_for(WAIT, |r| r.len() == 9).await;
    assert_eq!(receiver.requests()[8]["seq"], 5);
    let r = graphql(
        &server.http,
        Some(&token),
        r#"mutation($id: ID!) { redeliver(route: $id, eventId: "evt_00000000000000ff") { state } }"#,
        json!({"id": route}),
    )
    .await
    .json();
    assert_eq!(r["errors"][0]["extensions"]["code"], "NOT_FOUND", "{r}");
    server.terminate().await;
}

/// Publishes `payload` on `topic` at QoS 1 and waits for its PUBACK.
async fn publish_acked(
    client: &rumqttc::AsyncClient,
    el: &mut rumqttc::EventLoop,
    topic: &str,
    payload: &str,
) {
    use rumqttc::{Event, Packet, QoS};
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("connection failed: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no PUBACK for {topic}"));
}

#[tokio::test]
async fn telemetry_reaches_routes_graphql_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), &[]).await;
    let data = dir.path().join("data");
    let server = start(&data, FAST_RETRIES).await;
    let token = server.admin_token.clone().unwrap();
    let secret = register(&server.http, &token, "meter-1", json!({})).await;
    route_to(&server, &token, &receiver, "TELEMETRY").await;
    let (client, mut el) = common::client_on(&server.mqtt, "meter-1", Some(&secret), &[]).await;
    let now = twin_model::rfc3339(twin_store::now_millis() - 1000);
    publish_acked(
        &client,
        &mut el,
        "dt/factory/meter-1/power",
        &format!(r#"{{"watts": 120, "phase": {{"a": 40}}, "timestamp": "{now}"}}"#),
    )
    .await;
    // AWS IoT Basic Ingest: to the route named "test" alone.
    publish_acked(
        &client,
        &mut el,
        "$aws/rules/test/meter",
        r#"{"watts": 130}"#,
    )
    .await;
    receiver.wait_for(WAIT, |r| r.len() == 2).await;
    let events: Vec<Value> = receiver
        .requests()
        .iter()
        .map(|r| r["body"].clone())
        .collect();
    assert_eq!(events[0]["type"], "TELEMETRY");
    assert_eq!(events[0]["thing"], "meter-1");
    assert_eq!(
        events[0]["data"],
        json!({"topic": "dt/factory/meter-1/power", "type": "power", "timestamp": now,
               "values": {"watts": 120, "phase": {"a": 40}}})
    );
    assert_eq!(events[1]["data"]["topic"], "$aws/rules/test/meter");
    assert_eq!(events[1]["data"]["values"], json!({"watts": 130}));
    assert_eq!(
        (events[0]["seq"].as_u64(), events[1]["seq"].as_u64()),
        (Some(1), Some(2))
    );

    // Latest values, the filter and the series survive a SIGKILL: the PUBACKs meant durable.
    let mut server = server;
    server.child.kill().await.unwrap();
    let server = start(&data, FAST_RETRIES).await;
    let r = graphql(
        &server.http,
        Some(&token),
        r#"{ thing(id: "meter-1") {
               telemetry { key value }
               telemetrySeries(key: "watts", since: "2020-01-01T00:00:00Z", step: 315360000) { count min max avg }
             }
             hot: things(filter: "telemetry.watts > 125") { totalCount }
             cold: things(filter: "telemetry.phase.a < 40") { totalCount } }"#,
        json!({}),
    )
    .await
    .json();
    assert_eq!(
        r["data"]["thing"]["telemetry"],
        json!([{"key": "phase.a", "value": 40}, {"key": "watts", "value": 130}]),
        "{r}"
    );
    let buckets = r["data"]["thing"]["telemetrySeries"].as_array().unwrap();
    let last = buckets.last().unwrap();
    assert_eq!(
        last,
        &json!({"count": 2, "min": 120.0, "max": 130.0, "avg": 125.0}),
        "{r}"
    );
    assert_eq!(r["data"]["hot"]["totalCount"], 1, "{r}");
    assert_eq!(r["data"]["cold"]["totalCount"], 0, "{r}");
    let r = graphql(
        &server.http,
        Some(&token),
        r#"{ thing(id: "meter-1") { telemetrySeries(key: "watts", since: "2020-01-01T00:00:00Z", step: 1) { count } } }"#,
        json!({}),
    )
    .await
    .json();
    assert_eq!(
        r["errors"][0]["extensions"]["code"], "INVALID_ARGUMENT",
        "{r}"
    );
    server.terminate().await;
}
