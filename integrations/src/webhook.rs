//! One webhook attempt: a signed POST, its outcome, and the address rules.
//!
//! A destination is refused when it resolves to a non-public address (loopback,
//! private, link-local: the cloud metadata service, …) unless the setting
//! `webhook_allowed_networks` allows it. The check is made on the addresses the request
//! then connects to (a resolver of our own), so that a name that resolves differently
//! at delivery than at creation gains nothing. Redirects are not followed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use twin_model::route::{Network, may_send_to};

use crate::Message;

/// The longest part of a response body kept in the delivery log.
pub const SNIPPET_BYTES: usize = 256;

/// What the destination made of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx.
    Delivered,
    /// Anything else but 410: try again later.
    Retry,
    /// 410 Gone: the receiver asks for no more; the route is disabled.
    Gone,
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub verdict: Verdict,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub latency: Duration,
    /// The start of the response body, as text.
    pub response: Option<String>,
    /// What the receiver asked for with `Retry-After` on a 429 or 503.
    pub retry_after: Option<Duration>,
}

impl Attempt {
    /// It failed before any answer: try again later.
    pub fn failed(started: Instant, error: String) -> Self {
        Self {
            verdict: Verdict::Retry,
            status: None,
            error: Some(error),
            latency: started.elapsed(),
            response: None,
            retry_after: None,
        }
    }

    /// The destination took it.
    pub fn delivered(started: Instant, response: Option<String>) -> Self {
        Self {
            verdict: Verdict::Delivered,
            status: None,
            error: None,
            latency: started.elapsed(),
            response,
            retry_after: None,
        }
    }
}

/// Resolves names as the system does, keeping only the addresses webhooks may go to.
struct Guarded(Arc<[Network]>);

impl Resolve for Guarded {
    fn resolve(&self, name: Name) -> Resolving {
        let allowed = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ok: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| may_send_to(a.ip(), &allowed))
                .collect();
            if ok.is_empty() {
                let refused = all.first().map(|a| a.ip().to_string()).unwrap_or_default();
                return Err(format!(
                    "{host} resolves to a non-public address ({refused}); allow its network with the setting webhook_allowed_networks"
                )
                .into());
            }
            let addrs: Addrs = Box::new(ok.into_iter());
            Ok(addrs)
        })
    }
}

#[derive(Clone)]
pub struct WebhookClient {
    client: reqwest::Client,
    allowed: Arc<[Network]>,
}

impl WebhookClient {
    pub fn new(allowed: Vec<Network>) -> Result<Self, String> {
        let allowed: Arc<[Network]> = allowed.into();
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) =
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if added == 0 {
            tracing::warn!("no CA certificates on this system: https:// webhooks will fail");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(Guarded(allowed.clone())))
            .user_agent(concat!("doppel-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot make the webhook client: {e}"))?;
        Ok(Self { client, allowed })
    }

    /// POSTs the event to `url` and says what came of it.
    pub async fn send(&self, url: &str, timeout: Duration, message: &Message) -> Attempt {
        let started = Instant::now();
        if let Some(ip) = literal_ip(url)
            && !may_send_to(ip, &self.allowed)
        {
            return Attempt::failed(
                started,
                format!(
                    "{ip} is not a public address; allow its network with the setting webhook_allowed_networks"
                ),
            );
        }
        let sent = self
            .client
            .post(url)
            .timeout(timeout)
            .header("content-type", "application/json")
            .header("webhook-id", &message.id)
            .header("webhook-timestamp", message.timestamp.to_string())
            .header("webhook-signature", &message.signature)
            .body(message.body.clone())
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => return Attempt::failed(started, describe(&e)),
        };
        let status = response.status().as_u16();
        let retry_after = if matches!(status, 429 | 503) {
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(crate::schedule::retry_after)
        } else {
            None
        };
        let snippet = snippet(response).await;
        Attempt {
            verdict: match status {
                200..=299 => Verdict::Delivered,
                410 => Verdict::Gone,
                _ => Verdict::Retry,
            },
            status: Some(status),
            error: None,
            latency: started.elapsed(),
            response: snippet,
            retry_after,
        }
    }
}

/// The start of a response body (at most [`SNIPPET_BYTES`], read no further).
async fn snippet(mut response: reqwest::Response) -> Option<String> {
    let mut body = Vec::new();
    while body.len() < SNIPPET_BYTES {
        match tokio::time::timeout(Duration::from_secs(1), response.chunk()).await {
            Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(SNIPPET_BYTES);
    (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned())
}

fn literal_ip(url: &str) -> Option<IpAddr> {
    match url::Url::parse(url).ok()?.host()? {
        url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        url::Host::Domain(_) => None,
    }
}

/// A transport error, with its causes (reqwest's own message is only the outermost).
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut out = what.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
