//! The `doppel` binary's library half: configuration, the server wiring and the CLI's
//! commands, as functions the binary calls (and tests can call).

pub mod config;
pub mod http;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use twin_actors::FleetHandle;
use twin_gateway::{Gateway, Listener};
use twin_graphql::{Role, Tokens};
use twin_model::DeviceId;
use twin_store::{Committer, EmbeddedStore, ThingRecord, TwinStore, Write, now_millis};

pub use config::Config;

/// Runs the platform until `shutdown` completes, then stops cleanly: devices are told,
/// twins finish their mailboxes, the store is flushed.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if config.auto_register {
        tracing::warn!(
            "auto_register is on: unknown devices are registered when they connect and passwords are not checked; use it for development only"
        );
    }
    let store: Arc<dyn TwinStore> = Arc::new(
        EmbeddedStore::open(&config.data_dir, config.history_per_shadow)
            .with_context(|| format!("cannot open data_dir {}", config.data_dir.display()))?,
    );
    let (committer, commits) = Committer::start(store, 65_536, 8192);
    let fleet = FleetHandle::start(config.fleet(), committer).await?;

    let mut listeners = vec![Listener::Plain(listen(config.mqtt_listen).with_context(
        || format!("cannot listen on mqtt_listen {}", config.mqtt_listen),
    )?)];
    if let Some(addr) = config.mqtt_tls_listen {
        let read =
            |setting: &str, path: &Option<std::path::PathBuf>| -> anyhow::Result<Option<Vec<u8>>> {
                path.as_ref()
                    .map(|p| {
                        std::fs::read(p)
                            .with_context(|| format!("cannot read {setting} {}", p.display()))
                    })
                    .transpose()
            };
        let cert = read("tls_cert_file", &config.tls_cert_file)?.unwrap_or_default();
        let key = read("tls_key_file", &config.tls_key_file)?.unwrap_or_default();
        let ca = read("tls_client_ca_file", &config.tls_client_ca_file)?;
        let acceptor = twin_gateway::tls::acceptor(&cert, &key, ca.as_deref())
            .context("invalid TLS settings (tls_cert_file, tls_key_file, tls_client_ca_file)")?;
        listeners.push(Listener::Tls(
            listen(addr).with_context(|| format!("cannot listen on mqtt_tls_listen {addr}"))?,
            acceptor,
        ));
    }
    let resumed = fleet
        .resume_rollouts()
        .await
        .context("cannot resume the OTA rollouts under way")?;
    if resumed > 0 {
        tracing::info!(rollouts = resumed, "resumed OTA rollouts");
    }
    let ready = Arc::new(AtomicBool::new(true));
    let gateway = Gateway::start(listeners, fleet.clone(), config.gateway())?;
    let tokens =
        Arc::new(Tokens::open(&config.data_dir).context("cannot open the API token file")?);
    if let Some(admin) = tokens.first_admin()? {
        // Printed once, on the first start of a data directory; only its hash is kept.
        eprintln!(
            "\nFirst start: an admin API token was created. It is shown only this once:\n\n    {admin}\n\nUse it as `Authorization: Bearer <token>`; make more with `doppel token create`.\n"
        );
    }
    let signer = Arc::new(
        twin_graphql::Signer::open(&config.data_dir).context("cannot open the job-signing key")?,
    );
    let schema = twin_graphql::build(twin_graphql::Api {
        fleet: fleet.clone(),
        tokens: tokens.clone(),
        limits: config.api_limits(),
        signer,
    });
    let router = http::ops_router(ready.clone()).merge(twin_graphql::http::router(
        schema,
        tokens,
        config.graphql_max_body_bytes,
    ));
    let http = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on http_listen {}", config.http_listen))?;
    let http_addr = http.local_addr()?;
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_task = tokio::spawn(
        axum::serve(http, router)
            .with_graceful_shutdown(async {
                let _ = http_stopped.await;
            })
            .into_future(),
    );
    if let Some(addr) = gateway.addr(true) {
        let certs = if config.tls_client_ca_file.is_some() {
            "required"
        } else {
            "not requested"
        };
        tracing::info!("TLS client certificates {certs}");
        tracing::info!("mqtts listening on {addr}");
    }
    if let Some(addr) = gateway.addr(false) {
        tracing::info!("mqtt listening on {addr}");
    }
    tracing::info!("http listening on {http_addr}");
    tracing::info!(data_dir = %config.data_dir.display(), shards = config.shards, "doppel is ready");

    shutdown.await;
    tracing::info!("shutting down");
    ready.store(false, Ordering::SeqCst);
    gateway.shutdown().await;
    fleet.shutdown().await;
    drop(fleet);
    let _ = stop_http.send(());
    let _ = http_task.await;
    // The commit loop ends (after a final flush) once the last handle is gone.
    commits
        .await
        .map_err(|_| anyhow::anyhow!("the commit loop panicked"))?;
    tracing::info!("stopped; every accepted change is on disk");
    Ok(())
}

/// A listener with a deep accept queue: a connect storm overflows tokio's default of
/// 1024 pending connections, and every overflowed SYN costs its device a one-second
/// retransmission (the kernel caps the depth at net.core.somaxconn).
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(65_535)
}

/// `doppel device add`: registers a thing directly in the data directory and returns its
/// secret. Refused while a server holds the directory.
pub fn add_device(config: &Config, id: &str) -> anyhow::Result<String> {
    let id = DeviceId::parse(id)?;
    let store = EmbeddedStore::open(&config.data_dir, config.history_per_shadow)?;
    if store.thing(&id)?.is_some() {
        anyhow::bail!("thing {id} is already registered");
    }
    let (record, secret) = ThingRecord::new(id, now_millis())?;
    store.commit(&[Write::Thing(record)])?;
    Ok(secret)
}

/// `doppel token create`: a bearer token for the GraphQL API. Works while a server runs
/// (tokens are kept apart from the store).
pub fn create_token(
    config: &Config,
    role: Role,
    ttl_ms: Option<u64>,
    note: Option<String>,
) -> anyhow::Result<String> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let tokens = Tokens::open(&config.data_dir)?;
    Ok(tokens.create(role, ttl_ms, note)?.0)
}

/// `doppel signing-key`: the public key that verifies job documents (created with the
/// key on first use).
pub fn signing_key(config: &Config) -> anyhow::Result<String> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    Ok(twin_graphql::Signer::open(&config.data_dir)?.public_key())
}

/// `doppel device disable` / `enable`: a disabled device is refused at connect.
pub fn set_device_enabled(config: &Config, id: &str, enabled: bool) -> anyhow::Result<()> {
    let id = DeviceId::parse(id)?;
    let store = EmbeddedStore::open(&config.data_dir, config.history_per_shadow)?;
    let mut record = store
        .thing(&id)?
        .ok_or_else(|| anyhow::anyhow!("thing {id} is not registered"))?;
    record.enabled = enabled;
    store.commit(&[Write::Thing(record)])?;
    Ok(())
}

/// `doppel device list`: every registered thing, in id order.
pub fn list_devices(config: &Config) -> anyhow::Result<Vec<ThingRecord>> {
    let store = EmbeddedStore::open(&config.data_dir, config.history_per_shadow)?;
    let mut all = Vec::new();
    loop {
        let page = store.things(all.last().map(|r: &ThingRecord| &r.id), 1000)?;
        if page.is_empty() {
            return Ok(all);
        }
        all.extend(page);
    }
}
