//! The servers under test: which can run here, their command lines, and starting them. Phases
//! 1 to 4 measure echo servers, phase 5 servers that run `cat` for each connection, phase 6
//! forkecho on a plain listener and on a PROXY v2 one.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::{floors, phases, BANNER};

/// One server under test, running.
pub struct Contender {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// Bytes it sends before echoing (the seed's greeting carries a stray NUL: 21).
    pub banner: usize,
    /// Bytes every client sends first, as soon as it is connected: the PROXY header a
    /// balancer would send, for a PROXY listener; empty for the others.
    pub header: Vec<u8>,
    /// The file it logs to, when the bench chose one.
    pub log: Option<PathBuf>,
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
    /// Bytes every client sends first (see `Contender::header`).
    header: Vec<u8>,
    /// The file its command line makes it log to, if any.
    log: Option<PathBuf>,
    /// Its command line, serving on 127.0.0.1 at the given port.
    command: Box<dyn Fn(u16) -> Command>,
}

impl Spec {
    fn new(name: &'static str, banner: usize, command: impl Fn(u16) -> Command + 'static) -> Self {
        Spec {
            name,
            banner,
            header: Vec::new(),
            log: None,
            command: Box::new(command),
        }
    }

    fn with_header(mut self, header: Vec<u8>) -> Self {
        self.header = header;
        self
    }

    fn logging_to(mut self, log: PathBuf) -> Self {
        self.log = Some(log);
        self
    }

    /// Starts it on a free port and waits until it serves; Err (the process killed) when it
    /// exits or answers wrongly first.
    fn start(self) -> Result<Contender, String> {
        let port = free_port();
        let process = (self.command)(port)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.name))?;
        let mut contender = Contender {
            name: self.name,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            banner: self.banner,
            header: self.header,
            log: self.log,
            process,
        };
        wait_serving(&mut contender)?;
        Ok(contender)
    }
}

/// Starts every contender of phases 1 to 4 that can run here and that `only` selects (a name
/// containing one of its strings; all when empty), in table order, and waits until each serves.
pub fn start_contenders(only: &[String]) -> Vec<Contender> {
    let this_build = fresh_copy(env!("CARGO_BIN_EXE_forkecho"), "forkecho");
    // Its two lines per connection go to a real file, as an operator's would.
    let log = bench_log("forkecho-bench.log");
    let log_arg = log.clone();
    let mut specs = vec![
        Spec::new("forkecho", BANNER.len(), move |port| {
            forkecho_logging_command(&this_build, &log_arg, port)
        })
        .logging_to(log),
        Spec::new(floors::MIO_FLOOR, BANNER.len(), floors::mio_echo_command),
    ];
    // For A/B profiling: another build of forkecho (say, other link flags) measured beside
    // this one in the same interleaved run.
    if let Some(alt) = alt_build() {
        let log = bench_log("forkecho-alt-bench.log");
        let log_arg = log.clone();
        specs.push(
            Spec::new("forkecho (FORKECHO_BENCH_ALT)", BANNER.len(), move |port| {
                forkecho_logging_command(&alt, &log_arg, port)
            })
            .logging_to(log),
        );
    }
    // Compiled only when selected: a run that leaves it out needs no C compiler.
    if selected(only, floors::FORK_FLOOR) {
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
        .filter(|spec| selected(only, spec.name))
        // The echo servers are the bench's record: one that does not start stops it.
        .map(|spec| spec.start().unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// Table name of forkecho running `cat` (exec mode), the base of phase 5's ratios.
pub const FORKECHO_EXEC: &str = "forkecho -- cat";
/// Table names of the peers running `cat` in phase 5.
pub const TCPSERVER_EXEC: &str = "tcpserver + cat";
pub const SOCAT_EXEC: &str = "socat fork EXEC:cat";

/// Starts the contenders of phase 5 (exec mode: each runs `cat` per connection) that can run
/// here and that `only` selects, in table order, and waits until each serves. One that cannot
/// run is left out with a note: forkecho too, so that the phase measures its peers and floors
/// with a forkecho build that has no exec mode.
pub fn start_exec_contenders(only: &[String]) -> Vec<Contender> {
    let Some(cat) = find_in_path("cat") else {
        eprintln!("note: no `cat` in PATH; phase 5 (exec) is left out");
        return Vec::new();
    };
    let mut specs = Vec::new();
    let this_build = fresh_copy(env!("CARGO_BIN_EXE_forkecho"), "forkecho");
    let builds = [Some(this_build), alt_build()];
    let names = [FORKECHO_EXEC, "forkecho (FORKECHO_BENCH_ALT) -- cat"];
    let logs = ["forkecho-exec-bench.log", "forkecho-alt-exec-bench.log"];
    for ((build, name), log) in builds.into_iter().zip(names).zip(logs) {
        let Some(build) = build else { continue };
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(log);
        let (program, log_arg) = (cat.clone(), log.clone());
        specs.push(
            Spec::new(name, 0, move |port| {
                forkecho_exec_command(&build, &log_arg, &program, port)
            })
            .logging_to(log),
        );
    }
    let floors_selected = [floors::VFORK_EXEC_FLOOR, floors::FORK_EXEC_FLOOR]
        .iter()
        .any(|name| selected(only, name));
    if floors_selected {
        if let Some(floor) = floors::build_exec_loop() {
            for (name, vfork) in [
                (floors::VFORK_EXEC_FLOOR, true),
                (floors::FORK_EXEC_FLOOR, false),
            ] {
                let (floor, program) = (floor.clone(), cat.clone());
                specs.push(Spec::new(name, 0, move |port| {
                    floors::exec_loop_command(&floor, vfork, &program, port)
                }));
            }
        }
    }
    specs.extend(exec_peers(&cat));
    specs
        .into_iter()
        .filter(|spec| selected(only, spec.name))
        .filter_map(|spec| {
            spec.start()
                .map_err(|e| eprintln!("note: {e}; left out of phase 5"))
                .ok()
        })
        .collect()
}

/// Table names of phase 6: forkecho on a plain listener (the base of its ratios) and on a
/// PROXY v2 listener, whose clients send a v2 header first.
pub const FORKECHO_PLAIN: &str = "forkecho, plain listener";
pub const FORKECHO_PROXY: &str = "forkecho, PROXY v2 listener";
/// Phase 7's forkecho, upgraded in place while a client loops.
pub const FORKECHO_UPGRADE: &str = "forkecho, upgraded in place";

/// Starts the contenders of phase 6 that `only` selects, the same build of forkecho on a plain
/// listener and on a PROXY v2 one (trusting 127.0.0.1, where the load comes from), and waits
/// until each serves. One that cannot run (a build without the PROXY protocol) is left out with
/// a note.
pub fn start_proxy_contenders(only: &[String]) -> Vec<Contender> {
    // One copy for both: the two differ by their listener alone.
    let build = fresh_copy(env!("CARGO_BIN_EXE_forkecho"), "forkecho");
    let plain = build.clone();
    let specs = [
        Spec::new(FORKECHO_PLAIN, BANNER.len(), move |port| {
            forkecho_command(&plain, port)
        }),
        Spec::new(FORKECHO_PROXY, BANNER.len(), move |port| {
            let mut c = forkecho_command(&build, port);
            c.args(["--proxy-protocol", "v2", "--trusted-proxy", "127.0.0.1"]);
            c
        })
        .with_header(phases::proxy_v2_header()),
    ];
    specs
        .into_iter()
        .filter(|spec| selected(only, spec.name))
        .filter_map(|spec| {
            spec.start()
                .map_err(|e| eprintln!("note: {e}; left out of phase 6"))
                .ok()
        })
        .collect()
}

/// forkecho for phase 7, with a control socket to upgrade it through; also returns its binary
/// and that socket. None when `only` leaves it out or it cannot start.
pub fn start_upgrade_contender(only: &[String]) -> Option<(Contender, PathBuf, PathBuf)> {
    if !selected(only, FORKECHO_UPGRADE) {
        return None;
    }
    let build = fresh_copy(env!("CARGO_BIN_EXE_forkecho"), "forkecho-upgrade");
    let control = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("forkecho-upgrade.ctl");
    let _ = std::fs::remove_file(&control);
    let (binary, socket) = (build.clone(), control.clone());
    let spec = Spec::new(FORKECHO_UPGRADE, BANNER.len(), move |port| {
        let mut c = forkecho_command(&binary, port);
        c.arg("--control-socket").arg(&socket);
        c
    });
    spec.start()
        .map_err(|e| eprintln!("note: {e}; phase 7 left out"))
        .ok()
        .map(|c| (c, build, control))
}

/// Whether `only` selects the contender `name` (a name containing one of its strings; all
/// when empty).
fn selected(only: &[String], name: &str) -> bool {
    only.is_empty() || only.iter().any(|o| name.contains(o.as_str()))
}

/// The other forkecho build of an A/B (`FORKECHO_BENCH_ALT`), copied; None when not set.
fn alt_build() -> Option<PathBuf> {
    let alt = std::env::var("FORKECHO_BENCH_ALT").ok()?;
    Some(fresh_copy(&alt, "forkecho-alt"))
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
        "40000",
    ]);
    c
}

/// `forkecho_command` with its log (two lines per connection: accept and reap) appended to
/// `log`, a real file, emptied first: the cost of logging to a file is part of what is
/// measured.
fn forkecho_logging_command(forkecho: &Path, log: &Path, port: u16) -> Command {
    let _ = std::fs::remove_file(log);
    let mut c = forkecho_command(forkecho, port);
    c.arg("--log-file").arg(log);
    c
}

/// Where the bench's forkecho logs `name`: cargo's temporary directory for benches.
fn bench_log(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// forkecho on `port` running `program` per connection, limits lifted and logging to `log`
/// as in `forkecho_logging_command` (plus anything the program writes to fd 2).
fn forkecho_exec_command(forkecho: &Path, log: &Path, program: &Path, port: u16) -> Command {
    let mut c = forkecho_logging_command(forkecho, log, port);
    c.arg("--").arg(program);
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
            c.args(["-q", "-R", "-H", "-l", "0", "-c", "40000", "-b", "1024"])
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

/// The programs a user would run `cat` with instead of forkecho, those present on this
/// machine, with `program` (`cat`'s absolute path).
///
/// tcpserver runs as in phases 1 to 4: without the DNS and ident lookups it makes by default
/// (`-R -H -l 0`: forkecho makes none; with them, `tcpserver -q -c 1000 127.0.0.1 PORT cat`
/// served 9.5 connections/s here against 1,437 without), with forkecho's backlog (`-b 1024`),
/// and its limit of 40 sessions at once (`-c`) raised out of the way.
fn exec_peers(program: &Path) -> Vec<Spec> {
    let mut specs = Vec::new();
    if installed("tcpserver") {
        let program = program.to_path_buf();
        specs.push(Spec::new(TCPSERVER_EXEC, 0, move |port| {
            let mut c = Command::new("tcpserver");
            c.args(["-q", "-R", "-H", "-l", "0", "-c", "1000", "-b", "1024"])
                .args(["127.0.0.1", &port.to_string()])
                .arg(&program);
            c
        }));
    } else {
        eprintln!("note: tcpserver (ucspi-tcp) not installed; left out of phase 5");
    }
    if installed("socat") {
        let program = program.to_path_buf();
        specs.push(Spec::new(SOCAT_EXEC, 0, move |port| {
            let mut c = Command::new("socat");
            c.arg(format!(
                "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
            ))
            .arg(format!("EXEC:{}", program.display()));
            c
        }));
    } else {
        eprintln!("note: socat not installed; left out of phase 5");
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
    find_in_path(program).is_some()
}

/// `program`'s absolute path: the first executable file of that name in a PATH directory.
fn find_in_path(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|file| {
            std::fs::metadata(file)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What a contender must echo before it counts as serving.
const READY_PROBE: &[u8] = b"ready?\n";

/// Readiness by a whole session, connect → (header) → banner → echo of READY_PROBE, retried for up to a
/// minute (the seed's build may take a few seconds the first time). Err at once when the
/// process exits or echoes something else (a forkecho without exec mode would send its banner).
fn wait_serving(c: &mut Contender) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = c.process.try_wait() {
            return Err(format!("{} exited before serving ({status})", c.name));
        }
        match probe_session(c) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                return Err(format!("{} does not echo: {e}", c.name));
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
    Err(format!("{} did not start serving on {}", c.name, c.addr))
}

fn probe_session(c: &Contender) -> io::Result<()> {
    let mut s = TcpStream::connect(c.addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&c.header)?;
    let mut banner = vec![0; c.banner];
    s.read_exact(&mut banner)?;
    s.write_all(READY_PROBE)?;
    let mut back = [0; READY_PROBE.len()];
    s.read_exact(&mut back)?;
    if back != READY_PROBE {
        let (sent, got) = (
            String::from_utf8_lossy(READY_PROBE),
            String::from_utf8_lossy(&back),
        );
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("sent {sent:?}, got back {got:?}"),
        ));
    }
    Ok(())
}
