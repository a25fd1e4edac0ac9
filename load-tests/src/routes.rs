//! `route-fanout`: devices update their shadows while a route sends every change to a
//! webhook receiver run here, to a Redis stream or to a Kafka topic read here; measures
//! what arrives.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::api::Api;
use crate::report::Report;
use crate::scenarios::{self, Fleet, Pace};

/// Where the route delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Destination {
    Webhook,
    Redis,
    Kafka,
}

/// The receiver's side of the run.
#[derive(Debug, Clone, clap::Args)]
pub struct Receiver {
    /// Where the route delivers: a webhook receiver run here, or a Redis stream or Kafka
    /// topic read here
    #[arg(long, value_enum, default_value = "webhook")]
    pub destination: Destination,
    /// The Redis server (`--destination redis`); the stream is `doppel-load:<time>`
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// The Kafka brokers (`--destination kafka`); the topic is `doppel-load-<time>`
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Where the webhook receiver listens (Doppel must allow its network:
    /// --webhook-allowed-networks 127.0.0.0/8)
    #[arg(long, default_value = "127.0.0.1:0")]
    pub receiver_listen: SocketAddr,
    /// Fraction of requests the receiver answers 500 (each is retried by Doppel)
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// How long to wait, after the devices stop, for the last events
    #[arg(long, default_value = "30s", value_parser = scenarios::parse_duration)]
    pub drain: Duration,
}

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    requests: u64,
    failed: u64,
    /// Per thing: the seqs accepted, in order of arrival (duplicates included).
    things: HashMap<String, Vec<u64>>,
    ids: HashMap<String, (String, u64)>,
    /// From the event's timestamp (its commit) to its first acceptance, microseconds.
    latency: Option<Histogram<u64>>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Seen {
    /// An event arrived (its JSON, as every destination has it).
    fn record(&mut self, body: &[u8]) -> anyhow::Result<()> {
        let event: Value = serde_json::from_slice(body)?;
        let thing = event["thing"].as_str().unwrap_or_default().to_owned();
        let seq = event["seq"].as_u64().unwrap_or_default();
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        if self.ids.insert(id, (thing.clone(), seq)).is_none()
            && let Some(at) = event["timestamp"]
                .as_str()
                .and_then(|t| twin_model::parse_rfc3339(t).ok())
            && let Some(h) = self.latency.as_mut()
        {
            let _ = h.record(now_ms().saturating_sub(at) * 1000);
        }
        self.things.entry(thing).or_default().push(seq);
        Ok(())
    }
}

/// Reads the route's Redis stream from its start, recording each entry's `event`.
async fn read_redis(url: String, stream: String, seen: Arc<Mutex<Seen>>) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    let mut connection = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("cannot connect to Redis")?;
    let mut last = "0".to_owned();
    loop {
        let read: redis::Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(5000)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&stream)
            .arg(&last)
            .query_async(&mut connection)
            .await
            .context("XREAD")?;
        // [[stream, [[id, [field, value, …]], …]]] (nil when nothing came).
        let entries = match read {
            redis::Value::Array(mut streams) if !streams.is_empty() => match streams.remove(0) {
                redis::Value::Array(mut s) if s.len() == 2 => s.remove(1),
                _ => continue,
            },
            _ => continue,
        };
        let redis::Value::Array(entries) = entries else {
            continue;
        };
        let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
        for entry in entries {
            let redis::Value::Array(parts) = entry else {
                continue;
            };
            let [id, redis::Value::Array(fields)] = parts.as_slice() else {
                continue;
            };
            if let redis::Value::BulkString(id) = id {
                last = String::from_utf8_lossy(id).into_owned();
            }
            for pair in fields.chunks(2) {
                if let [redis::Value::BulkString(k), redis::Value::BulkString(v)] = pair
                    && k == b"event"
                {
                    s.requests += 1;
                    s.record(v)?;
                }
            }
        }
    }
}

/// Reads the route's Kafka topic from its start, recording each message.
async fn read_kafka(brokers: String, topic: String, seen: Arc<Mutex<Seen>>) -> anyhow::Result<()> {
    use rdkafka::Message as _;
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .set("allow.auto.create.topics", "true")
        .create()?;
    consumer.subscribe(&[&topic])?;
    loop {
        match consumer.recv().await {
            Ok(m) => {
                if let Some(payload) = m.payload() {
                    let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                    s.requests += 1;
                    s.record(payload)?;
                }
            }
            // The topic appears with the first event; until then the consumer says so.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Serves webhooks on one connection (HTTP/1.1, kept alive) until it closes.
async fn serve(stream: TcpStream, seen: Arc<Mutex<Seen>>, fail_rate: f64) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    loop {
        let mut length = 0usize;
        let mut first = true;
        loop {
            line.clear();
            if read.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() && !first {
                break;
            }
            first = false;
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        read.read_exact(&mut body).await?;
        let status = {
            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
            s.requests += 1;
            // Spread evenly: every 1/fail_rate-th request fails.
            let fail = fail_rate > 0.0
                && ((s.requests as f64 * fail_rate).floor()
                    > ((s.requests - 1) as f64 * fail_rate).floor());
            if fail {
                s.failed += 1;
                500
            } else {
                s.record(&body)?;
                204
            }
        };
        let reason = if status == 204 {
            "No Content"
        } else {
            "Internal Server Error"
        };
        write
            .write_all(
                format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\n\r\n").as_bytes(),
            )
            .await?;
    }
}

/// Counts what a run's receipts say: events, gaps (lost), out of order, duplicates.
fn tally(seen: &Seen) -> (u64, u64, u64, u64) {
    let (mut events, mut lost, mut disordered, mut duplicates) = (0, 0, 0, 0);
    for seqs in seen.things.values() {
        let mut got = std::collections::BTreeSet::new();
        let start = seqs.iter().copied().min().unwrap_or(1);
        for &seq in seqs {
            if !got.insert(seq) {
                duplicates += 1;
            } else if (start..seq).any(|s| !got.contains(&s)) {
                disordered += 1;
            }
        }
        events += got.len() as u64;
        let (lo, hi) = (start, got.last().copied().unwrap_or(start));
        lost += (hi - lo + 1) - got.len() as u64;
    }
    (events, lost, disordered, duplicates)
}

pub async fn route_fanout(
    fleet: &Fleet,
    pace: &Pace,
    api: &Api,
    receiver: &Receiver,
) -> anyhow::Result<Report> {
    let seen = Arc::new(Mutex::new(Seen {
        latency: Some(Histogram::new(3)?),
        ..Seen::default()
    }));
    let name = format!("doppel-load-{}", now_ms());
    let (destination, reading) = match receiver.destination {
        Destination::Webhook => {
            let listener = TcpListener::bind(receiver.receiver_listen)
                .await
                .context("the webhook receiver cannot listen")?;
            let url = format!("http://{}/hook", listener.local_addr()?);
            let seen = seen.clone();
            let fail_rate = receiver.fail_rate;
            let accepting = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve(stream, seen.clone(), fail_rate));
                }
                Ok(())
            });
            (json!({"webhook": {"url": url}}), accepting)
        }
        Destination::Redis => {
            let reading = tokio::spawn(read_redis(
                receiver.redis_url.clone(),
                name.clone(),
                seen.clone(),
            ));
            let stream =
                json!({"url": receiver.redis_url, "stream": name, "maxLength": 10_000_000});
            (json!({ "redisStream": stream }), reading)
        }
        Destination::Kafka => {
            let reading = tokio::spawn(read_kafka(
                receiver.kafka_brokers.clone(),
                name.clone(),
                seen.clone(),
            ));
            let topic = json!({"brokers": receiver.kafka_brokers, "topic": name});
            (json!({ "kafka": topic }), reading)
        }
    };
    let pool = api.pool();
    let created = pool
        .execute(
            r#"mutation($d: DestinationInput!) { createRoute(name: "route-fanout", events: [SHADOW_CHANGED],
                destination: $d) { route { id } } }"#,
            json!({"d": destination}),
        )
        .await?;
    let Some(route) = created["createRoute"]["route"]["id"]
        .as_str()
        .map(str::to_owned)
    else {
        bail!("createRoute failed: {created}");
    };
    let mut report = scenarios::shadow_update(fleet, pace).await?;
    report.scenario = "route-fanout".into();
    // The events of every accepted update, then a quiet second: the route has drained.
    let deadline = Instant::now() + receiver.drain;
    loop {
        let events = tally(&seen.lock().unwrap_or_else(|p| p.into_inner())).0;
        let quiet = seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last
            .is_none_or(|l| l.elapsed() > Duration::from_secs(1));
        if (events >= report.ok && quiet) || Instant::now() > deadline || reading.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pool.execute(
        "mutation($id: ID!) { deleteRoute(id: $id) }",
        json!({"id": route}),
    )
    .await?;
    if reading.is_finished() {
        reading.await??;
    } else {
        reading.abort();
    }
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let (events, lost, disordered, duplicates) = tally(&seen);
    let span = match (seen.first, seen.last) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(0.001),
        _ => 0.0,
    };
    let f = &mut report.figures;
    f.insert("accepted_updates".into(), json!(report.ok));
    f.insert("events_delivered".into(), json!(events));
    f.insert(
        "events_not_delivered".into(),
        json!(report.ok.saturating_sub(events)),
    );
    f.insert("lost_in_sequence".into(), json!(lost));
    f.insert("out_of_order".into(), json!(disordered));
    f.insert("duplicates".into(), json!(duplicates));
    f.insert(
        "destination".into(),
        json!(format!("{:?}", receiver.destination).to_lowercase()),
    );
    f.insert("receiver_requests".into(), json!(seen.requests));
    f.insert("receiver_failed_on_purpose".into(), json!(seen.failed));
    if span > 0.0 {
        f.insert(
            "delivered_per_second".into(),
            json!((events as f64 / span).round()),
        );
    }
    if let Some(h) = &seen.latency {
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            f.insert(
                format!("added_latency_{name}_ms"),
                json!(h.value_at_quantile(q) as f64 / 1000.0),
            );
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_are_tallied_for_gaps_order_and_duplicates() {
        let mut seen = Seen::default();
        seen.things.insert("a".into(), vec![1, 2, 2, 3]);
        seen.things.insert("b".into(), vec![5, 7, 6]);
        // a: 3 events, one duplicate; b: 3 events, 7 before 6.
        assert_eq!(tally(&seen), (6, 0, 1, 1));
        seen.things.insert("c".into(), vec![1, 3]);
        assert_eq!(tally(&seen), (8, 1, 2, 1));
    }
}
