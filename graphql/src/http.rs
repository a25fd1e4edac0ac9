//! The HTTP side: `POST /graphql`, GraphiQL on `GET /graphql` (its assets embedded, so
//! it works offline), and subscriptions over WebSocket on `/graphql/ws`.
//!
//! Whole-request failures answer with a GraphQL error body and an HTTP status: a missing
//! or bad token 401 (`UNAUTHENTICATED`), a body over the limit 413
//! (`PAYLOAD_TOO_LARGE`), a body that did not arrive in time 408 (`TIMEOUT`), a body that
//! is not a GraphQL request, or a batch (a JSON array), 400 (`INVALID_ARGUMENT`).
//!
//! WebSocket clients send their token in `connection_init`'s payload
//! (`{"Authorization": "Bearer ..."}`) or in the upgrade request's header. On
//! `graphql-transport-ws`, a socket without a valid token is closed with 4401
//! (`UNAUTHENTICATED: ...`), one whose token may not subscribe with 4403, one that sends no
//! `connection_init` within [`HttpConfig::ws_init_timeout`] with 4408, as the protocol
//! says. Every socket is pinged each [`HttpConfig::ws_ping`] and closed (1001) when it has
//! sent nothing, not even a pong, for two of them: a vanished client does not hold its
//! subscriptions and file descriptor for ever.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::futures_util::{Stream, StreamExt};
use async_graphql::http::{ALL_WEBSOCKET_PROTOCOLS, WebSocketProtocols as Protocols, WsMessage};
use async_graphql::{Data, Response};
use axum::body::{Body, to_bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;
use twin_actors::telemetry::{OverloadCause, overloaded};
use twin_telemetry::trace::{self, TRACEPARENT};

use crate::auth::Tokens;
use crate::error::{self, ApiError, Code};
use crate::schema::DoppelSchema;

/// The limits of the GraphQL endpoints.
#[derive(Debug, Clone, Copy)]
pub struct HttpConfig {
    /// Largest request body (setting `graphql_max_body_bytes`).
    pub max_body_bytes: usize,
    /// How often a subscription socket is pinged (setting `http_ws_ping_secs`); silent
    /// for two of these, it is closed.
    pub ws_ping: Duration,
    /// Time from the upgrade to `connection_init` (setting `http_header_timeout_secs`).
    pub ws_init_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            ws_ping: Duration::from_secs(30),
            ws_init_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
struct App {
    schema: DoppelSchema,
    tokens: Arc<Tokens>,
    config: HttpConfig,
    stopping: watch::Receiver<bool>,
}

/// The GraphQL routes over a built schema. Subscription sockets are closed (1001) once
/// `stopping` turns true or its sender is gone: they would otherwise keep the server's
/// fleet alive after shutdown.
pub fn router(
    schema: DoppelSchema,
    tokens: Arc<Tokens>,
    config: HttpConfig,
    stopping: watch::Receiver<bool>,
) -> Router {
    Router::new()
        .route("/graphql", get(graphiql).post(execute))
        .route("/graphql/ws", get(subscribe))
        .route("/graphql/assets/{file}", get(asset))
        .with_state(App {
            schema,
            tokens,
            config,
            stopping,
        })
}

fn failure(status: StatusCode, e: ApiError) -> axum::response::Response {
    let mut response = (status, Json(error::response(e))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

async fn execute(
    State(app): State<App>,
    headers: HeaderMap,
    body: Body,
) -> axum::response::Response {
    let principal = match app.tokens.authenticate(authorization(&headers)).await {
        Ok(p) => p,
        Err(e) => {
            let status = match e.code {
                Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::UNAUTHORIZED,
            };
            return failure(status, e);
        }
    };
    let limit = app.config.max_body_bytes;
    let bytes = match to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => return body_failure(&e, limit),
    };
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        let e = ApiError::invalid(
            "batched requests (a JSON array) are not supported: send one {\"query\": ...} object per request",
        );
        return failure(StatusCode::BAD_REQUEST, e);
    }
    let request: async_graphql::Request = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            let e = ApiError::invalid(format!(
                "the body must be a GraphQL request as JSON ({{\"query\": ...}}): {e}"
            ));
            return failure(StatusCode::BAD_REQUEST, e);
        }
    };
    // A caller's `traceparent` header makes the request part of its trace: the twins'
    // spans and the deltas devices get (MQTT 5) continue it.
    let parent = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
    let span = trace::entry(parent, || {
        tracing::debug_span!(
            "graphql.request",
            operation = request.operation_name.as_deref()
        )
    });
    let response: Response = app
        .schema
        .execute(request.data(principal))
        .instrument(span)
        .await;
    Json(response).into_response()
}

/// Why a request body could not be read: too large (413), too slow (408, from the HTTP
/// server's body timeout), or cut off (400).
fn body_failure(e: &axum::Error, limit: usize) -> axum::response::Response {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            let e = ApiError::new(
                Code::PayloadTooLarge,
                format!(
                    "the request body is larger than {limit} bytes (setting graphql_max_body_bytes)"
                ),
            );
            return failure(StatusCode::PAYLOAD_TOO_LARGE, e);
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            let e = ApiError::new(Code::Timeout, io.to_string());
            return failure(StatusCode::REQUEST_TIMEOUT, e);
        }
        source = cause.source();
    }
    failure(
        StatusCode::BAD_REQUEST,
        ApiError::invalid(format!("the request body could not be read: {e}")),
    )
}

async fn subscribe(
    State(app): State<App>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> axum::response::Response {
    let header_auth = authorization(&headers).map(str::to_owned);
    let upgrade = upgrade.protocols(ALL_WEBSOCKET_PROTOCOLS);
    let Some(protocol) = upgrade
        .selected_protocol()
        .and_then(|p| p.to_str().ok())
        .and_then(|p| p.parse::<Protocols>().ok())
    else {
        let e = ApiError::invalid(
            "ask for the graphql-transport-ws (or legacy graphql-ws) WebSocket subprotocol",
        );
        return failure(StatusCode::BAD_REQUEST, e);
    };
    upgrade.on_upgrade(move |socket| serve_socket(app, socket, protocol, header_auth))
}

/// The close code for an ended protocol state machine: graphql-transport-ws's own codes
/// where async-graphql uses generic ones.
fn close_code(protocol: Protocols, code: u16, reason: &str) -> u16 {
    if protocol != Protocols::GraphQLWS {
        return code;
    }
    match code {
        1002 if reason.starts_with(Code::Unauthenticated.as_str()) => 4401,
        1002 if reason.starts_with(Code::Forbidden.as_str()) => 4403,
        // A subscribe before connection_ack.
        1011 => 4401,
        code => code,
    }
}

/// Client messages waiting for the protocol; a client that sends more is cut off.
const MAX_QUEUED_CLIENT_MESSAGES: usize = 64;

/// Runs one subscription socket: client messages go to async-graphql's protocol state
/// machine through a bounded queue, its output goes to the socket. One task owns the
/// socket whole (not split into halves), so a blocked write resumes as soon as the
/// client reads again.
async fn serve_socket(
    app: App,
    mut socket: WebSocket,
    protocol: Protocols,
    header_auth: Option<String>,
) {
    let (input, queued) = mpsc::channel::<Vec<u8>>(MAX_QUEUED_CLIENT_MESSAGES);
    let tokens = app.tokens.clone();
    let mut machine =
        async_graphql::http::WebSocket::new(app.schema.clone(), ReceiverStream(queued), protocol)
            .on_connection_init(move |payload| async move {
                let from_payload = ["Authorization", "authorization", "token"]
                    .iter()
                    .find_map(|k| payload.get(k).and_then(|v| v.as_str()))
                    .map(str::to_owned);
                let principal = tokens
                    .authenticate(from_payload.or(header_auth).as_deref())
                    .await
                    .map_err(|e| {
                        async_graphql::Error::new(format!("{}: {}", e.code.as_str(), e.message))
                    })?;
                let mut data = Data::default();
                data.insert(principal);
                Ok(data)
            });
    let ping_every = app.config.ws_ping;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let mut heard = tokio::time::Instant::now();
    let init_deadline = tokio::time::sleep(app.config.ws_init_timeout);
    tokio::pin!(init_deadline);
    let mut acked = false;
    let mut stopping = app.stopping.clone();
    loop {
        tokio::select! {
            _ = async { stopping.wait_for(|stop| *stop).await.map(|_| ()) } => {
                close_soon(&mut socket, 1001, "server shutting down").await;
                return;
            }
            () = &mut init_deadline, if !acked => {
                let reason = format!(
                    "no connection_init within {} s (setting http_header_timeout_secs)",
                    app.config.ws_init_timeout.as_secs_f64()
                );
                close_soon(&mut socket, 4408, &reason).await;
                return;
            }
            _ = ping.tick() => {
                if heard.elapsed() >= ping_every * 2 {
                    let reason = format!(
                        "nothing heard for {} s, not even a pong (setting http_ws_ping_secs)",
                        heard.elapsed().as_secs()
                    );
                    close_soon(&mut socket, 1001, &reason).await;
                    return;
                }
                if tokio::time::timeout(ping_every, socket.send(Message::Ping(Default::default()))).await.map_or(true, |r| r.is_err()) {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    heard = tokio::time::Instant::now();
                    if input.try_send(text.as_str().as_bytes().to_vec()).is_err() {
                        overloaded(OverloadCause::SubscriptionMessages);
                        let _ = socket.send(close(4429, "too many messages")).await;
                        return;
                    }
                }
                Some(Ok(Message::Binary(bytes))) => {
                    heard = tokio::time::Instant::now();
                    if input.try_send(bytes.to_vec()).is_err() {
                        overloaded(OverloadCause::SubscriptionMessages);
                        let _ = socket.send(close(4429, "too many messages")).await;
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => heard = tokio::time::Instant::now(),
            },
            outgoing = machine.next() => {
                let msg = match outgoing {
                    Some(WsMessage::Text(text)) => {
                        acked |= text.starts_with(r#"{"type":"connection_ack""#);
                        Message::Text(text.into())
                    }
                    Some(WsMessage::Close(code, reason)) => {
                        close(close_code(protocol, code, &reason), &reason)
                    }
                    None => return,
                };
                let closing = matches!(msg, Message::Close(_));
                if socket.send(msg).await.is_err() || closing {
                    return;
                }
            }
        }
    }
}

/// Sends a close frame, waiting at most a second for a client that does not read.
async fn close_soon(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close(code, reason))).await;
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// A bounded channel's receiving end as a stream.
struct ReceiverStream(mpsc::Receiver<Vec<u8>>);

impl Stream for ReceiverStream {
    type Item = Vec<u8>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Vec<u8>>> {
        self.0.poll_recv(cx)
    }
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Doppel GraphQL</title>
<link rel="stylesheet" href="/graphql/assets/graphiql.css">
<style>body { margin: 0; height: 100vh; } #graphiql { height: 100vh; }</style>
</head>
<body>
<div id="graphiql">Loading GraphiQL...</div>
<script src="/graphql/assets/react.js"></script>
<script src="/graphql/assets/react-dom.js"></script>
<script src="/graphql/assets/graphiql.js"></script>
<script>
  const url = location.origin + "/graphql";
  const subscriptionUrl = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/graphql/ws";
  // The headers editor's Authorization also authenticates subscriptions.
  const fetcher = (params, options) => GraphiQL.createFetcher({
    url, subscriptionUrl, wsConnectionParams: (options && options.headers) || {},
  })(params, options);
  ReactDOM.createRoot(document.getElementById("graphiql")).render(
    React.createElement(GraphiQL, {
      fetcher,
      defaultEditorToolsVisibility: "headers",
      defaultHeaders: '{"Authorization": "Bearer <your token>"}',
      defaultQuery: "{\n  things(first: 10) {\n    totalCount\n    edges { node { id connectivity { connected } shadow { reported delta version } } }\n  }\n}\n",
    }),
  );
</script>
</body>
</html>
"#;

async fn graphiql() -> Html<&'static str> {
    Html(PAGE)
}

/// GraphiQL 3.8.3 and React 18.3.1, gzipped (see `graphql/assets/update.sh`).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "graphiql.js",
        "text/javascript",
        include_bytes!("../assets/graphiql.js.gz"),
    ),
    (
        "graphiql.css",
        "text/css",
        include_bytes!("../assets/graphiql.css.gz"),
    ),
    (
        "react.js",
        "text/javascript",
        include_bytes!("../assets/react.js.gz"),
    ),
    (
        "react-dom.js",
        "text/javascript",
        include_bytes!("../assets/react-dom.js.gz"),
    ),
];

async fn asset(Path(file): Path<String>) -> axum::response::Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CONTENT_ENCODING, "gzip"),
                (header::CACHE_CONTROL, "public, max-age=86400"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}
