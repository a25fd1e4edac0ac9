//! The deploy files, checked as CI can without a container engine: the Kubernetes
//! manifests with `kubernetes-validate` (PyPI, the API's schemas offline), the Compose
//! file against the Compose specification's schema (`check-jsonschema`, PyPI), the
//! Compose setup's Prometheus configuration with promtool, and what each file asks of the
//! binary (its settings, ports, probes, user) against the binary itself.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const CHECK_JSONSCHEMA: &str = "check-jsonschema==0.39.0";

fn file(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn run(program: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

fn venv_tool(package: &str, tool: &str) -> PathBuf {
    common::python_venv("deploy-venv", package)
        .join("bin")
        .join(tool)
}

/// Every `DOPPEL_*` name a deploy file sets must be a setting of `doppel serve`: a
/// misspelt one would be ignored, and the node would start with the default.
fn settings_are_real(path: &str) {
    let help = Command::new(env!("CARGO_BIN_EXE_doppel"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let text = file(path);
    let mut names: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("DOPPEL_") && *w != "DOPPEL_COMMIT")
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(!names.is_empty(), "{path} sets no setting");
    for name in names {
        assert!(
            help.contains(&format!("[env: {name}]")),
            "{path} sets {name}, which `doppel serve --help` does not know"
        );
    }
}

#[test]
fn the_kubernetes_manifests_are_valid_and_probe_what_the_server_serves() {
    let tool = venv_tool(KUBERNETES_VALIDATE, "kubernetes-validate");
    let path = "deploy/kubernetes/doppel.yaml";
    let (valid, said) = run(&tool, &["--strict", path]);
    assert!(valid, "kubernetes-validate --strict {path}:\n{said}");
    for kind in [
        "statefulset/doppel",
        "poddisruptionbudget/doppel",
        "service/doppel-headless",
        "service/doppel-mqtt",
        "service/doppel-http",
    ] {
        assert!(
            said.contains(&format!("passed for resource {kind}")),
            "{kind} missing:\n{said}"
        );
    }
    let text = file(path);
    for wanted in [
        "path: /readyz",
        "path: /healthz",
        "runAsNonRoot: true",
        "runAsUser: 10001",
        "containerPort: 1883",
        "containerPort: 8883",
        "containerPort: 8080",
    ] {
        assert!(text.contains(wanted), "{path} lacks {wanted:?}");
    }
    settings_are_real(path);
}

#[test]
fn the_compose_file_follows_the_compose_specification() {
    let tool = venv_tool(CHECK_JSONSCHEMA, "check-jsonschema");
    let path = "deploy/compose/compose.yaml";
    let (valid, said) = run(&tool, &["--builtin-schema", "vendor.compose-spec", path]);
    assert!(valid, "check-jsonschema (compose-spec) {path}:\n{said}");
    settings_are_real(path);
    // Every file it mounts from the repository exists.
    let text = file(path);
    for line in text.lines().map(str::trim) {
        if let Some(mount) = line
            .strip_prefix("- ./")
            .or_else(|| line.strip_prefix("- ../"))
        {
            let relative = if line.starts_with("- ./") { "" } else { "../" };
            let source = mount.split(':').next().unwrap();
            let on_disk = Path::new(ROOT)
                .join("deploy/compose")
                .join(relative)
                .join(source);
            assert!(
                on_disk.is_file(),
                "{path} mounts {source}, which is not there ({})",
                on_disk.display()
            );
        }
    }
}

#[test]
fn the_compose_prometheus_configuration_passes_promtool() {
    let promtool = Command::new("sh")
        .args(["-c", "command -v promtool"])
        .output()
        .unwrap();
    assert!(
        promtool.status.success(),
        "promtool is not installed: apt-get install prometheus (.ci/run does)"
    );
    let promtool = PathBuf::from(String::from_utf8(promtool.stdout).unwrap().trim());
    // As mounted in the container: the configuration with alerts.yml beside it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        file("deploy/compose/prometheus.yml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("alerts.yml"),
        file("deploy/prometheus/alerts.yml"),
    )
    .unwrap();
    let config = dir.path().join("prometheus.yml");
    let (valid, said) = run(&promtool, &["check", "config", config.to_str().unwrap()]);
    assert!(valid, "promtool check config:\n{said}");
    assert!(file("deploy/compose/prometheus.yml").contains("\"doppel:8080\""));
}

#[test]
fn the_dockerfile_builds_in_stages_and_runs_the_binary_unprivileged() {
    let text = file("deploy/Dockerfile");
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(froms >= 2, "a multi-stage build: {froms} FROM");
    assert!(
        instructions
            .iter()
            .any(|l| l.starts_with("COPY --from=build /usr/local/bin/doppel "))
    );
    assert!(text.contains("install -m 0755 target/release/doppel /usr/local/bin/doppel"));
    let user = instructions
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER");
    assert!(
        !user.starts_with("0") && !user.starts_with("root"),
        "runs as {user}"
    );
    assert!(instructions.contains(&r#"ENTRYPOINT ["/usr/local/bin/doppel"]"#));
    assert!(instructions.contains(&"EXPOSE 1883 8883 8080"));
    settings_are_real("deploy/Dockerfile");
    // The build context leaves out what would make it huge or leak the checkout.
    let ignored = file(".dockerignore");
    for path in ["target", ".git", "doppel-data"] {
        assert!(
            ignored.lines().any(|l| l.trim() == path),
            ".dockerignore lacks {path}"
        );
    }
}
