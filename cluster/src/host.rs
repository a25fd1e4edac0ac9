//! The twins of a node as the keeper sees them: a [`ShardHost`] over the node's fleet.

use std::time::Duration;

use async_trait::async_trait;
use twin_actors::FleetHandle;

use crate::keeper::ShardHost;

/// A node's fleet, giving shards up for the keeper.
pub struct FleetHost {
    fleet: FleetHandle,
    /// How long a shard's twins may take to finish their mailboxes.
    deadline: Duration,
}

impl FleetHost {
    /// Gives shards of `fleet` up, waiting at most `deadline` for a shard's twins to
    /// stop (each finishes what it has already accepted; a request takes at most the
    /// fleet's `request_timeout`).
    pub fn new(fleet: FleetHandle, deadline: Duration) -> Self {
        Self { fleet, deadline }
    }
}

#[async_trait]
impl ShardHost for FleetHost {
    async fn passivate(&self, shard: u16) {
        self.fleet.give_up_partition(shard, self.deadline).await;
    }

    async fn take(&self, shard: u16) {
        if let Err(e) = self.fleet.take_partition(shard).await {
            tracing::warn!(shard, error = %e, "deadlines of a shard taken on not read; its twins keep them for their next message");
        }
    }
}
