//! `doppel`: the command line. Parses arguments and calls the library; nothing else.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use doppel::Config;
use serde::Serialize;

/// The server allocates and frees small JSON values and buffers at a high rate; glibc's
/// allocator spent a fifth of the CPU at saturation (see load-tests/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "doppel",
    version = doppel::version(),
    about = "Digital twins for IoT fleets: an AWS IoT compatible MQTT device endpoint, durable device shadows, one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform: the MQTT device endpoint, the twins, the embedded store and GraphQL
    Serve(Box<ServeArgs>),
    /// Issue API tokens for GraphQL (works while the server runs)
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        source: Source,
    },
    /// Print the GraphQL schema (SDL)
    Schema,
    /// Print the Ed25519 public key (hex) that verifies job documents' signatures
    SigningKey {
        #[command(flatten)]
        source: Source,
    },
    /// The built-in device CA in the data directory (works while the server runs)
    Ca {
        #[command(subcommand)]
        command: CaCommand,
        #[command(flatten)]
        source: Source,
    },
    /// Device certificates from the built-in CA (while no server holds the data directory)
    Cert {
        #[command(subcommand)]
        command: CertCommand,
        #[command(flatten)]
        source: Source,
    },
    /// The audit log (while no server holds the data directory)
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
        #[command(flatten)]
        source: Source,
    },
    /// Manage the device registry in the data directory (while no server holds it)
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
        #[command(flatten)]
        source: Source,
    },
    /// Create or check the ScyllaDB schema (store = scylla); with --dry-run, print its CQL
    Migrate {
        /// Print the CQL statements instead of running them
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        source: Source,
    },
    /// The cluster of the configured keyspace (store = scylla): its nodes and their shards
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[command(flatten)]
        source: Source,
    },
    /// Print the configuration
    Config {
        /// Print every setting with its default, as a TOML file
        #[arg(long)]
        default: bool,
        #[command(flatten)]
        source: Source,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Print every node (up or down, by its heartbeats), its address and the shards it holds
    Status,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a bearer token; prints it once (only its hash is kept)
    Create {
        /// viewer (queries, subscriptions), operator (+ desired state), admin (+ registry, tokens)
        #[arg(long)]
        role: twin_graphql::Role,
        /// Lifetime such as 30d, 12h, 15m; no expiry without it
        #[arg(long, value_parser = twin_graphql::auth::parse_ttl)]
        ttl: Option<u64>,
        /// A note kept with the token (who or what it is for)
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make the device CA (device-ca.pem, and device-ca.key readable by the owner only)
    Init {
        /// The CA certificate's common name
        #[arg(long, default_value = "Doppel device CA")]
        name: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the audit log's hash chain; names the first entry that does not match
    Verify,
}

#[derive(Subcommand)]
enum CertCommand {
    /// Issue a certificate with a new key for a registered thing, register it ACTIVE and
    /// attach it to the thing; writes THING.cert.pem and THING.key.pem
    Issue {
        /// The thing the certificate logs in as
        #[arg(long)]
        thing: String,
        /// Where the two files go
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Register a device; prints its secret (the MQTT password) once
    Add { id: String },
    /// Register many devices from JSON lines ({"id": ..., "attributes": {...}}), a thousand
    /// per durable commit; prints each new device's secret once, as JSON lines
    Import {
        /// The file to read; standard input without it
        file: Option<PathBuf>,
    },
    /// List registered devices
    List,
    /// Refuse a device's connections (it keeps its twin and secret)
    Disable { id: String },
    /// Accept a disabled device's connections again
    Enable { id: String },
}

/// Where settings come from besides the environment.
#[derive(Args, Serialize)]
struct Source {
    /// TOML configuration file [env: DOPPEL_CONFIG]
    #[arg(long, global = true)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Data directory [default: ./doppel-data] [env: DOPPEL_DATA_DIR]
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
}

/// Every setting is also a TOML key (`doppel config --default`) and a DOPPEL_* variable.
#[derive(Args, Serialize)]
struct ServeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    source: Source,
    /// Where twins persist: embedded (fjall in --data-dir) or scylla (ScyllaDB or Apache Cassandra at --scylla-nodes) [default: embedded] [env: DOPPEL_STORE]
    #[arg(long, value_parser = ["embedded", "scylla"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<String>,
    /// With --store scylla: database nodes, host:port comma-separated [env: DOPPEL_SCYLLA_NODES]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    scylla_nodes: Option<String>,
    /// Keyspace of Doppel's tables, created on first start [default: doppel] [env: DOPPEL_SCYLLA_KEYSPACE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    scylla_keyspace: Option<String>,
    /// Replication of a keyspace created now, a CQL map, e.g. "{'class': 'NetworkTopologyStrategy', 'dc1': 3}" [default: one replica] [env: DOPPEL_SCYLLA_REPLICATION]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    scylla_replication: Option<String>,
    /// Consistency of every read and write (ONE, QUORUM, LOCAL_QUORUM, ...) [default: LOCAL_QUORUM] [env: DOPPEL_SCYLLA_CONSISTENCY]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    scylla_consistency: Option<String>,
    /// User name for password authentication, with --scylla-password [env: DOPPEL_SCYLLA_USERNAME]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    scylla_username: Option<String>,
    /// Password of --scylla-username (prefer DOPPEL_SCYLLA_PASSWORD or the config file) [env: DOPPEL_SCYLLA_PASSWORD]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    scylla_password: Option<String>,
    /// Longest wait for one database request, and to connect at start [default: 10] [env: DOPPEL_SCYLLA_REQUEST_TIMEOUT_SECS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    scylla_request_timeout_secs: Option<u64>,
    /// PEM CA that signed the database nodes' certificates; set, connections use TLS [env: DOPPEL_SCYLLA_TLS_CA_FILE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    scylla_tls_ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for nodes that require one [env: DOPPEL_SCYLLA_TLS_CERT_FILE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    scylla_tls_cert_file: Option<PathBuf>,
    /// PEM private key of --scylla-tls-cert-file [env: DOPPEL_SCYLLA_TLS_KEY_FILE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    scylla_tls_key_file: Option<PathBuf>,
    /// This node's name in a cluster; makes the process a cluster node (with --store scylla) [env: DOPPEL_NODE_ID]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    node_id: Option<String>,
    /// With --node-id: UDP address of cluster gossip [default: 0.0.0.0:7946] [env: DOPPEL_CLUSTER_LISTEN]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_listen: Option<String>,
    /// With --node-id: address the other nodes reach this one at [default: --cluster-listen] [env: DOPPEL_CLUSTER_ADVERTISE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_advertise: Option<String>,
    /// With --node-id: gossip addresses of nodes to join through, comma-separated [default: none] [env: DOPPEL_CLUSTER_SEEDS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_seeds: Option<String>,
    /// With --node-id: milliseconds between gossip, lease checks and heartbeats [default: 1000] [env: DOPPEL_CLUSTER_INTERVAL_MS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_interval_ms: Option<u64>,
    /// MQTT device endpoint address: IP:PORT, HOST:PORT or :PORT; port 0 picks a free port [default: 0.0.0.0:1883] [env: DOPPEL_MQTT_LISTEN]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_listen: Option<String>,
    /// HTTP address (GraphQL, /metrics, /healthz, /readyz), as --mqtt-listen [default: 0.0.0.0:8080] [env: DOPPEL_HTTP_LISTEN]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_listen: Option<String>,
    /// A second address serving only /metrics, as --http-listen; off unless set [env: DOPPEL_METRICS_LISTEN]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<String>,
    /// Log lines on standard error: text, or json (one object per line) [default: text] [env: DOPPEL_LOG_FORMAT]
    #[arg(long, value_parser = ["text", "json"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<String>,
    /// Where spans go (OTLP), e.g. http://localhost:4318; tracing is off unless set [env: DOPPEL_OTLP_ENDPOINT]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_endpoint: Option<String>,
    /// OTLP transport: http (protobuf) or grpc [default: http] [env: DOPPEL_OTLP_PROTOCOL]
    #[arg(long, value_parser = ["http", "grpc"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_protocol: Option<String>,
    /// Fraction of traces started here that are recorded, 0 to 1 [default: 1] [env: DOPPEL_TRACE_SAMPLE_RATIO]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_sample_ratio: Option<f64>,
    /// service.name of the exported spans [default: doppel] [env: DOPPEL_OTLP_SERVICE_NAME]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_service_name: Option<String>,
    /// More resource attributes: key=value,key=value [env: DOPPEL_OTLP_RESOURCE_ATTRIBUTES]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_resource_attributes: Option<String>,
    /// PEM CA of the span collector, for an https:// --otlp-endpoint; not set: the system's CAs [env: DOPPEL_OTLP_TLS_CA_FILE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_tls_ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for a collector that requires one [env: DOPPEL_OTLP_TLS_CERT_FILE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_tls_cert_file: Option<PathBuf>,
    /// PEM private key of --otlp-tls-cert-file [env: DOPPEL_OTLP_TLS_KEY_FILE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_tls_key_file: Option<PathBuf>,
    /// Development only: register unknown devices on connect, skip password checks [env: DOPPEL_AUTO_REGISTER]
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    auto_register: bool,
    /// Number of twin shards [default: 64] [env: DOPPEL_SHARDS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    shards: Option<usize>,
    /// Twins kept in memory at most [default: 1000000] [env: DOPPEL_MAX_RESIDENT_TWINS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_resident_twins: Option<usize>,
    /// Seconds idle before a twin is passivated [default: 600] [env: DOPPEL_IDLE_TIMEOUT_SECS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_timeout_secs: Option<u64>,
    /// Requests in flight across the fleet; more get 429 [default: 100000] [env: DOPPEL_MAX_PENDING_REQUESTS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_pending_requests: Option<usize>,
    /// Largest shadow state in bytes [default: 8192] [env: DOPPEL_MAX_STATE_BYTES]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_state_bytes: Option<usize>,
    /// Changes kept per shadow in its history, at most 10000 [default: 100] [env: DOPPEL_HISTORY_PER_SHADOW]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    history_per_shadow: Option<u64>,
    /// How long a shadow's changes are kept: 30d, 12h, 90m, 3600s or off [default: 30d] [env: DOPPEL_HISTORY_RETENTION]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    history_retention: Option<String>,
    /// Largest MQTT packet from a device, bytes [default: 131072] [env: DOPPEL_MQTT_MAX_PACKET_SIZE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_max_packet_size: Option<usize>,
    /// Shadow requests in flight per connection; more get 429 [default: 10] [env: DOPPEL_MQTT_MAX_INFLIGHT_REQUESTS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_max_inflight_requests: Option<usize>,
    /// Unacknowledged QoS 1 messages per device [default: 100] [env: DOPPEL_MQTT_MAX_INFLIGHT_MESSAGES]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_max_inflight_messages: Option<u16>,
    /// Messages queued per session [default: 1000] [env: DOPPEL_MQTT_MAX_QUEUED_MESSAGES]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_max_queued_messages: Option<usize>,
    /// Longest persistent-session expiry, seconds [default: 3600] [env: DOPPEL_MQTT_SESSION_EXPIRY_SECS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_session_expiry_secs: Option<u64>,
    /// Concurrent MQTT connections [default: 1000000] [env: DOPPEL_MQTT_MAX_CONNECTIONS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_max_connections: Option<usize>,
    /// PUBLISH packets per second on one connection (0: no limit) [default: 100] [env: DOPPEL_MQTT_MAX_PUBLISHES_PER_SECOND]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_max_publishes_per_second: Option<u32>,
    /// CONNECTs per second per client id, ten at once (0: no limit) [default: 1] [env: DOPPEL_MQTT_MAX_CONNECTS_PER_SECOND]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_max_connects_per_second: Option<u32>,
    /// Twin events buffered for subscribers; slower ones get Lagged [default: 65536] [env: DOPPEL_EVENT_BUFFER]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    event_buffer: Option<usize>,
    /// Largest `first` of a GraphQL page [default: 100] [env: DOPPEL_GRAPHQL_MAX_PAGE_SIZE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    graphql_max_page_size: Option<usize>,
    /// Deepest GraphQL query [default: 12] [env: DOPPEL_GRAPHQL_MAX_DEPTH]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    graphql_max_depth: Option<usize>,
    /// Most complex GraphQL query [default: 5000] [env: DOPPEL_GRAPHQL_MAX_COMPLEXITY]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    graphql_max_complexity: Option<usize>,
    /// Largest GraphQL request body, bytes [default: 1048576] [env: DOPPEL_GRAPHQL_MAX_BODY_BYTES]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    graphql_max_body_bytes: Option<usize>,
    /// Concurrent HTTP connections, apart from MQTT's [default: 10000] [env: DOPPEL_HTTP_MAX_CONNECTIONS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_max_connections: Option<usize>,
    /// Seconds to send a request's headers (and a WebSocket's connection_init) [default: 10] [env: DOPPEL_HTTP_HEADER_TIMEOUT_SECS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_header_timeout_secs: Option<u64>,
    /// Seconds a kept-alive HTTP connection may wait for its next request [default: 60] [env: DOPPEL_HTTP_IDLE_TIMEOUT_SECS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_idle_timeout_secs: Option<u64>,
    /// Seconds a request body has to arrive after its headers [default: 30] [env: DOPPEL_HTTP_BODY_TIMEOUT_SECS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_body_timeout_secs: Option<u64>,
    /// Seconds between pings on subscription WebSockets [default: 30] [env: DOPPEL_HTTP_WS_PING_SECS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_ws_ping_secs: Option<u64>,
    /// MQTT over TLS address, as --mqtt-listen; off unless set [env: DOPPEL_MQTT_TLS_LISTEN]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_tls_listen: Option<String>,
    /// PEM server certificate chain for --mqtt-tls-listen [env: DOPPEL_TLS_CERT_FILE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of that certificate [env: DOPPEL_TLS_KEY_FILE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key_file: Option<PathBuf>,
    /// PEM CA; when set, TLS devices must present a certificate it issued [env: DOPPEL_TLS_CLIENT_CA_FILE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_client_ca_file: Option<PathBuf>,
    /// How TLS devices log in: any (a password, else a registered client certificate), certificate, or password [default: any] [env: DOPPEL_MQTT_TLS_AUTH]
    #[arg(long, value_parser = ["any", "certificate", "password"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_tls_auth: Option<String>,
    /// Non-public networks webhooks may go to, comma-separated CIDRs [default: none] [env: DOPPEL_WEBHOOK_ALLOWED_NETWORKS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook_allowed_networks: Option<String>,
    /// Waits before each retry of a failed event [default: 5s,5m,30m,2h,5h,10h,14h,20h,24h] [env: DOPPEL_WEBHOOK_RETRY_SCHEDULE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook_retry_schedule: Option<String>,
    /// A route failing for longer is disabled [default: 5d] [env: DOPPEL_WEBHOOK_DISABLE_AFTER]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook_disable_after: Option<String>,
    /// How long route events and delivery logs are kept [default: 7d] [env: DOPPEL_ROUTE_RETENTION]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    route_retention: Option<String>,
    /// Topic patterns of device telemetry, comma-separated [default: dt/+/{thing}/{type}] [env: DOPPEL_TELEMETRY_TOPICS]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    telemetry_topics: Option<String>,
    /// How long telemetry readings are kept for series [default: 7d] [env: DOPPEL_TELEMETRY_RETENTION]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    telemetry_retention: Option<String>,
}

/// Loads the configuration; commands other than `serve` log in its `log_format` from here.
fn load(file: Option<PathBuf>, flags: &impl Serialize) -> anyhow::Result<Config> {
    let config = load_only(file, flags)?;
    doppel::logging::init(std::io::stderr().is_terminal(), &config, None);
    Ok(config)
}

fn load_only(file: Option<PathBuf>, flags: &impl Serialize) -> anyhow::Result<Config> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let file = file.or_else(|| env.get("DOPPEL_CONFIG").map(PathBuf::from));
    Config::load(file.as_deref(), &env, toml::Table::try_from(flags)?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = load_only(args.source.config.clone(), &args)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            // The span exporter (gRPC's especially) is made on the runtime it sends from.
            let tracer = {
                let _on_runtime = runtime.enter();
                doppel::logging::tracer(&config)?
            };
            let tracing = doppel::logging::init(std::io::stderr().is_terminal(), &config, tracer);
            let served = runtime.block_on(async { doppel::serve(config, shutdown_signal()).await });
            if let Some(tracing) = tracing {
                tracing.flush();
            }
            served
        }
        Command::Ca { command, source } => {
            let config = load(source.config.clone(), &source)?;
            let CaCommand::Init { name } = command;
            let path = doppel::init_device_ca(&config, &name)?;
            println!("device CA created: {}", path.display());
            println!(
                "its key is beside it, readable by its owner only; certificates it issues log in once registered and attached"
            );
            Ok(())
        }
        Command::Audit { command, source } => {
            let config = load(source.config.clone(), &source)?;
            let AuditCommand::Verify = command;
            let (count, head) = doppel::verify_audit(&config)?;
            println!("audit log verified: {count} entries");
            if let Some(head) = head {
                println!("newest entry's hash: {head}");
            }
            Ok(())
        }
        Command::Cert { command, source } => {
            let config = load(source.config.clone(), &source)?;
            let CertCommand::Issue { thing, out } = command;
            let issued = doppel::issue_certificate(&config, &thing, &out)?;
            println!(
                "certificate {} issued, registered ACTIVE and attached to {thing}",
                issued.id
            );
            println!("certificate: {}", issued.certificate.display());
            println!(
                "private key: {} (shown nowhere else; keep it on the device)",
                issued.private_key.display()
            );
            Ok(())
        }
        Command::Device { command, source } => {
            let config = load(source.config.clone(), &source)?;
            match command {
                DeviceCommand::Add { id } => {
                    let secret = doppel::add_device(&config, &id)?;
                    println!("registered {id}");
                    println!("secret (the device's MQTT password; shown only this once): {secret}");
                }
                DeviceCommand::Import { file } => {
                    let stdout = std::io::stdout().lock();
                    let done = match file {
                        Some(path) => {
                            let f = std::fs::File::open(&path).map_err(|e| {
                                anyhow::anyhow!("cannot open {}: {e}", path.display())
                            })?;
                            doppel::import_devices(&config, std::io::BufReader::new(f), stdout)?
                        }
                        None => doppel::import_devices(&config, std::io::stdin().lock(), stdout)?,
                    };
                    eprintln!(
                        "registered {} device(s); {} already registered, left as they were",
                        done.registered, done.skipped
                    );
                }
                DeviceCommand::Disable { id } => {
                    doppel::set_device_enabled(&config, &id, false)?;
                    println!("disabled {id}");
                }
                DeviceCommand::Enable { id } => {
                    doppel::set_device_enabled(&config, &id, true)?;
                    println!("enabled {id}");
                }
                DeviceCommand::List => {
                    let devices = doppel::list_devices(&config)?;
                    println!("{:<40} {:<8} CREATED", "ID", "ENABLED");
                    for d in &devices {
                        println!(
                            "{:<40} {:<8} {}",
                            d.id.as_str(),
                            d.enabled,
                            twin_model::rfc3339(d.created_at)
                        );
                    }
                    println!("{} device(s)", devices.len());
                }
            }
            Ok(())
        }
        Command::Token { command, source } => {
            let config = load(source.config.clone(), &source)?;
            let TokenCommand::Create { role, ttl, note } = command;
            let token = doppel::create_token(&config, role, ttl, note)?;
            eprintln!(
                "{} token created; it is shown only this once:",
                role.as_str()
            );
            println!("{token}");
            Ok(())
        }
        Command::Migrate { dry_run, source } => {
            let config = load(source.config.clone(), &source)?;
            if dry_run {
                for statement in doppel::migration(&config)? {
                    println!("{statement};");
                }
            } else {
                doppel::migrate(&config)?;
                println!(
                    "keyspace {} has schema version {}",
                    config.scylla_keyspace,
                    twin_store::scylla::schema::VERSION
                );
            }
            Ok(())
        }
        Command::Cluster { command, source } => {
            let config = load(source.config.clone(), &source)?;
            let ClusterCommand::Status = command;
            print!("{}", doppel::cluster::status(&config)?);
            Ok(())
        }
        Command::Schema => {
            print!("{}", twin_graphql::sdl());
            Ok(())
        }
        Command::SigningKey { source } => {
            let config = load(source.config.clone(), &source)?;
            println!("{}", doppel::signing_key(&config)?);
            Ok(())
        }
        Command::Config { default, source } => {
            if default {
                print!("{}", Config::default_toml());
            } else {
                print!(
                    "{}",
                    toml::to_string(&load(source.config.clone(), &source)?)?
                );
            }
            Ok(())
        }
    }
}

/// Completes on SIGTERM or Ctrl-C. SIGTERM is taken from the moment this is called (on
/// the runtime), not from the first poll: `serve` polls it only once it is ready, and a
/// SIGTERM between the two would otherwise kill the process instead of stopping it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        match term {
            Ok(mut term) => tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C still stops the server");
                let _ = ctrl_c.await;
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", doppel::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
