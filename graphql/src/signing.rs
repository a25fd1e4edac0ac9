//! Signed job documents: devices can check that a job document came from this Doppel.
//!
//! The server keeps an Ed25519 key in its data directory (`job-signing-key.pk8`, created on
//! first start, readable by the owner only). A job document gets a `signature` field:
//!
//! ```json
//! "signature": {"algorithm": "Ed25519", "publicKey": "<64 hex>", "value": "<128 hex>"}
//! ```
//!
//! `value` signs the document without its `signature` field in canonical form: objects
//! with their keys sorted (by UTF-8 bytes) at every level, no whitespace, strings and
//! numbers as JSON writes them (integers as digits). A device removes `signature`,
//! canonicalizes, and verifies against the public key it was given (`doppel signing-key`
//! prints it).

use std::fmt::Write as _;
use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde_json::{Value, json};
pub use twin_actors::device_ca::write_private;

pub const KEY_FILE: &str = "job-signing-key.pk8";

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `value` in canonical JSON (see the module documentation).
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The server's document-signing key.
pub struct Signer {
    key: Ed25519KeyPair,
}

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an Ed25519 PKCS#8 key")]
    BadKey { path: String },
}

impl Signer {
    /// Loads the key from `dir`, creating it on first use.
    pub fn open(dir: &Path) -> Result<Self, SigningError> {
        let path = dir.join(KEY_FILE);
        let io = |source| SigningError::Io {
            path: path.display().to_string(),
            source,
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| io(std::io::Error::other("no randomness from the OS")))?;
                write_private(&path, doc.as_ref()).map_err(io)?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(io(e)),
        };
        let key = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| SigningError::BadKey {
            path: path.display().to_string(),
        })?;
        Ok(Self { key })
    }

    /// The public key, 64 hex digits.
    pub fn public_key(&self) -> String {
        hex(self.key.public_key().as_ref())
    }

    /// `document` with its `signature` field (any old one replaced).
    pub fn sign(&self, mut document: Value) -> Value {
        if let Value::Object(m) = &mut document {
            m.remove("signature");
        }
        let signature = self.key.sign(canonical(&document).as_bytes());
        if let Value::Object(m) = &mut document {
            m.insert(
                "signature".into(),
                json!({"algorithm": "Ed25519", "publicKey": self.public_key(), "value": hex(signature.as_ref())}),
            );
        }
        document
    }
}

/// Whether `document` carries a valid signature by `public_key` (hex), as a device checks.
pub fn verify(document: &Value, public_key: &str) -> bool {
    let Some(value) = document["signature"]["value"].as_str() else {
        return false;
    };
    let (Some(sig), Some(key)) = (unhex(value), unhex(public_key)) else {
        return false;
    };
    let mut unsigned = document.clone();
    if let Value::Object(m) = &mut unsigned {
        m.remove("signature");
    }
    UnparsedPublicKey::new(&ED25519, key)
        .verify(canonical(&unsigned).as_bytes(), &sig)
        .is_ok()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let v = json!({"b": [1, {"z": "x", "a": true}], "a": {"d": null, "c": "q\"uote"}});
        assert_eq!(
            canonical(&v),
            r#"{"a":{"c":"q\"uote","d":null},"b":[1,{"a":true,"z":"x"}]}"#
        );
    }

    #[test]
    fn a_signed_document_verifies_and_any_change_breaks_it() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::open(dir.path()).unwrap();
        let doc = signer.sign(json!({"firmware": {"version": "2.0", "size": 10}, "note": "x"}));
        let key = signer.public_key();
        assert_eq!(key.len(), 64);
        assert!(verify(&doc, &key));
        // Key order does not matter; content does.
        let reordered = json!({"note": "x", "signature": doc["signature"], "firmware": {"size": 10, "version": "2.0"}});
        assert!(verify(&reordered, &key));
        let mut tampered = doc.clone();
        tampered["firmware"]["version"] = json!("6.6.6");
        assert!(!verify(&tampered, &key));
        let other = tempfile::tempdir().unwrap();
        assert!(!verify(
            &doc,
            &Signer::open(other.path()).unwrap().public_key()
        ));
        // The key survives a restart.
        assert_eq!(Signer::open(dir.path()).unwrap().public_key(), key);
        std::fs::write(dir.path().join(KEY_FILE), b"junk").unwrap();
        assert!(matches!(
            Signer::open(dir.path()),
            Err(SigningError::BadKey { .. })
        ));
    }
}
