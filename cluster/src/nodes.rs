//! Which nodes are up, for operators (`doppel cluster status`, GraphQL `cluster`): each
//! node writes a heartbeat to the `cluster_nodes` table every `cluster_interval_ms`, and
//! the status joins the heartbeats with the shard leases.
//!
//! A heartbeat says only that the node runs and reaches the database; it decides nothing
//! (ownership is the leases', takeovers follow gossip). A node is `Down` once it missed
//! [`MISSED_BEATS`] heartbeats by the reader's clock, so the nodes' clocks are assumed to
//! agree within an interval or so. A node that left cleanly removes its row; a row left by
//! a node that died expires after a day.

use std::sync::Arc;
use std::time::Duration;

use scylla::client::session::Session;
use scylla::statement::Consistency;
use scylla::statement::prepared::PreparedStatement;
use twin_store::scylla::{self as scylla_store, ScyllaStore};

use crate::leases::{ShardLeases, now_millis};
use crate::{ClusterError, NodeId};

/// Heartbeats missed before a node is reported down.
pub const MISSED_BEATS: u64 = 3;

/// How long a heartbeat row outlives its node, in seconds.
const ROW_TTL_SECS: i32 = 86_400;

/// Whether a node is up, as its heartbeats say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// It wrote a heartbeat within the last [`MISSED_BEATS`] intervals.
    Up,
    /// Its heartbeats stopped (or it never wrote one, but a shard lease names it).
    Down,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// One node as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: NodeId,
    /// Where the other nodes reach it (`cluster_advertise`).
    pub address: String,
    pub state: NodeState,
    /// The shards whose lease it holds, in order.
    pub shards: Vec<u16>,
    /// Its last heartbeat, milliseconds since the Unix epoch (`None`: its row expired).
    pub last_seen: Option<u64>,
}

/// The cluster as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// In id order.
    pub nodes: Vec<NodeStatus>,
    /// Shards no node holds (never claimed, or released and not claimed again yet).
    pub unowned: Vec<u16>,
}

/// The `cluster_nodes` table (schema version 8 creates it).
pub struct NodeTable {
    session: Arc<Session>,
    beat: PreparedStatement,
    forget: PreparedStatement,
    read: PreparedStatement,
}

type Row = (String, Option<String>, Option<i64>, Option<i64>);

impl NodeTable {
    pub async fn open(store: &ScyllaStore) -> Result<Self, ClusterError> {
        let session = store.session();
        let ks = store.keyspace();
        let prepare = |cql: String| {
            let session = session.clone();
            async move {
                let mut st = session
                    .prepare(cql)
                    .await
                    .map_err(|e| ClusterError::Store(format!("preparing statements: {e}")))?;
                st.set_consistency(Consistency::Quorum);
                Ok::<_, ClusterError>(st)
            }
        };
        Ok(Self {
            beat: prepare(format!(
                "INSERT INTO {ks}.cluster_nodes (bucket, node, address, interval_ms, seen) VALUES (0, ?, ?, ?, ?) USING TTL {ROW_TTL_SECS}"
            ))
            .await?,
            forget: prepare(format!(
                "DELETE FROM {ks}.cluster_nodes WHERE bucket = 0 AND node = ?"
            ))
            .await?,
            read: prepare(format!(
                "SELECT node, address, interval_ms, seen FROM {ks}.cluster_nodes WHERE bucket = 0"
            ))
            .await?,
            session,
        })
    }

    /// Writes `me`'s heartbeat: it is up, reached at `address`, and beats every
    /// `interval`.
    pub async fn beat(
        &self,
        me: &NodeId,
        address: &str,
        interval: Duration,
    ) -> Result<(), ClusterError> {
        let interval = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
        self.session
            .execute_unpaged(&self.beat, (me.as_str(), address, interval, now_millis()))
            .await
            .map_err(|e| ClusterError::Store(format!("writing a heartbeat: {e}")))?;
        Ok(())
    }

    /// Removes `me`'s row (it left the cluster).
    pub async fn forget(&self, me: &NodeId) -> Result<(), ClusterError> {
        self.session
            .execute_unpaged(&self.forget, (me.as_str(),))
            .await
            .map_err(|e| ClusterError::Store(format!("removing a heartbeat: {e}")))?;
        Ok(())
    }

    /// Every node with a heartbeat row or a shard lease, and the shards nobody holds.
    pub async fn status(&self, leases: &ShardLeases) -> Result<ClusterStatus, ClusterError> {
        let result = self
            .session
            .execute_unpaged(&self.read, ())
            .await
            .map_err(|e| ClusterError::Store(format!("reading the heartbeats: {e}")))?;
        let rows: Vec<Row> = scylla_store::rows(result, "cluster_nodes")
            .map_err(|e| ClusterError::Store(format!("reading the heartbeats: {e}")))?;
        let now = u64::try_from(now_millis()).unwrap_or(0);
        let mut nodes: Vec<NodeStatus> = rows
            .into_iter()
            .filter_map(|(node, address, interval, seen)| {
                let id = NodeId::parse(&node).ok()?;
                let seen = seen.and_then(|s| u64::try_from(s).ok());
                let interval = interval.and_then(|i| u64::try_from(i).ok()).unwrap_or(0);
                let up = seen.is_some_and(|s| now.saturating_sub(s) <= MISSED_BEATS * interval);
                Some(NodeStatus {
                    id,
                    address: address.unwrap_or_default(),
                    state: if up { NodeState::Up } else { NodeState::Down },
                    shards: Vec::new(),
                    last_seen: seen,
                })
            })
            .collect();
        let mut unowned = Vec::new();
        let mut owned = vec![false; usize::from(twin_model::PARTITIONS)];
        for lease in leases.all().await? {
            let Some(owner) = lease.owner else { continue };
            owned[usize::from(lease.shard)] = true;
            match nodes.iter_mut().find(|n| n.id == owner) {
                Some(node) => node.shards.push(lease.shard),
                None => nodes.push(NodeStatus {
                    id: owner,
                    address: lease.address,
                    state: NodeState::Down,
                    shards: vec![lease.shard],
                    last_seen: None,
                }),
            }
        }
        for (shard, owned) in (0u16..).zip(owned) {
            if !owned {
                unowned.push(shard);
            }
        }
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(ClusterStatus { nodes, unowned })
    }
}

/// `shards` as ranges, such as `0-3,7,9-12` (for a terminal).
pub fn ranges(shards: &[u16]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < shards.len() {
        let start = shards[i];
        let mut end = start;
        while i + 1 < shards.len() && shards[i + 1] == end + 1 {
            i += 1;
            end = shards[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::Claim;
    use twin_store::conformance::{drop_keyspace, fresh_keyspace, scylla_nodes};
    use twin_store::scylla::ScyllaConfig;

    #[test]
    fn shard_lists_read_as_ranges() {
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[5]), "5");
        assert_eq!(ranges(&[0, 1, 2, 3, 7, 9, 10, 11, 12]), "0-3,7,9-12");
        assert_eq!(ranges(&[1, 3]), "1,3");
    }

    /// Heartbeats and leases make the status: a node beating is up with its shards, a
    /// node whose beats stopped is down and keeps its shards until taken over, a lease of
    /// a node with no row names it down, and a node that left is gone.
    #[tokio::test]
    async fn the_status_joins_heartbeats_and_leases() {
        let keyspace = fresh_keyspace();
        let config = ScyllaConfig::single_node(scylla_nodes(), &keyspace, 10);
        let store = ScyllaStore::connect(&config).await.unwrap();
        let leases = ShardLeases::open(&store).await.unwrap();
        let table = NodeTable::open(&store).await.unwrap();
        let (a, b, c) = (
            NodeId::parse("a").unwrap(),
            NodeId::parse("b").unwrap(),
            NodeId::parse("c").unwrap(),
        );
        for (shard, node) in [(0, &a), (1, &a), (2, &b), (5, &c)] {
            let claim = leases.claim(shard, node, "addr", None).await.unwrap();
            assert!(matches!(claim, Claim::Won(_)), "{claim:?}");
        }
        table
            .beat(&a, "10.0.0.1:7946", Duration::from_secs(60))
            .await
            .unwrap();
        // b's last beat is older than three of its 1 ms intervals by the time it is read.
        table
            .beat(&b, "10.0.0.2:7946", Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;

        let status = table.status(&leases).await.unwrap();
        let view: Vec<_> = status
            .nodes
            .iter()
            .map(|n| (n.id.as_str(), n.address.as_str(), n.state, n.shards.clone()))
            .collect();
        assert_eq!(
            view,
            [
                ("a", "10.0.0.1:7946", NodeState::Up, vec![0, 1]),
                ("b", "10.0.0.2:7946", NodeState::Down, vec![2]),
                ("c", "addr", NodeState::Down, vec![5]),
            ]
        );
        assert!(status.nodes[0].last_seen.is_some() && status.nodes[2].last_seen.is_none());
        assert_eq!(
            status.unowned.len(),
            usize::from(twin_model::PARTITIONS) - 4
        );
        assert_eq!(&status.unowned[..3], [3, 4, 6]);

        table.forget(&a).await.unwrap();
        for lease in leases.all().await.unwrap() {
            if lease.owner.as_ref() == Some(&a) {
                assert!(leases.release(&lease).await.unwrap());
            }
        }
        let status = table.status(&leases).await.unwrap();
        let ids: Vec<_> = status.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!(&status.unowned[..3], [0, 1, 3]);
        drop_keyspace(&keyspace).await;
    }
}
