//! Bearer tokens and roles.
//!
//! Tokens are opaque API keys, `dpl_<id>_<secret>`, not JWTs: the server keeps the
//! SHA-256 of each secret (never the token), so a token can be listed and revoked, and
//! nothing but the server can check one. They live in `tokens.jsonl` in the data
//! directory, one JSON record per line, appended under a file lock; `doppel token
//! create` therefore works while the server runs (the server rereads the file when it
//! sees an id it does not know). The secret is 256 random bits, so a fast hash is the
//! right one (as for device secrets).
//!
//! Roles grow: `viewer` reads and subscribes, `operator` also steers (desired state, and
//! later commands and jobs), `admin` also runs the registry and creates tokens.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use async_graphql::{Context, Object, SimpleObject};
use serde::{Deserialize, Serialize};
use twin_store::{now_millis, secret};

use crate::error::{ApiError, Code};
use crate::schema::{DateTime, RoleGuard, api};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    async_graphql::Enum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown role {other:?}; roles are viewer, operator and admin"
            )),
        }
    }
}

/// Who is calling: the role of a valid token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
}

impl Principal {
    /// `Ok` when the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::new(
                Code::Forbidden,
                format!(
                    "this needs the {} role; the token has {}",
                    role.as_str(),
                    self.role.as_str()
                ),
            ))
        }
    }
}

/// One issued token, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub role: Role,
    /// SHA-256 of the secret part, hex.
    pub hash: String,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line} is not a token record: {reason}")]
    Corrupt {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("cannot make a random token: {0}")]
    Random(String),
}

/// The token file and an in-memory copy of it.
pub struct Tokens {
    path: PathBuf,
    cache: RwLock<Cache>,
}

#[derive(Default)]
struct Cache {
    modified: Option<SystemTime>,
    by_id: HashMap<String, TokenRecord>,
}

const PREFIX: &str = "dpl_";

impl Tokens {
    /// The token file of a data directory (created on first use).
    pub fn open(data_dir: &Path) -> Result<Self, TokenError> {
        let tokens = Self {
            path: data_dir.join("tokens.jsonl"),
            cache: RwLock::default(),
        };
        tokens.reload()?;
        Ok(tokens)
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> TokenError + '_ {
        move |source| TokenError::Io {
            what,
            path: self.path.display().to_string(),
            source,
        }
    }

    fn modified(&self) -> Option<SystemTime> {
        std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
    }

    fn reload(&self) -> Result<(), TokenError> {
        let modified = self.modified();
        let mut by_id = HashMap::new();
        if modified.is_some() {
            let file = std::fs::File::open(&self.path).map_err(self.io("read"))?;
            for (i, line) in BufReader::new(file).lines().enumerate() {
                let line = line.map_err(self.io("read"))?;
                if line.trim().is_empty() {
                    continue;
                }
                let record: TokenRecord =
                    serde_json::from_str(&line).map_err(|e| TokenError::Corrupt {
                        path: self.path.display().to_string(),
                        line: i + 1,
                        reason: e.to_string(),
                    })?;
                by_id.insert(record.id.clone(), record);
            }
        }
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = Cache { modified, by_id };
        Ok(())
    }

    /// Issues a token; the answer is the token itself, shown once.
    pub fn create(
        &self,
        role: Role,
        ttl_ms: Option<u64>,
        note: Option<String>,
    ) -> Result<(String, TokenRecord), TokenError> {
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(|e| TokenError::Random(e.to_string()))?;
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let secret = secret::generate().map_err(|e| TokenError::Random(e.to_string()))?;
        let now = now_millis();
        let record = TokenRecord {
            id: id.clone(),
            role,
            hash: secret::hash(&secret),
            created_at: now,
            expires_at: ttl_ms.map(|t| now.saturating_add(t)),
            note,
        };
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&self.path).map_err(self.io("write"))?;
        file.lock().map_err(self.io("lock"))?;
        let mut line = serde_json::to_string(&record).expect("a token record serializes");
        line.push('\n');
        file.write_all(line.as_bytes()).map_err(self.io("write"))?;
        file.sync_all().map_err(self.io("write"))?;
        self.reload()?;
        Ok((format!("{PREFIX}{id}_{secret}"), record))
    }

    /// On a data directory's first start: an admin token, or `None` when tokens exist.
    pub fn first_admin(&self) -> Result<Option<String>, TokenError> {
        if self.modified().is_some() {
            return Ok(None);
        }
        let note = Some("created at first start".to_owned());
        self.create(Role::Admin, None, note).map(|(t, _)| Some(t))
    }

    fn lookup(&self, id: &str) -> Option<TokenRecord> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = cache.by_id.get(id) {
            return Some(r.clone());
        }
        let stale = cache.modified != self.modified();
        drop(cache);
        if stale && let Err(e) = self.reload() {
            tracing::warn!(error = %e, "cannot reload the token file");
        }
        self.cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .get(id)
            .cloned()
    }

    /// The caller behind an `Authorization` header value (`Bearer <token>`) or a bare token.
    pub fn authenticate(&self, credentials: Option<&str>) -> Result<Principal, ApiError> {
        let unauthenticated = |why: &str| ApiError::new(Code::Unauthenticated, why.to_owned());
        let raw = credentials
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                unauthenticated("a bearer token is required (Authorization: Bearer <token>)")
            })?;
        let token = match raw.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            Some(_) => return Err(unauthenticated("the Authorization scheme must be Bearer")),
            None => raw,
        };
        let (id, secret) = token
            .strip_prefix(PREFIX)
            .and_then(|t| t.split_once('_'))
            .ok_or_else(|| unauthenticated("malformed token"))?;
        let record = self
            .lookup(id)
            .filter(|r| secret::verify(secret, &r.hash))
            .ok_or_else(|| unauthenticated("unknown or revoked token"))?;
        if record.expires_at.is_some_and(|e| e <= now_millis()) {
            return Err(unauthenticated("the token has expired"));
        }
        Ok(Principal { role: record.role })
    }
}

/// A duration such as `30d`, `12h`, `15m` or `90s`, in milliseconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid ttl {s:?}: use a number with d, h, m or s, such as 30d");
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let ms = match unit {
        "d" => 86_400_000,
        "h" => 3_600_000,
        "m" => 60_000,
        "s" => 1000,
        _ => return Err(bad()),
    };
    match n.checked_mul(ms) {
        Some(v) if v > 0 => Ok(v),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_authenticate_with_their_role_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::open(dir.path()).unwrap();
        let admin = tokens
            .first_admin()
            .unwrap()
            .expect("first start makes an admin");
        assert!(tokens.first_admin().unwrap().is_none());
        assert_eq!(
            tokens
                .authenticate(Some(&format!("Bearer {admin}")))
                .unwrap()
                .role,
            Role::Admin
        );
        // The file holds the hash, never the token.
        let stored = std::fs::read_to_string(dir.path().join("tokens.jsonl")).unwrap();
        assert!(!stored.contains(admin.rsplit('_').next().unwrap()));

        // A token created by another process (the CLI) is found by the running server.
        let other = Tokens::open(dir.path()).unwrap();
        let (viewer, _) = other.create(Role::Viewer, Some(60_000), None).unwrap();
        let p = tokens
            .authenticate(Some(&format!("bearer {viewer}")))
            .unwrap();
        assert_eq!(p.role, Role::Viewer);
        assert_eq!(p.require(Role::Operator).unwrap_err().code, Code::Forbidden);
        assert!(p.require(Role::Viewer).is_ok());

        let (expired, _) = tokens.create(Role::Admin, Some(0), None).unwrap();
        for (creds, why) in [
            (None, "required"),
            (Some("Basic abc".to_owned()), "scheme"),
            (Some("Bearer nope".to_owned()), "malformed"),
            (Some(format!("Bearer {admin}x")), "unknown"),
            (Some(format!("Bearer {expired}")), "expired"),
        ] {
            let e = tokens.authenticate(creds.as_deref()).unwrap_err();
            assert_eq!(e.code, Code::Unauthenticated);
            assert!(e.message.contains(why), "{e:?}");
        }
    }

    #[test]
    fn ttls_read_like_durations() {
        assert_eq!(parse_ttl("30d"), Ok(30 * 86_400_000));
        assert_eq!(parse_ttl("90s"), Ok(90_000));
        for bad in ["", "30", "d", "3x", "0h", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}

#[derive(SimpleObject)]
pub struct CreatedToken {
    /// The bearer token, shown only here, once.
    pub token: String,
    pub role: Role,
    pub expires_at: Option<DateTime>,
}

#[derive(Default)]
pub struct TokensMutation;

#[Object]
impl TokensMutation {
    /// Issues an API token (admin), shown once.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn create_token(
        &self,
        ctx: &Context<'_>,
        role: Role,
        ttl_seconds: Option<u64>,
        note: Option<String>,
    ) -> async_graphql::Result<CreatedToken> {
        let api = api(ctx);
        if ttl_seconds == Some(0) {
            return Err(ApiError::invalid("ttlSeconds must be positive").into());
        }
        let tokens = api.tokens.clone();
        let ttl = ttl_seconds.map(|s| s.saturating_mul(1000));
        let (token, record) = tokio::task::spawn_blocking(move || tokens.create(role, ttl, note))
            .await
            .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?
            .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
        Ok(CreatedToken {
            token,
            role,
            expires_at: record.expires_at.map(DateTime),
        })
    }
}
