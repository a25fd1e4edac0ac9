//! Records the commit the binary is built from, for `doppel --version` and the
//! `doppel_build_info` metric: `DOPPEL_COMMIT` when set (the container build, which has no
//! `.git`), else `git rev-parse` when building from a clone, else `unknown` (a source
//! archive). Rebuilds when HEAD moves.

use std::process::Command;

fn main() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
    };
    println!("cargo:rerun-if-env-changed=DOPPEL_COMMIT");
    let commit = std::env::var("DOPPEL_COMMIT")
        .ok()
        .filter(|c| !c.is_empty() && c != "unknown" && c.bytes().all(|b| b.is_ascii_alphanumeric()))
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=DOPPEL_COMMIT={commit}");
    // HEAD names the branch; the branch's ref (or packed-refs) moves with each commit.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/packed-refs");
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{head}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
