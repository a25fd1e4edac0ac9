//! `GET /metrics`: every crate's metrics (each declared in its own `telemetry.rs`), the
//! values read at scrape time, and the process's CPU, memory and file descriptors under
//! the standard `process_` names (as every Prometheus client library exports them).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use axum::routing::get;
use twin_telemetry::{
    Collector, DescriptorEncoder, Family, Format, Gauge, Labels2, Registry, Unit, encode_counter,
    encode_gauge,
};

/// Values the registry reads when it is scraped.
pub struct Sampled {
    /// Requests sent to twins and not answered yet.
    pub requests_in_flight: Box<dyn Fn() -> usize + Send + Sync>,
    /// Whether `/readyz` answers 200.
    pub ready: Box<dyn Fn() -> bool + Send + Sync>,
}

/// The registry `/metrics` encodes.
pub fn registry(sampled: Sampled) -> Arc<Registry> {
    let mut root = Registry::default();
    root.register_collector(Box::new(Process::new()));
    let doppel = root.sub_registry_with_prefix("doppel");
    let build = Family::<Labels2, Gauge>::default();
    build
        .get_or_create(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", crate::COMMIT),
        ])
        .set(1);
    doppel.register("build_info", "The running build (always 1)", build);
    twin_store::telemetry::register(doppel);
    twin_actors::telemetry::register(doppel);
    twin_gateway::telemetry::register(doppel);
    twin_graphql::telemetry::register(doppel);
    doppel.register_collector(Box::new(SampledCollector(sampled)));
    Arc::new(root)
}

/// The `/metrics` route.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(registry)
}

async fn scrape(State(registry): State<Arc<Registry>>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        format.encode(&registry),
    )
}

struct SampledCollector(Sampled);

impl std::fmt::Debug for SampledCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SampledCollector")
    }
}

impl Collector for SampledCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        encode_gauge(
            &mut encoder,
            "twin_requests_in_flight",
            "Requests sent to twins and not answered yet (at max_pending_requests, new ones get 429)",
            None,
            i64::try_from((self.0.requests_in_flight)()).unwrap_or(i64::MAX),
        )?;
        encode_gauge(
            &mut encoder,
            "ready",
            "1 while /readyz answers 200 (serving, and the store answers), else 0",
            None,
            i64::from((self.0.ready)()),
        )?;
        if let Some(limit) = memory_limit() {
            encode_gauge(
                &mut encoder,
                "memory_limit",
                "The memory limit of the process's cgroup (absent when there is none)",
                Some(&Unit::Bytes),
                limit,
            )?;
        }
        Ok(())
    }
}

/// The cgroup's memory limit: cgroup v2 `memory.max`, else v1 `memory.limit_in_bytes`
/// (whose "no limit" is a huge number).
fn memory_limit() -> Option<i64> {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()?
            .trim()
            .parse::<i64>()
            .ok()
    };
    read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .filter(|&limit| limit < 1 << 60)
}

/// The process's resource use, read from `/proc/self` at each scrape.
#[derive(Debug)]
struct Process {
    started: f64,
    ticks_per_second: f64,
}

impl Process {
    fn new() -> Self {
        Self {
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            ticks_per_second: rustix::param::clock_ticks_per_second() as f64,
        }
    }

    /// User plus system CPU time, from `/proc/self/stat` (fields 14 and 15, in ticks).
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) may hold spaces; the fields after it do not.
        let rest = &stat[stat.rfind(')')? + 2..];
        let mut fields = rest.split(' ').skip(11);
        let user: f64 = fields.next()?.parse().ok()?;
        let system: f64 = fields.next()?.parse().ok()?;
        Some((user + system) / self.ticks_per_second)
    }
}

/// A `/proc/self/status` value in kB, as bytes.
fn status_bytes(status: &str, key: &str) -> Option<i64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: i64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if let Some(cpu) = self.cpu_seconds() {
            encode_counter(
                &mut encoder,
                "process_cpu",
                "User and system CPU time spent",
                Some(&Unit::Seconds),
                cpu,
            )?;
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            for (name, key, help) in [
                ("process_resident_memory", "VmRSS:", "Resident memory size"),
                ("process_virtual_memory", "VmSize:", "Virtual memory size"),
            ] {
                if let Some(bytes) = status_bytes(&status, key) {
                    encode_gauge(&mut encoder, name, help, Some(&Unit::Bytes), bytes)?;
                }
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            let open = i64::try_from(fds.count()).unwrap_or(i64::MAX);
            encode_gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                None,
                open,
            )?;
        }
        if let Some(max) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
            let max = i64::try_from(max).unwrap_or(i64::MAX);
            encode_gauge(
                &mut encoder,
                "process_max_fds",
                "The open-file limit",
                None,
                max,
            )?;
        }
        encode_gauge(
            &mut encoder,
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Some(&Unit::Seconds),
            self.started,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_values_are_read_in_bytes() {
        let status = "Name:\tdoppel\nVmSize:\t  123456 kB\nVmRSS:\t    2048 kB\n";
        assert_eq!(status_bytes(status, "VmRSS:"), Some(2048 * 1024));
        assert_eq!(status_bytes(status, "VmSwap:"), None);
    }

    #[test]
    fn the_process_reports_its_cpu_time() {
        let p = Process::new();
        assert!(p.cpu_seconds().is_some_and(|s| s >= 0.0));
    }
}
