//! A shadow's history and time travel: `Shadow.history` lists the retained changes with
//! who made them; `Thing.shadow(at:)` answers with the shadow as it was at an instant.

use async_graphql::{Enum, Json, SimpleObject};
use serde_json::Value;
use twin_actors::{FleetHandle, ShadowView};
use twin_model::history::{HistoryEntry, NotRetained, Origin};
use twin_model::{DeviceId, ShadowName};

use crate::error::{ApiError, ApiResult};
use crate::schema::{DateTime, PageInfo};
use crate::thing_events::{ShadowOperation, accepted_at, change_state};

/// One accepted change of a shadow.
#[derive(SimpleObject)]
pub struct ShadowHistoryEntry {
    /// The shadow's version after the change (a delete keeps the version it deleted).
    pub version: u64,
    /// When the change was accepted.
    pub at: DateTime,
    pub operation: ShadowOperation,
    /// What the update wrote: `{"desired": ..., "reported": ...}` (null for a delete).
    pub state: Option<Json<Value>>,
    pub client_token: Option<String>,
    /// Who made it; null for changes stored before authors were recorded.
    pub by: Option<ChangeAuthor>,
}

#[derive(Enum, Clone, Copy, PartialEq, Eq)]
pub enum AuthorKind {
    /// The device, over MQTT.
    Device,
    /// An API call made with a token.
    Token,
    /// Doppel, for a job (a firmware job that succeeded reports the installed version).
    Job,
}

/// Who made a change.
#[derive(SimpleObject)]
pub struct ChangeAuthor {
    pub kind: AuthorKind,
    /// For `TOKEN`: the token's id (never its secret) and note.
    pub token_id: Option<String>,
    pub note: Option<String>,
    /// For `JOB`: the job.
    pub job_id: Option<String>,
}

impl From<&Origin> for ChangeAuthor {
    fn from(origin: &Origin) -> Self {
        let author = |kind| Self {
            kind,
            token_id: None,
            note: None,
            job_id: None,
        };
        match origin {
            Origin::Device => author(AuthorKind::Device),
            Origin::Token { id, note } => Self {
                token_id: Some(id.clone()),
                note: note.clone(),
                ..author(AuthorKind::Token)
            },
            Origin::Job { id } => Self {
                job_id: Some(id.clone()),
                ..author(AuthorKind::Job)
            },
        }
    }
}

#[derive(SimpleObject)]
pub struct ShadowHistoryEdge {
    /// Opaque; pass as `after` to continue with older changes.
    pub cursor: String,
    pub node: ShadowHistoryEntry,
}

#[derive(SimpleObject)]
pub struct ShadowHistoryConnection {
    pub edges: Vec<ShadowHistoryEdge>,
    pub page_info: PageInfo,
}

fn entry(e: &HistoryEntry) -> ShadowHistoryEntry {
    let (operation, state) = change_state(&e.change);
    ShadowHistoryEntry {
        version: e.change.version,
        at: accepted_at(&e.change),
        operation,
        state,
        client_token: e.change.client_token.clone(),
        by: e.change.by.as_ref().map(ChangeAuthor::from),
    }
}

/// The page of a shadow's history after the cursor `after`, newest first, with the
/// changes accepted in `[since, until]`.
pub(crate) async fn page(
    fleet: &FleetHandle,
    thing: &DeviceId,
    shadow: &ShadowName,
    first: usize,
    after: Option<&str>,
    since: Option<DateTime>,
    until: Option<DateTime>,
) -> ApiResult<ShadowHistoryConnection> {
    let before = after
        .map(str::parse::<u64>)
        .transpose()
        .map_err(|_| ApiError::invalid("after is not a cursor of this connection"))?;
    if let (Some(since), Some(until)) = (since, until)
        && since.0 > until.0
    {
        return Err(ApiError::invalid("since is after until"));
    }
    let retained = fleet
        .shadows()
        .history(thing, shadow, before, usize::MAX)
        .await?;
    let mut matching = retained.iter().filter(|e| {
        let at = accepted_at(&e.change).0;
        since.is_none_or(|s| at >= s.0) && until.is_none_or(|u| at <= u.0)
    });
    let edges: Vec<ShadowHistoryEdge> = matching
        .by_ref()
        .take(first)
        .map(|e| ShadowHistoryEdge {
            cursor: e.position().to_string(),
            node: entry(e),
        })
        .collect();
    Ok(ShadowHistoryConnection {
        page_info: PageInfo {
            has_next_page: matching.next().is_some(),
            end_cursor: edges.last().map(|e| e.cursor.clone()),
        },
        edges,
    })
}

/// The shadow as it was at `at`: `None` when it did not exist then; `INVALID_ARGUMENT`
/// naming the oldest instant the retained history answers when `at` is older.
pub(crate) async fn shadow_at(
    fleet: &FleetHandle,
    thing: &DeviceId,
    shadow: &ShadowName,
    at: DateTime,
) -> ApiResult<Option<ShadowView>> {
    match fleet.shadows().at(thing, shadow, at.0).await? {
        Ok(state) => Ok(state.map(|s| ShadowView {
            delta: s.delta(),
            shadow: s.into(),
        })),
        Err(NotRetained {
            oldest: Some(oldest),
        }) => Err(ApiError::invalid(format!(
            "{} is older than the retained history of this shadow; the oldest instant available is {}",
            twin_model::rfc3339(at.0),
            twin_model::rfc3339(oldest)
        ))),
        Err(NotRetained { oldest: None }) => Err(ApiError::invalid(format!(
            "{} is older than the retained history of this shadow, and none of its changes is retained",
            twin_model::rfc3339(at.0)
        ))),
    }
}
