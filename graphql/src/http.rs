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

use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql::{Data, Response};
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::body::{Body, to_bytes};
use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};

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
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> axum::response::Response {
    let header_auth = authorization(&headers).map(str::to_owned);
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| {
            let tokens = app.tokens.clone();
            GraphQLWebSocket::new(socket, app.schema.clone(), protocol)
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
                })
                .serve()
        })
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
