//! The MQTT session core: what one connection's packets mean, with no IO. The tokio loop
//! in [`connection`](crate::connection) feeds it packets and does what it answers:
//! packets to send, a request of the device API to dispatch, a close.
//!
//! It owns the protocol rules: the thing's topic ACL, QoS (1 at most) and retain refusal,
//! the in-flight request limit (AWS IoT's 10 per connection), the QoS 1 window towards
//! the device with its packet ids, and keep-alive bookkeeping. The session queue it
//! works on ([`SessionState`]) outlives the connection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use twin_model::DeviceId;
use twin_model::telemetry::{Destination, TelemetryTopics};
use twin_model::topic::{CommandChannel, CommandTopic};
use twin_telemetry::trace;

use tokio::time::Instant;

use crate::accept::RateLimitedLog;
use crate::acl;
use crate::codec::{DisconnectCode, InPublish, Inbound, Outbound, PubAckCode, SubCode, Version};
use crate::limits::TokenBucket;
use crate::session::{OutMsg, SessionState};
use crate::telemetry;

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Close {
    /// DISCONNECT from the client; `will` when it asked for its will (MQTT 5 reason 4).
    Client {
        will: bool,
    },
    Lost(String),
    /// We closed it, with this reason code (sent in MQTT 5) and text.
    Server(DisconnectCode, String),
}

impl Close {
    pub(crate) fn publishes_will(&self) -> bool {
        match self {
            Self::Client { will } => *will,
            Self::Lost(_) => true,
            Self::Server(code, _) => !matches!(
                code,
                DisconnectCode::ServerShuttingDown | DisconnectCode::NotAuthorized
            ),
        }
    }

    pub(crate) fn reason(&self) -> String {
        match self {
            Self::Client { .. } => "client disconnected".into(),
            Self::Lost(why) | Self::Server(_, why) => why.clone(),
        }
    }
}

/// Where an MQTT 5 request asked for its answer (its response topic, inside the
/// device's namespace) and the correlation data to echo; `None`: the default topics.
pub(crate) type ReplyTo = Option<(String, Option<Bytes>)>;

/// A publish of the device in its own topics: maybe a request of the device API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    /// The packet id to acknowledge once answered (QoS 1).
    pub(crate) ack: Option<u16>,
    pub(crate) reply_to: ReplyTo,
    /// The W3C trace context the device sent (MQTT 5).
    pub(crate) traceparent: Option<String>,
    /// Where it goes when it is telemetry.
    pub(crate) telemetry: Option<Destination>,
}

/// What handling one packet asks of the connection.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Actions {
    /// Packets to send now, in order.
    pub(crate) send: Vec<Outbound>,
    pub(crate) request: Option<Request>,
    /// The device subscribed to its command requests: waiting commands are for it now.
    pub(crate) wants_commands: bool,
    pub(crate) close: Option<Close>,
}

impl Actions {
    fn close(code: DisconnectCode, why: impl Into<String>) -> Self {
        Self {
            close: Some(Close::Server(code, why.into())),
            ..Self::default()
        }
    }
}

/// One connection's protocol state.
pub(crate) struct Core {
    thing: DeviceId,
    version: Version,
    /// Unacknowledged QoS 1 messages towards the device, at most.
    window: usize,
    /// Requests waiting for the twin, at most.
    max_requests: usize,
    requests: usize,
    /// Granted keep-alive, in seconds (0: none).
    keep_alive: u16,
    /// Publishes of the device, per second.
    publishes: TokenBucket,
    throttled_log: RateLimitedLog,
    /// The topics of device telemetry.
    telemetry: Arc<TelemetryTopics>,
}

impl Core {
    pub(crate) fn new(
        thing: DeviceId,
        version: Version,
        window: usize,
        max_requests: usize,
        keep_alive: u16,
    ) -> Self {
        Self {
            thing,
            version,
            window: window.max(1),
            max_requests,
            requests: 0,
            keep_alive,
            publishes: TokenBucket::new(0, 1, Instant::now()),
            throttled_log: RateLimitedLog::default(),
            telemetry: Arc::default(),
        }
    }

    /// Takes publishes on `topics` as the device's telemetry.
    pub(crate) fn with_telemetry(mut self, topics: Arc<TelemetryTopics>) -> Self {
        self.telemetry = topics;
        self
    }

    /// Limits the device's publishes to `rate` a second, up to `rate` at once (0: none).
    pub(crate) fn with_publish_rate(mut self, rate: u32) -> Self {
        self.publishes = TokenBucket::new(rate, rate, Instant::now());
        self
    }

    pub(crate) fn thing(&self) -> &DeviceId {
        &self.thing
    }

    pub(crate) fn version(&self) -> Version {
        self.version
    }

    /// How long the connection may stay silent: one and a half keep-alives (MQTT 3.1.2.10).
    pub(crate) fn silence_allowed(&self) -> Option<Duration> {
        (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500))
    }

    /// Whether another request may go to the twin (otherwise it is refused with a 429).
    pub(crate) fn has_room(&self) -> bool {
        self.requests < self.max_requests
    }

    pub(crate) fn request_sent(&mut self) {
        self.requests += 1;
    }

    pub(crate) fn request_answered(&mut self) {
        self.requests = self.requests.saturating_sub(1);
    }

    /// The topic of command requests, as a sample a subscription filter may match.
    fn command_requests(&self) -> String {
        CommandTopic {
            thing: self.thing.clone(),
            execution_id: "x".into(),
            channel: CommandChannel::Request,
        }
        .format()
    }

    /// Whether the session's subscriptions include the thing's command requests.
    pub(crate) fn listens_for_commands(&self, st: &SessionState) -> bool {
        let sample = self.command_requests();
        st.subscriptions
            .iter()
            .any(|(f, _)| acl::matches(f, &sample))
    }

    pub(crate) fn handle(&mut self, st: &mut SessionState, packet: Inbound) -> Actions {
        let mut actions = Actions::default();
        match packet {
            Inbound::Publish(p) => return self.on_publish(p),
            Inbound::PubAck(pkid) => {
                st.inflight.remove(&pkid);
            }
            Inbound::Subscribe { pkid, filters } => {
                let commands = self.command_requests();
                let mut codes = Vec::with_capacity(filters.len());
                for (filter, qos) in filters {
                    let code = if !acl::valid_filter(&filter) {
                        SubCode::BadFilter
                    } else if !acl::allowed(&self.thing, &filter) {
                        tracing::warn!(client_id = %self.thing, %filter, "subscription refused: outside the thing's topics");
                        SubCode::NotAuthorized
                    } else {
                        let granted = qos.min(1);
                        actions.wants_commands |= acl::matches(&filter, &commands);
                        st.subscriptions.retain(|(f, _)| *f != filter);
                        st.subscriptions.push((filter, granted));
                        SubCode::Granted(granted)
                    };
                    codes.push(code);
                }
                actions.send.push(Outbound::SubAck { pkid, codes });
            }
            Inbound::Unsubscribe { pkid, filters } => {
                st.subscriptions.retain(|(f, _)| !filters.contains(f));
                actions.send.push(Outbound::UnsubAck {
                    pkid,
                    count: filters.len(),
                });
            }
            Inbound::PingReq => actions.send.push(Outbound::PingResp),
            Inbound::Disconnect { reason } => {
                actions.close = Some(Close::Client { will: reason == 4 });
            }
            Inbound::Connect(_) => {
                return Actions::close(DisconnectCode::ProtocolError, "second CONNECT");
            }
            Inbound::Unsupported("QoS 2") => {
                return Actions::close(
                    DisconnectCode::QoSNotSupported,
                    "QoS 2 is not supported (maximum QoS is 1)",
                );
            }
            Inbound::Unsupported(what) => {
                return Actions::close(DisconnectCode::ProtocolError, format!("unexpected {what}"));
            }
        }
        actions
    }

    fn on_publish(&mut self, p: InPublish) -> Actions {
        if p.qos > 1 {
            return Actions::close(
                DisconnectCode::QoSNotSupported,
                "QoS 2 is not supported (maximum QoS is 1)",
            );
        }
        if p.retain && self.version == Version::V5 {
            return Actions::close(
                DisconnectCode::RetainNotSupported,
                "retained messages are not supported",
            );
        }
        if !acl::valid_topic(&p.topic) {
            // A protocol error in both versions (MQTT 5 section 3.3.2.1, 3.1.1 section 3.3.2.1).
            return Actions::close(
                DisconnectCode::TopicNameInvalid,
                "invalid topic name: empty, or with a wildcard (+ #) or NUL",
            );
        }
        let now = Instant::now();
        if !self.publishes.admit(now) {
            telemetry::throttled();
            if let Some(suppressed) = self.throttled_log.admit(now) {
                tracing::warn!(client_id = %self.thing, suppressed, "publish refused: over mqtt_max_publishes_per_second");
            }
            return match self.version {
                Version::V5 if p.qos == 1 => Actions {
                    send: vec![Outbound::PubAck {
                        pkid: p.pkid,
                        code: PubAckCode::QuotaExceeded,
                    }],
                    ..Actions::default()
                },
                Version::V5 => Actions::default(),
                Version::V4 => Actions::close(
                    DisconnectCode::QuotaExceeded,
                    "publishes over mqtt_max_publishes_per_second",
                ),
            };
        }
        let telemetry = self.telemetry.classify(&p.topic);
        let allowed = match &telemetry {
            Some(Destination::Topic { thing, .. }) => thing == self.thing.as_str(),
            Some(Destination::BasicIngest { .. }) => true,
            None => acl::allowed(&self.thing, &p.topic),
        };
        if !allowed {
            tracing::warn!(client_id = %self.thing, topic = %p.topic, "publish refused: outside the thing's topics");
            return match self.version {
                Version::V5 if p.qos == 1 => Actions {
                    send: vec![Outbound::PubAck {
                        pkid: p.pkid,
                        code: PubAckCode::NotAuthorized,
                    }],
                    ..Actions::default()
                },
                Version::V5 => Actions::default(),
                // The reason is kept as the thing's disconnect reason, shown through the
                // API: it does not quote the device's topic (the log line above does).
                Version::V4 => Actions::close(
                    DisconnectCode::NotAuthorized,
                    "publish outside the thing's topics (or telemetry as another thing) is not authorized",
                ),
            };
        }
        let reply_to = p
            .response_topic
            .filter(|t| acl::valid_topic(t) && acl::allowed(&self.thing, t))
            .map(|t| (t, p.correlation_data));
        Actions {
            request: Some(Request {
                topic: p.topic,
                payload: p.payload,
                ack: (p.qos == 1).then_some(p.pkid),
                reply_to,
                traceparent: p.traceparent,
                telemetry,
            }),
            ..Actions::default()
        }
    }

    /// Moves queued messages out through `write`, within the QoS 1 window. `write` says
    /// whether the packet went out (false: over the client's maximum packet size, dropped).
    pub(crate) fn pump(&self, st: &mut SessionState, mut write: impl FnMut(&Outbound) -> bool) {
        while let Some(msg) = st.pending.front() {
            if msg.qos == 1 && st.inflight.len() >= self.window {
                break;
            }
            let Some(msg) = st.pending.pop_front() else {
                break;
            };
            let pkid = if msg.qos == 1 { st.next_pkid() } else { 0 };
            let packet = publish(&msg, pkid, false);
            let traced = msg.trace.clone().map(|t| (t, msg.topic.clone(), msg.qos));
            if msg.qos == 1 {
                st.inflight.insert(pkid, msg);
            }
            if !write(&packet) {
                st.inflight.remove(&pkid);
            } else if let Some((parent, topic, qos)) = traced {
                // Sent in a trace: a span marks the moment it left for the device.
                let _sent = trace::entry(
                    Some(&parent),
                    || tracing::debug_span!("mqtt.deliver", thing = %self.thing, %topic, qos),
                );
            }
        }
    }

    /// What a resumed session sends first: every message sent but never acknowledged.
    pub(crate) fn resend(&self, st: &SessionState) -> Vec<Outbound> {
        st.inflight
            .iter()
            .map(|(pkid, msg)| publish(msg, *pkid, true))
            .collect()
    }
}

fn publish(msg: &OutMsg, pkid: u16, dup: bool) -> Outbound {
    Outbound::Publish {
        topic: msg.topic.clone(),
        payload: msg.payload.clone(),
        qos: msg.qos,
        pkid,
        dup,
        correlation_data: msg.correlation_data.clone(),
        traceparent: msg.trace.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "$aws/things/dev-1/shadow/update";

    fn core(version: Version) -> Core {
        Core::new(DeviceId::parse("dev-1").unwrap(), version, 2, 10, 60)
    }

    fn publish_in(topic: &str, qos: u8, retain: bool) -> Inbound {
        Inbound::Publish(InPublish {
            topic: topic.into(),
            payload: Bytes::from_static(b"{}"),
            qos,
            pkid: 7,
            retain,
            response_topic: None,
            correlation_data: None,
            traceparent: None,
        })
    }

    fn closed_with(actions: &Actions) -> Option<DisconnectCode> {
        match &actions.close {
            Some(Close::Server(code, _)) => Some(*code),
            _ => None,
        }
    }

    #[test]
    fn a_publish_in_its_own_topics_becomes_a_request_acknowledged_later() {
        let mut c = core(Version::V5);
        let a = c.handle(&mut SessionState::default(), publish_in(OWN, 1, false));
        assert!(a.send.is_empty(), "no PUBACK before the answer");
        let r = a.request.unwrap();
        assert_eq!((r.topic.as_str(), r.ack), (OWN, Some(7)));
        let a = c.handle(&mut SessionState::default(), publish_in(OWN, 0, false));
        assert_eq!(a.request.unwrap().ack, None);
    }

    #[test]
    fn qos_2_retain_and_wildcards_close_the_connection_with_their_reason() {
        let mut c = core(Version::V5);
        let st = &mut SessionState::default();
        assert_eq!(
            closed_with(&c.handle(st, publish_in(OWN, 2, false))),
            Some(DisconnectCode::QoSNotSupported)
        );
        assert_eq!(
            closed_with(&c.handle(st, publish_in(OWN, 1, true))),
            Some(DisconnectCode::RetainNotSupported)
        );
        assert_eq!(
            closed_with(&c.handle(st, publish_in("$aws/things/dev-1/+", 0, false))),
            Some(DisconnectCode::TopicNameInvalid)
        );
        assert_eq!(
            closed_with(&c.handle(st, Inbound::Unsupported("QoS 2"))),
            Some(DisconnectCode::QoSNotSupported)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_over_the_rate_get_quota_exceeded_in_v5_and_close_v4() {
        let st = &mut SessionState::default();
        let mut c = core(Version::V5).with_publish_rate(3);
        for _ in 0..3 {
            assert!(c.handle(st, publish_in(OWN, 1, false)).request.is_some());
        }
        let a = c.handle(st, publish_in(OWN, 1, false));
        assert!(
            a.request.is_none() && a.close.is_none(),
            "the fourth within a second"
        );
        assert_eq!(
            a.send,
            [Outbound::PubAck {
                pkid: 7,
                code: PubAckCode::QuotaExceeded
            }]
        );
        let a = c.handle(st, publish_in(OWN, 0, false));
        assert!(a.request.is_none() && a.send.is_empty(), "QoS 0: dropped");
        tokio::time::advance(Duration::from_millis(340)).await;
        assert!(
            c.handle(st, publish_in(OWN, 1, false)).request.is_some(),
            "one more a third of a second later"
        );

        let mut c = core(Version::V4).with_publish_rate(1);
        assert!(c.handle(st, publish_in(OWN, 1, false)).request.is_some());
        let a = c.handle(st, publish_in(OWN, 1, false));
        assert_eq!(closed_with(&a), Some(DisconnectCode::QuotaExceeded));

        let mut unlimited = core(Version::V4);
        assert!((0..1000).all(|_| {
            unlimited
                .handle(st, publish_in(OWN, 0, false))
                .request
                .is_some()
        }));
    }

    #[test]
    fn a_publish_outside_its_topics_is_refused_by_puback_in_v5_and_closes_v4() {
        let other = "$aws/things/dev-2/shadow/update";
        let st = &mut SessionState::default();
        let a = core(Version::V5).handle(st, publish_in(other, 1, false));
        assert_eq!(
            a.send,
            [Outbound::PubAck {
                pkid: 7,
                code: PubAckCode::NotAuthorized
            }]
        );
        assert!(a.request.is_none() && a.close.is_none());
        let a = core(Version::V4).handle(st, publish_in(other, 1, false));
        assert_eq!(closed_with(&a), Some(DisconnectCode::NotAuthorized));
        let Some(Close::Server(_, why)) = a.close else {
            unreachable!()
        };
        assert!(
            !why.contains("dev-2"),
            "the reason does not quote the topic"
        );
    }

    #[test]
    fn subscriptions_are_granted_inside_the_thing_only_at_qos_1_at_most() {
        let mut c = core(Version::V5);
        let st = &mut SessionState::default();
        let a = c.handle(
            st,
            Inbound::Subscribe {
                pkid: 3,
                filters: vec![
                    ("$aws/things/dev-1/shadow/#".into(), 2),
                    ("$aws/things/dev-2/shadow/#".into(), 1),
                    ("a/#/b".into(), 0),
                    (
                        "$aws/commands/things/dev-1/executions/+/request/#".into(),
                        0,
                    ),
                ],
            },
        );
        assert_eq!(
            a.send,
            [Outbound::SubAck {
                pkid: 3,
                codes: vec![
                    SubCode::Granted(1),
                    SubCode::NotAuthorized,
                    SubCode::BadFilter,
                    SubCode::Granted(0)
                ]
            }]
        );
        assert!(a.wants_commands);
        assert!(c.listens_for_commands(st));
        assert_eq!(
            st.qos_for(OWN.replace("update", "update/accepted").as_str()),
            Some(1)
        );
        c.handle(
            st,
            Inbound::Unsubscribe {
                pkid: 4,
                filters: vec!["$aws/commands/things/dev-1/executions/+/request/#".into()],
            },
        );
        assert!(!c.listens_for_commands(st));
    }

    #[test]
    fn the_window_holds_qos_1_messages_until_acknowledged_and_a_resume_resends_them() {
        let mut c = core(Version::V4);
        let mut st = SessionState::default();
        for n in 0..3u8 {
            st.pending.push_back(OutMsg {
                topic: format!("t/{n}"),
                payload: Bytes::new(),
                qos: 1,
                correlation_data: None,
                trace: None,
            });
        }
        let mut sent = Vec::new();
        c.pump(&mut st, |p| {
            sent.push(p.clone());
            true
        });
        assert_eq!(sent.len(), 2, "a window of 2");
        let pkids: Vec<u16> = st.inflight.keys().copied().collect();
        assert!(matches!(
            &c.resend(&st)[0],
            Outbound::Publish { dup: true, .. }
        ));
        c.handle(&mut st, Inbound::PubAck(pkids[0]));
        c.pump(&mut st, |p| {
            sent.push(p.clone());
            true
        });
        assert_eq!(sent.len(), 3);
        assert!(st.pending.is_empty());
    }

    #[test]
    fn requests_beyond_the_limit_have_no_room_until_one_is_answered() {
        let mut c = Core::new(DeviceId::parse("d").unwrap(), Version::V4, 1, 2, 0);
        c.request_sent();
        assert!(c.has_room());
        c.request_sent();
        assert!(!c.has_room());
        c.request_answered();
        assert!(c.has_room());
        assert_eq!(c.silence_allowed(), None);
        assert_eq!(
            core(Version::V4).silence_allowed(),
            Some(Duration::from_secs(90))
        );
    }
}
