//! Routes: which events twins put in the outbox, with what.

use twin_model::route::EventType;
use twin_store::routes::Destination;

use super::*;
use crate::services::RouteSpec;

fn spec(events: &[EventType], filter: Option<&str>) -> RouteSpec {
    RouteSpec {
        name: Some("r".into()),
        events: Some(events.to_vec()),
        filter: Some(filter.map(str::to_owned)),
        destination: Some(Destination::Webhook {
            url: "https://example.com/hook".into(),
            timeout_secs: 15,
        }),
    }
}

async fn update(fleet: &FleetHandle, thing: &str, n: i64) {
    fleet
        .shadows()
        .update(
            &id(thing),
            ShadowName::classic(),
            reported(n),
            Origin::Device,
        )
        .await
        .unwrap();
}

/// (thing, seq, type, routes) of every outbox event.
async fn outbox(fleet: &FleetHandle) -> Vec<(String, u64, EventType, Vec<String>)> {
    fleet
        .store()
        .outbox(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, e)| (e.thing.to_string(), e.seq, e.kind, e.routes))
        .collect()
}

#[tokio::test]
async fn events_are_written_for_the_routes_whose_filter_matches_right_after() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, commits) = fleet_in(dir.path(), &FleetConfig::default()).await;
    let secret = fleet
        .registry()
        .register(&id("t1"), Default::default())
        .await
        .unwrap();
    registered(&fleet, &["t2"]).await;
    // No route: nothing is written.
    update(&fleet, "t1", 1).await;
    assert!(outbox(&fleet).await.is_empty());

    let (all, signing) = fleet
        .routes()
        .create(spec(&[EventType::ShadowChanged], None))
        .await
        .unwrap();
    assert!(signing.starts_with("whsec_"), "{signing}");
    let (hot, _) = fleet
        .routes()
        .create(spec(
            &[EventType::ShadowChanged, EventType::ConnectivityChanged],
            Some("reported.n > 5"),
        ))
        .await
        .unwrap();
    update(&fleet, "t1", 3).await;
    // The filter sees the state after the change: 7 matches, though the state before did not.
    update(&fleet, "t1", 7).await;
    update(&fleet, "t2", 9).await;
    // Presence goes only to the route that takes it (t1 has n > 5); a changed record to
    // none.
    fleet
        .sessions()
        .connect(&id("t1"), Some(secret))
        .await
        .unwrap();
    fleet
        .registry()
        .apply(&id("t2"), RegistryOp::MergeAttributes(Default::default()))
        .await
        .unwrap();
    let events = outbox(&fleet).await;
    let (a, h) = (all.id.clone(), hot.id.clone());
    assert_eq!(
        events,
        vec![
            ("t1".into(), 1, EventType::ShadowChanged, vec![a.clone()]),
            (
                "t1".into(),
                2,
                EventType::ShadowChanged,
                vec![a.clone(), h.clone()]
            ),
            (
                "t2".into(),
                1,
                EventType::ShadowChanged,
                vec![a.clone(), h.clone()]
            ),
            (
                "t1".into(),
                3,
                EventType::ConnectivityChanged,
                vec![h.clone()]
            ),
        ]
    );

    // Numbers go on after a restart, from the store; a deleted route takes no more.
    stop(fleet, commits).await;
    let (fleet, _commits) = fleet_in(dir.path(), &FleetConfig::default()).await;
    assert_eq!(fleet.routes().list().len(), 2);
    assert!(fleet.routes().delete(&h).await.unwrap());
    update(&fleet, "t1", 8).await;
    let last = outbox(&fleet).await.pop().unwrap();
    assert_eq!(last, ("t1".into(), 4, EventType::ShadowChanged, vec![a]));
}

#[tokio::test]
async fn bad_routes_are_refused_with_the_reason() {
    let f = fleet(FleetConfig::default()).await;
    let refused = |spec: RouteSpec| {
        let fleet = f.fleet.clone();
        async move {
            match fleet.routes().create(spec).await.unwrap_err() {
                FleetError::Rejected(r) => {
                    assert_eq!(r.kind, RejectionKind::BadRequest);
                    r.message
                }
                other => panic!("{other:?}"),
            }
        }
    };
    let m = refused(spec(&[], None)).await;
    assert!(m.contains("at least one event type"), "{m}");
    let m = refused(spec(&[EventType::ShadowChanged], Some("reported.n >"))).await;
    assert!(m.contains("filter"), "{m}");
    for (url, why) in [
        ("http://10.0.0.1/hook", "webhook_allowed_networks"),
        ("http://169.254.169.254/latest", "webhook_allowed_networks"),
        ("http://localhost:8080/", "webhook_allowed_networks"),
        ("ftp://example.com/", "http:// or https://"),
        ("https://user:pw@example.com/", "credentials"),
        ("not a url", "does not parse"),
    ] {
        let mut s = spec(&[EventType::ShadowChanged], None);
        s.destination = Some(Destination::Webhook {
            url: url.into(),
            timeout_secs: 15,
        });
        let m = refused(s).await;
        assert!(m.contains(why), "{url}: {m}");
    }
    let redis = |url: &str, stream: &str, max_len| Destination::RedisStream {
        url: url.into(),
        stream: stream.into(),
        max_len,
    };
    let kafka = |brokers: &str, topic: &str| Destination::Kafka {
        brokers: brokers.into(),
        topic: topic.into(),
    };
    for (destination, why) in [
        (redis("http://r:6379", "s", 10), "redis:// or rediss://"),
        (redis("redis://r:6379/x", "s", 10), "database number"),
        (redis("redis://", "s", 10), "names a host"),
        (redis("no url", "s", 10), "does not parse"),
        (redis("redis://r", "", 10), "stream's name"),
        (redis("redis://r", "a\nb", 10), "stream's name"),
        (redis("redis://r", "s", 0), "maxLength is 1 to"),
        (kafka("k1", "t"), "host:port"),
        (kafka("k1:0", "t"), "host:port"),
        (kafka("k1:9092,", "t"), "host:port"),
        (kafka("k1:9092", "a b"), "Kafka topic"),
        (kafka("k1:9092", ".."), "Kafka topic"),
        (kafka("k1:9092", &"t".repeat(250)), "Kafka topic"),
    ] {
        let mut s = spec(&[EventType::ShadowChanged], None);
        s.destination = Some(destination.clone());
        let m = refused(s).await;
        assert!(m.contains(why), "{destination:?}: {m}");
    }
    assert!(f.fleet.routes().list().is_empty());
    // Redis and Kafka are the operator's own: private addresses are fine.
    for destination in [
        redis("rediss://:pw@10.0.0.5:6380/2", "doppel:events", 1000),
        kafka("10.0.0.7:9092, kafka-2.internal:9093", "doppel.events_v1"),
    ] {
        let mut s = spec(&[EventType::ShadowChanged], None);
        s.destination = Some(destination);
        f.fleet.routes().create(s).await.unwrap();
    }

    // Allowed networks let a private destination through.
    let allowed = FleetConfig {
        webhook_allowed_networks: vec!["127.0.0.0/8".parse().unwrap()],
        ..FleetConfig::default()
    };
    let g = fleet(allowed).await;
    let mut s = spec(&[EventType::ShadowChanged], None);
    s.destination = Some(Destination::Webhook {
        url: "http://127.0.0.1:9/hook".into(),
        timeout_secs: 15,
    });
    g.fleet.routes().create(s).await.unwrap();
}

/// A reading sent to the twin, as the gateway sends it.
async fn telemetry(fleet: &FleetHandle, thing: &str, body: &str, route: Option<&str>) {
    let reading =
        twin_model::telemetry::Reading::parse(body.as_bytes(), twin_store::now_millis(), 6)
            .unwrap();
    fleet
        .telemetry()
        .record(
            &id(thing),
            crate::TelemetryMessage {
                reading,
                topic: format!("dt/app/{thing}/env"),
                kind: Some("env".into()),
                route: route.map(str::to_owned),
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn telemetry_goes_to_the_routes_that_take_it_and_basic_ingest_to_the_named_one_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _commits) = fleet_in(dir.path(), &FleetConfig::default()).await;
    registered(&fleet, &["t1"]).await;
    let (shadows, _) = fleet
        .routes()
        .create(RouteSpec {
            name: Some("ingest".into()),
            ..spec(&[EventType::ShadowChanged], None)
        })
        .await
        .unwrap();
    let (hot, _) = fleet
        .routes()
        .create(spec(&[EventType::Telemetry], Some("telemetry.temp > 30")))
        .await
        .unwrap();
    // The filter sees the reading's values: 25 is not hot, 35 is.
    telemetry(&fleet, "t1", r#"{"temp": 25}"#, None).await;
    telemetry(&fleet, "t1", r#"{"temp": 35}"#, None).await;
    // Basic Ingest: to the route named "ingest" alone, though it takes shadow changes only
    // and the hot route's filter matches.
    telemetry(&fleet, "t1", r#"{"temp": 40}"#, Some("ingest")).await;
    let events = outbox(&fleet).await;
    assert_eq!(
        events,
        vec![
            ("t1".into(), 1, EventType::Telemetry, vec![hot.id.clone()]),
            (
                "t1".into(),
                2,
                EventType::Telemetry,
                vec![shadows.id.clone()]
            ),
        ]
    );
    let err = fleet
        .telemetry()
        .record(
            &id("t1"),
            crate::TelemetryMessage {
                reading: twin_model::telemetry::Reading::parse(
                    b"{\"t\": 1}",
                    twin_store::now_millis(),
                    6,
                )
                .unwrap(),
                topic: "$aws/rules/nosuch/x".into(),
                kind: None,
                route: Some("nosuch".into()),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), twin_model::RejectionKind::NotFound, "{err}");
    assert_eq!(
        fleet
            .queries()
            .thing(&id("t1"))
            .unwrap()
            .telemetry
            .iter()
            .count(),
        1,
        "the refused reading changed nothing"
    );
}
