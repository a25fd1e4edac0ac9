//! Time travel: for any sequence of accepted changes and any instant, the state at that
//! instant is the state that was current then, as far as the retained history reaches.

use proptest::prelude::*;
use serde_json::{Value, json};
use twin_model::history::{HistoryEntry, NotRetained, state_at};
use twin_model::{Limits, Shadow, UpdateRequest};

#[derive(Debug, Clone)]
enum Op {
    /// An update of `desired.<key>` (`None`: the key removed) or, when `reported`, of
    /// the reported section.
    Update {
        reported: bool,
        key: u8,
        value: Option<u8>,
    },
    Delete,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (any::<bool>(), 0u8..3, prop::option::of(0u8..4))
            .prop_map(|(reported, key, value)| Op::Update { reported, key, value }),
        1 => Just(Op::Delete),
    ]
}

/// The shadow after each accepted change (`None`: deleted), with when it was accepted.
type Timeline = Vec<(u64, Option<Shadow>)>;

/// Runs the changes (each `gap` ms after the previous; several may share an instant) and
/// returns the history, newest first, the timeline, and the shadow at the end.
fn run(ops: &[(u64, Op)]) -> (Vec<HistoryEntry>, Timeline, Shadow) {
    let limits = Limits::default();
    let mut now = 1_700_000_000_000;
    let mut shadow = Shadow::default();
    let mut entries = Vec::new();
    let mut timeline = Vec::new();
    for (gap, op) in ops {
        now += gap;
        let accepted = match op {
            Op::Update {
                reported,
                key,
                value,
            } => {
                let section = if *reported { "reported" } else { "desired" };
                let value = value.map_or(Value::Null, Value::from);
                let body = json!({"state": {section: {format!("k{key}"): value}}});
                let req = UpdateRequest::parse(body.to_string().as_bytes(), &limits).unwrap();
                shadow.update(&req, now / 1000, &limits).ok()
            }
            Op::Delete => shadow.decide_delete("s", None, now / 1000).ok().map(|c| {
                let mut next = Shadow {
                    version: shadow.version,
                    ..Shadow::default()
                };
                next.apply(&c);
                (c, next)
            }),
        };
        let Some((mut change, next)) = accepted else {
            continue;
        };
        change.at = now;
        timeline.push((now, next.exists.then(|| next.clone())));
        entries.push(HistoryEntry {
            change,
            shadow: Some(next.clone()),
        });
        shadow = next;
    }
    entries.reverse();
    (entries, timeline, shadow)
}

/// What was current at `at`: the state after the last change accepted at or before it.
fn current_then(timeline: &[(u64, Option<Shadow>)], at: u64) -> Option<Shadow> {
    timeline
        .iter()
        .rev()
        .find(|(t, _)| *t <= at)
        .and_then(|(_, s)| s.clone())
}

proptest! {
    #[test]
    fn the_state_at_any_instant_is_the_state_current_then(
        ops in prop::collection::vec((0u64..2_500, op()), 0..40),
        probes in prop::collection::vec(0u64..110_000, 1..20),
        kept in 1usize..45,
    ) {
        let (entries, timeline, current) = run(&ops);
        let start = 1_700_000_000_000 - 5_000;
        // Everything retained: every instant answers, and answers right.
        for p in &probes {
            let at = start + p;
            prop_assert_eq!(state_at(&entries, &current, at), Ok(current_then(&timeline, at)));
        }
        // Only the newest `kept` retained: instants they cover answer right; older ones
        // name the oldest retained instant, unless the oldest kept is the first change.
        let retained = &entries[..kept.min(entries.len())];
        for p in &probes {
            let at = start + p;
            match state_at(retained, &current, at) {
                Ok(state) => prop_assert_eq!(state, current_then(&timeline, at)),
                Err(NotRetained { oldest }) => {
                    let oldest_kept = retained.last().map(|e| e.change.at);
                    prop_assert!(retained.len() < entries.len());
                    prop_assert_eq!(oldest, oldest_kept);
                    prop_assert!(at < oldest.unwrap());
                }
            }
        }
    }
}
