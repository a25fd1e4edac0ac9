//! The GraphQL API over real HTTP and WebSocket against the real `doppel serve`, with
//! real MQTT devices (rumqttc).

mod common;

use std::io::Read;

use common::{WAIT, Ws, client, doppel, graphql, http, next_on, register, start, ws_as};
use rumqttc::{Event, Packet, QoS};
use serde_json::json;

const EVENT: &str = "__typename ... on Subscribed { version } ... on ShadowChanged { thingId version shadowVersion operation state delta clientToken } ... on ConnectivityChanged { thingId connected } ... on Lagged { skipped resumeFromVersion thingId }";

#[tokio::test]
async fn desired_state_reaches_the_device_and_its_report_reaches_the_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let admin = server
        .admin_token
        .clone()
        .expect("the first start prints a token");
    let secret = register(&server.http, &admin, "lamp-1", json!({"room": "hall"})).await;

    let mut ws = ws_as(&server.http, &admin, None).await;
    ws.subscribe(
        "1",
        &format!(r#"subscription {{ thingChanged(id: "lamp-1") {{ {EVENT} }} }}"#),
    )
    .await;

    // The device connects with its secret: the subscriber sees it come online.
    let (device, mut el) = client(&server.mqtt, "lamp-1", Some(&secret)).await;
    let e = ws.data().await;
    assert_eq!(e["thingChanged"]["__typename"], "ConnectivityChanged");
    assert_eq!(e["thingChanged"]["connected"], true);

    // Desired state set through GraphQL reaches the device as a delta.
    let r = graphql(
        &server.http,
        Some(&admin),
        r#"mutation { updateDesired(id: "lamp-1", desired: {power: "on"}, clientToken: "app-1") { version delta } }"#,
        json!({}),
    )
    .await
    .json();
    assert_eq!(
        r["data"]["updateDesired"],
        json!({"version": 1, "delta": {"power": "on"}}),
        "{r}"
    );
    let delta = next_on(&mut el, "/shadow/update/delta").await;
    assert_eq!(delta["state"], json!({"power": "on"}));
    assert_eq!(delta["version"], 1);
    let e = ws.data().await;
    assert_eq!(
        e["thingChanged"]["state"],
        json!({"desired": {"power": "on"}})
    );
    assert_eq!(e["thingChanged"]["clientToken"], "app-1");

    // The device reports back over MQTT: the subscriber sees the report, in sync.
    device
        .publish(
            "$aws/things/lamp-1/shadow/update",
            QoS::AtLeastOnce,
            false,
            json!({"state": {"reported": {"power": "on"}}}).to_string(),
        )
        .await
        .unwrap();
    next_on(&mut el, "/shadow/update/accepted").await;
    let e = ws.data().await;
    assert_eq!(
        e["thingChanged"],
        json!({"__typename": "ShadowChanged", "thingId": "lamp-1", "version": 2, "shadowVersion": 2,
               "operation": "UPDATED", "state": {"reported": {"power": "on"}}, "delta": null, "clientToken": null})
    );

    // A query reads the same twin.
    let r = graphql(
        &server.http,
        Some(&admin),
        r#"{ thing(id: "lamp-1") { attributes connectivity { connected lastSeen } shadow { desired reported delta version } } }"#,
        json!({}),
    )
    .await
    .json();
    let t = &r["data"]["thing"];
    assert_eq!(t["attributes"], json!({"room": "hall"}));
    assert_eq!(t["connectivity"]["connected"], true);
    assert_eq!(
        t["shadow"],
        json!({"desired": {"power": "on"}, "reported": {"power": "on"}, "delta": null, "version": 2})
    );

    // Disabling the thing ends the device's connection.
    let r = graphql(
        &server.http,
        Some(&admin),
        r#"mutation { disableThing(id: "lamp-1") { enabled } }"#,
        json!({}),
    )
    .await
    .json();
    assert_eq!(r["data"]["disableThing"]["enabled"], false);
    let closed = tokio::time::timeout(common::WAIT, async {
        loop {
            if el.poll().await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the disabled device was disconnected");
    let e = ws.data().await;
    assert_eq!(e["thingChanged"]["connected"], false);
}

#[tokio::test]
async fn things_changed_is_filtered_on_the_server_over_the_legacy_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let admin = server.admin_token.clone().unwrap();
    register(&server.http, &admin, "north-1", json!({"site": "north"})).await;
    register(&server.http, &admin, "south-1", json!({"site": "south"})).await;

    let mut ws = Ws::connect(&server.http, "graphql-ws", json!({"token": admin}), None)
        .await
        .acked()
        .await;
    ws.subscribe(
        "1",
        &format!(
            r#"subscription {{ thingsChanged(filter: "attributes.site = \"south\" AND desired.level > 5") {{ {EVENT} }} }}"#
        ),
    )
    .await;
    let set = |id: &'static str, level: u32| {
        let http = server.http.clone();
        let admin = admin.clone();
        async move {
            let q = format!(
                r#"mutation {{ updateDesired(id: "{id}", desired: {{level: {level}}}) {{ version }} }}"#
            );
            let r = graphql(&http, Some(&admin), &q, json!({})).await.json();
            assert!(r["errors"].is_null(), "{r}");
        }
    };
    set("north-1", 9).await;
    set("south-1", 1).await;
    set("south-1", 7).await;
    set("north-1", 10).await;
    set("south-1", 8).await;
    for level in [7, 8] {
        let e = ws.data().await;
        assert_eq!(e["thingsChanged"]["thingId"], "south-1");
        assert_eq!(e["thingsChanged"]["state"]["desired"]["level"], level);
    }
}

#[tokio::test]
async fn a_slow_subscriber_is_told_it_lagged() {
    let dir = tempfile::tempdir().unwrap();
    // One device reports as fast as it can: over the default 100 publishes a second.
    let args = [
        "--event-buffer",
        "64",
        "--mqtt-max-publishes-per-second",
        "0",
    ];
    let server = start(dir.path(), &args).await;
    let admin = server.admin_token.clone().unwrap();
    let secret = register(&server.http, &admin, "chatty", json!({})).await;

    // A subscriber with a tiny receive window that does not read while the device talks.
    let mut slow = ws_as(&server.http, &admin, Some(4096)).await;
    slow.subscribe(
        "1",
        &format!(r#"subscription {{ thingChanged(id: "chatty") {{ {EVENT} }} }}"#),
    )
    .await;
    // Known to be listening once it has seen the device connect.
    let (device, mut el) = client(&server.mqtt, "chatty", Some(&secret)).await;
    assert_eq!(slow.data().await["thingChanged"]["connected"], true);

    // Reports of ~4 KiB, three times more than the server's socket send buffer can hold
    // (its kernel maximum), so that the 64-event buffer must overflow.
    let filler = "x".repeat(4000);
    let updates = (3 * socket_send_buffer_max() / filler.len()).max(3000);
    // The device keeps fewer requests in flight than the connection's limit (10, as AWS
    // IoT), so every report is accepted.
    let window = 8;
    let (mut sent, mut acked) = (0, 0);
    while acked < updates {
        while sent < updates && sent - acked < window {
            let body = json!({"state": {"reported": {"n": sent, "filler": filler}}});
            device
                .try_publish(
                    "$aws/things/chatty/shadow/update",
                    QoS::AtLeastOnce,
                    false,
                    body.to_string(),
                )
                .unwrap();
            sent += 1;
        }
        match tokio::time::timeout(common::WAIT, el.poll()).await.unwrap() {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(Event::Incoming(Packet::Publish(p))) => assert!(
                !p.topic.ends_with("/rejected"),
                "{}",
                String::from_utf8_lossy(&p.payload)
            ),
            Ok(_) => {}
            Err(e) => panic!("device connection failed: {e}"),
        }
    }

    // Now the subscriber reads: events in order, then Lagged, then the newest events.
    let mut last = 0;
    let lagged = loop {
        let e = slow.data().await;
        let e = &e["thingChanged"];
        if e["__typename"] == "Lagged" {
            break e.clone();
        }
        let v = e["version"].as_u64().unwrap();
        assert_eq!(v, last + 1, "no silent gap before the Lagged event");
        last = v;
    };
    assert_eq!(lagged["resumeFromVersion"], last + 1);
    assert_eq!(lagged["thingId"], "chatty");
    assert!(lagged["skipped"].as_u64().unwrap() > 0);
    let mut newest = 0;
    while newest < updates as u64 {
        let e = slow.data().await;
        let e = &e["thingChanged"];
        assert_eq!(e["__typename"], "ShadowChanged", "{e}");
        let v = e["version"].as_u64().unwrap();
        assert!(
            v > last + 1 && v > newest,
            "after the signal, newer versions in order"
        );
        newest = v;
    }
    // The twin itself was never slowed down: every update was accepted.
    let r = graphql(
        &server.http,
        Some(&admin),
        r#"{ thing(id: "chatty") { version } }"#,
        json!({}),
    )
    .await
    .json();
    assert_eq!(r["data"]["thing"]["version"], updates);
}

/// The most a TCP socket may buffer for sending (Linux `net.ipv4.tcp_wmem`), 4 MiB where
/// it cannot be read.
fn socket_send_buffer_max() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
}

#[tokio::test]
async fn auth_failures_are_explicit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--graphql-max-body-bytes", "2048"]).await;
    let admin = server.admin_token.clone().unwrap();
    register(&server.http, &admin, "t1", json!({})).await;
    let q = r#"{ thing(id: "t1") { id } }"#;

    let r = graphql(&server.http, None, q, json!({})).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(
        r.json()["errors"][0]["extensions"]["code"],
        "UNAUTHENTICATED"
    );
    let r = graphql(&server.http, Some("dpl_0000_nope"), q, json!({})).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json()["errors"][0]["extensions"]["code"],
        "UNAUTHENTICATED"
    );

    // A viewer token made by the CLI while the server runs: reads yes, steering no.
    let out = doppel(
        &["token", "create", "--role", "viewer", "--ttl", "1h"],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let viewer = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let r = graphql(&server.http, Some(&viewer), q, json!({}))
        .await
        .json();
    assert_eq!(r["data"]["thing"]["id"], "t1");
    let r = graphql(
        &server.http,
        Some(&viewer),
        r#"mutation { updateDesired(id: "t1", desired: {a: 1}) { version } }"#,
        json!({}),
    )
    .await
    .json();
    assert_eq!(r["errors"][0]["extensions"]["code"], "FORBIDDEN");
    let out = doppel(&["token", "create", "--role", "boss"], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("roles are viewer, operator and admin"));

    // Bodies over the limit and bodies that are not GraphQL requests.
    let big = "x".repeat(4096);
    let r = graphql(&server.http, Some(&admin), q, json!({"pad": big})).await;
    assert_eq!(r.status, 413);
    assert_eq!(
        r.json()["errors"][0]["extensions"]["code"],
        "PAYLOAD_TOO_LARGE"
    );
    let auth = format!("Bearer {admin}");
    let r = http(
        &server.http,
        "POST",
        "/graphql",
        &[("Authorization", &auth)],
        b"{nope",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["errors"][0]["extensions"]["code"],
        "INVALID_ARGUMENT"
    );

    // A WebSocket without a valid token is closed with graphql-transport-ws's 4401
    // Unauthorized, saying why.
    let mut ws = Ws::connect(&server.http, "graphql-transport-ws", json!({}), None).await;
    let (code, reason) = ws.next().await.expect_err("the socket is closed");
    assert_eq!(code, 4401, "{reason}");
    assert!(reason.starts_with("UNAUTHENTICATED"), "{reason}");
    let mut ws = Ws::connect(
        &server.http,
        "graphql-transport-ws",
        json!({"Authorization": "Bearer dpl_1_2"}),
        None,
    )
    .await;
    let (code, reason) = ws.next().await.expect_err("the socket is closed");
    assert_eq!(code, 4401, "{reason}");
    assert!(reason.starts_with("UNAUTHENTICATED"), "{reason}");

    // A batch (a JSON array) is refused, saying so; a body over the limit names it.
    let r = common::http(
        &server.http,
        "POST",
        "/graphql",
        &[("Authorization", &auth)],
        br#"[{"query":"{ things { totalCount } }"}]"#,
    )
    .await;
    assert_eq!(r.status, 400);
    let message = r.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.starts_with("batched requests (a JSON array) are not supported"),
        "{message}"
    );
    let r = common::http(
        &server.http,
        "POST",
        "/graphql",
        &[("Authorization", &auth)],
        &[b' '; 4096],
    )
    .await;
    assert_eq!(r.status, 413);
    let message = r.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        message,
        "the request body is larger than 2048 bytes (setting graphql_max_body_bytes)"
    );
}

#[tokio::test]
async fn subscription_sockets_are_pinged_and_silent_ones_closed() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        &[
            "--http-ws-ping-secs",
            "1",
            "--http-header-timeout-secs",
            "1",
        ],
    )
    .await;
    let admin = server.admin_token.clone().unwrap();

    // No connection_init in time: 4408, as graphql-transport-ws says.
    let (mut raw, _) = tokio_tungstenite::client_async(
        ws_request(&server.http),
        tokio::net::TcpStream::connect(&server.http).await.unwrap(),
    )
    .await
    .unwrap();
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match raw.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(closed, Some(4408));

    // A client that answers pings stays; one whose reads stop (no pongs) is closed.
    let mut ws = common::ws_as(&server.http, &admin, None).await;
    let mut pings = 0;
    tokio::time::timeout(WAIT, async {
        while pings < 3 {
            // tungstenite answers each ping with a pong as it reads.
            if let Some(Ok(Message::Ping(_))) = ws.socket.next().await {
                pings += 1;
            }
        }
    })
    .await
    .expect("three pings, about a second apart");
    // Stop reading: tungstenite sends no more pongs, and nothing else is sent.
    // (How long the server waits is not asserted: the pong to the last ping
    // read may or may not have been flushed, so it is one or two intervals.)
    let mut sink = Vec::new();
    let mut stream = ws.socket.into_inner();
    tokio::time::timeout(WAIT, async {
        use tokio::io::AsyncReadExt;
        let _ = stream.read_to_end(&mut sink).await;
    })
    .await
    .expect("the server closes a silent socket");
}

fn ws_request(addr: &str) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}/graphql/ws")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    request
}

#[tokio::test]
async fn graphiql_is_served_with_its_bundle_offline() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let page = http(&server.http, "GET", "/graphql", &[], b"").await;
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body).unwrap();
    assert!(
        !html.contains("://unpkg") && !html.contains("cdn"),
        "no CDN: {html}"
    );
    let mut sources: Vec<&str> = html
        .split("src=\"")
        .skip(1)
        .chain(html.split("href=\"").skip(1))
        .map(|s| s.split('"').next().unwrap())
        .collect();
    sources.sort();
    assert_eq!(
        sources,
        [
            "/graphql/assets/graphiql.css",
            "/graphql/assets/graphiql.js",
            "/graphql/assets/react-dom.js",
            "/graphql/assets/react.js"
        ]
    );
    for src in sources {
        let r = http(
            &server.http,
            "GET",
            src,
            &[("Accept-Encoding", "gzip")],
            b"",
        )
        .await;
        assert_eq!(r.status, 200, "{src}");
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        let mut text = String::new();
        flate2::read::GzDecoder::new(&r.body[..])
            .read_to_string(&mut text)
            .unwrap();
        if src.ends_with("graphiql.js") {
            assert!(text.contains("createGraphiQLFetcher") && text.len() > 1_000_000);
        }
    }
    assert_eq!(
        http(&server.http, "GET", "/graphql/assets/x.js", &[], b"")
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn a_server_with_live_subscriptions_stops_and_tells_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let admin = server.admin_token.clone().unwrap();
    let mut ws = ws_as(&server.http, &admin, None).await;
    ws.subscribe(
        "1",
        &format!(r#"subscription {{ thingsChanged(filter: "connected = true") {{ {EVENT} }} }}"#),
    )
    .await;
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");
    let (code, reason) = ws.next().await.expect_err("the socket is closed");
    assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
}

#[tokio::test]
async fn history_and_time_travel_survive_a_restart() {
    history_and_time_travel(&[]).await;
}

#[tokio::test]
async fn history_and_time_travel_survive_a_restart_on_scylladb() {
    let args = common::scylla_args();
    history_and_time_travel(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
}

/// A device and an API client change a shadow; after a restart on the same store the
/// history names each of them, and the shadow at each change's instant is the one that
/// change produced.
async fn history_and_time_travel(args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), args).await;
    let admin = server.admin_token.clone().unwrap();
    let secret = register(&server.http, &admin, "lamp-1", json!({})).await;
    let (device, mut el) = client(&server.mqtt, "lamp-1", Some(&secret)).await;
    // Every update is announced on `update/accepted`, the API's too: wait for the
    // device's own, by its client token.
    let report = async |on: bool, el: &mut rumqttc::EventLoop| {
        let token = format!("report-{on}");
        let body = json!({"state": {"reported": {"on": on}}, "clientToken": token}).to_string();
        device
            .publish(
                "$aws/things/lamp-1/shadow/update",
                QoS::AtLeastOnce,
                false,
                body,
            )
            .await
            .unwrap();
        while next_on(el, "/shadow/update/accepted").await["clientToken"] != token.as_str() {}
    };
    report(false, &mut el).await;
    let r = graphql(
        &server.http,
        Some(&admin),
        r#"mutation { updateDesired(id: "lamp-1", desired: {on: true}) { version } }"#,
        json!({}),
    )
    .await
    .json();
    assert_eq!(r["data"]["updateDesired"]["version"], 2, "{r}");
    report(true, &mut el).await;
    drop(el);
    server.terminate().await;

    let server = start(dir.path(), args).await;
    let q = r#"{ thing(id: "lamp-1") { shadow { history { edges { node { version at operation by { kind tokenId note } } } } } } }"#;
    let r = graphql(&server.http, Some(&admin), q, json!({}))
        .await
        .json();
    let edges = r["data"]["thing"]["shadow"]["history"]["edges"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .clone();
    let nodes: Vec<&serde_json::Value> = edges.iter().map(|e| &e["node"]).collect();
    let kinds: Vec<(u64, &str)> = nodes
        .iter()
        .map(|n| {
            (
                n["version"].as_u64().unwrap(),
                n["by"]["kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(kinds, [(3, "DEVICE"), (2, "TOKEN"), (1, "DEVICE")]);
    let token_id = admin.split('_').nth(1).unwrap();
    assert_eq!(nodes[1]["by"]["tokenId"], token_id);
    assert_eq!(nodes[1]["by"]["note"], "created at first start");

    // The shadow at each change's instant: the newest change accepted by then.
    let at_q = "query($at: DateTime) { thing(id: \"lamp-1\") { shadow(at: $at) { version desired reported } } }";
    let state = [
        json!({"version": 1, "desired": null, "reported": {"on": false}}),
        json!({"version": 2, "desired": {"on": true}, "reported": {"on": false}}),
        json!({"version": 3, "desired": {"on": true}, "reported": {"on": true}}),
    ];
    for node in &nodes {
        let at = node["at"].as_str().unwrap();
        let r = graphql(&server.http, Some(&admin), at_q, json!({"at": at}))
            .await
            .json();
        let newest_by_then = nodes
            .iter()
            .filter(|n| n["at"].as_str().unwrap() <= at)
            .map(|n| n["version"].as_u64().unwrap())
            .max()
            .unwrap();
        assert_eq!(
            r["data"]["thing"]["shadow"],
            state[newest_by_then as usize - 1],
            "at {at}: {r}"
        );
    }
    let first = nodes[2]["at"].as_str().unwrap();
    let before = twin_model::rfc3339(twin_model::parse_rfc3339(first).unwrap() - 1);
    let r = graphql(&server.http, Some(&admin), at_q, json!({"at": before}))
        .await
        .json();
    assert_eq!(r["data"]["thing"]["shadow"], serde_json::Value::Null, "{r}");
}

/// On ScyllaDB the API tokens live in the database: a token made on one node, or by the
/// CLI, works on another node of the same keyspace, and a node joining an existing
/// keyspace makes no admin token of its own.
#[tokio::test]
async fn api_tokens_are_shared_through_scylladb() {
    let args = common::scylla_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(dir_a.path(), &args).await;
    let admin = a.admin_token.clone().expect("the keyspace's first start");
    let b = start(dir_b.path(), &args).await;
    assert_eq!(b.admin_token, None, "the keyspace already has tokens");
    assert!(!dir_b.path().join("tokens.jsonl").exists());

    let r = graphql(
        &a.http,
        Some(&admin),
        r#"mutation { createToken(role: VIEWER, note: "wallboard") { token } }"#,
        json!({}),
    )
    .await
    .json();
    let viewer = r["data"]["createToken"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    // The CLI takes the store's settings from the environment (or a config file).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(["token", "create", "--role", "operator", "--data-dir"])
        .arg(dir_b.path())
        .env("DOPPEL_STORE", "scylla")
        .env("DOPPEL_SCYLLA_NODES", args[3])
        .env("DOPPEL_SCYLLA_KEYSPACE", args[5])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let operator = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("dpl_"))
        .unwrap()
        .to_owned();

    let me = "{ thing(id: \"nobody\") { id } }";
    for (node, token) in [(&b, &viewer), (&b, &admin), (&a, &operator)] {
        let r = graphql(&node.http, Some(token), me, json!({})).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["data"]["thing"], serde_json::Value::Null);
    }
    let r = graphql(&b.http, Some("dpl_0123456789abcdef_nope"), me, json!({})).await;
    assert_eq!(r.status, 401);
}
