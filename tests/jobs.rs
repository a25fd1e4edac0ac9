//! OTA jobs end to end: an operator creates a firmware job through GraphQL, and real MQTT
//! devices (rumqttc) run it on the AWS IoT Jobs topics against the real `doppel serve`.

mod common;

use common::{WAIT, client_on, graphql, next_on, register, start};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::{Value, json};

const CREATE: &str = "mutation($targets: OtaTargets!) { createOtaJob(jobId: \"fw-2\", targets: $targets, document: {firmware: {version: \"2.0.1\", url: \"https://fw.example/2.0.1.bin\", sha256: \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\", size: 1024}, data: {reboot: true}}) { jobId targets counts { queued } } }";
const PROGRESS: &str =
    "{ otaJob(jobId: \"fw-2\") { targets counts { queued inProgress succeeded failed } } }";

/// A device subscribed to all its jobs topics.
async fn device(addr: &str, thing: &str, secret: &str) -> (AsyncClient, EventLoop) {
    client_on(
        addr,
        thing,
        Some(secret),
        &[&format!("$aws/things/{thing}/jobs/#")],
    )
    .await
}

/// Publishes a jobs request and returns its `accepted` (or `rejected`) answer.
async fn ask(c: &AsyncClient, el: &mut EventLoop, thing: &str, op: &str, body: Value) -> Value {
    c.publish(
        format!("$aws/things/{thing}/jobs/{op}"),
        QoS::AtLeastOnce,
        false,
        body.to_string(),
    )
    .await
    .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p)))
                    if p.topic == format!("$aws/things/{thing}/jobs/{op}/accepted")
                        || p.topic == format!("$aws/things/{thing}/jobs/{op}/rejected") =>
                {
                    let mut v: Value = serde_json::from_slice(&p.payload).unwrap();
                    v["_rejected"] = json!(p.topic.ends_with("/rejected"));
                    return v;
                }
                Ok(_) => {}
                Err(e) => panic!("device connection failed: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("an answer to jobs/{op}"))
}

#[tokio::test]
async fn devices_run_a_firmware_job_resume_after_a_reboot_and_report_their_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let admin = server.admin_token.clone().unwrap();
    let mut secrets = Vec::new();
    for t in ["pump-1", "pump-2", "pump-3"] {
        secrets.push(register(&server.http, &admin, t, json!({"site": "north"})).await);
    }
    let (c1, mut el1) = device(&server.mqtt, "pump-1", &secrets[0]).await;

    let r = graphql(
        &server.http,
        Some(&admin),
        CREATE,
        json!({"targets": {"filter": "attributes.site = \"north\""}}),
    )
    .await
    .json();
    assert_eq!(r["data"]["createOtaJob"]["targets"], 3, "{r}");
    assert_eq!(r["data"]["createOtaJob"]["counts"]["queued"], 3);

    // A listening device hears of it on notify-next, with the document.
    let next = next_on(&mut el1, "/jobs/notify-next").await;
    assert_eq!(next["execution"]["jobId"], "fw-2");
    assert_eq!(next["execution"]["status"], "QUEUED");
    assert_eq!(
        next["execution"]["jobDocument"]["firmware"]["version"],
        "2.0.1"
    );
    assert_eq!(next["execution"]["jobDocument"]["reboot"], true);
    // The device can check the document came from this server: the key `doppel
    // signing-key` prints verifies it, and the server's answer agrees.
    let printed = common::doppel(&["signing-key"], dir.path());
    let key = String::from_utf8(printed.stdout).unwrap().trim().to_owned();
    assert_eq!(key.len(), 64, "{key}");
    let r = graphql(&server.http, Some(&admin), "{ signingKey }", json!({}))
        .await
        .json();
    assert_eq!(r["data"]["signingKey"], key.as_str());
    let document = &next["execution"]["jobDocument"];
    assert!(twin_graphql::signing::verify(document, &key), "{document}");
    let mut forged = document.clone();
    forged["firmware"]["url"] = json!("https://evil.example/fw.bin");
    assert!(!twin_graphql::signing::verify(&forged, &key));

    let started = ask(
        &c1,
        &mut el1,
        "pump-1",
        "start-next",
        json!({"statusDetails": {"step": "download"}, "clientToken": "s1"}),
    )
    .await;
    assert_eq!(started["execution"]["status"], "IN_PROGRESS", "{started}");
    assert_eq!(started["clientToken"], "s1");
    let v = started["execution"]["versionNumber"].as_u64().unwrap();
    let installing = ask(
        &c1,
        &mut el1,
        "pump-1",
        "fw-2/update",
        json!({"status": "IN_PROGRESS", "statusDetails": {"step": "install"}, "expectedVersion": v}),
    )
    .await;
    assert_eq!(installing["_rejected"], false, "{installing}");

    // The device reboots mid-install and finds its execution again.
    c1.disconnect().await.unwrap();
    drop(el1);
    let (c1, mut el1) = device(&server.mqtt, "pump-1", &secrets[0]).await;
    let resumed = ask(&c1, &mut el1, "pump-1", "$next/get", json!({})).await;
    assert_eq!(resumed["execution"]["status"], "IN_PROGRESS", "{resumed}");
    assert_eq!(resumed["execution"]["statusDetails"]["step"], "install");
    let stale = ask(
        &c1,
        &mut el1,
        "pump-1",
        "fw-2/update",
        json!({"status": "SUCCEEDED", "expectedVersion": v}),
    )
    .await;
    assert_eq!(stale["_rejected"], true);
    assert_eq!(stale["code"], "VersionMismatch");
    let current = stale["executionState"]["versionNumber"].clone();
    let done = ask(
        &c1,
        &mut el1,
        "pump-1",
        "fw-2/update",
        json!({"status": "SUCCEEDED", "expectedVersion": current, "includeJobExecutionState": true}),
    )
    .await;
    assert_eq!(done["executionState"]["status"], "SUCCEEDED", "{done}");

    // A device that connects later asks for its pending jobs; another one fails.
    let (c2, mut el2) = device(&server.mqtt, "pump-2", &secrets[1]).await;
    let pending = ask(&c2, &mut el2, "pump-2", "get", json!({})).await;
    assert_eq!(pending["queuedJobs"][0]["jobId"], "fw-2", "{pending}");
    ask(&c2, &mut el2, "pump-2", "start-next", json!({})).await;
    let failed = ask(
        &c2,
        &mut el2,
        "pump-2",
        "fw-2/update",
        json!({"status": "FAILED", "statusDetails": {"reason": "checksum"}}),
    )
    .await;
    assert_eq!(failed["_rejected"], false, "{failed}");
    let bad = ask(
        &c2,
        &mut el2,
        "pump-2",
        "fw-2/update",
        json!({"status": "QUEUED"}),
    )
    .await;
    assert_eq!(bad["code"], "InvalidRequest");

    let r = graphql(&server.http, Some(&admin), PROGRESS, json!({}))
        .await
        .json();
    assert_eq!(
        r["data"]["otaJob"],
        json!({"targets": 3, "counts": {"queued": 1, "inProgress": 0, "succeeded": 1, "failed": 1}})
    );
    let r = graphql(
        &server.http,
        Some(&admin),
        "{ thing(id: \"pump-1\") { shadow { reported } } }",
        json!({}),
    )
    .await
    .json();
    assert_eq!(
        r["data"]["thing"]["shadow"]["reported"]["firmware"]["version"],
        "2.0.1"
    );
    // A second job with the same id is refused.
    let again = graphql(
        &server.http,
        Some(&admin),
        CREATE,
        json!({"targets": {"thingIds": ["pump-3"]}}),
    )
    .await
    .json();
    assert_eq!(again["errors"][0]["extensions"]["code"], "VERSION_CONFLICT");
}

#[tokio::test]
async fn an_operator_cancels_a_job_and_forces_the_running_executions_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let admin = server.admin_token.clone().unwrap();
    let s1 = register(&server.http, &admin, "gate-1", json!({})).await;
    register(&server.http, &admin, "gate-2", json!({})).await;
    let r = graphql(
        &server.http,
        Some(&admin),
        CREATE,
        json!({"targets": {"thingIds": ["gate-1", "gate-2"]}}),
    )
    .await
    .json();
    assert_eq!(r["data"]["createOtaJob"]["targets"], 2, "{r}");
    let mut watcher = common::ws_as(&server.http, &admin, None).await;
    let progress = "subscription { otaJobProgress(jobId: \"fw-2\") { __typename ... on OtaJob { status counts { queued inProgress canceled } } } }";
    watcher.start("1", progress).await;
    let first = watcher.data().await;
    assert_eq!(first["otaJobProgress"]["counts"]["queued"], 2, "{first}");

    let (c1, mut el1) = device(&server.mqtt, "gate-1", &s1).await;
    let started = ask(&c1, &mut el1, "gate-1", "start-next", json!({})).await;
    assert_eq!(started["execution"]["status"], "IN_PROGRESS");
    let seen = watcher.data().await;
    assert_eq!(seen["otaJobProgress"]["counts"]["inProgress"], 1, "{seen}");

    let cancel = "mutation($force: Boolean) { cancelOtaJob(jobId: \"fw-2\", force: $force) { status counts { queued inProgress canceled } } }";
    let r = graphql(&server.http, Some(&admin), cancel, json!({}))
        .await
        .json();
    assert_eq!(
        r["data"]["cancelOtaJob"],
        json!({"status": "CANCELED", "counts": {"queued": 0, "inProgress": 1, "canceled": 1}}),
        "without force, the running execution goes on: {r}"
    );
    let r = graphql(&server.http, Some(&admin), cancel, json!({"force": true}))
        .await
        .json();
    assert_eq!(
        r["data"]["cancelOtaJob"]["counts"],
        json!({"queued": 0, "inProgress": 0, "canceled": 2})
    );
    // The device hears of it, and its late update is refused.
    let notify = next_on(&mut el1, "/jobs/notify").await;
    assert_eq!(notify["jobs"], json!({"QUEUED": [], "IN_PROGRESS": []}));
    let late = ask(
        &c1,
        &mut el1,
        "gate-1",
        "fw-2/update",
        json!({"status": "SUCCEEDED"}),
    )
    .await;
    assert_eq!(late["code"], "InvalidStateTransition", "{late}");
    assert_eq!(late["executionState"]["status"], "CANCELED");
    let listed = graphql(
        &server.http,
        Some(&admin),
        "{ otaJobs { jobId status targets } }",
        json!({}),
    )
    .await
    .json();
    assert_eq!(
        listed["data"]["otaJobs"],
        json!([{"jobId": "fw-2", "status": "CANCELED", "targets": 2}])
    );
}

/// Devices that run every job they are given: they start the next job when notify-next
/// says there is one (and once at connect), then report SUCCEEDED, or FAILED where
/// `fails` says so; after success, those `self_test` picks report `selfTest: "passed"`
/// in their shadow. Each runs until the test ends.
fn fleet_of_devices(
    mqtt: &str,
    ids: Vec<String>,
    fails: fn(&str) -> bool,
    self_test: fn(&str) -> bool,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for id in ids {
        let mqtt = mqtt.to_owned();
        set.spawn(async move {
            let base = format!("$aws/things/{id}/jobs");
            let (c, mut el) = client_on(&mqtt, &id, None, &[&format!("{base}/#")]).await;
            let start = || {
                c.try_publish(format!("{base}/start-next"), QoS::AtLeastOnce, false, "{}")
                    .unwrap()
            };
            start();
            loop {
                let Ok(event) = el.poll().await else { return };
                let Event::Incoming(Packet::Publish(p)) = event else {
                    continue;
                };
                let v: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                if p.topic.ends_with("/notify-next") && v.get("execution").is_some() {
                    start();
                } else if p.topic.ends_with("/start-next/accepted")
                    && let Some(job) = v["execution"]["jobId"].as_str()
                {
                    let status = if fails(&id) { "FAILED" } else { "SUCCEEDED" };
                    c.try_publish(
                        format!("{base}/{job}/update"),
                        QoS::AtLeastOnce,
                        false,
                        json!({"status": status}).to_string(),
                    )
                    .unwrap();
                } else if p.topic.ends_with("/update/accepted") {
                    if !fails(&id) && self_test(&id) {
                        let report = json!({"state": {"reported": {"selfTest": "passed"}}});
                        c.try_publish(
                            format!("$aws/things/{id}/shadow/update"),
                            QoS::AtLeastOnce,
                            false,
                            report.to_string(),
                        )
                        .unwrap();
                    }
                    start();
                }
            }
        });
    }
    set
}

/// Waits on `otaJobProgress` until `done` holds for the job's counts and status.
async fn progress_until(ws: &mut common::Ws, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let waited = tokio::time::timeout(PROGRESS_DEADLINE, async {
        loop {
            let e = ws.data().await;
            last = e["otaJobProgress"].clone();
            if done(&last) {
                return last.clone();
            }
        }
    })
    .await;
    waited.unwrap_or_else(|_| {
        panic!("the job did not get there within {PROGRESS_DEADLINE:?}; last seen: {last}")
    })
}

/// How long a rollout in these tests may take to reach a state.
const PROGRESS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

const PROGRESS_SUB: &str = "subscription { otaJobProgress(jobId: \"JOB\") { __typename ... on OtaJob { status targets counts { notReleased queued inProgress succeeded failed canceled unhealthy } } ... on Lagged { skipped } } }";

/// Registers each of `ids`.
async fn register_all(server: &common::Server, admin: &str, ids: &[String]) {
    for id in ids {
        register(&server.http, admin, id, json!({})).await;
    }
}

/// Creates the firmware job `job` for `ids` at `rollout`'s pace; returns the response.
async fn create_paced(
    server: &common::Server,
    admin: &str,
    job: &str,
    ids: &[String],
    rollout: Value,
) -> Value {
    let vars = json!({"id": job, "ids": ids, "rollout": rollout});
    graphql(&server.http, Some(admin), CREATE_PACED, vars)
        .await
        .json()
}

const CREATE_PACED: &str = "mutation($id: ID!, $ids: [ID!], $rollout: OtaRollout) { createOtaJob(jobId: $id, targets: {thingIds: $ids}, document: {firmware: {version: \"3.0\", url: \"https://fw.example/3.0\", sha256: \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\", size: 1}}, rollout: $rollout) { status targets counts { notReleased } } }";

async fn watch_job(server: &common::Server, token: &str, job: &str) -> common::Ws {
    let mut ws = common::ws_as(&server.http, token, None).await;
    ws.start("1", &PROGRESS_SUB.replace("JOB", job)).await;
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_in_the_first_wave_of_200_devices_abort_the_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--auto-register"]).await;
    let admin = server.admin_token.clone().unwrap();
    let ids: Vec<String> = (0..200).map(|i| format!("dev-{i:03}")).collect();
    // Every fourth device fails: 5 of the first wave's 20 (25% > 20%).
    let fails = |id: &str| id[4..].parse::<u32>().unwrap() % 4 == 0;
    let devices = fleet_of_devices(&server.mqtt, ids.clone(), fails, |_| true);
    // The devices are registered (auto-register) once they connect.
    let count = "{ things { totalCount } }";
    let all_registered = tokio::time::timeout(WAIT, async {
        while graphql(&server.http, Some(&admin), count, json!({}))
            .await
            .json()["data"]["things"]["totalCount"]
            != ids.len()
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        all_registered.is_ok(),
        "the {} devices were not all registered within {WAIT:?}",
        ids.len()
    );
    let r = create_paced(
        &server,
        &admin,
        "fw-3",
        &ids,
        json!({"waves": [10, 50, 100], "abort": {"failurePercent": 20, "minFinished": 20}}),
    )
    .await;
    assert_eq!(r["data"]["createOtaJob"]["targets"], 200, "{r}");
    let mut ws = watch_job(&server, &admin, "fw-3").await;
    let aborted = progress_until(&mut ws, |j| j["status"] == "ABORTED").await;
    assert_eq!(
        aborted["counts"],
        json!({"notReleased": 180, "queued": 0, "inProgress": 0, "succeeded": 15, "failed": 5, "canceled": 0, "unhealthy": 0}),
        "the second wave never started: {aborted}"
    );
    let q = "{ otaJob(jobId: \"fw-3\") { waves { percent targets counts { notReleased succeeded failed } } } }";
    let r = graphql(&server.http, Some(&admin), q, json!({}))
        .await
        .json();
    assert_eq!(
        r["data"]["otaJob"]["waves"],
        json!([
            {"percent": 10, "targets": 20, "counts": {"notReleased": 0, "succeeded": 15, "failed": 5}},
            {"percent": 50, "targets": 80, "counts": {"notReleased": 80, "succeeded": 0, "failed": 0}},
            {"percent": 100, "targets": 100, "counts": {"notReleased": 100, "succeeded": 0, "failed": 0}},
        ])
    );
    drop(devices);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_rollout_waits_resumes_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), &["--auto-register"]).await;
    let admin = server.admin_token.clone().unwrap();
    let ids: Vec<String> = (0..4).map(|i| format!("cam-{i}")).collect();
    register_all(&server, &admin, &ids).await;
    let r = create_paced(&server, &admin, "fw-4", &ids, json!({"waves": [50, 100]})).await;
    assert_eq!(r["data"]["createOtaJob"]["targets"], 4, "{r}");
    // Once the first wave is out, pause; the devices finish it while paused.
    let mut ws = watch_job(&server, &admin, "fw-4").await;
    progress_until(&mut ws, |j| j["counts"]["notReleased"] == 2).await;
    let pause = "mutation { pauseOtaJob(jobId: \"fw-4\") { status } }";
    let r = graphql(&server.http, Some(&admin), pause, json!({}))
        .await
        .json();
    assert_eq!(r["data"]["pauseOtaJob"]["status"], "PAUSED", "{r}");
    let devices = fleet_of_devices(&server.mqtt, ids.clone(), |_| false, |_| true);
    let waiting = progress_until(&mut ws, |j| j["counts"]["succeeded"] == 2).await;
    assert_eq!(waiting["status"], "PAUSED");
    assert_eq!(waiting["counts"]["notReleased"], 2);
    drop(devices);

    // A restart keeps the rollout, paused; resumed, it finishes.
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    let server = start(dir.path(), &["--auto-register"]).await;
    let q = "{ otaJob(jobId: \"fw-4\") { status counts { notReleased succeeded } } }";
    let r = graphql(&server.http, Some(&admin), q, json!({}))
        .await
        .json();
    assert_eq!(
        r["data"]["otaJob"],
        json!({"status": "PAUSED", "counts": {"notReleased": 2, "succeeded": 2}})
    );
    let mut ws = watch_job(&server, &admin, "fw-4").await;
    let _devices = fleet_of_devices(&server.mqtt, ids.clone(), |_| false, |_| true);
    let resume = "mutation { resumeOtaJob(jobId: \"fw-4\") { status } }";
    let r = graphql(&server.http, Some(&admin), resume, json!({}))
        .await
        .json();
    assert_eq!(r["data"]["resumeOtaJob"]["status"], "IN_PROGRESS", "{r}");
    let done = progress_until(&mut ws, |j| j["status"] == "COMPLETED").await;
    assert_eq!(done["counts"]["succeeded"], 4, "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_mid_rollout_exits_cleanly_and_the_rollout_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--auto-register"]).await;
    let admin = server.admin_token.clone().unwrap();
    let ids: Vec<String> = (0..2).map(|i| format!("gw-{i}")).collect();
    register_all(&server, &admin, &ids).await;
    let r = create_paced(&server, &admin, "fw-6", &ids, json!({"waves": [50, 100]})).await;
    assert_eq!(r["data"]["createOtaJob"]["status"], "IN_PROGRESS", "{r}");
    let mut ws = watch_job(&server, &admin, "fw-6").await;
    progress_until(&mut ws, |j| j["counts"]["notReleased"] == 1).await;
    drop(ws);

    // SIGTERM with the rollout's controller running: the server stops, and says so.
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");

    let server = start(dir.path(), &["--auto-register"]).await;
    let mut ws = watch_job(&server, &admin, "fw-6").await;
    let _devices = fleet_of_devices(&server.mqtt, ids.clone(), |_| false, |_| true);
    let done = progress_until(&mut ws, |j| j["status"] == "COMPLETED").await;
    assert_eq!(done["counts"]["succeeded"], 2, "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_gate_counts_a_device_that_fails_its_self_test_and_stops_the_waves() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--auto-register"]).await;
    let admin = server.admin_token.clone().unwrap();
    let ids: Vec<String> = (0..4).map(|i| format!("pump-{i}")).collect();
    register_all(&server, &admin, &ids).await;
    let rollout = json!({
        "waves": [50, 100],
        "healthGate": {"filter": "reported.selfTest = \"passed\"", "windowSeconds": 1},
        "abort": {"failurePercent": 50, "minFinished": 2},
    });
    let r = create_paced(&server, &admin, "fw-5", &ids, rollout).await;
    assert_eq!(r["data"]["createOtaJob"]["targets"], 4, "{r}");
    let mut ws = watch_job(&server, &admin, "fw-5").await;
    // pump-1 succeeds but never passes its self test.
    let _devices = fleet_of_devices(&server.mqtt, ids.clone(), |_| false, |id| id != "pump-1");
    let stopped = progress_until(&mut ws, |j| j["status"] == "ABORTED").await;
    assert_eq!(
        stopped["counts"],
        json!({"notReleased": 2, "queued": 0, "inProgress": 0, "succeeded": 2, "failed": 0, "canceled": 0, "unhealthy": 1}),
        "{stopped}"
    );
}

#[tokio::test]
async fn a_device_that_fails_after_installing_is_rolled_back_automatically() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let admin = server.admin_token.clone().unwrap();
    let secret = register(&server.http, &admin, "valve-9", json!({})).await;
    let (c, mut el) = device(&server.mqtt, "valve-9", &secret).await;
    let create = "mutation { createOtaJob(jobId: \"fw-6\", targets: {thingIds: [\"valve-9\"]}, document: {firmware: {version: \"2.0\", url: \"https://fw.example/2.0\", sha256: \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\", size: 1}, rollbackTo: {version: \"1.9\", url: \"https://fw.example/1.9\", sha256: \"60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752\", size: 1}}) { rollbackJobId } }";
    let r = graphql(&server.http, Some(&admin), create, json!({}))
        .await
        .json();
    assert_eq!(
        r["data"]["createOtaJob"]["rollbackJobId"], "fw-6-rollback",
        "{r}"
    );

    // The update fails while verifying, after the install.
    let started = ask(&c, &mut el, "valve-9", "start-next", json!({})).await;
    assert_eq!(started["execution"]["jobId"], "fw-6");
    ask(
        &c,
        &mut el,
        "valve-9",
        "fw-6/update",
        json!({"status": "IN_PROGRESS", "statusDetails": {"step": "verify"}}),
    )
    .await;
    ask(
        &c,
        &mut el,
        "valve-9",
        "fw-6/update",
        json!({"status": "FAILED"}),
    )
    .await;
    // Its next job is the rollback, which installs the previous firmware (notify-next
    // said so too, before the update's answer).
    let next = ask(&c, &mut el, "valve-9", "$next/get", json!({})).await;
    assert_eq!(next["execution"]["jobId"], "fw-6-rollback", "{next}");
    assert_eq!(
        next["execution"]["jobDocument"]["firmware"]["version"],
        "1.9"
    );
    ask(&c, &mut el, "valve-9", "start-next", json!({})).await;
    let done = ask(
        &c,
        &mut el,
        "valve-9",
        "fw-6-rollback/update",
        json!({"status": "SUCCEEDED"}),
    )
    .await;
    assert_eq!(done["_rejected"], false, "{done}");
    let r = graphql(
        &server.http,
        Some(&admin),
        "{ a: otaJob(jobId: \"fw-6\") { counts { failed } } b: otaJob(jobId: \"fw-6-rollback\") { targets counts { succeeded } } thing(id: \"valve-9\") { shadow { reported } } }",
        json!({}),
    )
    .await
    .json();
    assert_eq!(r["data"]["a"]["counts"]["failed"], 1, "{r}");
    assert_eq!(
        r["data"]["b"],
        json!({"targets": 1, "counts": {"succeeded": 1}})
    );
    assert_eq!(
        r["data"]["thing"]["shadow"]["reported"]["firmware"]["version"],
        "1.9"
    );
}
