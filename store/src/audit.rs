//! The audit log: every registry, certificate, token and operator action, who did it and
//! how it ended, appended in order. Each entry carries the hash of the one before (a hash
//! chain), so that an entry changed or removed in the store is found by [`verify`].
//!
//! An entry's hash is the SHA-256 (hex) of the JSON array `[seq, at, actor, action,
//! arguments, outcome, prevHash]`, as serde_json writes it (object keys in their stored
//! order); the first entry's `prevHash` is 64 zeros.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{AuditStore, StoreError};

/// The `prevHash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One action, as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// 1 for the first entry, then one more each.
    pub seq: u64,
    /// Milliseconds since the epoch.
    pub at: u64,
    /// Who: `token:<id> (<note>)` for an API token, `cli` for the command line.
    pub actor: String,
    /// What: the GraphQL mutation or the CLI command.
    pub action: String,
    /// Its arguments, without secrets.
    pub arguments: Value,
    /// `ok`, or the error.
    pub outcome: String,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEntry {
    /// What the entry's hash should be.
    pub fn expected_hash(&self) -> String {
        let sealed = json!([
            self.seq,
            self.at,
            self.actor,
            self.action,
            self.arguments,
            self.outcome,
            self.prev_hash
        ]);
        crate::secret::sha256_hex(&sealed.to_string())
    }
}

/// What an action was, for [`AuditLog::append`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub actor: String,
    pub action: String,
    pub arguments: Value,
    pub outcome: String,
    pub at: u64,
}

/// Appends to the log in the store, one at a time: each entry needs the one before.
pub struct AuditLog {
    store: Arc<dyn AuditStore>,
    /// The last entry's sequence number and hash, once read.
    head: tokio::sync::Mutex<Option<(u64, String)>>,
}

impl AuditLog {
    pub fn new(store: Arc<dyn AuditStore>) -> Self {
        Self {
            store,
            head: tokio::sync::Mutex::new(None),
        }
    }

    /// Appends `action`, durably; the entry as written. When another writer appended
    /// first, the entry is made again after the newest one.
    pub async fn append(&self, action: Action) -> Result<AuditEntry, StoreError> {
        let mut head = self.head.lock().await;
        for _ in 0..APPEND_TRIES {
            let (seq, prev_hash) = match head.as_ref() {
                Some(h) => h.clone(),
                None => self
                    .store
                    .last_audit()
                    .await?
                    .map_or((0, GENESIS.to_owned()), |e| (e.seq, e.hash)),
            };
            let mut entry = AuditEntry {
                seq: seq + 1,
                at: action.at,
                actor: action.actor.clone(),
                action: action.action.clone(),
                arguments: action.arguments.clone(),
                outcome: action.outcome.clone(),
                prev_hash,
                hash: String::new(),
            };
            entry.hash = entry.expected_hash();
            if self.store.append_audit(&entry).await? {
                *head = Some((entry.seq, entry.hash.clone()));
                return Ok(entry);
            }
            *head = None;
        }
        Err(StoreError::Unavailable(format!(
            "the audit log: {APPEND_TRIES} appends in a row lost to other writers"
        )))
    }
}

/// Tries of an append that other writers keep beating.
const APPEND_TRIES: usize = 16;

/// Why the log does not verify: the first entry that does not match, and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit entry {seq} does not match: {reason}")]
pub struct Broken {
    pub seq: u64,
    pub reason: String,
}

/// Checks `entry` as the successor of `prev` (its sequence number and hash).
pub fn check(prev: (u64, &str), entry: &AuditEntry) -> Result<(), Broken> {
    let broken = |reason: String| Broken {
        seq: entry.seq,
        reason,
    };
    if entry.seq != prev.0 + 1 {
        return Err(Broken {
            seq: prev.0 + 1,
            reason: format!("it is missing (the next entry is {})", entry.seq),
        });
    }
    if entry.prev_hash != prev.1 {
        return Err(broken(
            "its prevHash is not the hash of the entry before".into(),
        ));
    }
    if entry.hash != entry.expected_hash() {
        return Err(broken("its content does not hash to its hash".into()));
    }
    Ok(())
}

/// Reads the whole log and checks the chain; the number of entries when it holds.
pub async fn verify(store: &dyn AuditStore) -> Result<Result<u64, Broken>, StoreError> {
    let mut prev = (0, GENESIS.to_owned());
    loop {
        let page = store.audit_entries(Some(prev.0), 1000).await?;
        if page.is_empty() {
            return Ok(Ok(prev.0));
        }
        for entry in page {
            if let Err(broken) = check((prev.0, &prev.1), &entry) {
                return Ok(Err(broken));
            }
            prev = (entry.seq, entry.hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, prev: &str) -> AuditEntry {
        let mut e = AuditEntry {
            seq,
            at: 1000 + seq,
            actor: "cli".into(),
            action: "device add".into(),
            arguments: json!({"id": format!("lamp-{seq}")}),
            outcome: "ok".into(),
            prev_hash: prev.into(),
            hash: String::new(),
        };
        e.hash = e.expected_hash();
        e
    }

    #[test]
    fn a_chain_holds_and_any_change_breaks_it_at_that_entry() {
        let first = entry(1, GENESIS);
        let second = entry(2, &first.hash);
        assert_eq!(check((0, GENESIS), &first), Ok(()));
        assert_eq!(check((1, &first.hash), &second), Ok(()));

        let mut changed = first.clone();
        changed.arguments = json!({"id": "someone-else"});
        assert_eq!(check((0, GENESIS), &changed).unwrap_err().seq, 1);
        let mut rehashed = changed.clone();
        rehashed.hash = rehashed.expected_hash();
        assert!(
            check((0, GENESIS), &rehashed).is_ok(),
            "alone it looks fine"
        );
        let e = check((1, &rehashed.hash), &second).unwrap_err();
        assert_eq!(e.seq, 2, "but the next entry names the old hash");
        let gap = check((0, GENESIS), &second).unwrap_err();
        assert_eq!((gap.seq, gap.reason.contains("missing")), (1, true));
    }
}
