//! One device connection's IO: CONNECT and authentication, then a loop over the socket,
//! the twin's answers, the twin's events, the keep-alive timer, a close and server
//! shutdown.
//!
//! What packets mean is decided by the session core ([`crate::protocol`]); what the AWS
//! device APIs say, by their adapters ([`crate::api`]). This loop only moves bytes and
//! futures between them: requests go to the twin in the order they arrive, answers and
//! events are queued in the session and written out within the QoS 1 window. The twins
//! never wait for it.
//!
//! Over 600 lines: the connection's whole life (CONNECT and each login method, the loop,
//! the end and its will) reads best in one place; the claim certificates' session is in
//! [`crate::provisioning`], the login methods in [`crate::login`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::Instrument as _;
use twin_actors::FleetHandle;
use twin_actors::services::{CertificateLogin, Login};
use twin_actors::telemetry::{OverloadCause, overloaded};
use twin_model::{DeviceId, RejectionKind};
use twin_telemetry::trace;

use crate::GatewayConfig;
use crate::accept::RateLimitedLog;
use crate::acl;
use crate::api::{self, Dispatch, Outbox, Traced, TracedAnswer};
use crate::codec::{
    self, ConnCode, ConnectInfo, DisconnectCode, Inbound, Outbound, PubAckCode, ServerLimits,
    Version,
};
use crate::limits::ConnectLimits;
use crate::login::Method;
pub(crate) use crate::login::Transport;
use crate::protocol::{Close, Core, Request};
use crate::provisioning::ClaimSession;
use crate::session::{CloseSignal, OutMsg, Session, SessionState, Sessions, lock};
use crate::telemetry;

/// Everything a connection needs from the endpoint.
pub(crate) struct Context {
    pub(crate) fleet: FleetHandle,
    pub(crate) config: GatewayConfig,
    pub(crate) sessions: Sessions,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) ignored: IgnoredPublishes,
    pub(crate) connects: ConnectLimits,
}

/// Publishes in devices' own topics that the device API does not take, across the
/// endpoint: counted, and logged at most once per `LOG_EVERY` (a fleet publishing to an
/// unsupported topic must not flood the log).
#[derive(Default)]
pub(crate) struct IgnoredPublishes {
    count: std::sync::atomic::AtomicU64,
    log: std::sync::Mutex<RateLimitedLog>,
}

/// Bytes reserved for each read.
const READ_CHUNK: usize = 512;
/// Buffers larger than this are released when empty.
const IDLE_BUFFER: usize = 4096;

/// A device's byte stream: plain TCP or TLS.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// Reads into `buf`, reserving room first (an idle connection's buffer has none).
pub(crate) async fn read_some(
    stream: &mut impl Stream,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    buf.reserve(READ_CHUNK);
    stream.read_buf(buf).await
}

/// The session queue as the API adapters write into it.
struct SessionOutbox<'a> {
    st: &'a mut SessionState,
    thing: &'a DeviceId,
    cap: usize,
}

impl Outbox for SessionOutbox<'_> {
    fn qos(&self, topic: &str) -> Option<u8> {
        self.st.qos_for(topic)
    }

    fn push(&mut self, msg: OutMsg) {
        self.st.push(self.thing, msg, self.cap);
    }
}

struct Conn<S> {
    ctx: Arc<Context>,
    stream: S,
    peer: SocketAddr,
    core: Core,
    session: Arc<Session>,
    close: Arc<CloseSignal>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Largest packet the client accepts.
    client_max: usize,
    answers: FuturesUnordered<TracedAnswer>,
    /// The fleet's number for this connection (see `DeviceSessions::connect`).
    connection: u64,
    will: Option<codec::Will>,
    /// The certificate login, which can end while the connection lives.
    login: Option<CertificateLogin>,
    /// Publishes of this connection that were not requests of the device API.
    ignored: u64,
    _counted: telemetry::Connected,
}

/// Serves one TCP connection until it ends.
pub(crate) async fn serve(
    ctx: Arc<Context>,
    mut stream: impl Stream,
    peer: SocketAddr,
    transport: Transport,
) {
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
    let Some(mut conn) = accept(ctx, stream, peer, version, connect, rbuf, transport).await else {
        return;
    };
    let close = conn.run().await;
    conn.finish(close).await;
}

/// Encodes `packet` into `buf` (see [`codec::write`]) and counts it when it went in.
pub(crate) fn write(
    packet: &Outbound,
    version: Version,
    buf: &mut BytesMut,
    max_size: usize,
) -> bool {
    let written = codec::write(packet, version, buf, max_size);
    if written {
        telemetry::sent(packet);
    }
    written
}

async fn send_connack(
    stream: &mut impl Stream,
    version: Version,
    code: ConnCode,
    session_present: bool,
    limits: ServerLimits,
) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    write(
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
                let read = codec::read(rbuf, version, max);
                if let Ok(Some(packet)) = &read {
                    telemetry::received(packet);
                }
                return match read {
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
    transport: Transport,
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
    // Logged by the limiter, at a bounded rate: a reconnect loop must not flood the log.
    if !ctx.connects.admit(thing.as_str()) {
        let _ = send_connack(
            &mut stream,
            version,
            ConnCode::QuotaExceeded,
            false,
            ServerLimits::default(),
        )
        .await;
        return None;
    }
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
    let method = match transport.method(ctx.config.tls_auth, connect.password.clone()) {
        Ok(m) => m,
        Err(why) => {
            let code = refuse(ConnCode::NotAuthorized, why.into());
            let _ = send_connack(&mut stream, version, code, false, ServerLimits::default()).await;
            return None;
        }
    };
    let sessions = ctx.fleet.sessions();
    let connected = match method {
        Method::Password(password) => sessions
            .connect(&thing, password)
            .await
            .map(|ok| (Login::Thing(ok), None)),
        Method::Certificate(id, der) => sessions
            .connect_with_certificate(&thing, &id, &der)
            .await
            .map(|(as_what, login)| (as_what, Some(login))),
    };
    let (as_what, login) = match connected {
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
    let ok = match (as_what, login) {
        (Login::Thing(ok), login) => (ok, login),
        (Login::Claim { template }, Some(login)) => {
            // A claim certificate: fleet provisioning only, no thing, no session (an
            // MQTT 5 client that asked for one is told so).
            let limits = ServerLimits {
                receive_maximum: ctx
                    .config
                    .max_inflight_requests
                    .try_into()
                    .unwrap_or(u16::MAX),
                max_packet_size: ctx.config.max_packet_size.try_into().unwrap_or(u32::MAX),
                session_expiry: connect.session_expiry.filter(|e| *e > 0).map(|_| 0),
                server_keep_alive: None,
            };
            let accepted =
                send_connack(&mut stream, version, ConnCode::Accepted, false, limits).await;
            if accepted.is_ok() {
                tracing::debug!(%peer, client_id = %thing, %template, "claim certificate connected");
                let keep_alive = connect.keep_alive.min(ctx.config.max_keep_alive);
                let session = ClaimSession {
                    ctx: ctx.clone(),
                    stream,
                    peer,
                    version,
                    rbuf,
                    template,
                    login,
                    keep_alive,
                };
                session.run().await;
            }
            return None;
        }
        (Login::Claim { .. }, None) => return None,
    };
    let (ok, login) = ok;
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

    let close = Arc::new(CloseSignal::default());
    let (session, resumed) = ctx
        .sessions
        .take(&ctx.fleet, &thing, connect.clean_start, &close)
        .await;
    lock(&session.state).expiry = Duration::from_secs(u64::from(expiry));
    if send_connack(&mut stream, version, ConnCode::Accepted, resumed, limits)
        .await
        .is_err()
    {
        close.finish();
        ctx.sessions.release(&ctx.fleet, &session, &close);
        ctx.fleet
            .sessions()
            .disconnected(&thing, ok.session, "connection lost during CONNACK");
        return None;
    }
    tracing::debug!(%peer, %thing, ?version, resumed, "device connected");
    let window = usize::from(connect.receive_maximum.unwrap_or(cfg.max_inflight_messages))
        .clamp(1, usize::from(cfg.max_inflight_messages));
    let mut conn = Conn {
        client_max: connect.max_packet_size.map_or(usize::MAX, |m| m as usize),
        core: Core::new(
            thing,
            version,
            window,
            cfg.max_inflight_requests,
            keep_alive,
        )
        .with_publish_rate(cfg.max_publishes_per_second)
        .with_telemetry(cfg.telemetry_topics.clone()),
        ctx: ctx.clone(),
        stream,
        peer,
        session,
        close,
        rbuf,
        wbuf: BytesMut::new(),
        answers: FuturesUnordered::new(),
        connection: ok.session,
        will: connect.will,
        login,
        ignored: 0,
        _counted: telemetry::Connected::new(),
    };
    conn.resend_inflight();
    conn.want_commands();
    Some(conn)
}

/// Resolves when the certificate login must end; never without one.
async fn ended(login: &mut Option<CertificateLogin>) -> &'static str {
    match login {
        Some(l) => l.ended().await,
        None => std::future::pending().await,
    }
}

impl<S: Stream> Conn<S> {
    fn send(&mut self, packet: &Outbound) {
        if !write(packet, self.core.version(), &mut self.wbuf, self.client_max) {
            tracing::debug!(thing = %self.core.thing(), "dropped a packet larger than the client's maximum packet size");
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

    /// Runs `write` on the session queue as the API adapters see it.
    fn outbox<T>(&self, write: impl FnOnce(&mut dyn Outbox) -> T) -> T {
        let mut st = lock(&self.session.state);
        write(&mut SessionOutbox {
            st: &mut st,
            thing: self.core.thing(),
            cap: self.ctx.config.max_queued_messages,
        })
    }

    async fn run(&mut self) -> Close {
        let mut shutdown = self.ctx.shutdown.clone();
        let silence = self.core.silence_allowed();
        let idle = tokio::time::sleep(silence.unwrap_or(Duration::MAX / 4));
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
            let link = self.session.events.clone();
            let close = self.close.clone();
            tokio::select! {
                biased;
                () = close.fire.notified() => {
                    let (code, why) = self.close.reason();
                    return Close::Server(code, why);
                }
                why = ended(&mut self.login) => return Close::Server(DisconnectCode::NotAuthorized, why.into()),
                _ = shutdown.changed() => return Close::Server(DisconnectCode::ServerShuttingDown, "server shutting down".into()),
                () = &mut idle, if silence.is_some() => {
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
                    if let Some(silence) = silence {
                        idle.as_mut().reset(tokio::time::Instant::now() + silence);
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
            if !self.session.events.is_empty() {
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
                self.core.version(),
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
        telemetry::received(&packet);
        let actions = self.core.handle(&mut lock(&self.session.state), packet);
        for packet in &actions.send {
            self.send(packet);
        }
        if actions.wants_commands {
            self.ctx
                .fleet
                .sessions()
                .commands_wanted(self.core.thing(), self.connection);
        }
        if let Some(request) = actions.request {
            self.request(request);
        }
        actions.close
    }

    /// Hands a device request to its twin; a QoS 1 request's PUBACK goes out with the
    /// answer, so that the two share one write and the PUBACK means the change is
    /// durable. A publish that is not a request is acknowledged with "no matching
    /// subscribers" (MQTT 5).
    fn request(&mut self, request: Request) {
        let room = self.core.has_room();
        let limits = &self.ctx.fleet.config().limits;
        // From the publish to its answer; a device's `traceparent` makes it part of the
        // device's trace, and what is sent in answer carries this span's (or, when this
        // request is not traced, the device's own, unchanged, as W3C asks of a hop that
        // does not take part).
        let span = trace::entry(
            request.traceparent.as_deref(),
            || tracing::debug_span!("mqtt.publish", thing = %self.core.thing(), topic = %request.topic),
        );
        let forward = if span.is_none() {
            request.traceparent.as_deref().and_then(trace::forwarded)
        } else {
            None
        };
        let traced = trace::traceparent(&span).or_else(|| forward.clone());
        let dispatched = self.outbox(|out| {
            api::dispatch(
                &request,
                room,
                limits,
                &mut Traced {
                    out,
                    trace: traced.clone(),
                },
            )
        });
        match dispatched {
            Dispatch::Call(call) => {
                self.core.request_sent();
                let answer = span.in_scope(|| {
                    trace::forwarding(forward, || {
                        call.send(&self.ctx.fleet, self.core.thing(), request.ack)
                    })
                });
                self.answers.push(Box::pin(
                    answer
                        .map(move |(ack, answer)| (ack, traced, answer))
                        .instrument(span),
                ));
            }
            Dispatch::Answered => {
                if !room {
                    overloaded(OverloadCause::DeviceInFlight);
                }
                self.send_ack(request.ack, PubAckCode::Success);
            }
            Dispatch::Ignored(why) => {
                self.ignore(&request.topic, &why);
                self.send_ack(request.ack, PubAckCode::NoMatchingSubscribers);
            }
            Dispatch::Refused(code, why) => {
                if code == PubAckCode::QuotaExceeded {
                    overloaded(OverloadCause::DeviceInFlight);
                }
                self.refused(&request.topic, &why);
                self.acknowledge(request.ack, code);
            }
        }
    }

    /// A refused telemetry message: counted with the ignored publishes, and logged as
    /// they are.
    fn refused(&mut self, topic: &str, why: &str) {
        if let Some((suppressed, total)) = self.not_taken() {
            tracing::info!(client_id = %self.core.thing(), topic, reason = why, suppressed, ignored_total = total, "telemetry refused");
        }
    }

    /// A PUBACK with `code`. MQTT 3.1.1 has no reason codes: a message the
    /// server could not take now (overload, store failure) is not acknowledged, so the
    /// device's client reports it failed (and resends it on a resumed session); a bad one
    /// is acknowledged, as there is no point sending it again.
    fn acknowledge(&mut self, ack: Option<u16>, code: PubAckCode) {
        let retry = matches!(
            code,
            PubAckCode::QuotaExceeded | PubAckCode::UnspecifiedError
        );
        if self.core.version() == Version::V5 || !retry {
            self.send_ack(ack, code);
        }
    }

    /// A publish in the thing's own topics that the device API does not take: counted, and
    /// logged at most once per `LOG_EVERY` across the endpoint.
    fn ignore(&mut self, topic: &str, why: &str) {
        if let Some((suppressed, total)) = self.not_taken() {
            tracing::info!(client_id = %self.core.thing(), topic, reason = why, suppressed, ignored_total = total, "publish ignored: not a request of the device API");
        }
    }

    /// Counts a publish not taken; `Some((suppressed, total))` when it may be logged.
    fn not_taken(&mut self) -> Option<(u64, u64)> {
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
        admitted.map(|suppressed| (suppressed, total))
    }

    fn send_ack(&mut self, ack: Option<u16>, code: PubAckCode) {
        if let Some(pkid) = ack {
            self.send(&Outbound::PubAck { pkid, code });
        }
    }

    fn on_answer(&mut self, (ack, trace, answer): (Option<u16>, Option<Arc<str>>, api::Answer)) {
        self.core.request_answered();
        self.acknowledge(ack, answer.ack_code());
        self.outbox(|out| api::answer(self.core.thing(), answer, &mut Traced { out, trace }));
    }

    /// Turns the twin's events into publishes, a batch at a time.
    fn drain_link(&mut self) {
        self.outbox(|out| {
            for _ in 0..256 {
                let Some(event) = self.session.events.pop() else {
                    return;
                };
                let trace = event.trace().cloned();
                api::event(self.core.thing(), &event, &mut Traced { out, trace });
            }
        });
        // More than one batch waiting: come back after serving the socket.
        if !self.session.events.is_empty() {
            self.session.events.notify.notify_one();
        }
    }

    /// Moves queued messages onto the wire, within the QoS 1 inflight window.
    fn pump(&mut self) {
        let Self {
            core,
            session,
            wbuf,
            client_max,
            ..
        } = self;
        core.pump(&mut lock(&session.state), |packet| {
            write(packet, core.version(), wbuf, *client_max)
        });
    }

    /// A resumed session that subscribed to its command requests before gets the
    /// commands that wait for the device (a new one gets them when it subscribes).
    fn want_commands(&self) {
        if self.core.listens_for_commands(&lock(&self.session.state)) {
            self.ctx
                .fleet
                .sessions()
                .commands_wanted(self.core.thing(), self.connection);
        }
    }

    /// A resumed session first resends what was sent but never acknowledged.
    fn resend_inflight(&mut self) {
        let packets = self.core.resend(&lock(&self.session.state));
        for packet in &packets {
            write(packet, self.core.version(), &mut self.wbuf, self.client_max);
        }
    }

    async fn finish(mut self, close: Close) {
        if let Close::Server(code, why) = &close {
            self.send(&Outbound::Disconnect(*code, why.clone()));
            let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
        }
        let _ = self.stream.shutdown().await;
        let reason = close.reason();
        let thing = self.core.thing().clone();
        tracing::debug!(peer = %self.peer, %thing, %reason, ignored_publishes = self.ignored, "device disconnected");
        if close.publishes_will()
            && let Some(will) = self.will.take()
        {
            // The request is queued at the twin before this returns; nobody waits for it.
            self.request(Request {
                topic: will.topic,
                payload: will.payload,
                ack: None,
                reply_to: None,
                traceparent: None,
                telemetry: None,
            });
        }
        self.ctx
            .fleet
            .sessions()
            .disconnected(&thing, self.connection, reason);
        self.close.finish();
        self.ctx
            .sessions
            .release(&self.ctx.fleet, &self.session, &self.close);
    }
}
