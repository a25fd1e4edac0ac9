//! A `doppel serve` process as a cluster node: its store fenced by the shards it holds,
//! its gossip, its keeper and its heartbeat, started and stopped together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use twin_actors::FleetHandle;
use twin_store::scylla::ScyllaStore;

use crate::host::FleetHost;
use crate::keeper::Keeper;
use crate::leases::{Holdings, ShardLeases};
use crate::membership::{Membership, MembershipConfig};
use crate::nodes::{ClusterStatus, NodeTable};
use crate::{ClusterError, NodeId};

/// Shards handed to a node that joined, at most, per keeper round.
pub const MAX_HANDOVERS: usize = 32;

/// Rounds of gossip a starting node waits to learn who is alive before its first keeper
/// round (a node that knows of no one else would take every shard over).
const GRACE_ROUNDS: u32 = 3;

/// How a node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node: NodeId,
    /// Nodes of one cluster share it (and their keyspace); gossip from another is ignored.
    pub cluster_id: String,
    /// The UDP address gossip listens on.
    pub listen: SocketAddr,
    /// The address the other nodes reach this one at.
    pub advertise: SocketAddr,
    /// Gossip addresses of nodes to join through.
    pub seeds: Vec<String>,
    /// How often the node gossips, checks its shard leases and writes its heartbeat.
    pub interval: Duration,
    /// How long a shard's twins may take to stop when it is handed over.
    pub passivate_deadline: Duration,
}

/// A node whose store is fenced, before its fleet starts.
pub struct Joining {
    config: NodeConfig,
    holdings: Arc<Holdings>,
    leases: Arc<ShardLeases>,
    nodes: Arc<NodeTable>,
}

impl Joining {
    /// Fences `store` by the shards this node will hold (none yet: every twin write is
    /// refused until the keeper claims the twin's shard).
    pub async fn new(config: NodeConfig, store: &ScyllaStore) -> Result<Self, ClusterError> {
        let holdings = Arc::new(Holdings::default());
        store
            .fence_with(holdings.clone())
            .map_err(|e| ClusterError::Store(e.to_string()))?;
        Ok(Self {
            leases: Arc::new(ShardLeases::open(store).await?),
            nodes: Arc::new(NodeTable::open(store).await?),
            holdings,
            config,
        })
    }

    /// Joins the gossip and starts the keeper over `fleet`'s twins and the heartbeat.
    pub async fn start(self, fleet: FleetHandle) -> Result<ClusterNode, ClusterError> {
        let Self {
            config,
            holdings,
            leases,
            nodes,
        } = self;
        let membership = Membership::start(MembershipConfig {
            node: config.node.clone(),
            cluster_id: config.cluster_id.clone(),
            listen: config.listen,
            advertise: config.advertise,
            seeds: config.seeds.clone(),
            gossip_interval: config.interval,
        })
        .await?;
        let host = Arc::new(FleetHost::new(fleet, config.passivate_deadline));
        let address = config.advertise.to_string();
        let keeper = Keeper::new(
            config.node.clone(),
            address.clone(),
            leases.clone(),
            holdings,
            host,
            MAX_HANDOVERS,
        );
        let joined = keeper.joined();
        let (stop, stopping) = watch::channel(false);
        let (stop_beats, beats_stopping) = watch::channel(false);
        let interval = config.interval;
        let keeper = tokio::spawn(async move {
            keeper
                .run(&membership, interval, interval * GRACE_ROUNDS, stopping)
                .await;
            membership.stop().await;
        });
        let heartbeat = tokio::spawn(heartbeat(
            nodes.clone(),
            config.node.clone(),
            address,
            interval,
            beats_stopping,
        ));
        tracing::info!(node = %config.node, gossip = %config.listen, advertise = %config.advertise, seeds = %config.seeds.join(","), "joined the cluster");
        Ok(ClusterNode {
            view: StatusView { leases, nodes },
            joined,
            stop,
            stop_beats,
            keeper,
            heartbeat,
        })
    }
}

/// Writes the node's heartbeat every `interval` until `stop`, then removes it.
async fn heartbeat(
    nodes: Arc<NodeTable>,
    me: NodeId,
    address: String,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        if let Err(e) = nodes.beat(&me, &address, interval).await {
            tracing::warn!(error = %e, "heartbeat not written; tried again");
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => {}
        }
    }
    if let Err(e) = nodes.forget(&me).await {
        tracing::warn!(error = %e, "heartbeat row not removed; it expires in a day");
    }
}

/// The cluster as operators see it, read from the database.
#[derive(Clone)]
pub struct StatusView {
    leases: Arc<ShardLeases>,
    nodes: Arc<NodeTable>,
}

impl StatusView {
    /// A view of the cluster whose tables are in `store`'s keyspace (for a process that
    /// is not a node, such as `doppel cluster status`).
    pub async fn open(store: &ScyllaStore) -> Result<Self, ClusterError> {
        Ok(Self {
            leases: Arc::new(ShardLeases::open(store).await?),
            nodes: Arc::new(NodeTable::open(store).await?),
        })
    }

    pub async fn status(&self) -> Result<ClusterStatus, ClusterError> {
        self.nodes.status(&self.leases).await
    }
}

/// A running cluster node.
pub struct ClusterNode {
    view: StatusView,
    joined: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    stop_beats: watch::Sender<bool>,
    keeper: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
}

impl ClusterNode {
    pub fn view(&self) -> StatusView {
        self.view.clone()
    }

    /// Turns true once the node's first keeper round has claimed its share of the free
    /// shards (until then it holds none, and refuses every twin).
    pub fn joined(&self) -> Arc<AtomicBool> {
        self.joined.clone()
    }

    /// Leaves the cluster: every held shard handed over (its twins passivated, its lease
    /// released for the others to claim at their next round), the heartbeat removed, the
    /// gossip left.
    pub async fn leave(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.keeper.await {
            tracing::warn!(error = %e, "the keeper stopped abnormally");
        }
        let _ = self.stop_beats.send(true);
        let _ = self.heartbeat.await;
        tracing::info!("left the cluster");
    }
}
