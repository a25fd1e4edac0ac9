//! The log format: tracing's text format, with every field value escaped and truncated.
//!
//! Much of what Doppel logs comes from outside: client ids, usernames, topics, thing
//! ids, GraphQL operation names, filter texts, error messages that quote them. Rather
//! than trusting every call site to wrap such values, the formatter escapes them all: a
//! control character (newline, carriage return, ESC, DEL, C1) or a Unicode line separator
//! or bidirectional override is written as an escape (`\n`, `\u{1b}`), so a value can
//! neither start a forged log line nor drive the terminal; and a value longer than
//! [`MAX_VALUE_CHARS`] characters (the message: [`MAX_MESSAGE_CHARS`]) is cut, saying how
//! many bytes were left out.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Level;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{FilterExt as _, Targets, filter_fn};
use tracing_subscriber::fmt::{FmtContext, FormatEvent};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use twin_telemetry::trace::TraceId;

use crate::config::{Config, LogFormat, OtlpProtocol};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Longest field value written, in characters.
pub const MAX_VALUE_CHARS: usize = 256;
/// Longest message written, in characters.
pub const MAX_MESSAGE_CHARS: usize = 1024;

/// The crates whose spans are exported: Doppel's own, at `debug` and above (they are
/// `debug` so that they cost nothing when tracing is off and `RUST_LOG` is `info`).
const TRACED: [&str; 6] = [
    "doppel",
    "twin_gateway",
    "twin_actors",
    "twin_store",
    "twin_graphql",
    "twin_telemetry",
];

/// Sets up logging to standard error, and span export when `tracer` is given (see
/// [`tracer`]). Logs: the level from `RUST_LOG` (default `info`); text has ANSI colours
/// only on a terminal and its values escaped and cut; JSON is one object per line, whose
/// strings JSON escapes (a value cannot end its line). A line logged inside a traced
/// request names the request's spans (in JSON, `spans`) and its trace (`trace_id`).
pub fn init(ansi: bool, config: &Config, tracer: Option<Tracing>) -> Option<Tracing> {
    let levels = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Doppel's spans exist only for traced requests: the lines logged inside one show them.
    let traced_spans = filter_fn(|meta| {
        meta.is_span()
            && TRACED
                .iter()
                .any(|c| meta.target().split("::").next() == Some(c))
    })
    .with_max_level_hint(Level::DEBUG);
    let filter = levels.or(traced_spans);
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match config.log_format {
        LogFormat::Text => logs.with_ansi(ansi).fmt_fields(EscapedFields).boxed(),
        LogFormat::Json => logs
            .event_format(WithTraceId(
                tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(true),
            ))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .boxed(),
    };
    let spans = tracer.as_ref().map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t.provider.tracer("doppel"))
            .with_filter(Targets::new().with_targets(TRACED.map(|c| (c, Level::DEBUG))))
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .init();
    tracer
}

/// A JSON event format that adds `trace_id` to the lines logged inside a traced request.
struct WithTraceId<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    F: FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let trace = ctx.event_scope().and_then(|mut scope| {
            scope.find_map(|span| span.extensions().get::<TraceId>().map(|t| t.0.clone()))
        });
        let Some(trace) = trace else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // The trace id is 32 hex digits (checked when it was kept): nothing to escape.
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"trace_id\":\"{trace}\",{rest}"),
            None => writer.write_str(&line),
        }
    }
}

/// Span export to `otlp_endpoint` (OpenTelemetry OTLP), batched on a thread of its own.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Sends the spans still batched (at shutdown).
    pub fn flush(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "spans not exported at shutdown");
        }
    }
}

/// The span exporter `config` asks for (`None` without `otlp_endpoint`). Call it on the
/// tokio runtime: the gRPC exporter sends from it.
pub fn tracer(config: &Config) -> anyhow::Result<Option<Tracing>> {
    use opentelemetry_otlp::{
        Protocol, SpanExporter, WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _,
    };
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(None);
    };
    // reqwest (the HTTP exporter's client) sets up rustls even for http://, and rustls
    // is built with two providers here (ring, and aws-lc-rs for the ScyllaDB driver), so
    // the process's default is named: ring, as everywhere else in Doppel. An error says
    // one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = config.otlp_tls()?;
    let exporter = match config.otlp_protocol {
        OtlpProtocol::Http => {
            let builder = SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
            match &tls {
                Some(tls) => builder.with_http_client(otlp_tls::http_client(tls)?),
                None => builder,
            }
            .build()
        }
        OtlpProtocol::Grpc => {
            let builder = SpanExporter::builder().with_tonic().with_endpoint(endpoint);
            match &tls {
                Some(tls) => builder.with_tls_config(otlp_tls::grpc(tls)?),
                None => builder,
            }
            .build()
        }
    }
    .with_context(|| format!("cannot set up span export to otlp_endpoint {endpoint}"))?;
    let attributes = config
        .resource_attributes()?
        .into_iter()
        .map(|(k, v)| opentelemetry::KeyValue::new(k, v));
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.otlp_service_name.clone())
        .with_attributes(attributes)
        .build();
    // Which requests are traced is decided where they come in (twin_telemetry::trace::
    // traced, by trace_sample_ratio): a span that exists is to be recorded, and its
    // children follow it.
    let sampler = Sampler::ParentBased(Box::new(Sampler::AlwaysOn));
    twin_telemetry::trace::enable(config.trace_sample_ratio);
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(resource)
        .build();
    Ok(Some(Tracing { provider }))
}

/// TLS to an https:// `otlp_endpoint`, for either transport.
mod otlp_tls {
    use std::sync::Arc;

    use anyhow::{Context as _, bail};
    use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig, Identity};
    use rustls::RootCertStore;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    use crate::config::OtlpTls;

    fn certificates(pem: &[u8], setting: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("setting `{setting}`: not PEM certificates"))?;
        if certs.is_empty() {
            bail!("setting `{setting}`: no PEM certificate in the file");
        }
        Ok(certs)
    }

    /// The HTTP exporter's client: rustls with ring (as every other TLS client in
    /// Doppel), the collector checked against `otlp_tls_ca_file` or the system's CAs.
    pub fn http_client(tls: &OtlpTls) -> anyhow::Result<reqwest::blocking::Client> {
        let mut roots = RootCertStore::empty();
        match &tls.ca {
            Some(ca) => {
                for cert in certificates(ca, "otlp_tls_ca_file")? {
                    roots
                        .add(cert)
                        .context("setting `otlp_tls_ca_file`: not a CA certificate")?;
                }
            }
            None => {
                let (added, _) =
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if added == 0 {
                    bail!(
                        "no CA certificates found on this system for the https:// otlp_endpoint: set `otlp_tls_ca_file`"
                    );
                }
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
        let config = match &tls.client {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder
                .with_client_auth_cert(
                    certificates(chain, "otlp_tls_cert_file")?,
                    PrivateKeyDer::from_pem_slice(key)
                        .context("setting `otlp_tls_key_file`: not a PEM private key")?,
                )
                .context("settings `otlp_tls_cert_file` and `otlp_tls_key_file`")?,
        };
        // The blocking client runs a runtime of its own, which must not be made (or
        // dropped) on an async thread: build it on a thread of its own.
        std::thread::spawn(move || {
            reqwest::blocking::Client::builder()
                .tls_backend_preconfigured(config)
                .build()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the OTLP HTTP client's thread panicked"))?
        .context("cannot make the OTLP HTTP client")
    }

    /// The gRPC exporter's TLS: tonic's rustls, with the same CA and client certificate.
    pub fn grpc(tls: &OtlpTls) -> anyhow::Result<ClientTlsConfig> {
        let config = ClientTlsConfig::new();
        let config = match &tls.ca {
            Some(ca) => {
                certificates(ca, "otlp_tls_ca_file")?;
                config.ca_certificate(Certificate::from_pem(ca))
            }
            None => config.with_native_roots(),
        };
        Ok(match &tls.client {
            Some((chain, key)) => {
                certificates(chain, "otlp_tls_cert_file")?;
                PrivateKeyDer::from_pem_slice(key)
                    .context("setting `otlp_tls_key_file`: not a PEM private key")?;
                config.identity(Identity::from_pem(chain, key))
            }
            None => config,
        })
    }
}

/// Formats fields as tracing's default does (`message key=value ...`), escaping values.
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = Escaping {
            writer,
            first: true,
            value: String::new(),
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Escaping<'w> {
    writer: Writer<'w>,
    first: bool,
    value: String,
    result: fmt::Result,
}

impl Visit for Escaping<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_debug(field, &format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        self.value.clear();
        if write!(self.value, "{value:?}").is_err() {
            self.value.replace_range(.., "<unprintable>");
        }
        let name = field.name().trim_start_matches("r#");
        self.result = (|| {
            if !self.first {
                self.writer.write_char(' ')?;
            }
            self.first = false;
            if name == "message" {
                escape_into(&mut self.writer, &self.value, MAX_MESSAGE_CHARS)
            } else {
                write!(self.writer, "{name}=")?;
                escape_into(&mut self.writer, &self.value, MAX_VALUE_CHARS)
            }
        })();
    }
}

/// Writes `text` with control characters, line separators and bidirectional overrides
/// escaped, cut after `max_chars` characters.
pub fn escape_into(out: &mut impl fmt::Write, text: &str, max_chars: usize) -> fmt::Result {
    for (n, (at, ch)) in text.char_indices().enumerate() {
        if n == max_chars {
            return write!(out, "…[{} more bytes]", text.len() - at);
        }
        match ch {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if c.is_control()
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                write!(out, "\\u{{{:x}}}", c as u32)?
            }
            c => out.write_char(c)?,
        }
    }
    Ok(())
}

/// `text` escaped and cut as in the log, for messages that are printed, not logged.
pub fn escaped(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars));
    let _ = escape_into(&mut out, text, max_chars);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(f: impl FnOnce()) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .fmt_fields(EscapedFields)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_forged_client_id_stays_on_one_escaped_line() {
        let id = "evil\n2026-01-01T00:00:00Z  INFO doppel: FAKE admin token dpl_x\x1b[31m";
        let text = logged(|| tracing::info!(client_id = %id, user = id, "connection refused"));
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains(r"client_id=evil\n2026-01-01T00:00:00Z  INFO doppel: FAKE admin token dpl_x\u{1b}[31m"),
            "{text}"
        );
        assert!(text.contains(r#"user="evil\n2026"#), "{text}");
        assert!(!text.contains('\x1b'), "{text}");
    }

    #[test]
    fn long_values_are_cut_and_say_how_much() {
        let long = "a".repeat(500);
        let text = logged(|| tracing::warn!(topic = %long, "publish refused"));
        assert!(
            text.contains(&format!("topic={}…[244 more bytes]", "a".repeat(256))),
            "{text}"
        );
        let message = "m".repeat(2000);
        let text = logged(|| tracing::warn!("{message}"));
        assert!(text.contains("…[976 more bytes]"), "{text}");
    }

    #[test]
    fn line_separators_and_bidi_overrides_are_escaped() {
        assert_eq!(
            escaped("a\u{2028}b\u{202e}c\u{85}d\te", 100),
            r"a\u{2028}b\u{202e}c\u{85}d\te"
        );
        assert_eq!(escaped("ünïcode ok", 100), "ünïcode ok");
    }
}
