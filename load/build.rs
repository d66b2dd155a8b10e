//! Records which engine the benchmark binary was built from: the git commit and whether the
//! engine's sources (`src/`, `actors/`, `migrations/`) had uncommitted changes at build time.
//! The tree is shared and changes under a running benchmark, so the commit at run time is not
//! enough to say what was measured.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn main() {
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&[
        "status",
        "--porcelain",
        "--",
        "../src",
        "../actors",
        "../migrations",
        "../Cargo.toml",
    ])
    .map_or_else(
        || "unknown".into(),
        |status| (!status.is_empty()).to_string(),
    );
    println!("cargo:rustc-env=SOLOIST_LOAD_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=SOLOIST_LOAD_BUILD_ENGINE_DIRTY={dirty}");
    for path in [
        "../src",
        "../actors/src",
        "../migrations",
        "../.git/HEAD",
        "../.git/index",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
}
