//! A route's destination, made ready to send to: the kind its record names.

use std::sync::Arc;
use std::time::Duration;

use twin_store::routes::Destination;

use crate::Message;
use crate::kafka::KafkaTopic;
use crate::redis_stream::RedisStream;
use crate::webhook::{Attempt, WebhookClient};

#[derive(Clone)]
pub enum Sink {
    Webhook {
        client: WebhookClient,
        url: Arc<str>,
        timeout: Duration,
    },
    Redis(Arc<RedisStream>),
    Kafka(Arc<KafkaTopic>),
}

impl Sink {
    /// `webhooks` is shared by every webhook route (one connection pool).
    pub fn new(
        destination: &Destination,
        route: &str,
        webhooks: &WebhookClient,
    ) -> Result<Self, String> {
        Ok(match destination {
            Destination::Webhook { url, timeout_secs } => Self::Webhook {
                client: webhooks.clone(),
                url: url.as_str().into(),
                timeout: Duration::from_secs(u64::from(*timeout_secs)),
            },
            Destination::RedisStream {
                url,
                stream,
                max_len,
            } => Self::Redis(Arc::new(RedisStream::new(url, stream, *max_len)?)),
            Destination::Kafka { brokers, topic } => {
                Self::Kafka(Arc::new(KafkaTopic::new(brokers, topic, route)?))
            }
        })
    }

    /// Whether a failed event waits on the webhook schedule (and is given up at its end,
    /// the route disabled when failing too long), or is tried again until it goes
    /// through: Redis and Kafka are the operator's own, and their being down loses nothing.
    pub fn is_webhook(&self) -> bool {
        matches!(self, Self::Webhook { .. })
    }

    pub async fn send(&self, message: &Message) -> Attempt {
        match self {
            Self::Webhook {
                client,
                url,
                timeout,
            } => client.send(url, *timeout, message).await,
            Self::Redis(r) => r.send(message).await,
            Self::Kafka(k) => k.send(message).await,
        }
    }
}
