//! A device shadow with AWS IoT Device Shadow semantics, as pure functions.
//!
//! `decide_*` validates a request against the current shadow and returns the change to
//! make (or a [`Rejection`], changing nothing); [`Shadow::apply`] applies a change.
//! Replaying a shadow's changes from [`Shadow::default`] rebuilds it exactly. Time is an
//! input (`now`, seconds since the epoch, as AWS reports it).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::json;
use crate::rejection::Rejection;

/// Limits applied to every update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `desired` + `reported` state, in bytes of compact JSON (AWS: 8 KiB).
    pub max_state_bytes: usize,
    /// Deepest nesting inside `desired` or `reported` (AWS: 6).
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_state_bytes: 8 * 1024,
            max_depth: 6,
        }
    }
}

pub const MAX_CLIENT_TOKEN_BYTES: usize = 64;

/// The stored document of one shadow. `exists` is false before the first update and
/// after a delete; the version survives a delete, as in AWS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    pub exists: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_desired: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_reported: Option<Map<String, Value>>,
    pub version: u64,
    /// When the shadow last changed.
    pub timestamp: u64,
}

/// One section's part of an update: absent, `null` (clear the section), or a patch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SectionPatch {
    Clear,
    Merge(Map<String, Value>),
}

/// A validated update request (the `/update` payload).
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRequest {
    pub desired: Option<SectionPatch>,
    pub reported: Option<SectionPatch>,
    pub version: Option<u64>,
    pub client_token: Option<String>,
}

/// An accepted change: what the event log stores and what replay applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowChange {
    pub op: ChangeOp,
    /// The shadow's version after the change (for a delete: the deleted version).
    pub version: u64,
    pub timestamp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
    /// When the change was accepted, in milliseconds since the epoch (0 in changes stored
    /// before it was recorded): what history and time travel order by.
    #[serde(default)]
    pub at: u64,
    /// Who asked for the change; `None` in changes stored before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<crate::history::Origin>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChangeOp {
    Update {
        #[serde(default, skip_serializing_if = "Option::is_none", with = "patch_serde")]
        desired: Option<SectionPatch>,
        #[serde(default, skip_serializing_if = "Option::is_none", with = "patch_serde")]
        reported: Option<SectionPatch>,
    },
    Delete,
}

/// Keeps `Some(SectionPatch::Clear)` distinct from `None` through serde (`null` vs absent).
mod patch_serde {
    use super::SectionPatch;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::{Map, Value};

    pub fn serialize<S: Serializer>(p: &Option<SectionPatch>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(SectionPatch::Merge(m)) => m.serialize(s),
            _ => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SectionPatch>, D::Error> {
        Ok(Some(match Option::<Map<String, Value>>::deserialize(d)? {
            Some(m) => SectionPatch::Merge(m),
            None => SectionPatch::Clear,
        }))
    }
}

impl UpdateRequest {
    /// Parses and validates an `/update` payload. Everything wrong with it is a 400 (or
    /// 413 / 415), with AWS's messages.
    pub fn parse(payload: &[u8], limits: &Limits) -> Result<Self, Rejection> {
        let text = std::str::from_utf8(payload).map_err(|_| {
            Rejection::new(
                crate::RejectionKind::UnsupportedEncoding,
                "Unsupported documented encoding; supported encoding is UTF-8",
            )
        })?;
        // A request far larger than any acceptable state is refused before parsing it.
        if text.len() > limits.max_state_bytes.saturating_mul(4).max(16 * 1024) {
            return Err(Rejection::too_large(limits.max_state_bytes));
        }
        let value: Value =
            serde_json::from_str(text).map_err(|_| Rejection::bad_request("Invalid JSON"))?;
        let Value::Object(mut root) = value else {
            return Err(Rejection::bad_request("Invalid JSON"));
        };
        let client_token = take_client_token(&mut root)?;
        let version = match root.remove("version") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| Rejection::bad_request("Invalid version"))?,
            ),
        };
        let state = match root.remove("state") {
            None => return Err(Rejection::bad_request("Missing required node: state")),
            Some(Value::Object(s)) => s,
            Some(_) => return Err(Rejection::bad_request("State node must be an object")),
        };
        let mut desired = None;
        let mut reported = None;
        for (key, value) in state {
            let (slot, what) = match key.as_str() {
                "desired" => (&mut desired, "Desired"),
                "reported" => (&mut reported, "Reported"),
                _ => return Err(Rejection::bad_request("State contains an invalid node")),
            };
            *slot = Some(match value {
                Value::Null => SectionPatch::Clear,
                Value::Object(m) => {
                    if 1 + m.values().map(json::depth).max().unwrap_or(0) > limits.max_depth {
                        return Err(Rejection::bad_request(format!(
                            "JSON contains too many levels of nesting; maximum is {}",
                            limits.max_depth
                        )));
                    }
                    SectionPatch::Merge(m)
                }
                _ => {
                    return Err(Rejection::bad_request(format!(
                        "{what} node must be an object"
                    )));
                }
            });
        }
        if desired.is_none() && reported.is_none() {
            return Err(Rejection::bad_request(
                "State node must contain desired or reported",
            ));
        }
        Ok(Self {
            desired,
            reported,
            version,
            client_token,
        })
    }
}

/// Reads the optional `clientToken` of a get/delete payload (which may be empty).
pub fn parse_client_token(payload: &[u8]) -> Result<Option<String>, Rejection> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(mut root)) => take_client_token(&mut root),
        _ => Err(Rejection::bad_request("Invalid JSON")),
    }
}

fn take_client_token(root: &mut Map<String, Value>) -> Result<Option<String>, Rejection> {
    match root.remove("clientToken") {
        None => Ok(None),
        Some(Value::String(t)) if t.len() <= MAX_CLIENT_TOKEN_BYTES => Ok(Some(t)),
        Some(_) => Err(Rejection::bad_request("Invalid clientToken")),
    }
}

impl Shadow {
    /// Validates an update against this shadow and returns the change to apply.
    pub fn decide_update(
        &self,
        req: &UpdateRequest,
        now: u64,
        limits: &Limits,
    ) -> Result<ShadowChange, Rejection> {
        self.update(req, now, limits).map(|(change, _)| change)
    }

    /// [`Shadow::decide_update`] that also returns the shadow after the change: deciding
    /// must apply the change to measure the result, and a caller that needs the new state
    /// (a twin) should not apply it a second time.
    pub fn update(
        &self,
        req: &UpdateRequest,
        now: u64,
        limits: &Limits,
    ) -> Result<(ShadowChange, Shadow), Rejection> {
        if let Some(v) = req.version
            && v != self.version
        {
            return Err(Rejection::version_conflict());
        }
        let change = ShadowChange {
            op: ChangeOp::Update {
                desired: req.desired.clone(),
                reported: req.reported.clone(),
            },
            version: self.version + 1,
            timestamp: now,
            client_token: req.client_token.clone(),
            at: now * 1000,
            by: None,
        };
        // The resulting state must fit: apply to a copy and measure.
        let mut next = self.clone();
        next.apply(&change);
        let size = next.desired.as_ref().map_or(0, json::encoded_len)
            + next.reported.as_ref().map_or(0, json::encoded_len);
        if size > limits.max_state_bytes {
            return Err(Rejection::too_large(limits.max_state_bytes));
        }
        Ok((change, next))
    }

    /// Validates a delete: the shadow must exist.
    pub fn decide_delete(
        &self,
        name: &str,
        client_token: Option<String>,
        now: u64,
    ) -> Result<ShadowChange, Rejection> {
        if !self.exists {
            return Err(Rejection::no_shadow(name));
        }
        Ok(ShadowChange {
            op: ChangeOp::Delete,
            version: self.version,
            timestamp: now,
            client_token,
            at: now * 1000,
            by: None,
        })
    }

    /// Applies an accepted change.
    pub fn apply(&mut self, change: &ShadowChange) {
        match &change.op {
            ChangeOp::Update { desired, reported } => {
                apply_section(
                    &mut self.desired,
                    &mut self.metadata_desired,
                    desired,
                    change.timestamp,
                );
                apply_section(
                    &mut self.reported,
                    &mut self.metadata_reported,
                    reported,
                    change.timestamp,
                );
                self.exists = true;
            }
            ChangeOp::Delete => {
                let version = self.version;
                *self = Self::default();
                self.version = version;
            }
        }
        self.version = change.version;
        self.timestamp = change.timestamp;
    }

    /// Desired leaves that differ from reported.
    pub fn delta(&self) -> Option<Map<String, Value>> {
        json::delta(self.desired.as_ref()?, self.reported.as_ref())
    }

    fn view(&self, with_delta: bool) -> DocumentView<'_> {
        DocumentView {
            state: StateView {
                desired: self.desired.as_ref(),
                reported: self.reported.as_ref(),
                delta: if with_delta { self.delta() } else { None },
            },
            metadata: MetadataView {
                desired: self.metadata_desired.as_ref(),
                reported: self.metadata_reported.as_ref(),
            },
            version: self.version,
        }
    }
}

/// A shadow as AWS shows it, borrowed: serializing it copies nothing.
#[derive(Serialize)]
pub struct DocumentView<'a> {
    state: StateView<'a>,
    metadata: MetadataView<'a>,
    version: u64,
}

#[derive(Serialize)]
struct StateView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    desired: Option<&'a Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reported: Option<&'a Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<Map<String, Value>>,
}

#[derive(Serialize)]
struct MetadataView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    desired: Option<&'a Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reported: Option<&'a Map<String, Value>>,
}

fn apply_section(
    section: &mut Option<Map<String, Value>>,
    meta: &mut Option<Map<String, Value>>,
    patch: &Option<SectionPatch>,
    timestamp: u64,
) {
    match patch {
        None => {}
        Some(SectionPatch::Clear) => {
            *section = None;
            *meta = None;
        }
        Some(SectionPatch::Merge(p)) => {
            let s = section.get_or_insert_with(Map::new);
            json::merge(s, p);
            let m = meta.get_or_insert_with(Map::new);
            json::merge_metadata(m, p, timestamp);
            if s.is_empty() {
                *section = None;
                *meta = None;
            }
        }
    }
}

fn with_token(mut payload: Map<String, Value>, client_token: Option<&str>) -> Value {
    if let Some(t) = client_token {
        payload.insert("clientToken".into(), Value::from(t));
    }
    Value::Object(payload)
}

/// The payloads AWS IoT publishes, built from shadows and changes.
pub mod payload {
    use serde::ser::{SerializeMap, SerializeSeq, Serializer};

    use super::*;

    /// `update/accepted`: the request's state, its metadata, the new version (for a
    /// delete, what `delete/accepted` says). Written straight from the change: no JSON
    /// tree is built for it.
    pub fn update_accepted(change: &ShadowChange) -> UpdateAccepted<'_> {
        UpdateAccepted {
            sections: match &change.op {
                ChangeOp::Update { desired, reported } => Some((desired, reported)),
                ChangeOp::Delete => None,
            },
            version: change.version,
            timestamp: change.timestamp,
            client_token: change.client_token.as_deref(),
        }
    }

    /// See [`update_accepted`].
    pub struct UpdateAccepted<'a> {
        sections: Option<(&'a Option<SectionPatch>, &'a Option<SectionPatch>)>,
        version: u64,
        timestamp: u64,
        client_token: Option<&'a str>,
    }

    impl Serialize for UpdateAccepted<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(None)?;
            if let Some((desired, reported)) = self.sections {
                let echo = |metadata| Echo {
                    desired,
                    reported,
                    metadata,
                };
                m.serialize_entry("state", &echo(None))?;
                m.serialize_entry("metadata", &echo(Some(self.timestamp)))?;
            }
            m.serialize_entry("version", &self.version)?;
            m.serialize_entry("timestamp", &self.timestamp)?;
            if let Some(t) = self.client_token {
                m.serialize_entry("clientToken", t)?;
            }
            m.end()
        }
    }

    /// The request's sections as AWS echoes them (nulls included, a cleared section as
    /// `null`), or, with a timestamp, their metadata.
    struct Echo<'a> {
        desired: &'a Option<SectionPatch>,
        reported: &'a Option<SectionPatch>,
        metadata: Option<u64>,
    }

    impl Serialize for Echo<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(None)?;
            for (name, patch) in [("desired", self.desired), ("reported", self.reported)] {
                match (patch, self.metadata) {
                    (None, _) => {}
                    (Some(SectionPatch::Merge(v)), None) => m.serialize_entry(name, v)?,
                    (Some(SectionPatch::Clear), None) => m.serialize_entry(name, &())?,
                    (Some(SectionPatch::Merge(v)), Some(t)) => {
                        m.serialize_entry(name, &Metadata::Object(v, t))?;
                    }
                    (Some(SectionPatch::Clear), Some(t)) => {
                        m.serialize_entry(name, &Metadata::Leaf(t))?;
                    }
                }
            }
            m.end()
        }
    }

    /// [`json::metadata_for`] written as it is walked: `{"timestamp": t}` per leaf, the
    /// same shape as objects, one entry per element for arrays.
    enum Metadata<'a> {
        Object(&'a Map<String, Value>, u64),
        Array(&'a [Value], u64),
        Leaf(u64),
    }

    impl<'a> Metadata<'a> {
        fn of(value: &'a Value, t: u64) -> Self {
            match value {
                Value::Object(m) => Self::Object(m, t),
                Value::Array(a) => Self::Array(a, t),
                _ => Self::Leaf(t),
            }
        }
    }

    impl Serialize for Metadata<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match *self {
                Self::Object(map, t) => {
                    let mut m = s.serialize_map(Some(map.len()))?;
                    for (k, v) in map {
                        m.serialize_entry(k, &Metadata::of(v, t))?;
                    }
                    m.end()
                }
                Self::Array(items, t) => {
                    let mut seq = s.serialize_seq(Some(items.len()))?;
                    for v in items {
                        seq.serialize_element(&Metadata::of(v, t))?;
                    }
                    seq.end()
                }
                Self::Leaf(t) => {
                    let mut m = s.serialize_map(Some(1))?;
                    m.serialize_entry("timestamp", &t)?;
                    m.end()
                }
            }
        }
    }

    /// `update/delta`, or `None` when desired and reported agree.
    pub fn delta(current: &Shadow, timestamp: u64, client_token: Option<&str>) -> Option<Value> {
        let delta = current.delta()?;
        let meta = current
            .metadata_desired
            .as_ref()
            .map(|m| json::metadata_subset(m, &delta))
            .unwrap_or_default();
        let mut p = Map::new();
        p.insert("version".into(), Value::from(current.version));
        p.insert("timestamp".into(), Value::from(timestamp));
        p.insert("state".into(), Value::Object(delta));
        p.insert("metadata".into(), Value::Object(meta));
        Some(with_token(p, client_token))
    }

    /// `update/documents`: the shadow before and after.
    pub fn documents<'a>(
        previous: &'a Shadow,
        current: &'a Shadow,
        timestamp: u64,
        client_token: Option<&'a str>,
    ) -> Documents<'a> {
        Documents {
            previous: previous.view(false),
            current: current.view(false),
            timestamp,
            client_token,
        }
    }

    #[derive(Serialize)]
    pub struct Documents<'a> {
        previous: DocumentView<'a>,
        current: DocumentView<'a>,
        timestamp: u64,
        #[serde(rename = "clientToken", skip_serializing_if = "Option::is_none")]
        client_token: Option<&'a str>,
    }

    /// `get/accepted`: state with delta, metadata, version.
    pub fn get_accepted<'a>(
        current: &'a Shadow,
        now: u64,
        client_token: Option<&'a str>,
    ) -> GetAccepted<'a> {
        GetAccepted {
            doc: current.view(true),
            timestamp: now,
            client_token,
        }
    }

    #[derive(Serialize)]
    pub struct GetAccepted<'a> {
        #[serde(flatten)]
        doc: DocumentView<'a>,
        timestamp: u64,
        #[serde(rename = "clientToken", skip_serializing_if = "Option::is_none")]
        client_token: Option<&'a str>,
    }

    /// `delete/accepted`.
    pub fn delete_accepted(change: &ShadowChange) -> Value {
        let mut p = Map::new();
        p.insert("version".into(), Value::from(change.version));
        p.insert("timestamp".into(), Value::from(change.timestamp));
        with_token(p, change.client_token.as_deref())
    }

    /// `*/rejected`.
    pub fn rejected(rejection: &Rejection, now: u64, client_token: Option<&str>) -> Value {
        let mut p = Map::new();
        p.insert("code".into(), Value::from(rejection.code()));
        p.insert("message".into(), Value::from(rejection.message.as_str()));
        p.insert("timestamp".into(), Value::from(now));
        with_token(p, client_token)
    }
}
