//! What a child does with its connection, once `spawn` has cleaned up what it inherited
//! (descriptors, process group, signal mask, the parent's hooked signals back to default). A
//! handler owns its settings, the meaning of its exit codes and its signal policy; `spawn`
//! owns only what every child needs, and ends the child with `_exit` and the handler's exit
//! code, so a handler never returns into the parent's code.
//!
//! Every child starts with SIGPIPE, SIGTTOU and SIGXFSZ ignored, as the parent has them (the
//! Rust runtime ignores SIGPIPE; `signals::hook` the other two). The echo keeps that policy;
//! a handler that runs another program must restore them to the default before `exec`, since
//! an ignored disposition survives it.

use crate::conn::Conn;
use crate::echo;
use crate::spawn::EXIT_PANIC;

/// The handlers forkecho has.
#[derive(Debug, Clone)]
pub enum Handler {
    /// The built-in echo (`echo`): banner, then every byte back, until the client's EOF.
    Echo(echo::Settings),
}

impl Handler {
    /// The handler a configuration asks for.
    pub fn from_config(config: &crate::config::Config) -> Handler {
        Handler::Echo(echo::Settings::from(config))
    }

    /// What exit `code` of one of this handler's children means, in a few words, for the line
    /// the parent logs when it reaps the child; `None` for a code it does not define.
    pub fn meaning(&self, code: i32) -> Option<&'static str> {
        if code == EXIT_PANIC {
            return Some("internal error");
        }
        match self {
            Handler::Echo(_) => echo::meaning(code),
        }
    }

    /// Serves `conn` in the child and returns the exit code that says how the session ended
    /// (each handler documents its codes). Called only in a child, by `spawn`.
    pub fn serve(&self, conn: Conn) -> i32 {
        match self {
            Handler::Echo(settings) => echo::run(conn, settings).exit_code(),
        }
    }
}
