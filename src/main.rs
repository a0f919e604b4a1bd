//! The `forkecho` binary: parse the command line, load the config, detach if asked, bind,
//! serve.
//!
//! Exit codes: 0 after a clean shutdown, 1 when the server cannot start or fails, 2 for a
//! configuration or usage error.

use std::process::ExitCode;

use clap::Parser;
use forkecho::config::{Cli, Config};
use forkecho::daemon::{self, Readiness};
use forkecho::pidfile::PidFile;
use forkecho::{listen, logging, server};

const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // Paths given on the command line are relative to where forkecho was started; a daemon
    // works from /, and a reload must find the same config file.
    for path in [&mut cli.config, &mut cli.pid_file, &mut cli.log_file]
        .into_iter()
        .flatten()
    {
        if let Ok(absolute) = std::path::absolute(&*path) {
            *path = absolute;
        }
    }
    let config = match Config::load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("forkecho: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    let mut readiness = match detach_and_redirect(&config) {
        Ok(readiness) => readiness,
        Err(message) => {
            eprintln!("forkecho: {message}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    logging::init(config.log_level);
    let listeners = match listen::from_systemd() {
        Ok(Some(passed)) => {
            log::info!(
                "using {} listening socket(s) passed by systemd; `listen` is not used",
                passed.len()
            );
            passed
        }
        Ok(None) => match listen::bind_all(&config.listen, config.backlog, config.reuse_port) {
            Ok(listeners) => listeners,
            Err(e) => return startup_failed(&mut readiness, &e.to_string()),
        },
        Err(e) => {
            let message = format!("cannot use the sockets passed by systemd: {e}");
            return startup_failed(&mut readiness, &message);
        }
    };
    // After binding, so a pid file names a daemon that is listening; held (locked) until
    // main returns, then removed.
    let _pid_file = match config.pid_file.as_deref().map(PidFile::create).transpose() {
        Ok(pid_file) => pid_file,
        Err(e) => return startup_failed(&mut readiness, &e.to_string()),
    };
    // Last step with root: ports are bound, log and pid files are open. From here on neither
    // the parent nor any child it forks can do anything as root.
    if let Some(who) = &config.run_as {
        if let Err(message) = forkecho::privileges::drop_to(who) {
            return startup_failed(&mut readiness, &message);
        }
        log::info!("running as {} (uid {}, gid {})", who.user, who.uid, who.gid);
    }
    // SIGHUP re-runs exactly this load: the same file, the same command-line overrides.
    let reload: server::Reloader = Box::new(move || Config::load(&cli));
    let ready = Box::new(move || {
        readiness.ready();
        forkecho::systemd::ready("serving");
    });
    match server::run(&config, listeners, reload, ready) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("server failed: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Opens `log_file` (here, so a bad path is reported on the terminal), then detaches if
/// `daemonize` is set, or else sends stderr to the log file.
fn detach_and_redirect(config: &Config) -> Result<Readiness, String> {
    let log = match &config.log_file {
        Some(path) => Some(daemon::open_log(path).map_err(|e| {
            format!(
                "cannot open log file {}: {}",
                path.display(),
                forkecho::os_error_text(&e)
            )
        })?),
        None => None,
    };
    if config.daemonize {
        return daemon::daemonize(log).map_err(|e| format!("cannot daemonize: {e}"));
    }
    if let Some(log) = &log {
        daemon::redirect_stderr(log).map_err(|e| format!("cannot log to the log file: {e}"))?;
    }
    Ok(Readiness::none())
}

/// A startup error: on stderr whatever the log level (RUST_LOG=off must not hide why we
/// stopped), and to the command waiting for a daemon's report.
fn startup_failed(readiness: &mut Readiness, message: &str) -> ExitCode {
    eprintln!("forkecho: {message}");
    readiness.failed(message);
    ExitCode::from(EXIT_FAILURE)
}
