//! Metrics plumbing shared by Doppel's crates.
//!
//! Each crate declares its own metrics in one `telemetry.rs` (names, units, help text, the
//! values each label takes) and registers them into the one [`Registry`] that `/metrics`
//! encodes. The hot path never takes a lock: counters and gauges are atomics, a labelled
//! family's children are resolved once when the crate's metrics are created (see
//! [`children`]), and [`Histogram`] is atomics too (prometheus-client's own histogram
//! takes a mutex per observation).
//!
//! The scrape answers in the Prometheus text format (0.0.4), or in OpenMetrics when the
//! scraper's `Accept` header prefers it ([`Format::negotiate`]), as Prometheus does.
//! OpenMetrics carries exemplars: each latency bucket names the trace of its latest traced
//! observation ([`Histogram::observe_traced`]), so that a slow bucket leads to a trace.

pub mod trace;

use std::cell::RefCell;
use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{EncodeGaugeValue, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::MetricConstructor;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};

pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::DescriptorEncoder;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::registry::{Registry, Unit};

/// A label set given as (name, value) pairs whose values come from a fixed list.
pub type Labels = [(&'static str, &'static str); 1];
/// Two labels, as [`Labels`].
pub type Labels2 = [(&'static str, &'static str); 2];

/// Resolves a family's children for the given label sets once, so that recording is one
/// atomic add with no map lookup (and no lock) on the hot path.
pub fn children<S, M, C>(family: &Family<S, M, C>, sets: impl IntoIterator<Item = S>) -> Vec<M>
where
    S: Clone + Hash + Eq,
    M: Clone,
    C: MetricConstructor<M>,
{
    sets.into_iter()
        .map(|s| family.get_or_create_owned(&s))
        .collect()
}

/// Latency buckets in seconds, from 100 µs to 10 s.
pub const LATENCY_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Buckets for counts of items (batch sizes), 1 to 16,384 in powers of 4.
pub const SIZES: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0];

/// A histogram with fixed buckets whose observations are atomic adds: no lock, so it can
/// sit on the hot path. Clones share the same counts.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<HistogramCounts>);

#[derive(Debug)]
struct HistogramCounts {
    bounds: &'static [f64],
    /// One per bound, then the +Inf bucket; not cumulative.
    buckets: Box<[AtomicU64]>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
    /// Per bucket, its latest traced observation. Only traced observations touch these
    /// (with `try_lock`, never waiting); the rest of the hot path takes no lock.
    exemplars: Box<[Mutex<Option<Exemplar>>]>,
    /// Whether any bucket has an exemplar, so that scrapes skip histograms without.
    has_exemplars: AtomicBool,
}

/// An observation that names its trace, shown with its bucket in OpenMetrics.
#[derive(Debug, Clone)]
struct Exemplar {
    trace_id: Box<str>,
    value: f64,
    at: SystemTime,
}

impl Histogram {
    /// A histogram whose buckets end at `bounds` (ascending) and +Inf.
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "ascending bounds");
        Self(Arc::new(HistogramCounts {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
            exemplars: (0..=bounds.len()).map(|_| Mutex::new(None)).collect(),
            has_exemplars: AtomicBool::new(false),
        }))
    }

    pub fn observe(&self, value: f64) {
        self.count_in_bucket(value);
    }

    /// Observes `value` made by the work of `traceparent` (a W3C `traceparent`; none when
    /// the work was not traced): its bucket's exemplar names that trace.
    pub fn observe_traced(&self, value: f64, traceparent: Option<&str>) {
        let bucket = self.count_in_bucket(value);
        let Some(trace_id) = traceparent.and_then(trace::trace_id) else {
            return;
        };
        // A concurrent traced observation in the same bucket wins; either is a fine example.
        if let Ok(mut slot) = self.0.exemplars[bucket].try_lock() {
            *slot = Some(Exemplar {
                trace_id: trace_id.into(),
                value,
                at: SystemTime::now(),
            });
            self.0.has_exemplars.store(true, Ordering::Relaxed);
        }
    }

    /// Counts `value` in its bucket and the sum; returns the bucket.
    fn count_in_bucket(&self, value: f64) -> usize {
        let counts = &self.0;
        let bucket = counts.bounds.partition_point(|&b| b < value);
        counts.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        // No lock-free float add exists; the CAS loop only retries under contention.
        let _ = counts
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
        bucket
    }

    pub fn observe_duration(&self, took: Duration) {
        self.observe(took.as_secs_f64());
    }

    /// [`Self::observe_traced`] for a duration, in seconds.
    pub fn observe_duration_traced(&self, took: Duration, traceparent: Option<&str>) {
        self.observe_traced(took.as_secs_f64(), traceparent);
    }

    /// Each bucket's exemplar, written as OpenMetrics puts it after the bucket's sample.
    fn exemplar_text(&self, bucket: usize) -> Option<String> {
        let slot = self.0.exemplars.get(bucket)?;
        let exemplar = slot.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let at = exemplar
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mut text = String::with_capacity(96);
        // The trace id is 32 hex digits (checked when it was taken): nothing to escape.
        let _ = write!(
            text,
            " # {{trace_id=\"{}\"}} {} {}.{:03}",
            exemplar.trace_id,
            exemplar.value,
            at.as_secs(),
            at.subsec_millis()
        );
        Some(text)
    }

    /// The number of observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        ENCODED.with_borrow_mut(|encoded| {
            if let Some(encoded) = encoded {
                encoded.push(self.clone());
            }
        });
        let counts = &self.0;
        // Per bucket: the encoder writes them cumulated, as the formats want.
        let buckets: Vec<(f64, u64)> = counts
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts.buckets.iter())
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' total, so that it always equals the +Inf bucket.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = f64::from_bits(counts.sum.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A gauge whose ups and downs come from many threads at a high rate (messages into and
/// out of mailboxes): it is kept in stripes, one cache line each, so that threads do not
/// contend for one counter; a scrape sums them. A change is undone on the stripe it was
/// made on ([`StripedGauge::stripe`]), so the sum is exact whatever thread undoes it.
#[derive(Debug, Clone, Default)]
pub struct StripedGauge(Arc<[Stripe; STRIPES]>);

const STRIPES: usize = 16;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(std::sync::atomic::AtomicI64);

impl StripedGauge {
    /// The calling thread's stripe.
    pub fn stripe() -> u8 {
        static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        thread_local! {
            static STRIPE: u8 = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES as u8;
        }
        STRIPE.with(|s| *s)
    }

    /// Adds `delta` on `stripe` (from [`Self::stripe`]).
    pub fn add(&self, stripe: u8, delta: i64) {
        self.0[usize::from(stripe) % STRIPES]
            .0
            .fetch_add(delta, Ordering::Relaxed);
    }

    /// The gauge's value: the stripes' sum.
    pub fn get(&self) -> i64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for StripedGauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for StripedGauge {
    fn encode(&self, encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        ConstGauge::new(self.get()).encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Makes a family's histograms, all with the same buckets.
#[derive(Debug, Clone, Copy)]
pub struct Buckets(pub &'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0)
    }
}

/// A family of histograms with labels `S`.
pub type HistogramFamily<S> = Family<S, Histogram, Buckets>;

/// A family of histograms with the given buckets.
pub fn histogram_family<S: Clone + Hash + Eq>(bounds: &'static [f64]) -> HistogramFamily<S> {
    Family::new_with_constructor(Buckets(bounds))
}

/// A label value set: each variant's value, in the order the crate resolves children.
pub trait LabelValues: Copy + 'static {
    const ALL: &'static [Self];
    fn label(self) -> &'static str;
    fn index(self) -> usize;
}

/// Declares an enum of a label's values, with [`LabelValues`] for it.
#[macro_export]
macro_rules! label_values {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name { $($(#[$vmeta])* $variant),+ }

        impl $crate::LabelValues for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            fn label(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

/// A family's children, one per value of label `name`, indexed by [`LabelValues`].
#[derive(Debug, Clone)]
pub struct ByLabel<L, M> {
    children: Vec<M>,
    _values: std::marker::PhantomData<L>,
}

impl<L: LabelValues, M: Clone> ByLabel<L, M> {
    pub fn new<C: MetricConstructor<M>>(family: &Family<Labels, M, C>, name: &'static str) -> Self {
        Self {
            children: children(family, L::ALL.iter().map(|v| [(name, v.label())])),
            _values: std::marker::PhantomData,
        }
    }

    pub fn get(&self, value: L) -> &M {
        &self.children[value.index()]
    }
}

/// How a scrape is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4.
    Text,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The format the scraper's `Accept` header prefers (by q-value; text when it names
    /// neither or ties).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let mut best = (Self::Text, 0.0_f32);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            if media.eq_ignore_ascii_case("application/openmetrics-text") && q > best.1 {
                best = (Self::OpenMetrics, q);
            } else if (media.eq_ignore_ascii_case("text/plain") || media == "*/*") && q >= best.1 {
                best = (Self::Text, q);
            }
        }
        best.0
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// Encodes every metric in `registry`.
    pub fn encode(self, registry: &Registry) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail; an encoder error would be a bug in a metric.
        match self {
            Self::Text => prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
                .expect("metrics encode into a String"),
            Self::OpenMetrics => {
                ENCODED.set(Some(Vec::new()));
                let written = prometheus_client::encoding::text::encode(&mut out, registry);
                let histograms = ENCODED.take().unwrap_or_default();
                written.expect("metrics encode into a String");
                out = with_exemplars(out, &histograms);
            }
        }
        out
    }
}

thread_local! {
    /// While an OpenMetrics scrape is encoded on this thread: its histograms, in the order
    /// they were written.
    static ENCODED: RefCell<Option<Vec<Histogram>>> = const { RefCell::new(None) };
}

/// Adds each bucket's exemplar to an OpenMetrics scrape. prometheus-client writes
/// exemplars only from its own exemplar histogram, which takes a lock per observation
/// (and its `Exemplar` cannot be made outside it), so they are added here: a histogram's
/// samples are its `_sum`, its `_count` and then one `_bucket` line per bucket, in
/// order, and `histograms` are the histograms in the order they were written.
fn with_exemplars(text: String, histograms: &[Histogram]) -> String {
    if !histograms
        .iter()
        .any(|h| h.0.has_exemplars.load(Ordering::Relaxed))
    {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 4096);
    let mut family = String::new();
    let mut written = histograms.iter();
    let mut current: Option<&Histogram> = None;
    let mut bucket = 0;
    for line in text.split_inclusive('\n') {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            family = declared
                .strip_suffix(" histogram\n")
                .map_or_else(String::new, |name| format!("{name}_"));
        } else if !family.is_empty()
            && let Some(sample) = line.strip_prefix(family.as_str())
        {
            if sample.starts_with("sum") {
                current = written.next();
                bucket = 0;
            } else if sample.starts_with("bucket{") {
                if let Some(exemplar) = current.and_then(|h| h.exemplar_text(bucket)) {
                    out.push_str(line.trim_end_matches('\n'));
                    out.push_str(&exemplar);
                    out.push('\n');
                    bucket += 1;
                    continue;
                }
                bucket += 1;
            }
        }
        out.push_str(line);
    }
    out
}

/// Encodes a counter read at scrape time (for a [`Collector`]).
pub fn encode_counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

/// Encodes a gauge read at scrape time (for a [`Collector`]).
pub fn encode_gauge<N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: N,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_observation_in_its_bucket_and_cumulates_on_encoding() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0, 7.0] {
            h.observe(v);
        }
        let mut registry = Registry::default();
        registry.register_with_unit("wait", "How long.", Unit::Seconds, h.clone());
        let text = Format::Text.encode(&registry);
        for line in [
            "wait_seconds_bucket{le=\"1\"} 2",
            "wait_seconds_bucket{le=\"2\"} 3",
            "wait_seconds_bucket{le=\"+Inf\"} 5",
            "wait_seconds_sum 13.0",
            "wait_seconds_count 5",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert_eq!(h.count(), 5);
    }

    #[test]
    fn an_openmetrics_scrape_names_the_trace_of_each_buckets_latest_traced_observation() {
        let family: HistogramFamily<Labels> = histogram_family(&[0.1, 1.0]);
        let queries = family.get_or_create_owned(&[("type", "query")]);
        let mutations = family.get_or_create_owned(&[("type", "mutation")]);
        let after = Histogram::new(&[1.0]);
        let first = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let second = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        queries.observe_traced(0.5, Some(first));
        queries.observe_traced(0.7, Some(second));
        queries.observe_traced(0.05, None);
        mutations.observe_traced(2.0, Some(first));
        mutations.observe_traced(0.05, Some("not a traceparent"));
        after.observe(0.5);
        let mut registry = Registry::default();
        registry.register_with_unit("wait", "How long.", Unit::Seconds, family.clone());
        registry.register_with_unit("after", "Then.", Unit::Seconds, after.clone());

        let open = Format::OpenMetrics.encode(&registry);
        let line = |start: &str| {
            let found: Vec<&str> = open.lines().filter(|l| l.starts_with(start)).collect();
            assert_eq!(found.len(), 1, "{start} in\n{open}");
            found[0]
        };
        let with = |trace: &str, value: &str| format!(" # {{trace_id=\"{trace}\"}} {value} ");
        let query_bucket = line("wait_seconds_bucket{le=\"1.0\",type=\"query\"}");
        assert!(
            query_bucket.starts_with("wait_seconds_bucket{le=\"1.0\",type=\"query\"} 3")
                && query_bucket.contains(&with("4bf92f3577b34da6a3ce929d0e0e4736", "0.7")),
            "the latest traced observation in the bucket: {query_bucket}"
        );
        assert!(!line("wait_seconds_bucket{le=\"0.1\",type=\"query\"}").contains('#'));
        assert!(
            line("wait_seconds_bucket{le=\"+Inf\",type=\"mutation\"}")
                .contains(&with("0af7651916cd43dd8448eb211c80319c", "2"))
        );
        assert!(
            !line("wait_seconds_bucket{le=\"0.1\",type=\"mutation\"}").contains('#'),
            "a malformed traceparent names no trace"
        );
        assert_eq!(open.matches(" # {").count(), 2, "{open}");
        assert!(!Format::Text.encode(&registry).contains("trace_id"));
    }

    #[test]
    fn a_striped_gauge_sums_changes_undone_on_other_threads() {
        let gauge = StripedGauge::default();
        let made: Vec<u8> = std::thread::scope(|s| {
            (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let stripe = StripedGauge::stripe();
                        gauge.add(stripe, 3);
                        stripe
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(gauge.get(), 12);
        for stripe in made {
            gauge.add(stripe, -2);
        }
        assert_eq!(gauge.get(), 4);
        let mut registry = Registry::default();
        registry.register("waiting", "Waiting.", gauge.clone());
        assert!(Format::Text.encode(&registry).contains("\nwaiting 4\n"));
    }

    #[test]
    fn the_scraper_gets_openmetrics_only_when_it_prefers_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.9,application/openmetrics-text;q=0.5")),
            Format::Text
        );
        let mut registry = Registry::default();
        registry.register("up", "Up.", Counter::<u64>::default());
        assert!(Format::OpenMetrics.encode(&registry).ends_with("# EOF\n"));
        assert!(!Format::Text.encode(&registry).contains("# EOF"));
    }
}
