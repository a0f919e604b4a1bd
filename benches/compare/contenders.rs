//! The servers under test: which can run here, their command lines, and starting them.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::{floors, BANNER};

/// One server under test, running.
pub struct Contender {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// Bytes it sends before echoing (the seed's greeting carries a stray NUL: 21).
    pub banner: usize,
    process: Child,
}

impl Contender {
    /// The process we started: the server itself (every script here execs its server).
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.process.id() as i32)
    }

    /// Whether it serves each client in a child process (all but the mio floor).
    pub fn forks(&self) -> bool {
        self.name != floors::MIO_FLOOR
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        // By pid: the process we started (every script here execs its server).
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A contender before it runs.
struct Spec {
    name: &'static str,
    /// Bytes it sends before echoing.
    banner: usize,
    /// Its command line, serving on 127.0.0.1 at the given port.
    command: Box<dyn Fn(u16) -> Command>,
}

impl Spec {
    fn new(name: &'static str, banner: usize, command: impl Fn(u16) -> Command + 'static) -> Self {
        Spec {
            name,
            banner,
            command: Box::new(command),
        }
    }

    /// Starts it on a free port and waits until it accepts connections.
    fn start(self) -> Contender {
        let port = free_port();
        let process = (self.command)(port)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
        let contender = Contender {
            name: self.name,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            banner: self.banner,
            process,
        };
        wait_accepting(&contender);
        contender
    }
}

/// Starts every contender that can run here and that `only` selects (a name containing one of
/// its strings; all when empty), in table order, and waits until each accepts connections.
pub fn start_contenders(only: &[String]) -> Vec<Contender> {
    let selected = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    let this_build = fresh_copy(env!("CARGO_BIN_EXE_forkecho"), "forkecho");
    let mut specs = vec![
        Spec::new("forkecho", BANNER.len(), move |port| {
            forkecho_command(&this_build, port)
        }),
        Spec::new(floors::MIO_FLOOR, BANNER.len(), floors::mio_echo_command),
    ];
    // For A/B profiling: another build of forkecho (say, other link flags) measured beside
    // this one in the same interleaved run.
    if let Ok(alt) = std::env::var("FORKECHO_BENCH_ALT") {
        let alt = fresh_copy(&alt, "forkecho-alt");
        specs.push(Spec::new(
            "forkecho (FORKECHO_BENCH_ALT)",
            BANNER.len(),
            move |port| forkecho_command(&alt, port),
        ));
    }
    // Compiled only when selected: a run that leaves it out needs no C compiler.
    if selected(floors::FORK_FLOOR) {
        if let Some(program) = floors::build_fork_loop() {
            specs.push(Spec::new(floors::FORK_FLOOR, BANNER.len(), move |port| {
                let mut c = Command::new(&program);
                c.arg(port.to_string());
                c
            }));
        }
    }
    specs.extend(peers());
    specs
        .into_iter()
        .filter(|spec| selected(spec.name))
        .map(Spec::start)
        .collect()
}

/// A copy of `program` made now (in cargo's temporary directory for benches), to run instead
/// of the file itself.
///
/// Why: the same forkecho binary ran 5–9 % slower from the linker's output file than from a
/// fresh copy of it, on the same filesystem (measured here with `FORKECHO_BENCH_ALT` pointing
/// at the same build: 1.00× from the same path, 1.05–1.17× from a copy), presumably from how
/// the file's pages sit in the page cache. Running both builds of an A/B from fresh copies
/// compares the builds, not their files.
fn fresh_copy(program: &str, name: &str) -> PathBuf {
    let copy = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-bench"));
    let _ = std::fs::remove_file(&copy);
    match std::fs::copy(program, &copy) {
        Ok(_) => copy,
        Err(e) => {
            eprintln!("note: cannot copy {program} ({e}); running it in place");
            PathBuf::from(program)
        }
    }
}

/// forkecho on `port`, without the limits that would refuse a load generator on one address.
fn forkecho_command(program: &Path, port: u16) -> Command {
    let mut c = Command::new(program);
    c.args(["-l", &format!("127.0.0.1:{port}")]).args([
        "--max-per-source",
        "0",
        "--max-children",
        "20000",
    ]);
    c
}

/// The servers a user would pick instead of forkecho, those present on this machine.
fn peers() -> Vec<Spec> {
    let mut specs = Vec::new();
    let seed = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/peers/seed-server");
    if std::path::Path::new(seed).exists() {
        specs.push(Spec::new(
            "seed C++ server",
            BANNER.len() + 1,
            move |port| {
                let mut c = Command::new(seed);
                c.arg(port.to_string());
                c
            },
        ));
    } else {
        eprintln!("note: {seed} not found; the seed's server is left out");
    }
    if installed("tcpserver") {
        specs.push(Spec::new("tcpserver + cat", 0, |port| {
            let mut c = Command::new("tcpserver");
            c.args(["-q", "-R", "-H", "-l", "0", "-c", "20000", "-b", "1024"])
                .args(["127.0.0.1", &port.to_string(), "cat"]);
            c
        }));
    } else {
        eprintln!("note: tcpserver (ucspi-tcp) not installed; left out");
    }
    if installed("socat") {
        specs.push(Spec::new("socat fork PIPE", 0, |port| {
            let mut c = Command::new("socat");
            c.arg(format!(
                "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
            ))
            .arg("PIPE");
            c
        }));
    } else {
        eprintln!("note: socat not installed; left out");
    }
    specs
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Readiness by connecting (the seed's build may take a few seconds the first time).
fn wait_accepting(c: &Contender) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(c.addr) {
            let mut banner = vec![0; c.banner];
            if s.read_exact(&mut banner).is_ok() {
                return;
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("{} did not start accepting on {}", c.name, c.addr);
}
