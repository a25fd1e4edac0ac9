//! Measures the memory of resident twins. The things and their shadows are written to the
//! store directly; then the baseline is taken, every twin is activated with a read-only
//! `get` (it loads its record and shadow), and the growth of the process's resident set
//! is divided by the number of twins. No writes happen during the measurement, so the
//! store's write buffers do not count.
//!
//! `cargo run --release -p twin-actors --example resident_memory -- 100000`

use std::sync::Arc;

use twin_actors::{FleetConfig, FleetHandle};
use twin_model::{DeviceId, Limits, Shadow, ShadowName, UpdateRequest};
use twin_store::{Committer, EmbeddedStore, ThingRecord, TwinStore, Write};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn TwinStore> = Arc::new(EmbeddedStore::open(dir.path(), 10).expect("store"));
    let ids: Vec<DeviceId> = (0..n)
        .map(|i| DeviceId::parse(&format!("mem-{i:07}")).expect("id"))
        .collect();

    let body = br#"{"state":{"reported":{"temp":21.5,"fw":"1.0.0"}}}"#;
    let request = UpdateRequest::parse(body, &Limits::default()).expect("request");
    for chunk in ids.chunks(10_000) {
        let mut writes = Vec::new();
        for id in chunk {
            let (record, _) = ThingRecord::new(id.clone(), 0).expect("record");
            let mut shadow = Shadow::default();
            let change = shadow
                .decide_update(&request, 1, &Limits::default())
                .expect("update");
            shadow.apply(&change);
            writes.push(Write::Thing(record));
            writes.push(Write::Shadow {
                thing: id.clone(),
                shadow: ShadowName::classic(),
                state: Arc::new(shadow),
                change: Arc::new(change),
            });
        }
        store.commit(writes).await.expect("commit");
    }
    let (committer, _) = Committer::start(store, 65_536, 8192);
    let fleet = FleetHandle::start(FleetConfig::default(), committer)
        .await
        .expect("fleet");
    // Warm the runtime and the store's read path with a first round on a few twins.
    for id in ids.iter().take(1000) {
        fleet
            .shadows()
            .get(id, ShadowName::classic())
            .await
            .expect("get");
    }
    let before = rss_bytes();
    for chunk in ids[1000..].chunks(5000) {
        let replies: Vec<_> = chunk
            .iter()
            .map(|id| fleet.shadows().get(id, ShadowName::classic()))
            .collect();
        for r in replies {
            r.await.expect("get");
        }
    }
    let after = rss_bytes();
    let resident = fleet.resident_twins().await;
    let activated = (n - 1000) as u64;
    println!("resident twins: {resident}");
    println!(
        "RSS before: {} MiB, after activating {activated} more twins: {} MiB",
        before >> 20,
        after >> 20
    );
    println!(
        "memory per resident twin: {} bytes",
        after.saturating_sub(before) / activated.max(1)
    );
}
