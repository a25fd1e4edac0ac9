//! The audit log in the API: every mutation is appended by the [`Audited`] schema
//! extension (who, what, the arguments without secrets, how it ended), and admins read
//! the log with `auditLog`.

use std::sync::{Arc, Mutex};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextResolve, ResolveInfo,
};
use async_graphql::parser::types::ExecutableDocument;
use async_graphql::{Context, Object, ServerResult, SimpleObject, Value, Variables};
use serde_json::json;
use twin_actors::FleetHandle;
use twin_store::audit::{Action, AuditEntry};

use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::schema::{DateTime, PageInfo, RoleGuard, api};

/// Arguments whose values are never logged.
const SECRET_ARGUMENTS: [&str; 4] = ["secret", "password", "token", "privateKey"];

/// Appends each top-level mutation field to the audit log.
pub(crate) struct Audited {
    pub(crate) fleet: FleetHandle,
}

impl ExtensionFactory for Audited {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(AuditedRequest {
            fleet: self.fleet.clone(),
            variables: Mutex::default(),
        })
    }
}

struct AuditedRequest {
    fleet: FleetHandle,
    variables: Mutex<Variables>,
}

/// Who called, as the log names them.
fn actor(principal: Option<&Principal>) -> String {
    match principal {
        Some(p) => match &p.note {
            Some(note) => format!("token:{} ({note})", p.token_id),
            None => format!("token:{}", p.token_id),
        },
        None => "anonymous".into(),
    }
}

/// `value` with the values of secret-looking keys replaced, at every level.
fn without_secrets(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| {
                let secret = SECRET_ARGUMENTS
                    .iter()
                    .any(|s| k.to_ascii_lowercase().contains(&s.to_ascii_lowercase()));
                let v = if secret {
                    json!("(left out)")
                } else {
                    without_secrets(v)
                };
                (k, v)
            })
            .collect(),
        serde_json::Value::Array(items) => items.into_iter().map(without_secrets).collect(),
        other => other,
    }
}

#[async_graphql::async_trait::async_trait]
impl Extension for AuditedRequest {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        *self.variables.lock().unwrap_or_else(|e| e.into_inner()) = variables.clone();
        next.run(ctx, query, variables).await
    }

    async fn resolve(
        &self,
        ctx: &ExtensionContext<'_>,
        info: ResolveInfo<'_>,
        next: NextResolve<'_>,
    ) -> ServerResult<Option<Value>> {
        if info.path_node.parent.is_some() || info.parent_type != "Mutation" {
            return next.run(ctx, info).await;
        }
        let arguments = {
            let variables = self.variables.lock().unwrap_or_else(|e| e.into_inner());
            let mut args = serde_json::Map::new();
            for (name, value) in &info.field.arguments {
                let value = value
                    .node
                    .clone()
                    .into_const_with(|v| variables.get(&v).cloned().ok_or(()))
                    .ok()
                    .and_then(|v| v.into_json().ok())
                    .unwrap_or(serde_json::Value::Null);
                args.insert(name.node.to_string(), value);
            }
            without_secrets(serde_json::Value::Object(args))
        };
        let action = info.name.to_owned();
        let actor = actor(ctx.data_opt::<Principal>());
        let result = next.run(ctx, info).await;
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("error: {}", e.message),
        };
        let entry = Action {
            actor,
            action,
            arguments,
            outcome,
            at: twin_store::now_millis(),
        };
        if let Err(e) = self.fleet.audit().append(entry).await {
            tracing::error!(error = %e, "an action was not written to the audit log");
        }
        result
    }
}

/// One action in the audit log.
#[derive(SimpleObject)]
pub struct AuditLogEntry {
    /// 1 for the first entry, then one more each.
    pub seq: u64,
    pub at: DateTime,
    /// `token:<id> (<note>)` for an API token, `cli` for the command line.
    pub actor: String,
    /// The mutation or CLI command.
    pub action: String,
    /// Its arguments; secrets are left out.
    pub arguments: async_graphql::Json<serde_json::Value>,
    /// `ok`, or the error.
    pub outcome: String,
    /// The hash of the entry before (64 zeros for the first).
    pub prev_hash: String,
    /// SHA-256 of this entry with `prevHash` (see `doppel audit verify`).
    pub hash: String,
}

impl From<AuditEntry> for AuditLogEntry {
    fn from(e: AuditEntry) -> Self {
        Self {
            seq: e.seq,
            at: DateTime(e.at),
            actor: e.actor,
            action: e.action,
            arguments: async_graphql::Json(e.arguments),
            outcome: e.outcome,
            prev_hash: e.prev_hash,
            hash: e.hash,
        }
    }
}

#[derive(SimpleObject)]
pub struct AuditLogConnection {
    pub edges: Vec<AuditLogEdge>,
    pub page_info: PageInfo,
}

#[derive(SimpleObject)]
pub struct AuditLogEdge {
    /// Opaque; pass as `after` to continue after this entry.
    pub cursor: String,
    pub node: AuditLogEntry,
}

/// Entries read from the store per page while filtering.
const SCAN_PAGE: usize = 500;

#[derive(Default)]
pub struct AuditQuery;

#[Object]
impl AuditQuery {
    /// The audit log, oldest first (admin); `since` and `until` bound the time, `actor`
    /// keeps one actor's entries (a token id matches `token:<id>…`).
    #[graphql(
        guard = "RoleGuard(Role::Admin)",
        complexity = "(first.max(1) as usize).saturating_mul(child_complexity)"
    )]
    async fn audit_log(
        &self,
        ctx: &Context<'_>,
        since: Option<DateTime>,
        until: Option<DateTime>,
        actor: Option<String>,
        #[graphql(default = 20)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<AuditLogConnection> {
        let api = api(ctx);
        let first = api.page_size(first)?;
        let mut cursor = after
            .map(|a| a.parse::<u64>())
            .transpose()
            .map_err(|_| ApiError::invalid("after is not a cursor of this connection"))?;
        let wanted = |e: &AuditEntry| {
            since.is_none_or(|s| e.at >= s.0)
                && until.is_none_or(|u| e.at <= u.0)
                && actor
                    .as_ref()
                    .is_none_or(|a| e.actor == *a || e.actor.starts_with(&format!("token:{a}")))
        };
        let mut found = Vec::new();
        loop {
            let page = api
                .fleet
                .store()
                .audit_entries(cursor, SCAN_PAGE)
                .await
                .map_err(|e| ApiError::from(twin_actors::FleetError::Store(Arc::new(e))))?;
            let ended = page.len() < SCAN_PAGE;
            cursor = page.last().map(|e| e.seq).or(cursor);
            let past_until = page
                .last()
                .is_some_and(|e| until.is_some_and(|u| e.at > u.0));
            found.extend(page.into_iter().filter(|e| wanted(e)));
            if ended || past_until || found.len() > first {
                break;
            }
        }
        let more = found.len() > first;
        found.truncate(first);
        let edges: Vec<AuditLogEdge> = found
            .into_iter()
            .map(|e| AuditLogEdge {
                cursor: e.seq.to_string(),
                node: e.into(),
            })
            .collect();
        Ok(AuditLogConnection {
            page_info: PageInfo {
                has_next_page: more,
                end_cursor: edges.last().map(|e| e.cursor.clone()),
            },
            edges,
        })
    }
}
