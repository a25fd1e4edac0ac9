//! Device telemetry through the MQTT endpoint: the policy (a device publishes telemetry
//! only as itself and reads nobody's), the PUBACK that waits for durability, and the
//! latest values, filter and series a reading leaves behind.

mod common;

use common::{Device, Ev, Proto, Server, device, id, server};
use twin_model::Filter;
use twin_model::telemetry::Series;

/// The next PUBACK's reason code (0 on MQTT 3.1.1).
async fn puback(d: &mut Device) -> u8 {
    loop {
        match d.next().await {
            Ev::PubAck { code } => return code,
            Ev::Msg { .. } | Ev::SubAck(_) => {}
            other => panic!("no PUBACK: {other:?}"),
        }
    }
}

/// The thing's latest telemetry as `key=value` pairs.
fn latest(s: &Server, thing: &str) -> Vec<String> {
    s.fleet
        .queries()
        .thing(&id(thing))
        .unwrap()
        .telemetry
        .iter()
        .map(|(k, v)| format!("{k}={}", v.value))
        .collect()
}

#[tokio::test]
async fn a_device_publishes_telemetry_only_as_itself_and_reads_nobodys() {
    let s = server().await;
    s.register("victim").await;

    // MQTT 5: PUBACK 0x87 for telemetry as another thing; the connection goes on.
    let mut d5 = device(&s, Proto::V5, "sensor-5").await;
    d5.publish("dt/plant/victim/env", r#"{"temp": 99}"#).await;
    assert_eq!(puback(&mut d5).await, 0x87);
    assert_eq!(d5.subscribe("dt/plant/victim/env").await, 0x87);
    assert_eq!(d5.subscribe("dt/+/+/env").await, 0x87);
    assert_eq!(
        d5.subscribe("dt/plant/sensor-5/env").await,
        0x87,
        "telemetry goes to the platform, not to devices"
    );
    d5.publish("dt/plant/sensor-5/env", r#"{"temp": 21}"#).await;
    assert_eq!(puback(&mut d5).await, 0);

    // MQTT 3.1.1: such a publish ends the connection.
    let mut d4 = device(&s, Proto::V4, "sensor-4").await;
    d4.publish("dt/plant/victim/env", r#"{"temp": 99}"#).await;
    assert_eq!(d4.closed().await, None);

    assert!(
        latest(&s, "victim").is_empty(),
        "nothing was kept for the victim"
    );
    assert_eq!(latest(&s, "sensor-5"), ["temp=21"]);
}

#[tokio::test]
async fn telemetry_is_acknowledged_once_kept_and_can_be_filtered_and_bucketed() {
    let s = server().await;
    let mut d = device(&s, Proto::V5, "boiler-1").await;
    let now = twin_store::now_millis();
    let minute_ago = now - 60_000;
    d.publish(
        "dt/plant/boiler-1/env",
        format!(
            r#"{{"temp": 35.5, "gps": {{"lat": 48.1}}, "mode": "eco", "timestamp": {minute_ago}}}"#
        ),
    )
    .await;
    // The PUBACK comes once the reading is durable and in the index: no waiting here.
    assert_eq!(puback(&mut d).await, 0);
    assert_eq!(
        latest(&s, "boiler-1"),
        ["gps.lat=48.1", "mode=\"eco\"", "temp=35.5"]
    );
    d.publish("dt/plant/boiler-1/env", r#"{"temp": 41.5, "mode": null}"#)
        .await;
    assert_eq!(puback(&mut d).await, 0);
    assert_eq!(
        latest(&s, "boiler-1"),
        ["gps.lat=48.1", "temp=41.5"],
        "null forgets a key"
    );

    let hot = Filter::parse("telemetry.temp > 40 AND telemetry.gps.lat < 48.5").unwrap();
    let page = s.fleet.queries().query(Some(&hot), None, 10);
    assert_eq!(page.total, 1);
    let cold = Filter::parse("telemetry.temp < 40").unwrap();
    assert_eq!(s.fleet.queries().query(Some(&cold), None, 10).total, 0);

    let series = s
        .fleet
        .telemetry()
        .series(
            &id("boiler-1"),
            "temp",
            Series::new(now - 120_000, now + 60_000, 60_000).unwrap(),
        )
        .await
        .unwrap()
        .buckets();
    let counts: Vec<u64> = series.iter().map(|b| b.count).collect();
    assert_eq!(counts, [0, 1, 1], "a minute ago, and now");
    assert_eq!(series.iter().map(|b| b.sum).sum::<f64>(), 35.5 + 41.5);

    // Bad payloads: PUBACK 0x99, nothing kept.
    for bad in [
        "not json",
        "[1, 2]",
        "{}",
        r#"{"timestamp": "yesterday", "t": 1}"#,
    ] {
        d.publish("dt/plant/boiler-1/env", bad).await;
        assert_eq!(puback(&mut d).await, 0x99, "{bad}");
    }
    // Basic Ingest to a route that does not exist: PUBACK 0x90.
    d.publish("$aws/rules/nosuch/boiler-1", r#"{"temp": 1}"#)
        .await;
    assert_eq!(puback(&mut d).await, 0x90);
    assert_eq!(latest(&s, "boiler-1"), ["gps.lat=48.1", "temp=41.5"]);
}
