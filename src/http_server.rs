//! The HTTP server: hyper's HTTP/1.1 connections, with the limits a public endpoint needs.
//!
//! - **Header timeout**: a request's headers must arrive within `header_timeout` of the
//!   connection's start, or of their first byte on a kept-alive connection.
//! - **Idle timeout**: a kept-alive connection with no request is closed after
//!   `idle_timeout`.
//! - **Body timeout**: a request body must arrive whole within `body_timeout` of its
//!   headers; a late one fails with an I/O `TimedOut` error that the handler answers
//!   (GraphQL: 408).
//! - **A cap on connections**, `max_connections`, apart from the MQTT endpoint's own, so
//!   that neither listener can take the other's file descriptors. At the cap, a new
//!   connection takes the place of the oldest *idle* one (waiting for its first request or
//!   kept alive between requests: nothing is lost by closing it, as nginx does), once that
//!   one's socket is closed; when every connection is busy, it is answered `503` and closed. A flood of idle sockets therefore
//!   never locks out `/healthz` or a real client.
//! - WebSocket connections (subscriptions) leave these timers after their upgrade: the
//!   GraphQL socket pings its client and closes a silent one itself.
//! - Accept errors (out of file descriptors) back off and are logged at a bounded rate.
//!
//! Over 600 lines with its unit tests: the code itself is 500 lines; each timer's test sits next
//! to it.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use twin_gateway::accept::AcceptErrors;

/// The limits of the HTTP listener.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
}

/// What the server answers when every connection is busy.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 62\r\n\r\nevery HTTP connection is busy (http_max_connections); retry\n";

/// How long a new connection waits for the idle one it replaces to close.
const EVICTION_WAIT: Duration = Duration::from_millis(100);

/// Refused connections being answered at once; past that, they are just closed.
const MAX_REFUSING: usize = 64;

/// Answers a connection refused at the cap with [`BUSY`]. The request is read (up to 8 KiB,
/// for at most a second) before the socket closes: closing it with the request unread
/// would reset the connection and lose the answer.
fn refuse(mut stream: TcpStream, refusing: &Arc<tokio::sync::Semaphore>) {
    let Ok(permit) = refusing.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let _permit = permit;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(BUSY).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 8192];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, io::Error>(())
        })
        .await;
    });
}

/// How long connections may take to finish their requests at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `shutdown` completes, then lets the connections
/// finish their requests (at most [`DRAIN`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let limits = Arc::new(limits);
    let open = Arc::new(AtomicUsize::new(0));
    let idle = Arc::new(IdleConnections::default());
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut errors = AcceptErrors::new("http");
    let refusing = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    errors.accepted();
                    if open.load(Ordering::Acquire) >= limits.max_connections {
                        let Some(evicted) = idle.evict_oldest() else {
                            errors.refused(peer, limits.max_connections);
                            refuse(stream, &refusing);
                            continue;
                        };
                        // Its socket is closed before the new one is served, so that a flood
                        // never holds more descriptors than the cap (it may have turned busy
                        // meanwhile and stay: then the cap is passed by one, for a moment).
                        let _ = tokio::time::timeout(EVICTION_WAIT, evicted.closed.notified()).await;
                    }
                    let _ = stream.set_nodelay(true);
                    let slot = idle.admit();
                    let io = Guarded::new(stream, slot.clone(), Admission::new(open.clone()), &limits);
                    connections.spawn(connection(io, peer, slot, router.clone(), limits.clone(), idle.clone(), stopping.clone()));
                }
                Err(e) => errors.failed(&e).await,
            }
        }
    }
    let _ = stop.send(true);
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "HTTP connections still busy after {DRAIN:?}; closing them"
        );
        connections.abort_all();
    }
}

async fn connection(
    io: Guarded,
    peer: SocketAddr,
    slot: Arc<Slot>,
    router: Router,
    limits: Arc<HttpLimits>,
    idle: Arc<IdleConnections>,
    mut stopping: watch::Receiver<bool>,
) {
    let service = {
        let slot = slot.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let request = request.map(|body| {
                Body::new(TimedBody {
                    inner: body,
                    deadline: Box::pin(tokio::time::sleep(limits.body_timeout)),
                    limit: limits.body_timeout,
                })
            });
            let busy = Busy::begin(slot.clone());
            let mut router = router.clone();
            async move {
                let response = tower_service::Service::call(&mut router, request).await?;
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    busy.slot.upgraded.store(true, Ordering::Release);
                }
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    Body::new(BusyBody {
                        inner: body,
                        _busy: busy,
                    })
                }))
            }
        })
    };
    let mut conn = Box::pin(
        hyper::server::conn::http1::Builder::new()
            .header_read_timeout(None)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades(),
    );
    let mut stop_requested = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended");
                }
                break;
            }
            () = slot.evict.notified() => {
                // Evicted for a newer connection: only while no request runs.
                if slot.is_idle() {
                    tracing::debug!(%peer, "idle HTTP connection closed to make room");
                    break;
                }
            }
            changed = stopping.changed(), if !stop_requested => {
                stop_requested = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
    idle.remove(slot.id);
    // Closes the socket (unless it was upgraded: then it lives on with its WebSocket).
    drop(conn);
    slot.closed.notify_one();
}

/// One connection's state, shared by its IO, its requests and the eviction list.
struct Slot {
    id: u64,
    /// Requests being answered (the response body not yet sent whole).
    busy: AtomicUsize,
    /// Requests answered so far; a change starts the idle timer.
    answered: AtomicU64,
    /// Upgraded to another protocol (WebSocket): no HTTP timers, never evicted.
    upgraded: AtomicBool,
    evict: Notify,
    /// Notified once the connection has let go of its socket.
    closed: Notify,
    /// The reader waiting on the socket: woken when a request ends, to start the idle timer.
    reader: AtomicWaker,
}

impl Slot {
    fn is_idle(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0 && !self.upgraded.load(Ordering::Acquire)
    }
}

/// The open connections in the order they came, for evicting the oldest idle one.
#[derive(Default)]
struct IdleConnections {
    next_id: AtomicU64,
    slots: Mutex<BTreeMap<u64, Arc<Slot>>>,
}

impl IdleConnections {
    fn admit(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            busy: AtomicUsize::new(0),
            answered: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
            evict: Notify::new(),
            closed: Notify::new(),
            reader: AtomicWaker::new(),
        });
        self.lock().insert(slot.id, slot.clone());
        slot
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Tells the oldest idle connection to close and returns it; None when every one is
    /// busy.
    fn evict_oldest(&self) -> Option<Arc<Slot>> {
        let mut slots = self.lock();
        let id = slots.values().find(|s| s.is_idle()).map(|s| s.id)?;
        let slot = slots.remove(&id).expect("the slot was just found");
        slot.evict.notify_one();
        Some(slot)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts an open connection until its socket is closed (for an upgraded connection,
/// when the WebSocket ends, long after hyper let go of it).
struct Admission(Arc<AtomicUsize>);

impl Admission {
    fn new(open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        Self(open)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Marks its connection busy from a request's headers until its response is sent.
struct Busy {
    slot: Arc<Slot>,
}

impl Busy {
    fn begin(slot: Arc<Slot>) -> Self {
        slot.busy.fetch_add(1, Ordering::AcqRel);
        Self { slot }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.slot.answered.fetch_add(1, Ordering::AcqRel);
        self.slot.busy.fetch_sub(1, Ordering::AcqRel);
        self.slot.reader.wake();
    }
}

/// A response body that keeps its connection busy until it is sent or dropped.
struct BusyBody {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for BusyBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails with `TimedOut` when it is not whole by its deadline.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    limit: Duration,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(io::Error::other)));
        }
        ready!(self.deadline.as_mut().poll(cx));
        Poll::Ready(Some(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the request body did not arrive within {} s (setting http_body_timeout_secs)",
                self.limit.as_secs_f64()
            ),
        ))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Which timer a connection's reads are under.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Waiting {
    /// For the rest of a request's headers.
    Headers,
    /// For the next request on a kept-alive connection.
    NextRequest,
    /// Nothing: a request is being answered, or the connection was upgraded.
    Off,
}

/// The socket, with the header and idle timers on its reads.
struct Guarded {
    stream: TcpStream,
    slot: Arc<Slot>,
    waiting: Waiting,
    answered: u64,
    deadline: Pin<Box<Sleep>>,
    header_timeout: Duration,
    idle_timeout: Duration,
    _admission: Admission,
}

impl Guarded {
    fn new(stream: TcpStream, slot: Arc<Slot>, admission: Admission, limits: &HttpLimits) -> Self {
        Self {
            stream,
            slot,
            waiting: Waiting::Headers,
            answered: 0,
            deadline: Box::pin(tokio::time::sleep(limits.header_timeout)),
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            _admission: admission,
        }
    }

    fn arm(&mut self, waiting: Waiting, after: Duration) {
        self.waiting = waiting;
        self.deadline.as_mut().reset(Instant::now() + after);
    }

    /// Brings the timer up to date with the connection's requests.
    fn update(&mut self) {
        let answered = self.slot.answered.load(Ordering::Acquire);
        if !self.slot.is_idle() {
            self.waiting = Waiting::Off;
        } else if answered != self.answered || self.waiting == Waiting::Off {
            self.answered = answered;
            self.arm(Waiting::NextRequest, self.idle_timeout);
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.update();
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if self.waiting == Waiting::NextRequest && buf.filled().len() > before {
                    let after = self.header_timeout;
                    self.arm(Waiting::Headers, after);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.slot.reader.register(cx.waker());
                if self.waiting != Waiting::Off && self.deadline.as_mut().poll(cx).is_ready() {
                    let (what, setting) = match self.waiting {
                        Waiting::Headers => {
                            ("no complete request headers", "http_header_timeout_secs")
                        }
                        _ => (
                            "no new request on an idle connection",
                            "http_idle_timeout_secs",
                        ),
                    };
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{what} in time (setting {setting})"),
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const WAIT: Duration = Duration::from_secs(20);

    struct Running {
        addr: SocketAddr,
        /// One message each time a `/hold` request starts; it never ends.
        held: tokio::sync::mpsc::UnboundedReceiver<()>,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    async fn start(limits: HttpLimits) -> Running {
        let (hold, held) = tokio::sync::mpsc::unbounded_channel();
        let router = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/hold",
                get(move || {
                    let _ = hold.send(());
                    std::future::pending::<&'static str>()
                }),
            )
            .route(
                "/echo",
                post(|body: Body| async move {
                    match axum::body::to_bytes(body, 1 << 20).await {
                        Ok(b) => (StatusCode::OK, b.to_vec()),
                        Err(e) => (StatusCode::REQUEST_TIMEOUT, e.to_string().into_bytes()),
                    }
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, router, limits, async {
            let _ = stopped.await;
        }));
        Running {
            addr,
            held,
            _stop: stop,
        }
    }

    fn limits(max_connections: usize) -> HttpLimits {
        HttpLimits {
            max_connections,
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            body_timeout: Duration::from_secs(1),
        }
    }

    /// Reads until the server closes the socket; the time it took.
    async fn closed_after(mut s: TcpStream) -> Duration {
        let start = Instant::now();
        let mut sink = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut sink))
            .await
            .expect("the server closes the connection")
            .ok();
        start.elapsed()
    }

    async fn get_healthz(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut out))
            .await
            .expect("an answer")
            .unwrap();
        out
    }

    #[tokio::test]
    async fn silent_and_half_sent_requests_are_closed_at_the_header_timeout() {
        let server = start(limits(100)).await;
        let addr = server.addr;
        let silent = TcpStream::connect(addr).await.unwrap();
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let (a, b) = tokio::join!(closed_after(silent), closed_after(half));
        for took in [a, b] {
            assert!(
                took >= Duration::from_millis(900) && took < Duration::from_secs(5),
                "{took:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_after_the_idle_timeout() {
        let server = start(limits(100)).await;
        let addr = server.addr;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // Idle, not under the (shorter) header timeout.
        let took = closed_after(s).await;
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_body_that_stalls_gets_a_timeout_naming_the_setting() {
        let server = start(limits(100)).await;
        let addr = server.addr;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        assert!(out.contains("http_body_timeout_secs"), "{out}");
    }

    #[tokio::test]
    async fn idle_connections_at_the_cap_make_room_for_new_ones() {
        let server = start(limits(10)).await;
        let addr = server.addr;
        let mut idle = Vec::new();
        for _ in 0..50 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        assert!(get_healthz(addr).await.starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn busy_connections_at_the_cap_get_503() {
        let mut server = start(limits(2)).await;
        let addr = server.addr;
        // Two requests being answered: busy, not idle.
        let mut busy = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            busy.push(s);
            tokio::time::timeout(WAIT, server.held.recv())
                .await
                .expect("the request reaches its handler");
        }
        let answer = get_healthz(addr).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("http_max_connections"), "{answer}");
    }
}
