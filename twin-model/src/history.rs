//! A shadow's history: its retained changes, who made each one, and the shadow as it was
//! at any instant they cover (time travel).
//!
//! Each retained change is stored with the shadow it produced, so the state at an instant
//! is one lookup (the newest change accepted at or before it), never a replay from a base
//! that retention may already have dropped. Retention drops the oldest changes first, so
//! what is retained is always the newest run of a shadow's changes.

use serde::{Deserialize, Serialize};

use crate::shadow::{ChangeOp, Shadow, ShadowChange};

/// Who asked for a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// The device itself, over MQTT.
    Device,
    /// An API call, with the id and note of the token it used.
    Token {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// Doppel itself, for a job: a firmware job that succeeded reports the version it
    /// installed.
    Job { id: String },
}

/// One retained change and the shadow right after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub change: ShadowChange,
    /// `None` for changes stored before the shadow was kept with them: those cannot
    /// answer time travel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
}

impl HistoryEntry {
    /// The stored form of an entry, written without copying the change or the shadow:
    /// `{"change":…,"shadow":…}`.
    pub fn encode(change: &ShadowChange, shadow: &Shadow) -> Vec<u8> {
        let shadow = serde_json::to_vec(shadow).expect("a shadow serializes");
        Self::encode_with(change, &shadow)
    }

    /// [`encode`](Self::encode) with the shadow already serialized (by
    /// `serde_json::to_vec`), as a store writing the shadow's own row has it: the same
    /// bytes, the shadow serialized once for both.
    pub fn encode_with(change: &ShadowChange, shadow: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(shadow.len() + 256);
        out.extend_from_slice(br#"{"change":"#);
        serde_json::to_writer(&mut out, change).expect("a change serializes");
        out.extend_from_slice(br#","shadow":"#);
        out.extend_from_slice(shadow);
        out.push(b'}');
        out
    }

    /// Reads a stored entry, or a bare [`ShadowChange`] as stored before entries were.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes).or_else(|e| {
            serde_json::from_slice::<ShadowChange>(bytes)
                .map(|change| Self {
                    change,
                    shadow: None,
                })
                .map_err(|_| e)
        })
    }

    /// The entry's place in its shadow's history: a delete keeps its shadow's version,
    /// so it follows the update of that version.
    pub fn position(&self) -> u64 {
        position(&self.change)
    }
}

/// The place of a change in its shadow's history (see [`HistoryEntry::position`]).
pub fn position(change: &ShadowChange) -> u64 {
    2 * change.version + u64::from(matches!(change.op, ChangeOp::Delete))
}

/// The asked instant is older than what is retained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotRetained {
    /// The oldest instant that can be answered; `None` when no change is retained.
    pub oldest: Option<u64>,
}

/// The shadow as it was at `at` (milliseconds since the epoch): `Ok(None)` when it did not
/// exist then (not yet created, or deleted).
///
/// `retained` is what is kept of the shadow's history, newest first and already cut to
/// the retention by age; `current` is the shadow now.
pub fn state_at(
    retained: &[HistoryEntry],
    current: &Shadow,
    at: u64,
) -> Result<Option<Shadow>, NotRetained> {
    if current.version == 0 && !current.exists {
        // No change was ever accepted.
        return Ok(None);
    }
    // Only the newest run of entries that carry their shadow can answer.
    let usable = retained
        .iter()
        .position(|e| e.shadow.is_none())
        .unwrap_or(retained.len());
    let usable = &retained[..usable];
    if let Some(e) = usable.iter().find(|e| e.change.at <= at) {
        return Ok(match e.change.op {
            ChangeOp::Delete => None,
            ChangeOp::Update { .. } => e.shadow.clone(),
        });
    }
    match usable.last() {
        // The first change the shadow ever had: before it, the shadow did not exist.
        Some(first)
            if first.change.version == 1
                && matches!(first.change.op, ChangeOp::Update { .. })
                && usable.len() == retained.len() =>
        {
            Ok(None)
        }
        Some(oldest) => Err(NotRetained {
            oldest: Some(oldest.change.at),
        }),
        // Every change has aged out: the current shadow has held since its last change,
        // known to the second.
        None if current.exists => {
            let since = (current.timestamp + 1) * 1000;
            if at >= since {
                Ok(Some(current.clone()))
            } else {
                Err(NotRetained {
                    oldest: Some(since),
                })
            }
        }
        None => Err(NotRetained { oldest: None }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shadow::{Limits, UpdateRequest};

    fn update(shadow: &Shadow, body: &str, at: u64) -> HistoryEntry {
        let req = UpdateRequest::parse(body.as_bytes(), &Limits::default()).unwrap();
        let (mut change, next) = shadow.update(&req, at / 1000, &Limits::default()).unwrap();
        change.at = at;
        HistoryEntry {
            change,
            shadow: Some(next),
        }
    }

    /// The entry as it was first written (a derived struct of the two): the bytes of
    /// `encode` are the same, for a new, an updated and a deleted shadow.
    #[test]
    fn entries_are_stored_in_the_format_they_always_had() {
        #[derive(serde::Serialize)]
        struct Stored<'a> {
            change: &'a ShadowChange,
            shadow: &'a Shadow,
        }
        let first = update(
            &Shadow::default(),
            r#"{"state":{"desired":{"on":true,"tags":["a","b"]},"reported":{"on":false}},"clientToken":"t-\"1"}"#,
            5_000,
        );
        let second = update(
            first.shadow.as_ref().unwrap(),
            r#"{"state":{"desired":null,"reported":{"nested":{"x":1.5,"y":null}}}}"#,
            6_000,
        );
        let mut deleted = second.shadow.clone().unwrap();
        let delete = deleted.decide_delete("", None, 7).unwrap();
        deleted.apply(&delete);
        for (change, shadow) in [
            (&first.change, first.shadow.as_ref().unwrap()),
            (&second.change, second.shadow.as_ref().unwrap()),
            (&delete, &deleted),
        ] {
            let derived = serde_json::to_vec(&Stored { change, shadow }).unwrap();
            assert_eq!(
                String::from_utf8(HistoryEntry::encode(change, shadow)).unwrap(),
                String::from_utf8(derived).unwrap()
            );
        }
    }

    #[test]
    fn old_entries_without_their_shadow_still_decode() {
        let e = update(
            &Shadow::default(),
            r#"{"state":{"desired":{"on":true}}}"#,
            5_000,
        );
        let bare = serde_json::to_vec(&e.change).unwrap();
        let old = HistoryEntry::decode(&bare).unwrap();
        assert_eq!(old.change, e.change);
        assert_eq!(old.shadow, None);
        let full = HistoryEntry::encode(&e.change, e.shadow.as_ref().unwrap());
        assert_eq!(HistoryEntry::decode(&full).unwrap(), e);
    }

    #[test]
    fn an_instant_older_than_the_retained_changes_names_the_oldest() {
        let first = update(
            &Shadow::default(),
            r#"{"state":{"desired":{"v":1}}}"#,
            1_000,
        );
        let second = update(
            first.shadow.as_ref().unwrap(),
            r#"{"state":{"desired":{"v":2}}}"#,
            2_000,
        );
        let third = update(
            second.shadow.as_ref().unwrap(),
            r#"{"state":{"desired":{"v":3}}}"#,
            3_000,
        );
        let current = third.shadow.clone().unwrap();
        let retained = [third, second];
        assert_eq!(
            state_at(&retained, &current, 1_500),
            Err(NotRetained {
                oldest: Some(2_000)
            })
        );
        assert_eq!(
            state_at(&retained, &current, 2_999).unwrap(),
            retained[1].shadow
        );
        // Nothing retained any more: only the instants after the last change answer.
        assert_eq!(
            state_at(&[], &current, 4_000).unwrap(),
            Some(current.clone())
        );
        assert_eq!(
            state_at(&[], &current, 3_500),
            Err(NotRetained {
                oldest: Some(4_000)
            })
        );
    }
}
