//! Bearer tokens and roles.
//!
//! Tokens are opaque API keys, `dpl_<id>_<secret>`, not JWTs: the server keeps the
//! SHA-256 of each secret (never the token), so a token can be listed and revoked, and
//! nothing but the server can check one. With the embedded store they live in
//! `tokens.jsonl` in the data directory, one JSON record per line, appended under a file
//! lock; with ScyllaDB in the database ([`TokenStore`]), where every node finds them.
//! `doppel token create` therefore works while servers run: a server reads the tokens
//! again when it sees an id it does not know (the database at most once a second). The
//! secret is 256 random bits, so a fast hash is the right one (as for device secrets).
//!
//! Roles grow: `viewer` reads and subscribes, `operator` also steers (desired state, and
//! later commands and jobs), `admin` also runs the registry and creates tokens.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_graphql::{Context, Object, SimpleObject};
use serde::{Deserialize, Serialize};
use twin_model::history::Origin;
use twin_store::{TokenStore, now_millis, secret};

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

/// Who is calling: a valid token's id, role and note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    pub token_id: String,
    pub note: Option<String>,
}

impl Principal {
    pub fn new(role: Role, token_id: impl Into<String>, note: Option<String>) -> Self {
        Self {
            role,
            token_id: token_id.into(),
            note,
        }
    }

    /// What a shadow's history records as the author of this caller's changes.
    pub fn origin(&self) -> Origin {
        Origin::Token {
            id: self.token_id.clone(),
            note: self.note.clone(),
        }
    }

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
    #[error("the token store: {0}")]
    Store(#[source] twin_store::StoreError),
}

/// Where tokens are kept: a file of the data directory (the embedded store), or the
/// database (ScyllaDB), where every node of a cluster finds them.
enum Source {
    File(PathBuf),
    Database(Arc<dyn TokenStore>),
}

/// The tokens, and an in-memory copy of them that every request reads.
pub struct Tokens {
    source: Source,
    cache: RwLock<Cache>,
    /// When the copy was last read from the database; held while reading it, so that
    /// unknown ids cause at most one read per [`RELOAD_EVERY`], whoever sends them.
    reloaded: tokio::sync::Mutex<Option<Instant>>,
}

#[derive(Default)]
struct Cache {
    /// The file's modification time when read (file source only).
    modified: Option<SystemTime>,
    by_id: HashMap<String, TokenRecord>,
}

const PREFIX: &str = "dpl_";

/// The most often the database's tokens are read again for an id not in the copy.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

impl Tokens {
    /// The token file of a data directory, `tokens.jsonl` (created on first use).
    pub fn open(data_dir: &Path) -> Result<Self, TokenError> {
        let tokens = Self::with(Source::File(data_dir.join("tokens.jsonl")));
        tokens.reload_file()?;
        Ok(tokens)
    }

    /// Tokens kept in the database.
    pub async fn in_database(store: Arc<dyn TokenStore>) -> Result<Self, TokenError> {
        let tokens = Self::with(Source::Database(store));
        tokens.reload_database().await?;
        Ok(tokens)
    }

    fn with(source: Source) -> Self {
        Self {
            source,
            cache: RwLock::default(),
            reloaded: tokio::sync::Mutex::new(None),
        }
    }

    fn file_io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> TokenError {
        let path = path.display().to_string();
        move |source| TokenError::Io { what, path, source }
    }

    fn modified(path: &Path) -> Option<SystemTime> {
        std::fs::metadata(path).and_then(|m| m.modified()).ok()
    }

    fn replace(&self, cache: Cache) {
        *self.cache.write().unwrap_or_else(|e| e.into_inner()) = cache;
    }

    fn cached(&self, id: &str) -> Option<TokenRecord> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache.by_id.get(id).cloned()
    }

    fn reload_file(&self) -> Result<(), TokenError> {
        let Source::File(path) = &self.source else {
            return Ok(());
        };
        let modified = Self::modified(path);
        let mut by_id = HashMap::new();
        if modified.is_some() {
            let file = std::fs::File::open(path).map_err(Self::file_io(path, "read"))?;
            for (i, line) in BufReader::new(file).lines().enumerate() {
                let line = line.map_err(Self::file_io(path, "read"))?;
                if line.trim().is_empty() {
                    continue;
                }
                let record: TokenRecord =
                    serde_json::from_str(&line).map_err(|e| TokenError::Corrupt {
                        path: path.display().to_string(),
                        line: i + 1,
                        reason: e.to_string(),
                    })?;
                by_id.insert(record.id.clone(), record);
            }
        }
        self.replace(Cache { modified, by_id });
        Ok(())
    }

    async fn reload_database(&self) -> Result<(), TokenError> {
        let Source::Database(store) = &self.source else {
            return Ok(());
        };
        let mut by_id = HashMap::new();
        for (id, record) in store.tokens().await.map_err(TokenError::Store)? {
            match serde_json::from_str::<TokenRecord>(&record) {
                Ok(r) if r.id == id => {
                    by_id.insert(id, r);
                }
                Ok(_) => {
                    tracing::warn!(id = %id.escape_debug(), "an API token record names another id: skipped")
                }
                Err(e) => {
                    tracing::warn!(id = %id.escape_debug(), error = %e, "an API token record is not readable: skipped")
                }
            }
        }
        self.replace(Cache {
            modified: None,
            by_id,
        });
        Ok(())
    }

    /// Issues a token; the answer is the token itself, shown once.
    pub async fn create(
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
        let line = serde_json::to_string(&record).expect("a token record serializes");
        match &self.source {
            Source::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || append(&path, line))
                    .await
                    .map_err(|e| TokenError::Random(e.to_string()))??;
                self.reload_file()?;
            }
            Source::Database(store) => {
                store
                    .put_token(&id, &line)
                    .await
                    .map_err(TokenError::Store)?;
                let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
                cache.by_id.insert(id.clone(), record.clone());
            }
        }
        Ok((format!("{PREFIX}{id}_{secret}"), record))
    }

    /// On a first start (no token yet, in the file or the database): an admin token.
    pub async fn first_admin(&self) -> Result<Option<String>, TokenError> {
        let first = match &self.source {
            Source::File(path) => Self::modified(path).is_none(),
            Source::Database(_) => self
                .cache
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .by_id
                .is_empty(),
        };
        if !first {
            return Ok(None);
        }
        let note = Some("created at first start".to_owned());
        self.create(Role::Admin, None, note)
            .await
            .map(|(t, _)| Some(t))
    }

    /// A token's record: from the copy, or read again from where tokens are kept (a token
    /// made by the CLI or by another node).
    async fn lookup(&self, id: &str) -> Result<Option<TokenRecord>, TokenError> {
        if let Some(r) = self.cached(id) {
            return Ok(Some(r));
        }
        match &self.source {
            Source::File(path) => {
                let stale = self
                    .cache
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .modified
                    != Self::modified(path);
                if stale {
                    self.reload_file()?;
                }
            }
            Source::Database(_) => {
                let asked = Instant::now();
                let mut reloaded = self.reloaded.lock().await;
                if reloaded.is_none_or(|at| at < asked) {
                    if let Some(wait) =
                        reloaded.and_then(|at| RELOAD_EVERY.checked_sub(at.elapsed()))
                    {
                        tokio::time::sleep(wait).await;
                    }
                    self.reload_database().await?;
                    *reloaded = Some(Instant::now());
                }
            }
        }
        Ok(self.cached(id))
    }

    /// The caller behind an `Authorization` header value (`Bearer <token>`) or a bare token.
    pub async fn authenticate(&self, credentials: Option<&str>) -> Result<Principal, ApiError> {
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
        let record = match self.lookup(id).await {
            Ok(found) => found,
            Err(e @ TokenError::Store(_)) => {
                return Err(ApiError::new(
                    Code::Unavailable,
                    format!("cannot check the token: {e}"),
                ));
            }
            Err(e) => return Err(ApiError::new(Code::Internal, e.to_string())),
        };
        let record = record
            .filter(|r| secret::verify(secret, &r.hash))
            .ok_or_else(|| unauthenticated("unknown or revoked token"))?;
        if record.expires_at.is_some_and(|e| e <= now_millis()) {
            return Err(unauthenticated("the token has expired"));
        }
        Ok(Principal::new(record.role, record.id, record.note))
    }
}

/// Appends a record to the token file, under a file lock (the CLI and a server may both
/// write), durably.
fn append(path: &Path, mut line: String) -> Result<(), TokenError> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(Tokens::file_io(path, "write"))?;
    file.lock().map_err(Tokens::file_io(path, "lock"))?;
    line.push('\n');
    file.write_all(line.as_bytes())
        .map_err(Tokens::file_io(path, "write"))?;
    file.sync_all().map_err(Tokens::file_io(path, "write"))
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

    #[tokio::test]
    async fn tokens_authenticate_with_their_role_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::open(dir.path()).unwrap();
        let admin = tokens
            .first_admin()
            .await
            .unwrap()
            .expect("first start makes an admin");
        assert!(tokens.first_admin().await.unwrap().is_none());
        assert_eq!(
            tokens
                .authenticate(Some(&format!("Bearer {admin}")))
                .await
                .unwrap()
                .role,
            Role::Admin
        );
        // The file holds the hash, never the token.
        let stored = std::fs::read_to_string(dir.path().join("tokens.jsonl")).unwrap();
        assert!(!stored.contains(admin.rsplit('_').next().unwrap()));

        // A token created by another process (the CLI) is found by the running server.
        let other = Tokens::open(dir.path()).unwrap();
        let (viewer, _) = other
            .create(Role::Viewer, Some(60_000), Some("dashboards".into()))
            .await
            .unwrap();
        let p = tokens
            .authenticate(Some(&format!("bearer {viewer}")))
            .await
            .unwrap();
        assert_eq!(p.role, Role::Viewer);
        assert_eq!(p.note.as_deref(), Some("dashboards"));
        assert_eq!(p.require(Role::Operator).unwrap_err().code, Code::Forbidden);
        assert!(p.require(Role::Viewer).is_ok());

        let (expired, _) = tokens.create(Role::Admin, Some(0), None).await.unwrap();
        for (creds, why) in [
            (None, "required"),
            (Some("Basic abc".to_owned()), "scheme"),
            (Some("Bearer nope".to_owned()), "malformed"),
            (Some(format!("Bearer {admin}x")), "unknown"),
            (Some(format!("Bearer {expired}")), "expired"),
        ] {
            let e = tokens.authenticate(creds.as_deref()).await.unwrap_err();
            assert_eq!(e.code, Code::Unauthenticated);
            assert!(e.message.contains(why), "{e:?}");
        }
    }

    /// A database of tokens that counts its reads and can be made unreachable.
    #[derive(Default)]
    struct Db {
        rows: std::sync::Mutex<Vec<(String, String)>>,
        reads: std::sync::atomic::AtomicUsize,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl TokenStore for Db {
        async fn put_token(&self, id: &str, record: &str) -> Result<(), twin_store::StoreError> {
            self.rows
                .lock()
                .unwrap()
                .push((id.to_owned(), record.to_owned()));
            Ok(())
        }

        async fn tokens(&self) -> Result<Vec<(String, String)>, twin_store::StoreError> {
            use std::sync::atomic::Ordering;
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(twin_store::StoreError::Unavailable("no node".into()));
            }
            Ok(self.rows.lock().unwrap().clone())
        }
    }

    /// Tokens in the database are shared by every node: one made on another node (or by
    /// the CLI) is found there; unknown ids read the database at most once a second,
    /// whoever sends them; a database that cannot be read is UNAVAILABLE, not a 401.
    #[tokio::test(start_paused = true)]
    async fn tokens_in_the_database_are_shared_and_unknown_ids_cannot_flood_it() {
        use std::sync::atomic::Ordering;
        let db = Arc::new(Db::default());
        let node_a = Tokens::in_database(db.clone()).await.unwrap();
        let node_b = Tokens::in_database(db.clone()).await.unwrap();
        let admin = node_a
            .first_admin()
            .await
            .unwrap()
            .expect("an empty database");
        assert!(node_a.first_admin().await.unwrap().is_none());
        let p = node_b
            .authenticate(Some(&format!("Bearer {admin}")))
            .await
            .unwrap();
        assert_eq!(p.role, Role::Admin);
        assert_eq!(p.note.as_deref(), Some("created at first start"));

        let reads = db.reads.load(Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let unknown = (0..50).map(|i| {
            let creds = format!("Bearer dpl_{i:016x}_secret");
            let node = &node_b;
            async move { node.authenticate(Some(&creds)).await }
        });
        for outcome in futures_util::future::join_all(unknown).await {
            assert_eq!(outcome.unwrap_err().code, Code::Unauthenticated);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let extra = db.reads.load(Ordering::SeqCst) - reads;
        assert!(
            extra as f64 <= elapsed / RELOAD_EVERY.as_secs_f64() + 1.0,
            "{extra} reads in {elapsed} s for 50 unknown ids"
        );

        db.down.store(true, Ordering::SeqCst);
        let e = node_b
            .authenticate(Some("Bearer dpl_00000000000000ff_secret"))
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::Unavailable);
        // Known tokens still work from the copy.
        assert!(
            node_b
                .authenticate(Some(&format!("Bearer {admin}")))
                .await
                .is_ok()
        );
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
        let (token, record) = tokens.create(role, ttl, note).await.map_err(|e| match e {
            TokenError::Store(e) if e.is_unavailable() => {
                ApiError::new(Code::Unavailable, format!("cannot store the token: {e}"))
            }
            e => ApiError::new(Code::Internal, e.to_string()),
        })?;
        Ok(CreatedToken {
            token,
            role,
            expires_at: record.expires_at.map(DateTime),
        })
    }
}
