//! MQTT 3.1.1 and 5 framing over the rumqtt family's packet codecs
//! (`rumqttc::mqttbytes` for 3.1.1, `rumqttc::v5::mqttbytes` for 5).
//!
//! The endpoint works on one version-neutral model: [`Inbound`] packets from devices and
//! [`Outbound`] packets to them. The version is fixed by the CONNECT packet.
//!
//! Over 600 lines with its unit tests: the code itself is 560 lines, and the tests stay next to
//! the encodings they pin.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};
use twin_telemetry::trace::TRACEPARENT;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub password: Option<String>,
    pub will: Option<Will>,
    /// MQTT 5 only.
    pub session_expiry: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub max_packet_size: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPublish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub pkid: u16,
    pub retain: bool,
    /// MQTT 5 request/response: where the sender wants the answer, and what to echo.
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// MQTT 5: the W3C trace context the device sent as the `traceparent` user property.
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Connect(ConnectInfo),
    Publish(InPublish),
    PubAck(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// `reason` is 0 for a normal disconnect, 4 to ask for the will.
    Disconnect {
        reason: u8,
    },
    /// QoS 2 flow and other packets a device must not send us.
    Unsupported(&'static str),
}

/// CONNACK outcomes, each with its 3.1.1 return code and MQTT 5 reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnCode {
    Accepted,
    UnsupportedVersion,
    BadClientId,
    NotAuthorized,
    Banned,
    ServerBusy,
    ServerUnavailable,
    Malformed,
    /// Too many connects for the client id.
    QuotaExceeded,
}

impl ConnCode {
    fn v4(self) -> v4::ConnectReturnCode {
        use v4::ConnectReturnCode as C;
        match self {
            Self::Accepted => C::Success,
            Self::UnsupportedVersion => C::RefusedProtocolVersion,
            Self::BadClientId => C::BadClientId,
            Self::NotAuthorized | Self::Banned | Self::Malformed => C::NotAuthorized,
            Self::ServerBusy | Self::ServerUnavailable | Self::QuotaExceeded => {
                C::ServiceUnavailable
            }
        }
    }

    fn v5(self) -> v5::ConnectReturnCode {
        use v5::ConnectReturnCode as C;
        match self {
            Self::Accepted => C::Success,
            Self::UnsupportedVersion => C::UnsupportedProtocolVersion,
            Self::BadClientId => C::ClientIdentifierNotValid,
            Self::NotAuthorized => C::NotAuthorized,
            Self::Banned => C::Banned,
            Self::ServerBusy => C::ServerBusy,
            Self::ServerUnavailable => C::ServerUnavailable,
            Self::Malformed => C::MalformedPacket,
            Self::QuotaExceeded => C::QuotaExceeded,
        }
    }
}

/// A SUBACK entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubCode {
    Granted(u8),
    NotAuthorized,
    BadFilter,
}

/// PUBACK reason codes (MQTT 5; 3.1.1 has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubAckCode {
    Success,
    NoMatchingSubscribers,
    NotAuthorized,
    QuotaExceeded,
    /// The payload is not what the topic takes (a telemetry message that does not parse).
    PayloadFormatInvalid,
    /// The topic names something that does not exist (a Basic Ingest route).
    TopicNameInvalid,
    /// The server could not take the message now (the store failed): send it again.
    UnspecifiedError,
}

/// DISCONNECT reason codes we send (MQTT 5 only; 3.1.1 just closes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectCode {
    ServerShuttingDown,
    KeepAliveTimeout,
    SessionTakenOver,
    NotAuthorized,
    MalformedPacket,
    ProtocolError,
    PacketTooLarge,
    QoSNotSupported,
    RetainNotSupported,
    TopicNameInvalid,
    Administrative,
    QuotaExceeded,
    /// The device's twin is on another node now: connect again.
    UseAnotherServer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    ConnAck {
        code: ConnCode,
        session_present: bool,
        /// MQTT 5 CONNACK properties we announce.
        limits: ServerLimits,
    },
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
        dup: bool,
        /// MQTT 5 only: echoed from the request this answers.
        correlation_data: Option<Bytes>,
        /// MQTT 5 only: the `traceparent` user property, continuing the trace of what
        /// caused the message.
        traceparent: Option<Arc<str>>,
    },
    PubAck {
        pkid: u16,
        code: PubAckCode,
    },
    SubAck {
        pkid: u16,
        codes: Vec<SubCode>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    /// The reason text goes out as the MQTT 5 Reason String.
    Disconnect(DisconnectCode, String),
}

/// What the server tells MQTT 5 clients in CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerLimits {
    pub receive_maximum: u16,
    pub max_packet_size: u32,
    pub session_expiry: Option<u32>,
    pub server_keep_alive: Option<u16>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("packet of {0} bytes exceeds the maximum packet size")]
    TooLarge(usize),
    #[error("unsupported protocol {0}")]
    UnsupportedProtocol(String),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("the first packet must be CONNECT")]
    NotConnect,
}

/// Finds the protocol version of a complete CONNECT at the start of `buf`: `Ok(None)`
/// when more bytes are needed.
pub fn sniff_version(buf: &[u8], max_size: usize) -> Result<Option<Version>, CodecError> {
    let header = match m4::check(buf.iter(), max_size) {
        Ok(h) => h,
        Err(m4::Error::InsufficientBytes(_)) => return Ok(None),
        Err(m4::Error::PayloadSizeLimitExceeded(n)) => return Err(CodecError::TooLarge(n)),
        Err(e) => return Err(CodecError::Malformed(e.to_string())),
    };
    if buf[0] >> 4 != 1 {
        return Err(CodecError::NotConnect);
    }
    // The fixed header is one byte plus a 1-4 byte remaining length (7 bits a byte).
    let len_bytes = buf[1..]
        .iter()
        .take(4)
        .take_while(|b| *b & 0x80 != 0)
        .count()
        + 1;
    let body = &buf[1 + len_bytes..header.frame_length()];
    let name_len = body
        .get(..2)
        .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    let name = body.get(2..2 + name_len).unwrap_or_default();
    let level = body.get(2 + name_len).copied();
    match (name, level) {
        (b"MQTT", Some(4)) => Ok(Some(Version::V4)),
        (b"MQTT", Some(5)) => Ok(Some(Version::V5)),
        (name, level) => Err(CodecError::UnsupportedProtocol(format!(
            "{} level {}",
            String::from_utf8_lossy(name),
            level.unwrap_or(0)
        ))),
    }
}

fn qos_num4(q: m4::QoS) -> u8 {
    q as u8
}

fn qos4(q: u8) -> m4::QoS {
    if q == 0 {
        m4::QoS::AtMostOnce
    } else {
        m4::QoS::AtLeastOnce
    }
}

fn qos5(q: u8) -> m5::QoS {
    if q == 0 {
        m5::QoS::AtMostOnce
    } else {
        m5::QoS::AtLeastOnce
    }
}

/// Reads one packet from `buf`: `Ok(None)` when more bytes are needed.
pub fn read(
    buf: &mut BytesMut,
    version: Version,
    max_size: usize,
) -> Result<Option<Inbound>, CodecError> {
    match version {
        Version::V4 => read4(buf, max_size),
        Version::V5 => read5(buf, max_size),
    }
}

fn read4(buf: &mut BytesMut, max_size: usize) -> Result<Option<Inbound>, CodecError> {
    let packet = match v4::Packet::read(buf, max_size) {
        Ok(p) => p,
        Err(m4::Error::InsufficientBytes(_)) => return Ok(None),
        Err(m4::Error::PayloadSizeLimitExceeded(n)) => return Err(CodecError::TooLarge(n)),
        Err(e) => return Err(CodecError::Malformed(e.to_string())),
    };
    Ok(Some(match packet {
        v4::Packet::Connect(c) => Inbound::Connect(ConnectInfo {
            client_id: c.client_id,
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            password: c.login.map(|l| l.password),
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: qos_num4(w.qos),
                retain: w.retain,
            }),
            session_expiry: None,
            receive_maximum: None,
            max_packet_size: None,
        }),
        v4::Packet::Publish(p) => Inbound::Publish(InPublish {
            topic: p.topic,
            payload: p.payload,
            qos: qos_num4(p.qos),
            pkid: p.pkid,
            retain: p.retain,
            response_topic: None,
            correlation_data: None,
            traceparent: None,
        }),
        v4::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos_num4(f.qos)))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect { reason: 0 },
        v4::Packet::PubRec(_) | v4::Packet::PubRel(_) | v4::Packet::PubComp(_) => {
            Inbound::Unsupported("QoS 2")
        }
        v4::Packet::ConnAck(_)
        | v4::Packet::SubAck(_)
        | v4::Packet::UnsubAck(_)
        | v4::Packet::PingResp => Inbound::Unsupported("server-to-client packet"),
    }))
}

fn read5(buf: &mut BytesMut, max_size: usize) -> Result<Option<Inbound>, CodecError> {
    // A DISCONNECT without reason code (remaining length 0) is valid MQTT 5; the codec
    // refuses it, so it is handled here.
    if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
        let _ = buf.split_to(2);
        return Ok(Some(Inbound::Disconnect { reason: 0 }));
    }
    let max = u32::try_from(max_size).unwrap_or(u32::MAX);
    let packet = match v5::Packet::read(buf, Some(max)) {
        Ok(p) => p,
        Err(m5::Error::InsufficientBytes(_)) => return Ok(None),
        Err(m5::Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
            return Err(CodecError::TooLarge(pkt_size));
        }
        Err(e) => return Err(CodecError::Malformed(e.to_string())),
    };
    Ok(Some(match packet {
        v5::Packet::Connect(c, will, login) => {
            let props = c.properties.unwrap_or_default();
            Inbound::Connect(ConnectInfo {
                client_id: c.client_id,
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                password: login.map(|l| l.password),
                will: will.map(|w| Will {
                    topic: String::from_utf8_lossy(&w.topic).into_owned(),
                    payload: w.message,
                    qos: w.qos as u8,
                    retain: w.retain,
                }),
                session_expiry: props.session_expiry_interval,
                receive_maximum: props.receive_maximum,
                max_packet_size: props.max_packet_size,
            })
        }
        v5::Packet::Publish(p) => {
            if p.properties
                .as_ref()
                .is_some_and(|pr| pr.topic_alias.is_some())
            {
                return Err(CodecError::Malformed(
                    "topic aliases are not supported (topic alias maximum is 0)".into(),
                ));
            }
            let (response_topic, correlation_data, traceparent) =
                p.properties.map_or((None, None, None), |pr| {
                    let traceparent = pr
                        .user_properties
                        .into_iter()
                        .find(|(k, _)| k == TRACEPARENT)
                        .map(|(_, v)| v);
                    (pr.response_topic, pr.correlation_data, traceparent)
                });
            Inbound::Publish(InPublish {
                topic: String::from_utf8(p.topic.to_vec())
                    .map_err(|_| CodecError::Malformed("topic is not UTF-8".into()))?,
                payload: p.payload,
                qos: p.qos as u8,
                pkid: p.pkid,
                retain: p.retain,
                response_topic,
                correlation_data,
                traceparent,
            })
        }
        v5::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            reason: d.reason_code as u8,
        },
        v5::Packet::PubRec(_) | v5::Packet::PubRel(_) | v5::Packet::PubComp(_) => {
            Inbound::Unsupported("QoS 2")
        }
        v5::Packet::Auth(_) => Inbound::Unsupported("enhanced authentication"),
        v5::Packet::ConnAck(_)
        | v5::Packet::SubAck(_)
        | v5::Packet::UnsubAck(_)
        | v5::Packet::PingResp(_) => Inbound::Unsupported("server-to-client packet"),
    }))
}

/// Writes `packet` to `buf`. Returns false (writing nothing) when it exceeds `max_size`
/// (the client's maximum packet size): such a message is dropped, as MQTT 5 requires.
pub fn write(packet: &Outbound, version: Version, buf: &mut BytesMut, max_size: usize) -> bool {
    match version {
        Version::V4 => write4(packet, buf, max_size),
        Version::V5 => write5(packet, buf, max_size),
    }
}

fn write4(packet: &Outbound, buf: &mut BytesMut, max_size: usize) -> bool {
    let p = match packet {
        Outbound::ConnAck {
            code,
            session_present,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(code.v4(), *session_present)),
        Outbound::Publish {
            topic,
            payload,
            qos,
            pkid,
            dup,
            ..
        } => {
            let mut p = v4::Publish::from_bytes(topic.as_str(), qos4(*qos), payload.clone());
            p.pkid = *pkid;
            p.dup = *dup;
            v4::Packet::Publish(p)
        }
        Outbound::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
        Outbound::SubAck { pkid, codes } => v4::Packet::SubAck(v4::SubAck::new(
            *pkid,
            codes
                .iter()
                .map(|c| match c {
                    SubCode::Granted(q) => v4::SubscribeReasonCode::Success(qos4(*q)),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
        Outbound::PingResp => v4::Packet::PingResp,
        // 3.1.1 has no server DISCONNECT: the connection is just closed.
        Outbound::Disconnect(..) => return true,
    };
    p.write(buf, max_size).is_ok()
}

fn write5(packet: &Outbound, buf: &mut BytesMut, max_size: usize) -> bool {
    let max = Some(u32::try_from(max_size).unwrap_or(u32::MAX));
    let p = match packet {
        Outbound::ConnAck {
            code,
            session_present,
            limits,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present: *session_present,
            code: code.v5(),
            properties: (*code == ConnCode::Accepted).then(|| v5::ConnAckProperties {
                session_expiry_interval: limits.session_expiry,
                receive_max: Some(limits.receive_maximum),
                max_qos: Some(1),
                retain_available: Some(0),
                max_packet_size: Some(limits.max_packet_size),
                assigned_client_identifier: None,
                topic_alias_max: Some(0),
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(1),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: limits.server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        }),
        Outbound::Publish {
            topic,
            payload,
            qos,
            pkid,
            dup,
            correlation_data,
            traceparent,
        } => {
            let properties = (correlation_data.is_some() || traceparent.is_some()).then(|| {
                v5::PublishProperties {
                    correlation_data: correlation_data.clone(),
                    user_properties: traceparent
                        .iter()
                        .map(|t| (TRACEPARENT.to_owned(), t.to_string()))
                        .collect(),
                    ..Default::default()
                }
            });
            let mut p = v5::Publish::new(topic.as_str(), qos5(*qos), payload.clone(), properties);
            p.pkid = *pkid;
            p.dup = *dup;
            v5::Packet::Publish(p)
        }
        Outbound::PubAck { pkid, code } => v5::Packet::PubAck(v5::PubAck {
            pkid: *pkid,
            reason: match code {
                PubAckCode::Success => v5::PubAckReason::Success,
                PubAckCode::NoMatchingSubscribers => v5::PubAckReason::NoMatchingSubscribers,
                PubAckCode::NotAuthorized => v5::PubAckReason::NotAuthorized,
                PubAckCode::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
                PubAckCode::PayloadFormatInvalid => v5::PubAckReason::PayloadFormatInvalid,
                PubAckCode::TopicNameInvalid => v5::PubAckReason::TopicNameInvalid,
                PubAckCode::UnspecifiedError => v5::PubAckReason::UnspecifiedError,
            },
            properties: None,
        }),
        Outbound::SubAck { pkid, codes } => v5::Packet::SubAck(v5::SubAck {
            pkid: *pkid,
            return_codes: codes
                .iter()
                .map(|c| match c {
                    SubCode::Granted(q) => v5::SubscribeReasonCode::Success(qos5(*q)),
                    SubCode::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                    SubCode::BadFilter => v5::SubscribeReasonCode::TopicFilterInvalid,
                })
                .collect(),
            properties: None,
        }),
        Outbound::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: *pkid,
            reasons: vec![v5::UnsubAckReason::Success; *count],
            properties: None,
        }),
        Outbound::PingResp => v5::Packet::PingResp(v5::PingResp),
        Outbound::Disconnect(code, reason) => {
            use v5::DisconnectReasonCode as R;
            // Always with a property: rumqttc miscounts the length of a DISCONNECT
            // that has a reason code but no properties, and peers reject it.
            let mut d = v5::Disconnect::new(match code {
                DisconnectCode::ServerShuttingDown => R::ServerShuttingDown,
                DisconnectCode::KeepAliveTimeout => R::KeepAliveTimeout,
                DisconnectCode::SessionTakenOver => R::SessionTakenOver,
                DisconnectCode::NotAuthorized => R::NotAuthorized,
                DisconnectCode::MalformedPacket => R::MalformedPacket,
                DisconnectCode::ProtocolError => R::ProtocolError,
                DisconnectCode::PacketTooLarge => R::PacketTooLarge,
                DisconnectCode::QoSNotSupported => R::QoSNotSupported,
                DisconnectCode::RetainNotSupported => R::RetainNotSupported,
                DisconnectCode::TopicNameInvalid => R::TopicNameInvalid,
                DisconnectCode::Administrative => R::AdministrativeAction,
                DisconnectCode::QuotaExceeded => R::QuotaExceeded,
                DisconnectCode::UseAnotherServer => R::UseAnotherServer,
            });
            d.properties = Some(v5::DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(reason.clone()),
                user_properties: Vec::new(),
                server_reference: None,
            });
            v5::Packet::Disconnect(d)
        }
    };
    p.write(buf, max).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_the_version_from_connect() {
        let mut b = BytesMut::new();
        v4::Connect::new("dev").write(&mut b).unwrap();
        assert_eq!(sniff_version(&b, 1024), Ok(Some(Version::V4)));
        assert_eq!(sniff_version(&b[..b.len() - 1], 1024), Ok(None));
        let mut b5 = BytesMut::new();
        v5::Connect {
            keep_alive: 30,
            client_id: "dev".into(),
            clean_start: true,
            properties: None,
        }
        .write(&None, &None, &mut b5)
        .unwrap();
        assert_eq!(sniff_version(&b5, 1024), Ok(Some(Version::V5)));
        assert_eq!(
            sniff_version(&[0x30, 0x00], 1024),
            Err(CodecError::NotConnect)
        );
    }

    #[test]
    fn round_trips_a_publish_and_refuses_oversized_packets() {
        for version in [Version::V4, Version::V5] {
            let mut b = BytesMut::new();
            let out = Outbound::Publish {
                topic: "$aws/things/t/shadow/update".into(),
                payload: Bytes::from_static(b"{}"),
                qos: 1,
                pkid: 7,
                dup: false,
                correlation_data: None,
                traceparent: None,
            };
            assert!(write(&out, version, &mut b, 1024));
            let got = read(&mut b, version, 1024).unwrap().unwrap();
            assert_eq!(
                got,
                Inbound::Publish(InPublish {
                    topic: "$aws/things/t/shadow/update".into(),
                    payload: Bytes::from_static(b"{}"),
                    qos: 1,
                    pkid: 7,
                    retain: false,
                    response_topic: None,
                    correlation_data: None,
                    traceparent: None,
                })
            );
            let mut small = BytesMut::new();
            assert!(
                !write(&out, version, &mut small, 10),
                "larger than the client's maximum"
            );
            assert!(small.is_empty());
            let mut big = BytesMut::new();
            assert!(write(&out, version, &mut big, 1024));
            assert!(matches!(
                read(&mut big, version, 10),
                Err(CodecError::TooLarge(_))
            ));
        }
        for (code, reason) in [
            (
                DisconnectCode::SessionTakenOver,
                v5::DisconnectReasonCode::SessionTakenOver,
            ),
            (
                DisconnectCode::UseAnotherServer,
                v5::DisconnectReasonCode::UseAnotherServer,
            ),
        ] {
            let mut out = BytesMut::new();
            assert!(write(
                &Outbound::Disconnect(code, "why".into()),
                Version::V5,
                &mut out,
                1024
            ));
            match v5::Packet::read(&mut out, None).unwrap() {
                v5::Packet::Disconnect(d) => assert_eq!(d.reason_code, reason),
                other => panic!("{other:?}"),
            }
        }
        let mut d = BytesMut::from(&[0xE0u8, 0x00][..]);
        assert_eq!(
            read(&mut d, Version::V5, 100),
            Ok(Some(Inbound::Disconnect { reason: 0 }))
        );
    }
}
