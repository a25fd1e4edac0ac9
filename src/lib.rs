//! The `doppel` binary's library half: configuration, the server wiring and the CLI's
//! commands, as functions the binary calls (and tests can call).

pub mod cli;
pub mod cluster;
pub mod config;
pub mod http;
pub mod http_server;
pub mod logging;
pub mod telemetry;

use std::future::Future;
use std::io::IsTerminal as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use twin_actors::FleetHandle;
use twin_gateway::{Gateway, Listener};
use twin_graphql::Tokens;
use twin_store::scylla::ScyllaStore;
use twin_store::{Committer, EmbeddedStore, TokenStore, TwinStore};

pub use cli::{
    AUDIT_INBOX, Imported, IssuedCertificate, add_device, create_token, import_devices,
    init_device_ca, issue_certificate, list_devices, migrate, migration, set_device_enabled,
    signing_key, verify_audit,
};
pub use config::{Config, StoreKind};

/// The commit this binary was built from (set by `build.rs`; rustdoc's builds of the
/// doc tests do not get it).
pub const COMMIT: &str = match option_env!("DOPPEL_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// The version and the commit this binary was built from (`doppel --version`).
pub fn version() -> &'static str {
    static VERSION: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("{} (commit {COMMIT})", env!("CARGO_PKG_VERSION")));
    &VERSION
}

/// Runs the platform until `shutdown` completes, then stops cleanly: devices are told,
/// twins finish their mailboxes, the store is flushed.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    if config.auto_register {
        tracing::warn!(
            "auto_register is on: unknown devices are registered when they connect and passwords are not checked; use it for development only"
        );
    }
    raise_open_file_limit(&config);
    let stores = open_store(&config).await?;
    let joining = match (config.cluster()?, &stores.scylla) {
        (Some(node), Some(store)) => Some(
            twin_cluster::node::Joining::new(node, store)
                .await
                .context("cannot join the cluster")?,
        ),
        _ => None,
    };
    let (committer, commits) = Committer::start(stores.twins, 65_536, 8192);
    let store_reachable = committer.store_reachable();
    committer.probe(std::time::Duration::from_secs(1));
    let fleet = FleetHandle::start(config.fleet(), committer).await?;
    let deliveries = twin_integrations::Deliveries::start(fleet.clone(), config.deliveries()?)
        .map_err(|e| anyhow::anyhow!(e))?;

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
        let certificate_required = config.mqtt_tls_auth == config::TlsAuthSetting::Certificate;
        let acceptor =
            twin_gateway::tls::acceptor(&cert, &key, ca.as_deref(), certificate_required).context(
                "invalid TLS settings (tls_cert_file, tls_key_file, tls_client_ca_file)",
            )?;
        listeners.push(Listener::Tls(
            listen(addr).with_context(|| format!("cannot listen on mqtt_tls_listen {addr}"))?,
            acceptor,
        ));
    }
    let cluster = match joining {
        Some(joining) => Some(
            joining
                .start(fleet.clone())
                .await
                .context("cannot join the cluster")?,
        ),
        None => None,
    };
    let resumed = fleet
        .jobs()
        .rollouts_under_way(cluster.is_none())
        .await
        .context("cannot resume the OTA rollouts under way")?;
    if resumed > 0 && cluster.is_some() {
        tracing::warn!(
            rollouts = resumed,
            "OTA rollouts under way are not resumed on a cluster node yet (each would run on every node); see the README's \"Scaling out\""
        );
    } else if resumed > 0 {
        tracing::info!(rollouts = resumed, "resumed OTA rollouts");
    }
    let ready = Arc::new(AtomicBool::new(true));
    let readiness = http::Readiness {
        serving: ready.clone(),
        store: store_reachable,
        joined: cluster
            .as_ref()
            .map_or_else(|| Arc::new(AtomicBool::new(true)), |c| c.joined()),
    };
    let gateway = Gateway::start(listeners, fleet.clone(), config.gateway())?;
    let tokens = Arc::new(open_tokens(&config, stores.tokens).await?);
    if let Some(admin) = tokens.first_admin().await? {
        hand_over_first_admin_token(&config.data_dir, &admin)?;
    }
    let signer = Arc::new(
        twin_graphql::Signer::open(&config.data_dir).context("cannot open the job-signing key")?,
    );
    let schema = twin_graphql::build(twin_graphql::Api {
        fleet: fleet.clone(),
        tokens: tokens.clone(),
        limits: config.api_limits(),
        signer,
        cluster: cluster.as_ref().map(|c| {
            Arc::new(cluster::View(
                c.view(),
                config.node_id.clone().unwrap_or_default(),
            )) as Arc<dyn twin_graphql::cluster::ClusterView>
        }),
    });
    let (stop_subscriptions, subscriptions_stopping) = tokio::sync::watch::channel(false);
    let metrics = telemetry::registry(telemetry::Sampled {
        requests_in_flight: Box::new(fleet.requests_in_flight()),
        ready: Box::new(readiness.clone().check()),
    });
    let router = http::ops_router(readiness)
        .merge(telemetry::router(metrics.clone()))
        .merge(twin_graphql::http::router(
            schema,
            tokens,
            config.graphql_http(),
            subscriptions_stopping,
        ));
    let http = listen(config.http_listen)
        .with_context(|| format!("cannot listen on http_listen {}", config.http_listen))?;
    let http_addr = http.local_addr()?;
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_task = tokio::spawn(http_server::serve(
        http,
        router,
        config.http_limits(),
        async {
            let _ = http_stopped.await;
        },
    ));
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = match config.metrics_listen {
        Some(addr) => {
            let l =
                listen(addr).with_context(|| format!("cannot listen on metrics_listen {addr}"))?;
            tracing::info!("metrics listening on {}", l.local_addr()?);
            Some(tokio::spawn(http_server::serve(
                l,
                telemetry::router(metrics),
                config.http_limits(),
                async {
                    let _ = metrics_stopped.await;
                },
            )))
        }
        None => None,
    };
    if let Some(addr) = gateway.addr(true) {
        let certs = if config.tls_client_ca_file.is_some() {
            "required, issued by tls_client_ca_file"
        } else if config.mqtt_tls_auth == config::TlsAuthSetting::Certificate {
            "required"
        } else {
            "requested"
        };
        let auth = match config.mqtt_tls_auth {
            config::TlsAuthSetting::Any => "a password, else a registered certificate",
            config::TlsAuthSetting::Certificate => "a registered certificate",
            config::TlsAuthSetting::Password => "a password",
        };
        tracing::info!("TLS client certificates {certs}; devices log in with {auth}");
        tracing::info!("mqtts listening on {addr}");
    }
    if let Some(addr) = gateway.addr(false) {
        tracing::info!("mqtt listening on {addr}");
    }
    tracing::info!("http listening on {http_addr}");
    tracing::info!(data_dir = %config.data_dir.display(), shards = config.shards, "doppel is ready");

    let (stop_inbox, inbox_stopping) = tokio::sync::oneshot::channel::<()>();
    let inbox_task = tokio::spawn(audit_inbox(
        config.data_dir.clone(),
        fleet.clone(),
        inbox_stopping,
    ));

    let pruner = tokio::spawn(prune_telemetry(
        fleet.clone(),
        config.telemetry_retention()?,
    ));

    shutdown.await;
    tracing::info!("shutting down");
    ready.store(false, Ordering::SeqCst);
    pruner.abort();
    let _ = stop_inbox.send(());
    let _ = inbox_task.await;
    gateway.shutdown().await;
    if let Some(cluster) = cluster {
        cluster.leave().await;
    }
    deliveries.stop().await;
    fleet.shutdown().await;
    drop(fleet);
    let _ = stop_subscriptions.send(true);
    let _ = stop_http.send(());
    let _ = stop_metrics.send(());
    let _ = http_task.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    // The commit loop ends (after a final flush) once the last handle is gone.
    commits
        .await
        .map_err(|_| anyhow::anyhow!("the commit loop panicked"))?;
    tracing::info!("stopped; every accepted change is durable");
    Ok(())
}

/// Drops telemetry readings older than `retention`, at start and hourly.
async fn prune_telemetry(fleet: FleetHandle, retention: std::time::Duration) {
    let retention = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        hourly.tick().await;
        let before = fleet.now_millis().saturating_sub(retention);
        match fleet.telemetry().prune(before).await {
            Ok(0) => {}
            Ok(days) => tracing::info!(days, "pruned telemetry readings past telemetry_retention"),
            Err(e) => tracing::warn!(error = %e, "cannot prune old telemetry readings"),
        }
    }
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

/// An error and its causes on one line, each cause once: many errors already quote their
/// source in their own message ("cannot read x: File exists"), and printing the chain as
/// well would say it twice.
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// File descriptors kept for the store, logs and the like, besides connections.
const RESERVED_FILES: u64 = 256;

/// Raises the soft open-file limit to the hard one (each connection takes a descriptor),
/// logs both, and warns when they are short of what the connection caps need.
fn raise_open_file_limit(config: &Config) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    let mut raised = before;
    if before.current != before.maximum {
        raised.current = before.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-file limit to its hard limit");
            raised = before;
        }
    }
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    tracing::info!(
        soft = %show(raised.current),
        hard = %show(raised.maximum),
        was = %show(before.current),
        "open-file limit"
    );
    let needed = (config.mqtt_max_connections as u64)
        .saturating_add(config.http_max_connections as u64)
        .saturating_add(RESERVED_FILES);
    if let Some(limit) = raised.current
        && limit < needed
    {
        tracing::warn!(
            limit,
            needed,
            "the open-file limit is below mqtt_max_connections + http_max_connections + {RESERVED_FILES}: past it, new connections fail; raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower the caps"
        );
    }
}

/// The file the first admin token goes to when standard error is not a terminal.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Gives the first admin token to whoever started the server, never to the log: on the
/// terminal when standard error is one, otherwise in an owner-only file whose path (not
/// its content) is logged.
fn hand_over_first_admin_token(data_dir: &Path, token: &str) -> anyhow::Result<()> {
    if std::io::stderr().is_terminal() {
        eprintln!(
            "\nFirst start: an admin API token was created. It is shown only this once:\n\n    {token}\n\nUse it as `Authorization: Bearer <token>`; make more with `doppel token create`.\n"
        );
        return Ok(());
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot replace {}", path.display()));
        }
        _ => {}
    }
    twin_graphql::signing::write_private(&path, format!("{token}\n").as_bytes())
        .with_context(|| format!("cannot write the first admin token to {}", path.display()))?;
    tracing::info!(
        path = %path.display(),
        "first start: an admin API token was written to this file, readable by its owner only (standard error is not a terminal, so it is not printed); read it, then delete the file"
    );
    Ok(())
}

/// The stores `config` names.
#[derive(Clone)]
pub struct Stores {
    pub twins: Arc<dyn TwinStore>,
    /// The same store, when it is ScyllaDB (the cluster's tables are there too).
    pub scylla: Option<Arc<ScyllaStore>>,
    /// Where the API tokens are kept, when in the database (ScyllaDB); `None`: in
    /// `data_dir`'s `tokens.jsonl`.
    pub tokens: Option<Arc<dyn TokenStore>>,
}

/// The API tokens: in the database on ScyllaDB (shared by every node), in a file of
/// `data_dir` on the embedded store.
async fn open_tokens(
    config: &Config,
    in_database: Option<Arc<dyn TokenStore>>,
) -> anyhow::Result<Tokens> {
    Ok(match in_database {
        Some(store) => Tokens::in_database(store)
            .await
            .context("cannot read the API tokens from the database")?,
        None => Tokens::open(&config.data_dir).context("cannot open the API token file")?,
    })
}

/// The store `config` names: the embedded store in `data_dir` (created if missing), or
/// ScyllaDB at `scylla_nodes` (its schema created if missing; `data_dir` is created for
/// the job-signing key).
pub async fn open_store(config: &Config) -> anyhow::Result<Stores> {
    if config.store == StoreKind::Embedded && config.scylla_nodes.is_some() {
        tracing::warn!(
            "scylla_nodes is set but store is embedded: the embedded store is used (set store = scylla to use ScyllaDB)"
        );
    }
    Ok(match config.store {
        StoreKind::Embedded => Stores {
            twins: Arc::new(
                EmbeddedStore::open(&config.data_dir, config.history_per_shadow).with_context(
                    || format!("cannot open data_dir {}", config.data_dir.display()),
                )?,
            ),
            tokens: None,
            scylla: None,
        },
        StoreKind::Scylla => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
            let scylla = config.scylla()?;
            let store = ScyllaStore::connect(&scylla).await.with_context(|| {
                format!(
                    "cannot open the ScyllaDB store (scylla_nodes {}, scylla_keyspace {})",
                    scylla.nodes.join(","),
                    scylla.keyspace
                )
            })?;
            tracing::info!(nodes = %scylla.nodes.join(","), keyspace = %scylla.keyspace, "ScyllaDB store connected");
            let store = Arc::new(store);
            Stores {
                twins: store.clone(),
                tokens: Some(store.clone()),
                scylla: Some(store),
            }
        }
    })
}

/// The data directory of a command other than `serve`, which must already be one: a
/// mistyped path must not quietly become a new, empty installation.
pub fn existing_data_dir(config: &Config) -> anyhow::Result<&Path> {
    let dir = &config.data_dir;
    let ready = match config.store {
        StoreKind::Embedded => dir.join("fjall").is_dir(),
        StoreKind::Scylla => dir.is_dir(),
    };
    if !ready {
        let what = if dir.exists() {
            "is not a Doppel data directory (it holds no store)"
        } else {
            "does not exist"
        };
        anyhow::bail!(
            "data_dir {} {what}; check --data-dir (or DOPPEL_DATA_DIR, data_dir in the config file), or start `doppel serve --data-dir {}` once to create it",
            dir.display(),
            dir.display()
        );
    }
    Ok(dir)
}

/// Appends what CLI commands left in the audit inbox (see [`AUDIT_INBOX`]) to the audit
/// log, then removes it; the number of entries. A server that stops between the two
/// appends them again at its next start (at least once).
pub async fn drain_audit_inbox(dir: &Path, fleet: &FleetHandle) -> anyhow::Result<usize> {
    let dir = dir.to_owned();
    let taken = tokio::task::spawn_blocking(move || take_audit_inbox(&dir))
        .await
        .context("reading the audit inbox panicked")??;
    let Some((draining, text)) = taken else {
        return Ok(0);
    };
    let mut appended = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<twin_store::audit::Action>(line) {
            Ok(action) => {
                fleet.audit().append(action).await?;
                appended += 1;
            }
            Err(e) => {
                tracing::error!(error = %e, "a line of the audit inbox is not an action; left out")
            }
        }
    }
    tokio::task::spawn_blocking(move || std::fs::remove_file(&draining))
        .await
        .context("removing the audit inbox panicked")?
        .context("cannot remove the drained audit inbox")?;
    Ok(appended)
}

/// Moves the audit inbox aside (unless one moved aside is still there, from a server
/// that stopped while draining it) and reads it: its path and text; `None` when empty.
fn take_audit_inbox(dir: &Path) -> anyhow::Result<Option<(std::path::PathBuf, String)>> {
    let inbox = dir.join(AUDIT_INBOX);
    let draining = dir.join(format!("{AUDIT_INBOX}.draining"));
    if !draining.exists() {
        match std::fs::rename(&inbox, &draining) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context("cannot take the audit inbox"),
        }
    }
    let text = std::fs::read_to_string(&draining).context("cannot read the audit inbox")?;
    Ok(Some((draining, text)))
}

/// How often a server looks for CLI commands' audit entries in the inbox.
const AUDIT_INBOX_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Drains the audit inbox at start and every [`AUDIT_INBOX_EVERY`] until `stop`.
async fn audit_inbox(
    dir: std::path::PathBuf,
    fleet: FleetHandle,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(AUDIT_INBOX_EVERY);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => match drain_audit_inbox(&dir, &fleet).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(entries = n, "appended the CLI's actions to the audit log"),
                Err(e) => tracing::error!(error = %error_chain(&e), "the audit inbox was not drained"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot write {path}: {source}")]
    struct Quoting {
        path: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(17);
        let e = anyhow::Error::new(Quoting {
            path: "/d/k",
            source: io,
        })
        .context("cannot open the job-signing key");
        let text = error_chain(&e);
        assert_eq!(text.matches("os error 17").count(), 1, "{text}");
        assert!(
            text.starts_with("cannot open the job-signing key: cannot write /d/k: "),
            "{text}"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&plain), "outer: inner");
    }
}
