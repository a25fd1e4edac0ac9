//! Doppel on several nodes (in progress; see the README's "Scaling out").
//!
//! The fleet is cut into the 1,024 placement partitions of [`twin_model::PARTITIONS`],
//! the cluster's **shards**: fixed for the cluster's life, so that a thing never changes
//! shard. Here so far:
//! - [`placement`]: which live node each shard should live on (rendezvous hashing, so
//!   that a node joining or leaving moves only its own share);
//! - [`leases`]: which node each shard does live on, with an epoch, in ScyllaDB, changed
//!   only by lightweight transactions (Paxos): a node takes a shard over only from the
//!   owner and epoch it saw, so two nodes never both win the same epoch;
//! - [`membership`]: which nodes are alive (gossip, for suspicion only);
//! - [`keeper`]: each node's loop that makes the leases follow the placement: it claims
//!   free shards, takes over the shards of nodes that died, and hands shards over to a
//!   node that joined (throttled, its twins passivated first).
//! - [`host`]: the keeper's view of the node's twins: a shard given up has its twins
//!   passivated, durably, before the lease goes;
//! - [`nodes`]: each node's heartbeat, and the cluster's status for operators;
//! - [`node`]: all of it started and stopped together, for `doppel serve`.

pub mod host;
pub mod keeper;
pub mod leases;
pub mod membership;
pub mod node;
pub mod nodes;
pub mod placement;

use std::fmt;

/// A node's name in the cluster (`node_id`): 1-64 characters of `[A-Za-z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

impl NodeId {
    pub fn parse(s: &str) -> Result<Self, ClusterError> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ClusterError::BadNodeId(s.escape_debug().to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("node_id \"{0}\" is not a valid node id (1-64 characters of A-Z a-z 0-9 _ . -)")]
    BadNodeId(String),
    #[error("shard {0} does not exist (the cluster has {n} shards)", n = twin_model::PARTITIONS)]
    NoSuchShard(u16),
    /// Gossip could not start.
    #[error("membership: {0}")]
    Gossip(String),
    /// The database could not be reached or refused the request.
    #[error("shard leases: {0}")]
    Store(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_checked_and_the_bad_one_is_shown_escaped() {
        assert_eq!(
            NodeId::parse("node-1.eu_west").unwrap().as_str(),
            "node-1.eu_west"
        );
        for bad in ["", "a b", "a/b", "ü", &"n".repeat(65)] {
            assert!(NodeId::parse(bad).is_err(), "{bad:?}");
        }
        let err = NodeId::parse("x\n\u{1b}[31m").unwrap_err().to_string();
        assert!(err.contains(r"x\n\u{1b}[31m"), "{err}");
    }
}
