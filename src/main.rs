//! The `forkecho` binary: parse the command line, load the config, detach if asked, bind,
//! serve.
//!
//! Exit codes: 0 after a clean shutdown, 1 when the server cannot start or fails, 2 for a
//! configuration or usage error.

use std::os::fd::{AsFd, BorrowedFd};
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
    // The pid-file lock comes first; see `PidFile::lock`. Its fd survives daemonizing.
    let mut pid_file = match config.pid_file.as_deref().map(PidFile::lock).transpose() {
        Ok(pid_file) => pid_file,
        Err(e) => {
            eprintln!("forkecho: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    // Kept open through `--daemonize`, which closes every other inherited descriptor.
    let keep: Vec<_> = pid_file.iter().map(AsFd::as_fd).collect();
    let (mut readiness, log_on_ready) = match detach(&config, &keep) {
        Ok(detached) => detached,
        Err(message) => {
            eprintln!("forkecho: {message}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    logging::init(config.log_level);
    let mut from_systemd = 0;
    let listeners = match listen::from_systemd() {
        Ok(Some(passed)) => {
            from_systemd = passed.len();
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
    // SIGHUP re-runs exactly this load: the same file, the same command-line overrides.
    // (Without the user and group lookups: root is gone by then, and they could take seconds.)
    let reload: server::Reloader = Box::new(move |running| Config::reload(&cli, running));
    // From here on signals are requests handled by the loop, never default actions.
    let server = match server::Server::new(&config, listeners, reload) {
        Ok(server) => server,
        Err(e) => return startup_failed(&mut readiness, &format!("cannot set up the loop: {e}")),
    };
    // Written only now: a script that signals the pid as soon as it appears must not kill us.
    if let Some(pid_file) = &mut pid_file {
        if let Err(e) = pid_file.write_pid() {
            return startup_failed(&mut readiness, &e.to_string());
        }
    }
    // Last step with root: ports are bound, log and pid files are open. From here on neither
    // the parent nor any child it forks can do anything as root.
    if let Some(who) = &config.run_as {
        if let Err(message) = forkecho::privileges::drop_to(who) {
            return startup_failed(&mut readiness, &message);
        }
    }
    // Every startup failure is behind us: from here every line goes to `log_file`, if set (a
    // daemon's already does). Until now errors went to the terminal or the journal.
    if let Some(log) = log_on_ready {
        if let Err(e) = daemon::redirect_stderr(&log) {
            return startup_failed(&mut readiness, &format!("cannot log to the log file: {e}"));
        }
        // Only fd 2 may hold the file: after logrotate renamed it and SIGHUP reopened the log,
        // a second descriptor would keep the old file (and its disk space) for our whole life.
        drop(log);
        // The logger writes through its own non-blocking description of fd 2: renew it.
        logging::stderr_replaced();
    }
    if let Some(who) = &config.run_as {
        log::info!("running as {} (uid {}, gid {})", who.user, who.uid, who.gid);
    }
    if from_systemd > 0 {
        log::info!(
            "using {from_systemd} listening socket(s) passed by systemd; `listen` is not used"
        );
    }
    let ready = Box::new(move || {
        readiness.ready();
        forkecho::systemd::ready("serving");
    });
    let result = server.run(ready);
    // Held (locked) until here, then emptied and removed.
    if let Some(pid_file) = pid_file {
        pid_file.remove();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("server failed: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Opens `log_file` (here, so a bad path is reported on the terminal) and detaches if
/// `daemonize` is set, keeping `keep` open. Returns the report channel and, when not
/// detached, the log file to send stderr to once started: until then startup errors still
/// reach the terminal (or journal).
fn detach(
    config: &Config,
    keep: &[BorrowedFd<'_>],
) -> Result<(Readiness, Option<std::fs::File>), String> {
    let log = config
        .log_file
        .as_deref()
        .map(daemon::open_log)
        .transpose()?;
    if config.daemonize && daemon::started_by_systemd() {
        // A detached child would have another pid: systemd's sockets (LISTEN_PID) and its
        // notion of the main process would no longer be ours.
        eprintln!("forkecho: started by systemd; --daemonize is ignored");
    } else if config.daemonize {
        let readiness =
            daemon::daemonize(log, keep).map_err(|e| format!("cannot daemonize: {e}"))?;
        return Ok((readiness, None));
    }
    Ok((Readiness::none(), log))
}

/// A startup error: on stderr whatever the log level (RUST_LOG=off must not hide why we
/// stopped), and to the command waiting for a daemon's report.
fn startup_failed(readiness: &mut Readiness, message: &str) -> ExitCode {
    eprintln!("forkecho: {message}");
    readiness.failed(message);
    ExitCode::from(EXIT_FAILURE)
}
