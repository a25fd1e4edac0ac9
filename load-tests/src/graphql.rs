//! A minimal GraphQL-over-HTTP/1.1 client: one kept-alive connection, `POST /graphql`
//! with a bearer token, JSON in and out. Enough for load generation without an HTTP
//! stack; `Pool` shares a few connections among many simulated operators.

use std::net::SocketAddr;

use anyhow::{Context as _, anyhow, bail};
use bytes::{Buf, BytesMut};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};

/// Largest response accepted (a page of 100 things with their shadows fits easily).
const MAX_RESPONSE: usize = 64 << 20;

/// A GraphQL error with its `extensions.code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct GraphQlError {
    pub code: String,
    pub message: String,
}

pub struct Connection {
    stream: TcpStream,
    server: SocketAddr,
    authorization: Option<String>,
    rbuf: BytesMut,
}

impl Connection {
    pub async fn connect(server: SocketAddr, token: Option<&str>) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(server)
            .await
            .with_context(|| format!("connecting to {server}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            server,
            authorization: token.map(|t| format!("Authorization: Bearer {t}\r\n")),
            rbuf: BytesMut::with_capacity(4096),
        })
    }

    /// Runs one operation. A transport or HTTP failure is an `anyhow` error; an answer
    /// with GraphQL errors is a [`GraphQlError`] (the first one) inside it, so callers
    /// can tell a refusal from a broken connection.
    pub async fn execute(&mut self, query: &str, variables: Value) -> anyhow::Result<Value> {
        let body = serde_json::to_vec(&json!({"query": query, "variables": variables}))?;
        let head = format!(
            "POST /graphql HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{}Content-Length: {}\r\n\r\n",
            self.server,
            self.authorization.as_deref().unwrap_or(""),
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        self.stream.write_all(&request).await?;
        let (status, body) = self.response().await?;
        let answer: Value = serde_json::from_slice(&body)
            .with_context(|| format!("HTTP {status}: the body is not JSON"))?;
        if let Some(e) = answer["errors"].as_array().and_then(|e| e.first()) {
            return Err(anyhow!(GraphQlError {
                code: e["extensions"]["code"]
                    .as_str()
                    .unwrap_or("NONE")
                    .to_owned(),
                message: e["message"].as_str().unwrap_or("").to_owned(),
            }));
        }
        if status != 200 {
            bail!("HTTP {status} without GraphQL errors");
        }
        Ok(answer["data"].clone())
    }

    /// Reads one response with a `Content-Length` body.
    async fn response(&mut self) -> anyhow::Result<(u16, Vec<u8>)> {
        let header_end = loop {
            if let Some(i) = find(&self.rbuf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.rbuf[..header_end])
            .context("response headers are not UTF-8")?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("bad status line"))?;
        let length = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .ok_or_else(|| anyhow!("HTTP {status} without Content-Length"))?;
        if length > MAX_RESPONSE {
            bail!("a {length}-byte response is more than this client reads");
        }
        self.rbuf.advance(header_end);
        while self.rbuf.len() < length {
            self.fill().await?;
        }
        Ok((status, self.rbuf.split_to(length).to_vec()))
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            bail!("connection closed by the server");
        }
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Up to `size` connections shared by any number of tasks; a connection that fails is
/// dropped and replaced on next use.
pub struct Pool {
    server: SocketAddr,
    token: Option<String>,
    idle: Mutex<Vec<Connection>>,
    gate: Semaphore,
}

impl Pool {
    pub fn new(server: SocketAddr, token: Option<String>, size: usize) -> Self {
        Self {
            server,
            token,
            idle: Mutex::new(Vec::new()),
            gate: Semaphore::new(size.max(1)),
        }
    }

    pub async fn execute(&self, query: &str, variables: Value) -> anyhow::Result<Value> {
        let _permit = self.gate.acquire().await?;
        let idle = self.idle.lock().await.pop();
        let mut conn = match idle {
            Some(c) => c,
            None => Connection::connect(self.server, self.token.as_deref()).await?,
        };
        let result = conn.execute(query, variables).await;
        // A GraphQL refusal leaves the connection usable; anything else may not.
        if result.is_ok() || result.as_ref().is_err_and(|e| e.is::<GraphQlError>()) {
            self.idle.lock().await.push(conn);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot HTTP server that answers every request with `body`.
    async fn server(body: &'static str, status: u16) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 65536];
            let mut seen = Vec::new();
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
                // One response per complete request (headers and Content-Length body).
                while let Some(end) = find(&seen, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&seen[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .unwrap()
                        .parse()
                        .unwrap();
                    if seen.len() < end + 4 + len {
                        break;
                    }
                    assert!(head.contains("authorization: bearer t0k"), "{head}");
                    seen.drain(..end + 4 + len);
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    s.write_all(reply.as_bytes()).await.unwrap();
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn data_comes_back_over_one_kept_alive_connection() {
        let addr = server(r#"{"data":{"thing":{"id":"a"}}}"#, 200).await;
        let mut c = Connection::connect(addr, Some("t0k")).await.unwrap();
        for _ in 0..3 {
            let data = c.execute("{ thing(id: \"a\") { id } }", json!({})).await;
            assert_eq!(data.unwrap(), json!({"thing": {"id": "a"}}));
        }
    }

    #[tokio::test]
    async fn graphql_errors_carry_their_code() {
        let addr = server(
            r#"{"data":null,"errors":[{"message":"no such thing","extensions":{"code":"NOT_FOUND"}}]}"#,
            200,
        )
        .await;
        let pool = Pool::new(addr, Some("t0k".into()), 1);
        let e = pool.execute("{ x }", json!({})).await.unwrap_err();
        assert_eq!(
            e.downcast_ref::<GraphQlError>(),
            Some(&GraphQlError {
                code: "NOT_FOUND".into(),
                message: "no such thing".into()
            })
        );
        // The refusal left the connection in the pool, and it still works.
        assert!(pool.execute("{ x }", json!({})).await.is_err());
        assert_eq!(pool.idle.lock().await.len(), 1);
    }
}
