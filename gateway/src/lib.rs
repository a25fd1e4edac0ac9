//! Doppel's MQTT device endpoint.
//!
//! A device endpoint of our own on tokio, built on the rumqtt family's packet codecs
//! (see [`codec`]), speaking MQTT 3.1.1 and 5 with the AWS IoT Device Shadow topics. It
//! is the policy enforcement point: client id = thing name, password = the device's
//! secret, and a device publishes and subscribes only under `$aws/things/{its name}/`.
//!
//! Plain TCP and TLS listeners ([`tls`]). On TLS a device may log in with a registered
//! client certificate attached to its thing and no password, as on AWS IoT
//! ([`TlsAuth`] decides which methods a listener allows).
//!
//! QoS 0 and 1 are supported both ways. QoS 2 is refused as AWS IoT refuses it: MQTT 5
//! clients are told `Maximum QoS = 1` in CONNACK and a QoS 2 PUBLISH ends the connection
//! with reason 0x9B; a QoS 2 subscription is granted QoS 1. Retained messages are not
//! supported (`Retain Available = 0`).

pub mod accept;
pub mod acl;
mod api;
pub mod codec;
mod connection;
mod limits;
mod login;
mod protocol;
mod provisioning;
mod session;
pub mod telemetry;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use twin_actors::FleetHandle;

use crate::codec::DisconnectCode;
use crate::connection::Context;
use crate::login::Transport;
use crate::session::Sessions;

/// Settings of the MQTT endpoint.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Largest packet a device may send (AWS IoT: 128 KiB).
    pub max_packet_size: usize,
    /// Shadow requests one connection may have waiting for its twin (AWS IoT: 10).
    pub max_inflight_requests: usize,
    /// Unacknowledged QoS 1 messages to one device (the client's Receive Maximum may lower it).
    pub max_inflight_messages: u16,
    /// Messages kept for one session while its device is away or slow.
    pub max_queued_messages: usize,
    /// How long a persistent session outlives its connection, at most.
    pub session_expiry: Duration,
    /// Time allowed between TCP accept and CONNECT.
    pub connect_timeout: Duration,
    /// Largest keep-alive granted, in seconds (AWS IoT: 1200).
    pub max_keep_alive: u16,
    /// Concurrent connections; more are refused at accept.
    pub max_connections: usize,
    /// How devices on the TLS listener may log in (the plain listener takes passwords).
    pub tls_auth: TlsAuth,
    /// Publishes per second on one connection, up to as many at once (AWS IoT: 100); 0: no limit.
    pub max_publishes_per_second: u32,
    /// Connects per second per client id, up to [`CONNECT_BURST`] times as many at once
    /// (AWS IoT: 1); 0: no limit.
    pub max_connects_per_second: u32,
    /// The topics devices publish telemetry on.
    pub telemetry_topics: Arc<twin_model::telemetry::TelemetryTopics>,
}

/// Connects a client id may make at once, in units of `max_connects_per_second`.
pub const CONNECT_BURST: u32 = 10;

/// The login methods a TLS listener allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsAuth {
    /// A password when one is given, else the client certificate.
    #[default]
    Any,
    /// Only a registered client certificate (the password is not read): as AWS IoT.
    Certificate,
    /// Only the thing's secret as the MQTT password.
    Password,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 128 * 1024,
            max_inflight_requests: 10,
            max_inflight_messages: 100,
            max_queued_messages: 1000,
            session_expiry: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(10),
            max_keep_alive: 1200,
            max_connections: 1_000_000,
            tls_auth: TlsAuth::Any,
            max_publishes_per_second: 100,
            max_connects_per_second: 1,
            telemetry_topics: Arc::default(),
        }
    }
}

/// Where devices connect.
pub enum Listener {
    Plain(TcpListener),
    Tls(TcpListener, tokio_rustls::TlsAcceptor),
}

/// A running endpoint.
pub struct Gateway {
    addrs: Vec<(SocketAddr, bool)>,
    ctx: Arc<Context>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// Serves devices on `listeners` until [`Gateway::shutdown`].
    pub fn start(
        listeners: Vec<Listener>,
        fleet: FleetHandle,
        config: GatewayConfig,
    ) -> std::io::Result<Self> {
        let (stop, shutdown) = watch::channel(false);
        let ctx = Arc::new(Context {
            fleet,
            sessions: Sessions::new(config.max_queued_messages),
            connects: limits::ConnectLimits::new(
                config.max_connects_per_second,
                config.max_connects_per_second.saturating_mul(CONNECT_BURST),
            ),
            config,
            shutdown,
            ignored: Default::default(),
        });
        let mut addrs = Vec::new();
        let mut tasks = vec![tokio::spawn(sweep_sessions(ctx.clone()))];
        for listener in listeners {
            let (listener, tls) = match listener {
                Listener::Plain(l) => (l, None),
                Listener::Tls(l, acceptor) => (l, Some(acceptor)),
            };
            addrs.push((listener.local_addr()?, tls.is_some()));
            tasks.push(tokio::spawn(accept_loop(listener, tls, ctx.clone())));
        }
        Ok(Self {
            addrs,
            ctx,
            stop,
            tasks,
        })
    }

    /// The address of the first plain (`tls` false) or TLS listener.
    pub fn addr(&self, tls: bool) -> Option<SocketAddr> {
        self.addrs.iter().find(|(_, t)| *t == tls).map(|(a, _)| *a)
    }

    /// Stops accepting, tells every device (MQTT 5: DISCONNECT 0x8B) and waits for the
    /// connections to close.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let kicks = self
            .ctx
            .sessions
            .close_all(DisconnectCode::ServerShuttingDown, "server shutting down");
        for task in self.tasks {
            let _ = task.await;
        }
        for k in kicks {
            k.wait_finished(Duration::from_secs(5)).await;
        }
    }
}

/// Drops persistent sessions whose expiry has passed, and forgets the connect budgets
/// of client ids that have not connected for a while.
async fn sweep_sessions(ctx: Arc<Context>) {
    let mut shutdown = ctx.shutdown.clone();
    let mut sweep = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = sweep.tick() => {
                ctx.connects.sweep();
                let n = ctx.sessions.sweep(&ctx.fleet);
                if n > 0 {
                    tracing::debug!(expired = n, "expired persistent sessions");
                }
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    ctx: Arc<Context>,
) {
    let mut shutdown = ctx.shutdown.clone();
    let mut connections = JoinSet::new();
    let mut errors = accept::AcceptErrors::new(if tls.is_some() { "mqtts" } else { "mqtt" });
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    errors.accepted();
                    if connections.len() >= ctx.config.max_connections {
                        errors.refused(peer, ctx.config.max_connections);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let ctx = ctx.clone();
                    match tls.clone() {
                        None => {
                            connections.spawn(connection::serve(ctx, stream, peer, Transport::Plain));
                        }
                        Some(acceptor) => {
                            connections.spawn(async move {
                                match tokio::time::timeout(ctx.config.connect_timeout, acceptor.accept(stream)).await {
                                    Ok(Ok(stream)) => {
                                        let certificate = tls::client_certificate(stream.get_ref().1);
                                        connection::serve(ctx, stream, peer, Transport::Tls { certificate }).await;
                                    }
                                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                                    Err(_) => tracing::debug!(%peer, "no TLS handshake in time; closing"),
                                }
                            });
                        }
                    }
                }
                Err(e) => errors.failed(&e).await,
            }
        }
    }
    while connections.join_next().await.is_some() {}
}
