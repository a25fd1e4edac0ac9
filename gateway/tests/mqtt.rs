//! The MQTT device endpoint end to end: real rumqttc clients (MQTT 3.1.1 and 5) against
//! the endpoint on a free port, over the real store.
//!
//! Over 600 lines: one test binary for the endpoint, sharing the client helpers of `common/`;
//! each test is independent.

mod common;

use std::time::Duration;

use common::{
    BOTH, Device, Ev, Opts, Proto, WAIT, device, id, next_v4, server, server_with, shadow,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use twin_actors::FleetConfig;
use twin_gateway::GatewayConfig;
use twin_model::history::Origin;
use twin_model::{Limits, ShadowName, TwinEvent, UpdateRequest};

#[tokio::test]
async fn update_get_delete_and_delta_over_both_protocols() {
    let s = server().await;
    for proto in BOTH {
        let name = format!("lamp-{proto:?}");
        let base = shadow(&name);
        let mut d = device(&s, proto, &name).await;
        assert_eq!(d.subscribe(&format!("{base}/#")).await, 1);

        let (ch, accepted) = d
            .request(&format!("{base}/update"), r#"{"state":{"desired":{"color":"red"},"reported":{"color":"blue"}},"clientToken":"c1"}"#)
            .await;
        assert_eq!(ch, "accepted", "{accepted}");
        assert_eq!(accepted["version"], 1);
        assert_eq!(accepted["clientToken"], "c1");
        assert_eq!(
            accepted["state"],
            json!({"desired": {"color": "red"}, "reported": {"color": "blue"}})
        );
        assert!(accepted["metadata"]["desired"]["color"]["timestamp"].is_u64());

        // The delta and the documents follow the accepted.
        let (topic, delta) = d.message().await;
        assert_eq!(topic, format!("{base}/update/delta"));
        assert_eq!(delta["state"], json!({"color": "red"}));
        assert_eq!(delta["version"], 1);
        let (topic, docs) = d.message().await;
        assert_eq!(topic, format!("{base}/update/documents"));
        assert_eq!(docs["previous"]["version"], 0);
        assert_eq!(
            docs["current"]["state"]["reported"],
            json!({"color": "blue"})
        );

        // The device catches up: no delta this time (the get answer comes first).
        d.publish(
            &format!("{base}/update"),
            r#"{"state":{"reported":{"color":"red"}}}"#,
        )
        .await;
        d.publish(&format!("{base}/get"), r#"{"clientToken":"g1"}"#)
            .await;
        let seen = d.until(&format!("{base}/get/accepted")).await;
        assert!(!seen.iter().any(|(t, _)| t.ends_with("/delta")), "{seen:?}");
        let got = &seen.last().unwrap().1;
        assert_eq!(got["version"], 2);
        assert_eq!(got["clientToken"], "g1");
        assert_eq!(
            got["state"],
            json!({"desired": {"color": "red"}, "reported": {"color": "red"}})
        );

        let (ch, deleted) = d.request(&format!("{base}/delete"), "").await;
        assert_eq!(
            (ch.as_str(), deleted["version"].as_u64()),
            ("accepted", Some(2))
        );
        let (ch, missing) = d.request(&format!("{base}/get"), "").await;
        assert_eq!(ch, "rejected");
        assert_eq!(missing["code"], 404);
        assert_eq!(
            missing["message"],
            format!("No shadow exists with name: '{name}'")
        );
        // The next document continues the version sequence.
        let (_, again) = d
            .request(
                &format!("{base}/update"),
                r#"{"state":{"reported":{"on":true}}}"#,
            )
            .await;
        assert_eq!(again["version"], 3);
    }
}

#[tokio::test]
async fn desired_state_set_by_the_platform_reaches_the_device_as_a_delta() {
    let s = server().await;
    for proto in BOTH {
        let name = format!("pump-{proto:?}");
        let mut d = device(&s, proto, &name).await;
        assert_eq!(
            d.subscribe(&format!("{}/update/delta", shadow(&name)))
                .await,
            1
        );
        let req = UpdateRequest::parse(br#"{"state":{"desired":{"speed":3}}}"#, &Limits::default())
            .unwrap();
        s.fleet
            .shadows()
            .update(&id(&name), ShadowName::classic(), req, Origin::Device)
            .await
            .unwrap();
        let (topic, delta) = d.message().await;
        assert_eq!(topic, format!("{}/update/delta", shadow(&name)));
        assert_eq!(delta["state"], json!({"speed": 3}));
    }
}

#[tokio::test]
async fn named_shadows_are_separate_documents() {
    let s = server().await;
    let mut d = device(&s, Proto::V5, "multi").await;
    let named = format!("{}/name/config", shadow("multi"));
    assert_eq!(d.subscribe(&format!("{}/#", shadow("multi"))).await, 1);
    let (ch, a) = d
        .request(
            &format!("{named}/update"),
            r#"{"state":{"reported":{"rate":5}}}"#,
        )
        .await;
    assert_eq!((ch.as_str(), a["version"].as_u64()), ("accepted", Some(1)));
    let (ch, classic) = d.request(&format!("{}/get", shadow("multi")), "").await;
    assert_eq!(
        (ch.as_str(), classic["code"].as_u64()),
        ("rejected", Some(404))
    );
    let (ch, got) = d.request(&format!("{named}/get"), "").await;
    assert_eq!(ch, "accepted");
    assert_eq!(got["state"]["reported"], json!({"rate": 5}));
}

#[tokio::test]
async fn bad_requests_are_rejected_with_aws_codes_and_change_nothing() {
    let s = server().await;
    for proto in BOTH {
        let name = format!("strict-{proto:?}");
        let base = format!("{}/update", shadow(&name));
        let mut d = device(&s, proto, &name).await;
        assert_eq!(d.subscribe(&format!("{}/#", shadow(&name))).await, 1);
        let (_, ok) = d.request(&base, r#"{"state":{"reported":{"a":1}}}"#).await;
        assert_eq!(ok["version"], 1);

        let (ch, r) = d
            .request(
                &base,
                r#"{"state":{"reported":{"a":2}},"version":7,"clientToken":"old"}"#,
            )
            .await;
        assert_eq!(
            (ch.as_str(), r["code"].as_u64(), r["message"].as_str()),
            ("rejected", Some(409), Some("Version conflict"))
        );
        assert_eq!(r["clientToken"], "old");

        let big = json!({"state": {"reported": {"blob": "x".repeat(9000)}}}).to_string();
        let (ch, r) = d.request(&base, &big).await;
        assert_eq!((ch.as_str(), r["code"].as_u64()), ("rejected", Some(413)));

        let (ch, r) = d.request(&base, "{not json").await;
        assert_eq!(
            (ch.as_str(), r["code"].as_u64(), r["message"].as_str()),
            ("rejected", Some(400), Some("Invalid JSON"))
        );

        let (ch, r) = d
            .request(&base, r#"{"state":{"reported":{"a":3}},"version":1}"#)
            .await;
        assert_eq!(
            (ch.as_str(), r["version"].as_u64()),
            ("accepted", Some(2)),
            "nothing changed in between: {r}"
        );
    }
}

#[tokio::test]
async fn a_device_cannot_touch_another_devices_topics() {
    let s = server().await;
    s.register("victim").await;

    // MQTT 3.1.1: SUBACK 0x80, and a forbidden PUBLISH ends the connection.
    let mut d4 = device(&s, Proto::V4, "intruder-4").await;
    assert_eq!(
        d4.subscribe(&format!("{}/update/delta", shadow("victim")))
            .await,
        0x80
    );
    assert_eq!(d4.subscribe("$aws/things/+/shadow/#").await, 0x80);
    assert_eq!(d4.subscribe("#").await, 0x80);
    d4.publish(
        &format!("{}/update", shadow("victim")),
        r#"{"state":{"desired":{"x":1}}}"#,
    )
    .await;
    assert_eq!(d4.closed().await, None);

    // MQTT 5: SUBACK 0x87, PUBACK 0x87, and the connection stays usable.
    let mut d5 = device(&s, Proto::V5, "intruder-5").await;
    assert_eq!(
        d5.subscribe(&format!("{}/update/delta", shadow("victim")))
            .await,
        0x87
    );
    d5.publish(
        &format!("{}/update", shadow("victim")),
        r#"{"state":{"desired":{"x":1}}}"#,
    )
    .await;
    assert_eq!(d5.next().await, Ev::PubAck { code: 0x87 });
    assert_eq!(
        d5.subscribe(&format!("{}/#", shadow("intruder-5"))).await,
        1
    );
    let (ch, _) = d5
        .request(
            &format!("{}/update", shadow("intruder-5")),
            r#"{"state":{"reported":{"ok":1}}}"#,
        )
        .await;
    assert_eq!(ch, "accepted");

    // The victim's shadow was never written.
    let err = s
        .fleet
        .shadows()
        .get(&id("victim"), ShadowName::classic())
        .await
        .unwrap_err();
    assert_eq!(err.to_rejection().code(), 404);
}

#[tokio::test]
async fn a_client_id_in_a_reconnect_loop_gets_quota_exceeded() {
    let s = server_with(
        FleetConfig::default(),
        GatewayConfig {
            max_connects_per_second: 1,
            ..GatewayConfig::default()
        },
    )
    .await;
    let secret = s.register("looping").await;
    let burst = twin_gateway::CONNECT_BURST;
    for (proto, refused) in [(Proto::V5, 0x97), (Proto::V4, 3)] {
        let id = format!("looping-{proto:?}");
        // Each attempt counts, refused or not: a device in a loop is stopped before its
        // twin is asked.
        for n in 0..burst {
            let attempt = Device::connect(s.addr, proto, &id, Some("wrong"), Opts::default()).await;
            assert!(attempt.is_err(), "attempt {n} gets the twin's answer");
            assert_ne!(
                attempt.err(),
                Some(refused),
                "attempt {n} is within the burst"
            );
        }
        let over = Device::connect(s.addr, proto, &id, Some("wrong"), Opts::default()).await;
        assert_eq!(
            over.err(),
            Some(refused),
            "{proto:?}: the connect after the burst"
        );
    }
    let other = Device::connect(s.addr, Proto::V5, "looping", Some(&secret), Opts::default()).await;
    assert!(other.is_ok(), "another client id has its own budget");
}

#[tokio::test]
async fn wrong_credentials_get_a_not_authorized_connack() {
    let s = server().await;
    s.register("known").await;
    for (proto, not_authorized) in [(Proto::V4, 5), (Proto::V5, 0x87)] {
        let wrong = Device::connect(
            s.addr,
            proto,
            "known",
            Some("not-the-secret"),
            Opts::default(),
        )
        .await;
        assert_eq!(wrong.err(), Some(not_authorized));
        let none = Device::connect(s.addr, proto, "known", None, Opts::default()).await;
        assert_eq!(none.err(), Some(not_authorized));
        let unknown = Device::connect(s.addr, proto, "stranger", Some("x"), Opts::default()).await;
        assert_eq!(unknown.err(), Some(not_authorized));
    }
    let bad_id = Device::connect(s.addr, Proto::V4, "has/slash", Some("x"), Opts::default()).await;
    assert_eq!(bad_id.err(), Some(2));
    let bad_id = Device::connect(s.addr, Proto::V5, "has space", Some("x"), Opts::default()).await;
    assert_eq!(bad_id.err(), Some(0x85));
}

#[tokio::test]
async fn a_disabled_device_is_disconnected_and_refused() {
    let s = server().await;
    for (proto, refused) in [(Proto::V4, 5), (Proto::V5, 0x8A)] {
        let name = format!("rogue-{proto:?}");
        let secret = s.register(&name).await;
        let mut d = Device::connect(s.addr, proto, &name, Some(&secret), Opts::default())
            .await
            .unwrap();
        s.fleet
            .registry()
            .set_enabled(&id(&name), false)
            .await
            .unwrap();
        let reason = d.closed().await;
        if proto == Proto::V5 {
            assert_eq!(reason, Some(0x87));
        }
        assert_eq!(
            Device::connect(s.addr, proto, &name, Some(&secret), Opts::default())
                .await
                .err(),
            Some(refused)
        );
        s.fleet
            .registry()
            .set_enabled(&id(&name), true)
            .await
            .unwrap();
        assert!(
            Device::connect(s.addr, proto, &name, Some(&secret), Opts::default())
                .await
                .is_ok()
        );
    }
}

#[tokio::test]
async fn a_silent_client_is_closed_after_one_and_a_half_keep_alives() {
    let s = server().await;
    let secret = s.register("sleepy").await;
    let mut events = s.fleet.queries().subscribe();
    // A raw client that never pings: CONNECT with keep-alive 1 s, then silence.
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut connect = rumqttc::mqttbytes::v4::Connect::new("sleepy");
    connect.keep_alive = 1;
    connect.set_login("device", secret);
    let mut buf = bytes::BytesMut::new();
    connect.write(&mut buf).unwrap();
    sock.write_all(&buf).await.unwrap();
    let mut connack = [0u8; 4];
    sock.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, sock.read_to_end(&mut rest))
        .await
        .expect("the server closes a silent client")
        .unwrap();
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "closed before 1.5 x keep-alive: {:?}",
        started.elapsed()
    );
    loop {
        let e = tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap();
        if let TwinEvent::Connectivity { connectivity, .. } = &*e.event
            && !connectivity.connected
        {
            assert_eq!(
                connectivity.disconnect_reason.as_deref(),
                Some("keep-alive timeout")
            );
            break;
        }
    }
}

#[tokio::test]
async fn a_second_connection_takes_the_session_over() {
    let s = server().await;
    for proto in BOTH {
        let name = format!("twin-{proto:?}");
        let secret = s.register(&name).await;
        let mut first = Device::connect(s.addr, proto, &name, Some(&secret), Opts::default())
            .await
            .unwrap();
        let mut second = Device::connect(s.addr, proto, &name, Some(&secret), Opts::default())
            .await
            .unwrap();
        let reason = first.closed().await;
        if proto == Proto::V5 {
            assert_eq!(reason, Some(0x8E), "session taken over");
        }
        assert_eq!(second.subscribe(&format!("{}/#", shadow(&name))).await, 1);
        let (ch, _) = second
            .request(
                &format!("{}/update", shadow(&name)),
                r#"{"state":{"reported":{"v":1}}}"#,
            )
            .await;
        assert_eq!(ch, "accepted");
        let presence = s.fleet.store().load(&id(&name)).await.unwrap().connectivity;
        assert!(
            presence.connected,
            "the old connection's end must not mark the device offline"
        );
    }
}

#[tokio::test]
async fn a_persistent_session_gets_what_was_sent_while_it_was_away() {
    let s = server().await;
    for proto in BOTH {
        let name = format!("roamer-{proto:?}");
        let secret = s.register(&name).await;
        let opts = Opts {
            persistent: true,
            ..Opts::default()
        };
        let mut d = Device::connect(s.addr, proto, &name, Some(&secret), opts.clone())
            .await
            .unwrap();
        assert!(!d.session_present);
        assert_eq!(
            d.subscribe(&format!("{}/update/delta", shadow(&name)))
                .await,
            1
        );
        d.disconnect().await;

        let req = UpdateRequest::parse(
            br#"{"state":{"desired":{"mode":"eco"}}}"#,
            &Limits::default(),
        )
        .unwrap();
        s.fleet
            .shadows()
            .update(&id(&name), ShadowName::classic(), req, Origin::Device)
            .await
            .unwrap();

        let mut back = Device::connect(s.addr, proto, &name, Some(&secret), opts.clone())
            .await
            .unwrap();
        assert!(back.session_present);
        let (topic, delta) = back.message().await;
        assert_eq!(topic, format!("{}/update/delta", shadow(&name)));
        assert_eq!(delta["state"], json!({"mode": "eco"}));

        // A clean session starts over: no subscriptions, nothing stored.
        back.disconnect().await;
        let clean = Device::connect(s.addr, proto, &name, Some(&secret), Opts::default())
            .await
            .unwrap();
        assert!(!clean.session_present);
    }
}

#[tokio::test]
async fn the_last_will_is_applied_when_a_device_vanishes() {
    let s = server().await;
    let secret = s.register("flaky").await;
    let mut events = s.fleet.queries().subscribe();
    let opts = Opts {
        will: Some((
            format!("{}/update", shadow("flaky")),
            r#"{"state":{"reported":{"online":false}}}"#.into(),
        )),
        ..Opts::default()
    };
    let d = Device::connect(s.addr, Proto::V4, "flaky", Some(&secret), opts)
        .await
        .unwrap();
    drop(d); // The socket closes without DISCONNECT.
    loop {
        let e = tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap();
        if let TwinEvent::Shadow { current, .. } = &*e.event {
            assert_eq!(current.reported.as_ref().unwrap()["online"], json!(false));
            break;
        }
    }
    let will_elsewhere = Opts {
        will: Some((format!("{}/update", shadow("someone-else")), "{}".into())),
        ..Opts::default()
    };
    assert_eq!(
        Device::connect(s.addr, Proto::V5, "flaky", Some(&secret), will_elsewhere)
            .await
            .err(),
        Some(0x87)
    );
}

#[tokio::test]
async fn qos_2_is_refused_as_documented() {
    let s = server().await;
    let mut d = device(&s, Proto::V5, "q2").await;
    assert_eq!(
        d.subscribe(&format!("{}/#", shadow("q2"))).await,
        1,
        "QoS 1 granted"
    );
    d.publish_qos(
        &format!("{}/update", shadow("q2")),
        2,
        r#"{"state":{"reported":{"a":1}}}"#,
    )
    .await;
    assert_eq!(d.closed().await, Some(0x9B));
}

#[tokio::test]
async fn too_many_requests_in_flight_get_429() {
    use rumqttc::mqttbytes::{QoS, v4};
    let s = server_with(
        FleetConfig::default(),
        GatewayConfig {
            max_inflight_requests: 1,
            ..GatewayConfig::default()
        },
    )
    .await;
    let secret = s.register("busy").await;
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut out = bytes::BytesMut::new();
    let mut connect = v4::Connect::new("busy");
    connect.set_login("busy", secret);
    connect.write(&mut out).unwrap();
    let mut sub = v4::Subscribe::new(format!("{}/update/+", shadow("busy")), QoS::AtLeastOnce);
    sub.pkid = 1;
    sub.write(&mut out).unwrap();
    sock.write_all(&out).await.unwrap();
    let mut inbuf = bytes::BytesMut::new();
    assert!(matches!(
        next_v4(&mut sock, &mut inbuf).await,
        v4::Packet::ConnAck(_)
    ));
    assert!(matches!(
        next_v4(&mut sock, &mut inbuf).await,
        v4::Packet::SubAck(_)
    ));
    // Twenty requests in one write: the endpoint reads them together, before any answer.
    let mut burst = bytes::BytesMut::new();
    for i in 0..20u16 {
        let body = format!(r#"{{"state":{{"reported":{{"i":{i}}}}},"clientToken":"t{i}"}}"#);
        let mut p = v4::Publish::new(format!("{}/update", shadow("busy")), QoS::AtLeastOnce, body);
        p.pkid = i + 2;
        p.write(&mut burst).unwrap();
    }
    sock.write_all(&burst).await.unwrap();
    let (mut accepted, mut throttled) = (0, 0);
    let mut acked = std::collections::BTreeSet::new();
    while accepted + throttled < 20 || acked.len() < 20 {
        match next_v4(&mut sock, &mut inbuf).await {
            v4::Packet::Publish(p) => {
                let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                if p.topic.ends_with("/update/accepted") {
                    accepted += 1;
                } else if p.topic.ends_with("/update/rejected") {
                    assert_eq!(body["code"], 429, "{body}");
                    throttled += 1;
                }
            }
            v4::Packet::PubAck(a) => {
                assert!(acked.insert(a.pkid), "a second PUBACK for {}", a.pkid)
            }
            _ => {}
        }
    }
    assert_eq!(
        acked,
        (2..22).collect(),
        "every request is acknowledged once"
    );
    assert!(
        accepted >= 1 && throttled >= 1,
        "accepted {accepted}, throttled {throttled}"
    );
}

#[tokio::test]
async fn a_packet_over_the_maximum_size_ends_the_connection() {
    let s = server_with(
        FleetConfig::default(),
        GatewayConfig {
            max_packet_size: 1024,
            ..GatewayConfig::default()
        },
    )
    .await;
    let mut d = device(&s, Proto::V4, "chatty").await;
    assert_eq!(d.subscribe(&format!("{}/#", shadow("chatty"))).await, 1);
    let (ch, _) = d
        .request(
            &format!("{}/update", shadow("chatty")),
            r#"{"state":{"reported":{"small":true}}}"#,
        )
        .await;
    assert_eq!(ch, "accepted", "a packet under the limit is served");
    let big = json!({"state": {"reported": {"blob": "x".repeat(2000)}}}).to_string();
    d.publish(&format!("{}/update", shadow("chatty")), big)
        .await;
    assert_eq!(d.closed().await, None, "closed without an answer");
    let shadow_now = s
        .fleet
        .shadows()
        .get(&id("chatty"), ShadowName::classic())
        .await
        .unwrap();
    assert_eq!(
        shadow_now.version, 1,
        "the oversized update changed nothing"
    );
}

/// An MQTT 5 CONNECT with a password, byte for byte (rumqttc refuses to send what the
/// tests below need to send).
fn raw_v5_connect(id: &str, password: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0b1100_0010, 0, 60, 0];
    for field in [id, id, password] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    with_fixed_header(0x10, body)
}

/// An MQTT 5 QoS 1 PUBLISH with packet id 1 and no properties.
fn raw_v5_publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&[0, 1, 0]);
    body.extend_from_slice(payload);
    with_fixed_header(0x32, body)
}

fn with_fixed_header(first: u8, body: Vec<u8>) -> Vec<u8> {
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![first, body.len() as u8];
    packet.extend(body);
    packet
}

#[tokio::test]
async fn an_mqtt_5_publish_to_a_wildcard_topic_ends_the_connection_with_0x90() {
    let s = server().await;
    let secret = s.register("wild").await;
    for topic in ["$aws/things/wild/shadow/+", "$aws/things/wild/#"] {
        let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        sock.write_all(&raw_v5_connect("wild", &secret))
            .await
            .unwrap();
        sock.write_all(&raw_v5_publish(topic, b"{}")).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, sock.read_to_end(&mut got))
            .await
            .expect("the server closes the connection")
            .unwrap();
        // CONNACK (0x20, success), then DISCONNECT (0xE0) with reason 0x90, no PUBACK.
        assert_eq!(&got[..4], &[0x20, got[1], 0, 0], "{got:x?}");
        let rest = &got[2 + got[1] as usize..];
        assert_eq!(rest[0], 0xE0, "DISCONNECT, not a PUBACK: {got:x?}");
        assert_eq!(rest[2], 0x90, "Topic Name invalid: {got:x?}");
    }
}

#[tokio::test]
async fn a_request_for_a_shadow_name_over_64_characters_is_rejected_with_400() {
    let s = server().await;
    for proto in BOTH {
        let id = format!("longname-{proto:?}");
        let mut d = device(&s, proto, &id).await;
        assert_eq!(d.subscribe(&format!("{}/#", shadow(&id))).await, 1);
        let long = "n".repeat(65);
        let (ch, answer) = d
            .request(
                &format!("{}/name/{long}/update", shadow(&id)),
                r#"{"state":{"reported":{"a":1}}}"#,
            )
            .await;
        assert_eq!(ch, "rejected", "{answer}");
        assert_eq!(answer["code"], 400, "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains("65 characters long; the limit is 64"),
            "{message}"
        );
        // A name at the limit works.
        let (ch, _) = d
            .request(
                &format!("{}/name/{}/update", shadow(&id), "n".repeat(64)),
                r#"{"state":{"reported":{"a":1}}}"#,
            )
            .await;
        assert_eq!(ch, "accepted");
    }
}
