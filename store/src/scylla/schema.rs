//! The ScyllaDB data model, as CQL. Every table is designed from the queries the store
//! makes, with partitions bounded in size:
//!
//! | Table | Partition | Rows per partition | For |
//! |---|---|---|---|
//! | `twin` | a thing | its record, presence, shadows, commands, job executions, and each shadow's newest changes, each with the shadow it produced (`history` to `history` + 15 per shadow, with a TTL of `history_retention`) | `load`, `history`, and every write of the twin: one partition, so a twin's batch (a change with its history row) is atomic and isolated |
//! | `members` | a placement partition (1,024 token ranges) | about fleet size / 1,024 (10,000 for 10 million things) | the registry's listing in id order (the fleet index scans the partition's token range of `twin` instead) |
//! | `deadlines` | a placement partition | the partition's pending deadlines | start-up alarms, by partition |
//! | `command_ids` | an execution id | 1 | a command by its id alone |
//! | `job` | a job | 1 (the definition, targets included) | `job` |
//! | `job_ids` | one partition for all job ids | the number of jobs (ids only) | `jobs` in id order |
//! | `job_targets` | a job and one of 64 target buckets | a job's targets / 64 (1,600 for 100,000) | statuses and counts |
//! | `api_tokens` | one partition for all tokens | the number of API tokens (a record each: id, role, hash of the secret) | authenticating API calls on every node |
//! | `certificates` | a certificate | 1 (its record: PEM, status, times) | device login by certificate, and the certificate listing (token order) |
//! | `ca_certificates` | one partition for all registered CAs | the number of CAs | finding the CA of a certificate at its first connection |
//! | `provisioning_templates` | one partition for all templates | the number of templates | fleet provisioning |
//! | `telemetry_points` | a thing, a telemetry key and a UTC day | that day's numeric readings of the key (86,400 at one a second), with a TTL of `telemetry_retention` | `Thing.telemetrySeries`: a day's readings in time order |
//! | `audit` | 65,536 consecutive audit entries | 65,536 | the audit log in order, and its newest entry |
//! | `outbox` | 65,536 consecutive outbox positions | 65,536 events for routes, with a TTL of `route_retention` | routes reading the fleet's events in commit order |
//! | `outbox_end` | one row | 1: the newest position given out | positions that go on after a restart, never reused |
//! | `routes` | one partition for all routes | the number of routes | every route, at start |
//! | `route_cursors` | a route | 1 | where the route's delivery is |
//! | `route_deliveries` | a route and a UTC day | that day's delivery attempts of the route, newest first, with a TTL of `route_retention` | `routeDeliveries`, newest first |
//! | `shard_leases` | one of the 1,024 placement partitions (the cluster's shards) | 1: the node that owns the shard, its epoch, its address | shard ownership, changed only by lightweight transactions (see the `twin-cluster` crate) |
//! | `cluster_nodes` | one partition for all nodes | the number of cluster nodes (a heartbeat each, with a TTL of a day) | `doppel cluster status` and GraphQL `cluster`: which nodes are up |
//! | `schema_version` | one row | 1 | refusing a newer schema |
//!
//! Values are the same JSON documents the embedded store keeps: one codec, and a record
//! format that evolves with serde defaults, not with schema changes.

/// The schema version this build creates and reads. 2 added `api_tokens`; 3 keys
/// `members` and `deadlines` by placement partitions that are token ranges; 4 added
/// `certificates`, `ca_certificates`, `provisioning_templates` and `audit`; 5
/// `telemetry_points` (and a `telemetry` row in each twin's partition); 6 `outbox`,
/// `outbox_end`, `routes`, `route_cursors` and `route_deliveries` (and an `events` row in
/// each twin's partition); 7 `shard_leases`; 8 `cluster_nodes`. An older
/// keyspace gets what it lacks (every statement is `IF NOT EXISTS`), its listings made
/// anew (from 1 or 2), and its version raised.
pub const VERSION: i32 = 8;

/// Target buckets per job: a job with 100,000 targets is 64 partitions, not one.
pub const JOB_BUCKETS: u16 = 64;

/// The statements that create the schema in `keyspace` (after the keyspace itself).
pub fn tables(keyspace: &str) -> Vec<String> {
    [
        "CREATE TABLE IF NOT EXISTS {ks}.twin (thing text, kind text, key text, value text, PRIMARY KEY (thing, kind, key))",
        "CREATE TABLE IF NOT EXISTS {ks}.members (partition int, thing text, PRIMARY KEY (partition, thing))",
        "CREATE TABLE IF NOT EXISTS {ks}.deadlines (partition int, thing text, item text, at bigint, PRIMARY KEY (partition, thing, item))",
        "CREATE TABLE IF NOT EXISTS {ks}.command_ids (execution_id text PRIMARY KEY, thing text)",
        "CREATE TABLE IF NOT EXISTS {ks}.job (job_id text PRIMARY KEY, definition text)",
        "CREATE TABLE IF NOT EXISTS {ks}.job_ids (bucket int, job_id text, PRIMARY KEY (bucket, job_id))",
        "CREATE TABLE IF NOT EXISTS {ks}.job_targets (job_id text, bucket int, thing text, status text, PRIMARY KEY ((job_id, bucket), thing))",
        "CREATE TABLE IF NOT EXISTS {ks}.api_tokens (bucket int, id text, record text, PRIMARY KEY (bucket, id))",
        "CREATE TABLE IF NOT EXISTS {ks}.certificates (id text PRIMARY KEY, record text)",
        "CREATE TABLE IF NOT EXISTS {ks}.ca_certificates (bucket int, id text, record text, PRIMARY KEY (bucket, id))",
        "CREATE TABLE IF NOT EXISTS {ks}.provisioning_templates (bucket int, name text, record text, PRIMARY KEY (bucket, name))",
        "CREATE TABLE IF NOT EXISTS {ks}.telemetry_points (thing text, key text, day int, at bigint, value double, PRIMARY KEY ((thing, key, day), at))",
        "CREATE TABLE IF NOT EXISTS {ks}.audit (bucket bigint, seq bigint, entry text, PRIMARY KEY (bucket, seq))",
        "CREATE TABLE IF NOT EXISTS {ks}.outbox (bucket bigint, position bigint, event text, PRIMARY KEY (bucket, position))",
        "CREATE TABLE IF NOT EXISTS {ks}.outbox_end (id int PRIMARY KEY, position bigint)",
        "CREATE TABLE IF NOT EXISTS {ks}.routes (bucket int, id text, record text, PRIMARY KEY (bucket, id))",
        "CREATE TABLE IF NOT EXISTS {ks}.route_cursors (route text PRIMARY KEY, position bigint)",
        "CREATE TABLE IF NOT EXISTS {ks}.route_deliveries (route text, day int, at bigint, position bigint, attempt int, record text, PRIMARY KEY ((route, day), at, position, attempt)) WITH CLUSTERING ORDER BY (at DESC, position DESC, attempt DESC)",
        "CREATE TABLE IF NOT EXISTS {ks}.shard_leases (shard int PRIMARY KEY, owner text, epoch bigint, address text, since bigint)",
        "CREATE TABLE IF NOT EXISTS {ks}.cluster_nodes (bucket int, node text, address text, interval_ms bigint, seen bigint, PRIMARY KEY (bucket, node))",
        "CREATE TABLE IF NOT EXISTS {ks}.schema_version (id int PRIMARY KEY, version int)",
    ]
    .iter()
    .map(|s| s.replace("{ks}", keyspace))
    .collect()
}

/// What ScyllaDB's `CREATE KEYSPACE` adds so that the keyspace keeps vnodes: lightweight
/// transactions need them on ScyllaDB (up to 2025.3 at least, its docs say).
pub const WITHOUT_TABLETS: &str = " AND tablets = {'enabled': false}";

/// The keyspace, with `replication` (a CQL map, such as
/// `{'class': 'NetworkTopologyStrategy', 'dc1': 3}`).
pub fn keyspace(keyspace: &str, replication: &str) -> String {
    format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}")
}

/// Every statement that creates the schema, in order, as `doppel migrate --dry-run`
/// prints them: the keyspace, the tables, and the schema version (written only when the
/// keyspace has none).
pub fn statements(ks: &str, replication: &str) -> Vec<String> {
    let mut all = vec![keyspace(ks, replication)];
    all.extend(tables(ks));
    all.push(format!(
        "INSERT INTO {ks}.schema_version (id, version) VALUES (0, {VERSION}) IF NOT EXISTS"
    ));
    all
}

/// Whether `name` can be a keyspace name (letters, digits and `_`, at most 48).
pub fn valid_keyspace(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// Kinds of rows in a twin's partition.
pub mod kind {
    pub const RECORD: &str = "record";
    pub const PRESENCE: &str = "presence";
    pub const SHADOW: &str = "shadow";
    pub const COMMAND: &str = "command";
    pub const JOB: &str = "job";
    /// A shadow's change: key `{shadow}/{version:020}{0 update | 1 delete}`.
    pub const HISTORY: &str = "history";
    /// The latest value of each telemetry key (one row, key empty).
    pub const TELEMETRY: &str = "telemetry";
    /// The number of the thing's newest event in the outbox (one row, key empty). Kept
    /// when the thing is deleted: between `command` and `history` in clustering order, so
    /// that a delete spares it with two range deletes around it.
    pub const EVENTS: &str = "events";
    /// The shard epoch under which a cluster node last took the twin (one row, key
    /// empty, the epoch as 20 digits so that text order is number order). Every write of
    /// a fenced store is conditional on it; a delete spares it.
    pub const FENCE: &str = "fence";
}
