//! The `forkecho` binary: parse the command line, load the config, detach if asked, bind,
//! serve.
//!
//! Exit codes: 0 after a clean shutdown, 1 when the server cannot start or fails, 2 for a
//! configuration or usage error.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStringExt;
use std::process::ExitCode;

use clap::Parser;
use forkecho::config::{Cli, Config};
use forkecho::daemon::{self, Readiness};
use forkecho::pidfile::PidFile;
use forkecho::{listen, logging, server};

/// Why forkecho ends other than by a clean shutdown; each kind is one exit code.
enum Failure {
    /// The configuration (file or flags) is wrong: exit 2.
    Config(String),
    /// The server could not start: exit 1.
    Start(String),
    /// The loop failed while serving (its children were killed and reaped first): exit 1.
    Serve(std::io::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Config(m) | Failure::Start(m) => f.write_str(m),
            Failure::Serve(e) => write!(f, "server failed: {e}"),
        }
    }
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Config(_) => 2,
            Failure::Start(_) | Failure::Serve(_) => 1,
        }
    }
}

/// The path this binary was started by (see `start_path`), taken before anything could change
/// the working directory (`--daemonize` moves to /).
static START_PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The directory this binary was started in, taken at once: relative paths in its arguments
/// are from there, for an upgrade too.
static START_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    // First, while no thread exists: it takes the upgrade's variables out of the environment.
    let _ = forkecho::upgrade::state_fd_from_env();
    START_PATH.get_or_init(start_path);
    START_DIR.get_or_init(|| std::env::current_dir().unwrap_or_else(|_| "/".into()));
    let cli = match Cli::try_parse() {
        Ok(cli) => with_absolute_paths(cli),
        Err(e) => match forkecho::upgrade::state_fd_from_env() {
            // Started by an upgrade with a command line this binary refuses: the previous
            // image takes over again.
            Some(state_fd) => {
                let why = forkecho::upgrade::roll_back(state_fd, &e.to_string());
                eprintln!("forkecho: {e}; {why}");
                return ExitCode::from(2);
            }
            None => e.exit(),
        },
    };
    if let Some(command) = cli.command {
        return control(&cli, command.command());
    }
    let mut readiness = Readiness::none();
    let failure = match start_and_serve(cli, &mut readiness) {
        Ok(()) => return ExitCode::SUCCESS,
        Err(failure) => failure,
    };
    match &failure {
        // On stderr whatever the log level (RUST_LOG=off must not hide why we stopped), and
        // to the command waiting for a daemon's report.
        Failure::Config(message) | Failure::Start(message) => {
            eprintln!("forkecho: {message}");
            readiness.failed(message);
        }
        Failure::Serve(e) => log::error!("server failed: {e}"),
    }
    ExitCode::from(failure.exit_code())
}

/// `forkecho status | reload | stop | reopen-logs`: asks the running server and says what it
/// answered; the exit code is the answer's (see `forkecho::control`), 2 if the server cannot
/// be found from the configuration.
fn control(cli: &Cli, command: forkecho::control::Command) -> ExitCode {
    use forkecho::control::{self, Outcome, Sent};
    let path = match Config::control_socket_of(cli) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("forkecho: {e}");
            return ExitCode::from(2);
        }
    };
    let sent = control::send(&path, command);
    match &sent {
        Sent::Answered(Outcome::Ok, text) if !text.is_empty() => println!("{text}"),
        Sent::Answered(Outcome::Ok, _) => {}
        Sent::Answered(_, text) | Sent::Failed(text) => eprintln!("forkecho: {text}"),
        // pg_ctl's habit: "no server running" is the status, on stdout.
        Sent::NoServer(text) => println!("forkecho: {text}"),
    }
    ExitCode::from(sent.exit_code())
}

/// The config file's path is relative to where forkecho was started; a daemon works from /,
/// and a reload must find the same file. (Path keys given as flags are made absolute as they
/// are parsed: see `config::flags`.)
fn with_absolute_paths(mut cli: Cli) -> Cli {
    if let Some(path) = &mut cli.config {
        if let Ok(absolute) = std::path::absolute(&*path) {
            *path = absolute;
        }
    }
    cli
}

/// Everything from the configuration to the end of the loop. `readiness` becomes the report
/// channel once detached; it is handed to the loop, which reports `ok` once serving.
fn start_and_serve(cli: Cli, readiness: &mut Readiness) -> Result<(), Failure> {
    // `--` ends the options and starts the program; alone, it would silently mean the echo.
    if std::env::args_os().skip(1).any(|arg| arg == "--") && !cli.keys.gives("exec") {
        return Err(Failure::Config(
            "command line: key `exec`: `--` must be followed by the program to run".into(),
        ));
    }
    if cli.check_config {
        // Also what the host would refuse at start, found without disturbing a running
        // instance.
        // Before an upgrade, the running configuration comes on stdin.
        let running = forkecho::upgrade::is_upgrade_check()
            .then(read_running_config)
            .flatten();
        Config::check_text(&cli, running.as_deref()).map_err(|e| Failure::Config(e.to_string()))?;
        check_upgrade_format()?;
        println!("configuration OK");
        return Ok(());
    }
    if let Some(state_fd) = forkecho::upgrade::state_fd_from_env() {
        // Whatever keeps this image from serving hands back to the previous one.
        let state = forkecho::upgrade::State::read_from(state_fd)
            .map_err(|e| roll_back(state_fd, Failure::Start(e)))?;
        // A native crash from here until serving hands back too.
        forkecho::upgrade::crash::arm(state_fd, &state)
            .map_err(|e| roll_back(state_fd, Failure::Start(format!("preparing: {e}"))))?;
        // The configuration the running image had, not the file as it is now.
        return match Config::load_as_running(&cli, state.config_text.as_deref()) {
            Ok(config) => continue_after_upgrade(cli, &config, state_fd, state),
            Err(e) => Err(roll_back(state_fd, Failure::Config(e.to_string()))),
        };
    }
    let config = Config::load(&cli).map_err(|e| Failure::Config(e.to_string()))?;
    // The pid-file lock comes first; see `PidFile::lock`. Its fd survives daemonizing.
    let pid_file = config.pid_file.as_deref().map(PidFile::lock).transpose();
    let mut pid_file = pid_file.map_err(|e| Failure::Start(e.to_string()))?;
    // Kept open through `--daemonize`, which closes every other inherited descriptor.
    let keep: Vec<_> = pid_file.iter().map(AsFd::as_fd).collect();
    let log_on_ready;
    (*readiness, log_on_ready) = detach(&config, &keep).map_err(Failure::Start)?;
    logging::set_format(config.log_format);
    logging::init(config.log_level.filter());
    let (listeners, from_systemd) = listeners(&config)?;
    let passed = if from_systemd { listeners.len() } else { 0 };
    // SIGHUP re-runs exactly this load: the same file, the same command-line overrides.
    // (Without the user and group lookups: root is gone by then, and they could take seconds.)
    let reload: server::Reloader = Box::new(move |running| Config::reload(&cli, running));
    // From here on signals are requests handled by the loop, never default actions.
    let control = control_socket(&config)?;
    let metrics = metrics_endpoint(&config)?;
    let mut server = server::Server::new(&config, listeners, control, metrics, reload)
        .map_err(|e| Failure::Start(format!("cannot set up the loop: {e}")))?;
    // Written only now: a script that signals the pid as soon as it appears must not kill us.
    if let Some(pid_file) = &mut pid_file {
        pid_file
            .write_pid()
            .map_err(|e| Failure::Start(e.to_string()))?;
    }
    // Last step with root: ports are bound, log and pid files are open. From here on neither
    // the parent nor any child it forks can do anything as root.
    if let Some(who) = &config.run_as {
        forkecho::privileges::drop_to(who).map_err(Failure::Start)?;
    }
    // Every startup failure is behind us: from here every line goes to `log_file`, if set (a
    // daemon's already does). Until now errors went to the terminal or the journal.
    if let Some(log) = log_on_ready {
        daemon::redirect_stderr(&log)
            .map_err(|e| Failure::Start(format!("cannot log to the log file: {e}")))?;
        // Only fd 2 may hold the file: after logrotate renamed it and SIGHUP reopened the log,
        // a second descriptor would keep the old file (and its disk space) for our whole life.
        drop(log);
        // The logger writes through its own non-blocking description of fd 2: renew it.
        logging::stderr_replaced();
    }
    if let Some(who) = &config.run_as {
        log::info!("running as {} (uid {}, gid {})", who.user, who.uid, who.gid);
    }
    if passed > 0 {
        log::info!("using {passed} listening socket(s) passed by systemd; `listen` is not used");
    }
    let mut report = std::mem::take(readiness);
    let ready = Box::new(move || {
        report.ready();
        forkecho::systemd::ready("serving");
    });
    server.prepare_upgrades(upgrade_context(pid_file.as_ref()));
    let result = server.run(ready);
    // Held (locked) until here, then emptied and removed.
    if let Some(pid_file) = pid_file {
        pid_file.remove();
    }
    result.map_err(Failure::Serve)
}

/// The listening sockets: those systemd passed (socket activation; then `true`), or `listen`
/// bound now.
fn listeners(config: &Config) -> Result<(Vec<listen::Listener>, bool), Failure> {
    match listen::from_systemd() {
        Ok(Some(passed)) => Ok((passed, true)),
        Ok(None) => listen::bind_all(&config.listen, &config.bind_settings())
            .map(|bound| (bound, false))
            .map_err(|e| Failure::Start(e.to_string())),
        Err(e) => Err(Failure::Start(format!(
            "cannot use the sockets passed by systemd: {e}"
        ))),
    }
}

/// The path this binary was started by, as the command named it (made absolute, or found in
/// PATH): an upgrade executes whatever that path names then, a symbolic link repointed to a
/// new version included. `/proc/self/exe` would name the old link's target.
fn start_path() -> std::path::PathBuf {
    let fallback = || std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let Some(arg0) = std::env::args_os().next() else {
        return fallback();
    };
    let named = std::path::PathBuf::from(&arg0);
    if named.components().count() > 1 || named.is_absolute() {
        return std::path::absolute(&named).unwrap_or_else(|_| fallback());
    }
    // A bare name: where PATH found it (the first executable of that name).
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(&named))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(fallback)
}

/// Before an upgrade: the running configuration file's text, which the running image passes
/// on stdin (at most the size a config file may have); None when nothing came.
fn read_running_config() -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::io::stdin()
        .take(32 << 20)
        .read_to_string(&mut text)
        .ok()?;
    (!text.is_empty()).then_some(text)
}

/// Before an upgrade (see `forkecho::upgrade`): whether this binary reads the state format
/// the running one writes.
fn check_upgrade_format() -> Result<(), Failure> {
    use forkecho::upgrade;
    let Some(theirs) = std::env::var_os(upgrade::CHECK_ENV) else {
        return Ok(());
    };
    match theirs.to_str().and_then(|s| s.parse::<u32>().ok()) {
        Some(format) if format == upgrade::FORMAT => Ok(()),
        _ => Err(Failure::Config(format!(
            "this binary reads upgrade state format {}, the running one writes {}",
            upgrade::FORMAT,
            theirs.to_string_lossy()
        ))),
    }
}

/// What an upgrade in place needs to start the next image: the binary's path as it was at
/// start (`/proc/self/exe`; a package upgrade replaces the file there), the arguments, and the
/// pid file.
fn upgrade_context(pid_file: Option<&PidFile>) -> server::UpgradeContext {
    use std::os::fd::AsRawFd;
    server::UpgradeContext {
        start_dir: START_DIR
            .get_or_init(|| std::env::current_dir().unwrap_or_else(|_| "/".into()))
            .clone(),
        exe: START_PATH.get_or_init(start_path).clone(),
        args: std::env::args_os().collect(),
        pid_file: pid_file.map(|p| (p.as_fd().as_raw_fd(), p.path().to_path_buf())),
    }
}

/// The start of an image an upgrade executed (see `forkecho::upgrade`): no binding, no pid
/// file to lock, no daemonizing, no root to drop; the previous image's descriptors and state
/// are taken over, and the control command that asked is answered.
fn continue_after_upgrade(
    cli: Cli,
    config: &Config,
    state_fd: std::os::fd::RawFd,
    state: forkecho::upgrade::State,
) -> Result<(), Failure> {
    use forkecho::upgrade;
    // Until serving, a failure hands back to the previous image: taken while every descriptor
    // adopted so far is still open (`back` is called before any of them is dropped).
    let back = |failure: Failure| roll_back(state_fd, failure);
    upgrade::start_adopting();
    // A daemon works from / (the previous image moved to where it was started, to parse the
    // same arguments the same way).
    if config.daemonize {
        let _ = std::env::set_current_dir("/");
    }
    let rolled_back = upgrade::rolled_back().map(str::to_string);
    logging::set_format(config.log_format);
    logging::init(config.log_level.filter());
    let adopt_failed = |e: std::io::Error| Failure::Start(format!("adopting a descriptor: {e}"));
    let pid_file = state
        .pid_file
        .as_ref()
        .map(PidFile::adopt)
        .transpose()
        .map_err(|e| Failure::Start(e.to_string()))
        .map_err(back)?;
    let listeners = state
        .listeners
        .iter()
        .map(listen::Listener::adopt)
        .collect::<Result<Vec<_>, _>>()
        .map_err(adopt_failed)
        .map_err(back)?;
    let control = state.control.as_ref().map(listen::Listener::adopt);
    let control = control.transpose().map_err(adopt_failed).map_err(back)?;
    let metrics = state.metrics.as_ref().map(listen::Listener::adopt);
    let metrics = metrics.transpose().map_err(adopt_failed).map_err(back)?;
    let reload: server::Reloader = Box::new(move |running| Config::reload(&cli, running));
    let mut server = server::Server::new(config, listeners, control, metrics, reload)
        .map_err(|e| Failure::Start(format!("cannot set up the loop: {e}")))
        .map_err(back)?;
    // A panic from here until serving hands back too, before unwinding would close what was
    // adopted (the listeners, the pid file).
    let serving_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::process::id() == forkecho::upgrade::adopting_pid() {
            let why = forkecho::upgrade::roll_back(state_fd, &format!("panicked: {info}"));
            eprintln!("forkecho: {why}");
        }
        serving_hook(info);
    }));
    server
        .restore(&state.server)
        .map_err(Failure::Start)
        .map_err(back)?;
    // The last moment a failure hands back: everything is taken over but nothing served.
    upgrade::crash::crash_if_a_test_asks();
    forkecho::upgrade::stop_adopting();
    upgrade::crash::disarm();
    server
        .took_over()
        .map_err(|e| Failure::Start(format!("unblocking signals: {e}")))?;
    // Serving from here: nothing more to roll back to, so the state and the previous
    // executable are let go.
    drop(upgrade::adopt(state_fd));
    drop(state.previous_exe.map(upgrade::adopt));
    match &rolled_back {
        Some(reason) => log::error!(
            event = "upgrade", result = "rolled_back", reason:% = reason;
            "upgrade failed: the new binary could not start ({reason}); the previous binary \
             serves again, with all {} sessions",
            state.server.children.len()
        ),
        None => log::info!(
            event = "upgrade", result = "done";
            "upgraded in place from {} to {}: {} sessions kept{}",
            state.from_version,
            forkecho::VERSION,
            state.server.children.len(),
            match state.server.shutdown {
                Some(_) => "; the shutdown in progress goes on",
                None => "",
            }
        ),
    }
    if let Some(fd) = state.requester {
        server.answer_upgrade_requester(fd, &state.from_version, rolled_back.as_deref());
    }
    let mut context = upgrade_context(pid_file.as_ref());
    // The path it was started from, not this image's: a rollback runs the previous image from
    // its descriptor, wherever its file is now.
    context.exe = std::path::PathBuf::from(std::ffi::OsString::from_vec(state.exe.clone()));
    context.start_dir =
        std::path::PathBuf::from(std::ffi::OsString::from_vec(state.start_dir.clone()));
    context.args = state
        .args
        .iter()
        .cloned()
        .map(std::ffi::OsString::from_vec)
        .collect();
    server.prepare_upgrades(context);
    // Not READY while stopping: systemd heard STOPPING=1 from the previous image.
    let how = match rolled_back {
        Some(_) => "upgrade rolled back",
        None => "upgraded",
    };
    let ready: Box<dyn FnOnce()> = match state.server.shutdown {
        None => Box::new(move || forkecho::systemd::ready(&format!("serving ({how})"))),
        Some(_) => Box::new(move || forkecho::systemd::status(&format!("shutting down ({how})"))),
    };
    let result = server.run(ready);
    if let Some(pid_file) = pid_file {
        pid_file.remove();
    }
    result.map_err(Failure::Serve)
}

/// Hands back to the previous image (see `forkecho::upgrade::roll_back`), which takes over
/// the state and the descriptors this one has not let go of (the caller keeps them open);
/// returns only if that cannot be done, with why.
fn roll_back(state_fd: std::os::fd::RawFd, failure: Failure) -> Failure {
    let reason = failure.to_string();
    let why = forkecho::upgrade::roll_back(state_fd, &reason);
    Failure::Start(format!("{reason}; {why}"))
}

/// The control socket, bound (replacing a stale one; a live one means another forkecho runs
/// with it), owned by the user the server will run as, mode 0600: see `forkecho::control`.
fn control_socket(config: &Config) -> Result<Option<listen::Listener>, Failure> {
    let Some(path) = config.control_socket_path() else {
        return Ok(None);
    };
    let settings = listen::BindSettings {
        backlog: 16,
        reuse_port: false,
        unix_mode: 0o600,
        unix_owner: config.run_as.as_ref().map(|who| who.uid.as_raw()),
        unix_group: config.run_as.as_ref().map(|who| who.gid.as_raw()),
    };
    listen::bind_all(&[listen::ListenAddr::Unix(path)], &settings)
        .map(|mut bound| bound.pop())
        .map_err(|e| Failure::Start(format!("control_socket: {e}")))
}

/// The metrics endpoint's listener (`metrics_listen`), bound.
fn metrics_endpoint(config: &Config) -> Result<Option<listen::Listener>, Failure> {
    let Some(addr) = config.metrics_listen else {
        return Ok(None);
    };
    let settings = listen::BindSettings {
        backlog: 64,
        ..config.bind_settings()
    };
    listen::bind_all(&[listen::ListenAddr::Ip(addr)], &settings)
        .map(|mut bound| bound.pop())
        .map_err(|e| Failure::Start(format!("metrics_listen: {e}")))
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
