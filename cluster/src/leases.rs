//! Which node each shard lives on, in ScyllaDB's `shard_leases` table: the cluster's one
//! authority over ownership.
//!
//! A lease is a shard's owner with an **epoch**. Every change of a lease is a lightweight
//! transaction (Paxos, at SERIAL consistency) conditional on the lease its writer read:
//! a free shard is claimed with `IF NOT EXISTS` (epoch 1); a held or released one is
//! taken `IF owner = <seen> AND epoch = <seen>`, raising the epoch by one. So each epoch
//! of a shard has exactly one owner, whatever the nodes' clocks say and however many race
//! for it; a node that paused and lost its shard finds out at its next conditional write.
//! Timeouts (a node presumed dead) decide only *when* a node tries to take a shard over,
//! never whether two can win.
//!
//! A released lease keeps its epoch with no owner, so the next owner's epoch is still
//! higher than every write of the previous one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use scylla::client::session::Session;
use scylla::statement::Consistency;
use scylla::statement::SerialConsistency;
use scylla::statement::prepared::PreparedStatement;
use twin_store::scylla::{self as scylla_store, Fences, ScyllaStore};

use crate::{ClusterError, NodeId};

/// A shard's owner as the table says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub shard: u16,
    /// `None` once released.
    pub owner: Option<NodeId>,
    /// Raised by one at each change of owner; 1 for the first.
    pub epoch: u64,
    /// Where the owner takes node-to-node requests (empty once released).
    pub address: String,
    /// When this epoch began, milliseconds since the Unix epoch.
    pub since: u64,
}

/// What a claim came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The shard is ours at this lease's epoch.
    Won(Lease),
    /// The lease was not what the claim expected: here is what it is now (`None`: the
    /// shard was never claimed).
    Lost(Option<Lease>),
}

/// The `shard_leases` table of a ScyllaDB keyspace (schema version 7 creates it).
pub struct ShardLeases {
    session: Arc<Session>,
    claim_free: PreparedStatement,
    take: PreparedStatement,
    release: PreparedStatement,
    read_one: PreparedStatement,
    read_all: PreparedStatement,
}

type Row = (
    i32,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
);

pub(crate) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn failed(context: &'static str) -> impl FnOnce(String) -> ClusterError {
    move |e| ClusterError::Store(format!("{context}: {e}"))
}

fn check(shard: u16) -> Result<i32, ClusterError> {
    if shard < twin_model::PARTITIONS {
        Ok(i32::from(shard))
    } else {
        Err(ClusterError::NoSuchShard(shard))
    }
}

fn lease_of((shard, owner, epoch, address, since): Row) -> Result<Lease, ClusterError> {
    let corrupt = |what: String| ClusterError::Store(format!("lease of shard {shard}: {what}"));
    let owner = match owner.filter(|o| !o.is_empty()) {
        Some(o) => Some(NodeId::parse(&o).map_err(|e| corrupt(e.to_string()))?),
        None => None,
    };
    Ok(Lease {
        shard: u16::try_from(shard).map_err(|_| corrupt("no such shard".into()))?,
        owner,
        epoch: epoch
            .and_then(|e| u64::try_from(e).ok())
            .ok_or_else(|| corrupt("no epoch".into()))?,
        address: address.unwrap_or_default(),
        since: since.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
    })
}

impl ShardLeases {
    pub async fn open(store: &ScyllaStore) -> Result<Self, ClusterError> {
        let session = store.session();
        let ks = store.keyspace();
        let prepare = |cql: String, serial_read: bool| {
            let session = session.clone();
            async move {
                let mut st = session
                    .prepare(cql)
                    .await
                    .map_err(|e| failed("preparing statements")(e.to_string()))?;
                // Paxos across every datacenter: a lease is one for the whole cluster.
                st.set_serial_consistency(Some(SerialConsistency::Serial));
                st.set_consistency(if serial_read {
                    Consistency::Serial
                } else {
                    Consistency::Quorum
                });
                Ok::<_, ClusterError>(st)
            }
        };
        let columns = "shard, owner, epoch, address, since";
        Ok(Self {
            claim_free: prepare(format!("INSERT INTO {ks}.shard_leases ({columns}) VALUES (?, ?, 1, ?, ?) IF NOT EXISTS"), false).await?,
            take: prepare(format!("UPDATE {ks}.shard_leases SET owner = ?, epoch = ?, address = ?, since = ? WHERE shard = ? IF owner = ? AND epoch = ?"), false).await?,
            release: prepare(format!("UPDATE {ks}.shard_leases SET owner = '', address = '', since = ? WHERE shard = ? IF owner = ? AND epoch = ?"), false).await?,
            read_one: prepare(format!("SELECT {columns} FROM {ks}.shard_leases WHERE shard = ?"), true).await?,
            read_all: prepare(format!("SELECT {columns} FROM {ks}.shard_leases"), false).await?,
            session,
        })
    }

    /// The shard's lease now, read through Paxos: it reflects every lease change that
    /// ended before the read began (`None`: never claimed).
    pub async fn lease(&self, shard: u16) -> Result<Option<Lease>, ClusterError> {
        let result = self
            .session
            .execute_unpaged(&self.read_one, (check(shard)?,))
            .await
            .map_err(|e| failed("reading a lease")(e.to_string()))?;
        let rows = typed::<Row>(result)?;
        rows.into_iter().next().map(lease_of).transpose()
    }

    /// Every claimed shard's lease, in shard order (at QUORUM: for reports, not for
    /// decisions).
    pub async fn all(&self) -> Result<Vec<Lease>, ClusterError> {
        let result = self
            .session
            .execute_unpaged(&self.read_all, ())
            .await
            .map_err(|e| failed("reading the leases")(e.to_string()))?;
        let mut leases = typed::<Row>(result)?
            .into_iter()
            .map(lease_of)
            .collect::<Result<Vec<_>, _>>()?;
        leases.sort_by_key(|l| l.shard);
        Ok(leases)
    }

    /// Makes `me` (reached at `address`) the owner of `shard`, provided its lease is still
    /// `seen` (`None`: never claimed).
    pub async fn claim(
        &self,
        shard: u16,
        me: &NodeId,
        address: &str,
        seen: Option<&Lease>,
    ) -> Result<Claim, ClusterError> {
        let p = check(shard)?;
        let since = now_millis();
        let result = match seen {
            None => {
                self.session
                    .execute_unpaged(&self.claim_free, (p, me.as_str(), address, since))
                    .await
            }
            Some(seen) => {
                let epoch = i64::try_from(seen.epoch + 1)
                    .map_err(|_| failed("claiming")(format!("shard {shard}: epoch overflow")))?;
                let owner = seen.owner.as_ref().map_or("", NodeId::as_str);
                self.session
                    .execute_unpaged(
                        &self.take,
                        (me.as_str(), epoch, address, since, p, owner, epoch - 1),
                    )
                    .await
            }
        };
        let result = result.map_err(|e| failed("claiming a shard")(e.to_string()))?;
        if applied(result)? {
            let epoch = seen.map_or(1, |l| l.epoch + 1);
            Ok(Claim::Won(Lease {
                shard,
                owner: Some(me.clone()),
                epoch,
                address: address.to_owned(),
                since: u64::try_from(since).unwrap_or(0),
            }))
        } else {
            Ok(Claim::Lost(self.lease(shard).await?))
        }
    }

    /// Gives `lease` up (its owner hands the shard over): the shard keeps its epoch with
    /// no owner. `false` when the lease had already changed (the shard was taken).
    pub async fn release(&self, lease: &Lease) -> Result<bool, ClusterError> {
        let owner = lease.owner.as_ref().map_or("", NodeId::as_str);
        let epoch = i64::try_from(lease.epoch)
            .map_err(|_| failed("releasing")(format!("shard {}: epoch overflow", lease.shard)))?;
        let result = self
            .session
            .execute_unpaged(
                &self.release,
                (now_millis(), check(lease.shard)?, owner, epoch),
            )
            .await
            .map_err(|e| failed("releasing a shard")(e.to_string()))?;
        applied(result)
    }
}

/// The shards this node holds, with each lease's epoch: what the store's fencing asks
/// before every twin write (see [`twin_store::scylla::Fences`]).
pub struct Holdings {
    /// By shard; 0 when not held (epochs start at 1).
    epochs: Vec<AtomicU64>,
}

impl Default for Holdings {
    fn default() -> Self {
        Self {
            epochs: (0..twin_model::PARTITIONS)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
}

impl Holdings {
    /// Holds `lease`'s shard at its epoch (a lease of another node is ignored).
    pub fn hold(&self, lease: &Lease, me: &NodeId) {
        if lease.owner.as_ref() == Some(me)
            && let Some(e) = self.epochs.get(usize::from(lease.shard))
        {
            e.store(lease.epoch, Ordering::Release);
        }
    }

    /// No longer holds `shard`: the store refuses its twins' writes from now on.
    pub fn release(&self, shard: u16) {
        if let Some(e) = self.epochs.get(usize::from(shard)) {
            e.store(0, Ordering::Release);
        }
    }

    /// The shards held, with their epochs, in shard order.
    pub fn held(&self) -> Vec<(u16, u64)> {
        (0..twin_model::PARTITIONS)
            .filter_map(|s| self.epoch(s).map(|e| (s, e)))
            .collect()
    }
}

impl Fences for Holdings {
    fn epoch(&self, partition: u16) -> Option<u64> {
        let e = self
            .epochs
            .get(usize::from(partition))?
            .load(Ordering::Acquire);
        (e != 0).then_some(e)
    }
}

/// Rows of a result, as the store reads them.
fn typed<T>(result: scylla::response::query_result::QueryResult) -> Result<Vec<T>, ClusterError>
where
    T: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
{
    scylla_store::rows(result, "shard_leases")
        .map_err(|e| failed("reading a result")(e.to_string()))
}

/// A conditional write's `[applied]`, as the store reads it (by column name).
fn applied(result: scylla::response::query_result::QueryResult) -> Result<bool, ClusterError> {
    scylla_store::conditional(result, "shard_leases")
        .map(|(applied, _)| applied)
        .map_err(|e| failed("a conditional write")(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twin_store::conformance::{drop_keyspace, fresh_keyspace, scylla_nodes};
    use twin_store::scylla::ScyllaConfig;

    async fn leases() -> (ShardLeases, ScyllaStore) {
        let config = ScyllaConfig::single_node(scylla_nodes(), &fresh_keyspace(), 10);
        let store = ScyllaStore::connect(&config).await.unwrap();
        (ShardLeases::open(&store).await.unwrap(), store)
    }

    fn node(n: &str) -> NodeId {
        NodeId::parse(n).unwrap()
    }

    fn won(c: Claim) -> Lease {
        match c {
            Claim::Won(l) => l,
            Claim::Lost(l) => panic!("lost to {l:?}"),
        }
    }

    #[tokio::test]
    async fn only_one_of_many_racing_nodes_wins_each_epoch() {
        let (leases, store) = leases().await;
        let leases = Arc::new(leases);
        let mut seen: Option<Lease> = None;
        let mut owners = Vec::new();
        for round in 0..4 {
            let racers = (0..6).map(|i| {
                let (leases, seen) = (leases.clone(), seen.clone());
                tokio::spawn(async move {
                    let me = node(&format!("n{round}-{i}"));
                    leases
                        .claim(7, &me, "10.0.0.1:7000", seen.as_ref())
                        .await
                        .unwrap()
                })
            });
            let mut winners = Vec::new();
            let mut losers = Vec::new();
            for r in futures_join(racers).await {
                match r {
                    Claim::Won(l) => winners.push(l),
                    Claim::Lost(l) => losers.push(l.unwrap()),
                }
            }
            assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
            let winner = winners.pop().unwrap();
            assert_eq!(winner.epoch, round + 1);
            // Every loser saw the winner's lease (or a later one: none here).
            assert!(
                losers
                    .iter()
                    .all(|l| l.owner == winner.owner && l.epoch == winner.epoch),
                "{losers:?}"
            );
            assert_eq!(leases.lease(7).await.unwrap().as_ref(), Some(&winner));
            owners.push(winner.owner.clone());
            seen = Some(winner);
        }
        assert_eq!(owners.len(), 4);
        drop_keyspace(store.keyspace()).await;
    }

    async fn futures_join<T: Send + 'static>(
        handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for h in handles.collect::<Vec<_>>() {
            out.push(h.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_node_that_lost_its_shard_can_neither_take_it_back_stale_nor_release_it() {
        let (leases, store) = leases().await;
        let (a, b) = (node("a"), node("b"));
        let of_a = won(leases.claim(3, &a, "a:7000", None).await.unwrap());
        assert_eq!((of_a.epoch, of_a.owner.as_ref()), (1, Some(&a)));
        // b presumes a dead and takes the shard over from what it saw.
        let of_b = won(leases.claim(3, &b, "b:7000", Some(&of_a)).await.unwrap());
        assert_eq!(of_b.epoch, 2);
        // a wakes up: whatever it believes, its lease is gone.
        assert!(!leases.release(&of_a).await.unwrap());
        assert_eq!(
            leases.claim(3, &a, "a:7000", Some(&of_a)).await.unwrap(),
            Claim::Lost(Some(of_b.clone()))
        );
        assert_eq!(
            leases.claim(3, &a, "a:7000", None).await.unwrap(),
            Claim::Lost(Some(of_b.clone()))
        );
        // b hands it over: no owner, the epoch kept; the next owner gets epoch 3.
        assert!(leases.release(&of_b).await.unwrap());
        let released = leases.lease(3).await.unwrap().unwrap();
        assert_eq!((released.owner.clone(), released.epoch), (None, 2));
        assert!(!leases.release(&of_b).await.unwrap(), "released twice");
        let again = won(leases
            .claim(3, &a, "a:7001", Some(&released))
            .await
            .unwrap());
        assert_eq!((again.epoch, again.address.as_str()), (3, "a:7001"));
        // A claim that saw a's first lease is stale although a owns the shard again.
        let c = node("c");
        assert_eq!(
            leases.claim(3, &c, "c:7000", Some(&of_a)).await.unwrap(),
            Claim::Lost(Some(again.clone()))
        );
        drop_keyspace(store.keyspace()).await;
    }

    #[tokio::test]
    async fn all_lists_the_claimed_shards_in_order_and_refuses_shards_that_do_not_exist() {
        let (leases, store) = leases().await;
        assert_eq!(leases.all().await.unwrap(), []);
        let a = node("a");
        for shard in [1023, 0, 512] {
            won(leases.claim(shard, &a, "a:7000", None).await.unwrap());
        }
        let all = leases.all().await.unwrap();
        assert_eq!(
            all.iter().map(|l| l.shard).collect::<Vec<_>>(),
            [0, 512, 1023]
        );
        assert!(
            all.iter()
                .all(|l| l.owner.as_ref() == Some(&a) && l.epoch == 1)
        );
        let err = leases.claim(1024, &a, "a:7000", None).await.unwrap_err();
        assert!(
            err.to_string().contains("shard 1024 does not exist"),
            "{err}"
        );
        assert_eq!(leases.lease(9).await.unwrap(), None);
        drop_keyspace(store.keyspace()).await;
    }
}
