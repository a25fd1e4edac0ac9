//! `doppel-instructions`: how many instructions Doppel's hot paths execute, counted by
//! valgrind's callgrind. Instruction counts repeat exactly for the same binary and inputs,
//! however busy the machine is, so a change of a few percent shows where wall-clock
//! benchmarks on a shared host (whose speed drifts by 1.5× within an hour) see noise.
//!
//! `doppel-instructions` runs itself under `valgrind --tool=callgrind` once per hot path,
//! counting only the measured loop ([`callgrind_measured_loop`]: the inputs are made and
//! one call is made to warm up before it), and prints a Markdown table of instructions
//! per call; `--baseline FILE` adds the change against counts saved by `--save FILE`.
//! `doppel-instructions run NAME` is what valgrind runs.
//!
//! The report asserts nothing: `.ci/run` prints it, and load-tests/RESULTS.md keeps the
//! counts of the commits that changed them.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::process::{Command, ExitCode};

use bytes::BytesMut;
use serde_json::{Map, Value, json};
use twin_gateway::codec::{self, Outbound, PubAckCode, Version};
use twin_model::filter::{Filter, FilterTarget, Section};
use twin_model::history::HistoryEntry;
use twin_model::shadow::payload;
use twin_model::telemetry::{Latest, Reading};
use twin_model::{Limits, Shadow, ShadowName, UpdateRequest};

/// The server's allocator: allocation is a good part of these paths.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Calls per hot path inside the measured loop.
const CALLS: u64 = 1000;

/// One hot path: `make` builds its inputs and returns one call of it.
struct Bench {
    name: &'static str,
    what: &'static str,
    make: fn() -> Box<dyn FnMut()>,
}

const BENCHES: &[Bench] = &[
    Bench {
        name: "mqtt_read_publish",
        what: "decode one QoS 1 PUBLISH of a shadow update (MQTT 3.1.1) from the socket's bytes",
        make: mqtt_read_publish,
    },
    Bench {
        name: "mqtt_write_answer",
        what: "encode the PUBACK and the `update/accepted` PUBLISH that answer it",
        make: mqtt_write_answer,
    },
    Bench {
        name: "shadow_parse_update",
        what: "parse and validate the update's JSON payload",
        make: shadow_parse_update,
    },
    Bench {
        name: "shadow_decide_apply",
        what: "decide the update against a shadow of 12 keys and make the new shadow",
        make: shadow_decide_apply,
    },
    Bench {
        name: "shadow_payloads",
        what: "serialize `update/accepted`, `update/delta` and `update/documents`",
        make: shadow_payloads,
    },
    Bench {
        name: "record_encode",
        what: "encode the stored records of an update: the shadow and its history entry",
        make: record_encode,
    },
    Bench {
        name: "filter_match",
        what: "evaluate a three-term fleet filter on a twin",
        make: filter_match,
    },
    Bench {
        name: "telemetry_ingest",
        what: "parse a telemetry reading of 5 keys and merge it into the latest values",
        make: telemetry_ingest,
    },
];

/// The payload of the shadow update every path here works on.
const UPDATE: &[u8] =
    br#"{"state":{"reported":{"temp":21.5,"humidity":40,"fan":"on"}},"clientToken":"c-1"}"#;
const TOPIC: &str = "$aws/things/pump-1/shadow/update";
const NOW: u64 = 1_764_000_000;

fn update(n: u64) -> Vec<u8> {
    format!(
        r#"{{"state":{{"reported":{{"temp":{n},"humidity":40,"fan":"on"}}}},"clientToken":"c-1"}}"#
    )
    .into_bytes()
}

/// A shadow as a device's is after a while: 9 reported keys and 3 desired ones.
fn shadow() -> Shadow {
    let first = br#"{"state":{"desired":{"fan":"off","mode":"eco","target":20},
        "reported":{"temp":20,"humidity":41,"fan":"off","mode":"eco","target":20,
        "firmware":"1.4.2","uptime":86400,"rssi":-61,"battery":{"level":87,"charging":false}}}}"#;
    let req = UpdateRequest::parse(first, &Limits::default()).expect("a valid update");
    let (_, shadow) = Shadow::default()
        .update(&req, NOW, &Limits::default())
        .expect("a valid update");
    shadow
}

fn mqtt_read_publish() -> Box<dyn FnMut()> {
    let mut packet = BytesMut::new();
    let publish = Outbound::Publish {
        topic: TOPIC.into(),
        payload: bytes::Bytes::from_static(UPDATE),
        qos: 1,
        pkid: 7,
        dup: false,
        correlation_data: None,
        traceparent: None,
    };
    assert!(codec::write(&publish, Version::V4, &mut packet, usize::MAX));
    let packet = packet.freeze();
    Box::new(move || {
        let mut buf = BytesMut::from(&packet[..]);
        let read = codec::read(&mut buf, Version::V4, 128 * 1024);
        black_box(read.expect("a valid packet").expect("a whole packet"));
    })
}

fn mqtt_write_answer() -> Box<dyn FnMut()> {
    let accepted = bytes::Bytes::from(
        serde_json::to_vec(&json!({"state":{"reported":{"temp":21.5,"humidity":40,"fan":"on"}},
            "metadata":{"reported":{"temp":{"timestamp":NOW},"humidity":{"timestamp":NOW},"fan":{"timestamp":NOW}}},
            "version":42,"timestamp":NOW,"clientToken":"c-1"}))
        .expect("JSON"),
    );
    let mut buf = BytesMut::with_capacity(4096);
    Box::new(move || {
        buf.clear();
        let ack = Outbound::PubAck {
            pkid: 7,
            code: PubAckCode::Success,
        };
        let answer = Outbound::Publish {
            topic: format!("{TOPIC}/accepted"),
            payload: accepted.clone(),
            qos: 0,
            pkid: 0,
            dup: false,
            correlation_data: None,
            traceparent: None,
        };
        black_box(codec::write(&ack, Version::V4, &mut buf, usize::MAX));
        black_box(codec::write(&answer, Version::V4, &mut buf, usize::MAX));
    })
}

fn shadow_parse_update() -> Box<dyn FnMut()> {
    let limits = Limits::default();
    Box::new(move || {
        black_box(UpdateRequest::parse(black_box(UPDATE), &limits).expect("a valid update"));
    })
}

fn shadow_decide_apply() -> Box<dyn FnMut()> {
    let limits = Limits::default();
    // Two updates in turn: each call changes the shadow.
    let requests = [21, 22].map(|n| UpdateRequest::parse(&update(n), &limits).expect("valid"));
    let mut current = shadow();
    let mut turn = 0;
    Box::new(move || {
        turn ^= 1;
        let (change, next) = current
            .update(&requests[turn], NOW, &limits)
            .expect("a valid update");
        black_box(change);
        current = next;
    })
}

fn shadow_payloads() -> Box<dyn FnMut()> {
    let limits = Limits::default();
    let previous = shadow();
    let req = UpdateRequest::parse(UPDATE, &limits).expect("valid");
    let (change, current) = previous.update(&req, NOW, &limits).expect("valid");
    Box::new(move || {
        let token = change.client_token.as_deref();
        let accepted = serde_json::to_vec(&payload::update_accepted(&change)).expect("JSON");
        let delta = payload::delta(&current, NOW, token).map(|d| serde_json::to_vec(&d));
        let documents =
            serde_json::to_vec(&payload::documents(&previous, &current, NOW, token)).expect("JSON");
        black_box((accepted, delta, documents));
    })
}

fn record_encode() -> Box<dyn FnMut()> {
    let limits = Limits::default();
    let req = UpdateRequest::parse(UPDATE, &limits).expect("valid");
    let (change, current) = shadow().update(&req, NOW, &limits).expect("valid");
    Box::new(move || {
        // As the stores do: the state once, for its row and inside its history entry.
        let state = serde_json::to_vec(&current).expect("JSON");
        let history = HistoryEntry::encode_with(&change, &state);
        black_box((state, history));
    })
}

/// A twin as the fleet index sees it.
struct Twin {
    attributes: Map<String, Value>,
    shadow: Shadow,
}

impl FilterTarget for Twin {
    fn id(&self) -> &str {
        "pump-1"
    }
    fn connected(&self) -> bool {
        true
    }
    fn attributes(&self) -> Option<&Map<String, Value>> {
        Some(&self.attributes)
    }
    fn has_shadow(&self, shadow: &ShadowName) -> bool {
        shadow.name().is_none()
    }
    fn section(&self, shadow: &ShadowName, section: Section) -> Option<&Map<String, Value>> {
        if shadow.name().is_some() {
            return None;
        }
        match section {
            Section::Desired => self.shadow.desired.as_ref(),
            Section::Reported => self.shadow.reported.as_ref(),
            Section::Delta => None,
        }
    }
}

fn filter_match() -> Box<dyn FnMut()> {
    let filter = Filter::parse(
        r#"attributes.site = "north" AND reported.temp > 15 AND reported.battery.level >= 50"#,
    )
    .expect("a valid filter");
    let Value::Object(attributes) = json!({"site": "north", "model": "p-200", "floor": 3}) else {
        unreachable!("an object")
    };
    let twin = Twin {
        attributes,
        shadow: shadow(),
    };
    Box::new(move || {
        assert!(black_box(&filter).matches(black_box(&twin)));
    })
}

fn telemetry_ingest() -> Box<dyn FnMut()> {
    let payload = br#"{"seq":7,"temp":21.5,"power":{"watts":1250.5,"volts":230},"status":"ok"}"#;
    let latest = Latest::default()
        .with(&Reading::parse(payload, NOW * 1000, 6).expect("a valid reading"))
        .expect("within the limits");
    Box::new(move || {
        let reading = Reading::parse(black_box(payload), NOW * 1000, 6).expect("valid");
        black_box(latest.with(&reading).expect("within the limits"));
    })
}

/// The loop callgrind counts (`--toggle-collect`): nothing else is.
#[inline(never)]
fn callgrind_measured_loop(call: &mut dyn FnMut()) {
    for _ in 0..CALLS {
        call();
    }
}

fn run(name: &str) -> Result<(), String> {
    let bench = BENCHES
        .iter()
        .find(|b| b.name == name)
        .ok_or_else(|| format!("no hot path named {name}"))?;
    let mut call = (bench.make)();
    call();
    callgrind_measured_loop(&mut *call);
    Ok(())
}

/// Instructions per call of `bench`, from a callgrind run of this binary.
fn count(bench: &Bench) -> Result<u64, String> {
    let out = std::env::temp_dir().join(format!(
        "doppel-instructions-{}-{}.out",
        std::process::id(),
        bench.name
    ));
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let ran = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg("--collect-atstart=no")
        .arg("--toggle-collect=*callgrind_measured_loop*")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(exe)
        .args(["run", bench.name])
        .output()
        .map_err(|e| format!("cannot run valgrind ({e}): install the valgrind package"))?;
    let total = if ran.status.success() {
        summary(&out)
    } else {
        Err(format!(
            "valgrind on {} failed ({}): {}",
            bench.name,
            ran.status,
            String::from_utf8_lossy(&ran.stderr)
        ))
    };
    // Whatever callgrind managed to write goes, whether or not the run worked.
    let _ = std::fs::remove_file(&out);
    Ok(total? / CALLS)
}

/// The `summary:` (or `totals:`) line of a callgrind output file: instructions counted.
fn summary(file: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            format!(
                "{} counts no instruction: was the measured loop inlined away?",
                file.display()
            )
        })
}

/// Counts saved by `--save`: `name<TAB>instructions` per line.
fn load(file: &str) -> Result<BTreeMap<String, u64>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, n) = l
                .split_once('\t')
                .ok_or_else(|| format!("{file}: {l:?} is not name<TAB>count"))?;
            let n = n
                .trim()
                .parse()
                .map_err(|_| format!("{file}: {n:?} is not a count"))?;
            Ok((name.to_owned(), n))
        })
        .collect()
}

fn report(args: &[String]) -> Result<(), String> {
    let mut baseline = None;
    let mut save = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--baseline" => baseline = Some(load(it.next().ok_or("--baseline FILE")?)?),
            "--save" => save = Some(it.next().ok_or("--save FILE")?.clone()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    println!("| Hot path | Instructions per call | Change | What |");
    println!("|---|---|---|---|");
    let mut saved = String::new();
    for bench in BENCHES {
        let n = count(bench)?;
        let change =
            baseline
                .as_ref()
                .and_then(|b| b.get(bench.name))
                .map_or("-".to_owned(), |&was| {
                    format!(
                        "{:+.2} % (was {was})",
                        (n as f64 / was as f64 - 1.0) * 100.0
                    )
                });
        println!("| `{}` | {n} | {change} | {} |", bench.name, bench.what);
        saved.push_str(&format!("{}\t{n}\n", bench.name));
    }
    if let Some(file) = save {
        std::fs::write(&file, saved).map_err(|e| format!("cannot write {file}: {e}"))?;
    }
    Ok(())
}

const USAGE: &str = "usage: doppel-instructions [--baseline FILE] [--save FILE]   (needs valgrind)
       doppel-instructions run NAME   (one hot path's loop, as valgrind runs it)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let done = match args.first().map(String::as_str) {
        Some("run") => run(args.get(1).map_or("", String::as_str)),
        Some("--help" | "-h") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => report(&args),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("doppel-instructions: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_read_from_callgrind_s_summary_and_an_empty_run_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out");
        std::fs::write(
            &file,
            "events: Ir\nfl=(1) x\n0 5\nsummary: 123456\ntotals: 123456\n",
        )
        .unwrap();
        assert_eq!(summary(&file).unwrap(), 123_456);
        std::fs::write(&file, "events: Ir\nsummary: 0\n").unwrap();
        assert!(summary(&file).unwrap_err().contains("inlined away"));
        let saved = dir.path().join("saved.tsv");
        std::fs::write(
            &saved,
            "# counts\nmqtt_read_publish\t988\n\nfilter_match\t1611\n",
        )
        .unwrap();
        let counts = load(saved.to_str().unwrap()).unwrap();
        assert_eq!(counts["mqtt_read_publish"], 988);
        assert_eq!(counts.len(), 2);
        std::fs::write(&saved, "filter_match 1611\n").unwrap();
        assert!(
            load(saved.to_str().unwrap())
                .unwrap_err()
                .contains("name<TAB>count")
        );
    }

    /// Every hot path runs with its inputs (a bad input panics, as it would under valgrind).
    #[test]
    fn every_hot_path_runs() {
        for bench in BENCHES {
            let mut call = (bench.make)();
            call();
            call();
        }
    }
}
