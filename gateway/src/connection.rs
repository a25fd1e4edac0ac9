//! One device connection: CONNECT, then a loop over the socket, the twin's answers, the
//! twin's events, the keep-alive timer, a kick and server shutdown.
//!
//! The connection translates MQTT into `FleetHandle` calls and twin events into MQTT
//! publishes; the twins never wait for it. Requests are handed to the twin in the order
//! they arrive, at most `max_inflight_requests` at a time (more get a 429 `rejected`, as
//! AWS IoT answers more than 10 in-flight shadow requests on one connection).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use twin_actors::{FleetError, FleetHandle};
use twin_model::command::{CommandExecution, DeviceResponse};
use twin_model::job::{JobError, JobErrorCode};
use twin_model::shadow::{parse_client_token, payload};
use twin_model::topic::{
    self, CommandChannel, CommandTopic, JobChannel, JobOp, JobTopic, ShadowChannel, ShadowOp,
    ShadowTopic, Topic, format_shadow_topic,
};
use twin_model::{
    ChangeOp, DeviceId, Rejection, RejectionKind, Shadow, ShadowChange, ShadowName, TwinEvent,
    UpdateRequest,
};

use crate::GatewayConfig;
use crate::accept::RateLimitedLog;
use crate::acl;
use crate::codec::{
    self, ConnCode, ConnectInfo, DisconnectCode, InPublish, Inbound, Outbound, PubAckCode,
    ServerLimits, SubCode, Version,
};
use crate::session::{Kick, OutMsg, Sessions, Slot, lock};

/// Everything a connection needs from the endpoint.
pub(crate) struct Context {
    pub(crate) fleet: FleetHandle,
    pub(crate) config: GatewayConfig,
    pub(crate) sessions: Sessions,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) ignored: IgnoredPublishes,
}

/// Publishes in devices' own topics that the device API does not take, across the
/// endpoint: counted, and logged at most once per `LOG_EVERY` (a fleet publishing to an
/// unsupported topic must not flood the log).
#[derive(Default)]
pub(crate) struct IgnoredPublishes {
    count: std::sync::atomic::AtomicU64,
    log: std::sync::Mutex<RateLimitedLog>,
}

/// Why a connection ended.
#[derive(Debug)]
enum Close {
    /// DISCONNECT from the client; `will` when it asked for its will (MQTT 5 reason 4).
    Client {
        will: bool,
    },
    Lost(String),
    /// We closed it, with this reason code (sent in MQTT 5) and text.
    Server(DisconnectCode, String),
}

impl Close {
    fn publishes_will(&self) -> bool {
        match self {
            Self::Client { will } => *will,
            Self::Lost(_) => true,
            Self::Server(code, _) => !matches!(
                code,
                DisconnectCode::ServerShuttingDown | DisconnectCode::NotAuthorized
            ),
        }
    }

    fn reason(&self) -> String {
        match self {
            Self::Client { .. } => "client disconnected".into(),
            Self::Lost(why) => why.clone(),
            Self::Server(_, why) => why.clone(),
        }
    }
}

enum Answer {
    Update(
        ShadowName,
        Option<String>,
        Result<Arc<ShadowChange>, FleetError>,
    ),
    Get(ShadowName, Option<String>, Result<Arc<Shadow>, FleetError>),
    Delete(
        ShadowName,
        Option<String>,
        Result<Arc<ShadowChange>, FleetError>,
    ),
    Command(String, ReplyTo, Result<Arc<CommandExecution>, FleetError>),
    Job(
        JobOp,
        Option<String>,
        Result<twin_actors::JobAnswer, FleetError>,
    ),
}

/// Where an MQTT 5 request asked for its answer (its response topic, inside the
/// device's namespace) and the correlation data to echo; `None`: the default topics.
type ReplyTo = Option<(String, Option<Bytes>)>;

/// A twin's answer, with the packet id of the request's PUBACK (sent with the answer).
type AnswerFuture = Pin<Box<dyn Future<Output = (Option<u16>, Answer)> + Send>>;

/// Bytes reserved for each read.
const READ_CHUNK: usize = 512;
/// Buffers larger than this are released when empty.
const IDLE_BUFFER: usize = 4096;

/// A device's byte stream: plain TCP or TLS.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// Reads into `buf`, reserving room first (an idle connection's buffer has none).
async fn read_some(stream: &mut impl Stream, buf: &mut BytesMut) -> std::io::Result<usize> {
    buf.reserve(READ_CHUNK);
    stream.read_buf(buf).await
}

fn now_secs() -> u64 {
    twin_store::now_millis() / 1000
}

struct Conn<S> {
    ctx: Arc<Context>,
    stream: S,
    peer: SocketAddr,
    version: Version,
    thing: DeviceId,
    slot: Arc<Slot>,
    kick: Arc<Kick>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Largest packet the client accepts.
    client_max: usize,
    window: usize,
    answers: FuturesUnordered<AnswerFuture>,
    session: u64,
    keep_alive: u16,
    will: Option<codec::Will>,
    /// Publishes of this connection that were not requests of the device API.
    ignored: u64,
}

/// Serves one TCP connection until it ends.
pub(crate) async fn serve(ctx: Arc<Context>, mut stream: impl Stream, peer: SocketAddr) {
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let max = ctx.config.max_packet_size;
    let first = tokio::time::timeout(
        ctx.config.connect_timeout,
        read_connect(&mut stream, &mut rbuf, max),
    )
    .await;
    let (version, connect) = match first {
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return,
        Ok(Err((version, e))) => {
            tracing::debug!(%peer, error = %e, "refused a connection before CONNECT");
            if let Some(v) = version {
                let code = if matches!(e, codec::CodecError::UnsupportedProtocol(_)) {
                    ConnCode::UnsupportedVersion
                } else {
                    ConnCode::Malformed
                };
                let _ = send_connack(&mut stream, v, code, false, ServerLimits::default()).await;
            }
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time; closing");
            return;
        }
    };
    let Some(mut conn) = accept(ctx, stream, peer, version, connect, rbuf).await else {
        return;
    };
    let close = conn.run().await;
    conn.finish(close).await;
}

async fn send_connack(
    stream: &mut impl Stream,
    version: Version,
    code: ConnCode,
    session_present: bool,
    limits: ServerLimits,
) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    codec::write(
        &Outbound::ConnAck {
            code,
            session_present,
            limits,
        },
        version,
        &mut b,
        usize::MAX,
    );
    stream.write_all(&b).await?;
    stream.flush().await
}

type ConnectRead = Result<Option<(Version, ConnectInfo)>, (Option<Version>, codec::CodecError)>;

async fn read_connect(stream: &mut impl Stream, rbuf: &mut BytesMut, max: usize) -> ConnectRead {
    loop {
        match codec::sniff_version(rbuf, max) {
            Ok(Some(version)) => {
                return match codec::read(rbuf, version, max) {
                    Ok(Some(Inbound::Connect(c))) => Ok(Some((version, c))),
                    Ok(_) => Err((Some(version), codec::CodecError::NotConnect)),
                    Err(e) => Err((Some(version), e)),
                };
            }
            Ok(None) => {}
            // A client speaking another version still gets a 3.1.1 CONNACK it can read.
            Err(e @ codec::CodecError::UnsupportedProtocol(_)) => {
                return Err((Some(Version::V4), e));
            }
            Err(e) => return Err((None, e)),
        }
        match stream.read_buf(rbuf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Authenticates and sets up the session; sends CONNACK either way.
async fn accept<S: Stream>(
    ctx: Arc<Context>,
    mut stream: S,
    peer: SocketAddr,
    version: Version,
    connect: ConnectInfo,
    rbuf: BytesMut,
) -> Option<Conn<S>> {
    let refuse = |code: ConnCode, why: String| {
        tracing::info!(%peer, client_id = %connect.client_id, ?code, reason = %why, "connection refused");
        code
    };
    let thing = match DeviceId::parse(&connect.client_id) {
        Ok(t) => t,
        Err(e) => {
            let code = refuse(ConnCode::BadClientId, e.to_string());
            let _ = send_connack(&mut stream, version, code, false, ServerLimits::default()).await;
            return None;
        }
    };
    if let Some(will) = &connect.will
        && (!acl::valid_topic(&will.topic) || !acl::allowed(&thing, &will.topic))
    {
        let code = refuse(
            ConnCode::NotAuthorized,
            format!("will topic {} is outside the thing's topics", will.topic),
        );
        let _ = send_connack(&mut stream, version, code, false, ServerLimits::default()).await;
        return None;
    }
    let ok = match ctx.fleet.connect(&thing, connect.password.clone()).await {
        Ok(ok) => ok,
        Err(e) => {
            let code = match e.kind() {
                RejectionKind::Forbidden => ConnCode::Banned,
                RejectionKind::TooManyRequests => ConnCode::ServerBusy,
                RejectionKind::Unauthorized | RejectionKind::NotFound => ConnCode::NotAuthorized,
                _ => ConnCode::ServerUnavailable,
            };
            let code = refuse(code, e.to_string());
            let _ = send_connack(&mut stream, version, code, false, ServerLimits::default()).await;
            return None;
        }
    };
    if ok.registered_now {
        tracing::warn!(%thing, "auto-registered an unknown device (development mode)");
    }

    let cfg = &ctx.config;
    let max_expiry = u32::try_from(cfg.session_expiry.as_secs()).unwrap_or(u32::MAX);
    let (expiry, announce_expiry) = match version {
        Version::V4 if connect.clean_start => (0, None),
        Version::V4 => (max_expiry, None),
        Version::V5 => {
            let asked = connect.session_expiry.unwrap_or(0);
            let granted = asked.min(max_expiry);
            (granted, (granted != asked).then_some(granted))
        }
    };
    let keep_alive = if connect.keep_alive == 0 {
        0
    } else {
        connect.keep_alive.min(cfg.max_keep_alive)
    };
    let limits = ServerLimits {
        receive_maximum: cfg.max_inflight_requests.try_into().unwrap_or(u16::MAX),
        max_packet_size: cfg.max_packet_size.try_into().unwrap_or(u32::MAX),
        session_expiry: announce_expiry,
        server_keep_alive: (keep_alive != connect.keep_alive).then_some(keep_alive),
    };

    let kick = Arc::new(Kick::default());
    let (slot, resumed) = ctx
        .sessions
        .take(&ctx.fleet, &thing, connect.clean_start, &kick)
        .await;
    lock(&slot.state).expiry = Duration::from_secs(u64::from(expiry));
    if send_connack(&mut stream, version, ConnCode::Accepted, resumed, limits)
        .await
        .is_err()
    {
        kick.finish();
        ctx.sessions.release(&ctx.fleet, &slot, &kick);
        ctx.fleet
            .disconnected(&thing, ok.session, "connection lost during CONNACK");
        return None;
    }
    tracing::debug!(%peer, %thing, ?version, resumed, "device connected");
    let window = usize::from(connect.receive_maximum.unwrap_or(cfg.max_inflight_messages))
        .clamp(1, usize::from(cfg.max_inflight_messages));
    let mut conn = Conn {
        client_max: connect.max_packet_size.map_or(usize::MAX, |m| m as usize),
        ctx: ctx.clone(),
        stream,
        peer,
        version,
        thing,
        slot,
        kick,
        rbuf,
        wbuf: BytesMut::new(),
        window,
        answers: FuturesUnordered::new(),
        session: ok.session,
        keep_alive,
        will: connect.will,
        ignored: 0,
    };
    conn.resend_inflight();
    conn.want_commands();
    Some(conn)
}

impl<S: Stream> Conn<S> {
    fn send(&mut self, packet: &Outbound) {
        if !codec::write(packet, self.version, &mut self.wbuf, self.client_max) {
            tracing::debug!(thing = %self.thing, "dropped a packet larger than the client's maximum packet size");
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        // An idle connection keeps no buffers: they are most of its memory, and a fleet
        // is mostly idle connections.
        if self.wbuf.capacity() > IDLE_BUFFER {
            self.wbuf = BytesMut::new();
        }
        if self.rbuf.is_empty() && self.rbuf.capacity() > IDLE_BUFFER {
            self.rbuf = BytesMut::new();
        }
        Ok(())
    }

    async fn run(&mut self) -> Close {
        let mut shutdown = self.ctx.shutdown.clone();
        let keep_alive = Duration::from_millis(u64::from(self.keep_alive) * 1500);
        let idle = tokio::time::sleep(keep_alive);
        tokio::pin!(idle);
        // Packets that came in the same read as CONNECT, then anything queued while the
        // device was away.
        if let Some(close) = self.process_input() {
            return close;
        }
        self.drain_link();
        self.pump();
        loop {
            if let Err(e) = self.flush().await {
                return Close::Lost(format!("write failed: {e}"));
            }
            let link = self.slot.link.clone();
            let kick = self.kick.clone();
            tokio::select! {
                biased;
                () = kick.fire.notified() => {
                    let (code, why) = self.kick.reason();
                    return Close::Server(code, why);
                }
                _ = shutdown.changed() => return Close::Server(DisconnectCode::ServerShuttingDown, "server shutting down".into()),
                () = &mut idle, if self.keep_alive > 0 => {
                    return Close::Server(DisconnectCode::KeepAliveTimeout, "keep-alive timeout".into());
                }
                // Events before answers: a twin emits a change's event before it answers
                // the next request, and the device sees them in that order. Both before
                // reading more: an answer waiting to be drained must not count against
                // the connection's in-flight limit.
                () = link.notify.notified() => self.drain_link(),
                Some(answer) = self.answers.next(), if !self.answers.is_empty() => self.on_answer(answer),
                read = read_some(&mut self.stream, &mut self.rbuf) => {
                    match read {
                        Ok(0) => return Close::Lost("connection closed by the client".into()),
                        Err(e) => return Close::Lost(format!("read failed: {e}")),
                        Ok(_) => {}
                    }
                    if self.keep_alive > 0 {
                        idle.as_mut().reset(tokio::time::Instant::now() + keep_alive);
                    }
                    if let Some(close) = self.process_input() {
                        return close;
                    }
                }
            }
            self.drain_ready();
            self.pump();
        }
    }

    /// Handles whatever else is ready without waiting (the twin's events, finished
    /// answers), so that one write carries all of it.
    fn drain_ready(&mut self) {
        loop {
            let mut progressed = false;
            if !self.slot.link.is_empty() {
                self.drain_link();
                progressed = true;
            }
            while let Some(Some(answer)) = self.answers.next().now_or_never() {
                self.on_answer(answer);
                progressed = true;
            }
            if !progressed {
                return;
            }
        }
    }

    /// Handles every complete packet in the input buffer.
    fn process_input(&mut self) -> Option<Close> {
        loop {
            match codec::read(
                &mut self.rbuf,
                self.version,
                self.ctx.config.max_packet_size,
            ) {
                Ok(Some(packet)) => {
                    if let Some(close) = self.on_packet(packet) {
                        return Some(close);
                    }
                }
                Ok(None) => return None,
                Err(codec::CodecError::TooLarge(n)) => {
                    return Some(Close::Server(
                        DisconnectCode::PacketTooLarge,
                        format!("packet of {n} bytes is over the maximum packet size"),
                    ));
                }
                Err(e) => {
                    return Some(Close::Server(
                        DisconnectCode::MalformedPacket,
                        e.to_string(),
                    ));
                }
            }
        }
    }

    fn on_packet(&mut self, packet: Inbound) -> Option<Close> {
        match packet {
            Inbound::Publish(p) => return self.on_publish(p),
            Inbound::PubAck(pkid) => {
                lock(&self.slot.state).inflight.remove(&pkid);
            }
            Inbound::Subscribe { pkid, filters } => {
                let mut codes = Vec::with_capacity(filters.len());
                let commands = self.command_topic("x", CommandChannel::Request);
                let mut wants_commands = false;
                let mut st = lock(&self.slot.state);
                for (filter, qos) in filters {
                    let code = if !acl::valid_filter(&filter) {
                        SubCode::BadFilter
                    } else if !acl::allowed(&self.thing, &filter) {
                        tracing::warn!(client_id = %self.thing, %filter, "subscription refused: outside the thing's topics");
                        SubCode::NotAuthorized
                    } else {
                        let granted = qos.min(1);
                        wants_commands |= acl::matches(&filter, &commands);
                        st.subscriptions.retain(|(f, _)| *f != filter);
                        st.subscriptions.push((filter, granted));
                        SubCode::Granted(granted)
                    };
                    codes.push(code);
                }
                drop(st);
                self.send(&Outbound::SubAck { pkid, codes });
                if wants_commands {
                    self.ctx.fleet.commands_wanted(&self.thing, self.session);
                }
            }
            Inbound::Unsubscribe { pkid, filters } => {
                lock(&self.slot.state)
                    .subscriptions
                    .retain(|(f, _)| !filters.contains(f));
                self.send(&Outbound::UnsubAck {
                    pkid,
                    count: filters.len(),
                });
            }
            Inbound::PingReq => self.send(&Outbound::PingResp),
            Inbound::Disconnect { reason } => return Some(Close::Client { will: reason == 4 }),
            Inbound::Connect(_) => {
                return Some(Close::Server(
                    DisconnectCode::ProtocolError,
                    "second CONNECT".into(),
                ));
            }
            Inbound::Unsupported("QoS 2") => {
                return Some(Close::Server(
                    DisconnectCode::QoSNotSupported,
                    "QoS 2 is not supported (maximum QoS is 1)".into(),
                ));
            }
            Inbound::Unsupported(what) => {
                return Some(Close::Server(
                    DisconnectCode::ProtocolError,
                    format!("unexpected {what}"),
                ));
            }
        }
        None
    }

    fn on_publish(&mut self, p: InPublish) -> Option<Close> {
        if p.qos > 1 {
            return Some(Close::Server(
                DisconnectCode::QoSNotSupported,
                "QoS 2 is not supported (maximum QoS is 1)".into(),
            ));
        }
        if p.retain && self.version == Version::V5 {
            return Some(Close::Server(
                DisconnectCode::RetainNotSupported,
                "retained messages are not supported".into(),
            ));
        }
        let ack = |code| (p.qos == 1).then_some(Outbound::PubAck { pkid: p.pkid, code });
        if !acl::valid_topic(&p.topic) {
            // A protocol error in both versions (MQTT 5 section 3.3.2.1, 3.1.1 section 3.3.2.1).
            return Some(Close::Server(
                DisconnectCode::TopicNameInvalid,
                "invalid topic name: empty, or with a wildcard (+ #) or NUL".into(),
            ));
        }
        if !acl::allowed(&self.thing, &p.topic) {
            tracing::warn!(client_id = %self.thing, topic = %p.topic, "publish refused: outside the thing's topics");
            return match (self.version, ack(PubAckCode::NotAuthorized)) {
                (Version::V5, Some(a)) => {
                    self.send(&a);
                    None
                }
                (Version::V5, None) => None,
                // The reason is kept as the thing's disconnect reason, shown through the
                // API: it does not quote the device's topic (the log line above does).
                (Version::V4, _) => Some(Close::Server(
                    DisconnectCode::NotAuthorized,
                    "publish outside the thing's topics is not authorized".into(),
                )),
            };
        }
        let pkid = (p.qos == 1).then_some(p.pkid);
        let reply_to = p
            .response_topic
            .filter(|t| acl::valid_topic(t) && acl::allowed(&self.thing, t))
            .map(|t| (t, p.correlation_data));
        if !self.request(&p.topic, &p.payload, pkid, reply_to)
            && let Some(a) = ack(PubAckCode::NoMatchingSubscribers)
        {
            self.send(&a);
        }
        None
    }

    /// Hands a device request to its twin. Returns false when the topic is not a request.
    /// Hands a device request to its twin; a QoS 1 request's PUBACK (`ack`) goes out with
    /// the answer, so that the two share one write and the PUBACK means the change is
    /// durable. Returns false, sending nothing, when the topic is not a request.
    fn request(
        &mut self,
        topic_name: &str,
        body: &Bytes,
        ack: Option<u16>,
        reply_to: ReplyTo,
    ) -> bool {
        let t = match topic::parse(topic_name) {
            Ok(Topic::Shadow(t)) => t,
            Ok(Topic::Command(t)) if t.channel == CommandChannel::Response => {
                return self.command_response(t, body, ack, reply_to);
            }
            Ok(Topic::Job(t))
                if t.channel == JobChannel::Request
                    && !matches!(t.op, JobOp::Notify | JobOp::NotifyNext) =>
            {
                return self.job_request(t, body, ack);
            }
            Err(topic::TopicError::ShadowName(e)) if is_shadow_request(topic_name) => {
                // As AWS answers a request it cannot take: on the request's `rejected` topic.
                self.send_ack(ack);
                let rejection = Rejection::bad_request(format!("Invalid shadow name: {e}"));
                self.publish(format!("{topic_name}/rejected"), || {
                    payload::rejected(&rejection, now_secs(), None)
                });
                return true;
            }
            Err(e) => {
                self.ignore(topic_name, &e.to_string());
                return false;
            }
            Ok(_) => {
                self.ignore(topic_name, "not a request topic");
                return false;
            }
        };
        if t.channel != ShadowChannel::Request {
            self.ignore(
                topic_name,
                "a response topic: devices publish requests, Doppel publishes the answers",
            );
            return false;
        }
        let ShadowTopic {
            thing, shadow, op, ..
        } = t;
        if self.answers.len() >= self.ctx.config.max_inflight_requests {
            let token = parse_client_token(body).ok().flatten();
            self.send_ack(ack);
            self.reject(op, &shadow, &Rejection::overloaded(), token.as_deref());
            return true;
        }
        let fleet = &self.ctx.fleet;
        let answer: AnswerFuture = match op {
            ShadowOp::Update => match UpdateRequest::parse(body, &fleet.config().limits) {
                Err(rejection) => {
                    self.send_ack(ack);
                    self.reject(op, &shadow, &rejection, None);
                    return true;
                }
                Ok(req) => {
                    let token = req.client_token.clone();
                    let reply = fleet.update_shadow(&thing, shadow.clone(), req);
                    Box::pin(async move { (ack, Answer::Update(shadow, token, reply.await)) })
                }
            },
            ShadowOp::Get | ShadowOp::Delete => {
                let token = match parse_client_token(body) {
                    Ok(t) => t,
                    Err(rejection) => {
                        self.send_ack(ack);
                        self.reject(op, &shadow, &rejection, None);
                        return true;
                    }
                };
                if op == ShadowOp::Get {
                    let reply = fleet.get_shadow(&thing, shadow.clone());
                    Box::pin(async move { (ack, Answer::Get(shadow, token, reply.await)) })
                } else {
                    let reply = fleet.delete_shadow(&thing, shadow.clone(), token.clone());
                    Box::pin(async move { (ack, Answer::Delete(shadow, token, reply.await)) })
                }
            }
        };
        self.answers.push(answer);
        true
    }

    /// A device's answer to a command, on `.../executions/{id}/response/json`.
    fn command_response(
        &mut self,
        t: CommandTopic,
        body: &Bytes,
        ack: Option<u16>,
        reply_to: ReplyTo,
    ) -> bool {
        if self.answers.len() >= self.ctx.config.max_inflight_requests {
            self.send_ack(ack);
            self.command_rejected(&t.execution_id, reply_to, &Rejection::overloaded());
            return true;
        }
        let response = DeviceResponse::parse(body);
        let reply = self
            .ctx
            .fleet
            .command_response(&t.thing, t.execution_id.clone(), response);
        let id = t.execution_id;
        self.answers.push(Box::pin(async move {
            (ack, Answer::Command(id, reply_to, reply.await))
        }));
        true
    }

    /// A device request on its jobs topics.
    fn job_request(&mut self, t: JobTopic, body: &Bytes, ack: Option<u16>) -> bool {
        let parsed = if body.iter().all(u8::is_ascii_whitespace) {
            Ok(serde_json::Value::Object(Default::default()))
        } else {
            serde_json::from_slice::<serde_json::Value>(body)
        };
        let body = match parsed {
            Ok(v) if v.is_object() => v,
            _ => {
                self.send_ack(ack);
                let e = JobError::new(
                    JobErrorCode::InvalidJson,
                    "the request is not a JSON object",
                );
                self.job_answer(&t.op, None, Err(e));
                return true;
            }
        };
        let token = body
            .get("clientToken")
            .and_then(|t| t.as_str())
            .map(str::to_owned);
        if self.answers.len() >= self.ctx.config.max_inflight_requests {
            self.send_ack(ack);
            let e = JobError::new(
                JobErrorCode::RequestThrottled,
                "too many requests in flight",
            );
            self.job_answer(&t.op, token.as_deref(), Err(e));
            return true;
        }
        let reply = self.ctx.fleet.job_request(&t.thing, t.op.clone(), body);
        let op = t.op;
        self.answers.push(Box::pin(async move {
            (ack, Answer::Job(op, token, reply.await))
        }));
        true
    }

    fn job_answer(&mut self, op: &JobOp, token: Option<&str>, answer: twin_actors::JobAnswer) {
        let (channel, payload) = match answer {
            Ok(accepted) => (JobChannel::Accepted, accepted),
            Err(e) => (
                JobChannel::Rejected,
                e.payload(token, twin_store::now_millis()),
            ),
        };
        let topic = JobTopic {
            thing: self.thing.clone(),
            op: op.clone(),
            channel,
        }
        .format();
        self.publish(topic, || payload);
    }

    fn command_topic(&self, execution_id: &str, channel: CommandChannel) -> String {
        CommandTopic {
            thing: self.thing.clone(),
            execution_id: execution_id.to_owned(),
            channel,
        }
        .format()
    }

    /// Answers a command response on `channel`, or where the MQTT 5 request asked.
    fn command_answer(
        &mut self,
        execution_id: &str,
        channel: CommandChannel,
        reply_to: ReplyTo,
        payload: serde_json::Value,
    ) {
        let (topic, correlation) = match reply_to {
            Some((topic, correlation)) => (topic, correlation),
            None => (self.command_topic(execution_id, channel), None),
        };
        self.publish_to(topic, correlation, || payload);
    }

    fn command_rejected(&mut self, execution_id: &str, reply_to: ReplyTo, rejection: &Rejection) {
        let payload =
            CommandExecution::rejected_payload(execution_id, rejection, twin_store::now_millis());
        self.command_answer(execution_id, CommandChannel::Rejected, reply_to, payload);
    }

    /// A publish in the thing's own topics that the device API does not take: counted, and
    /// logged at most once per `LOG_EVERY` across the endpoint.
    fn ignore(&mut self, topic: &str, why: &str) {
        self.ignored += 1;
        let ignored = &self.ctx.ignored;
        let total = ignored
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let admitted = ignored
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(tokio::time::Instant::now());
        if let Some(suppressed) = admitted {
            tracing::info!(client_id = %self.thing, topic, reason = why, suppressed, ignored_total = total, "publish ignored: not a request of the device API");
        }
    }

    fn reject(
        &mut self,
        op: ShadowOp,
        shadow: &ShadowName,
        rejection: &Rejection,
        token: Option<&str>,
    ) {
        let topic = format_shadow_topic(&self.thing, shadow, op, ShadowChannel::Rejected);
        self.publish(topic, || payload::rejected(rejection, now_secs(), token));
    }

    fn send_ack(&mut self, ack: Option<u16>) {
        if let Some(pkid) = ack {
            self.send(&Outbound::PubAck {
                pkid,
                code: PubAckCode::Success,
            });
        }
    }

    fn on_answer(&mut self, (ack, answer): (Option<u16>, Answer)) {
        self.send_ack(ack);
        match answer {
            // Accepted changes reach the device as events (like changes made by others).
            Answer::Update(_, _, Ok(_)) | Answer::Delete(_, _, Ok(_)) => {}
            Answer::Get(shadow, token, Ok(doc)) => {
                let topic = format_shadow_topic(
                    &self.thing,
                    &shadow,
                    ShadowOp::Get,
                    ShadowChannel::Accepted,
                );
                self.publish(topic, || {
                    payload::get_accepted(&doc, now_secs(), token.as_deref())
                });
            }
            Answer::Update(shadow, token, Err(e)) => self.reject(
                ShadowOp::Update,
                &shadow,
                &e.to_rejection(),
                token.as_deref(),
            ),
            Answer::Get(shadow, token, Err(e)) => {
                self.reject(ShadowOp::Get, &shadow, &e.to_rejection(), token.as_deref())
            }
            Answer::Delete(shadow, token, Err(e)) => self.reject(
                ShadowOp::Delete,
                &shadow,
                &e.to_rejection(),
                token.as_deref(),
            ),
            Answer::Command(id, reply_to, Ok(execution)) => {
                let payload = execution.accepted_payload();
                self.command_answer(&id, CommandChannel::Accepted, reply_to, payload);
            }
            Answer::Command(id, reply_to, Err(e)) => {
                self.command_rejected(&id, reply_to, &e.to_rejection())
            }
            Answer::Job(op, token, Ok(answer)) => self.job_answer(&op, token.as_deref(), answer),
            Answer::Job(op, token, Err(e)) => {
                let code = match e {
                    FleetError::Overloaded => JobErrorCode::RequestThrottled,
                    FleetError::Rejected(ref r) if r.kind == RejectionKind::NotFound => {
                        JobErrorCode::ResourceNotFound
                    }
                    _ => JobErrorCode::InternalError,
                };
                let e = JobError::new(code, e.to_string());
                self.job_answer(&op, token.as_deref(), Err(e));
            }
        }
    }

    /// Queues a message for the device if it subscribed to `topic`; the payload is built
    /// only then.
    fn publish<P: serde::Serialize>(&mut self, topic: String, build: impl FnOnce() -> P) {
        self.publish_to(topic, None, build);
    }

    /// `publish`, answering an MQTT 5 request that carried `correlation_data`.
    fn publish_to<P: serde::Serialize>(
        &mut self,
        topic: String,
        correlation_data: Option<Bytes>,
        build: impl FnOnce() -> P,
    ) {
        let mut st = lock(&self.slot.state);
        let Some(qos) = st.qos_for(&topic) else {
            return;
        };
        // Most payloads fit; a larger one grows the buffer once or twice.
        let mut buf = Vec::with_capacity(512);
        // Payloads are plain data: serializing them cannot fail.
        let _ = serde_json::to_writer(&mut buf, &build());
        st.push(
            &self.thing,
            OutMsg {
                topic,
                payload: Bytes::from(buf),
                qos,
                correlation_data,
            },
            self.ctx.config.max_queued_messages,
        );
    }

    /// Turns the twin's events into publishes on the shadow response topics.
    fn drain_link(&mut self) {
        for _ in 0..256 {
            let Some(event) = self.slot.link.pop() else {
                return;
            };
            let (thing, shadow, change, previous, current) = match &*event {
                TwinEvent::Shadow {
                    thing,
                    shadow,
                    change,
                    previous,
                    current,
                    ..
                } => (thing, shadow, change, previous, current),
                TwinEvent::Job {
                    notify,
                    notify_next,
                    ..
                } => {
                    let thing = self.thing.clone();
                    let topic = |op| {
                        JobTopic {
                            thing: thing.clone(),
                            op,
                            channel: JobChannel::Request,
                        }
                        .format()
                    };
                    let (notify, next) = (notify.clone(), notify_next.clone());
                    self.publish(topic(JobOp::Notify), || &*notify);
                    if let Some(next) = next {
                        self.publish(topic(JobOp::NotifyNext), || &*next);
                    }
                    continue;
                }
                TwinEvent::Command {
                    execution,
                    deliver: true,
                    ..
                } => {
                    let topic =
                        self.command_topic(&execution.execution_id, CommandChannel::Request);
                    self.publish(topic, || execution.payload.clone());
                    continue;
                }
                _ => continue,
            };
            let token = change.client_token.as_deref();
            match change.op {
                ChangeOp::Update { .. } => {
                    let topic = |ch| format_shadow_topic(thing, shadow, ShadowOp::Update, ch);
                    self.publish(topic(ShadowChannel::Accepted), || {
                        payload::update_accepted(change)
                    });
                    if let Some(delta) = payload::delta(current, change.timestamp, token) {
                        self.publish(topic(ShadowChannel::Delta), || delta);
                    }
                    self.publish(topic(ShadowChannel::Documents), || {
                        payload::documents(previous, current, change.timestamp, token)
                    });
                }
                ChangeOp::Delete => {
                    let topic = format_shadow_topic(
                        thing,
                        shadow,
                        ShadowOp::Delete,
                        ShadowChannel::Accepted,
                    );
                    self.publish(topic, || payload::delete_accepted(change));
                }
            }
        }
        // More than one batch waiting: come back after serving the socket.
        if !self.slot.link.is_empty() {
            self.slot.link.notify.notify_one();
        }
    }

    /// Moves queued messages onto the wire, within the QoS 1 inflight window.
    fn pump(&mut self) {
        let slot = self.slot.clone();
        let mut st = lock(&slot.state);
        while let Some(msg) = st.pending.front() {
            if msg.qos == 1 && st.inflight.len() >= self.window {
                break;
            }
            let msg = st.pending.pop_front().expect("front exists");
            let pkid = if msg.qos == 1 { st.next_pkid() } else { 0 };
            let packet = Outbound::Publish {
                topic: msg.topic.clone(),
                payload: msg.payload.clone(),
                qos: msg.qos,
                pkid,
                dup: false,
                correlation_data: msg.correlation_data.clone(),
            };
            if msg.qos == 1 {
                st.inflight.insert(pkid, msg);
            }
            if !codec::write(&packet, self.version, &mut self.wbuf, self.client_max) {
                st.inflight.remove(&pkid);
            }
        }
    }

    /// A resumed session that subscribed to its command requests before gets the
    /// commands that wait for the device (a new one gets them when it subscribes).
    fn want_commands(&self) {
        let sample = self.command_topic("x", CommandChannel::Request);
        let listening = lock(&self.slot.state)
            .subscriptions
            .iter()
            .any(|(f, _)| acl::matches(f, &sample));
        if listening {
            self.ctx.fleet.commands_wanted(&self.thing, self.session);
        }
    }

    /// A resumed session first resends what was sent but never acknowledged.
    fn resend_inflight(&mut self) {
        let slot = self.slot.clone();
        let st = lock(&slot.state);
        for (pkid, msg) in &st.inflight {
            let packet = Outbound::Publish {
                topic: msg.topic.clone(),
                payload: msg.payload.clone(),
                qos: msg.qos,
                pkid: *pkid,
                dup: true,
                correlation_data: msg.correlation_data.clone(),
            };
            codec::write(&packet, self.version, &mut self.wbuf, self.client_max);
        }
    }

    async fn finish(mut self, close: Close) {
        if let Close::Server(code, why) = &close {
            self.send(&Outbound::Disconnect(*code, why.clone()));
            let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
        }
        let _ = self.stream.shutdown().await;
        let reason = close.reason();
        tracing::debug!(peer = %self.peer, thing = %self.thing, %reason, ignored_publishes = self.ignored, "device disconnected");
        if close.publishes_will()
            && let Some(will) = self.will.take()
        {
            // The request is queued at the twin before this returns; nobody waits for it.
            self.request(&will.topic, &will.payload, None, None);
        }
        self.ctx
            .fleet
            .disconnected(&self.thing, self.session, reason);
        self.kick.finish();
        self.ctx
            .sessions
            .release(&self.ctx.fleet, &self.slot, &self.kick);
    }
}

/// Whether a topic names a shadow request (`.../update`, `/get`, `/delete`).
fn is_shadow_request(topic: &str) -> bool {
    topic.ends_with("/update") || topic.ends_with("/get") || topic.ends_with("/delete")
}
