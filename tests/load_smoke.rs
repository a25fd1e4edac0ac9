//! A small `doppel-load shadow-update` run against the real binary: 50 devices for a few
//! seconds. It checks that every update was accepted and that the report adds up; it
//! asserts nothing about speed.

mod common;

use std::time::Duration;

use common::start;
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
    }
}
