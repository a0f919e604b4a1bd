//! Build facts for `forkecho --version`: the commit the binary was built from (`git`, when the
//! source is a checkout; "unknown" otherwise) and whether it is linked statically (see
//! `.cargo/config.toml`).

use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let linkage = match features.split(',').any(|f| f == "crt-static") {
        true => "static",
        false => "dynamic",
    };
    println!("cargo:rustc-env=FORKECHO_COMMIT={commit}");
    println!("cargo:rustc-env=FORKECHO_LINKAGE={linkage}");
    // A new commit changes HEAD or the branch it names.
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
