//! The documentation a Unix user expects, kept in sync with the code: forkecho(8) from the
//! clap definition (clap_mangen), forkecho.toml(5) from the configuration keys' rows, and the
//! bash, zsh and fish completions (clap_complete). The copies in `config/man` and
//! `config/completions` are what a package installs; a test fails when one is stale, and
//! `FORKECHO_WRITE_DOCS=1 cargo test --test integration docs::` rewrites them.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use forkecho::config::Cli;

use crate::util::*;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// Compares `generated` with the checked-in file at `path`, or rewrites it when asked.
fn check_in_sync(path: &Path, generated: &[u8]) {
    if std::env::var_os("FORKECHO_WRITE_DOCS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, generated).unwrap();
        return;
    }
    let checked_in = std::fs::read(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is stale: run FORKECHO_WRITE_DOCS=1 cargo test --test integration docs::",
        path.display()
    );
}

/// forkecho(8), from the command line's definition.
fn man_page_8() -> Vec<u8> {
    let command = Cli::command()
        .version(env!("CARGO_PKG_VERSION"))
        .after_long_help(
            "The configuration file's keys are described in forkecho.toml(5); \
             `forkecho --help` lists every flag with its default.",
        );
    let mut page = Vec::new();
    clap_mangen::Man::new(command)
        .section("8")
        .manual("System Manager's Manual")
        .render(&mut page)
        .unwrap();
    page
}

/// Text for roff: backslashes doubled, a leading dot or quote made literal.
fn roff(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    match text.starts_with(['.', '\'']) {
        true => format!("\\&{text}"),
        false => text,
    }
}

/// forkecho.toml(5), from the keys' rows: each key with its flag, default and what a reload
/// does with it.
fn man_page_5() -> Vec<u8> {
    let mut page = String::new();
    page.push_str(&format!(
        ".TH FORKECHO.TOML 5 \"\" \"forkecho {}\" \"File Formats Manual\"\n",
        env!("CARGO_PKG_VERSION")
    ));
    page.push_str(".SH NAME\nforkecho.toml \\- configuration file of forkecho(8)\n");
    page.push_str(
        ".SH DESCRIPTION\n\
         A TOML file, given with \\fBforkecho \\-c\\fR \\fIFILE\\fR. Every key is optional; \
         a flag of the same name in kebab\\-case overrides the key \
         (\\fBidle_timeout\\fR: \\fB\\-\\-idle\\-timeout\\fR). Unknown keys, wrong types and \
         out\\-of\\-range values are errors that name the file, the key and the reason \
         (exit status 2). The file must be a regular file; it is read again on every reload \
         (SIGHUP, or \\fBforkecho reload\\fR). Relative paths in it are taken from its \
         directory. \\fBforkecho \\-c\\fR \\fIFILE\\fR \\fB\\-\\-check\\-config\\fR checks a \
         file without starting a server.\n\
         .PP\n\
         Addresses with settings of their own are given as \\fB[[listener]]\\fR tables, at \
         the end of the file, each with an \\fBaddress\\fR and optionally \
         \\fBproxy_protocol\\fR and \\fBtrusted_proxies\\fR.\n\
         .SH KEYS\n",
    );
    for key in forkecho::config::reference() {
        page.push_str(&format!(".TP\n.B {}\n", roff(key.name)));
        page.push_str(&format!("{}\n", roff(key.help)));
        if let Some(flag) = &key.flag {
            page.push_str(&format!(".br\nFlag: \\fB{}\\fR.\n", roff(flag)));
        }
        match key.default {
            Some(default) => page.push_str(&format!(".br\nDefault: {}.\n", roff(default))),
            None => page.push_str(".br\nDefault: unset.\n"),
        }
        page.push_str(&format!(".br\n{}\n", roff(&key.on_reload)));
    }
    page.push_str(
        ".SH FILES\n\
         .TP\n/etc/forkecho/forkecho.toml\n\
         The configuration the packaged service runs with.\n\
         .SH SEE ALSO\nforkecho(8)\n",
    );
    page.into_bytes()
}

fn completion(shell: clap_complete::Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "forkecho", &mut script);
    script
}

#[test]
fn the_man_pages_are_in_sync_with_the_code() {
    check_in_sync(&config_dir().join("man/forkecho.8"), &man_page_8());
    check_in_sync(&config_dir().join("man/forkecho.toml.5"), &man_page_5());
}

#[test]
fn the_shell_completions_are_in_sync_with_the_code() {
    use clap_complete::Shell;
    let dir = config_dir().join("completions");
    check_in_sync(&dir.join("forkecho.bash"), &completion(Shell::Bash));
    check_in_sync(&dir.join("_forkecho"), &completion(Shell::Zsh));
    check_in_sync(&dir.join("forkecho.fish"), &completion(Shell::Fish));
}

/// Every key has its entry in forkecho.toml(5), and every flag and command in forkecho(8).
#[test]
fn the_man_pages_name_every_key_flag_and_command() {
    let page5 = String::from_utf8(man_page_5()).unwrap();
    for key in forkecho::config::KEYS {
        assert!(page5.contains(&format!(".B {}\n", roff(key))), "{key}");
    }
    let page8 = String::from_utf8(man_page_8()).unwrap();
    for word in [
        "idle\\-timeout",
        "status",
        "reload",
        "stop",
        "reopen\\-logs",
    ] {
        assert!(page8.contains(word), "forkecho(8) lacks {word}");
    }
    // man(1) can render both (where it is installed).
    if std::process::Command::new("man")
        .arg("--version")
        .output()
        .is_ok()
    {
        for page in ["man/forkecho.8", "man/forkecho.toml.5"] {
            let out = std::process::Command::new("man")
                .arg("-l")
                .arg(config_dir().join(page))
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "100")
                .output()
                .unwrap();
            assert!(out.status.success(), "man -l {page}: {out:?}");
            assert!(!out.stdout.is_empty(), "man -l {page} printed nothing");
        }
    }
}

/// `--version` says the package version, the commit and how the binary is linked.
#[test]
fn version_names_the_commit_and_the_linkage() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let expected = format!("forkecho {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&expected), "{text}");
    assert!(
        text.contains(", static build)") || text.contains(", dynamic build)"),
        "{text}"
    );
}
