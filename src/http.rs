//! The operations endpoints: `/healthz` (the process runs) and `/readyz` (it serves).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

/// `serving` is false once the server is stopping; `store` while the store cannot be
/// reached (see `twin_store::Committer::store_reachable`).
pub fn ops_router(serving: Arc<AtomicBool>, store: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state((serving, store))
}

/// Whether `/readyz` answers 200 now (for the `doppel_ready` metric).
pub fn readiness(
    serving: Arc<AtomicBool>,
    store: Arc<AtomicBool>,
) -> impl Fn() -> bool + Send + Sync + 'static {
    move || serving.load(Ordering::SeqCst) && store.load(Ordering::SeqCst)
}

async fn readyz(
    State((serving, store)): State<(Arc<AtomicBool>, Arc<AtomicBool>)>,
) -> (StatusCode, &'static str) {
    if !serving.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if !store.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}
