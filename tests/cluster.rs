//! Three real `doppel serve` processes as one cluster on one keyspace of the test CQL node
//! (Apache Cassandra here; ScyllaDB with DOPPEL_SCYLLA_NODES): they share the shards, a
//! killed node's shards are owned again within seconds with every acknowledged update in
//! them, and a node that stops hands its shards over.

mod common;

use std::time::{Duration, Instant};

use common::{Server, client, graphql, start};
use rumqttc::QoS;
use serde_json::{Value, json};
use twin_cluster::{NodeId, placement};
use twin_model::DeviceId;

const STATUS: &str = "{ cluster { thisNode unownedShards nodes { id address state shards } } }";

/// A free UDP port on the loopback interface, for a node's gossip.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node `id` of the cluster on `keyspace`, gossiping on `gossip` every `interval_ms`,
/// joining through `seed`.
async fn node(
    dir: &std::path::Path,
    keyspace: &str,
    id: &str,
    (gossip, seed): (u16, u16),
    interval_ms: u64,
) -> Server {
    let mut args = common::scylla_args();
    args.pop();
    args.push(keyspace.to_owned());
    args.extend([
        "--node-id".into(),
        id.into(),
        "--cluster-listen".into(),
        format!("127.0.0.1:{gossip}"),
        "--cluster-seeds".into(),
        format!("127.0.0.1:{seed}"),
        "--cluster-interval-ms".into(),
        interval_ms.to_string(),
        "--auto-register".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start(dir, &args).await
}

/// `cluster` as `server` answers it.
async fn status(server: &Server, token: &str) -> Value {
    let r = graphql(&server.http, Some(token), STATUS, json!({}))
        .await
        .json();
    assert!(r["errors"].is_null(), "{r}");
    r["data"]["cluster"].clone()
}

/// The status once `done` holds, asked every 100 ms, and how long that took; panics with
/// the last status after `limit`.
async fn status_when(
    server: &Server,
    token: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let began = Instant::now();
    loop {
        let s = status(server, token).await;
        if done(&s) {
            return (s, began.elapsed());
        }
        assert!(began.elapsed() < limit, "not within {limit:?}: {s:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node that holds `thing`'s shard in `status`.
fn owner(status: &Value, thing: &str) -> String {
    let shard = u64::from(DeviceId::parse(thing).unwrap().partition());
    let node = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["shards"].as_array().unwrap().iter().any(|s| *s == shard))
        .unwrap_or_else(|| panic!("no node holds shard {shard}: {status:#}"));
    node["id"].as_str().unwrap().to_owned()
}

/// Whether every shard in `status` is held by the node the placement over `live` puts
/// it on.
fn placed(status: &Value, live: &[&str]) -> bool {
    let live: Vec<NodeId> = live.iter().map(|n| NodeId::parse(n).unwrap()).collect();
    let plan = placement::assignment(&live);
    status["nodes"].as_array().unwrap().iter().all(|n| {
        let id = n["id"].as_str().unwrap();
        let held: Vec<u64> = n["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap())
            .collect();
        let due: Vec<u64> = (0u64..)
            .zip(&plan)
            .filter(|(_, p)| p.is_some_and(|p| p.as_str() == id))
            .map(|(s, _)| s)
            .collect();
        held == due
    })
}

fn shard_counts(status: &Value) -> Vec<(String, String, usize)> {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_owned(),
                n["state"].as_str().unwrap().to_owned(),
                n["shards"].as_array().unwrap().len(),
            )
        })
        .collect()
}

/// Publishes a reported `n` for `thing` through `server` and returns the answer's topic
/// suffix and document.
async fn update(server: &Server, thing: &str, n: u64) -> (bool, Value) {
    let (c, mut el) = client(&server.mqtt, thing, None).await;
    let doc = json!({"state": {"reported": {"n": n}}, "clientToken": format!("u{n}")});
    c.publish(
        format!("$aws/things/{thing}/shadow/update"),
        QoS::AtLeastOnce,
        false,
        doc.to_string(),
    )
    .await
    .unwrap();
    let answer = tokio::time::timeout(common::WAIT, async {
        use rumqttc::{Event, Packet};
        loop {
            match el.poll().await.unwrap() {
                Event::Incoming(Packet::Publish(p)) if p.topic.ends_with("/update/accepted") => {
                    return (true, serde_json::from_slice(&p.payload).unwrap());
                }
                Event::Incoming(Packet::Publish(p)) if p.topic.ends_with("/update/rejected") => {
                    return (false, serde_json::from_slice(&p.payload).unwrap());
                }
                _ => {}
            }
        }
    })
    .await
    .expect("an answer to the update");
    let _ = c.disconnect().await;
    answer
}

#[tokio::test]
async fn three_nodes_share_the_shards_and_a_killed_nodes_twins_come_back_whole() {
    let keyspace = twin_store::conformance::fresh_keyspace();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_udp_port()).collect();
    let ids = ["node-a", "node-b", "node-c"];
    let at = |id: &str| ids.iter().position(|n| *n == id).unwrap();
    let mut servers = Vec::new();
    for (i, id) in ids[..2].iter().enumerate() {
        servers.push(node(dirs[i].path(), &keyspace, id, (ports[i], ports[0]), 200).await);
    }
    let token = servers
        .iter()
        .find_map(|s| s.admin_token.clone())
        .expect("the first node to start writes the admin token");
    let (two, _) = status_when(&servers[0], &token, common::WAIT, |s| {
        s["unownedShards"].as_array().unwrap().is_empty() && placed(s, &ids[..2])
    })
    .await;

    // A device whose twin moves to node-c when it joins: connected to its twin's node
    // until then, disconnected by it when the shard is handed over, served by node-c.
    let plan = |live: &[&str]| {
        let live: Vec<NodeId> = live.iter().map(|n| NodeId::parse(n).unwrap()).collect();
        move |thing: &str| {
            let shard = usize::from(DeviceId::parse(thing).unwrap().partition());
            placement::assignment(&live)[shard].unwrap().to_string()
        }
    };
    let mover = (0..)
        .map(|i| format!("mover-{i}"))
        .find(|t| plan(&ids)(t) == "node-c")
        .unwrap();
    let first_home = owner(&two, &mover);
    let (accepted, doc) = update(&servers[at(&first_home)], &mover, 1).await;
    assert!(accepted, "{doc}");
    let (_device, mut moving) = client(&servers[at(&first_home)].mqtt, &mover, None).await;

    servers.push(node(dirs[2].path(), &keyspace, ids[2], (ports[2], ports[0]), 200).await);
    // Every shard owned where the placement puts it, each node up.
    let (s, _) = status_when(&servers[0], &token, common::WAIT, |s| {
        s["unownedShards"].as_array().unwrap().is_empty()
            && placed(s, &["node-a", "node-b", "node-c"])
    })
    .await;
    assert_eq!(s["thisNode"], "node-a");
    let counts = shard_counts(&s);
    assert!(
        counts.iter().all(|(_, state, _)| state == "UP"),
        "{counts:?}"
    );
    assert_eq!(
        counts.iter().map(|c| c.2).sum::<usize>(),
        1024,
        "{counts:?}"
    );
    // Every node answers the same.
    assert_eq!(shard_counts(&status(&servers[2], &token).await), counts);
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(["cluster", "status", "--data-dir"])
        .arg(dirs[1].path())
        .env("DOPPEL_STORE", "scylla")
        .env(
            "DOPPEL_SCYLLA_NODES",
            twin_store::conformance::scylla_nodes().join(","),
        )
        .env("DOPPEL_SCYLLA_KEYSPACE", &keyspace)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{printed}");
    for (id, _, shards) in &counts {
        let row = printed
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("no row for {id}: {printed}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], "up", "{row}");
        assert_eq!(cells[3], shards.to_string(), "{row}");
    }
    assert!(printed.contains("unowned shards: 0 of 1024"), "{printed}");

    let closed = tokio::time::timeout(common::WAIT, async {
        loop {
            if let Err(e) = moving.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("the moved twin's device is disconnected");
    eprintln!("the device of a moved twin: {closed}");
    servers[at(&first_home)]
        .log
        .line_with("devices disconnected: their twins moved to another node")
        .await;
    let (accepted, doc) = update(&servers[2], &mover, 2).await;
    assert!(accepted, "{doc}");
    assert_eq!(doc["version"], 2, "{doc}");

    // Twins spread over the nodes; each device is served by the node that holds its
    // twin, and refused at CONNECT (server unavailable) by one that does not: requests
    // are not routed between nodes yet.
    let things: Vec<String> = (0..24).map(|i| format!("pump-{i}")).collect();
    let mut on_c = Vec::new();
    for (i, thing) in things.iter().enumerate() {
        let home = owner(&s, thing);
        let (accepted, doc) = update(&servers[at(&home)], thing, i as u64).await;
        assert!(accepted, "{thing} on {home}: {doc}");
        assert_eq!(doc["version"], 1, "{doc}");
        if home == "node-c" {
            on_c.push(thing.clone());
        }
    }
    assert!(!on_c.is_empty(), "no twin on node-c");
    let elsewhere = at(if owner(&s, &things[0]) == "node-a" {
        "node-b"
    } else {
        "node-a"
    });
    let (host, port) = servers[elsewhere].mqtt.rsplit_once(':').unwrap();
    let options = rumqttc::MqttOptions::new(&things[0], host, port.parse().unwrap());
    let (_c, mut el) = rumqttc::AsyncClient::new(options, 10);
    let refused = tokio::time::timeout(common::WAIT, el.poll()).await.unwrap();
    assert!(
        matches!(
            refused,
            Err(rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::ServiceUnavailable
            ))
        ),
        "{refused:?}"
    );

    // A device of node-c stays connected until node-c dies.
    let (_stays, mut stays_el) = client(&servers[2].mqtt, &on_c[0], None).await;

    // SIGKILL node-c: the other two own its shards within 10 s.
    let mut c = servers.pop().unwrap();
    c.child.start_kill().unwrap();
    c.child.wait().await.unwrap();
    let (after, took) = status_when(&servers[0], &token, Duration::from_secs(10), |s| {
        s["unownedShards"].as_array().unwrap().is_empty() && placed(s, &["node-a", "node-b"])
    })
    .await;
    eprintln!("node-c's shards owned again after {took:?}");
    let dead = &after["nodes"].as_array().unwrap()[2];
    assert_eq!(dead["id"], "node-c");
    assert_eq!(dead["state"], "DOWN", "{after:#}");

    // Every acknowledged update of node-c's twins is there, on their new owners, which
    // go on from it.
    for thing in &on_c {
        let home = owner(&after, thing);
        assert_ne!(home, "node-c");
        let r = graphql(
            &servers[at(&home)].http,
            Some(&token),
            "query($id: ID!) { thing(id: $id) { shadow { version reported } } }",
            json!({"id": thing}),
        )
        .await
        .json();
        let n = things.iter().position(|t| t == thing).unwrap();
        let shadow = &r["data"]["thing"]["shadow"];
        assert_eq!(shadow["version"], 1, "{thing}: {r}");
        assert_eq!(shadow["reported"]["n"], n, "{thing}: {r}");
        if *thing == on_c[0] {
            // Its new node records it disconnected (soon after it takes the shard): its
            // connection was to node-c.
            let deadline = Instant::now() + common::WAIT;
            let presence = loop {
                let r = graphql(
                    &servers[at(&home)].http,
                    Some(&token),
                    "query($id: ID!) { thing(id: $id) { connectivity { connected disconnectReason } } }",
                    json!({"id": thing}),
                )
                .await
                .json();
                let presence = r["data"]["thing"]["connectivity"].clone();
                if presence["connected"] == false || Instant::now() > deadline {
                    break presence;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert_eq!(presence["connected"], false, "{presence}");
            assert_eq!(
                presence["disconnectReason"], "its connection was to another cluster node",
                "{presence}"
            );
            assert!(stays_el.poll().await.is_err(), "still connected to node-c");
        }
        let (accepted, doc) = update(&servers[at(&home)], thing, 2000).await;
        assert!(accepted, "{thing} on {home}: {doc}");
        assert_eq!(doc["version"], 2, "{doc}");
    }

    // node-b stops cleanly: it hands its shards over (node-a holds all of them soon
    // after) and leaves the status.
    let b = servers.pop().unwrap();
    let began = Instant::now();
    assert!(b.terminate().await.success());
    let (last, _) = status_when(&servers[0], &token, Duration::from_secs(10), |s| {
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "node-a" && n["shards"].as_array().unwrap().len() == 1024)
    })
    .await;
    eprintln!(
        "node-b stopped and its shards moved in {:?}",
        began.elapsed()
    );
    let left: Vec<_> = shard_counts(&last).into_iter().map(|c| c.0).collect();
    assert_eq!(left, ["node-a", "node-c"], "{last:#}");
    let (accepted, doc) = update(&servers[0], &things[0], 3000).await;
    assert!(accepted, "{doc}");
    servers.pop().unwrap().terminate().await;
    twin_store::conformance::drop_keyspace(&keyspace).await;
}

/// A node is not ready until its first keeper round has claimed its shards: before that
/// it would refuse every device.
#[tokio::test]
async fn a_node_is_ready_once_it_holds_its_shards() {
    let keyspace = twin_store::conformance::fresh_keyspace();
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    // Gossip every 2 s: the first round comes after a grace of three of them.
    let server = node(dir.path(), &keyspace, "alone", (port, port), 2000).await;
    let r = common::http(&server.http, "GET", "/readyz", &[], b"").await;
    assert_eq!(
        (r.status, String::from_utf8_lossy(&r.body).as_ref()),
        (503, "joining the cluster\n")
    );
    let deadline = Instant::now() + common::WAIT;
    while common::http(&server.http, "GET", "/readyz", &[], b"")
        .await
        .status
        != 200
    {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = server.admin_token.clone().unwrap();
    let s = status(&server, &token).await;
    assert_eq!(shard_counts(&s), [("alone".into(), "UP".into(), 1024)]);
    server.terminate().await;
    twin_store::conformance::drop_keyspace(&keyspace).await;
}
