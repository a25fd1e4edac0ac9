//! Test harness: the real endpoint on a free port over a real store, and real MQTT
//! clients (rumqttc, MQTT 3.1.1 and 5) behind one small interface.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5 as p5;
use serde_json::Value;
use tokio::sync::mpsc;
use twin_actors::{FleetConfig, FleetHandle};
use twin_gateway::{Gateway, GatewayConfig, Listener};
use twin_model::DeviceId;
use twin_store::{Committer, EmbeddedStore, TwinStore};

pub const WAIT: Duration = Duration::from_secs(10);

pub struct Server {
    pub addr: SocketAddr,
    /// The TLS listener, when the server was started with one.
    pub tls_addr: Option<SocketAddr>,
    pub fleet: FleetHandle,
    pub gateway: Option<Gateway>,
    _dir: tempfile::TempDir,
}

pub async fn server() -> Server {
    server_with(FleetConfig::default(), GatewayConfig::default()).await
}

pub async fn server_with(fleet: FleetConfig, gateway: GatewayConfig) -> Server {
    server_tls(fleet, gateway, None).await
}

/// A server with a plain listener and, given an acceptor, a TLS one.
pub async fn server_tls(
    fleet: FleetConfig,
    gateway: GatewayConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn TwinStore> = Arc::new(EmbeddedStore::open(dir.path(), 100).unwrap());
    let (committer, _) = Committer::start(store, 4096, 4096);
    let fleet = FleetHandle::start(fleet, committer).await.unwrap();
    let mut listeners = vec![Listener::Plain(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )];
    if let Some(acceptor) = tls {
        listeners.push(Listener::Tls(
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            acceptor,
        ));
    }
    let gateway = Gateway::start(listeners, fleet.clone(), gateway).unwrap();
    Server {
        addr: gateway.addr(false).unwrap(),
        tls_addr: gateway.addr(true),
        fleet,
        gateway: Some(gateway),
        _dir: dir,
    }
}

/// The next MQTT 3.1.1 packet on a raw stream.
pub async fn next_v4<S: tokio::io::AsyncRead + Unpin>(
    sock: &mut S,
    inbuf: &mut bytes::BytesMut,
) -> rumqttc::mqttbytes::v4::Packet {
    use tokio::io::AsyncReadExt;
    loop {
        if let Ok(p) = rumqttc::mqttbytes::v4::Packet::read(inbuf, 1 << 20) {
            return p;
        }
        let n = tokio::time::timeout(WAIT, sock.read_buf(inbuf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the server closed the connection");
    }
}

impl Server {
    /// Registers a device and returns its secret.
    pub async fn register(&self, id: &str) -> String {
        self.fleet
            .registry()
            .register(&DeviceId::parse(id).unwrap(), Default::default())
            .await
            .unwrap()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    V4,
    V5,
}

pub const BOTH: [Proto; 2] = [Proto::V4, Proto::V5];

/// What a client saw, the same for both protocol versions.
#[derive(Debug, Clone, PartialEq)]
pub enum Ev {
    Msg {
        topic: String,
        payload: Value,
        qos: u8,
    },
    SubAck(Vec<u8>),
    PubAck {
        code: u8,
    },
    Disconnect(u8),
    Closed(String),
}

#[derive(Clone, Default)]
pub struct Opts {
    pub persistent: bool,
    pub keep_alive: Option<Duration>,
    pub will: Option<(String, String)>,
}

enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

pub struct Device {
    client: Client,
    rx: mpsc::UnboundedReceiver<Ev>,
    pub session_present: bool,
    task: tokio::task::JoinHandle<()>,
    pub id: String,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn code4(c: rumqttc::ConnectReturnCode) -> u8 {
    c as u8
}

fn code5(c: p5::ConnectReturnCode) -> u8 {
    use p5::ConnectReturnCode as C;
    match c {
        C::Success => 0,
        C::ClientIdentifierNotValid => 0x85,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerUnavailable => 0x88,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::UnsupportedProtocolVersion => 0x84,
        C::QuotaExceeded => 0x97,
        _ => 0xFF,
    }
}

impl Device {
    /// Connects; `Err` carries the CONNACK refusal code (3.1.1 return code or MQTT 5 reason).
    pub async fn connect(
        addr: SocketAddr,
        proto: Proto,
        id: &str,
        password: Option<&str>,
        opts: Opts,
    ) -> Result<Device, u8> {
        let (tx, rx) = mpsc::unbounded_channel();
        let keep_alive = opts.keep_alive.unwrap_or(Duration::from_secs(30));
        let (client, session_present, task) = match proto {
            Proto::V4 => {
                let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
                o.set_keep_alive(keep_alive)
                    .set_clean_session(!opts.persistent);
                if let Some(p) = password {
                    o.set_credentials("device", p);
                }
                if let Some((t, m)) = &opts.will {
                    o.set_last_will(rumqttc::LastWill::new(
                        t,
                        m.as_bytes().to_vec(),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                    ));
                }
                let (client, mut el) = rumqttc::AsyncClient::new(o, 64);
                let present = match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => a.session_present,
                    Err(rumqttc::ConnectionError::ConnectionRefused(c)) => return Err(code4(c)),
                    other => panic!("unexpected first event {other:?}"),
                };
                let task = tokio::spawn(async move {
                    loop {
                        let ev = match el.poll().await {
                            Ok(rumqttc::Event::Incoming(p)) => match p {
                                rumqttc::Packet::Publish(p) => Ev::Msg {
                                    topic: p.topic,
                                    payload: serde_json::from_slice(&p.payload)
                                        .unwrap_or(Value::Null),
                                    qos: p.qos as u8,
                                },
                                rumqttc::Packet::SubAck(s) => Ev::SubAck(
                                    s.return_codes
                                        .iter()
                                        .map(|c| match c {
                                            rumqttc::SubscribeReasonCode::Success(q) => *q as u8,
                                            rumqttc::SubscribeReasonCode::Failure => 0x80,
                                        })
                                        .collect(),
                                ),
                                rumqttc::Packet::PubAck(_) => Ev::PubAck { code: 0 },
                                _ => continue,
                            },
                            Ok(_) => continue,
                            Err(e) => {
                                let _ = tx.send(Ev::Closed(e.to_string()));
                                return;
                            }
                        };
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                });
                (Client::V4(client), present, task)
            }
            Proto::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
                o.set_keep_alive(keep_alive)
                    .set_clean_start(!opts.persistent);
                if opts.persistent {
                    o.set_session_expiry_interval(Some(3600));
                }
                if let Some(p) = password {
                    o.set_credentials("device", p);
                }
                if let Some((t, m)) = &opts.will {
                    o.set_last_will(p5::LastWill::new(
                        t,
                        m.as_bytes().to_vec(),
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        false,
                        None,
                    ));
                }
                let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 64);
                let present = match el.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(p5::Packet::ConnAck(a))) => a.session_present,
                    Err(rumqttc::v5::ConnectionError::ConnectionRefused(c)) => {
                        return Err(code5(c));
                    }
                    other => panic!("unexpected first event {other:?}"),
                };
                let task = tokio::spawn(async move {
                    loop {
                        let ev = match el.poll().await {
                            Ok(rumqttc::v5::Event::Incoming(p)) => match p {
                                p5::Packet::Publish(p) => Ev::Msg {
                                    topic: String::from_utf8(p.topic.to_vec()).unwrap(),
                                    payload: serde_json::from_slice(&p.payload)
                                        .unwrap_or(Value::Null),
                                    qos: p.qos as u8,
                                },
                                p5::Packet::SubAck(s) => Ev::SubAck(
                                    s.return_codes
                                        .iter()
                                        .map(|c| match c {
                                            p5::SubscribeReasonCode::Success(q) => *q as u8,
                                            p5::SubscribeReasonCode::NotAuthorized => 0x87,
                                            p5::SubscribeReasonCode::TopicFilterInvalid => 0x8F,
                                            _ => 0x80,
                                        })
                                        .collect(),
                                ),
                                p5::Packet::PubAck(a) => Ev::PubAck {
                                    code: match a.reason {
                                        p5::PubAckReason::Success => 0,
                                        p5::PubAckReason::NoMatchingSubscribers => 0x10,
                                        p5::PubAckReason::NotAuthorized => 0x87,
                                        p5::PubAckReason::TopicNameInvalid => 0x90,
                                        p5::PubAckReason::QuotaExceeded => 0x97,
                                        p5::PubAckReason::PayloadFormatInvalid => 0x99,
                                        _ => 0x80,
                                    },
                                },
                                p5::Packet::Disconnect(d) => Ev::Disconnect(d.reason_code as u8),
                                _ => continue,
                            },
                            Ok(_) => continue,
                            // rumqttc reports a server DISCONNECT as an error.
                            Err(rumqttc::v5::ConnectionError::MqttState(
                                rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                            )) => {
                                let _ = tx.send(Ev::Disconnect(reason_code as u8));
                                return;
                            }
                            Err(e) => {
                                let _ = tx.send(Ev::Closed(e.to_string()));
                                return;
                            }
                        };
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                });
                (Client::V5(client), present, task)
            }
        };
        Ok(Device {
            client,
            rx,
            session_present,
            task,
            id: id.to_owned(),
        })
    }

    pub async fn next(&mut self) -> Ev {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{}: nothing within {WAIT:?}", self.id))
            .unwrap_or_else(|| Ev::Closed("event loop ended".into()))
    }

    /// Subscribes with QoS 1 and returns the SUBACK code.
    pub async fn subscribe(&mut self, filter: &str) -> u8 {
        match &self.client {
            Client::V4(c) => c
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .unwrap(),
            Client::V5(c) => c
                .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .unwrap(),
        }
        loop {
            match self.next().await {
                Ev::SubAck(codes) => return codes[0],
                Ev::Closed(e) => panic!("closed while subscribing: {e}"),
                _ => {}
            }
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        match &self.client {
            Client::V4(c) => c
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap(),
            Client::V5(c) => c
                .publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload.into(),
                )
                .await
                .unwrap(),
        }
    }

    pub async fn publish_qos(&self, topic: &str, qos: u8, payload: &str) {
        match &self.client {
            Client::V4(c) => c
                .publish(
                    topic,
                    rumqttc::qos(qos).unwrap(),
                    false,
                    payload.as_bytes().to_vec(),
                )
                .await
                .unwrap(),
            Client::V5(c) => {
                let q = match qos {
                    0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                    1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
                };
                c.publish(topic, q, false, payload.as_bytes().to_vec())
                    .await
                    .unwrap()
            }
        }
    }

    /// The next message, skipping acknowledgements.
    pub async fn message(&mut self) -> (String, Value) {
        loop {
            match self.next().await {
                Ev::Msg { topic, payload, .. } => return (topic, payload),
                Ev::Closed(e) => panic!("{}: closed while waiting for a message: {e}", self.id),
                Ev::Disconnect(c) => panic!(
                    "{}: disconnected ({c:#x}) while waiting for a message",
                    self.id
                ),
                _ => {}
            }
        }
    }

    /// Messages up to and including the first on `topic`.
    pub async fn until(&mut self, topic: &str) -> Vec<(String, Value)> {
        let mut seen = Vec::new();
        loop {
            let m = self.message().await;
            let done = m.0 == topic;
            seen.push(m);
            if done {
                return seen;
            }
        }
    }

    /// Publishes a request on `{base}` and returns the reply from `{base}/accepted` or
    /// `{base}/rejected` (skipping other messages, such as documents and delta).
    pub async fn request(&mut self, base: &str, body: &str) -> (String, Value) {
        self.publish(base, body).await;
        let accepted = format!("{base}/accepted");
        let rejected = format!("{base}/rejected");
        loop {
            let (topic, payload) = self.message().await;
            if topic == accepted {
                return ("accepted".into(), payload);
            }
            if topic == rejected {
                return ("rejected".into(), payload);
            }
        }
    }

    /// Waits until the server ends the connection; returns the MQTT 5 reason, if one came.
    pub async fn closed(&mut self) -> Option<u8> {
        loop {
            match self.next().await {
                Ev::Disconnect(c) => return Some(c),
                Ev::Closed(_) => return None,
                _ => {}
            }
        }
    }

    pub async fn disconnect(self) {
        match &self.client {
            Client::V4(c) => c.disconnect().await.unwrap(),
            Client::V5(c) => c.disconnect().await.unwrap(),
        }
        let mut me = self;
        // The event loop ends once the DISCONNECT is out.
        while !matches!(me.next().await, Ev::Closed(_)) {}
    }
}

/// A registered device, connected with its secret.
pub async fn device(s: &Server, proto: Proto, id: &str) -> Device {
    let secret = s.register(id).await;
    Device::connect(s.addr, proto, id, Some(&secret), Opts::default())
        .await
        .unwrap()
}

pub fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

pub fn shadow(thing: &str) -> String {
    format!("$aws/things/{thing}/shadow")
}
