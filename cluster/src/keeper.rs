//! Each node's keeper: a loop that makes the shard leases follow the placement over the
//! live nodes.
//!
//! Every round (every `keeper_interval`) a node reads the leases and, for each shard:
//! - placed on it and free (never claimed, or released): claims it (the host then takes
//!   the shard's waiting work on: its twins' deadlines);
//! - placed on it and owned by a node that is not alive: takes it over (no throttle: a
//!   dead node's twins are unavailable until then);
//! - owned by it but placed on another live node (a node joined): hands it over, at most
//!   `max_handovers` a round, so that a join moves load gradually: the host passivates
//!   the shard's twins (their acknowledged changes are durable), the node stops holding
//!   it (its store refuses the shard's writes), then releases the lease for the new
//!   owner to claim;
//! - held by it but owned by another node in the table (it was presumed dead and taken
//!   over): stops holding it at once, and the host passivates the shard's twins;
//! - owned by it in the table but not held (the node restarted): claims it again at a new
//!   epoch, so that nothing its previous run wrote can land after it.
//!
//! Each claim is conditional on the lease the round read (see [`crate::leases`]), so
//! rounds of different nodes may interleave freely.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::watch;
use twin_store::scylla::Fences;

use crate::leases::{Claim, Holdings, Lease, ShardLeases};
use crate::membership::Membership;
use crate::{ClusterError, NodeId, placement};

/// What lives in the shards on this node: the twins.
#[async_trait]
pub trait ShardHost: Send + Sync {
    /// Stops the twins of `shard`, their acknowledged changes being durable, before the
    /// shard is given up (a twin started afterwards is refused by the fenced store).
    async fn passivate(&self, shard: u16);

    /// Takes `shard` on, once held: the twins' work that waits for a time (command and
    /// job deadlines) is now this node's.
    async fn take(&self, shard: u16);
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Free shards claimed, and shards of this node's earlier run claimed again.
    pub claimed: usize,
    /// Shards taken over from nodes that are not alive.
    pub taken_over: usize,
    /// Shards given up for another node.
    pub handed_over: usize,
    /// Shards another node took over from this one.
    pub lost: usize,
    /// Shards held after the round.
    pub held: usize,
}

impl Round {
    fn changed(&self) -> bool {
        self.claimed + self.taken_over + self.handed_over + self.lost > 0
    }
}

pub struct Keeper {
    me: NodeId,
    address: String,
    leases: Arc<ShardLeases>,
    holdings: Arc<Holdings>,
    host: Arc<dyn ShardHost>,
    max_handovers: usize,
    /// Set once a round of [`Keeper::run`] has succeeded.
    joined: Arc<AtomicBool>,
}

/// Lease changes (claims, releases) in flight at once in a round (each is a lightweight
/// transaction).
const CONCURRENT_CLAIMS: usize = 32;

impl Keeper {
    /// A keeper for node `me`, reached by other nodes at `address`, holding its shards in
    /// `holdings` (the fences of its store).
    pub fn new(
        me: NodeId,
        address: String,
        leases: Arc<ShardLeases>,
        holdings: Arc<Holdings>,
        host: Arc<dyn ShardHost>,
        max_handovers: usize,
    ) -> Self {
        Self {
            me,
            address,
            leases,
            holdings,
            host,
            max_handovers: max_handovers.max(1),
            joined: Arc::default(),
        }
    }

    /// Turns true once a round of [`Keeper::run`] has succeeded: the node holds the
    /// shards placed on it that were free or were a dead node's (those it takes from
    /// live nodes come with the next rounds).
    pub fn joined(&self) -> Arc<AtomicBool> {
        self.joined.clone()
    }

    /// One round over every shard, with `live` the nodes alive now.
    pub async fn round(&self, live: &[NodeId]) -> Result<Round, ClusterError> {
        let plan = placement::assignment(live);
        let mut leases: Vec<Option<Lease>> = vec![None; usize::from(twin_model::PARTITIONS)];
        for lease in self.leases.all().await? {
            let shard = usize::from(lease.shard);
            leases[shard] = Some(lease);
        }
        let mut round = Round::default();
        let mut claims: Vec<(u16, Option<Lease>, bool)> = Vec::new();
        let mut handovers: Vec<Lease> = Vec::new();
        for (shard, (lease, placed)) in (0u16..).zip(leases.into_iter().zip(plan)) {
            let here = placed == Some(&self.me);
            let held = self.holdings.epoch(shard);
            let owner = lease.as_ref().and_then(|l| l.owner.clone());
            match (owner, lease) {
                (Some(owner), Some(lease)) if owner == self.me => {
                    if held != Some(lease.epoch) {
                        // Ours from an earlier run: claimed again at a new epoch, or
                        // released for the node it is placed on (no twin runs here).
                        if here {
                            claims.push((shard, Some(lease), false));
                        } else if self.leases.release(&lease).await? {
                            round.handed_over += 1;
                        }
                    } else if !here && placed.is_some() {
                        handovers.push(lease);
                    }
                }
                (Some(owner), lease) => {
                    if held.is_some() {
                        self.holdings.release(shard);
                        self.host.passivate(shard).await;
                        round.lost += 1;
                        tracing::warn!(shard, %owner, "shard taken over by another node");
                    }
                    if here && !live.contains(&owner) {
                        claims.push((shard, lease, true));
                    }
                }
                (None, lease) => {
                    if held.is_some() {
                        self.holdings.release(shard);
                        self.host.passivate(shard).await;
                        round.lost += 1;
                    }
                    if here {
                        claims.push((shard, lease, false));
                    }
                }
            }
        }
        handovers.truncate(self.max_handovers);
        round.handed_over += self.hand_over(handovers).await?;
        let results: Vec<_> = futures_util::stream::iter(claims)
            .map(|(shard, seen, takeover)| async move {
                let claim = self
                    .leases
                    .claim(shard, &self.me, &self.address, seen.as_ref())
                    .await;
                if let Ok(Claim::Won(lease)) = &claim {
                    self.holdings.hold(lease, &self.me);
                    self.host.take(shard).await;
                }
                (claim, takeover)
            })
            .buffer_unordered(CONCURRENT_CLAIMS)
            .collect()
            .await;
        for (claim, takeover) in results {
            if let Claim::Won(_) = claim? {
                if takeover {
                    round.taken_over += 1;
                } else {
                    round.claimed += 1;
                }
            }
        }
        round.held = self.holdings.held().len();
        Ok(round)
    }

    /// Rounds every `interval` until `stop` turns true; then hands every shard over
    /// (passivated and released, so that the others claim them at their next round
    /// instead of waiting to presume this node dead; gossip tells them it is leaving
    /// first, so that they no longer place shards on it). The first round waits `grace`, for
    /// gossip to tell this node who is alive: a node that knows of no one else would take
    /// every shard over.
    pub async fn run(
        &self,
        membership: &Membership,
        interval: Duration,
        grace: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        tokio::select! {
            _ = tokio::time::sleep(grace) => {}
            _ = stop.changed() => {}
        }
        while !*stop.borrow() {
            let live = membership.live().await;
            let round = self.round(&live).await;
            if round.is_ok() {
                self.joined.store(true, Ordering::Release);
            }
            match round {
                Ok(r) if r.changed() => {
                    tracing::info!(
                        claimed = r.claimed,
                        taken_over = r.taken_over,
                        handed_over = r.handed_over,
                        lost = r.lost,
                        held = r.held,
                        live = live.len(),
                        "shard leases changed"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "shard round failed; tried again"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => {}
            }
        }
        membership.leaving().await;
        if let Err(e) = self.leave().await {
            tracing::warn!(error = %e, "shards not all handed over; the others take them over");
        }
    }

    /// Hands every held shard over, several at once.
    pub async fn leave(&self) -> Result<usize, ClusterError> {
        let held: Vec<Lease> = self
            .leases
            .all()
            .await?
            .into_iter()
            .filter(|l| {
                l.owner.as_ref() == Some(&self.me) && self.holdings.epoch(l.shard) == Some(l.epoch)
            })
            .collect();
        self.hand_over(held).await
    }

    /// Hands `leases` over, several at once: each shard's twins passivated, the shard no
    /// longer held, its lease released. Returns how many leases were released (one
    /// already taken by another node is not).
    async fn hand_over(&self, leases: Vec<Lease>) -> Result<usize, ClusterError> {
        let released: Vec<_> = futures_util::stream::iter(leases)
            .map(|lease| async move {
                self.host.passivate(lease.shard).await;
                self.holdings.release(lease.shard);
                self.leases.release(&lease).await
            })
            .buffer_unordered(CONCURRENT_CLAIMS)
            .collect()
            .await;
        let mut count = 0;
        for r in released {
            count += usize::from(r?);
        }
        Ok(count)
    }
}
