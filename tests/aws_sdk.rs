//! The official AWS IoT Device SDK v2 (Python `awsiotsdk`, unmodified) runs the shadow
//! update, delta, get and delete flows, a job to SUCCEEDED with its jobs client, and a
//! command on the commands topics with its MQTT 5 client, against the real `doppel` binary.
//!
//! The SDK is installed from PyPI into a virtual environment kept in Cargo's target
//! directory (created on the first run). It needs `python3` with `venv` and access to
//! PyPI; without them the test fails and says so.

mod common;

use std::path::{Path, PathBuf};

use common::start;

const SDK: &str = "awsiotsdk==1.31.0";

/// The venv's python; made once per test run (the tests of this file share it, and run in
/// parallel threads of one process).
fn sdk_python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(make_venv).clone()
}

fn make_venv() -> PathBuf {
    common::python_venv("aws-iot-sdk-venv", SDK).join("bin/python")
}

#[tokio::test]
async fn the_aws_iot_device_sdk_runs_the_shadow_flows_unchanged() {
    let python = sdk_python();
    let dir = tempfile::tempdir().unwrap();
    // A first start makes the data directory that `doppel device add` works on.
    assert!(start(dir.path(), &[]).await.terminate().await.success());
    let add = common::doppel(&["device", "add", "sdk-thing"], dir.path());
    assert!(add.status.success());
    let secret = String::from_utf8(add.stdout)
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .to_owned();

    let server = start(dir.path(), &[]).await;
    run_check(
        &python,
        "aws_sdk_shadow.py",
        &server.mqtt,
        &["sdk-thing", &secret],
    )
    .await;
}

/// Runs an SDK script against the MQTT endpoint at `mqtt` (host:port, then `args`) and
/// asserts that it passed.
async fn run_check(python: &Path, script: &str, mqtt: &str, args: &[&str]) {
    let (host, port) = mqtt.rsplit_once(':').unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let run = tokio::process::Command::new(python)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(script)
        .args([host, port])
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(common::WAIT * 3, run)
        .await
        .expect("the SDK script finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("SDK CHECK PASSED"),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_aws_iot_device_sdk_jobs_client_runs_a_job_to_success_unchanged() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let python = sdk_python();
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let admin = server.admin_token.clone().unwrap();
    let secret = common::register(&server.http, &admin, "sdk-jobs", serde_json::json!({})).await;
    let (host, port) = server.mqtt.rsplit_once(':').unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aws_sdk_jobs.py");
    let mut child = tokio::process::Command::new(&python)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .arg(script)
        .args([host, port, "sdk-jobs", &secret])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(common::WAIT, lines.next_line())
        .await
        .expect("the SDK script subscribes")
        .unwrap();
    assert_eq!(ready.as_deref(), Some("READY"));
    let create = "mutation { createOtaJob(jobId: \"fw-sdk\", targets: {thingIds: [\"sdk-jobs\"]}, document: {firmware: {version: \"9.9.9\", url: \"https://fw.example/9.9.9\", sha256: \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\", size: 1}}) { targets } }";
    let r = common::graphql(&server.http, Some(&admin), create, serde_json::json!({}))
        .await
        .json();
    assert_eq!(r["data"]["createOtaJob"]["targets"], 1, "{r}");
    let mut rest = Vec::new();
    let finished = tokio::time::timeout(common::WAIT * 3, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            rest.push(line);
        }
        child.wait().await.unwrap()
    })
    .await
    .expect("the SDK script finishes");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    assert!(
        finished.success() && rest.iter().any(|l| l == "SDK CHECK PASSED"),
        "stdout:\n{}\nstderr:\n{stderr}",
        rest.join("\n")
    );
}

#[tokio::test]
async fn a_device_on_the_aws_iot_device_sdk_runs_a_command_sent_while_it_was_offline() {
    let python = sdk_python();
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let admin = server.admin_token.clone().unwrap();
    let secret = common::register(&server.http, &admin, "sdk-cmd", serde_json::json!({})).await;
    let send = "mutation { sendCommand(thingId: \"sdk-cmd\", name: \"reboot\", payload: {delay: 5}, timeoutSeconds: 60) { executionId status } }";
    let r = common::graphql(&server.http, Some(&admin), send, serde_json::json!({}))
        .await
        .json();
    assert_eq!(r["data"]["sendCommand"]["status"], "CREATED", "{r}");
    let execution = r["data"]["sendCommand"]["executionId"]
        .as_str()
        .unwrap()
        .to_owned();

    run_check(
        &python,
        "aws_sdk_commands.py",
        &server.mqtt,
        &["sdk-cmd", &secret, &execution],
    )
    .await;
    let q = "query($id: ID!) { command(executionId: $id) { status result } }";
    let r = common::graphql(
        &server.http,
        Some(&admin),
        q,
        serde_json::json!({"id": execution}),
    )
    .await
    .json();
    assert_eq!(
        r["data"]["command"],
        serde_json::json!({"status": "SUCCEEDED", "result": {"uptime": {"s": "3"}}}),
        "{r}"
    );
}
