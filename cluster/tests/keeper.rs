//! Three, then four keepers with real gossip (UDP on localhost) and real leases (Apache
//! Cassandra here, ScyllaDB with DOPPEL_SCYLLA_NODES): the leases follow the placement
//! over the live nodes when they start, when one dies, when one joins and when one leaves.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;
use twin_cluster::NodeId;
use twin_cluster::keeper::{Keeper, ShardHost};
use twin_cluster::leases::{Holdings, ShardLeases};
use twin_cluster::membership::{Membership, MembershipConfig};
use twin_cluster::placement;
use twin_store::conformance::{drop_keyspace, fresh_keyspace, scylla_nodes};
use twin_store::scylla::{Fences, ScyllaConfig, ScyllaStore};

/// The shards a node passivated, in order.
#[derive(Default)]
struct Recorder(Mutex<Vec<u16>>);

#[async_trait]
impl ShardHost for Recorder {
    async fn passivate(&self, shard: u16) {
        self.0.lock().unwrap().push(shard);
    }

    async fn take(&self, _: u16) {}
}

struct Node {
    id: NodeId,
    gossip: String,
    holdings: Arc<Holdings>,
    host: Arc<Recorder>,
    leases: Arc<ShardLeases>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const MAX_HANDOVERS: usize = 64;

async fn start(name: &str, keyspace: &str, seeds: &[&Node]) -> Node {
    let config = ScyllaConfig::single_node(scylla_nodes(), keyspace, 10);
    let store = ScyllaStore::connect(&config).await.unwrap();
    let leases = Arc::new(ShardLeases::open(&store).await.unwrap());
    let id = NodeId::parse(name).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let membership = Membership::start(MembershipConfig {
        node: id.clone(),
        cluster_id: keyspace.to_owned(),
        listen: addr,
        advertise: addr,
        seeds: seeds.iter().map(|n| n.gossip.clone()).collect(),
        gossip_interval: Duration::from_millis(100),
    })
    .await
    .unwrap();
    let holdings = Arc::new(Holdings::default());
    let host = Arc::new(Recorder::default());
    let keeper = Keeper::new(
        id.clone(),
        format!("{name}:7000"),
        leases.clone(),
        holdings.clone(),
        host.clone(),
        MAX_HANDOVERS,
    );
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        keeper
            .run(
                &membership,
                Duration::from_millis(200),
                Duration::from_secs(1),
                stopped,
            )
            .await;
        membership.stop().await;
    });
    Node {
        id,
        gossip: addr.to_string(),
        holdings,
        host,
        leases,
        stop,
        task,
    }
}

/// Waits until every shard's lease is owned by the node the placement over `nodes` puts
/// it on, and held there at the lease's epoch (and nowhere else among `nodes`); returns
/// how long it took.
async fn settled(nodes: &[&Node], within: Duration) -> Duration {
    let began = Instant::now();
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.id.clone()).collect();
    let plan = placement::assignment(&ids);
    loop {
        let leases = nodes[0].leases.all().await.unwrap();
        let right = leases.len() == usize::from(twin_model::PARTITIONS)
            && leases.iter().all(|l| {
                let owner = plan[usize::from(l.shard)].unwrap();
                l.owner.as_ref() == Some(owner)
                    && nodes.iter().all(|n| {
                        let held = n.holdings.epoch(l.shard);
                        if &n.id == owner {
                            held == Some(l.epoch)
                        } else {
                            held.is_none()
                        }
                    })
            });
        if right {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < within,
            "the leases did not follow the placement over {ids:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn held(node: &Node) -> BTreeSet<u16> {
    node.holdings.held().into_iter().map(|(s, _)| s).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_follow_the_live_nodes_through_a_crash_a_join_and_a_leave() {
    let ks = fresh_keyspace();
    let a = start("a", &ks, &[]).await;
    let mut b = start("b", &ks, &[&a]).await;
    let c = start("c", &ks, &[&a]).await;
    let took = settled(&[&a, &b, &c], Duration::from_secs(60)).await;
    eprintln!("three nodes own their shards {took:?} after the last started");

    // c dies: no handover, its lease rows still name it. The others take its shards
    // over once gossip stops hearing from it.
    let of_c = held(&c);
    c.task.abort();
    let killed = Instant::now();
    let _ = c.task.await;
    let took = settled(&[&a, &b], Duration::from_secs(60)).await;
    eprintln!(
        "{} shards of the dead node owned again after {took:?}",
        of_c.len()
    );
    assert!(killed.elapsed() >= took);

    // d joins: a and b hand it its share, each shard passivated before it was given up.
    let (a_before, b_before) = (held(&a), held(&b));
    let d = start("d", &ks, &[&a, &b]).await;
    let took = settled(&[&a, &b, &d], Duration::from_secs(60)).await;
    eprintln!("the joining node owns its share after {took:?}");
    let moved: BTreeSet<u16> = held(&d);
    for (node, before) in [(&a, &a_before), (&b, &b_before)] {
        let passivated: BTreeSet<u16> = node.host.0.lock().unwrap().iter().copied().collect();
        let given: BTreeSet<u16> = before.intersection(&moved).copied().collect();
        assert!(!given.is_empty(), "{} handed nothing over", node.id);
        assert!(
            given.is_subset(&passivated),
            "{} gave shards up without passivating them",
            node.id
        );
        assert!(held(node).is_disjoint(&moved));
    }
    // Nothing else moved: a join takes only its own share.
    assert_eq!(held(&a), &a_before - &moved);
    assert_eq!(held(&b), &b_before - &moved);

    // b leaves cleanly: it releases its shards, and a and d claim them.
    b.stop.send(true).unwrap();
    (&mut b.task).await.unwrap();
    assert!(held(&b).is_empty());
    let took = settled(&[&a, &d], Duration::from_secs(60)).await;
    eprintln!("the leaving node's shards owned again after {took:?}");

    for n in [&a, &d] {
        n.stop.send(true).unwrap();
    }
    a.task.await.unwrap();
    d.task.await.unwrap();
    assert!(
        a.leases
            .all()
            .await
            .unwrap()
            .iter()
            .all(|l| l.owner.is_none())
    );
    drop_keyspace(&ks).await;
}

/// A keeper that sees `live` as it is told: rounds without gossip.
async fn keeper(
    name: &str,
    keyspace: &str,
) -> (Keeper, Arc<Holdings>, Arc<Recorder>, Arc<ShardLeases>) {
    let config = ScyllaConfig::single_node(scylla_nodes(), keyspace, 10);
    let store = ScyllaStore::connect(&config).await.unwrap();
    let leases = Arc::new(ShardLeases::open(&store).await.unwrap());
    let holdings = Arc::new(Holdings::default());
    let host = Arc::new(Recorder::default());
    let keeper = Keeper::new(
        NodeId::parse(name).unwrap(),
        format!("{name}:7000"),
        leases.clone(),
        holdings.clone(),
        host.clone(),
        MAX_HANDOVERS,
    );
    (keeper, holdings, host, leases)
}

fn ids(names: &[&str]) -> Vec<NodeId> {
    names.iter().map(|n| NodeId::parse(n).unwrap()).collect()
}

/// A node cut off from the others (each believes the other dead) and back: the leases
/// never let both hold a shard, the one that lost its shards lets go of them (passivating
/// their twins) when it hears of the owner again, and a restarted node claims its own
/// shards at a new epoch.
#[tokio::test]
async fn a_node_that_was_presumed_dead_lets_go_and_a_restarted_one_takes_a_new_epoch() {
    let ks = fresh_keyspace();
    let all = usize::from(twin_model::PARTITIONS);
    let (a, a_holds, a_host, leases) = keeper("a", &ks).await;
    let (b, b_holds, _, _) = keeper("b", &ks).await;
    let round = a.round(&ids(&["a"])).await.unwrap();
    assert_eq!((round.claimed, round.held), (all, all));

    // b cannot hear a: it takes every shard over. a, still believing, holds its old
    // epochs, which its store's fences no longer accept (see tests/fencing.rs).
    let round = b.round(&ids(&["b"])).await.unwrap();
    assert_eq!((round.taken_over, round.held), (all, all));
    assert!(leases.all().await.unwrap().iter().all(|l| l.epoch == 2));

    // a hears of b again: both are placed a share; a lets go of everything it held (b
    // owns it now), then claims nothing yet: b hands a its share over.
    let round = a.round(&ids(&["a", "b"])).await.unwrap();
    assert_eq!((round.lost, round.held), (all, 0));
    assert_eq!(
        a_host.0.lock().unwrap().len(),
        all,
        "every lost shard passivated"
    );
    assert!(a_holds.held().is_empty());
    let round = b.round(&ids(&["a", "b"])).await.unwrap();
    assert_eq!(round.handed_over, MAX_HANDOVERS);
    let round = a.round(&ids(&["a", "b"])).await.unwrap();
    assert_eq!(round.claimed, MAX_HANDOVERS);
    assert!(a_holds.held().iter().all(|&(_, epoch)| epoch == 3));
    let disjoint = a_holds
        .held()
        .iter()
        .all(|&(s, _)| b_holds.epoch(s).is_none());
    assert!(disjoint, "a shard held by both");

    // a restarts (nothing held in memory): its own leases are claimed again, one epoch up.
    drop(a);
    let (a2, a2_holds, _, _) = keeper("a", &ks).await;
    let round = a2.round(&ids(&["a", "b"])).await.unwrap();
    assert_eq!(round.claimed, MAX_HANDOVERS);
    assert!(a2_holds.held().iter().all(|&(_, epoch)| epoch == 4));
    drop_keyspace(&ks).await;
}
