//! Integration tests: each starts the real `forkecho` binary on a loopback port picked by the
//! kernel and talks bytes to it. One binary, one module per area, shared helpers in `util`.

mod util;

mod attack;
mod attack_child;
mod attack_clock;
mod attack_lean;
mod attack_nagle;
mod attack_ops;
mod config;
mod config_fuzz;
mod control;
mod deployment;
mod docs;
mod echo;
mod exec;
mod faults;
mod files;
mod limits;
mod log_format;
mod logs;
mod metrics;
mod operations;
mod package;
mod proxy;
mod review_config;
mod review_crash;
mod review_exec;
mod review_lean;
mod review_ops;
mod review_proxy;
mod review_unix;
mod review_upgrade;
mod supervision;
mod unix;
mod upgrade;
