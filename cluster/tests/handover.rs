//! Twins moving between two nodes with their shards: real fleets (twin actors, group
//! commit) on fenced stores of one keyspace (Apache Cassandra here, ScyllaDB with
//! DOPPEL_SCYLLA_NODES), and keepers whose rounds are run by the test with the live nodes
//! it chooses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use twin_actors::{FleetConfig, FleetHandle};
use twin_cluster::host::FleetHost;
use twin_cluster::keeper::Keeper;
use twin_cluster::leases::{Holdings, ShardLeases};
use twin_cluster::{NodeId, placement};
use twin_model::command::{CommandStatus, NewCommand};
use twin_model::history::Origin;
use twin_model::{DeviceId, Limits, RejectionKind, ShadowName, TwinEvent, UpdateRequest};
use twin_store::conformance::{drop_keyspace, fresh_keyspace, scylla_nodes};
use twin_store::scylla::{Fences, ScyllaConfig, ScyllaStore};
use twin_store::{Committer, TwinStore};

struct Node {
    id: NodeId,
    fleet: FleetHandle,
    holdings: Arc<Holdings>,
    keeper: Keeper,
}

async fn node(name: &str, keyspace: &str) -> Node {
    let config = ScyllaConfig::single_node(scylla_nodes(), keyspace, 10);
    let store = Arc::new(ScyllaStore::connect(&config).await.unwrap());
    let holdings = Arc::new(Holdings::default());
    store.fence_with(holdings.clone()).unwrap();
    let leases = Arc::new(ShardLeases::open(&store).await.unwrap());
    let store: Arc<dyn TwinStore> = store;
    let (committer, _) = Committer::start(store, 1024, 1024);
    let fleet = FleetHandle::start(FleetConfig::default(), committer)
        .await
        .unwrap();
    let id = NodeId::parse(name).unwrap();
    let host = Arc::new(FleetHost::new(fleet.clone(), Duration::from_secs(10)));
    let keeper = Keeper::new(
        id.clone(),
        format!("{name}:7000"),
        leases,
        holdings.clone(),
        host,
        usize::from(twin_model::PARTITIONS),
    );
    Node {
        id,
        fleet,
        holdings,
        keeper,
    }
}

/// A node that holds every shard, as the only one alive.
async fn alone(name: &str, keyspace: &str) -> Node {
    let node = node(name, keyspace).await;
    let round = node
        .keeper
        .round(std::slice::from_ref(&node.id))
        .await
        .unwrap();
    assert_eq!(round.held, usize::from(twin_model::PARTITIONS));
    node
}

impl Node {
    async fn register(&self, things: &[DeviceId]) {
        for thing in things {
            self.fleet
                .registry()
                .register(thing, Default::default())
                .await
                .unwrap();
        }
    }

    fn holds(&self, thing: &DeviceId) -> bool {
        self.holdings.epoch(thing.partition()).is_some()
    }

    async fn update(&self, thing: &DeviceId, n: u64) -> Result<u64, twin_actors::FleetError> {
        let request = UpdateRequest::parse(
            json!({"state": {"reported": {"n": n}}})
                .to_string()
                .as_bytes(),
            &Limits::default(),
        )
        .unwrap();
        let change = self
            .fleet
            .shadows()
            .update(thing, ShadowName::classic(), request, Origin::Device)
            .await?;
        Ok(change.version)
    }

    async fn version(&self, thing: &DeviceId) -> Result<u64, twin_actors::FleetError> {
        let shadow = self
            .fleet
            .shadows()
            .get(thing, ShadowName::classic())
            .await?;
        Ok(shadow.version)
    }
}

fn things(n: usize) -> Vec<DeviceId> {
    (0..n)
        .map(|i| DeviceId::parse(&format!("dev-{i}")).unwrap())
        .collect()
}

/// Node a owns every shard and takes updates for 64 twins, one stream per twin, while it
/// hands half its shards over to node b that joined: every update a acknowledged is in
/// the twin b loads (its version counts exactly the acknowledged updates: none lost, none
/// written by two nodes), a refuses the twins it gave up, and b takes their updates on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_handed_over_carries_every_acknowledged_update() {
    let ks = fresh_keyspace();
    let a = Arc::new(alone("a", &ks).await);
    let things = things(64);
    a.register(&things).await;
    let b = node("b", &ks).await;
    let both = [a.id.clone(), b.id.clone()];

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = things
        .iter()
        .map(|thing| {
            let (a, stop, thing) = (a.clone(), stop.clone(), thing.clone());
            tokio::spawn(async move {
                let (mut acknowledged, mut refused) = (Vec::new(), 0u64);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    match a.update(&thing, n).await {
                        Ok(version) => acknowledged.push(version),
                        Err(e) => {
                            assert_eq!(e.kind(), RejectionKind::Unavailable, "{e}");
                            refused += 1;
                            tokio::task::yield_now().await;
                        }
                    }
                }
                (thing, acknowledged, refused)
            })
        })
        .collect();
    // The writers are under way before the handover starts (a twin has no shadow before
    // its first update).
    tokio::time::timeout(Duration::from_secs(30), async {
        while a.version(&things[0]).await.unwrap_or(0) < 3 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("updates acknowledged within 30 s");
    let handed = a.keeper.round(&both).await.unwrap().handed_over;
    let claimed = b.keeper.round(&both).await.unwrap().claimed;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(handed, claimed);
    assert!(handed > 0 && handed < usize::from(twin_model::PARTITIONS));

    let mut moved = 0;
    let mut outcomes = BTreeMap::new();
    for writer in writers {
        let (thing, acknowledged, refused) = writer.await.unwrap();
        assert!(
            acknowledged.windows(2).all(|w| w[1] == w[0] + 1),
            "{thing}: versions acknowledged out of sequence: {acknowledged:?}"
        );
        let count = acknowledged.len() as u64;
        assert!(count > 0, "{thing}: no update acknowledged");
        let (owner, other) = if b.holds(&thing) {
            (&b, &*a)
        } else {
            (&*a, &b)
        };
        assert!(!other.holds(&thing));
        assert_eq!(
            owner.version(&thing).await.unwrap(),
            count,
            "{thing} on {}: not every acknowledged update is there",
            owner.id
        );
        if owner.id == b.id {
            moved += 1;
            let refused_now = a.update(&thing, 0).await.unwrap_err();
            assert_eq!(refused_now.kind(), RejectionKind::Unavailable);
            assert_eq!(b.update(&thing, 0).await.unwrap(), count + 1);
        } else {
            assert_eq!(refused, 0, "{thing} stayed on a but was refused");
        }
        outcomes.insert(thing.to_string(), (count, refused));
    }
    assert!(
        (16..=48).contains(&moved),
        "{moved} of 64 twins moved to b: {outcomes:?}"
    );
    drop_keyspace(&ks).await;
}

/// Node a is presumed dead and its shards taken over while one of its twins is in
/// memory: the twin's next write is refused, and so is every read after it; a does not
/// go on serving the shadow as it was before b changed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_twin_whose_write_was_fenced_serves_no_stale_shadow() {
    let ks = fresh_keyspace();
    let a = alone("a", &ks).await;
    let thing = DeviceId::parse("lamp").unwrap();
    a.register(std::slice::from_ref(&thing)).await;
    assert_eq!(a.update(&thing, 1).await.unwrap(), 1);

    let b = node("b", &ks).await;
    let taken = b.keeper.round(std::slice::from_ref(&b.id)).await.unwrap();
    assert_eq!(taken.taken_over, usize::from(twin_model::PARTITIONS));
    assert_eq!(b.update(&thing, 2).await.unwrap(), 2);

    // a still believes it holds the shard: its twin decides on version 1, and the store
    // refuses the write.
    assert!(a.holds(&thing));
    let refused = a.update(&thing, 3).await.unwrap_err();
    assert_eq!(refused.kind(), RejectionKind::Unavailable, "{refused}");
    let read = a.version(&thing).await;
    assert!(
        matches!(&read, Err(e) if e.kind() == RejectionKind::Unavailable),
        "a read on the node that lost the shard answered {read:?}"
    );
    assert_eq!(b.version(&thing).await.unwrap(), 2);
    drop_keyspace(&ks).await;
}

/// Node a hands over the shards placed on b while its twins are in memory, one of them
/// with a command that expires soon: a keeps no twin of those shards in memory, and b
/// (which started before the command was sent, so it learned of its deadline only with
/// the shard) expires the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_given_up_leaves_its_twins_and_their_deadlines_to_the_new_owner() {
    let ks = fresh_keyspace();
    let a = alone("a", &ks).await;
    let b = node("b", &ks).await;
    let both = [a.id.clone(), b.id.clone()];
    let plan = placement::assignment(&both);
    let things = things(20);
    a.register(&things).await;
    for thing in &things {
        a.update(thing, 1).await.unwrap();
    }
    let on_b = |t: &DeviceId| plan[usize::from(t.partition())] == Some(&b.id);
    let staying = things.iter().filter(|t| !on_b(t)).count();
    let mover = things.iter().find(|t| on_b(t)).expect("a twin placed on b");
    let sent = a
        .fleet
        .commands()
        .send(
            mover,
            NewCommand {
                name: "reboot".into(),
                payload: json!({}),
                timeout_seconds: 1,
                expires_in_seconds: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(a.fleet.resident_twins().await, things.len());

    let mut events = b.fleet.queries().subscribe();
    a.keeper.round(&both).await.unwrap();
    assert_eq!(a.fleet.resident_twins().await, staying);
    b.keeper.round(&both).await.unwrap();
    let expired = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await {
                Ok(change) => match &*change.event {
                    TwinEvent::Command { execution, .. }
                        if execution.execution_id == sent.execution_id =>
                    {
                        return execution.clone();
                    }
                    _ => {}
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("b expires the command within 30 s");
    assert_eq!(expired.status, CommandStatus::TimedOut);
    assert_eq!(b.version(mover).await.unwrap(), 1);
    drop_keyspace(&ks).await;
}
