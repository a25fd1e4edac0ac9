//! The HTTP side: `POST /graphql`, GraphiQL on `GET /graphql` (its assets embedded, so
//! it works offline), and subscriptions over WebSocket on `/graphql/ws`.
//!
//! Whole-request failures answer with a GraphQL error body and an HTTP status: a missing
//! or bad token 401 (`UNAUTHENTICATED`), a body over the limit 413
//! (`PAYLOAD_TOO_LARGE`), a body that is not a GraphQL request 400
//! (`INVALID_ARGUMENT`). WebSocket clients send their token in `connection_init`'s
//! payload (`{"Authorization": "Bearer ..."}`) or in the upgrade request's header;
//! without one the socket is closed with the reason `UNAUTHENTICATED: ...`.

use std::sync::Arc;

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
use tokio::sync::mpsc;

use crate::auth::Tokens;
use crate::error::{self, ApiError, Code};
use crate::schema::DoppelSchema;

#[derive(Clone)]
struct App {
    schema: DoppelSchema,
    tokens: Arc<Tokens>,
    max_body_bytes: usize,
}

/// The GraphQL routes over a built schema.
pub fn router(schema: DoppelSchema, tokens: Arc<Tokens>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/graphql", get(graphiql).post(execute))
        .route("/graphql/ws", get(subscribe))
        .route("/graphql/assets/{file}", get(asset))
        .with_state(App {
            schema,
            tokens,
            max_body_bytes,
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
    let principal = match app.tokens.authenticate(authorization(&headers)) {
        Ok(p) => p,
        Err(e) => return failure(StatusCode::UNAUTHORIZED, e),
    };
    let bytes = match to_bytes(body, app.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            let e = ApiError::new(
                Code::PayloadTooLarge,
                format!(
                    "the request body is larger than {} bytes",
                    app.max_body_bytes
                ),
            );
            return failure(StatusCode::PAYLOAD_TOO_LARGE, e);
        }
    };
    let request: async_graphql::Request = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            let e = ApiError::invalid(format!(
                "the body must be a GraphQL request as JSON ({{\"query\": ...}}): {e}"
            ));
            return failure(StatusCode::BAD_REQUEST, e);
        }
    };
    let response: Response = app.schema.execute(request.data(principal)).await;
    Json(response).into_response()
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
                    .map_err(|e| {
                        async_graphql::Error::new(format!("{}: {}", e.code.as_str(), e.message))
                    })?;
                let mut data = Data::default();
                data.insert(principal);
                Ok(data)
            });
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    if input.try_send(text.as_str().as_bytes().to_vec()).is_err() {
                        let _ = socket.send(close(4429, "too many messages")).await;
                        return;
                    }
                }
                Some(Ok(Message::Binary(bytes))) => {
                    if input.try_send(bytes.to_vec()).is_err() {
                        let _ = socket.send(close(4429, "too many messages")).await;
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            outgoing = machine.next() => {
                let msg = match outgoing {
                    Some(WsMessage::Text(text)) => Message::Text(text.into()),
                    Some(WsMessage::Close(code, reason)) => close(code, &reason),
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
