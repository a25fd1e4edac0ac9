//! The MQTT endpoint's metrics: connections, CONNECT outcomes and packets by type.
//! (Shadow requests and 429s are counted with the twins' metrics, `twin_actors::telemetry`.)

use std::sync::LazyLock;

use twin_telemetry::{ByLabel, Counter, Family, Gauge, Labels, Registry, label_values};

use crate::codec::{ConnCode, Inbound, Outbound};

label_values! {
    /// How a CONNECT ended (the CONNACK's code).
    enum ConnectResult {
        Accepted = "accepted",
        UnsupportedVersion = "unsupported_version",
        BadClientId = "bad_client_id",
        NotAuthorized = "not_authorized",
        Banned = "banned",
        ServerBusy = "server_busy",
        ServerUnavailable = "server_unavailable",
        Malformed = "malformed",
        QuotaExceeded = "quota_exceeded",
    }
}

label_values! {
    enum Packet {
        Connect = "connect",
        Connack = "connack",
        Publish = "publish",
        Puback = "puback",
        Subscribe = "subscribe",
        Suback = "suback",
        Unsubscribe = "unsubscribe",
        Unsuback = "unsuback",
        Pingreq = "pingreq",
        Pingresp = "pingresp",
        Disconnect = "disconnect",
        Unsupported = "unsupported",
    }
}

struct Metrics {
    connections: Gauge,
    connects_family: Family<Labels, Counter>,
    connects: ByLabel<ConnectResult, Counter>,
    received_family: Family<Labels, Counter>,
    received: ByLabel<Packet, Counter>,
    sent_family: Family<Labels, Counter>,
    sent: ByLabel<Packet, Counter>,
    throttled: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let connects_family = Family::default();
    let received_family = Family::default();
    let sent_family = Family::default();
    Metrics {
        connections: Gauge::default(),
        connects: ByLabel::new(&connects_family, "result"),
        received: ByLabel::new(&received_family, "type"),
        sent: ByLabel::new(&sent_family, "type"),
        throttled: Counter::default(),
        connects_family,
        received_family,
        sent_family,
    }
});

/// Registers the MQTT endpoint's metrics (under the registry's `doppel_` prefix).
pub fn register(registry: &mut Registry) {
    let m = &*METRICS;
    registry.register(
        "mqtt_connections",
        "MQTT connections with an accepted CONNECT, now",
        m.connections.clone(),
    );
    registry.register(
        "mqtt_connects",
        "CONNECT packets answered, by result (the CONNACK's code)",
        m.connects_family.clone(),
    );
    registry.register(
        "mqtt_packets_received",
        "MQTT control packets received, by type",
        m.received_family.clone(),
    );
    registry.register(
        "mqtt_packets_sent",
        "MQTT control packets sent, by type",
        m.sent_family.clone(),
    );
    registry.register(
        "mqtt_publishes_throttled",
        "PUBLISH packets refused over mqtt_max_publishes_per_second",
        m.throttled.clone(),
    );
}

/// A publish refused over the connection's rate.
pub(crate) fn throttled() {
    METRICS.throttled.inc();
}

/// An accepted connection, counted in `doppel_mqtt_connections` until dropped.
pub(crate) struct Connected(());

impl Connected {
    pub(crate) fn new() -> Self {
        METRICS.connections.inc();
        Self(())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        METRICS.connections.dec();
    }
}

pub(crate) fn received(packet: &Inbound) {
    let kind = match packet {
        Inbound::Connect(_) => Packet::Connect,
        Inbound::Publish(_) => Packet::Publish,
        Inbound::PubAck(_) => Packet::Puback,
        Inbound::Subscribe { .. } => Packet::Subscribe,
        Inbound::Unsubscribe { .. } => Packet::Unsubscribe,
        Inbound::PingReq => Packet::Pingreq,
        Inbound::Disconnect { .. } => Packet::Disconnect,
        Inbound::Unsupported(_) => Packet::Unsupported,
    };
    METRICS.received.get(kind).inc();
}

pub(crate) fn sent(packet: &Outbound) {
    let kind = match packet {
        Outbound::ConnAck { code, .. } => {
            let result = match code {
                ConnCode::Accepted => ConnectResult::Accepted,
                ConnCode::UnsupportedVersion => ConnectResult::UnsupportedVersion,
                ConnCode::BadClientId => ConnectResult::BadClientId,
                ConnCode::NotAuthorized => ConnectResult::NotAuthorized,
                ConnCode::Banned => ConnectResult::Banned,
                ConnCode::ServerBusy => ConnectResult::ServerBusy,
                ConnCode::ServerUnavailable => ConnectResult::ServerUnavailable,
                ConnCode::Malformed => ConnectResult::Malformed,
                ConnCode::QuotaExceeded => ConnectResult::QuotaExceeded,
            };
            METRICS.connects.get(result).inc();
            Packet::Connack
        }
        Outbound::Publish { .. } => Packet::Publish,
        Outbound::PubAck { .. } => Packet::Puback,
        Outbound::SubAck { .. } => Packet::Suback,
        Outbound::UnsubAck { .. } => Packet::Unsuback,
        Outbound::PingResp => Packet::Pingresp,
        Outbound::Disconnect(..) => Packet::Disconnect,
    };
    METRICS.sent.get(kind).inc();
}
