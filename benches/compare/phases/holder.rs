//! Phase 3's load generator: processes of their own (this bench binary again, with
//! `--hold-sessions`), each holding its share of the sessions from a source address of its
//! own. One process may have 20,000 descriptors here (RLIMIT_NOFILE's hard limit), and one
//! source address about 28,000 ports toward one server address, so 30,000 sessions take two.
//!
//! The holder's protocol, one line each way per step: it opens its sessions and prints
//! `opened OK FAILED`; on the line `echo` it echoes on every session and prints
//! `echoed FAILED`; at the end of its input it closes them (the client first) and exits.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::thread;

use super::sessions::{echo, open_with_retries_at, OPENERS, SESSION_PAYLOAD};

/// Sessions per holder process: under its descriptor limit, and under a source address's
/// ports.
pub const PER_HOLDER: usize = 15_000;

/// After this many failed sessions in a row, a holder stops trying (a server that cannot take
/// more would otherwise cost the retry budget for each of thousands).
const GIVE_UP_AFTER: usize = 50;

/// What `--hold-sessions` runs: the holder's side of the protocol. Never returns.
pub fn holder_main(addr: SocketAddr, count: usize, source: IpAddr, banner: usize) -> ! {
    let streams = open_from_threads(addr, count, source, banner);
    let opened = streams.len();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "opened {opened} {}", count - opened);
    let _ = out.flush();
    let mut streams = streams;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line == "echo" {
            let failed = streams
                .iter_mut()
                .map(|s| echo(s, SESSION_PAYLOAD))
                .filter(Result::is_err)
                .count();
            let _ = writeln!(out, "echoed {failed}");
            let _ = out.flush();
        }
    }
    drop(streams);
    std::process::exit(0)
}

fn open_from_threads(
    addr: SocketAddr,
    count: usize,
    source: IpAddr,
    banner: usize,
) -> Vec<TcpStream> {
    let failed_in_a_row = AtomicUsize::new(0);
    thread::scope(|scope| {
        let workers: Vec<_> = (0..OPENERS)
            .map(|w| {
                let failed_in_a_row = &failed_in_a_row;
                scope.spawn(move || {
                    let mut streams = Vec::new();
                    for _ in (w..count).step_by(OPENERS) {
                        if failed_in_a_row.load(Relaxed) >= GIVE_UP_AFTER {
                            break;
                        }
                        match open_with_retries_at(addr, banner, Some(source)) {
                            Some(s) => {
                                failed_in_a_row.store(0, Relaxed);
                                streams.push(s);
                            }
                            None => {
                                failed_in_a_row.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    streams
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("opener thread"))
            .collect()
    })
}

/// A holder process, from the bench's side. Killed (by pid) when dropped.
pub struct Holder {
    child: Child,
    input: Option<ChildStdin>,
    output: BufReader<ChildStdout>,
}

impl Holder {
    /// Starts a holder of `count` sessions to `addr` from `source`.
    pub fn start(addr: SocketAddr, count: usize, source: IpAddr, banner: usize) -> Holder {
        let mut child = Command::new(std::env::current_exe().expect("the bench's path"))
            .args(["--hold-sessions", &addr.to_string()])
            .args(["--hold-count", &count.to_string()])
            .args(["--hold-source", &source.to_string()])
            .args(["--hold-banner", &banner.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a holder");
        let input = child.stdin.take();
        let output = BufReader::new(child.stdout.take().expect("holder's stdout"));
        Holder {
            child,
            input,
            output,
        }
    }

    /// The numbers of the holder's next line, which must start with `word`.
    fn answer(&mut self, word: &str) -> Vec<usize> {
        let mut line = String::new();
        let _ = self.output.read_line(&mut line);
        let mut fields = line.split_whitespace();
        assert_eq!(fields.next(), Some(word), "holder said {line:?}");
        fields.filter_map(|f| f.parse().ok()).collect()
    }

    /// Waits until its sessions are open: (opened, failed).
    pub fn opened(&mut self) -> (usize, usize) {
        let numbers = self.answer("opened");
        (numbers[0], numbers[1])
    }

    /// Echoes on every session again: the failures.
    pub fn echo_again(&mut self) -> usize {
        if let Some(input) = &mut self.input {
            let _ = writeln!(input, "echo");
        }
        self.answer("echoed")[0]
    }

    /// Closes its sessions (the client first) and waits for it to exit.
    pub fn close(mut self) {
        drop(self.input.take());
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // By pid: the process we started.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
