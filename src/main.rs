//! The `forkecho` binary: parse the command line, load the config, bind, serve.
//!
//! Exit codes: 0 after a clean shutdown, 1 when the server cannot start or fails, 2 for a
//! configuration or usage error.

use std::process::ExitCode;

use clap::Parser;
use forkecho::config::{Cli, Config};
use forkecho::pidfile::PidFile;
use forkecho::{listen, logging, server};

const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    logging::init(config.log_level);
    let listeners = match listen::bind_all(&config.listen, config.backlog, config.reuse_port) {
        Ok(listeners) => listeners,
        Err(e) => {
            // Straight to stderr, like config errors: RUST_LOG=off must not hide why we stopped.
            eprintln!("forkecho: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    // After binding, so a pid file names a daemon that is listening; held (locked) until
    // main returns, then removed.
    let _pid_file = match config.pid_file.as_deref().map(PidFile::create).transpose() {
        Ok(pid_file) => pid_file,
        Err(e) => {
            eprintln!("forkecho: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    // SIGHUP re-runs exactly this load: the same file, the same command-line overrides.
    let reload: server::Reloader = Box::new(move || Config::load(&cli));
    match server::run(&config, listeners, reload) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("server failed: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
