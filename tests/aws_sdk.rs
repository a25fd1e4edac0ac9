//! The official AWS IoT Device SDK v2 (Python `awsiotsdk`, unmodified) runs the shadow
//! update, delta, get and delete flows against the real `doppel` binary.
//!
//! The SDK is installed from PyPI into a virtual environment kept in Cargo's target
//! directory (created on the first run). It needs `python3` with `venv` and access to
//! PyPI; without them the test fails and says so.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::start;

const SDK: &str = "awsiotsdk==1.31.0";

fn sdk_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("aws-iot-sdk-venv");
    let python = venv.join("bin/python");
    let marker = venv.join(SDK);
    if !marker.exists() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "cannot create a Python venv: install python3 and python3-venv"
        );
        let pip = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", SDK])
            .status();
        assert!(
            pip.is_ok_and(|s| s.success()),
            "cannot install {SDK} from PyPI into {}",
            venv.display()
        );
        std::fs::write(&marker, "").unwrap();
    }
    python
}

#[tokio::test]
async fn the_aws_iot_device_sdk_runs_the_shadow_flows_unchanged() {
    let python = sdk_python();
    let dir = tempfile::tempdir().unwrap();
    let add = common::doppel(&["device", "add", "sdk-thing"], dir.path());
    assert!(add.status.success());
    let secret = String::from_utf8(add.stdout)
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .to_owned();

    let server = start(dir.path(), &[]).await;
    let (host, port) = server.mqtt.rsplit_once(':').unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aws_sdk_shadow.py");
    let run = tokio::process::Command::new(&python)
        .arg(script)
        .args([host, port, "sdk-thing", &secret])
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
