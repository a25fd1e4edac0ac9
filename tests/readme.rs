//! The README's walkthroughs, run as written: a README that drifts from the binary fails
//! here, and so `.ci/run`.
//!
//! Every ```` ```sh ```` block of README.md runs, except those marked ```` ```sh norun ````
//! (the quick start's build and test commands, load tests). A walkthrough starts at a block
//! that sets `MQTT_PORT=… HTTP_PORT=…` and runs, with its following blocks, in one bash
//! session (`set -eo pipefail`, standard error merged into standard output) in a fresh
//! directory holding `tools/`, with the ports replaced by free ones, `doppel` on `PATH` and
//! a `python3` that has `websockets` (for `tools/watch.py`) and `standardwebhooks` (for
//! `tools/webhook_receiver.py`).
//!
//! A line `#> text` shows what the commands before it print: each such line must match
//! one printed line, in order, and nothing else may be printed, after masking what differs from run to run (epoch
//! timestamps, RFC 3339 times, hex ids and secrets, `dpl_` tokens); `…` in the README
//! stands for any text. Commands the README shows no output for may print anything.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use regex::Regex;

mod common;

const WALKTHROUGH_DEADLINE: Duration = Duration::from_secs(180);
const WEBSOCKETS: &str = "websockets==17.4";
const STANDARD_WEBHOOKS: &str = "standardwebhooks==1.1.0";

/// One walkthrough: its heading and its steps.
#[derive(Debug)]
struct Walkthrough {
    heading: String,
    line: usize,
    steps: Vec<Step>,
}

/// Commands and the output the README shows for them.
#[derive(Debug, Default)]
struct Step {
    line: usize,
    script: Vec<String>,
    expected: Vec<String>,
}

fn walkthroughs(readme: &str) -> Vec<Walkthrough> {
    let mut all: Vec<Walkthrough> = Vec::new();
    let mut heading = String::new();
    let mut lines = readme.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        if line.starts_with('#') {
            heading = line.trim_start_matches('#').trim().to_owned();
            continue;
        }
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let words: Vec<&str> = info.split_whitespace().collect();
        let block: Vec<(usize, &str)> = lines
            .by_ref()
            .take_while(|(_, l)| !l.starts_with("```"))
            .map(|(i, l)| (i + 1, l))
            .collect();
        if words.first() != Some(&"sh") || words.contains(&"norun") {
            continue;
        }
        if block.iter().any(|(_, l)| l.starts_with("MQTT_PORT=")) {
            all.push(Walkthrough {
                heading: heading.clone(),
                line: n + 1,
                steps: Vec::new(),
            });
        }
        let walkthrough = all.last_mut().unwrap_or_else(|| {
            panic!(
                "README.md:{}: a runnable block before any walkthrough; start it with MQTT_PORT=… HTTP_PORT=… or mark it norun",
                n + 1
            )
        });
        let mut step = Step {
            line: n + 2,
            ..Step::default()
        };
        for (i, l) in block {
            if let Some(out) = l.strip_prefix("#> ") {
                step.expected.push(out.to_owned());
            } else {
                if !step.expected.is_empty() {
                    walkthrough.steps.push(std::mem::take(&mut step));
                    step.line = i;
                }
                step.script.push(l.to_owned());
            }
        }
        walkthrough.steps.push(step);
    }
    all
}

/// What differs from run to run, masked the same way in the README and in the output.
fn mask(text: &str) -> String {
    static MASKS: std::sync::OnceLock<Vec<(Regex, &str)>> = std::sync::OnceLock::new();
    let masks = MASKS.get_or_init(|| {
        [
            (r"dpl_[0-9A-Za-z_]+", "<token>"),
            // The README may shorten a long hex value: `05bb4907…`.
            (r"\b[0-9a-f]{4,}…", "<hex>"),
            (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "<time>"),
            (r"\b[0-9a-f]{16,}\b", "<hex>"),
            (r"\b\d{10,13}\b", "<epoch>"),
        ]
        .into_iter()
        .map(|(re, with)| (Regex::new(re).unwrap(), with))
        .collect()
    });
    masks.iter().fold(text.to_owned(), |t, (re, with)| {
        re.replace_all(&t, *with).into_owned()
    })
}

/// Whether a printed line is what the README shows.
fn matches(expected: &str, actual: &str) -> bool {
    let pattern = regex::escape(&mask(expected)).replace('…', ".*");
    Regex::new(&format!("^{pattern}$"))
        .unwrap()
        .is_match(&mask(actual))
}

/// A port no one listens on, below the ephemeral range (32768 and up on Linux), so that no
/// client's outgoing connection takes it before its server binds it, and never the same
/// one twice in a run.
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 5_000) as u16,
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert!(port < 32_000, "no free port below the ephemeral range");
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

/// The servers' logs of a walkthrough (`*.log` under its directory), for a failure report.
fn logs(dir: &Path) -> String {
    let mut out = String::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() && !path.is_symlink() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                out.push_str(&format!("--- {}\n{text}", path.display()));
            }
        }
    }
    out
}

/// The bin directory of a venv with `websockets` and `standardwebhooks` (for
/// `tools/webhook_receiver.py`), made once per build directory.
fn python_with_websockets() -> PathBuf {
    common::python_venv("readme-venv", WEBSOCKETS);
    common::python_venv("readme-venv", STANDARD_WEBHOOKS).join("bin")
}

/// The walkthrough as one bash script, each `NAME_PORT=N` set to the port `port(NAME_PORT)`
/// gives, and a marker line before each step's output; and which port stands for which of
/// the README's.
fn script(w: &Walkthrough, mut port: impl FnMut(&str) -> u16) -> (String, Vec<(u16, String)>) {
    let ports = Regex::new(r"\b([A-Z]+_PORT)=(\d+)").unwrap();
    let mut text = String::from("set -eo pipefail\nexec 2>&1\n");
    let mut replaced = Vec::new();
    for (i, step) in w.steps.iter().enumerate() {
        text.push_str(&format!("printf '\\n@@step {i}@@\\n'\n"));
        for line in &step.script {
            let line = ports.replace_all(line, |c: &regex::Captures<'_>| {
                let actual = port(&c[1]);
                replaced.push((actual, c[2].to_owned()));
                format!("{}={actual}", &c[1])
            });
            text.push_str(&line);
            text.push('\n');
        }
    }
    (text, replaced)
}

/// Runs one walkthrough; the failures, with what was printed.
async fn run(w: &Walkthrough, python_bin: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::os::unix::fs::symlink(repo.join("tools"), dir.path().join("tools")).unwrap();
    let doppel_dir = Path::new(env!("CARGO_BIN_EXE_doppel")).parent().unwrap();
    let path = format!(
        "{}:{}:{}",
        doppel_dir.display(),
        python_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ports = std::collections::HashMap::new();
    let (text, replaced) = script(w, |name| {
        *ports.entry(name.to_owned()).or_insert_with(free_port)
    });
    // Addresses in the output show the README's ports.
    let readme_ports = |line: &str| {
        replaced
            .iter()
            .fold(line.to_owned(), |l, (actual, readme)| {
                l.replace(&format!(":{actual}"), &format!(":{readme}"))
            })
    };
    let mut child = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&text)
        .current_dir(dir.path())
        // `mktemp -d` makes its directories here too: gone with the walkthrough, and
        // their logs can be shown when it fails.
        .env("TMPDIR", dir.path())
        .env("PATH", path)
        .env_remove("TOKEN")
        // The test harness's own setting (which CQL node the ScyllaDB tests use) is not
        // the reader's: the walkthroughs name their nodes.
        .env_remove("DOPPEL_SCYLLA_NODES")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pgid = child.id().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let ran = tokio::time::timeout(WALKTHROUGH_DEADLINE, async {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).await.unwrap();
        (child.wait().await.unwrap(), out)
    })
    .await;
    // Whatever the walkthrough left running (its server) goes with it.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let heading = format!("README.md:{} ({})", w.line, w.heading);
    let (status, out) =
        ran.map_err(|_| format!("{heading}: still running after {WALKTHROUGH_DEADLINE:?}"))?;
    let out = String::from_utf8_lossy(&out).into_owned();
    let mut printed: Vec<Vec<&str>> = vec![Vec::new()];
    for line in out.lines() {
        if line.starts_with("@@step ") && line.ends_with("@@") {
            printed.push(Vec::new());
        } else if !line.trim().is_empty() {
            printed.last_mut().unwrap().push(line);
        }
    }
    let context = || {
        format!(
            "the script:\n{text}\nprinted:\n{out}\nthe logs:\n{}",
            logs(dir.path())
        )
    };
    if !status.success() {
        return Err(format!(
            "{heading}: the walkthrough failed ({status}) in step {}\n{}",
            printed.len().saturating_sub(2),
            context()
        ));
    }
    // Only what the README shows is compared: a step without `#>` lines may print anything.
    for (i, step) in w
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.expected.is_empty())
    {
        let actual = printed.get(i + 1).cloned().unwrap_or_default();
        let same = actual.len() == step.expected.len()
            && step
                .expected
                .iter()
                .zip(&actual)
                .all(|(e, a)| matches(e, &readme_ports(a)));
        if !same {
            return Err(format!(
                "{heading}: the commands at README.md:{} printed\n  {}\nbut the README shows\n  {}\n{}",
                step.line,
                actual.join("\n  "),
                step.expected.join("\n  "),
                context()
            ));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_walkthrough_in_the_readme_works_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let all = walkthroughs(&readme);
    assert!(all.len() >= 5, "the walkthroughs were found: {all:#?}");
    // A missing client would leave its walkthrough waiting until the deadline.
    for (tool, package) in [
        ("curl", "curl"),
        ("openssl", "openssl"),
        ("mosquitto_rr", "mosquitto-clients"),
        ("mosquitto_sub", "mosquitto-clients"),
        ("promtool", "prometheus"),
        ("redis-server", "redis-server"),
        ("redis-cli", "redis-tools"),
        ("kcat", "kcat"),
        ("java", "openjdk-17-jre-headless"),
    ] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .status()
            .unwrap();
        assert!(
            found.success(),
            "the walkthroughs need {tool}: apt-get install {package} (.ci/run does)"
        );
    }
    let python_bin = python_with_websockets();
    let results = futures_util::future::join_all(all.iter().map(|w| run(w, &python_bin))).await;
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn output_lines_match_with_masks_and_ellipses() {
    assert!(matches(
        r#"{"version":1,"timestamp":1795427141,"secret":"05bb4907…"}"#,
        &format!(
            r#"{{"version":1,"timestamp":1796079706,"secret":"{}"}}"#,
            "ab".repeat(32)
        ),
    ));
    assert!(matches(
        r#"{"at":"2026-11-23T12:02:54.433Z","token":"dpl_1_x"}"#,
        r#"{"at":"2026-12-01T00:00:00.001Z","token":"dpl_77_secret"}"#,
    ));
    assert!(!matches(r#"{"version":1}"#, r#"{"version":2}"#));
    assert!(!matches(r#"{"a":"b"}"#, r#"{"a":"b"} extra"#));
    assert!(matches("metadata {…} end", "metadata {\"x\":1} end"));
}

#[test]
fn steps_pair_commands_with_the_output_shown_under_them() {
    let readme = "## Demo\n```sh\nMQTT_PORT=1 HTTP_PORT=2\necho a\n#> a\n# next\necho b\n#> b\n```\n```sh norun\nnot run\n```\n";
    let all = walkthroughs(readme);
    assert_eq!(all.len(), 1);
    let steps: Vec<(Vec<String>, Vec<String>)> = all[0]
        .steps
        .iter()
        .map(|s| (s.script.clone(), s.expected.clone()))
        .collect();
    assert_eq!(
        steps,
        [
            (
                vec!["MQTT_PORT=1 HTTP_PORT=2".to_owned(), "echo a".to_owned()],
                vec!["a".to_owned()]
            ),
            (
                vec!["# next".to_owned(), "echo b".to_owned()],
                vec!["b".to_owned()]
            ),
        ]
    );
    let (text, replaced) = script(&all[0], |name| if name == "MQTT_PORT" { 11 } else { 22 });
    assert!(text.contains("MQTT_PORT=11 HTTP_PORT=22"), "{text}");
    assert_eq!(replaced, [(11, "1".to_owned()), (22, "2".to_owned())]);
}
