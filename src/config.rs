//! Configuration: one struct, layered defaults < TOML file < `DOPPEL_*` environment <
//! command-line flags. Every bad setting fails at start with a message naming it.
//!
//! Over 600 lines with its unit tests: the code itself is 490 lines, every setting in one place
//! with its default, check and help text.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use toml::{Table, Value};
use twin_actors::FleetConfig;
use twin_gateway::{GatewayConfig, TlsAuth};
use twin_graphql::ApiLimits;
use twin_model::Limits;

pub const ENV_PREFIX: &str = "DOPPEL_";

/// Every setting, with its default (described in [`DOCS`]). Field names are the TOML
/// keys; the environment variable is `DOPPEL_` + the name in upper case; the flag is
/// `--` + the name with dashes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data_dir: PathBuf,
    pub store: StoreKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scylla_nodes: Option<String>,
    pub scylla_keyspace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scylla_replication: Option<String>,
    pub scylla_consistency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scylla_username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scylla_password: Option<String>,
    pub scylla_request_timeout_secs: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scylla_tls_ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scylla_tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scylla_tls_key_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(deserialize_with = "listen_addr")]
    pub cluster_listen: SocketAddr,
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_listen_addr"
    )]
    pub cluster_advertise: Option<SocketAddr>,
    pub cluster_seeds: String,
    pub cluster_interval_ms: u64,
    #[serde(deserialize_with = "listen_addr")]
    pub mqtt_listen: SocketAddr,
    #[serde(deserialize_with = "listen_addr")]
    pub http_listen: SocketAddr,
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_listen_addr"
    )]
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    pub trace_sample_ratio: f64,
    pub otlp_service_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_resource_attributes: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_tls_ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_tls_key_file: Option<PathBuf>,
    pub auto_register: bool,
    pub shards: usize,
    pub max_resident_twins: usize,
    pub idle_timeout_secs: u64,
    pub max_pending_requests: usize,
    pub max_state_bytes: usize,
    pub history_per_shadow: u64,
    pub history_retention: String,
    pub mqtt_max_packet_size: usize,
    pub mqtt_max_inflight_requests: usize,
    pub mqtt_max_inflight_messages: u16,
    pub mqtt_max_queued_messages: usize,
    pub mqtt_session_expiry_secs: u64,
    pub mqtt_max_connections: usize,
    pub mqtt_max_publishes_per_second: u32,
    pub mqtt_max_connects_per_second: u32,
    pub event_buffer: usize,
    pub graphql_max_page_size: usize,
    pub graphql_max_depth: usize,
    pub graphql_max_complexity: usize,
    pub graphql_max_body_bytes: usize,
    pub http_max_connections: usize,
    pub http_header_timeout_secs: u64,
    pub http_idle_timeout_secs: u64,
    pub http_body_timeout_secs: u64,
    pub http_ws_ping_secs: u64,
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_listen_addr"
    )]
    pub mqtt_tls_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca_file: Option<PathBuf>,
    pub mqtt_tls_auth: TlsAuthSetting,
    pub webhook_allowed_networks: String,
    pub webhook_retry_schedule: String,
    pub webhook_disable_after: String,
    pub route_retention: String,
    pub telemetry_topics: String,
    pub telemetry_retention: String,
}

impl Default for Config {
    fn default() -> Self {
        let fleet = FleetConfig::default();
        let gw = GatewayConfig::default();
        let api = ApiLimits::default();
        Self {
            data_dir: PathBuf::from("./doppel-data"),
            store: StoreKind::Embedded,
            scylla_nodes: None,
            scylla_keyspace: "doppel".into(),
            scylla_replication: None,
            scylla_consistency: "LOCAL_QUORUM".into(),
            scylla_username: None,
            scylla_password: None,
            scylla_request_timeout_secs: 10,
            scylla_tls_ca_file: None,
            scylla_tls_cert_file: None,
            scylla_tls_key_file: None,
            node_id: None,
            cluster_listen: SocketAddr::from(([0, 0, 0, 0], 7946)),
            cluster_advertise: None,
            cluster_seeds: String::new(),
            cluster_interval_ms: 1000,
            mqtt_listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            metrics_listen: None,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Http,
            trace_sample_ratio: 1.0,
            otlp_service_name: "doppel".into(),
            otlp_resource_attributes: None,
            otlp_tls_ca_file: None,
            otlp_tls_cert_file: None,
            otlp_tls_key_file: None,
            auto_register: false,
            shards: fleet.shards,
            max_resident_twins: fleet.max_resident_twins,
            idle_timeout_secs: fleet.idle_timeout.as_secs(),
            max_pending_requests: fleet.max_pending,
            max_state_bytes: Limits::default().max_state_bytes,
            history_per_shadow: 100,
            history_retention: "30d".into(),
            mqtt_max_packet_size: gw.max_packet_size,
            mqtt_max_inflight_requests: gw.max_inflight_requests,
            mqtt_max_inflight_messages: gw.max_inflight_messages,
            mqtt_max_queued_messages: gw.max_queued_messages,
            mqtt_session_expiry_secs: gw.session_expiry.as_secs(),
            mqtt_max_connections: gw.max_connections,
            mqtt_max_publishes_per_second: gw.max_publishes_per_second,
            mqtt_max_connects_per_second: gw.max_connects_per_second,
            event_buffer: fleet.event_buffer,
            graphql_max_page_size: api.max_page_size,
            graphql_max_depth: api.max_depth,
            graphql_max_complexity: api.max_complexity,
            graphql_max_body_bytes: api.max_body_bytes,
            http_max_connections: 10_000,
            http_header_timeout_secs: 10,
            http_idle_timeout_secs: 60,
            http_body_timeout_secs: 30,
            http_ws_ping_secs: 30,
            mqtt_tls_listen: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            mqtt_tls_auth: TlsAuthSetting::Any,
            webhook_allowed_networks: String::new(),
            webhook_retry_schedule: "5s,5m,30m,2h,5h,10h,14h,20h,24h".into(),
            webhook_disable_after: "5d".into(),
            route_retention: "7d".into(),
            telemetry_topics: twin_model::telemetry::DEFAULT_TOPIC.into(),
            telemetry_retention: "7d".into(),
        }
    }
}

/// Where twins persist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// fjall in `data_dir`.
    Embedded,
    /// ScyllaDB (or Apache Cassandra) at `scylla_nodes`.
    Scylla,
}

/// How devices on the TLS listener may log in (see [`twin_gateway::TlsAuth`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsAuthSetting {
    Any,
    Certificate,
    Password,
}

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// tracing's text format, values escaped and cut (see `logging`).
    Text,
    /// One JSON object per line.
    Json,
}

/// A file a setting names, read whole (none when the setting is not set).
fn read_setting_file(setting: &str, path: &Option<PathBuf>) -> anyhow::Result<Option<Vec<u8>>> {
    path.as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read {setting} {}", p.display())))
        .transpose()
}

/// TLS to the span collector, as PEM (see [`Config::otlp_tls`]).
#[derive(Debug, Clone)]
pub struct OtlpTls {
    /// The CA(s) that signed the collector's certificate; none: the system's roots.
    pub ca: Option<Vec<u8>>,
    /// A client certificate chain and its key, for a collector that requires one.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

/// How spans go to `otlp_endpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies (`POST {endpoint}/v1/traces`; port 4318 by convention).
    Http,
    /// OTLP/gRPC (port 4317 by convention).
    Grpc,
}

/// The consistency levels `scylla_consistency` takes.
pub const CONSISTENCIES: &str =
    "ONE, TWO, THREE, QUORUM, ALL, LOCAL_QUORUM, EACH_QUORUM, LOCAL_ONE";

/// Parses a consistency level by its CQL name.
/// The most changes a shadow's history may keep: a history page reads them all.
const MAX_HISTORY: u64 = 10_000;

/// A duration setting that cannot be `off`.
fn span(key: &str, text: &str) -> anyhow::Result<Duration> {
    match parse_retention(text) {
        Ok(Some(d)) => Ok(d),
        Ok(None) => bail!("setting `{key}`: a duration such as 5d or 12h (not off)"),
        Err(e) => bail!("setting `{key}`: {e}"),
    }
}

/// `30d`, `12h`, `90m`, `3600s` (at least a second), or `off` (`None`).
pub fn parse_retention(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let bad = || format!("{text:?} is not a duration such as 30d, 12h, 90m or 3600s, or off");
    let unit = match text.chars().last() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        Some('d') => 86_400,
        _ => return Err(bad()),
    };
    let n: u64 = text[..text.len() - 1].parse().map_err(|_| bad())?;
    match n.checked_mul(unit) {
        Some(secs) if secs > 0 => Ok(Some(Duration::from_secs(secs))),
        _ => Err(bad()),
    }
}

pub fn parse_consistency(text: &str) -> Result<twin_store::scylla::Consistency, String> {
    use twin_store::scylla::Consistency as C;
    Ok(match text.trim().to_ascii_uppercase().as_str() {
        "ONE" => C::One,
        "TWO" => C::Two,
        "THREE" => C::Three,
        "QUORUM" => C::Quorum,
        "ALL" => C::All,
        "LOCAL_QUORUM" => C::LocalQuorum,
        "EACH_QUORUM" => C::EachQuorum,
        "LOCAL_ONE" => C::LocalOne,
        _ => {
            return Err(format!(
                "{text:?} is not a consistency level; one of {CONSISTENCIES}"
            ));
        }
    })
}

/// The forms a listen address may take, for error messages.
pub const LISTEN_FORMS: &str = "expected IP:PORT, HOST:PORT or :PORT (all interfaces), for example 0.0.0.0:1883, localhost:1883 or :1883";

/// Parses a listen address: `IP:PORT`, `[IPv6]:PORT`, `HOST:PORT` (resolved; the first
/// address wins) or `:PORT` for every IPv4 interface.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    let text = text.trim();
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| {
            format!("{text:?}: the port is not a number from 0 to 65535; {LISTEN_FORMS}")
        })?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{text:?} has no port; {LISTEN_FORMS}"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{text:?} is not an address; {LISTEN_FORMS}"));
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("host {host:?} has no address; {LISTEN_FORMS}")),
        Err(e) => Err(format!(
            "cannot resolve host {host:?} ({e}); {LISTEN_FORMS}"
        )),
    }
}

fn listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen(&text).map_err(serde::de::Error::custom)
}

fn optional_listen_addr<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    listen_addr(d).map(Some)
}

fn known(key: &str) -> bool {
    DOCS.iter().any(|(k, _)| *k == key)
}

fn defaults_table() -> Table {
    Table::try_from(Config::default()).expect("the default config serializes")
}

/// Converts an environment value to the type of the setting's default.
fn typed(key: &str, raw: &str, like: &Value) -> anyhow::Result<Value> {
    let var = format!("{ENV_PREFIX}{}", key.to_uppercase());
    Ok(match like {
        Value::Integer(_) => Value::Integer(
            raw.trim()
                .parse()
                .with_context(|| format!("{var}={raw:?}: expected a whole number"))?,
        ),
        Value::Boolean(_) => Value::Boolean(match raw.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => bail!("{var}={raw:?}: expected true or false"),
        }),
        _ => Value::String(raw.to_owned()),
    })
}

impl Config {
    /// Builds the configuration: defaults, then the TOML file (if any), then `DOPPEL_*`
    /// variables from `env`, then `flags` (TOML keys to values, from the command line).
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        flags: Table,
    ) -> anyhow::Result<Self> {
        let defaults = defaults_table();
        let mut merged = defaults.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let table: Table = toml::from_str(&text)
                .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
            for (k, v) in table {
                if !known(&k) {
                    bail!(
                        "config file {}: unknown setting `{k}` (see `doppel config --default`)",
                        path.display()
                    );
                }
                merged.insert(k, v);
            }
        }
        for (var, raw) in env {
            let Some(key) = var.strip_prefix(ENV_PREFIX).map(str::to_lowercase) else {
                continue;
            };
            if known(&key) {
                // Settings without a default (paths, addresses) are strings.
                let like = defaults
                    .get(&key)
                    .cloned()
                    .unwrap_or_else(|| Value::String(String::new()));
                merged.insert(key.clone(), typed(&key, raw, &like)?);
            }
        }
        merged.extend(flags);
        let config: Config =
            Value::Table(merged.clone())
                .try_into()
                .map_err(|e: toml::de::Error| {
                    // Name the setting: find the one value that does not fit on its own.
                    let culprit = merged.iter().find(|(k, v)| {
                        let mut one = defaults.clone();
                        one.insert((*k).clone(), (*v).clone());
                        Value::Table(one).try_into::<Config>().is_err()
                    });
                    match culprit {
                        Some((k, v)) => anyhow::anyhow!(
                            "setting `{k}` = {v}: {} (flag --{}, env {ENV_PREFIX}{})",
                            e.message(),
                            k.replace('_', "-"),
                            k.to_uppercase()
                        ),
                        None => anyhow::anyhow!("invalid settings: {}", e.message()),
                    }
                })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let positive = [
            ("shards", self.shards as u64),
            ("max_resident_twins", self.max_resident_twins as u64),
            ("max_pending_requests", self.max_pending_requests as u64),
            ("max_state_bytes", self.max_state_bytes as u64),
            ("history_per_shadow", self.history_per_shadow),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("mqtt_max_packet_size", self.mqtt_max_packet_size as u64),
            (
                "mqtt_max_inflight_requests",
                self.mqtt_max_inflight_requests as u64,
            ),
            (
                "mqtt_max_inflight_messages",
                u64::from(self.mqtt_max_inflight_messages),
            ),
            (
                "mqtt_max_queued_messages",
                self.mqtt_max_queued_messages as u64,
            ),
            ("mqtt_max_connections", self.mqtt_max_connections as u64),
            ("event_buffer", self.event_buffer as u64),
            ("graphql_max_page_size", self.graphql_max_page_size as u64),
            ("graphql_max_depth", self.graphql_max_depth as u64),
            ("graphql_max_complexity", self.graphql_max_complexity as u64),
            ("graphql_max_body_bytes", self.graphql_max_body_bytes as u64),
            ("http_max_connections", self.http_max_connections as u64),
            ("http_header_timeout_secs", self.http_header_timeout_secs),
            ("http_idle_timeout_secs", self.http_idle_timeout_secs),
            ("http_body_timeout_secs", self.http_body_timeout_secs),
            ("http_ws_ping_secs", self.http_ws_ping_secs),
            (
                "scylla_request_timeout_secs",
                self.scylla_request_timeout_secs,
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                bail!("setting `{name}` must be at least 1");
            }
        }
        if self.history_per_shadow > MAX_HISTORY {
            bail!(
                "setting `history_per_shadow` is {}; at most {MAX_HISTORY}",
                self.history_per_shadow
            );
        }
        if let Err(e) = parse_retention(&self.history_retention) {
            bail!("setting `history_retention`: {e}");
        }
        self.deliveries()?;
        self.telemetry_topics()?;
        self.telemetry_retention()?;
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            bail!(
                "setting `trace_sample_ratio` is {}; it is a fraction from 0 to 1",
                self.trace_sample_ratio
            );
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            bail!(
                "setting `otlp_endpoint` is {endpoint:?}; give a URL, e.g. http://localhost:4318"
            );
        }
        if self.otlp_tls_cert_file.is_some() != self.otlp_tls_key_file.is_some() {
            bail!("settings `otlp_tls_cert_file` and `otlp_tls_key_file` go together");
        }
        let otlp_tls = [
            ("otlp_tls_ca_file", &self.otlp_tls_ca_file),
            ("otlp_tls_cert_file", &self.otlp_tls_cert_file),
        ];
        if let Some((name, _)) = otlp_tls.iter().find(|(_, v)| v.is_some())
            && !self
                .otlp_endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("https://"))
        {
            bail!(
                "setting `{name}` is for TLS to the span collector: it needs an https:// `otlp_endpoint` (it is {:?})",
                self.otlp_endpoint.as_deref().unwrap_or("not set")
            );
        }
        if let Some(attributes) = &self.otlp_resource_attributes {
            self.resource_attributes()
                .with_context(|| format!("setting `otlp_resource_attributes` is {attributes:?}"))?;
        }
        if self.shards > 65_536 {
            bail!("setting `shards` is {}; at most 65536", self.shards);
        }
        if self.mqtt_tls_listen.is_some() {
            for (name, value) in [
                ("tls_cert_file", &self.tls_cert_file),
                ("tls_key_file", &self.tls_key_file),
            ] {
                if value.is_none() {
                    bail!("setting `{name}` is required when `mqtt_tls_listen` is set");
                }
            }
        } else if let Some(name) = [
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
            ("tls_client_ca_file", &self.tls_client_ca_file),
        ]
        .iter()
        .find_map(|(n, v)| v.is_some().then_some(n))
        {
            bail!("setting `{name}` has no effect without `mqtt_tls_listen`");
        }
        if let Err(e) = parse_consistency(&self.scylla_consistency) {
            bail!("setting `scylla_consistency`: {e}");
        }
        if !twin_store::scylla::schema::valid_keyspace(&self.scylla_keyspace) {
            bail!(
                "setting `scylla_keyspace` = {:?}: letters, digits and _, at most 48, not starting with a digit",
                self.scylla_keyspace
            );
        }
        if self.store == StoreKind::Scylla && self.scylla_nodes.is_none() {
            bail!(
                "setting `scylla_nodes` is required with `store = \"scylla\"` (for example 10.0.0.5:9042,10.0.0.6:9042)"
            );
        }
        if self.scylla_username.is_some() != self.scylla_password.is_some() {
            bail!("settings `scylla_username` and `scylla_password` go together");
        }
        if self.scylla_tls_cert_file.is_some() != self.scylla_tls_key_file.is_some() {
            bail!("settings `scylla_tls_cert_file` and `scylla_tls_key_file` go together");
        }
        if self.scylla_tls_cert_file.is_some() && self.scylla_tls_ca_file.is_none() {
            bail!(
                "setting `scylla_tls_cert_file` needs `scylla_tls_ca_file` (the CA that signed the database nodes' certificates)"
            );
        }
        self.cluster()?;
        if self.mqtt_max_packet_size > 256 * 1024 * 1024 {
            bail!("setting `mqtt_max_packet_size` is over the MQTT limit of 256 MiB");
        }
        Ok(())
    }

    /// How this process joins a cluster: `None` unless `node_id` is set.
    pub fn cluster(&self) -> anyhow::Result<Option<twin_cluster::node::NodeConfig>> {
        let Some(node_id) = &self.node_id else {
            if let Some(name) = [
                ("cluster_advertise", self.cluster_advertise.is_some()),
                ("cluster_seeds", !self.cluster_seeds.is_empty()),
            ]
            .iter()
            .find_map(|(n, set)| set.then_some(n))
            {
                bail!("setting `{name}` has no effect without `node_id`");
            }
            return Ok(None);
        };
        let node = twin_cluster::NodeId::parse(node_id)
            .map_err(|e| anyhow::anyhow!("setting `node_id`: {e}"))?;
        if self.store != StoreKind::Scylla {
            bail!(
                "setting `node_id` needs `store = \"scylla\"`: the nodes of a cluster share their twins in ScyllaDB"
            );
        }
        if self.cluster_listen.port() == 0 {
            bail!(
                "setting `cluster_listen` is {}: it needs a port, where the other nodes reach this one",
                self.cluster_listen
            );
        }
        let advertise = match self.cluster_advertise {
            Some(addr) if addr.ip().is_unspecified() || addr.port() == 0 => bail!(
                "setting `cluster_advertise` is {addr}: the other nodes need an address and a port they can reach"
            ),
            Some(addr) => addr,
            None if self.cluster_listen.ip().is_unspecified() => bail!(
                "setting `cluster_advertise` is required when `cluster_listen` is {} (all interfaces): the address the other nodes reach this one at, such as 10.0.0.5:7946",
                self.cluster_listen
            ),
            None => self.cluster_listen,
        };
        if !(10..=60_000).contains(&self.cluster_interval_ms) {
            bail!(
                "setting `cluster_interval_ms` is {}; from 10 to 60000",
                self.cluster_interval_ms
            );
        }
        let seeds: Vec<String> = self
            .cluster_seeds
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(bad) = seeds.iter().find(|s| {
            s.rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        }) {
            bail!("setting `cluster_seeds`: {bad:?} is not HOST:PORT (seeds are comma-separated)");
        }
        Ok(Some(twin_cluster::node::NodeConfig {
            node,
            cluster_id: self.scylla_keyspace.clone(),
            listen: self.cluster_listen,
            advertise,
            seeds,
            interval: Duration::from_millis(self.cluster_interval_ms),
            passivate_deadline: self.fleet().request_timeout,
        }))
    }

    /// TLS to an https:// `otlp_endpoint`: the collector's CA (none: the system's
    /// roots) and a client certificate chain and key, read from their files, as PEM.
    pub fn otlp_tls(&self) -> anyhow::Result<Option<OtlpTls>> {
        if !self
            .otlp_endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("https://"))
        {
            return Ok(None);
        }
        Ok(Some(OtlpTls {
            ca: read_setting_file("otlp_tls_ca_file", &self.otlp_tls_ca_file)?,
            client: read_setting_file("otlp_tls_cert_file", &self.otlp_tls_cert_file)?.zip(
                read_setting_file("otlp_tls_key_file", &self.otlp_tls_key_file)?,
            ),
        }))
    }

    /// How to reach ScyllaDB (with `store = "scylla"`); reads the TLS files.
    pub fn scylla(&self) -> anyhow::Result<twin_store::scylla::ScyllaConfig> {
        let read = read_setting_file;
        let tls = match read("scylla_tls_ca_file", &self.scylla_tls_ca_file)? {
            None => None,
            Some(ca) => Some(twin_store::scylla::ScyllaTls {
                ca,
                client: read("scylla_tls_cert_file", &self.scylla_tls_cert_file)?
                    .zip(read("scylla_tls_key_file", &self.scylla_tls_key_file)?),
            }),
        };
        let nodes = self
            .scylla_nodes
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        Ok(twin_store::scylla::ScyllaConfig {
            nodes,
            keyspace: self.scylla_keyspace.clone(),
            replication: self
                .scylla_replication
                .clone()
                .unwrap_or_else(|| twin_store::scylla::SINGLE_REPLICA.into()),
            consistency: parse_consistency(&self.scylla_consistency)
                .unwrap_or(twin_store::scylla::Consistency::LocalQuorum),
            credentials: self
                .scylla_username
                .clone()
                .zip(self.scylla_password.clone()),
            tls,
            history: self.history_per_shadow,
            history_retention: self.retention(),
            request_timeout: Duration::from_secs(self.scylla_request_timeout_secs),
            telemetry_retention: self.telemetry_retention()?,
            route_retention: span("route_retention", &self.route_retention)?,
        })
    }

    /// How routes are delivered (the `webhook_*` and `route_retention` settings).
    pub fn deliveries(&self) -> anyhow::Result<twin_integrations::DeliveryConfig> {
        let schedule = twin_integrations::schedule::parse(&self.webhook_retry_schedule)
            .map_err(|e| anyhow::anyhow!("setting `webhook_retry_schedule`: {e}"))?;
        Ok(twin_integrations::DeliveryConfig {
            schedule,
            disable_after: span("webhook_disable_after", &self.webhook_disable_after)?,
            retention: span("route_retention", &self.route_retention)?,
            allowed_networks: self.allowed_networks()?,
            ..Default::default()
        })
    }

    /// `telemetry_topics`, parsed.
    pub fn telemetry_topics(&self) -> anyhow::Result<twin_model::telemetry::TelemetryTopics> {
        let patterns = self
            .telemetry_topics
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.trim().parse())
            .collect::<Result<_, String>>()
            .map_err(|e| anyhow::anyhow!("setting `telemetry_topics`: {e}"))?;
        Ok(twin_model::telemetry::TelemetryTopics::new(patterns))
    }

    /// How long telemetry series are kept (`telemetry_retention`).
    pub fn telemetry_retention(&self) -> anyhow::Result<Duration> {
        span("telemetry_retention", &self.telemetry_retention)
    }

    /// `webhook_allowed_networks`, parsed.
    pub fn allowed_networks(&self) -> anyhow::Result<Vec<twin_model::route::Network>> {
        self.webhook_allowed_networks
            .split(',')
            .filter(|n| !n.trim().is_empty())
            .map(|n| n.trim().parse())
            .collect::<Result<_, String>>()
            .map_err(|e| anyhow::anyhow!("setting `webhook_allowed_networks`: {e}"))
    }

    /// How long a shadow's changes are kept (`None`: no limit by age).
    pub fn retention(&self) -> Option<Duration> {
        parse_retention(&self.history_retention).unwrap_or_default()
    }

    /// `otlp_resource_attributes` as key and value pairs.
    pub fn resource_attributes(&self) -> anyhow::Result<Vec<(String, String)>> {
        let Some(text) = &self.otlp_resource_attributes else {
            return Ok(Vec::new());
        };
        text.split(',')
            .map(|pair| match pair.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().into(), v.trim().into())),
                _ => bail!("{pair:?} is not key=value"),
            })
            .collect()
    }

    pub fn fleet(&self) -> FleetConfig {
        FleetConfig {
            shards: self.shards,
            max_resident_twins: self.max_resident_twins,
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            max_pending: self.max_pending_requests,
            limits: Limits {
                max_state_bytes: self.max_state_bytes,
                ..Limits::default()
            },
            auto_register: self.auto_register,
            event_buffer: self.event_buffer,
            history_retention: self.retention(),
            device_ca_dir: Some(self.data_dir.clone()),
            webhook_allowed_networks: self.allowed_networks().unwrap_or_default(),
            deadlines_at_start: self.node_id.is_none(),
            ..FleetConfig::default()
        }
    }

    pub fn api_limits(&self) -> ApiLimits {
        ApiLimits {
            max_page_size: self.graphql_max_page_size,
            max_depth: self.graphql_max_depth,
            max_complexity: self.graphql_max_complexity,
            max_body_bytes: self.graphql_max_body_bytes,
        }
    }

    pub fn http_limits(&self) -> crate::http_server::HttpLimits {
        crate::http_server::HttpLimits {
            max_connections: self.http_max_connections,
            header_timeout: Duration::from_secs(self.http_header_timeout_secs),
            idle_timeout: Duration::from_secs(self.http_idle_timeout_secs),
            body_timeout: Duration::from_secs(self.http_body_timeout_secs),
        }
    }

    pub fn graphql_http(&self) -> twin_graphql::http::HttpConfig {
        twin_graphql::http::HttpConfig {
            max_body_bytes: self.graphql_max_body_bytes,
            ws_ping: Duration::from_secs(self.http_ws_ping_secs),
            ws_init_timeout: Duration::from_secs(self.http_header_timeout_secs),
        }
    }

    pub fn gateway(&self) -> GatewayConfig {
        GatewayConfig {
            max_packet_size: self.mqtt_max_packet_size,
            max_inflight_requests: self.mqtt_max_inflight_requests,
            max_inflight_messages: self.mqtt_max_inflight_messages,
            max_queued_messages: self.mqtt_max_queued_messages,
            session_expiry: Duration::from_secs(self.mqtt_session_expiry_secs),
            max_connections: self.mqtt_max_connections,
            max_publishes_per_second: self.mqtt_max_publishes_per_second,
            max_connects_per_second: self.mqtt_max_connects_per_second,
            tls_auth: match self.mqtt_tls_auth {
                TlsAuthSetting::Any => TlsAuth::Any,
                TlsAuthSetting::Certificate => TlsAuth::Certificate,
                TlsAuthSetting::Password => TlsAuth::Password,
            },
            telemetry_topics: std::sync::Arc::new(self.telemetry_topics().unwrap_or_default()),
            ..GatewayConfig::default()
        }
    }

    /// The defaults as a TOML file, each setting with its description.
    pub fn default_toml() -> String {
        let text = toml::to_string(&Config::default()).expect("the default config serializes");
        let mut out = String::from(
            "# Doppel configuration: every setting with its default.\n# Each is also DOPPEL_<NAME> in the environment and --<name-with-dashes> on the command line.\n",
        );
        for line in text.lines() {
            if let Some((key, _)) = line.split_once(" = ")
                && let Some(doc) = DOCS.iter().find(|(k, _)| *k == key).map(|(_, d)| d)
            {
                out.push_str(&format!("\n# {doc}\n"));
            }
            out.push_str(line);
            out.push('\n');
        }
        let defaults = defaults_table();
        for (key, doc) in DOCS.iter().filter(|(k, _)| !defaults.contains_key(*k)) {
            out.push_str(&format!("\n# {doc} Not set by default.\n# {key} = \"\"\n"));
        }
        out
    }
}

/// One line per setting, for `doppel config --default` (the README table says the same).
pub const DOCS: &[(&str, &str)] = &[
    (
        "data_dir",
        "Where the embedded store keeps its files (and, with either store, the API tokens and the job-signing key).",
    ),
    (
        "store",
        "Where twins persist: embedded (fjall in data_dir) or scylla (ScyllaDB or Apache Cassandra at scylla_nodes).",
    ),
    (
        "scylla_nodes",
        "With store = scylla: host:port of one or more database nodes, comma-separated (the driver finds the others).",
    ),
    (
        "scylla_keyspace",
        "The keyspace Doppel keeps its tables in (created on first start).",
    ),
    (
        "scylla_replication",
        "The keyspace's replication when it is created, a CQL map such as {'class': 'NetworkTopologyStrategy', 'dc1': 3}; unset: one replica (development), said in the log.",
    ),
    (
        "scylla_consistency",
        "Consistency of every read and write; an update is acknowledged once written at this level (ONE, QUORUM, LOCAL_QUORUM, ...).",
    ),
    (
        "scylla_username",
        "User name for a database with password authentication (with scylla_password).",
    ),
    ("scylla_password", "Password of scylla_username."),
    (
        "scylla_request_timeout_secs",
        "Longest wait for one database request, and for connecting at start.",
    ),
    (
        "scylla_tls_ca_file",
        "PEM CA that signed the database nodes' certificates; set, connections use TLS.",
    ),
    (
        "scylla_tls_cert_file",
        "PEM client certificate chain, for nodes that require one (with scylla_tls_key_file).",
    ),
    (
        "scylla_tls_key_file",
        "PEM private key of scylla_tls_cert_file.",
    ),
    (
        "node_id",
        "This node's name in a cluster (1-64 of A-Z a-z 0-9 _ . -, unique and kept across restarts); setting it makes the process a cluster node, with store = scylla.",
    ),
    (
        "cluster_listen",
        "With node_id: the UDP address cluster gossip listens on.",
    ),
    (
        "cluster_advertise",
        "With node_id: the address the other nodes reach this one at (HOST:PORT); unset: cluster_listen, which must then name an interface.",
    ),
    (
        "cluster_seeds",
        "With node_id: gossip addresses of other nodes to join through, comma-separated (HOST:PORT); the others are learned. Empty: wait to be found.",
    ),
    (
        "cluster_interval_ms",
        "With node_id: how often a node gossips, checks its shard leases and writes its heartbeat; a dead node's shards move after a few of these.",
    ),
    (
        "mqtt_listen",
        "MQTT device endpoint address: IP:PORT, HOST:PORT or :PORT for all interfaces (port 0 picks a free port).",
    ),
    (
        "http_listen",
        "HTTP address for GraphQL (/graphql, /graphql/ws), /metrics, /healthz and /readyz (port 0 picks a free port).",
    ),
    (
        "log_format",
        "Log lines on standard error: text, or json (one object per line: timestamp, level, target, message and fields, spans).",
    ),
    (
        "otlp_endpoint",
        "Where spans go (OpenTelemetry OTLP): a URL such as http://localhost:4318 (otlp_protocol = http) or http://localhost:4317 (grpc); tracing is off unless set.",
    ),
    (
        "otlp_protocol",
        "OTLP transport: http (protobuf over HTTP, to {otlp_endpoint}/v1/traces) or grpc.",
    ),
    (
        "trace_sample_ratio",
        "Fraction of traces started here that are recorded (0 to 1); a caller's traceparent decides for its own trace.",
    ),
    ("otlp_service_name", "service.name of the exported spans."),
    (
        "otlp_resource_attributes",
        "More resource attributes of the exported spans: key=value pairs, comma-separated (e.g. deployment.environment=prod,service.instance.id=node-1).",
    ),
    (
        "otlp_tls_ca_file",
        "PEM CA that signed the span collector's certificate, for an https:// otlp_endpoint; not set: the system's CA certificates.",
    ),
    (
        "otlp_tls_cert_file",
        "PEM client certificate chain, for a collector that requires one (with otlp_tls_key_file).",
    ),
    (
        "otlp_tls_key_file",
        "PEM private key of otlp_tls_cert_file.",
    ),
    (
        "metrics_listen",
        "A second address serving only /metrics, as http_listen (for a scraper kept off the API's network); off unless set.",
    ),
    (
        "auto_register",
        "Development only: register unknown devices on connect and skip password checks.",
    ),
    ("shards", "Number of twin shards (supervisors)."),
    (
        "max_resident_twins",
        "Twins kept in memory at most; the least recently used are passivated.",
    ),
    (
        "idle_timeout_secs",
        "Seconds of inactivity after which a twin is passivated.",
    ),
    (
        "max_pending_requests",
        "Requests in flight across the fleet; more are refused with 429.",
    ),
    (
        "max_state_bytes",
        "Largest shadow state (desired + reported), in bytes.",
    ),
    (
        "history_per_shadow",
        "Changes kept in each shadow's history (at most 10000).",
    ),
    (
        "history_retention",
        "How long a shadow's changes are kept: `30d`, `12h`, `90m`, `3600s`, or `off`.",
    ),
    (
        "mqtt_max_packet_size",
        "Largest MQTT packet a device may send, in bytes.",
    ),
    (
        "mqtt_max_inflight_requests",
        "Shadow requests one connection may have in flight; more get 429.",
    ),
    (
        "mqtt_max_inflight_messages",
        "Unacknowledged QoS 1 messages per device.",
    ),
    (
        "mqtt_max_queued_messages",
        "Messages queued per session while its device is away or slow.",
    ),
    (
        "mqtt_session_expiry_secs",
        "Longest time, in seconds, a persistent session outlives its connection.",
    ),
    ("mqtt_max_connections", "Concurrent MQTT connections."),
    (
        "mqtt_max_publishes_per_second",
        "PUBLISH packets per second on one connection, up to as many at once (AWS IoT: 100); more get PUBACK 0x97 (MQTT 5 QoS 1), are dropped (QoS 0), or end the connection (3.1.1). 0: no limit.",
    ),
    (
        "mqtt_max_connects_per_second",
        "CONNECTs per second per client id, up to ten times as many at once (AWS IoT: 1); more get CONNACK 0x97 (MQTT 5) or 3 (3.1.1). 0: no limit.",
    ),
    (
        "event_buffer",
        "Twin events buffered for subscribers; one that falls further behind gets a Lagged event.",
    ),
    (
        "graphql_max_page_size",
        "Largest `first` of a GraphQL page.",
    ),
    ("graphql_max_depth", "Deepest GraphQL query accepted."),
    (
        "graphql_max_complexity",
        "Most complex GraphQL query accepted (one per field, times `first` for pages).",
    ),
    (
        "graphql_max_body_bytes",
        "Largest GraphQL request body, in bytes.",
    ),
    (
        "http_max_connections",
        "Concurrent HTTP connections, apart from MQTT's; at the cap a new one replaces the oldest idle one, or gets 503 when all are busy.",
    ),
    (
        "http_header_timeout_secs",
        "Seconds a client has to send a request's headers (from connecting, or from their first byte), and a WebSocket its connection_init.",
    ),
    (
        "http_idle_timeout_secs",
        "Seconds a kept-alive HTTP connection may wait for its next request.",
    ),
    (
        "http_body_timeout_secs",
        "Seconds a request body has to arrive whole after its headers (408 after that).",
    ),
    (
        "http_ws_ping_secs",
        "Seconds between pings on a subscription WebSocket; one silent for two of them is closed.",
    ),
    (
        "mqtt_tls_listen",
        "MQTT over TLS address (port 0 picks a free port); off unless set.",
    ),
    (
        "tls_cert_file",
        "PEM server certificate chain for mqtt_tls_listen.",
    ),
    ("tls_key_file", "PEM private key of that certificate."),
    (
        "tls_client_ca_file",
        "PEM CA: when set, every TLS device must present a certificate it issued.",
    ),
    (
        "mqtt_tls_auth",
        "How TLS devices log in: any (the password when one is given, else a registered client certificate attached to the thing), certificate (only such a certificate, as AWS IoT), or password. The plain listener takes passwords.",
    ),
    (
        "webhook_allowed_networks",
        "Non-public networks webhooks may still go to, comma-separated (`127.0.0.0/8,10.1.0.0/16`); loopback, private and link-local addresses are refused otherwise.",
    ),
    (
        "webhook_retry_schedule",
        "Waits before each retry of a failed event (Standard Webhooks' schedule); after the last, the event is given up.",
    ),
    (
        "webhook_disable_after",
        "A route whose deliveries fail for longer is disabled until resumed.",
    ),
    (
        "route_retention",
        "How long route events and delivery logs are kept (what replayRoute reaches back to).",
    ),
    (
        "telemetry_topics",
        "Topic patterns devices publish telemetry on, comma-separated: levels, `+` for any level, `{thing}` for the publishing thing (once), `{type}` for the reading's type, a final `#`. AWS IoT Basic Ingest ($aws/rules/<route>/...) is always on.",
    ),
    (
        "telemetry_retention",
        "How long telemetry readings are kept for telemetrySeries (the latest value of each key is kept until the thing is deleted).",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_defaults_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("doppel.toml");
        std::fs::write(
            &file,
            "shards = 8\nmax_state_bytes = 1000\ndata_dir = \"/from/file\"\n",
        )
        .unwrap();
        let mut flags = Table::new();
        flags.insert("shards".into(), Value::Integer(2));
        let c = Config::load(
            Some(&file),
            &env(&[
                ("DOPPEL_SHARDS", "4"),
                ("DOPPEL_MAX_STATE_BYTES", "2000"),
                ("PATH", "/bin"),
            ]),
            flags,
        )
        .unwrap();
        assert_eq!(c.shards, 2, "flag beats env and file");
        assert_eq!(c.max_state_bytes, 2000, "env beats file");
        assert_eq!(
            c.data_dir,
            PathBuf::from("/from/file"),
            "file beats default"
        );
        assert_eq!(c.mqtt_listen, Config::default().mqtt_listen);
        assert_eq!(
            Config::load(None, &BTreeMap::new(), Table::new()).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let err = Config::load(None, &env(&[("DOPPEL_SHARDS", "many")]), Table::new()).unwrap_err();
        assert!(
            format!("{err:#}").contains("DOPPEL_SHARDS=\"many\""),
            "{err:#}"
        );
        let err = Config::load(
            None,
            &env(&[("DOPPEL_AUTO_REGISTER", "maybe")]),
            Table::new(),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("DOPPEL_AUTO_REGISTER"),
            "{err:#}"
        );
        let err = Config::load(
            None,
            &env(&[("DOPPEL_MQTT_LISTEN", "nowhere")]),
            Table::new(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("mqtt_listen"), "{err:#}");
        let err = Config::load(None, &env(&[("DOPPEL_SHARDS", "0")]), Table::new()).unwrap_err();
        assert_eq!(err.to_string(), "setting `shards` must be at least 1");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.toml");
        std::fs::write(&file, "shardz = 3\n").unwrap();
        let err = Config::load(Some(&file), &BTreeMap::new(), Table::new()).unwrap_err();
        assert!(
            err.to_string().contains("unknown setting `shardz`"),
            "{err}"
        );
    }

    #[test]
    fn listen_addresses_take_the_forms_the_readme_uses() {
        assert_eq!(
            parse_listen(":8080"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 8080)))
        );
        assert_eq!(
            parse_listen("127.0.0.1:1883"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 1883)))
        );
        assert_eq!(parse_listen("[::1]:0").unwrap().port(), 0);
        assert!(parse_listen("localhost:1883").unwrap().ip().is_loopback());
        for bad in ["8080", ":http", "host:", ":99999", ""] {
            let err = parse_listen(bad).unwrap_err();
            assert!(err.ends_with(LISTEN_FORMS), "{bad}: {err}");
        }
        let err =
            Config::load(None, &env(&[("DOPPEL_HTTP_LISTEN", "8080")]), Table::new()).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("setting `http_listen`"), "{err}");
        assert!(
            err.contains("expected IP:PORT, HOST:PORT or :PORT"),
            "{err}"
        );
    }

    #[test]
    fn tls_settings_go_together() {
        let err = Config::load(
            None,
            &env(&[("DOPPEL_MQTT_TLS_LISTEN", "127.0.0.1:8883")]),
            Table::new(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "setting `tls_cert_file` is required when `mqtt_tls_listen` is set"
        );
        let err = Config::load(
            None,
            &env(&[("DOPPEL_TLS_KEY_FILE", "k.pem")]),
            Table::new(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "setting `tls_key_file` has no effect without `mqtt_tls_listen`"
        );
        let ok = Config::load(
            None,
            &env(&[
                ("DOPPEL_MQTT_TLS_LISTEN", "127.0.0.1:8883"),
                ("DOPPEL_TLS_CERT_FILE", "c.pem"),
                ("DOPPEL_TLS_KEY_FILE", "k.pem"),
            ]),
            Table::new(),
        )
        .unwrap();
        assert_eq!(ok.tls_cert_file, Some(PathBuf::from("c.pem")));
    }

    #[test]
    fn otlp_tls_settings_need_an_https_endpoint_and_each_other() {
        let load = |vars: &[(&str, &str)]| Config::load(None, &env(vars), Table::new());
        let err = load(&[
            ("DOPPEL_OTLP_ENDPOINT", "http://collector:4318"),
            ("DOPPEL_OTLP_TLS_CA_FILE", "ca.pem"),
        ])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "setting `otlp_tls_ca_file` is for TLS to the span collector: it needs an https:// `otlp_endpoint` (it is \"http://collector:4318\")"
        );
        let err = load(&[
            ("DOPPEL_OTLP_ENDPOINT", "https://collector:4318"),
            ("DOPPEL_OTLP_TLS_CERT_FILE", "c.pem"),
        ])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "settings `otlp_tls_cert_file` and `otlp_tls_key_file` go together"
        );
        let https = load(&[("DOPPEL_OTLP_ENDPOINT", "https://collector:4318")]).unwrap();
        let tls = https.otlp_tls().unwrap().expect("an https endpoint is TLS");
        assert!(tls.ca.is_none() && tls.client.is_none(), "the system's CAs");
        let missing = load(&[
            ("DOPPEL_OTLP_ENDPOINT", "https://collector:4318"),
            ("DOPPEL_OTLP_TLS_CA_FILE", "/nonexistent/ca.pem"),
        ])
        .unwrap()
        .otlp_tls()
        .unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("cannot read otlp_tls_ca_file /nonexistent/ca.pem"),
            "{missing}"
        );
    }

    #[test]
    fn the_readme_lists_every_setting_with_its_flag_and_variable() {
        let readme = include_str!("../README.md");
        for (key, _) in DOCS {
            let row = format!(
                "| `{key}` | `--{}` | `{ENV_PREFIX}{}` |",
                key.replace('_', "-"),
                key.to_uppercase()
            );
            assert!(readme.contains(&row), "README.md has no row {row}");
        }
    }

    #[test]
    fn scylla_settings_are_checked_and_named() {
        let scylla = |pairs: &[(&str, &str)]| Config::load(None, &env(pairs), Table::new());
        let err = scylla(&[("DOPPEL_STORE", "scylla")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`scylla_nodes` is required"), "{err}");
        let err = scylla(&[
            ("DOPPEL_STORE", "scylla"),
            ("DOPPEL_SCYLLA_NODES", "db:9042"),
            ("DOPPEL_SCYLLA_CONSISTENCY", "MOSTLY"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("scylla_consistency") && err.contains("LOCAL_QUORUM"),
            "{err}"
        );
        let c = scylla(&[
            ("DOPPEL_STORE", "scylla"),
            ("DOPPEL_SCYLLA_NODES", "a:9042, b:9042"),
        ])
        .unwrap();
        assert_eq!(c.scylla().unwrap().nodes, ["a:9042", "b:9042"]);
        let err = scylla(&[("DOPPEL_STORE", "cassandra")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`store`"), "{err}");
    }

    #[test]
    fn cluster_settings_are_checked_and_named() {
        let load = |pairs: &[(&str, &str)]| {
            let mut all = vec![
                ("DOPPEL_STORE", "scylla"),
                ("DOPPEL_SCYLLA_NODES", "db:9042"),
            ];
            all.extend_from_slice(pairs);
            Config::load(None, &env(&all), Table::new())
        };
        let err = |pairs: &[(&str, &str)]| load(pairs).unwrap_err().to_string();
        assert!(load(&[]).unwrap().cluster().unwrap().is_none());
        let node = load(&[
            ("DOPPEL_NODE_ID", "node-1"),
            ("DOPPEL_CLUSTER_LISTEN", "127.0.0.1:7946"),
            ("DOPPEL_CLUSTER_SEEDS", "10.0.0.2:7946, node-3:7946"),
        ])
        .unwrap()
        .cluster()
        .unwrap()
        .unwrap();
        assert_eq!(node.node.as_str(), "node-1");
        assert_eq!(node.advertise, node.listen);
        assert_eq!(node.seeds, ["10.0.0.2:7946", "node-3:7946"]);
        assert_eq!(node.interval, Duration::from_secs(1));
        assert_eq!(node.cluster_id, "doppel");

        let embedded = Config::load(None, &env(&[("DOPPEL_NODE_ID", "n")]), Table::new())
            .unwrap_err()
            .to_string();
        assert!(
            embedded.contains("`node_id` needs `store = \"scylla\"`"),
            "{embedded}"
        );
        let e = err(&[("DOPPEL_NODE_ID", "a b")]);
        assert!(e.contains("node_id") && e.contains("\"a b\""), "{e}");
        let e = err(&[("DOPPEL_NODE_ID", "n")]);
        assert!(e.contains("`cluster_advertise` is required"), "{e}");
        let e = err(&[
            ("DOPPEL_NODE_ID", "n"),
            ("DOPPEL_CLUSTER_ADVERTISE", "0.0.0.0:7946"),
        ]);
        assert!(e.contains("`cluster_advertise` is 0.0.0.0:7946"), "{e}");
        let e = err(&[
            ("DOPPEL_NODE_ID", "n"),
            ("DOPPEL_CLUSTER_LISTEN", "127.0.0.1:0"),
        ]);
        assert!(e.contains("`cluster_listen`") && e.contains("port"), "{e}");
        let e = err(&[
            ("DOPPEL_NODE_ID", "n"),
            ("DOPPEL_CLUSTER_LISTEN", "127.0.0.1:7946"),
            ("DOPPEL_CLUSTER_SEEDS", "10.0.0.2"),
        ]);
        assert!(
            e.contains("`cluster_seeds`") && e.contains("\"10.0.0.2\""),
            "{e}"
        );
        let e = err(&[
            ("DOPPEL_NODE_ID", "n"),
            ("DOPPEL_CLUSTER_LISTEN", "127.0.0.1:7946"),
            ("DOPPEL_CLUSTER_INTERVAL_MS", "5"),
        ]);
        assert!(
            e.contains("`cluster_interval_ms` is 5; from 10 to 60000"),
            "{e}"
        );
        let e = err(&[("DOPPEL_CLUSTER_SEEDS", "10.0.0.2:7946")]);
        assert!(
            e.contains("`cluster_seeds` has no effect without `node_id`"),
            "{e}"
        );
    }

    #[test]
    fn the_default_file_documents_and_round_trips_every_setting() {
        let text = Config::default_toml();
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed, Config::default());
        for key in defaults_table().keys() {
            assert!(
                DOCS.iter().any(|(k, _)| k == key),
                "{key} has no description"
            );
        }
    }
}
