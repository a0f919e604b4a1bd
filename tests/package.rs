//! The Debian package, built by `cargo deb` from the metadata in Cargo.toml: what it holds, its
//! maintainer scripts, and the installed binary and default configuration. Where
//! `FORKECHO_TEST_INSTALL=1` (set by `.ci/run`, on a disposable machine, as root), the package
//! is also installed for real with `dpkg -i` and purged afterwards.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::util::*;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

fn succeeded(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cargo() -> Command {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.current_dir(MANIFEST_DIR);
    cargo
}

/// The target triple `.cargo/config.toml` builds for: where the release binary is.
fn build_target() -> String {
    let config = std::fs::read_to_string(Path::new(MANIFEST_DIR).join(".cargo/config.toml"))
        .unwrap_or_default();
    config
        .lines()
        .find_map(|line| line.trim().strip_prefix("target = "))
        .map(|quoted| quoted.trim_matches('"').to_string())
        .expect("build.target in .cargo/config.toml")
}

/// One package build at a time: cargo-deb stages its files under `target/`.
static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Builds the release binary and the package into `dir`; `None` where cargo-deb is missing.
fn build_package(dir: &Path) -> Option<PathBuf> {
    let _one_at_a_time = BUILDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let has_cargo_deb = cargo()
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_cargo_deb {
        eprintln!(
            "skipping the package test: cargo-deb is not installed (cargo install cargo-deb)"
        );
        return None;
    }
    let target = build_target();
    let out = cargo()
        .args([
            "build",
            "--release",
            "--locked",
            "--bin",
            "forkecho",
            "--target",
            &target,
        ])
        .output()
        .unwrap();
    succeeded("cargo build --release", &out);
    let deb = dir.join("forkecho.deb");
    let out = cargo()
        .args(["deb", "--no-build", "--target", &target, "--output"])
        .arg(&deb)
        .output()
        .unwrap();
    succeeded("cargo deb", &out);
    Some(deb)
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .unwrap();
    succeeded(&format!("dpkg-deb {args:?}"), &out)
}

#[test]
fn the_debian_package_holds_what_an_installation_needs() {
    let dir = TempDir::new();
    let Some(deb) = build_package(dir.path()) else {
        return;
    };
    let listing = dpkg_deb(&["-c"], &deb);
    for path in [
        "./usr/bin/forkecho",
        "./usr/share/man/man8/forkecho.8.gz",
        "./usr/share/man/man5/forkecho.toml.5.gz",
        "./usr/share/bash-completion/completions/forkecho",
        "./usr/share/zsh/vendor-completions/_forkecho",
        "./usr/share/fish/vendor_completions.d/forkecho.fish",
        "./usr/lib/systemd/system/forkecho.service",
        "./usr/lib/systemd/system/forkecho.socket",
        "./etc/forkecho/forkecho.toml",
        "./etc/logrotate.d/forkecho",
        "./usr/share/doc/forkecho/copyright",
    ] {
        assert!(
            listing.lines().any(|line| line.ends_with(path)),
            "the package lacks {path}:\n{listing}"
        );
    }
    assert!(
        listing.contains("-rwxr-xr-x 0/0") && listing.contains("./usr/bin/forkecho"),
        "{listing}"
    );
    let fields = dpkg_deb(&["-f"], &deb);
    assert!(fields.contains("Depends: adduser"), "{fields}");

    // Maintainer scripts: the system user, the units' handling, valid shell.
    let control = dir.path().join("control");
    let out = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(&control)
        .output()
        .unwrap();
    succeeded("dpkg-deb -e", &out);
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles.contains("/etc/forkecho/forkecho.toml"),
        "{conffiles}"
    );
    assert!(
        conffiles.contains("/etc/logrotate.d/forkecho"),
        "{conffiles}"
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system"), "{postinst}");
    assert!(postinst.contains("deb-systemd-helper"), "{postinst}");
    assert!(!postinst.contains("#DEBHELPER#"), "{postinst}");
    for script in ["postinst", "postrm", "prerm"] {
        let path = control.join(script);
        if path.exists() {
            let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
            succeeded(&format!("sh -n {script}"), &out);
        }
    }

    // The files as installed, in a scratch root: the binary runs, and the default
    // configuration it ships is valid.
    let root = dir.path().join("root");
    let out = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .output()
        .unwrap();
    succeeded("dpkg-deb -x", &out);
    let binary = root.join("usr/bin/forkecho");
    let version = Command::new(&binary).arg("--version").output().unwrap();
    let version = succeeded("forkecho --version", &version);
    assert!(
        version.starts_with(&format!("forkecho {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let config = root.join("etc/forkecho/forkecho.toml");
    let check = Command::new(&binary)
        .arg("-c")
        .arg(&config)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(
        succeeded("--check-config", &check).trim(),
        "configuration OK"
    );
}

/// `dpkg -i` for real, then `dpkg --purge`: only where asked (CI), as root.
#[test]
fn the_debian_package_installs_and_purges() {
    if std::env::var_os("FORKECHO_TEST_INSTALL").is_none() {
        eprintln!("skipping the real install: set FORKECHO_TEST_INSTALL=1 (CI does)");
        return;
    }
    if !is_root_or_skip("dpkg -i") {
        return;
    }
    let dir = TempDir::new();
    let Some(deb) = build_package(dir.path()) else {
        return;
    };
    let install = Command::new("dpkg").arg("-i").arg(&deb).output().unwrap();
    let purge = || {
        let _ = Command::new("dpkg").args(["--purge", "forkecho"]).output();
    };
    if !install.status.success() {
        purge();
    }
    succeeded("dpkg -i", &install);
    let checks = || {
        let version = Command::new("/usr/bin/forkecho")
            .arg("--version")
            .output()
            .unwrap();
        succeeded("forkecho --version", &version);
        let check = Command::new("/usr/bin/forkecho")
            .args(["-c", "/etc/forkecho/forkecho.toml", "--check-config"])
            .output()
            .unwrap();
        assert_eq!(
            succeeded("--check-config", &check).trim(),
            "configuration OK"
        );
        let user = Command::new("getent")
            .args(["passwd", "forkecho"])
            .output()
            .unwrap();
        succeeded("getent passwd forkecho (the system user)", &user);
        // The installed units, with the installed binary and man pages they name.
        if Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok()
        {
            let verify = Command::new("systemd-analyze")
                .args(["verify", "/usr/lib/systemd/system/forkecho.socket"])
                .arg("/usr/lib/systemd/system/forkecho.service")
                .output()
                .unwrap();
            let complaints = String::from_utf8_lossy(&verify.stderr);
            assert!(
                verify.status.success() && !complaints.contains("forkecho"),
                "systemd-analyze verify: {complaints}"
            );
        }
        // No server runs: the control command says so with pg_ctl's code.
        let status = Command::new("/usr/bin/forkecho")
            .args(["--control-socket", "/run/forkecho/control.sock", "status"])
            .output()
            .unwrap();
        assert_eq!(status.status.code(), Some(3), "{status:?}");
    };
    let checked = std::panic::catch_unwind(checks);
    purge();
    assert!(
        !Path::new("/usr/bin/forkecho").exists(),
        "dpkg --purge left /usr/bin/forkecho"
    );
    if let Err(panic) = checked {
        std::panic::resume_unwind(panic);
    }
}
