//! The operations endpoints: `/healthz` (the process runs) and `/readyz` (it serves).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

/// What `/readyz` checks: `serving` is false once the server is stopping; `store` while
/// the store cannot be reached (see `twin_store::Committer::store_reachable`); `joined`
/// until a cluster node's first keeper round (always true on a single node).
#[derive(Clone)]
pub struct Readiness {
    pub serving: Arc<AtomicBool>,
    pub store: Arc<AtomicBool>,
    pub joined: Arc<AtomicBool>,
}

impl Readiness {
    /// Why the server is not ready, or `None` when it is.
    fn not_ready(&self) -> Option<&'static str> {
        if !self.serving.load(Ordering::SeqCst) {
            Some("shutting down\n")
        } else if !self.store.load(Ordering::SeqCst) {
            Some("store unavailable\n")
        } else if !self.joined.load(Ordering::Acquire) {
            Some("joining the cluster\n")
        } else {
            None
        }
    }

    /// Whether `/readyz` answers 200 now (for the `doppel_ready` metric).
    pub fn check(self) -> impl Fn() -> bool + Send + Sync + 'static {
        move || self.not_ready().is_none()
    }
}

pub fn ops_router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(readiness)
}

async fn readyz(State(readiness): State<Readiness>) -> (StatusCode, &'static str) {
    match readiness.not_ready() {
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
        None => (StatusCode::OK, "ready\n"),
    }
}
