//! Shard leases and fenced twin writes together, on a real CQL database (Apache Cassandra
//! here, ScyllaDB with DOPPEL_SCYLLA_NODES): two nodes of one keyspace, the lease of a
//! twin's shard moving between them.

use std::sync::Arc;

use twin_cluster::NodeId;
use twin_cluster::leases::{Claim, Holdings, Lease, ShardLeases};
use twin_model::{DeviceId, Limits, Shadow, ShadowName, UpdateRequest};
use twin_store::conformance::{drop_keyspace, fresh_keyspace, scylla_nodes};
use twin_store::scylla::{ScyllaConfig, ScyllaStore};
use twin_store::{StoreError, TwinStateStore, Write};

struct Node {
    id: NodeId,
    store: Arc<ScyllaStore>,
    holdings: Arc<Holdings>,
    leases: ShardLeases,
}

async fn node(name: &str, keyspace: &str) -> Node {
    let config = ScyllaConfig::single_node(scylla_nodes(), keyspace, 10);
    let store = Arc::new(ScyllaStore::connect(&config).await.unwrap());
    let holdings = Arc::new(Holdings::default());
    store.fence_with(holdings.clone()).unwrap();
    Node {
        id: NodeId::parse(name).unwrap(),
        leases: ShardLeases::open(&store).await.unwrap(),
        store,
        holdings,
    }
}

impl Node {
    /// Takes the shard of `thing` over from `seen` and holds it.
    async fn take(&self, thing: &DeviceId, seen: Option<&Lease>) -> Lease {
        match self
            .leases
            .claim(thing.partition(), &self.id, "-", seen)
            .await
            .unwrap()
        {
            Claim::Won(lease) => {
                self.holdings.hold(&lease, &self.id);
                lease
            }
            Claim::Lost(l) => panic!("{} lost the shard to {l:?}", self.id),
        }
    }

    /// The twin's classic shadow as this node loads it.
    async fn shadow(&self, thing: &DeviceId) -> Result<Option<Shadow>, StoreError> {
        let snap = self.store.load(thing).await?;
        Ok(snap.shadows.into_iter().next().map(|(_, s)| s))
    }

    /// Applies a reported update to `shadow` and commits it.
    async fn update(
        &self,
        thing: &DeviceId,
        shadow: &mut Shadow,
        value: &str,
    ) -> Result<(), StoreError> {
        self.store
            .commit(vec![reported(thing, shadow, value)])
            .await
    }
}

/// Applies a reported update to `shadow`: the write that stores it.
fn reported(thing: &DeviceId, shadow: &mut Shadow, value: &str) -> Write {
    let body = format!(r#"{{"state":{{"reported":{{"writer":"{value}"}}}}}}"#);
    let req = UpdateRequest::parse(body.as_bytes(), &Limits::default()).unwrap();
    let change = shadow.decide_update(&req, 1, &Limits::default()).unwrap();
    shadow.apply(&change);
    Write::Shadow {
        thing: thing.clone(),
        shadow: ShadowName::classic(),
        state: Arc::new(shadow.clone()),
        change: Arc::new(change),
    }
}

fn writer(shadow: &Shadow) -> String {
    shadow.reported.as_ref().unwrap()["writer"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn fenced<T: std::fmt::Debug>(result: Result<T, StoreError>) -> String {
    match result {
        Err(e @ StoreError::Fenced { .. }) => e.to_string(),
        other => panic!("not fenced: {other:?}"),
    }
}

#[tokio::test]
async fn a_node_that_lost_a_shard_can_no_longer_write_or_delete_its_twins() {
    let ks = fresh_keyspace();
    let (a, b) = (node("a", &ks).await, node("b", &ks).await);
    let thing = DeviceId::parse("pump-7").unwrap();
    // Nobody holds the shard: nobody writes.
    let err = fenced(a.update(&thing, &mut Shadow::default(), "a").await);
    assert!(
        err.contains(&format!("does not hold its shard {}", thing.partition())),
        "{err}"
    );

    let of_a = a.take(&thing, None).await;
    let mut at_a = a.shadow(&thing).await.unwrap().unwrap_or_default();
    a.update(&thing, &mut at_a, "a1").await.unwrap();

    // b takes the shard over (a presumed dead, but only paused): b sees a's update.
    b.take(&thing, Some(&of_a)).await;
    let mut at_b = b.shadow(&thing).await.unwrap().unwrap();
    assert_eq!((at_b.version, writer(&at_b).as_str()), (1, "a1"));
    b.update(&thing, &mut at_b, "b2").await.unwrap();

    // a wakes up believing it still holds epoch 1: refused, whatever it writes.
    let err = fenced(a.update(&thing, &mut at_a, "a2").await);
    assert!(err.contains("pump-7 is not owned by this node"), "{err}");
    let err = fenced(a.shadow(&thing).await);
    assert!(
        err.contains("epoch 1 here is older than the epoch 2"),
        "{err}"
    );
    fenced(
        a.store
            .commit(vec![Write::DeleteThing(thing.clone())])
            .await,
    );
    let kept = b.shadow(&thing).await.unwrap().unwrap();
    assert_eq!((kept.version, writer(&kept).as_str()), (2, "b2"));

    // b's delete goes through and keeps the fence: a stays fenced out.
    b.store
        .commit(vec![Write::DeleteThing(thing.clone())])
        .await
        .unwrap();
    assert_eq!(b.shadow(&thing).await.unwrap(), None);
    fenced(a.update(&thing, &mut Shadow::default(), "a3").await);
    // A node that gives its lease up stops writing at once.
    b.holdings.release(thing.partition());
    fenced(b.update(&thing, &mut Shadow::default(), "b3").await);
    drop_keyspace(&ks).await;
}

/// The property fencing exists for: an update the old owner had acknowledged is in what
/// the new owner loads, and the old owner's updates after the new owner loaded are
/// refused, however the two interleave. Each round the old owner writes while the new
/// one takes the shard over and loads.
#[tokio::test]
async fn no_update_acknowledged_by_the_old_owner_is_lost_when_the_new_one_takes_over() {
    let ks = fresh_keyspace();
    let nodes = [node("a", &ks).await, node("b", &ks).await];
    let thing = DeviceId::parse("valve-3").unwrap();
    let mut lease = nodes[0].take(&thing, None).await;
    let mut shadow = nodes[0].shadow(&thing).await.unwrap().unwrap_or_default();
    let (mut acknowledged, mut refused) = (0u64, 0u64);
    for round in 0..24 {
        let (old, new) = (&nodes[round % 2], &nodes[(round + 1) % 2]);
        let mut old_view = shadow.clone();
        let value = format!("{}-{round}", old.id);
        // Different head starts for the takeover, so that rounds interleave differently
        // (the checks hold for every interleaving).
        let head_start = std::time::Duration::from_millis((round as u64 * 9) % 100);
        let write = async {
            tokio::time::sleep(head_start).await;
            old.update(&thing, &mut old_view, &value).await
        };
        let takeover = async {
            let lease = new.take(&thing, Some(&lease)).await;
            (lease, new.shadow(&thing).await.unwrap().unwrap_or_default())
        };
        let (written, (next_lease, loaded)) = tokio::join!(write, takeover);
        match written {
            Ok(()) => {
                assert_eq!(
                    loaded, old_view,
                    "round {round}: an acknowledged update was lost"
                );
                acknowledged += 1;
            }
            Err(e) => {
                assert!(matches!(e, StoreError::Fenced { .. }), "round {round}: {e}");
                assert_eq!(loaded, shadow, "round {round}: a refused update was stored");
                refused += 1;
            }
        }
        // The old owner, still believing, writes again: always refused now; the new
        // owner's writes go through.
        fenced(old.update(&thing, &mut loaded.clone(), "stale").await);
        let mut loaded = loaded;
        new.update(&thing, &mut loaded, &format!("{}-{round}", new.id))
            .await
            .unwrap();
        lease = next_lease;
        shadow = loaded;
        old.holdings.release(thing.partition());
    }
    assert_eq!(acknowledged + refused, 24);
    assert_eq!(shadow.version, acknowledged + 24);
    eprintln!("{acknowledged} updates acknowledged before the takeover, {refused} refused");
    drop_keyspace(&ks).await;
}

/// One commit of two twins, of which the node holds only the first's shard: the second
/// twin's writes are refused and named by their positions, the first twin's are written.
#[tokio::test]
async fn a_commit_of_twins_held_and_not_refuses_only_those_not_held() {
    let ks = fresh_keyspace();
    let a = node("a", &ks).await;
    let held = DeviceId::parse("held-1").unwrap();
    let other = (0..)
        .map(|i| DeviceId::parse(&format!("other-{i}")).unwrap())
        .find(|t| t.partition() != held.partition())
        .unwrap();
    a.take(&held, None).await;
    // Loaded first, as a twin is: the load raises the fence its writes are checked on.
    let mut mine = a.shadow(&held).await.unwrap().unwrap_or_default();
    let mut theirs = Shadow::default();
    let writes = vec![
        reported(&other, &mut theirs, "x"),
        reported(&held, &mut mine, "a1"),
        reported(&other, &mut theirs, "y"),
    ];
    match a.store.commit(writes).await {
        Err(StoreError::FencedSome(refused)) => {
            assert_eq!(refused.len(), 1, "{refused:?}");
            assert_eq!(refused[0].positions, [0, 2]);
            assert_eq!(refused[0].thing, other.as_str());
        }
        other => panic!("not partly fenced: {other:?}"),
    }
    assert_eq!(writer(&a.shadow(&held).await.unwrap().unwrap()), "a1");
    drop_keyspace(&ks).await;
}
