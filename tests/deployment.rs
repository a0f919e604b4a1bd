//! A deployment tested for real: three hosts, each a network namespace running forkecho on its
//! own address with `--proxy-protocol v2`, behind one real HAProxy that sends PROXY v2 headers,
//! and clients from several addresses of their own. What an operator gets from it: every session
//! served, per-source limits that count real clients (not the balancer), logs that name them,
//! a host that dies taken out by HAProxy's health check without failing anyone else, and a
//! reload that loses nothing.
//!
//! The network lives entirely in namespaces the test creates and deletes, named
//! `forkecho-deploy-<test pid>-<role>`: a `switch` namespace holds a bridge, and every other one
//! (the balancer, three hosts, the clients) has one veth into it, all on 192.0.2.0/24. The
//! machine's own interfaces, addresses and routes are never touched. forkecho and HAProxy run
//! under `ip netns exec`, which execs them in place, so the pids the guards kill are theirs. The
//! test talks from the clients' namespace through sockets made by a thread that joined it: a
//! socket stays in the namespace it was created in, whichever thread uses it.
//!
//! HAProxy runs the shipped `config/haproxy.cfg`, with the test's addresses, a fast health check
//! and a stats socket put in: the configuration the README gives operators is the one tested.
//!
//! Needs root, `ip netns` (iproute2) and haproxy; skips with a message without them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use socket2::{Domain, Socket, Type};

use crate::util::{
    is_root_or_skip, process_exists, process_state, report, wait_until, LogLine, Noise, Server,
    TempDir, BANNER, BIN, WAIT,
};

const PORT: u16 = 2333;
const BALANCER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const HOSTS: [(&str, Ipv4Addr); 3] = [
    ("h1", Ipv4Addr::new(192, 0, 2, 11)),
    ("h2", Ipv4Addr::new(192, 0, 2, 12)),
    ("h3", Ipv4Addr::new(192, 0, 2, 13)),
];
/// The clients' addresses, all on the clients' namespace's one interface.
const CLIENTS: [Ipv4Addr; 8] = [
    Ipv4Addr::new(192, 0, 2, 101),
    Ipv4Addr::new(192, 0, 2, 102),
    Ipv4Addr::new(192, 0, 2, 103),
    Ipv4Addr::new(192, 0, 2, 104),
    Ipv4Addr::new(192, 0, 2, 105),
    Ipv4Addr::new(192, 0, 2, 106),
    Ipv4Addr::new(192, 0, 2, 107),
    Ipv4Addr::new(192, 0, 2, 108),
];
/// Low, so that one client reaches it while the balancer, which carries every client, is far
/// over it.
const MAX_PER_SOURCE: usize = 2;
/// What a session echoes per round, in one write.
const CHUNK: usize = 4096;
/// Longest a client waits for one read: a broken deployment fails the test instead of hanging.
const CLIENT_WAIT: Duration = Duration::from_secs(10);

#[test]
fn three_hosts_behind_haproxy_see_the_real_clients() {
    if !is_root_or_skip("three_hosts_behind_haproxy_see_the_real_clients: network namespaces") {
        return;
    }
    if Command::new("haproxy").arg("-v").output().is_err() {
        eprintln!("skipping three_hosts_behind_haproxy_see_the_real_clients: no haproxy");
        return;
    }
    let start = Instant::now();
    let deployment = match Deployment::start() {
        Ok(deployment) => deployment,
        Err(why) => {
            eprintln!("skipping three_hosts_behind_haproxy_see_the_real_clients: {why}");
            return;
        }
    };
    report(&format!("deployment up in {:?}", start.elapsed()));

    every_session_is_served_and_logged_with_its_client(&deployment);
    per_source_limit_counts_each_client_not_the_balancer(&deployment);
    a_reload_while_serving_loses_nothing(&deployment);
    a_dead_host_is_taken_out_and_fails_only_its_own_sessions(&deployment);

    for host in &deployment.hosts {
        host.server.assert_whole_lines();
    }
    report(&format!("whole test {:?}", start.elapsed()));
}

/// Six clients, five sessions each one after another, all at once: every session greeted and
/// echoed byte for byte, each in exactly one host's log under its own address, via the
/// balancer; every host took some.
fn every_session_is_served_and_logged_with_its_client(d: &Deployment) {
    let results = d.run_per_client(&CLIENTS[..6], |clients, source| {
        (0..5)
            .map(|_| {
                let mut session = Session::open(clients, source)?;
                session.echo(4)?;
                let local = session.local;
                session.close()?;
                Ok(local)
            })
            .collect::<Vec<Result<SocketAddr, String>>>()
    });
    let sessions: Vec<SocketAddr> = results
        .into_iter()
        .flatten()
        .map(|r| r.unwrap_or_else(|e| panic!("a session failed: {e}")))
        .collect();
    assert_eq!(sessions.len(), 30);
    let mut per_host = BTreeMap::new();
    for &client in &sessions {
        let host = d.host_that_accepted(client);
        *per_host.entry(host.name).or_insert(0) += 1;
    }
    report(&format!(
        "30 sessions from 6 clients, per host: {per_host:?}"
    ));
    assert_eq!(per_host.len(), 3, "leastconn spread sessions: {per_host:?}");
}

/// One client opens `MAX_PER_SOURCE` sessions on each host (leastconn spreads them evenly) and
/// then one more: that one is refused by the host it reaches, while three other clients are
/// served, one of them by that very host. Every host then holds more sessions from the
/// balancer's address than `MAX_PER_SOURCE`: the limit counts the clients the headers name.
fn per_source_limit_counts_each_client_not_the_balancer(d: &Deployment) {
    d.balancer.wait_until_idle();
    let greedy = CLIENTS[0];
    let held: Vec<Session> = (0..MAX_PER_SOURCE * HOSTS.len())
        .map(|i| {
            let mut s = Session::open(&d.clients, greedy)
                .unwrap_or_else(|e| panic!("{greedy}'s session {i} (under the limit): {e}"));
            s.echo(1).unwrap();
            s
        })
        .collect();
    for host in &d.hosts {
        let on_host = held
            .iter()
            .filter(|s| d.host_that_accepted(s.local).name == host.name)
            .count();
        assert_eq!(
            on_host, MAX_PER_SOURCE,
            "{greedy}'s sessions on {}",
            host.name
        );
    }

    let refused = match Session::open(&d.clients, greedy) {
        Ok(s) => panic!("{greedy}'s session over the limit was served ({})", s.local),
        Err(e) => e,
    };
    assert!(
        refused.starts_with("closed after 0 bytes"),
        "the session over the limit: {refused}"
    );
    let refusing = d.host_with_line(|line| {
        line.contains(&format!("refused {greedy}:")) && line.contains("(max_per_source)")
    });

    let others: Vec<Session> = CLIENTS[1..4]
        .iter()
        .map(|&source| {
            let mut s = Session::open(&d.clients, source)
                .unwrap_or_else(|e| panic!("{source}, next to a client at its limit: {e}"));
            s.echo(2).unwrap();
            s
        })
        .collect();
    let served_where_refused = others
        .iter()
        .filter(|s| d.host_that_accepted(s.local).name == refusing.name)
        .count();
    report(&format!(
        "{greedy}'s session {} refused by {}, which serves {served_where_refused} other clients \
         besides {greedy}'s {MAX_PER_SOURCE}",
        MAX_PER_SOURCE * HOSTS.len() + 1,
        refusing.name,
    ));
    // leastconn gives each host one of the three: every host holds more sessions from the
    // balancer's address than max_per_source.
    assert_eq!(
        served_where_refused, 1,
        "other clients on {}",
        refusing.name
    );
    for s in held.into_iter().chain(others) {
        s.close().unwrap();
    }
}

/// Six sessions held open across the hosts and a stream of new clients while h1 reloads: the
/// held sessions go on echoing, every new client is served, h1 takes new sessions after its
/// reload, and HAProxy never saw it down.
fn a_reload_while_serving_loses_nothing(d: &Deployment) {
    d.balancer.wait_until_idle();
    let h1 = &d.hosts[0];
    let mut held: Vec<Session> = CLIENTS[..6]
        .iter()
        .map(|&source| Session::open(&d.clients, source).unwrap())
        .collect();
    for s in &mut held {
        s.echo(2).unwrap();
    }

    let (started, sessions_started) = mpsc::channel();
    let stream = {
        let clients = d.clients.try_clone().unwrap();
        thread::spawn(move || {
            (0..24)
                .map(|_| {
                    let mut session = Session::open(&clients, CLIENTS[6])?;
                    let _ = started.send(());
                    session.echo(1)?;
                    session.close()
                })
                .collect::<Vec<Result<(), String>>>()
        })
    };
    // Reload once a few new clients are in, while the rest keep coming.
    if (0..4).any(|_| sessions_started.recv().is_err()) {
        panic!("new clients before the reload: {:?}", stream.join());
    }
    h1.server.signal(Signal::SIGHUP);
    h1.server.wait_for_line("reloaded configuration");
    for s in &mut held {
        s.echo(2).unwrap();
    }
    let new: Vec<Result<(), String>> = stream.join().unwrap();
    let failed: Vec<&String> = new.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "new clients during the reload: {failed:?}"
    );
    for s in held {
        s.close().unwrap();
    }

    let lines = h1.server.log_lines();
    let reload_at = lines
        .iter()
        .position(|l| l.contains("reloaded configuration"))
        .unwrap();
    let accepted_after = lines[reload_at..]
        .iter()
        .filter(|l| {
            LogLine::parse(l)
                .and_then(|l| l.accepted_via())
                .is_some_and(|(_, via, _)| via.is_some())
        })
        .count();
    report(&format!(
        "24 new clients during h1's reload, all served; h1 accepted {accepted_after} after it"
    ));
    assert!(accepted_after > 0, "h1 served nobody after its reload");
    assert_eq!(
        d.balancer.server_field("h1", "chkdown"),
        "0",
        "HAProxy saw h1 down"
    );
}

/// Six sessions held open across the hosts, then h2 dies (forkecho and every session it forked
/// SIGKILLed): HAProxy marks h2 down, clients that arrive meanwhile and afterwards are served
/// by h1 and h3, and the only sessions that fail are those h2 was serving.
fn a_dead_host_is_taken_out_and_fails_only_its_own_sessions(d: &Deployment) {
    d.balancer.wait_until_idle();
    let h2 = &d.hosts[1];
    let mut held: Vec<Session> = CLIENTS[..6]
        .iter()
        .map(|&source| Session::open(&d.clients, source).unwrap())
        .collect();
    for s in &mut held {
        s.echo(1).unwrap();
    }
    let on_h2: Vec<SocketAddr> = held
        .iter()
        .map(|s| s.local)
        .filter(|&local| d.host_that_accepted(local).name == h2.name)
        .collect();
    assert!(!on_h2.is_empty(), "no held session on h2");

    let killed_at = Instant::now();
    kill_host(&h2.server);
    // Before HAProxy has noticed: h2 refuses connections, and HAProxy retries them elsewhere.
    let meanwhile = new_sessions_in_turn(d, &CLIENTS[6..8], 6);
    d.balancer.wait_for_status("h2", "DOWN");
    let detected = killed_at.elapsed();
    let afterwards = new_sessions_in_turn(d, &CLIENTS[6..8], 6);

    let mut failed = Vec::new();
    for mut s in held {
        let local = s.local;
        if s.echo(1).and_then(|()| s.close()).is_err() {
            failed.push(local);
        }
    }
    let h2_stats = d.balancer.servers().remove("h2").unwrap();
    report(&format!(
        "h2 killed: DOWN at HAProxy after {detected:?}; {} of 6 held sessions failed (h2 served \
         {}); 12 new clients served, {} of them retried elsewhere by HAProxy",
        failed.len(),
        on_h2.len(),
        h2_stats["wredis"],
    ));
    assert_eq!(failed, on_h2, "failed sessions vs those h2 was serving");
    for client in meanwhile.into_iter().chain(afterwards) {
        let host = d.host_that_accepted(client);
        assert_ne!(host.name, h2.name, "{client} served by the dead host");
    }
    for (name, _) in [HOSTS[0], HOSTS[2]] {
        assert_eq!(d.balancer.server_field(name, "status"), "UP", "{name}");
    }
}

/// `n` sessions opened one after another, from `sources` in turn, each greeted, echoed and
/// closed; panics at the first that fails. Returns their client addresses.
fn new_sessions_in_turn(d: &Deployment, sources: &[Ipv4Addr], n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| {
            let source = sources[i % sources.len()];
            let opened = Instant::now();
            let mut session = Session::open(&d.clients, source)
                .unwrap_or_else(|e| panic!("new client {i} from {source}: {e}"));
            let local = session.local;
            session.echo(1).unwrap();
            session.close().unwrap();
            if opened.elapsed() > Duration::from_millis(500) {
                report(&format!("new client {local} took {:?}", opened.elapsed()));
            }
            local
        })
        .collect()
}

/// A host dying: forkecho and every session it forked SIGKILLed, by pid (the parent is frozen
/// first so that it forks no new one meanwhile). Returns once the parent is dead, its
/// listening socket closed: from then on the host refuses connections rather than queueing
/// them.
fn kill_host(server: &Server) {
    server.freeze();
    for child in server.children() {
        let _ = kill(child.pid, Signal::SIGKILL);
    }
    server.signal(Signal::SIGKILL);
    let dead = wait_until(WAIT, || {
        process_state(server.pid()).is_none_or(|state| state == 'Z')
    });
    assert!(dead, "forkecho {} outlived SIGKILL", server.pid());
}

// ---- The deployment ----

/// Everything the test runs. Fields drop in order: processes first, then the namespaces they
/// ran in, then the directory of their logs.
struct Deployment {
    hosts: Vec<Host>,
    balancer: Balancer,
    /// The clients' namespace, for making their sockets.
    clients: File,
    _network: Network,
    _dir: TempDir,
}

struct Host {
    name: &'static str,
    server: Server,
}

impl Deployment {
    /// Builds the network, starts the hosts, then HAProxy, and waits until HAProxy's checks
    /// see every host up. Err (the test skips) only when no network namespace can be made;
    /// any later failure panics.
    fn start() -> Result<Deployment, String> {
        let dir = TempDir::new();
        let network = Network::create()?;
        let hosts = HOSTS
            .iter()
            .map(|&(name, ip)| Host {
                name,
                server: start_forkecho(&network.namespace(name), ip, &dir),
            })
            .collect();
        let balancer = Balancer::start(&network.namespace("balancer"), dir.path());
        for (name, _) in HOSTS {
            balancer.wait_for_status(name, "UP");
        }
        let clients = File::open(network.path("clients")).expect("the clients' namespace");
        Ok(Deployment {
            hosts,
            balancer,
            clients,
            _network: network,
            _dir: dir,
        })
    }

    /// Runs `f(clients' namespace, source)` for each source at once, one thread each, and
    /// returns what each returned, in order.
    fn run_per_client<T: Send + 'static>(
        &self,
        sources: &[Ipv4Addr],
        f: fn(&File, Ipv4Addr) -> T,
    ) -> Vec<T> {
        let threads: Vec<_> = sources
            .iter()
            .map(|&source| {
                let clients = self.clients.try_clone().unwrap();
                thread::spawn(move || f(&clients, source))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    /// The one host whose log has `accepted <client> via <balancer>:...`, waiting for the line
    /// (the client may read its banner before the parent has logged the fork).
    fn host_that_accepted(&self, client: SocketAddr) -> &Host {
        let accepted = |host: &Host| {
            host.server.log_lines().iter().any(|line| {
                LogLine::parse(line)
                    .and_then(|l| l.accepted_via())
                    .is_some_and(|(c, via, _)| {
                        c == client && via.is_some_and(|v| v.ip() == BALANCER)
                    })
            })
        };
        let mut found = Vec::new();
        let logged = wait_until(WAIT, || {
            found = self.hosts.iter().filter(|h| accepted(h)).collect();
            !found.is_empty()
        });
        assert!(
            logged,
            "no host logged `accepted {client} via {BALANCER}:...`"
        );
        let names: Vec<&str> = found.iter().map(|h| h.name).collect();
        assert_eq!(names.len(), 1, "{client} accepted by {names:?}");
        found[0]
    }

    /// The one host with a log line for which `matches` holds, waiting for it.
    fn host_with_line(&self, matches: impl Fn(&str) -> bool) -> &Host {
        let mut found = Vec::new();
        let logged = wait_until(WAIT, || {
            found = self
                .hosts
                .iter()
                .filter(|h| h.server.log_lines().iter().any(|l| matches(l)))
                .collect();
            !found.is_empty()
        });
        assert!(logged, "no host logged the line");
        assert_eq!(found.len(), 1, "more than one host logged the line");
        found[0]
    }
}

/// forkecho in namespace `ns`, on `ip`, taking PROXY v2 headers from the balancer only, with
/// its log in `dir`.
fn start_forkecho(ns: &str, ip: Ipv4Addr, dir: &TempDir) -> Server {
    let listen = SocketAddrV4::new(ip, PORT).to_string();
    let log = dir.path().join(format!("{ns}.log"));
    Server::builder()
        .program("ip")
        .args(["netns", "exec", ns, BIN, "-l", &listen])
        .args(["--proxy-protocol", "v2", "--trusted-proxy"])
        .arg(BALANCER.to_string())
        .args(["--max-per-source", &MAX_PER_SOURCE.to_string()])
        .log_file(&log)
        .start()
}

// ---- Clients ----

/// One client's session through the balancer: the bytes it sent and checks are a `Noise`
/// stream of its own.
struct Session {
    stream: TcpStream,
    /// The client's own address, as the host's log must name it.
    local: SocketAddr,
    noise: Noise,
}

impl Session {
    /// Connects from `source` in the clients' namespace to the balancer and reads the banner.
    /// Err says what came instead (`closed after 0 bytes` for a refusal).
    fn open(clients: &File, source: Ipv4Addr) -> Result<Session, String> {
        let socket = tcp_socket_in(clients);
        let local = SocketAddr::from((source, 0));
        socket
            .bind(&local.into())
            .map_err(|e| format!("bind {local}: {e}"))?;
        let balancer = SocketAddr::from((BALANCER, PORT));
        socket
            .connect_timeout(&balancer.into(), CLIENT_WAIT)
            .map_err(|e| format!("connect from {source} to {balancer}: {e}"))?;
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(CLIENT_WAIT)).unwrap();
        stream.set_write_timeout(Some(CLIENT_WAIT)).unwrap();
        let local = stream.local_addr().unwrap();
        let greeting = read_up_to(&mut stream, BANNER.len())
            .map_err(|(got, e)| format!("closed after {} bytes ({e}) from {local}", got.len()))?;
        if greeting != BANNER {
            return Err(format!("{local}: banner {greeting:?}"));
        }
        let seed = u64::from(u32::from(source)) << 16 | u64::from(local.port());
        Ok(Session {
            stream,
            local,
            noise: Noise::new(seed),
        })
    }

    /// `rounds` times: sends a chunk of the session's noise and reads it back, byte for byte.
    fn echo(&mut self, rounds: usize) -> Result<(), String> {
        for round in 0..rounds {
            let sent = self.noise.bytes(CHUNK);
            self.stream
                .write_all(&sent)
                .map_err(|e| format!("{}: write in round {round}: {e}", self.local))?;
            let back = read_up_to(&mut self.stream, CHUNK).map_err(|(got, e)| {
                format!("{}: {} of {CHUNK} bytes back ({e})", self.local, got.len())
            })?;
            if back != sent {
                return Err(format!("{}: the echo differs in round {round}", self.local));
            }
        }
        Ok(())
    }

    /// Half-closes and expects the session to end with nothing more.
    fn close(mut self) -> Result<(), String> {
        let _ = self.stream.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        match self.stream.read_to_end(&mut rest) {
            Ok(_) if rest.is_empty() => Ok(()),
            Ok(_) => Err(format!("{}: {} bytes after close", self.local, rest.len())),
            Err(e) => Err(format!("{}: at close: {e}", self.local)),
        }
    }
}

/// Reads `n` bytes; Err with what came, and why no more, if the stream ends or fails first.
fn read_up_to(s: &mut TcpStream, n: usize) -> Result<Vec<u8>, (Vec<u8>, String)> {
    let mut buf = vec![0; n];
    let mut got = 0;
    while got < n {
        match s.read(&mut buf[got..]) {
            Ok(0) => {
                buf.truncate(got);
                return Err((buf, "EOF".into()));
            }
            Ok(k) => got += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                buf.truncate(got);
                return Err((buf, e.to_string()));
            }
        }
    }
    Ok(buf)
}

/// A TCP socket of network namespace `netns`, made by a thread that joins the namespace
/// first: a socket belongs to the namespace it was created in, and this thread's own stays as
/// it is.
fn tcp_socket_in(netns: &File) -> Socket {
    let fd = netns.as_raw_fd();
    thread::scope(|scope| {
        scope
            .spawn(move || {
                // Safe: setns changes the calling thread's network namespace only; `fd` is open
                // for the whole scope.
                let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket")
            })
            .join()
            .unwrap()
    })
}

// ---- The balancer ----

/// HAProxy in its namespace, started from the shipped configuration; SIGKILLed by pid on drop.
struct Balancer {
    child: Child,
    stats: PathBuf,
    output: PathBuf,
}

impl Balancer {
    fn start(ns: &str, dir: &Path) -> Balancer {
        let stats = dir.join("haproxy.sock");
        let config = dir.join("haproxy.cfg");
        std::fs::write(&config, balancer_config(&stats)).unwrap();
        let output = dir.join("haproxy.out");
        let out = File::create(&output).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "haproxy", "-db", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn haproxy");
        let mut balancer = Balancer {
            child,
            stats,
            output,
        };
        let mut exited = None;
        let up = wait_until(WAIT, || {
            exited = balancer.child.try_wait().unwrap();
            exited.is_some() || UnixStream::connect(&balancer.stats).is_ok()
        });
        assert!(
            up && exited.is_none(),
            "haproxy did not start ({exited:?}):\n{}",
            balancer.output_text()
        );
        balancer
    }

    fn output_text(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// `show stat` on the stats socket: one map (column name → value) per server of the
    /// `forkecho` backend, keyed by server name.
    fn servers(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut socket = UnixStream::connect(&self.stats).expect("HAProxy's stats socket");
        socket.set_read_timeout(Some(WAIT)).unwrap();
        socket.write_all(b"show stat\n").unwrap();
        let mut csv = String::new();
        socket.read_to_string(&mut csv).unwrap();
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .and_then(|h| h.strip_prefix("# "))
            .unwrap_or_else(|| panic!("show stat: {csv}"))
            .split(',')
            .collect();
        lines
            .map(|line| {
                let row: BTreeMap<String, String> = header
                    .iter()
                    .zip(line.split(','))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                row
            })
            .filter(|row| {
                row.get("pxname").map(String::as_str) == Some("forkecho")
                    && row.get("svname").is_some_and(|s| s != "BACKEND")
            })
            .map(|row| (row["svname"].clone(), row))
            .collect()
    }

    fn server_field(&self, server: &str, field: &str) -> String {
        self.servers()
            .get(server)
            .and_then(|row| row.get(field))
            .unwrap_or_else(|| panic!("no {field} for server {server} in `show stat`"))
            .clone()
    }

    /// Waits until HAProxy's checks give `server` the status `want` (`UP`, `DOWN`), its last
    /// check saying so.
    fn wait_for_status(&self, server: &str, want: &str) {
        let check = if want == "UP" { "L7OK" } else { "" };
        let mut row = BTreeMap::new();
        let reached = wait_until(WAIT, || {
            row = self.servers().remove(server).unwrap_or_default();
            row.get("status").map(String::as_str) == Some(want)
                && row.get("check_status").is_some_and(|c| c.contains(check))
        });
        let last: Vec<(&str, &str)> = ["status", "check_status", "check_desc"]
            .into_iter()
            .map(|k| (k, row.get(k).map_or("", String::as_str)))
            .collect();
        assert!(
            reached,
            "HAProxy's server {server} not {want}: {last:?}\n{}",
            self.output_text()
        );
    }

    /// Waits until HAProxy counts no session on any server, so that `leastconn` starts even.
    fn wait_until_idle(&self) {
        let idle = wait_until(WAIT, || {
            self.servers()
                .values()
                .all(|row| row.get("scur").map(String::as_str) == Some("0"))
        });
        assert!(idle, "sessions left at HAProxy: {:?}", self.servers());
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- haproxy output ---\n{}", self.output_text());
        }
    }
}

/// The shipped `config/haproxy.cfg` made to run here: the frontend on the balancer's address,
/// the three hosts as its servers (with the shipped server options, and a check every 200 ms
/// that takes a host out after two failures), a stats socket, and a global `maxconn` for a
/// test. Panics if the shipped file no
/// longer has what is replaced.
fn balancer_config(stats: &Path) -> String {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/haproxy.cfg");
    let text = std::fs::read_to_string(shipped).unwrap();
    let (mut global, mut bind, mut servers) = (false, false, false);
    let mut out = String::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().copied() {
            Some("global") => {
                global = true;
                out += &format!("global\n    stats socket {} level admin\n", stats.display());
            }
            Some("bind") => {
                bind = true;
                out += &format!("    bind {BALANCER}:{PORT}\n");
            }
            Some("server") if !servers => {
                servers = true;
                let options = words[3..].join(" ");
                for (name, ip) in HOSTS {
                    out += &format!(
                        "    server {name} {ip}:{PORT} {options} inter 200ms fall 2 rise 1\n"
                    );
                }
            }
            Some("server") => {}
            // The global limit, which HAProxy needs twice as many descriptors for: one that
            // fits under any machine's descriptor limit.
            Some("maxconn") => out += "    maxconn 1000\n",
            // A check waits for the banner longer than the 200 ms between checks: a loaded
            // machine may take that long to fork, and one late banner would take a host out.
            Some("defaults") => out += "defaults\n    timeout check 1s\n",
            _ => {
                out += line;
                out.push('\n');
            }
        }
    }
    assert!(
        global && bind && servers,
        "config/haproxy.cfg lacks a global section, a bind line or a server line"
    );
    out
}

// ---- The network ----

/// The test's network namespaces, deleted on drop (which deletes their interfaces with them).
struct Network {
    prefix: String,
    namespaces: Vec<String>,
}

impl Network {
    /// A bridge in namespace `switch`; the balancer, the three hosts and the clients each in a
    /// namespace with a veth into it and their addresses on it. Err if the first namespace
    /// cannot be made (no `ip`, or no right to); a later failure panics.
    fn create() -> Result<Network, String> {
        remove_stale_namespaces();
        let mut network = Network {
            prefix: format!("{NAMESPACE_PREFIX}{}-", std::process::id()),
            namespaces: Vec::new(),
        };
        network
            .add_namespace("switch")
            .map_err(|e| format!("cannot make a network namespace: {e}"))?;
        let switch = network.namespace("switch");
        must(ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]));
        must(ip(&["-n", &switch, "link", "set", "br0", "up"]));
        network.add_node("balancer", &[BALANCER]);
        for (name, address) in HOSTS {
            network.add_node(name, &[address]);
        }
        network.add_node("clients", &CLIENTS);
        Ok(network)
    }

    fn namespace(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }

    fn path(&self, role: &str) -> PathBuf {
        Path::new("/run/netns").join(self.namespace(role))
    }

    fn add_namespace(&mut self, role: &str) -> Result<(), String> {
        let ns = self.namespace(role);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])
    }

    /// A namespace for `role` whose `eth0` is a veth to the bridge, with `addresses` on it.
    fn add_node(&mut self, role: &str, addresses: &[Ipv4Addr]) {
        must(self.add_namespace(role));
        let (switch, ns) = (self.namespace("switch"), self.namespace(role));
        // Both ends are made where they live: nothing appears in the caller's namespace.
        must(ip(&[
            "-n", &switch, "link", "add", role, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ]));
        must(ip(&[
            "-n", &switch, "link", "set", role, "master", "br0", "up",
        ]));
        for address in addresses {
            must(ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "eth0",
            ]));
        }
        must(ip(&["-n", &ns, "link", "set", "eth0", "up"]));
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cannot delete network namespace {ns}: {e}");
            }
        }
    }
}

/// Every namespace of this test is named `<prefix><test pid>-<role>`.
const NAMESPACE_PREFIX: &str = "forkecho-deploy-";

/// Deletes the namespaces a run of this test left behind when it was killed before its guards
/// ran: those whose test process no longer exists.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let pid = name
            .strip_prefix(NAMESPACE_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok());
        if let Some(pid) = pid {
            if !process_exists(Pid::from_raw(pid)) {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
}

/// Runs `ip ARGS`; Err with its stderr if it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(result: Result<(), String>) {
    if let Err(e) = result {
        panic!("{e}");
    }
}
