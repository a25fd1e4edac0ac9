//! W3C trace context across Doppel's edges: a `traceparent` that arrives (an MQTT 5 user
//! property, an HTTP header) becomes the parent of the span that handles it, and what
//! Doppel sends in answer carries the `traceparent` of the span that made it.
//!
//! Spans are `tracing` spans; the OpenTelemetry layer (set up by the binary when
//! `otlp_endpoint` is set) gives them trace and span ids and exports them. Without that
//! layer these functions find no trace context and do nothing.

use std::collections::HashMap;
use std::sync::Arc;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header, and MQTT 5 user property, that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";

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
/// and the span is enabled for it); sampled or not, as W3C asks.
pub fn traceparent(span: &tracing::Span) -> Option<Arc<str>> {
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT).map(Arc::from)
}

/// The `traceparent` of the span the caller is in.
pub fn current() -> Option<Arc<str>> {
    traceparent(&tracing::Span::current())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    const DEVICE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_span_continues_the_callers_trace_and_names_itself_in_what_it_sends() {
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
    fn without_the_opentelemetry_layer_nothing_is_sent() {
        let span = tracing::info_span!("mqtt.publish");
        continue_trace(&span, DEVICE);
        assert_eq!(traceparent(&span), None);
    }
}
