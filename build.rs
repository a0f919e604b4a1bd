//! Build facts for `forkecho --version`: the commit the binary was built from (`git`, when the
//! source is a checkout; "unknown" otherwise) and whether it is linked statically (see
//! `.cargo/config.toml`).

use std::process::Command;

fn main() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|s| s.trim().to_string())
    };
    // Plumbing that only reads: `git status` would refresh (write) the index.
    let dirty = || {
        Command::new("git")
            .args(["diff-index", "--quiet", "HEAD", "--"])
            .status()
            .is_ok_and(|status| status.code() == Some(1))
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]).filter(|s| !s.is_empty()) {
        // Uncommitted changes are not that commit.
        Some(commit) if dirty() => format!("{commit}-dirty"),
        Some(commit) => commit,
        None => "unknown".into(),
    };
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let linkage = match features.split(',').any(|f| f == "crt-static") {
        true => "static",
        false => "dynamic",
    };
    println!("cargo:rustc-env=FORKECHO_COMMIT={commit}");
    println!("cargo:rustc-env=FORKECHO_LINKAGE={linkage}");
    // A new commit changes HEAD or the branch it names; in a worktree `.git` is a file, and
    // git says where its directories are. An edited source makes the tree dirty.
    let dirs = [
        git(&["rev-parse", "--absolute-git-dir"]),
        git(&["rev-parse", "--git-common-dir"]),
    ];
    for dir in dirs.into_iter().flatten() {
        for name in ["HEAD", "refs/heads", "packed-refs"] {
            let path = std::path::Path::new(&dir).join(name);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    for path in ["build.rs", "src", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={path}");
    }
}
