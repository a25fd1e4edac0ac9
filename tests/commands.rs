//! Commands end to end: a GraphQL operator, the real `doppel serve`, a real MQTT device
//! (rumqttc) on the AWS IoT commands topics, and a `commandUpdated` subscriber.

mod common;

use common::{WAIT, client_on, graphql, register, start, ws_as};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::{Value, json};

const SEND: &str = "mutation($t: ID!, $p: JSON, $timeout: Int) { sendCommand(thingId: $t, name: \"reboot\", payload: $p, timeoutSeconds: $timeout) { executionId status } }";
const UPDATE: &str = "__typename ... on CommandExecution { executionId status deliveredAt statusReason { reasonCode } result } ... on Lagged { skipped }";

/// A device on the commands topics, as the AWS IoT Device SDK's commands sample.
async fn device(addr: &str, thing: &str, secret: &str) -> (AsyncClient, EventLoop) {
    let requests = format!("$aws/commands/things/{thing}/executions/+/request/#");
    let answers = format!("$aws/commands/things/{thing}/executions/+/response/+/json");
    // The request topics last: a command waiting for the device is sent as soon as it
    // subscribes there, and `client_on` passes over what comes before its last SUBACK.
    client_on(addr, thing, Some(secret), &[&answers, &requests]).await
}

/// A `commandUpdated` subscriber for `thing`, live.
async fn watch(server: &common::Server, token: &str, thing: &str) -> common::Ws {
    let mut watcher = ws_as(&server.http, token, None).await;
    let query = format!(r#"subscription {{ commandUpdated(thingId: "{thing}") {{ {UPDATE} }} }}"#);
    watcher.subscribe("1", &query).await;
    watcher
}

/// The next publish the device receives: (topic, JSON payload).
async fn received(el: &mut EventLoop) -> (String, Value) {
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    return (p.topic.clone(), serde_json::from_slice(&p.payload).unwrap());
                }
                Ok(_) => {}
                Err(e) => panic!("device connection failed: {e}"),
            }
        }
    })
    .await
    .expect("a message for the device")
}

async fn respond(c: &AsyncClient, thing: &str, id: &str, body: Value) {
    c.publish(
        format!("$aws/commands/things/{thing}/executions/{id}/response/json"),
        QoS::AtLeastOnce,
        false,
        body.to_string(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_command_reaches_an_offline_device_when_it_connects_and_runs_to_success() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let admin = server.admin_token.clone().unwrap();
    let secret = register(&server.http, &admin, "pump-7", json!({})).await;
    let mut watcher = watch(&server, &admin, "pump-7").await;

    // The device is offline: the command waits.
    let r = graphql(
        &server.http,
        Some(&admin),
        SEND,
        json!({"t": "pump-7", "p": {"delay": 5}}),
    )
    .await
    .json();
    let id = r["data"]["sendCommand"]["executionId"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_owned();
    assert_eq!(r["data"]["sendCommand"]["status"], "CREATED");
    let e = watcher.data().await;
    assert_eq!(e["commandUpdated"]["status"], "CREATED");
    assert!(e["commandUpdated"]["deliveredAt"].is_null());

    // It connects and subscribes: the request arrives with the payload as sent.
    let (c, mut el) = device(&server.mqtt, "pump-7", &secret).await;
    let (topic, payload) = received(&mut el).await;
    assert_eq!(
        topic,
        format!("$aws/commands/things/pump-7/executions/{id}/request/json")
    );
    assert_eq!(payload, json!({"delay": 5}));
    assert!(watcher.data().await["commandUpdated"]["deliveredAt"].is_string());

    // It works on it, then succeeds; each answer is accepted.
    for status in ["IN_PROGRESS", "SUCCEEDED"] {
        respond(
            &c,
            "pump-7",
            &id,
            json!({"status": status, "result": {"uptime": {"s": "1"}}}),
        )
        .await;
        let (topic, accepted) = received(&mut el).await;
        assert!(topic.ends_with("/response/accepted/json"), "{topic}");
        assert_eq!(accepted["executionId"], id.as_str());
        assert_eq!(accepted["status"], status);
        assert_eq!(watcher.data().await["commandUpdated"]["status"], status);
    }
    // Too late, and malformed: rejected with the AWS error codes.
    respond(&c, "pump-7", &id, json!({"status": "FAILED"})).await;
    let (topic, rejected) = received(&mut el).await;
    assert!(topic.ends_with("/response/rejected/json"), "{topic}");
    assert_eq!(rejected["error"], "TerminalStateReached");
    respond(&c, "pump-7", &id, json!({"status": "DONE"})).await;
    assert_eq!(received(&mut el).await.1["error"], "InvalidRequest");
    respond(&c, "pump-7", "unknown-1", json!({"status": "SUCCEEDED"})).await;
    assert_eq!(received(&mut el).await.1["error"], "ResourceNotFound");

    let q = "query($id: ID!) { command(executionId: $id) { status result completedAt } }";
    let r = graphql(&server.http, Some(&admin), q, json!({"id": id}))
        .await
        .json();
    assert_eq!(r["data"]["command"]["status"], "SUCCEEDED");
    assert_eq!(
        r["data"]["command"]["result"],
        json!({"uptime": {"s": "1"}})
    );
}

#[tokio::test]
async fn an_unanswered_command_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let admin = server.admin_token.clone().unwrap();
    let secret = register(&server.http, &admin, "fan-2", json!({})).await;
    let (_c, mut el) = device(&server.mqtt, "fan-2", &secret).await;
    let mut watcher = watch(&server, &admin, "fan-2").await;
    let r = graphql(
        &server.http,
        Some(&admin),
        SEND,
        json!({"t": "fan-2", "timeout": 1}),
    )
    .await
    .json();
    let id = r["data"]["sendCommand"]["executionId"]
        .as_str()
        .unwrap()
        .to_owned();
    // Listening, the device gets it at once; it never answers.
    let (topic, _) = received(&mut el).await;
    assert!(topic.contains(&id));
    let created = watcher.data().await;
    assert!(
        created["commandUpdated"]["deliveredAt"].is_string(),
        "{created}"
    );
    let timed_out = watcher.data().await;
    assert_eq!(timed_out["commandUpdated"]["status"], "TIMED_OUT");
    assert_eq!(
        timed_out["commandUpdated"]["statusReason"]["reasonCode"],
        "DEVICE_TIMEOUT"
    );
}

#[tokio::test]
async fn an_mqtt5_device_gets_its_answer_where_it_asked_with_its_correlation_data() {
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::{AsyncClient as Client5, MqttOptions as Options5};

    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let admin = server.admin_token.clone().unwrap();
    let secret = register(&server.http, &admin, "valve-5", json!({})).await;
    let (host, port) = server.mqtt.rsplit_once(':').unwrap();
    let mut o = Options5::new("valve-5", host, port.parse().unwrap());
    o.set_credentials("valve-5", secret);
    let (c, mut el) = Client5::new(o, 20);
    let replies = "$aws/things/valve-5/replies";
    for filter in [
        "$aws/commands/things/valve-5/executions/+/request/#",
        replies,
    ] {
        c.subscribe(filter, QoS5::AtLeastOnce).await.unwrap();
    }
    let r = graphql(&server.http, Some(&admin), SEND, json!({"t": "valve-5"}))
        .await
        .json();
    let id = r["data"]["sendCommand"]["executionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let request = next_publish5(&mut el).await;
    assert!(String::from_utf8_lossy(&request.topic).contains(&id));

    let properties = PublishProperties {
        response_topic: Some(replies.into()),
        correlation_data: Some(bytes::Bytes::from_static(b"req-42")),
        ..Default::default()
    };
    c.publish_with_properties(
        format!("$aws/commands/things/valve-5/executions/{id}/response/json"),
        QoS5::AtLeastOnce,
        false,
        json!({"status": "SUCCEEDED"}).to_string(),
        properties,
    )
    .await
    .unwrap();
    let answer = next_publish5(&mut el).await;
    assert_eq!(String::from_utf8_lossy(&answer.topic), replies);
    let body: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(body["status"], "SUCCEEDED");
    assert_eq!(
        answer
            .properties
            .and_then(|p| p.correlation_data)
            .as_deref(),
        Some(&b"req-42"[..])
    );
}

async fn next_publish5(el: &mut rumqttc::v5::EventLoop) -> rumqttc::v5::mqttbytes::v5::Publish {
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::v5::Packet;
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await
    .expect("a message for the device")
}
