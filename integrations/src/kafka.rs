//! A Kafka destination: each event is one message on the route's topic, keyed by its
//! thing's id (so one partition holds a thing's events, in order), its value the event's
//! JSON, with the headers `webhook-id`, `webhook-timestamp`, `webhook-signature` and
//! `type` (a consumer can check with a Standard Webhooks library that Doppel sent it).
//!
//! The producer is librdkafka's (through `rdkafka`), idempotent (`enable.idempotence`:
//! the broker drops the duplicates of its own retries and keeps their order) and waits
//! for every in-sync replica (`acks=all`) before an event counts as delivered.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::Message;
use crate::webhook::Attempt;

/// How long librdkafka tries to deliver one message (its own retries included) before
/// the attempt counts as failed and the route's schedule takes over.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct KafkaTopic {
    producer: FutureProducer,
    topic: String,
}

impl KafkaTopic {
    /// Connects in the background: brokers down now is an attempt that fails later.
    pub fn new(brokers: &str, topic: &str, route: &str) -> Result<Self, String> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("client.id", format!("doppel-{route}"))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                MESSAGE_TIMEOUT.as_millis().to_string(),
            )
            // Events of many things batch together; a thing's next waits for its last.
            .set("linger.ms", "2")
            .create()
            .map_err(|e| format!("cannot make the Kafka producer: {e}"))?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
        })
    }

    pub async fn send(&self, message: &Message) -> Attempt {
        let started = Instant::now();
        let timestamp = message.timestamp.to_string();
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: "webhook-id",
                value: Some(&message.id),
            })
            .insert(Header {
                key: "webhook-timestamp",
                value: Some(&timestamp),
            })
            .insert(Header {
                key: "webhook-signature",
                value: Some(&message.signature),
            })
            .insert(Header {
                key: "type",
                value: Some(message.kind),
            });
        let record = FutureRecord::to(&self.topic)
            .key(&message.thing)
            .payload(&message.body)
            .headers(headers);
        match self.producer.send(record, MESSAGE_TIMEOUT).await {
            Ok(delivery) => Attempt::delivered(
                started,
                Some(format!(
                    "partition {} offset {}",
                    delivery.partition, delivery.offset
                )),
            ),
            Err((e, _)) => Attempt::failed(started, format!("Kafka: {e}")),
        }
    }
}
