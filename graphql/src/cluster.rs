//! The cluster for operators: `cluster { nodes { id address state shards } }`, answered by
//! the node's [`ClusterView`] (`null` on a process that is not a cluster node).

use std::future::Future;
use std::pin::Pin;

pub use async_graphql::ID;
use async_graphql::{Context, Enum, Object, SimpleObject};

use crate::auth::Role;
use crate::error::{ApiError, Code};
use crate::schema::{DateTime, RoleGuard, api};

/// Whether a node is up, by its heartbeats.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// It wrote a heartbeat lately (within three `cluster_interval_ms`).
    Up,
    /// Its heartbeats stopped; its shards are taken over once gossip finds it dead.
    Down,
}

/// One node of the cluster.
#[derive(SimpleObject, Debug, Clone)]
pub struct ClusterNode {
    pub id: ID,
    /// Where the other nodes reach it (`cluster_advertise`).
    pub address: String,
    pub state: NodeState,
    /// The shards whose lease it holds, in order.
    pub shards: Vec<u16>,
    /// Its last heartbeat (`null`: its heartbeat row expired).
    pub last_seen: Option<DateTime>,
}

/// The cluster: its nodes, by id, and its shards that no node holds.
#[derive(SimpleObject, Debug, Clone)]
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    /// Shards no node holds now: their twins are unavailable until one claims them.
    pub unowned_shards: Vec<u16>,
    /// The node that answered.
    pub this_node: ID,
}

/// Reads the cluster's status (from the database: every node answers the same).
pub trait ClusterView: Send + Sync {
    fn status(&self) -> Pin<Box<dyn Future<Output = Result<Cluster, String>> + Send + '_>>;
}

#[derive(Default)]
pub struct ClusterQuery;

#[Object]
impl ClusterQuery {
    /// The cluster's nodes and shards (operator); `null` when this process is not a
    /// cluster node (`node_id` unset).
    #[graphql(guard = "RoleGuard(Role::Operator)")]
    async fn cluster(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<Cluster>> {
        let Some(view) = &api(ctx).cluster else {
            return Ok(None);
        };
        let status = view.status().await.map_err(|e| {
            ApiError::new(
                Code::Unavailable,
                format!("cannot read the cluster's status: {e}"),
            )
        })?;
        Ok(Some(status))
    }
}
