//! W3C trace context across Doppel's edges: a `traceparent` that arrives (an MQTT 5 user
//! property, an HTTP header) becomes the parent of the span that handles it, and what
//! Doppel sends in answer carries the `traceparent` of the span that made it.
//!
//! Spans are `tracing` spans; the OpenTelemetry layer (set up by the binary when
//! `otlp_endpoint` is set) gives them trace and span ids and exports them. Without that
//! layer these functions find no trace context and do nothing.
//!
//! A request that is not traced but came with a well-formed `traceparent` has it sent on
//! unchanged with what answers it ([`forwarding`], [`Carried`], [`outgoing`]), as W3C
//! asks of a hop that does not take part in a trace.
//!
//! Sampling is decided once, where a request comes in ([`traced`]): an untraced request
//! gets no spans at all, so that tracing a small fraction costs the rest nothing (spans
//! that are created and then dropped by the sampler cost about a quarter of the
//! throughput of a shadow update; see load-tests/RESULTS.md).

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::registry::LookupSpan as _;

/// The header, and MQTT 5 user property, that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The fraction of requests without a caller's trace context that are traced, as a
/// threshold on a random `u64`; 0 while tracing is off.
static ROOT_THRESHOLD: AtomicU64 = AtomicU64::new(0);
/// Whether tracing is on (the OpenTelemetry layer is installed).
static ENABLED: AtomicU64 = AtomicU64::new(0);

/// Turns tracing on: requests are traced when their caller's `traceparent` is sampled,
/// and `ratio` (0 to 1) of those that come without one.
pub fn enable(ratio: f64) {
    let threshold = if ratio >= 1.0 {
        u64::MAX
    } else {
        (ratio.max(0.0) * u64::MAX as f64) as u64
    };
    ROOT_THRESHOLD.store(threshold, Ordering::Relaxed);
    ENABLED.store(1, Ordering::Relaxed);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed) != 0
}

/// Whether a request whose caller sent `parent` (a `traceparent`, or none) is traced:
/// the caller's sampled flag decides, else `trace_sample_ratio`.
pub fn traced(parent: Option<&str>) -> bool {
    if !enabled() {
        return false;
    }
    match parent.and_then(sampled_flag) {
        Some(sampled) => sampled,
        None => {
            let threshold = ROOT_THRESHOLD.load(Ordering::Relaxed);
            threshold == u64::MAX || random() < threshold
        }
    }
}

/// The trace id, span id and flags of a well-formed `traceparent`
/// (`{version}-{32 hex}-{16 hex}-{2 hex}`, version `00` or a later one's first fields).
fn parse(traceparent: &str) -> Option<(&str, &str, u8)> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0');
    valid
        .then(|| u8::from_str_radix(flags, 16).ok().map(|f| (trace, span, f)))
        .flatten()
}

/// The sampled flag of a well-formed `traceparent`.
fn sampled_flag(traceparent: &str) -> Option<bool> {
    parse(traceparent).map(|(_, _, flags)| flags & 1 == 1)
}

/// The trace id (32 hex digits) of a well-formed `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    parse(traceparent).map(|(trace, _, _)| trace)
}

/// A cheap per-thread random number (xorshift64*), for sampling decisions.
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let here = &seed as *const u64 as u64;
            (seed ^ here.rotate_left(32)) | 1
        });
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// The span of a request that comes in with the caller's `parent` (a `traceparent`, or
/// none): `make()`'s span continuing the caller's trace when the request is [`traced`],
/// else none.
pub fn entry(parent: Option<&str>, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if !traced(parent) {
        return tracing::Span::none();
    }
    let span = make();
    if let Some(parent) = parent {
        continue_trace(&span, parent);
    }
    remember_trace_id(&span);
    span
}

/// The trace a span (and so everything logged inside it) belongs to, kept with the span
/// for the JSON log lines.
#[derive(Debug, Clone)]
pub struct TraceId(pub Arc<str>);

/// Keeps `span`'s trace id with it, where a log formatter finds it ([`TraceId`]).
fn remember_trace_id(span: &tracing::Span) {
    let Some(trace) = traceparent(span).and_then(|t| trace_id(&t).map(Arc::from)) else {
        return;
    };
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>()
            && let Some(data) = registry.span(id)
        {
            data.extensions_mut().insert(TraceId(trace));
        }
    });
}

/// `make()`'s span when the caller is in a traced span, else none: the work of an
/// untraced request makes no spans. (The caller may be in other spans, such as the one
/// ractor keeps around each actor: only one that belongs to a trace counts.)
pub fn child(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let current = tracing::Span::current();
    if current.is_disabled() || !current.context().span().span_context().is_valid() {
        tracing::Span::none()
    } else {
        make()
    }
}

/// Makes `span` continue the trace of `traceparent` (ignored when it is not a valid W3C
/// `traceparent`: the span then starts a trace of its own).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        // Fails only without the OpenTelemetry layer, when there is nothing to continue.
        let _ = span.set_parent(parent);
    }
}

/// The `traceparent` of `span`, when it belongs to a trace (the OpenTelemetry layer is on
/// and the span is enabled for it).
pub fn traceparent(span: &tracing::Span) -> Option<Arc<str>> {
    // Inside an actor the current span is ractor's own: without tracing, ask no further.
    if !enabled() || span.is_disabled() {
        return None;
    }
    let context = span.context();
    let span = context.span();
    let ids = span.span_context();
    ids.is_valid().then(|| {
        Arc::from(format!(
            "00-{}-{}-{:02x}",
            ids.trace_id(),
            ids.span_id(),
            ids.trace_flags().to_u8()
        ))
    })
}

/// A caller's `traceparent` to send on unchanged (as version 00, the one Doppel speaks),
/// when it is well-formed.
pub fn forwarded(traceparent: &str) -> Option<Arc<str>> {
    parse(traceparent)
        .map(|(trace, span, flags)| Arc::from(format!("00-{trace}-{span}-{flags:02x}")))
}

/// The `traceparent` of the span the caller is in.
pub fn current() -> Option<Arc<str>> {
    traceparent(&tracing::Span::current())
}

tokio::task_local! {
    /// The caller's `traceparent` of an untraced request, to be sent on unchanged.
    static FORWARD: Arc<str>;
}

/// Runs `f` (which hands a request on, see [`Carried`]) with `traceparent`, the caller's
/// of an untraced request, as the one to send on.
pub fn forwarding<R>(traceparent: Option<Arc<str>>, f: impl FnOnce() -> R) -> R {
    match traceparent {
        Some(t) => FORWARD.sync_scope(t, f),
        None => f(),
    }
}

/// The `traceparent` to send with what the caller's work publishes: its span's when it is
/// traced, else the one its caller sent to be sent on unchanged, if any.
pub fn outgoing() -> Option<Arc<str>> {
    current().or_else(|| FORWARD.try_with(Arc::clone).ok())
}

/// A request's trace context as it crosses to another task (a twin): its span when it
/// is traced, else the caller's `traceparent` to send on, if any.
#[derive(Debug)]
pub struct Carried {
    span: tracing::Span,
    forward: Option<Arc<str>>,
}

impl Carried {
    /// `make()`'s span when the caller is traced (as [`child`]); else what the caller is
    /// [`forwarding`].
    pub fn child(make: impl FnOnce() -> tracing::Span) -> Self {
        let span = child(make);
        let forward = if span.is_none() {
            FORWARD.try_with(Arc::clone).ok()
        } else {
            None
        };
        Self { span, forward }
    }

    /// Runs `work` in the request's span, or with its `traceparent` to send on.
    pub async fn run<F: Future>(self, work: F) -> F::Output {
        match self.forward {
            Some(forward) => FORWARD.scope(forward, work).await,
            None => work.instrument(self.span).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    const DEVICE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// Tracing's on/off and ratio are the process's: tests that set them take turns.
    static SETTINGS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn a_span_continues_the_callers_trace_and_names_itself_in_what_it_sends() {
        let _turn = SETTINGS.lock().unwrap_or_else(|e| e.into_inner());
        enable(1.0);
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            let span = tracing::info_span!("mqtt.publish");
            continue_trace(&span, DEVICE);
            let sent = traceparent(&span).expect("a traced span has a traceparent");
            let parts: Vec<&str> = sent.split('-').collect();
            assert_eq!(parts[..2], ["00", "4bf92f3577b34da6a3ce929d0e0e4736"]);
            assert_ne!(
                parts[2], "00f067aa0ba902b7",
                "its own span id, not the caller's"
            );
            assert_eq!(parts[3], "01", "sampled, as the caller asked");

            let child = span.in_scope(|| tracing::info_span!("twin.update"));
            let inner = traceparent(&child).unwrap();
            assert!(inner.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));

            let fresh = tracing::info_span!("graphql.request");
            continue_trace(&fresh, "not a traceparent");
            assert!(!traceparent(&fresh).unwrap().contains("4bf92f35"));
        });
    }

    #[test]
    fn a_callers_sampled_flag_decides_and_the_ratio_decides_the_rest() {
        let _turn = SETTINGS.lock().unwrap_or_else(|e| e.into_inner());
        let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let malformed = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        assert_eq!(sampled_flag(sampled), Some(true));
        assert_eq!(sampled_flag(unsampled), Some(false));
        assert_eq!(
            sampled_flag(malformed),
            None,
            "an all-zero trace id is invalid"
        );
        assert_eq!(sampled_flag("00-abc"), None);
        assert_eq!(forwarded(unsampled).as_deref(), Some(unsampled));
        assert_eq!(forwarded(malformed), None);
        assert_eq!(
            forwarded(&format!("{unsampled}-more")),
            None,
            "00 has four fields"
        );
        assert_eq!(
            forwarded(&format!("01{}-more", &unsampled[2..])).as_deref(),
            Some(unsampled),
            "a later version's first four fields"
        );
        assert_eq!(trace_id(sampled), Some("4bf92f3577b34da6a3ce929d0e0e4736"));

        enable(0.0);
        assert!(traced(Some(sampled)));
        assert!(!traced(Some(unsampled)));
        assert!(!traced(None) && !traced(Some(malformed)));
        enable(1.0);
        assert!(traced(None));
        assert!(!traced(Some(unsampled)), "the caller decided");
        enable(0.25);
        let hits = (0..40_000).filter(|_| traced(None)).count();
        assert!((9_000..11_000).contains(&hits), "{hits} of 40,000 at 0.25");
    }

    #[tokio::test]
    async fn an_untraced_callers_traceparent_is_carried_to_what_answers_it() {
        let device: Arc<str> = Arc::from(DEVICE.replace("-01", "-00"));
        let carried = forwarding(Some(device.clone()), || {
            Carried::child(|| tracing::info_span!("twin.update"))
        });
        assert_eq!(outgoing(), None, "only inside the work it was carried to");
        let inside = carried.run(async { outgoing() }).await;
        assert_eq!(inside, Some(device));
        assert_eq!(current(), None, "nothing of it is a span of Doppel's");
        let uncarried = Carried::child(|| tracing::info_span!("twin.update"));
        assert_eq!(uncarried.run(async { outgoing() }).await, None);
    }

    #[test]
    fn without_the_opentelemetry_layer_nothing_is_sent() {
        let span = tracing::info_span!("mqtt.publish");
        continue_trace(&span, DEVICE);
        assert_eq!(traceparent(&span), None);
    }
}
