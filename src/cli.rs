//! The CLI's commands that work on the data directory or the database: the device
//! registry, API tokens, the device CA and certificates, the audit log, the ScyllaDB
//! schema. Each changes the store through its own short-lived runtime, and what changes
//! something is appended to the audit log.

use std::path::Path;

use anyhow::Context as _;
use twin_graphql::{Role, Tokens};
use twin_model::DeviceId;
use twin_store::{ThingRecord, Write, now_millis};

use crate::config::{Config, StoreKind};
use crate::{Stores, error_chain, existing_data_dir, open_store, open_tokens};

/// `doppel migrate --dry-run`: the CQL that creates the ScyllaDB schema.
pub fn migration(config: &Config) -> anyhow::Result<Vec<String>> {
    if config.store != StoreKind::Scylla {
        anyhow::bail!(
            "doppel migrate is for store = scylla; the embedded store brings its layout up to date itself when it is opened"
        );
    }
    let scylla = config.scylla()?;
    Ok(twin_store::scylla::schema::statements(
        &scylla.keyspace,
        &scylla.replication,
    ))
}

/// `doppel migrate`: creates the ScyllaDB schema where it is missing, or says that the
/// keyspace's is newer than this build knows.
pub fn migrate(config: &Config) -> anyhow::Result<()> {
    migration(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(open_store(config)).map(drop)
}

/// Runs a CLI command on the configured store, on a runtime of its own (the CLI has none).
fn on_store<T>(
    config: &Config,
    command: impl AsyncFnOnce(Stores) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    existing_data_dir(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let stores = open_store(config).await?;
        command(stores).await
    })
}

/// Where a CLI command that cannot open the store (a server holds the embedded store's
/// directory) leaves its audit entry, one JSON line, for that server to append.
pub const AUDIT_INBOX: &str = "audit-inbox.jsonl";

/// Appends a CLI command's action to the audit log: to the store when the CLI can open
/// it, else to the audit inbox, which the server holding the store drains.
fn audit_cli_action(config: &Config, action: twin_store::audit::Action) -> anyhow::Result<()> {
    let appended = on_store(config, async |stores| {
        twin_store::audit::AuditLog::new(stores.twins)
            .append(action.clone())
            .await?;
        Ok(())
    });
    match appended {
        Err(e)
            if e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<twin_store::StoreError>(),
                    Some(twin_store::StoreError::Locked { .. })
                )
            }) =>
        {
            use std::io::Write as _;
            let path = config.data_dir.join(AUDIT_INBOX);
            let mut line = serde_json::to_vec(&action)?;
            line.push(b'\n');
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot write the audit inbox {}", path.display()))?;
            file.write_all(&line)?;
            file.sync_all()?;
            Ok(())
        }
        other => other.context("cannot append to the audit log"),
    }
}

/// Runs a CLI command that changes the registry on the configured store, and appends it
/// to the audit log (actor `cli`) with how it ended.
fn audited<T>(
    config: &Config,
    action: &str,
    arguments: serde_json::Value,
    command: impl AsyncFnOnce(Stores) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    on_store(config, async |stores| {
        let result = command(stores.clone()).await;
        let log = twin_store::audit::AuditLog::new(stores.twins);
        log.append(cli_action(action, arguments, &result))
            .await
            .context("cannot append to the audit log")?;
        result
    })
}

/// `doppel audit verify`: checks the audit log's hash chain; the number of entries and the
/// newest entry's hash (worth keeping elsewhere: a log rewritten from some entry on, with
/// every hash recomputed, verifies, but no longer ends in that hash).
pub fn verify_audit(config: &Config) -> anyhow::Result<(u64, Option<String>)> {
    on_store(config, async |Stores { twins: store, .. }| {
        let count = twin_store::audit::verify(&*store).await??;
        Ok((count, store.last_audit().await?.map(|e| e.hash)))
    })
}

/// `doppel device add`: registers a thing directly in the store and returns its secret.
/// On the embedded store, refused while a server holds the directory.
pub fn add_device(config: &Config, id: &str) -> anyhow::Result<String> {
    let id = DeviceId::parse(id)?;
    let arguments = serde_json::json!({ "id": id.as_str() });
    audited(
        config,
        "device add",
        arguments,
        async |Stores { twins: store, .. }| {
            if store.thing(&id).await?.is_some() {
                anyhow::bail!("thing {id} is already registered");
            }
            let (record, secret) = ThingRecord::new(id, now_millis())?;
            store.commit(vec![Write::Thing(record)]).await?;
            Ok(secret)
        },
    )
}

/// What `doppel device import` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub registered: u64,
    /// Already registered: left as they were (their secrets and attributes kept).
    pub skipped: u64,
}

/// One line of `doppel device import`'s input.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportLine {
    id: String,
    #[serde(default)]
    attributes: serde_json::Map<String, serde_json::Value>,
}

/// Things per durable commit of `doppel device import`.
const IMPORT_BATCH: usize = 1000;
/// Times `doppel device import` tries a batch the store did not answer in time.
const IMPORT_TRIES: u32 = 6;

/// `doppel device import`: registers the things of `input`, one JSON object per line
/// (`{"id": "lamp-1", "attributes": {"site": "north"}}`), a thousand per durable commit,
/// and writes each new thing's secret to `secrets` as a JSON line (`{"id": ..., "secret":
/// ...}`), once. Things already registered are skipped. A line that is not a valid thing
/// stops the import with its line number; the batches before it stay registered.
pub fn import_devices(
    config: &Config,
    input: impl std::io::BufRead,
    mut secrets: impl std::io::Write,
) -> anyhow::Result<Imported> {
    let limits = config.fleet().limits;
    let mut lines = input.lines().enumerate();
    let arguments = serde_json::json!({});
    audited(
        config,
        "device import",
        arguments,
        async |Stores { twins: store, .. }| {
            let mut done = Imported::default();
            loop {
                let mut batch = Vec::with_capacity(IMPORT_BATCH);
                for (n, line) in lines.by_ref() {
                    let line = line.context("cannot read the input")?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let thing = parse_import_line(&line, &limits).with_context(|| {
                    format!(
                        "line {}: not imported, nor anything after it ({} registered before it)",
                        n + 1,
                        done.registered
                    )
                })?;
                    batch.push(thing);
                    if batch.len() == IMPORT_BATCH {
                        break;
                    }
                }
                if batch.is_empty() {
                    return Ok(done);
                }
                let known =
                    futures_util::future::try_join_all(batch.iter().map(|(id, _)| store.thing(id)))
                        .await?;
                let mut writes = Vec::new();
                let mut issued = Vec::new();
                for ((id, attributes), known) in batch.into_iter().zip(known) {
                    if known.is_some() || issued.iter().any(|(i, _)| i == &id) {
                        done.skipped += 1;
                        continue;
                    }
                    let (mut record, secret) = ThingRecord::new(id.clone(), now_millis())?;
                    record.attributes = attributes;
                    writes.push(Write::Thing(record));
                    issued.push((id, secret));
                }
                // The same records again on a timeout (the writes are idempotent): a batch
                // that was partly written must not lose the secrets of what it wrote.
                let mut wait = std::time::Duration::from_millis(500);
                let mut tries = 1;
                loop {
                    match store.commit(writes.clone()).await {
                        Ok(()) => break,
                        Err(e) if e.is_unavailable() && tries < IMPORT_TRIES => {
                            tracing::warn!(error = %e, tries, "a batch of the import failed; trying it again");
                            tokio::time::sleep(wait).await;
                            wait *= 2;
                            tries += 1;
                        }
                        Err(e) => {
                            return Err(anyhow::Error::new(e).context(format!(
                            "{} registered; the next {} may be registered in part, without their secrets: import them again after deleting them, or rotate their secrets",
                            done.registered,
                            issued.len()
                        )));
                        }
                    }
                }
                for (id, secret) in issued {
                    serde_json::to_writer(
                        &mut secrets,
                        &serde_json::json!({"id": id, "secret": secret}),
                    )?;
                    secrets.write_all(b"\n")?;
                    done.registered += 1;
                }
                secrets.flush()?;
            }
        },
    )
}

fn parse_import_line(
    line: &str,
    limits: &twin_model::Limits,
) -> anyhow::Result<(DeviceId, serde_json::Map<String, serde_json::Value>)> {
    let parsed: ImportLine =
        serde_json::from_str(line).context("expected {\"id\": \"...\", \"attributes\": {...}}")?;
    let id = DeviceId::parse(&parsed.id)?;
    let attributes = serde_json::Value::Object(parsed.attributes);
    if twin_model::json::encoded_len(&attributes) > limits.max_state_bytes {
        anyhow::bail!(
            "the attributes of {id} are larger than {} bytes (max_state_bytes)",
            limits.max_state_bytes
        );
    }
    if twin_model::json::depth(&attributes) > limits.max_depth {
        anyhow::bail!(
            "the attributes of {id} nest deeper than {} levels",
            limits.max_depth
        );
    }
    let serde_json::Value::Object(attributes) = attributes else {
        unreachable!("made from an object above")
    };
    Ok((id, attributes))
}

/// `doppel token create`: a bearer token for the GraphQL API, in the database on ScyllaDB
/// or in `data_dir`'s token file. Works while servers run (they read tokens they do not
/// know yet again).
pub fn create_token(
    config: &Config,
    role: Role,
    ttl_ms: Option<u64>,
    note: Option<String>,
) -> anyhow::Result<String> {
    existing_data_dir(config)?;
    let arguments = serde_json::json!({ "role": role.as_str(), "ttlMs": ttl_ms, "note": note });
    let created = match config.store {
        StoreKind::Embedded => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Tokens::open(&config.data_dir)
                .map_err(anyhow::Error::from)
                .and_then(|tokens| Ok(runtime.block_on(tokens.create(role, ttl_ms, note))?.0))
        }
        StoreKind::Scylla => on_store(config, async |stores| {
            let tokens = open_tokens(config, stores.tokens).await?;
            Ok(tokens.create(role, ttl_ms, note).await?.0)
        }),
    };
    audit_cli_action(config, cli_action("token create", arguments, &created))?;
    created
}

/// A CLI command's audit entry.
fn cli_action<T>(
    action: &str,
    arguments: serde_json::Value,
    result: &anyhow::Result<T>,
) -> twin_store::audit::Action {
    twin_store::audit::Action {
        actor: "cli".into(),
        action: action.into(),
        arguments,
        outcome: match result {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("error: {}", error_chain(e)),
        },
        at: now_millis(),
    }
}

/// `doppel signing-key`: the public key that verifies job documents (created with the
/// key on first use).
pub fn signing_key(config: &Config) -> anyhow::Result<String> {
    Ok(twin_graphql::Signer::open(existing_data_dir(config)?)?.public_key())
}

/// `doppel ca init`: makes the built-in device CA in the data directory; the path of its
/// certificate.
pub fn init_device_ca(config: &Config, name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = existing_data_dir(config)?;
    let made = twin_actors::device_ca::DeviceCa::init(dir, name)
        .map(|_| dir.join(twin_actors::device_ca::CERT_FILE))
        .map_err(anyhow::Error::from);
    let arguments = serde_json::json!({ "name": name });
    audit_cli_action(config, cli_action("ca init", arguments, &made))?;
    made
}

/// What `doppel cert issue` wrote.
pub struct IssuedCertificate {
    pub id: twin_model::certificate::CertificateId,
    pub certificate: std::path::PathBuf,
    pub private_key: std::path::PathBuf,
}

/// `doppel cert issue`: a certificate with a new key from the built-in CA for a registered
/// thing, registered ACTIVE and attached to it, written to `out` as `{thing}.cert.pem` and
/// `{thing}.key.pem` (the key readable by its owner only).
pub fn issue_certificate(
    config: &Config,
    thing: &str,
    out: &Path,
) -> anyhow::Result<IssuedCertificate> {
    let thing = DeviceId::parse(thing)?;
    let ca =
        twin_actors::device_ca::DeviceCa::open(existing_data_dir(config)?)?.ok_or_else(|| {
            anyhow::anyhow!(
                "there is no device CA in the data directory: run `doppel ca init` first"
            )
        })?;
    let certificate = out.join(format!("{thing}.cert.pem"));
    let private_key = out.join(format!("{thing}.key.pem"));
    for path in [&certificate, &private_key] {
        if path.exists() {
            anyhow::bail!("{} exists already; it is kept as it is", path.display());
        }
    }
    // The files first: a key that cannot be written must not leave a certificate behind.
    let issued = ca.issue(thing.as_str())?;
    let parsed = twin_actors::services::parse_pem(&issued.certificate_pem)?;
    let written = |path: &Path| format!("cannot write {}", path.display());
    twin_graphql::signing::write_private(&private_key, issued.private_key_pem.as_bytes())
        .with_context(|| written(&private_key))?;
    let registered = std::fs::write(&certificate, &issued.certificate_pem)
        .with_context(|| written(&certificate))
        .and_then(|()| {
            let arguments =
                serde_json::json!({ "thing": thing.as_str(), "certificateId": parsed.id.as_str() });
            audited(
                config,
                "cert issue",
                arguments,
                async |Stores { twins: store, .. }| {
                    let mut record = store
                        .thing(&thing)
                        .await?
                        .ok_or_else(|| anyhow::anyhow!("thing {thing} is not registered"))?;
                    if record.certificates.len() >= twin_actors::device::MAX_CERTIFICATES {
                        anyhow::bail!(
                            "thing {thing} has {} certificates attached, the most it may have",
                            record.certificates.len()
                        );
                    }
                    let now = now_millis();
                    store
                        .put_certificate(&twin_store::CertificateRecord {
                            id: parsed.id.clone(),
                            pem: parsed.pem.clone(),
                            status: twin_model::certificate::CertificateStatus::Active,
                            created_at: now,
                            updated_at: now,
                            not_after: parsed.not_after,
                            provisioning_template: None,
                        })
                        .await?;
                    record.certificates.push(parsed.id.clone());
                    store.commit(vec![Write::Thing(record)]).await?;
                    Ok(())
                },
            )
        });
    if let Err(e) = registered {
        let _ = std::fs::remove_file(&private_key);
        let _ = std::fs::remove_file(&certificate);
        return Err(e);
    }
    Ok(IssuedCertificate {
        id: parsed.id,
        certificate,
        private_key,
    })
}

/// `doppel device disable` / `enable`: a disabled device is refused at connect.
pub fn set_device_enabled(config: &Config, id: &str, enabled: bool) -> anyhow::Result<()> {
    let id = DeviceId::parse(id)?;
    let action = if enabled {
        "device enable"
    } else {
        "device disable"
    };
    let arguments = serde_json::json!({ "id": id.as_str() });
    audited(
        config,
        action,
        arguments,
        async |Stores { twins: store, .. }| {
            let mut record = store
                .thing(&id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("thing {id} is not registered"))?;
            record.enabled = enabled;
            store.commit(vec![Write::Thing(record)]).await?;
            Ok(())
        },
    )
}

/// `doppel device list`: every registered thing, in id order.
pub fn list_devices(config: &Config) -> anyhow::Result<Vec<ThingRecord>> {
    on_store(config, async |Stores { twins: store, .. }| {
        let mut all: Vec<ThingRecord> = Vec::new();
        loop {
            let page = store.things(all.last().map(|r| &r.id), 1000).await?;
            if page.is_empty() {
                all.sort_by(|a, b| a.id.cmp(&b.id));
                return Ok(all);
            }
            all.extend(page);
        }
    })
}
