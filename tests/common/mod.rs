//! Shared by the binary's end-to-end tests: start the real `doppel serve` on free ports.

#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const WAIT: Duration = Duration::from_secs(20);

/// Runs `doppel ARGS --data-dir DIR` to completion.
pub fn doppel(args: &[&str], dir: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

pub struct Server {
    pub child: Child,
    pub mqtt: String,
    pub http: String,
    /// The MQTT-over-TLS address, when started with `--mqtt-tls-listen`.
    pub mqtts: Option<String>,
}

/// Starts `doppel serve` on free ports and waits for it to log both addresses.
pub async fn start(dir: &Path, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args([
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut mqtt, mut http, mut mqtts) = (None, None, None);
    tokio::time::timeout(WAIT, async {
        while mqtt.is_none() || http.is_none() {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("doppel exited before it was listening");
            let addr = || line.rsplit(' ').next().unwrap().to_owned();
            if line.contains("mqtts listening on ") {
                mqtts = Some(addr());
            } else if line.contains("mqtt listening on ") {
                mqtt = Some(addr());
            } else if line.contains("http listening on ") {
                http = Some(addr());
            }
        }
    })
    .await
    .expect("doppel logs its addresses");
    // Keep draining the log so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Server {
        child,
        mqtt: mqtt.unwrap(),
        http: http.unwrap(),
        mqtts,
    }
}
