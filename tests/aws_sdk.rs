//! The official AWS IoT Device SDK v2 (Python `awsiotsdk`, unmodified) runs the shadow
//! update, delta, get and delete flows (over plain MQTT with a password, and over mutual
//! TLS with no password through its `mtls_from_path` builder), a job to SUCCEEDED with its jobs client, and a
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

#[tokio::test]
async fn the_aws_iot_device_sdk_logs_in_with_mutual_tls_and_no_password() {
    let python = sdk_python();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (ca_file, cert_file, key_file) = server_tls_files(dir.path());
    // The device's certificate from the built-in CA, registered and attached by the CLI.
    assert!(start(&data, &[]).await.terminate().await.success());
    for args in [
        &["ca", "init"][..],
        &["device", "add", "sdk-mtls"],
        &[
            "cert",
            "issue",
            "--thing",
            "sdk-mtls",
            "--out",
            dir.path().to_str().unwrap(),
        ],
    ] {
        let out = common::doppel(args, &data);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let server = start_tls(&data, &cert_file, &key_file).await;
    let mqtts = server.mqtts.clone().expect("doppel logs its TLS address");
    let port = mqtts.rsplit_once(':').unwrap().1;
    let device_cert = dir.path().join("sdk-mtls.cert.pem");
    let device_key = dir.path().join("sdk-mtls.key.pem");
    run_check(
        &python,
        "aws_sdk_shadow.py",
        &format!("localhost:{port}"),
        &[
            "sdk-mtls",
            "--mtls",
            device_cert.to_str().unwrap(),
            device_key.to_str().unwrap(),
            &ca_file,
        ],
    )
    .await;
}

#[tokio::test]
async fn the_aws_iot_device_sdk_provisions_a_device_from_a_claim_certificate() {
    let python = sdk_python();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (ca_file, cert_file, key_file) = server_tls_files(dir.path());
    let first = start(&data, &[]).await;
    let admin = first.admin_token.clone().unwrap();
    assert!(first.terminate().await.success());
    assert!(common::doppel(&["ca", "init"], &data).status.success());
    let server = start_tls(&data, &cert_file, &key_file).await;
    let gql = async |query: &str| {
        let r = common::graphql(&server.http, Some(&admin), query, serde_json::json!({}))
            .await
            .json();
        assert!(r["errors"].is_null(), "{query}: {r}");
        r["data"].clone()
    };
    gql(r#"mutation { createProvisioningTemplate(name: "lamps", thingName: "lamp-{{SerialNumber}}", attributes: {serial: "{{SerialNumber}}"}, preProvisioningCheck: "attributes.SerialNumber != \"0\"", deviceConfiguration: {fleet: "north"}) { name } }"#).await;
    let claim = gql(r#"mutation { createKeysAndCertificate(provisioningTemplate: "lamps") { privateKeyPem certificate { certificateId certificatePem provisioningTemplate } } }"#).await;
    let claim = &claim["createKeysAndCertificate"];
    assert_eq!(claim["certificate"]["provisioningTemplate"], "lamps");
    let write = |name: &str, text: &serde_json::Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, text.as_str().unwrap()).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let claim_cert = write("claim.cert.pem", &claim["certificate"]["certificatePem"]);
    let claim_key = write("claim.key.pem", &claim["privateKeyPem"]);

    let port = server.mqtts.clone().unwrap();
    let port = port.rsplit_once(':').unwrap().1;
    run_check(
        &python,
        "aws_sdk_provision.py",
        &format!("localhost:{port}"),
        &[
            &claim_cert,
            &claim_key,
            &ca_file,
            "lamps",
            "A17",
            dir.path().to_str().unwrap(),
        ],
    )
    .await;
    let thing = gql(
        r#"{ thing(id: "lamp-A17") { attributes certificates { status provisioningTemplate } } }"#,
    )
    .await;
    assert_eq!(
        thing["thing"]["attributes"],
        serde_json::json!({"serial": "A17"})
    );
    assert_eq!(
        thing["thing"]["certificates"],
        serde_json::json!([{"status": "ACTIVE", "provisioningTemplate": null}]),
        "the new certificate, activated by RegisterThing"
    );
    // The device's requests are in the audit log, the claim certificate as their actor.
    let actor = format!(
        "certificate:{}",
        claim["certificate"]["certificateId"].as_str().unwrap()
    );
    let log = gql(&format!(
        r#"{{ auditLog(actor: "{actor}") {{ edges {{ node {{ action outcome }} }} }} }}"#
    ))
    .await;
    let actions: Vec<String> = log["auditLog"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["node"]["action"].as_str().unwrap(),
                &e["node"]["outcome"].as_str().unwrap()[..2]
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            "mqtt $aws/certificates/create/json ok",
            "mqtt $aws/provisioning-templates/lamps/provision/json er",
            "mqtt $aws/provisioning-templates/lamps/provision/json ok",
        ]
    );
}

/// A server on `data` with a TLS listener for the certificate and key files, taking
/// certificate logins only (as AWS IoT).
async fn start_tls(data: &Path, cert_file: &str, key_file: &str) -> common::Server {
    let tls = [
        "--mqtt-tls-listen",
        "127.0.0.1:0",
        "--tls-cert-file",
        cert_file,
        "--tls-key-file",
        key_file,
        "--mqtt-tls-auth",
        "certificate",
    ];
    start(data, &tls).await
}

/// A CA the devices trust and the server's certificate for localhost from it, as files in
/// `dir`: (CA, certificate, key).
fn server_tls_files(dir: &Path) -> (String, String, String) {
    // The server's certificate, for localhost, from a CA the device trusts, made as a real
    // PKI makes them: a name each, a CA key usage, ten years' validity (the SDK's TLS
    // finds no chain with rcgen's defaults, which name both alike).
    let valid = |p: &mut rcgen::CertificateParams, name: &str| {
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.not_before = rcgen::date_time_ymd(2025, 1, 1);
        p.not_after = rcgen::date_time_ymd(2035, 1, 1);
    };
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    valid(&mut ca_params, "doppel test CA");
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    valid(&mut params, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    (
        file("ca.pem", &ca.pem()),
        file("server.pem", &cert.pem()),
        file("server.key", &key.serialize_pem()),
    )
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
