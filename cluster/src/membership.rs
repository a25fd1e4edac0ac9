//! Who is in the cluster and alive: gossip with phi-accrual failure detection, from
//! `chitchat` (the membership layer of Quickwit), over UDP.
//!
//! Membership is for *suspicion*, not authority: it decides only when a node tries to
//! take a shard over (see [`crate::keeper`]); whether it wins is decided by the shard's
//! lease in ScyllaDB. So gossip needs no authentication for correctness: a forged or lost
//! gossip message can delay a takeover or cause a needless one (the old owner is then
//! fenced, and takes the shard back at its next round), never give a twin two writers.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::transport::UdpTransport;
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
    spawn_chitchat,
};

use crate::{ClusterError, NodeId};

/// The key of a node's gossip state that says it is leaving.
const LEAVING: &str = "leaving";

/// How a node joins the gossip.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub node: NodeId,
    /// Nodes of different clusters on one network ignore each other.
    pub cluster_id: String,
    /// The UDP address gossip listens on.
    pub listen: SocketAddr,
    /// The UDP address the other nodes reach this one at.
    pub advertise: SocketAddr,
    /// Gossip addresses (`host:port`) of nodes to join through; the others are learned.
    pub seeds: Vec<String>,
    /// How often the node gossips with a few others (it also sets how fast a dead node
    /// is noticed: several intervals without a heartbeat).
    pub gossip_interval: Duration,
}

/// This node's part in the gossip; stops when dropped.
pub struct Membership {
    handle: Option<ChitchatHandle>,
    me: NodeId,
}

impl Membership {
    pub async fn start(config: MembershipConfig) -> Result<Self, ClusterError> {
        // A restarted node is a new generation of its id: the others forget the old one.
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let failure_detector_config = FailureDetectorConfig {
            initial_interval: config.gossip_interval,
            dead_node_grace_period: Duration::from_secs(3600),
            ..FailureDetectorConfig::default()
        };
        let chitchat = ChitchatConfig {
            chitchat_id: ChitchatId::new(config.node.as_str(), generation, config.advertise),
            cluster_id: config.cluster_id,
            gossip_interval: config.gossip_interval,
            listen_addr: config.listen,
            seed_nodes: config.seeds,
            failure_detector_config,
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let handle = spawn_chitchat(chitchat, Vec::new(), &UdpTransport)
            .await
            .map_err(|e| {
                ClusterError::Gossip(format!("cannot gossip on {}: {e}", config.listen))
            })?;
        Ok(Self {
            handle: Some(handle),
            me: config.node,
        })
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// The nodes alive now and not leaving, this one included, in id order. A node whose
    /// id is not a valid node id is ignored.
    pub async fn live(&self) -> Vec<NodeId> {
        let Some(handle) = &self.handle else {
            return vec![self.me.clone()];
        };
        let ids: Vec<String> = handle
            .with_chitchat(|c| {
                c.live_nodes()
                    .filter(|id| c.node_state(id).is_none_or(|s| s.get(LEAVING).is_none()))
                    .map(|id| id.node_id.to_string())
                    .collect()
            })
            .await;
        let mut live: Vec<NodeId> = ids
            .iter()
            .filter_map(|id| NodeId::parse(id).ok())
            .chain(std::iter::once(self.me.clone()))
            .collect();
        live.sort();
        live.dedup();
        live
    }

    /// Tells the others that this node is leaving: from their next round they place no
    /// shard on it (and take over what it has not released by then).
    pub async fn leaving(&self) {
        if let Some(handle) = &self.handle {
            handle
                .with_chitchat(|c| c.self_node_state().set(LEAVING, "true"))
                .await;
        }
    }

    /// Leaves the gossip (the others notice as they would a crash).
    pub async fn stop(mut self) {
        if let Some(handle) = self.handle.take()
            && let Err(e) = handle.shutdown().await
        {
            tracing::warn!(error = %e, "gossip did not stop cleanly");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_udp_addr() -> SocketAddr {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    async fn node(name: &str, seed: Option<SocketAddr>) -> Membership {
        let addr = free_udp_addr();
        Membership::start(MembershipConfig {
            node: NodeId::parse(name).unwrap(),
            cluster_id: "membership-test".into(),
            listen: addr,
            advertise: addr,
            seeds: seed.map(|s| s.to_string()).into_iter().collect(),
            gossip_interval: Duration::from_millis(50),
        })
        .await
        .unwrap()
    }

    /// `live` of `of`, once it is `want`; panics after 10 s.
    async fn live_until(of: &Membership, want: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let live = of.live().await;
            let names: Vec<&str> = live.iter().map(NodeId::as_str).collect();
            if names == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "live is {names:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A node that says it is leaving is no longer live for the others, while it still
    /// gossips (so that they stop placing shards on it before it is gone).
    #[tokio::test]
    async fn a_leaving_node_is_not_live_for_the_others() {
        let a = node("a", None).await;
        let seed = a
            .handle
            .as_ref()
            .unwrap()
            .chitchat_id()
            .gossip_advertise_addr;
        let b = node("b", Some(seed)).await;
        live_until(&a, &["a", "b"]).await;
        b.leaving().await;
        live_until(&a, &["a"]).await;
        // Still gossiping: a knows b and hears from it.
        let known = a
            .handle
            .as_ref()
            .unwrap()
            .with_chitchat(|c| c.live_nodes().any(|id| &*id.node_id == "b"))
            .await;
        assert!(known, "b stopped gossiping");
        b.stop().await;
        a.stop().await;
    }
}
