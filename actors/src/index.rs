//! The fleet index: every registered twin's searchable state, resident or not, so that
//! queries and filtered subscriptions see the whole fleet without waking twins.
//!
//! Twins update it after each durable commit and before they answer, so a query made
//! after a change was acknowledged sees it (search never lags behind the twin). Shadows
//! are the twins' own `Arc`s: a resident twin's state is not held twice.
//!
//! Besides the views, each index shard keeps an inverted index from (field, scalar
//! value) to twins, with the values of a field in order. A filter's `=`, `IN` and range
//! comparisons become lookups; `AND` intersects and `OR` unites them, and only the
//! candidates are evaluated. What the index cannot answer (`!=`, `NOT`, `EXISTS`)
//! falls back to evaluating every twin. Sharded so that writers on different twins
//! rarely wait for each other.
//!
//! Over 600 lines with its unit tests: the code itself is 540 lines.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde_json::{Map, Value};
use twin_model::filter::{self, CmpOp, Field, FilterTarget, Literal, Section};
use twin_model::telemetry::Latest;
use twin_model::{Connectivity, DeviceId, Filter, Shadow, ShadowName, json};
use twin_store::ThingRecord;

use crate::shard::shard_for;

const SHARDS: usize = 16;

/// A twin as queries see it.
#[derive(Debug, Clone)]
pub struct TwinView {
    pub record: Arc<ThingRecord>,
    pub connectivity: Connectivity,
    /// When the device was last heard from (connected, disconnected, reported state or sent telemetry),
    /// milliseconds since the epoch.
    pub last_seen: u64,
    /// Every shadow ever written, deleted ones included (they keep their version).
    shadows: BTreeMap<ShadowName, ShadowView>,
    /// The latest value of each telemetry key.
    pub telemetry: Arc<Latest>,
    /// The same values nested by their dotted keys, as filters read them.
    telemetry_nested: Arc<Map<String, Value>>,
}

#[derive(Debug, Clone)]
pub struct ShadowView {
    pub shadow: Arc<Shadow>,
    pub delta: Option<Map<String, Value>>,
}

impl TwinView {
    fn new(record: Arc<ThingRecord>) -> Self {
        Self {
            last_seen: 0,
            record,
            connectivity: Connectivity::default(),
            shadows: BTreeMap::new(),
            telemetry: Arc::default(),
            telemetry_nested: Arc::default(),
        }
    }

    pub fn id(&self) -> &DeviceId {
        &self.record.id
    }

    /// A view of a twin from its parts (not from the index).
    pub fn assemble(
        record: Arc<ThingRecord>,
        connectivity: Connectivity,
        shadows: impl IntoIterator<Item = (ShadowName, Arc<Shadow>)>,
        telemetry: Arc<Latest>,
    ) -> Self {
        let mut view = Self::new(record);
        view.connectivity = connectivity;
        for (name, shadow) in shadows {
            view.set_shadow(name, shadow);
        }
        view.set_telemetry(telemetry);
        view
    }

    /// See [`twin_model::event::twin_version`].
    pub fn version(&self) -> u64 {
        twin_model::event::twin_version(self.shadows.values().map(|s| &*s.shadow))
    }

    /// An existing shadow.
    pub fn shadow(&self, name: &ShadowName) -> Option<&ShadowView> {
        self.shadows.get(name).filter(|s| s.shadow.exists)
    }

    /// A shadow as it is now, also when deleted (it keeps its version) or never written
    /// (the default, version 0).
    pub fn shadow_now(&self, name: &ShadowName) -> Arc<Shadow> {
        self.shadows
            .get(name)
            .map(|s| s.shadow.clone())
            .unwrap_or_default()
    }

    /// The existing shadows, the classic one first, then by name.
    pub fn shadows(&self) -> impl Iterator<Item = (&ShadowName, &ShadowView)> {
        self.shadows.iter().filter(|(_, s)| s.shadow.exists)
    }

    fn set_shadow(&mut self, name: ShadowName, shadow: Arc<Shadow>) {
        let delta = shadow.delta();
        self.shadows.insert(name, ShadowView { shadow, delta });
    }

    fn set_telemetry(&mut self, telemetry: Arc<Latest>) {
        self.telemetry_nested = Arc::new(telemetry.nested());
        self.telemetry = telemetry;
    }

    fn seen(&mut self, at: u64) {
        self.last_seen = self.last_seen.max(at);
    }
}

impl FilterTarget for TwinView {
    fn id(&self) -> &str {
        self.record.id.as_str()
    }

    fn connected(&self) -> bool {
        self.connectivity.connected
    }

    fn attributes(&self) -> Option<&Map<String, Value>> {
        Some(&self.record.attributes)
    }

    fn has_shadow(&self, shadow: &ShadowName) -> bool {
        self.shadow(shadow).is_some()
    }

    fn section(&self, shadow: &ShadowName, section: Section) -> Option<&Map<String, Value>> {
        let s = self.shadow(shadow)?;
        match section {
            Section::Desired => s.shadow.desired.as_ref(),
            Section::Reported => s.shadow.reported.as_ref(),
            Section::Delta => s.delta.as_ref(),
        }
    }

    fn telemetry(&self) -> Option<&Map<String, Value>> {
        Some(&self.telemetry_nested)
    }
}

/// One page of a query's answer, in id order.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<Arc<TwinView>>,
    /// Twins matching the filter, on all pages.
    pub total: usize,
    pub has_next: bool,
}

/// A scalar as the inverted index orders it: booleans, then numbers, then strings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Term {
    Bool(bool),
    Num(Num),
    Str(Box<str>),
}

/// A finite number with a total order (JSON has no NaN; -0 is stored as 0).
#[derive(Debug, Clone, Copy)]
struct Num(f64);

impl PartialEq for Num {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0).is_eq()
    }
}
impl Eq for Num {}
impl PartialOrd for Num {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Num {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}
impl std::hash::Hash for Num {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

fn num(n: f64) -> Term {
    Term::Num(Num(if n == 0.0 { 0.0 } else { n }))
}

fn term(v: &Value) -> Option<Term> {
    match v {
        Value::Bool(b) => Some(Term::Bool(*b)),
        Value::Number(n) => n.as_f64().map(num),
        Value::String(s) => Some(Term::Str(s.as_str().into())),
        _ => None,
    }
}

fn literal_term(l: &Literal) -> Term {
    match l {
        Literal::Bool(b) => Term::Bool(*b),
        Literal::Number(n) => num(*n),
        Literal::String(s) => Term::Str(s.as_str().into()),
    }
}

type Postings = Vec<(Box<str>, Term)>;

/// Every (field, scalar) of a twin, keyed as [`Field`] prints the field.
fn postings(view: &TwinView) -> Postings {
    fn leaves(out: &mut Postings, key: &mut String, map: &Map<String, Value>) {
        for (k, v) in map {
            let len = key.len();
            filter::push_segment(key, k);
            match v {
                Value::Object(m) => leaves(out, key, m),
                Value::Array(items) => out.extend(
                    items
                        .iter()
                        .filter_map(term)
                        .map(|t| (key.as_str().into(), t)),
                ),
                other => out.extend(term(other).map(|t| (key.as_str().into(), t))),
            }
            key.truncate(len);
        }
    }
    let mut out = vec![("connected".into(), Term::Bool(view.connectivity.connected))];
    let mut key = String::from("attributes");
    leaves(&mut out, &mut key, &view.record.attributes);
    let mut key = String::from("telemetry");
    leaves(&mut out, &mut key, &view.telemetry_nested);
    for (name, _) in view.shadows() {
        for section in [Section::Desired, Section::Reported, Section::Delta] {
            if let Some(map) = view.section(name, section) {
                let mut key = Field::Shadow {
                    shadow: name.clone(),
                    section,
                    path: Vec::new(),
                }
                .to_string();
                leaves(&mut out, &mut key, map);
            }
        }
    }
    out
}

struct Entry {
    view: Arc<TwinView>,
    postings: Postings,
}

#[derive(Default)]
struct IndexShard {
    ids: BTreeMap<DeviceId, u32>,
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    terms: HashMap<Box<str>, BTreeMap<Term, HashSet<u32>>>,
}

impl IndexShard {
    fn unpost(&mut self, slot: u32, postings: &Postings) {
        for (key, t) in postings {
            if let Some(values) = self.terms.get_mut(key) {
                if let Some(set) = values.get_mut(t) {
                    set.remove(&slot);
                    if set.is_empty() {
                        values.remove(t);
                    }
                }
                if values.is_empty() {
                    self.terms.remove(key);
                }
            }
        }
    }

    fn put(&mut self, view: TwinView) {
        let postings = postings(&view);
        let slot = match self.ids.get(view.id()) {
            Some(&slot) => {
                if let Some(old) = self.slots[slot as usize].take() {
                    self.unpost(slot, &old.postings);
                }
                slot
            }
            None => {
                let slot = self.free.pop().unwrap_or_else(|| {
                    self.slots.push(None);
                    (self.slots.len() - 1) as u32
                });
                self.ids.insert(view.id().clone(), slot);
                slot
            }
        };
        for (key, t) in &postings {
            self.terms
                .entry(key.clone())
                .or_default()
                .entry(t.clone())
                .or_default()
                .insert(slot);
        }
        self.slots[slot as usize] = Some(Entry {
            view: Arc::new(view),
            postings,
        });
    }

    fn remove(&mut self, thing: &DeviceId) {
        if let Some(slot) = self.ids.remove(thing)
            && let Some(old) = self.slots[slot as usize].take()
        {
            self.unpost(slot, &old.postings);
            self.free.push(slot);
        }
    }

    fn get(&self, thing: &DeviceId) -> Option<&Arc<TwinView>> {
        let slot = *self.ids.get(thing)?;
        self.slots[slot as usize].as_ref().map(|e| &e.view)
    }

    fn lookup(&self, field: &Field, lo: Bound<Term>, hi: Bound<Term>) -> HashSet<u32> {
        let key = field.to_string();
        let Some(values) = self.terms.get(key.as_str()) else {
            return HashSet::new();
        };
        values
            .range((lo, hi))
            .flat_map(|(_, slots)| slots.iter().copied())
            .collect()
    }

    /// Twins that may match `f` (a superset of the matches), or `None` for "any".
    fn candidates(&self, f: &Filter) -> Option<HashSet<u32>> {
        use Bound::*;
        match f {
            Filter::And(a, b) => match (self.candidates(a), self.candidates(b)) {
                (Some(x), Some(y)) => Some(x.intersection(&y).copied().collect()),
                (Some(x), None) | (None, Some(x)) => Some(x),
                (None, None) => None,
            },
            Filter::Or(a, b) => {
                let mut x = self.candidates(a)?;
                x.extend(self.candidates(b)?);
                Some(x)
            }
            Filter::Not(_) | Filter::Exists(_) => None,
            Filter::In { field, values } => {
                let mut all = HashSet::new();
                for v in values {
                    all.extend(self.candidates(&Filter::Compare {
                        field: field.clone(),
                        op: CmpOp::Eq,
                        value: v.clone(),
                    })?);
                }
                Some(all)
            }
            Filter::Compare { field, op, value } => {
                if let Field::Id = field {
                    return match (op, value) {
                        (CmpOp::Eq, Literal::String(s)) => Some(
                            DeviceId::parse(s)
                                .ok()
                                .and_then(|id| self.ids.get(&id).copied())
                                .into_iter()
                                .collect(),
                        ),
                        _ => None,
                    };
                }
                if matches!(field, Field::NamedShadow(_)) {
                    return Some(HashSet::new());
                }
                let t = literal_term(value);
                // The run of the literal's type: numbers compare with numbers only.
                let (first, last) = match &t {
                    Term::Bool(_) => (Term::Bool(false), Included(Term::Bool(true))),
                    Term::Num(_) => (num(f64::NEG_INFINITY), Included(num(f64::INFINITY))),
                    Term::Str(_) => (Term::Str("".into()), Unbounded),
                };
                let (lo, hi) = match op {
                    CmpOp::Eq => (Included(t.clone()), Included(t)),
                    CmpOp::Ne => return None,
                    CmpOp::Lt => (Included(first), Excluded(t)),
                    CmpOp::Le => (Included(first), Included(t)),
                    CmpOp::Gt => (Excluded(t), last),
                    CmpOp::Ge => (Included(t), last),
                };
                Some(self.lookup(field, lo, hi))
            }
        }
    }

    fn matching(&self, filter: &Filter, out: &mut Vec<Arc<TwinView>>) {
        let check = |e: &Entry| filter.matches(&*e.view).then(|| e.view.clone());
        match self.candidates(filter) {
            Some(slots) => out.extend(
                slots
                    .into_iter()
                    .filter_map(|s| self.slots[s as usize].as_ref().and_then(check)),
            ),
            None => out.extend(self.slots.iter().flatten().filter_map(check)),
        }
    }
}

/// See the module documentation.
pub struct FleetIndex {
    shards: Box<[RwLock<IndexShard>]>,
}

impl Default for FleetIndex {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
        }
    }
}

impl FleetIndex {
    fn read(&self, thing: &DeviceId) -> RwLockReadGuard<'_, IndexShard> {
        // A panic while holding the lock cannot leave a shard half-updated: `put`
        // and `remove` only panic on allocation failure, which aborts.
        self.shards[shard_for(thing, SHARDS)]
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, thing: &DeviceId) -> RwLockWriteGuard<'_, IndexShard> {
        self.shards[shard_for(thing, SHARDS)]
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn all(&self) -> impl Iterator<Item = RwLockReadGuard<'_, IndexShard>> {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Changes a registered twin's view (nothing for an unknown twin).
    fn modify(&self, thing: &DeviceId, f: impl FnOnce(&mut TwinView)) {
        let mut shard = self.write(thing);
        if let Some(current) = shard.get(thing) {
            let mut view = TwinView::clone(current);
            f(&mut view);
            shard.put(view);
        }
    }

    /// Adds a thing or replaces its registry record.
    pub fn put_record(&self, record: ThingRecord) {
        let thing = record.id.clone();
        let mut shard = self.write(&thing);
        let view = match shard.get(&thing) {
            Some(current) => TwinView {
                record: Arc::new(record),
                ..TwinView::clone(current)
            },
            None => TwinView::new(Arc::new(record)),
        };
        shard.put(view);
    }

    pub fn set_connectivity(&self, thing: &DeviceId, connectivity: Connectivity) {
        self.modify(thing, |v| {
            v.seen(connectivity.since);
            v.connectivity = connectivity;
        });
    }

    /// A shadow's new state; `reported_at` (milliseconds) when the device reported.
    pub fn set_shadow(
        &self,
        thing: &DeviceId,
        name: ShadowName,
        shadow: Arc<Shadow>,
        reported_at: Option<u64>,
    ) {
        self.modify(thing, |v| {
            v.seen(reported_at.unwrap_or(0));
            v.set_shadow(name, shadow);
        });
    }

    /// The thing's latest telemetry after a reading taken at `at` (milliseconds).
    pub fn set_telemetry(&self, thing: &DeviceId, telemetry: Arc<Latest>, at: u64) {
        self.modify(thing, |v| {
            v.seen(at);
            v.set_telemetry(telemetry);
        });
    }

    pub fn remove(&self, thing: &DeviceId) {
        self.write(thing).remove(thing);
    }

    /// Loads a stored twin (at start, before twins run).
    pub fn load(&self, twin: twin_store::IndexedTwin) {
        let thing = twin.record.id.clone();
        self.put_record(twin.record);
        self.set_connectivity(&thing, twin.connectivity);
        for (name, shadow) in twin.shadows {
            let reported_at = shadow
                .metadata_reported
                .as_ref()
                .map(|m| json::latest_timestamp(m) * 1000);
            self.set_shadow(&thing, name, Arc::new(shadow), reported_at);
        }
        let at = twin.telemetry.iter().map(|(_, s)| s.at).max().unwrap_or(0);
        self.set_telemetry(&thing, Arc::new(twin.telemetry), at);
    }

    /// Loads a stored twin unless the index has a newer version of it (a twin of a shard
    /// this node just took on: the index may have an older view of it, from before
    /// another node changed it, or a newer one, from its first change here).
    pub fn refresh(&self, twin: twin_store::IndexedTwin) {
        let stored = twin_model::event::twin_version(twin.shadows.iter().map(|(_, s)| s));
        let newer_here = self
            .get(&twin.record.id)
            .is_some_and(|v| v.version() > stored);
        if !newer_here {
            self.load(twin);
        }
    }

    pub fn get(&self, thing: &DeviceId) -> Option<Arc<TwinView>> {
        self.read(thing).get(thing).cloned()
    }

    /// Registered twins.
    pub fn len(&self) -> usize {
        self.all().map(|s| s.ids.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Twins matching `filter` (all without one), in id order, after `after`.
    pub fn query(&self, filter: Option<&Filter>, after: Option<&DeviceId>, first: usize) -> Page {
        let start = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.clone()));
        let (mut items, total) = match filter {
            None => {
                let mut items = Vec::new();
                let mut total = 0;
                for shard in self.all() {
                    total += shard.ids.len();
                    items.extend(
                        shard
                            .ids
                            .range((start.clone(), Bound::Unbounded))
                            .take(first + 1)
                            .filter_map(|(id, _)| shard.get(id).cloned()),
                    );
                }
                (items, total)
            }
            Some(f) => {
                let mut items = Vec::new();
                for shard in self.all() {
                    shard.matching(f, &mut items);
                }
                let total = items.len();
                (items, total)
            }
        };
        // Only the page is sorted: the `first + 1` smallest ids after the cursor are
        // selected in linear time, so a filter matching half the fleet costs no sort.
        if let Some(a) = after {
            items.retain(|v| v.id() > a);
        }
        let by_id = |a: &Arc<TwinView>, b: &Arc<TwinView>| a.id().cmp(b.id());
        if items.len() > first + 1 {
            items.select_nth_unstable_by(first, by_id);
            items.truncate(first + 1);
        }
        items.sort_unstable_by(by_id);
        let mut page = items;
        let has_next = page.len() > first;
        page.truncate(first);
        Page {
            items: page,
            total,
            has_next,
        }
    }

    /// Whether a twin matches a filter now.
    pub fn matches(&self, thing: &DeviceId, filter: &Filter) -> bool {
        self.get(thing).is_some_and(|v| filter.matches(&*v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use twin_model::{Limits, UpdateRequest};

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn index_with(n: usize) -> FleetIndex {
        let index = FleetIndex::default();
        for i in 0..n {
            let (mut record, _) = ThingRecord::new(id(&format!("t{i:03}")), 0).unwrap();
            record.attributes =
                json!({"site": format!("s{}", i % 10), "tags": ["a", i.to_string()]})
                    .as_object()
                    .unwrap()
                    .clone();
            index.put_record(record);
            let body = json!({"state": {"reported": {"temp": i, "nested": {"ok": i % 2 == 0}}, "desired": {"temp": 5}}});
            let req =
                UpdateRequest::parse(body.to_string().as_bytes(), &Limits::default()).unwrap();
            let (_, shadow) = Shadow::default()
                .update(&req, 1, &Limits::default())
                .unwrap();
            index.set_shadow(
                &id(&format!("t{i:03}")),
                ShadowName::classic(),
                Arc::new(shadow),
                None,
            );
        }
        index
    }

    /// The index answers exactly what evaluating the filter on every twin answers.
    #[test]
    fn indexed_answers_equal_a_full_scan() {
        let index = index_with(100);
        for filter in [
            "reported.temp > 90",
            "reported.temp >= 90 AND attributes.site = \"s3\"",
            "reported.temp < 3 OR id = \"t050\"",
            "attributes.tags = \"7\"",
            "attributes.tags IN (\"7\", \"8\")",
            "reported.nested.ok = true AND reported.temp <= 10",
            "delta.temp EXISTS AND reported.temp != 5",
            "NOT reported.temp > 1",
            "id > \"t098\"",
            "attributes.site < \"s1\"",
            "attributes.site > \"s8\"",
            "reported.temp = \"5\"",
            "connected = false AND reported.temp = 5",
            "shadows.fw EXISTS",
        ] {
            let f = Filter::parse(filter).unwrap();
            let got: Vec<String> = index
                .query(Some(&f), None, 1000)
                .items
                .iter()
                .map(|v| v.id().to_string())
                .collect();
            let mut want: Vec<String> = index
                .query(None, None, 1000)
                .items
                .iter()
                .filter(|v| f.matches(&***v))
                .map(|v| v.id().to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "{filter}");
        }
    }

    #[test]
    fn pages_follow_id_order_and_count_everything() {
        let index = index_with(25);
        let first = index.query(None, None, 10);
        assert_eq!(first.total, 25);
        assert!(first.has_next);
        assert_eq!(first.items[0].id().as_str(), "t000");
        let last = index.query(None, Some(&id("t019")), 10);
        assert_eq!(last.items.len(), 5);
        assert!(!last.has_next);
        let f = Filter::parse("reported.temp >= 10").unwrap();
        let page = index.query(Some(&f), Some(&id("t012")), 5);
        assert_eq!(page.total, 15);
        assert_eq!(page.items[0].id().as_str(), "t013");
        assert!(page.has_next);
    }

    #[test]
    fn paging_through_a_filter_gives_every_match_once_in_order() {
        let index = index_with(200);
        let f = Filter::parse("reported.nested.ok = true OR attributes.site = \"s3\"").unwrap();
        let all = index.query(Some(&f), None, 1000);
        let (mut seen, mut after) = (Vec::new(), None);
        loop {
            let page = index.query(Some(&f), after.as_ref(), 7);
            assert_eq!(page.total, all.total);
            seen.extend(page.items.iter().map(|v| v.id().clone()));
            after = seen.last().cloned();
            if !page.has_next {
                break;
            }
        }
        let want: Vec<DeviceId> = all.items.iter().map(|v| v.id().clone()).collect();
        assert_eq!(seen, want);
        assert!(want.windows(2).all(|w| w[0] < w[1]), "ascending ids");
        assert_eq!(want.len(), 120, "100 even + 20 odd ones at site s3");
    }

    #[test]
    fn updates_replace_old_terms() {
        let index = index_with(3);
        let f = Filter::parse("reported.temp = 1").unwrap();
        assert!(index.matches(&id("t001"), &f));
        let body = json!({"state": {"reported": {"temp": 42}}});
        let req = UpdateRequest::parse(body.to_string().as_bytes(), &Limits::default()).unwrap();
        let current = index.get(&id("t001")).unwrap();
        let old = current
            .shadow(&ShadowName::classic())
            .unwrap()
            .shadow
            .clone();
        let (_, next) = old.update(&req, 2, &Limits::default()).unwrap();
        index.set_shadow(
            &id("t001"),
            ShadowName::classic(),
            Arc::new(next),
            Some(2000),
        );
        assert!(index.query(Some(&f), None, 10).items.is_empty());
        let f = Filter::parse("reported.temp = 42").unwrap();
        assert_eq!(index.query(Some(&f), None, 10).total, 1);
        assert_eq!(index.get(&id("t001")).unwrap().last_seen, 2000);
        assert_eq!(index.get(&id("t001")).unwrap().version(), 2);
        index.remove(&id("t001"));
        assert_eq!(index.query(Some(&f), None, 10).total, 0);
        assert_eq!(index.len(), 2);
    }
}
