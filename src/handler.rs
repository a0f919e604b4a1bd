//! What a child does with its connection. A handler owns its settings, the meaning of its
//! exit codes and its signal policy; `spawn` owns only what every child needs: it forks the
//! echo's child and ends it with `_exit` and the echo's exit code, so a handler never returns
//! into the parent's code, and hands a program to `exec`, which starts it without a fork.
//!
//! Every forked child starts with SIGPIPE, SIGTTOU and SIGXFSZ ignored, as the parent has them
//! (the Rust runtime ignores SIGPIPE; `signals::hook` the other two). The echo keeps that
//! policy; a program gets every disposition back to the default before `execve` (see `exec`),
//! since an ignored disposition survives it.

use std::io;

use crate::echo;
use crate::exec::Program;
use crate::spawn::EXIT_PANIC;

/// The handlers forkecho has.
#[derive(Debug)]
pub enum Handler {
    /// The built-in echo (`echo`): banner, then every byte back, until the client's EOF.
    Echo(echo::Settings),
    /// A program per connection (`exec`), after the banner if there is one (at most
    /// [`exec::MAX_BANNER`] bytes, written by the parent).
    Exec { program: Program, banner: Vec<u8> },
}

/// What kind of handler a child was forked with: what its exit codes mean, and who enforces
/// `max_session_time` (the echo itself; the parent for a program).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Echo,
    Program,
}

impl Kind {
    /// What exit `code` of a child of this kind means, in a few words, for the line the parent
    /// logs when it reaps the child; `None` for a code it does not define (a program's codes
    /// are its own).
    pub fn meaning(self, code: i32) -> Option<&'static str> {
        match self {
            Kind::Echo if code == EXIT_PANIC => Some("internal error"),
            Kind::Echo => echo::meaning(code),
            Kind::Program => None,
        }
    }
}

impl Handler {
    /// The handler a configuration asks for. A program's setup (its environment, /dev/null,
    /// the stack its children start on) can fail; the echo's cannot.
    pub fn from_config(config: &crate::config::Config) -> io::Result<Handler> {
        let Some(settings) = config.program_settings() else {
            return Ok(Handler::Echo(echo::Settings::from(config)));
        };
        let program = Program::new(settings)?;
        Ok(Handler::Exec {
            program,
            banner: config.banner.clone(),
        })
    }

    pub fn kind(&self) -> Kind {
        match self {
            Handler::Echo(_) => Kind::Echo,
            Handler::Exec { .. } => Kind::Program,
        }
    }
}
