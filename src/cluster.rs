//! The cluster as `doppel cluster status` prints it and GraphQL `cluster` answers it.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;

use anyhow::Context as _;
use twin_cluster::node::StatusView;
use twin_cluster::nodes::{ClusterStatus, NodeState, ranges};
use twin_graphql::cluster::{Cluster, ClusterNode, ClusterView, ID};
use twin_graphql::schema::DateTime;
use twin_store::scylla::ScyllaStore;

use crate::config::{Config, StoreKind};

/// A node's view of its cluster, for GraphQL.
pub struct View(pub StatusView, pub String);

impl ClusterView for View {
    fn status(&self) -> Pin<Box<dyn Future<Output = Result<Cluster, String>> + Send + '_>> {
        Box::pin(async move {
            let status = self.0.status().await.map_err(|e| e.to_string())?;
            Ok(Cluster {
                nodes: status
                    .nodes
                    .into_iter()
                    .map(|n| ClusterNode {
                        id: ID(n.id.to_string()),
                        address: n.address,
                        state: match n.state {
                            NodeState::Up => twin_graphql::cluster::NodeState::Up,
                            NodeState::Down => twin_graphql::cluster::NodeState::Down,
                        },
                        shards: n.shards,
                        last_seen: n.last_seen.map(DateTime),
                    })
                    .collect(),
                unowned_shards: status.unowned,
                this_node: ID(self.1.clone()),
            })
        })
    }
}

/// `doppel cluster status`: the nodes of the cluster whose keyspace `config` names, their
/// state and their shards, read from the database.
pub fn status(config: &Config) -> anyhow::Result<String> {
    if config.store != StoreKind::Scylla {
        anyhow::bail!(
            "doppel cluster status needs store = scylla (a cluster's nodes share ScyllaDB); this configuration has the embedded store"
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let scylla = config.scylla()?;
    let status = runtime.block_on(async {
        let store = ScyllaStore::connect(&scylla).await.with_context(|| {
            format!(
                "cannot reach the cluster's database (scylla_nodes {}, scylla_keyspace {})",
                scylla.nodes.join(","),
                scylla.keyspace
            )
        })?;
        let view = StatusView::open(&store).await?;
        anyhow::Ok(view.status().await?)
    })?;
    Ok(render(&status))
}

/// The status as a table, then each node's shards as ranges.
fn render(status: &ClusterStatus) -> String {
    let mut out = format!(
        "{:<24} {:<5} {:<28} {:>6}  LAST SEEN\n",
        "NODE", "STATE", "ADDRESS", "SHARDS"
    );
    for n in &status.nodes {
        let seen = n
            .last_seen
            .map_or_else(|| "-".to_owned(), twin_model::rfc3339);
        let _ = writeln!(
            out,
            "{:<24} {:<5} {:<28} {:>6}  {seen}",
            n.id.as_str(),
            n.state.as_str(),
            n.address,
            n.shards.len()
        );
    }
    let _ = writeln!(
        out,
        "unowned shards: {} of {}{}",
        status.unowned.len(),
        twin_model::PARTITIONS,
        if status.unowned.is_empty() {
            String::new()
        } else {
            format!(" ({})", ranges(&status.unowned))
        }
    );
    for n in status.nodes.iter().filter(|n| !n.shards.is_empty()) {
        let _ = writeln!(out, "shards of {}: {}", n.id, ranges(&n.shards));
    }
    out
}
