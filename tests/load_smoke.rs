//! A small `doppel-load shadow-update` run against the real binary: 50 devices for a few
//! seconds. It checks that every update was accepted, that the report adds up, and that
//! a simulated device takes on what is desired of it; it asserts nothing about speed.

mod common;

use std::time::Duration;

use common::start;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use twin_load::api::Api;
use twin_load::client::Protocol;
use twin_load::{Fleet, Pace, Report};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_devices_update_their_shadows_and_the_report_adds_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--auto-register"]).await;
    for protocol in [Protocol::V4, Protocol::V5] {
        let fleet = Fleet {
            target: server.mqtt.parse().unwrap(),
            devices: 50,
            protocol,
            source_addrs: 4,
            prefix: format!("smoke-{protocol:?}"),
            connect_concurrency: 16,
            password: None,
        };
        // Something is desired of the first device before it starts.
        let first = format!("smoke-{protocol:?}-0000001");
        let before = shadow_request(
            &server.mqtt,
            &first,
            "update",
            r#"{"state":{"desired":{"mode":"eco"}}}"#,
        )
        .await;
        assert_eq!(before["state"]["desired"]["mode"], "eco");
        let pace = Pace {
            duration: Duration::from_secs(2),
            rate: 0.0,
        };
        let report = twin_load::scenarios::shadow_update(&fleet, &pace)
            .await
            .unwrap();
        assert_eq!(report.errors, 0, "{}", report.summary());
        assert!(
            report.ok >= 50,
            "every device completed at least one update: {}",
            report.summary()
        );
        assert_eq!(report.timeline.iter().map(|s| s.ok).sum::<u64>(), report.ok);
        assert_eq!(report.latency_us.unwrap().count, report.ok);
        assert!(!report.figures.contains_key("connect_failures"));

        let path = dir.path().join(format!("report-{protocol:?}.json"));
        report.write_json(&path).unwrap();
        let parsed: Report = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(parsed.ok, report.ok);
        assert_eq!(parsed.scenario, "shadow-update");

        // The simulated device got the desired mode at start and reported it back.
        let after = shadow_request(&server.mqtt, &first, "get", "{}").await;
        assert_eq!(after["state"]["reported"]["mode"], "eco", "{after}");
        assert!(
            after["state"].get("delta").is_none(),
            "nothing left to do: {after}"
        );
    }
}

/// Publishes on `$aws/things/{thing}/shadow/{op}` as the device and returns the accepted answer.
async fn shadow_request(addr: &str, thing: &str, op: &str, body: &str) -> serde_json::Value {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let (client, mut events) =
        AsyncClient::new(MqttOptions::new(thing, host, port.parse().unwrap()), 10);
    let base = format!("$aws/things/{thing}/shadow/{op}");
    client
        .subscribe(format!("{base}/accepted"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let answer = tokio::time::timeout(common::WAIT, async {
        loop {
            match events.poll().await.unwrap() {
                Event::Incoming(Packet::SubAck(_)) => client
                    .publish(&base, QoS::AtLeastOnce, false, body.to_owned())
                    .await
                    .unwrap(),
                Event::Incoming(Packet::Publish(p)) => {
                    return serde_json::from_slice(&p.payload).unwrap();
                }
                _ => {}
            }
        }
    })
    .await
    .expect("an accepted answer");
    client.disconnect().await.unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_set_through_graphql_reaches_the_devices_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--auto-register"]).await;
    let fleet = Fleet {
        target: server.mqtt.parse().unwrap(),
        devices: 20,
        protocol: Protocol::V4,
        source_addrs: 2,
        prefix: "rt".into(),
        connect_concurrency: 8,
        password: None,
    };
    let pace = Pace {
        duration: Duration::from_secs(2),
        rate: 0.0,
    };
    let api = Api {
        http: server.http.parse().unwrap(),
        token: server.admin_token.clone(),
        http_connections: 4,
    };
    let report = twin_load::api::desired_roundtrip(&fleet, &pace, &api)
        .await
        .unwrap();
    assert_eq!(report.errors, 0, "{}", report.summary());
    assert!(
        report.ok >= 20,
        "every device had a round: {}",
        report.summary()
    );
    assert_eq!(report.latency_us.unwrap().count, report.ok);
    assert!(
        report.figures["mutation_answered"]
            .as_str()
            .unwrap()
            .starts_with("p50 ")
    );

    // Each device ended with what was last desired of it reported, and no delta.
    let shadow = twin_shadow(&server, "rt-0000001").await;
    assert!(
        shadow["desired"]["setpoint"].as_u64().unwrap() >= 1,
        "{shadow}"
    );
    assert_eq!(
        shadow["reported"]["setpoint"],
        shadow["desired"]["setpoint"]
    );
    assert!(shadow["delta"].is_null(), "{shadow}");

    // A bad token fails the run at once, saying why.
    let bad = Api {
        token: Some("dpl_0000000000000000_nope".into()),
        ..api
    };
    let e = twin_load::api::desired_roundtrip(&fleet, &pace, &bad)
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("UNAUTHENTICATED"), "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_query_registers_a_fleet_and_times_each_filter() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let api = Api {
        http: server.http.parse().unwrap(),
        token: server.admin_token.clone(),
        http_connections: 4,
    };
    let report = twin_load::api::fleet_query(&api, "fq", 300, 2)
        .await
        .unwrap();
    assert_eq!(report.ok, 7 * 2, "{}", report.summary());
    // Matches of each filter over things 0..300 (site i % 100, model i % 4, level i).
    for (q, matches) in [
        ("q1", 1),
        ("q2", 0),
        ("q3", 3),
        ("q4", 0),
        ("q5", 3),
        ("q6", 6),
        ("q7", 150),
    ] {
        let figure = report.figures[q].as_str().unwrap();
        assert!(
            figure.contains(&format!(": {matches} matches,")),
            "{q}: {figure}"
        );
    }
    // A second run finds the things registered and keeps them.
    let again = twin_load::api::fleet_query(&api, "fq", 300, 1)
        .await
        .unwrap();
    assert!(
        again.figures["q3"]
            .as_str()
            .unwrap()
            .contains(": 3 matches,")
    );
}

/// The classic shadow of `thing`, through GraphQL.
async fn twin_shadow(server: &common::Server, thing: &str) -> serde_json::Value {
    let r = common::graphql(
        &server.http,
        server.admin_token.as_deref(),
        "query($id: ID!) { thing(id: $id) { shadow { desired reported delta } } }",
        serde_json::json!({ "id": thing }),
    )
    .await
    .json();
    r["data"]["thing"]["shadow"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ota_rollout_reaches_every_simulated_device() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--auto-register"]).await;
    let fleet = Fleet {
        target: server.mqtt.parse().unwrap(),
        devices: 30,
        protocol: Protocol::V4,
        source_addrs: 2,
        prefix: "ota".into(),
        connect_concurrency: 8,
        password: None,
    };
    let api = Api {
        http: server.http.parse().unwrap(),
        token: server.admin_token.clone(),
        http_connections: 2,
    };
    let args = twin_load::api::RolloutArgs {
        waves: vec![10, 100],
        rate_base: None,
        rate_factor: 2.0,
        rate_max: 100,
        fail_percent: 10,
        timeout: Duration::from_secs(60),
        server_pid: server.child.id(),
    };
    let report = twin_load::api::ota_rollout(&fleet, &api, &args)
        .await
        .unwrap();
    assert_eq!(
        report.figures["final_status"],
        "COMPLETED",
        "{}",
        report.summary()
    );
    // 10% fail, spread evenly: devices 0, 11 and 19 of these 30 (i * 37 % 100 < 10).
    assert_eq!(report.figures["succeeded"], 27, "{}", report.summary());
    assert_eq!(report.figures["failed"], 3);
    assert_eq!(report.ok, 30, "every device finished its update");
    assert_eq!(report.errors, 0);
    assert!(report.figures.contains_key("server_cpu_ms_per_execution"));
}
