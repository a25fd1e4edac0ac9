//! A GraphQL subscriber (`graphql-transport-ws`) that watches `thingsChanged` and tells
//! waiting tasks when a given report reaches it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context as _, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const QUERY: &str = "subscription { thingsChanged { __typename ... on ShadowChanged { thingId clientToken delta } ... on Lagged { skipped } } }";

/// Waiters by (thing, clientToken).
type Waiters = Arc<Mutex<HashMap<(String, String), oneshot::Sender<Instant>>>>;

pub struct Watcher {
    waiters: Waiters,
    task: tokio::task::JoinHandle<anyhow::Error>,
}

impl Watcher {
    /// Connects, authenticates and subscribes; returns once the subscription is live.
    pub async fn start(http: SocketAddr, token: Option<&str>) -> anyhow::Result<Self> {
        let mut request = format!("ws://{http}/graphql/ws").into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
        let stream = tokio::net::TcpStream::connect(http)
            .await
            .with_context(|| format!("connecting to {http}"))?;
        let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .context("WebSocket handshake on /graphql/ws")?;
        let init = match token {
            Some(t) => {
                json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {t}")}})
            }
            None => json!({"type": "connection_init"}),
        };
        ws.send(Message::text(init.to_string())).await?;
        expect(&mut ws, "connection_ack").await?;
        let subscribe = json!({"id": "1", "type": "subscribe", "payload": {"query": QUERY}});
        ws.send(Message::text(subscribe.to_string())).await?;
        let first = expect(&mut ws, "next").await?;
        if first["payload"]["data"]["thingsChanged"]["__typename"] != "Subscribed" {
            bail!("the subscription did not start: {first}");
        }
        let waiters = Waiters::default();
        let task = tokio::spawn(run(ws, waiters.clone()));
        Ok(Self { waiters, task })
    }

    /// A receiver that gets the instant the subscriber saw `thing` updated with
    /// `client_token` and in sync (no delta).
    pub fn converged(&self, thing: &str, client_token: &str) -> oneshot::Receiver<Instant> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((thing.to_owned(), client_token.to_owned()), tx);
        rx
    }

    /// Why the subscription ended, if it did.
    pub async fn failure(self) -> Option<anyhow::Error> {
        if !self.task.is_finished() {
            self.task.abort();
            return None;
        }
        self.task.await.ok()
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn expect(ws: &mut Socket, kind: &str) -> anyhow::Result<Value> {
    loop {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| anyhow!("the server closed the subscription socket"))??;
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t)?;
                if v["type"] == kind {
                    return Ok(v);
                }
                if v["type"] != "ping" && v["type"] != "pong" {
                    bail!("expected {kind}, got {v}");
                }
            }
            Message::Close(frame) => bail!(
                "the server closed the subscription socket: {}",
                frame.map(|f| f.reason.to_string()).unwrap_or_default()
            ),
            _ => {}
        }
    }
}

/// Reads events until the socket fails; returns why. Lagged ends the run: a waiter
/// whose event was skipped would wait in vain.
async fn run(mut ws: Socket, waiters: Waiters) -> anyhow::Error {
    loop {
        let event = match expect(&mut ws, "next").await {
            Ok(e) => e,
            Err(e) => return e,
        };
        let e = &event["payload"]["data"]["thingsChanged"];
        match e["__typename"].as_str() {
            Some("ShadowChanged") if e["delta"].is_null() => {
                let (Some(thing), Some(token)) = (e["thingId"].as_str(), e["clientToken"].as_str())
                else {
                    continue;
                };
                let waiter = waiters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(thing.to_owned(), token.to_owned()));
                if let Some(w) = waiter {
                    let _ = w.send(Instant::now());
                }
            }
            Some("Lagged") => return anyhow!("the subscriber lagged: {e}"),
            _ => {}
        }
    }
}
