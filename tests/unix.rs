//! UNIX-domain listeners as a user sees them: `unix:/absolute/path` in `listen`, `-l` and
//! `[[listener]]`; the socket file's mode, owner and group; what happens at start when the path
//! is taken (a stale socket is replaced; a live server, a regular file, a FIFO or a directory
//! refuse the start and are left as they were); the peer as `uid:U,gid:G,pid:P` (SO_PEERCRED)
//! in every log line; access rules and per-source limits by uid; ucspi-unix's environment for
//! a program; the socket file removed at exit and on reload, but only while it is ours; and
//! the configuration errors (a relative or too long path, PROXY on a UNIX listener).
//!
//! Clients are `std::os::unix::net::UnixStream`s from this process (root) or `socat` run as
//! `nobody` (uid and gid 65534) for a second uid; socket directories are 0755 so it can reach
//! them.

use crate::util::*;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;

use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::unistd::{getegid, geteuid, Pid};
use socket2::{Domain, SockAddr, Socket, Type};

/// The user a second client runs as.
const NOBODY: u32 = 65534;

// ---- Paths and servers ----

/// A fresh temporary directory that `nobody` may traverse, and the path `name` in it.
fn socket_dir(name: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join(name);
    (dir, path)
}

fn unix_address(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// Spawns a server with `args` (which must say where it listens) and waits for its
/// `listening on unix:<path>` line; panics with its log if it exits first.
fn start_unix(args: &[&str], path: &Path) -> Server {
    spawn_listening(Server::builder().args(args.iter().copied()), path)
}

/// Spawns the server `builder` describes and waits for its `listening on unix:<path>` line;
/// panics with its log if it exits first.
fn spawn_listening(builder: ServerBuilder, path: &Path) -> Server {
    let mut server = builder.spawn();
    let line = format!("listening on {}", unix_address(path));
    let listening = wait_until(WAIT, || {
        server.count_lines(&line) > 0 || !server.is_running()
    });
    assert!(
        listening && server.count_lines(&line) > 0,
        "no `{line}` (server running: {})",
        server.is_running()
    );
    server
}

/// A server with the echo on the UNIX socket at `path` only, with `extra` flags.
fn start_echo(path: &Path, extra: &[&str]) -> Server {
    let address = unix_address(path);
    let mut args = vec!["-l", address.as_str()];
    args.extend_from_slice(extra);
    start_unix(&args, path)
}

/// The peer string the server logs for a client in this test process.
fn own_peer() -> String {
    format!(
        "uid:{},gid:{},pid:{}",
        geteuid(),
        getegid(),
        std::process::id()
    )
}

fn peer_of(uid: u32, gid: u32, pid: u32) -> String {
    format!("uid:{uid},gid:{gid},pid:{pid}")
}

/// The child pid of the parent's `accepted <peer> -> child <pid>` line for `peer`.
fn child_pid_for(server: &Server, peer: &str) -> Pid {
    let needle = format!("accepted {peer} -> child ");
    let line = server.wait_for_line(&needle);
    let rest = &line[line.find(&needle).unwrap() + needle.len()..];
    let pid = rest.split_whitespace().next().unwrap();
    Pid::from_raw(
        pid.parse()
            .unwrap_or_else(|e| panic!("pid in {line:?}: {e}")),
    )
}

// ---- Clients ----

/// Connects to the socket at `path` with read and write timeouts of `WAIT`.
fn connect_unix(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {path:?}: {e}"));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

fn read_n(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).expect("read");
    buf
}

/// Connects and reads the default banner.
fn connect_unix_greeted(path: &Path) -> UnixStream {
    let mut s = connect_unix(path);
    assert_eq!(read_n(&mut s, BANNER.len()), BANNER, "banner over {path:?}");
    s
}

fn echo_unix(s: &mut UnixStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).unwrap();
    read_n(s, data.len())
}

/// Reads until the whole default banner arrived (`Ok`: served) or the server closed the
/// connection first (`Err` with whatever came before the EOF: refused).
fn banner_or_eof(s: &mut impl Read) -> Result<(), Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0; 64];
    while got.len() < BANNER.len() {
        let want = BANNER.len() - got.len();
        match s.read(&mut buf[..want]) {
            Ok(0) => return Err(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err(got),
            Err(e) => panic!("reading banner or EOF (got {got:?} so far): {e}"),
        }
    }
    assert_eq!(got, BANNER, "banner");
    Ok(())
}

/// Asserts this connection is refused: exactly `message`, then EOF, no banner.
fn assert_refused(s: &mut impl Read, message: &[u8], what: &str) {
    match banner_or_eof(s) {
        Ok(()) => panic!("{what}: was served (got the banner), expected a refusal"),
        Err(got) => assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(message),
            "{what}: bytes before EOF"
        ),
    }
}

/// `socat` connected to the socket at a path as `nobody`: its stdin and stdout are the
/// connection. Killed by pid when dropped.
struct NobodyClient {
    child: Child,
    _guard: KillOnDrop,
}

impl NobodyClient {
    fn connect(path: &Path) -> Self {
        let child = Command::new("socat")
            .uid(NOBODY)
            .gid(NOBODY)
            .args(["-", &format!("UNIX-CONNECT:{}", path.display())])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn socat (is it installed?)");
        let guard = KillOnDrop(Pid::from_raw(child.id() as i32));
        NobodyClient {
            child,
            _guard: guard,
        }
    }

    /// The peer string the server logs for this client.
    fn peer(&self) -> String {
        peer_of(NOBODY, NOBODY, self.child.id())
    }

    /// Runs `read` on socat's stdout (the bytes from the server) in a thread, so that a server
    /// that sends nothing fails the test after `WAIT` instead of hanging it.
    fn read_within_wait<T: Send + 'static>(
        &mut self,
        read: impl FnOnce(&mut ChildStdout) -> T + Send + 'static,
    ) -> T {
        let mut out = self.child.stdout.take().expect("socat's stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send((read(&mut out), out));
        });
        let (result, out) = rx
            .recv_timeout(WAIT)
            .expect("socat as nobody: nothing from the server within WAIT");
        self.child.stdout = Some(out);
        result
    }

    /// Whether it was served (the banner) or refused (the bytes before EOF).
    fn banner_or_eof(&mut self) -> Result<(), Vec<u8>> {
        self.read_within_wait(banner_or_eof)
    }
}

/// A UNIX listener at `path` that never accepts, its backlog filled by non-blocking connects:
/// one more connect would block. Returns the listener and the queued clients, to keep.
fn full_listener(path: &Path) -> (Socket, Vec<Socket>) {
    let address = SockAddr::unix(path).unwrap();
    let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    listener.bind(&address).unwrap();
    listener.listen(0).unwrap();
    let mut queued = Vec::new();
    loop {
        let client = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        client.set_nonblocking(true).unwrap();
        match client.connect(&address) {
            Ok(()) => queued.push(client),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return (listener, queued),
            Err(e) => panic!("filling the backlog of {path:?}: {e}"),
        }
        assert!(queued.len() < 1000, "the backlog of {path:?} never filled");
    }
}

/// Reads what [`PRINT_ENV`] prints, through its `END` marker, as `KEY` → `VALUE`.
fn read_environment(s: &mut impl Read) -> BTreeMap<String, String> {
    let mut printed = Vec::new();
    let mut buf = [0; 4096];
    while !printed.ends_with(b"\0END\0") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => printed.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading the environment: {e} after {printed:?}"),
        }
        assert!(printed.len() < 1 << 20, "an environment over 1 MiB");
    }
    let printed = printed.strip_suffix(b"END\0").unwrap_or(&printed);
    String::from_utf8_lossy(printed)
        .split('\0')
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Asserts `env` holds each of `expected`.
fn assert_variables(env: &BTreeMap<String, String>, expected: &[(&str, String)], what: &str) {
    for (key, value) in expected {
        assert_eq!(
            env.get(*key).map(String::as_str),
            Some(value.as_str()),
            "{what}: {key}; environment: {env:#?}"
        );
    }
}

// ---- Addresses and configuration errors ----

/// A relative path and a path of 108 bytes (over `sun_path`'s 107 and its NUL) are config
/// errors naming `listen` (or `[[listener]]`) and the reason, on the command line, in `listen`
/// and in a `[[listener]]` table; 107 bytes is fine.
#[test]
fn relative_or_too_long_unix_path_is_a_config_error() {
    let dir = TempDir::new();
    let prefix = format!("{}/", dir.path().display());
    let long_path = |len: usize| format!("{prefix}{}", "a".repeat(len - prefix.len()));
    let too_long = format!("unix:{}", long_path(108));

    for (address, reason) in [
        ("unix:sock/here", ["relative", "absolute"]),
        (too_long.as_str(), ["long", "107"]),
    ] {
        let config = dir.path().join("forkecho.toml");
        std::fs::write(&config, format!("listen = [\"{address}\"]\n")).unwrap();
        let table = dir.path().join("table.toml");
        std::fs::write(
            &table,
            format!("listen = [\"127.0.0.1:0\"]\n[[listener]]\naddress = \"{address}\"\n"),
        )
        .unwrap();
        for args in [
            vec!["-l", address],
            vec!["-c", config.to_str().unwrap()],
            vec!["-c", config.to_str().unwrap(), "--check-config"],
            vec!["-c", table.to_str().unwrap()],
        ] {
            // Without the address itself, which could hold any word.
            let err = expect_exit(&run(&args), 2).replace(address, "");
            assert!(err.contains("listen"), "{args:?}: no key in: {err}");
            assert!(
                reason.iter().any(|r| err.contains(r)),
                "{args:?}: no reason ({reason:?}) in: {err}"
            );
        }
    }

    let longest = format!("unix:{}", long_path(107));
    let out = run(&["-l", &longest, "--check-config"]);
    expect_exit(&out, 0);
    assert!(stdout(&out).contains("configuration OK"), "{out:?}");
}

/// PROXY protocol on a UNIX listener is a config error (exit 2) naming `proxy_protocol`,
/// from the flags and from a `[[listener]]` table, and no socket file is left behind.
#[test]
fn proxy_protocol_on_a_unix_listener_is_a_config_error() {
    let (dir, path) = socket_dir("proxied.sock");
    let address = unix_address(&path);
    let config = dir.path().join("forkecho.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"127.0.0.1:0\"]\n[[listener]]\naddress = \"{address}\"\n\
             proxy_protocol = \"v2\"\ntrusted_proxies = [\"127.0.0.1\"]\n"
        ),
    )
    .unwrap();
    for args in [
        vec![
            "-l",
            &address,
            "--proxy-protocol",
            "v2",
            "--trusted-proxy",
            "127.0.0.1",
        ],
        vec!["-c", config.to_str().unwrap()],
    ] {
        let err = expect_exit(&run(&args), 2);
        assert!(err.contains("proxy_protocol"), "{args:?}: {err}");
        assert!(!path.exists(), "{args:?}: a socket file was created");
    }
}

/// `--check-config` with a UNIX listener whose path is a regular file reports it (non-zero,
/// naming the path) and leaves the file as it was; with a fresh path in an existing directory
/// it prints `configuration OK` and creates nothing there.
#[test]
fn check_config_looks_at_the_unix_path() {
    let (_dir, path) = socket_dir("taken");
    std::fs::write(&path, "keep me\n").unwrap();
    let out = run(&["-l", &unix_address(&path), "--check-config"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a regular file at the path: {out:?}"
    );
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains(path.to_str().unwrap()),
        "path not named: {said}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me\n");

    let fresh = path.with_file_name("fresh.sock");
    let out = run(&["-l", &unix_address(&fresh), "--check-config"]);
    expect_exit(&out, 0);
    assert!(stdout(&out).contains("configuration OK"), "{out:?}");
    assert!(!fresh.exists(), "--check-config created {fresh:?}");
}

// ---- Serving ----

/// Over a UNIX socket the client gets the banner and its bytes echoed; the parent logs the
/// peer as `uid:U,gid:G,pid:P` (this process's credentials) in its `accepted` and the child's
/// ending line; the socket file is a socket with the default mode 0666.
#[test]
fn echo_over_unix_socket_names_the_peer_by_credentials() {
    let (_dir, path) = socket_dir("echo.sock");
    let server = start_echo(&path, &[]);
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket(), "{path:?} is not a socket");
    assert_eq!(
        meta.mode() & 0o7777,
        0o666,
        "default mode of the socket file"
    );

    let mut s = connect_unix_greeted(&path);
    assert_eq!(echo_unix(&mut s, b"over unix\n"), b"over unix\n");
    let peer = own_peer();
    let line = server.wait_for_line(&format!("accepted {peer} -> child "));
    assert!(line.contains("(1 active)"), "{line}");
    let pid = child_pid_for(&server, &peer);

    drop(s);
    let ending = server.wait_for_line(&format!("child {pid} ({peer}) "));
    assert!(ending.contains("exited with code 0"), "{ending}");
}

/// A TCP listener and a UNIX listener side by side both serve.
#[test]
fn tcp_and_unix_listeners_serve_side_by_side() {
    let (_dir, path) = socket_dir("both.sock");
    let server = Server::builder()
        .args(["-l", "127.0.0.1:0", "-l", &unix_address(&path)])
        .start();
    server.wait_for_line(&format!("listening on {}", unix_address(&path)));
    let mut unix = connect_unix_greeted(&path);
    let mut tcp = server.connect_greeted();
    assert_eq!(echo_unix(&mut unix, b"unix\n"), b"unix\n");
    assert_eq!(echo_roundtrip(&mut tcp, b"tcp\n"), b"tcp\n");
}

// ---- The socket file ----

/// `--unix-socket-mode`, `--unix-socket-owner` and `--unix-socket-group` (names) set the
/// socket file's permission bits, uid and gid.
#[test]
fn socket_mode_owner_and_group_from_flags() {
    if !is_root_or_skip("chown of the socket file") {
        return;
    }
    let (_dir, path) = socket_dir("owned.sock");
    let _server = start_echo(
        &path,
        &[
            "--unix-socket-mode",
            "0640",
            "--unix-socket-owner",
            "nobody",
            "--unix-socket-group",
            "nogroup",
        ],
    );
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o640, "mode");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (NOBODY, NOBODY),
        "owner and group"
    );
}

/// Dropping root to `user`: the socket file belongs to that user and its group (so that, with
/// mode 0660, the service's group decides who connects), unless the keys say otherwise.
#[test]
fn socket_file_belongs_to_the_user_forkecho_drops_to() {
    if !is_root_or_skip("dropping root") {
        return;
    }
    let (_dir, path) = socket_dir("dropped.sock");
    let _server = start_echo(&path, &["--user", "nobody", "--unix-socket-mode", "0660"]);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (NOBODY, NOBODY),
        "owner and group"
    );
    assert_eq!(meta.mode() & 0o7777, 0o660, "mode");
}

/// The same keys in a file (numbers this time), for a `[[listener]]` table's UNIX address:
/// the server listens there and the socket file has that mode, uid and gid.
#[test]
fn socket_mode_owner_and_group_from_file_for_a_listener_table() {
    if !is_root_or_skip("chown of the socket file") {
        return;
    }
    let (_dir, path) = socket_dir("table.sock");
    let server = Server::builder()
        .config(&format!(
            "listen = [\"127.0.0.1:0\"]\nunix_socket_mode = \"0600\"\n\
             unix_socket_owner = \"{NOBODY}\"\nunix_socket_group = \"{NOBODY}\"\n\
             [[listener]]\naddress = \"{}\"\n",
            unix_address(&path)
        ))
        .start();
    server.wait_for_line(&format!("listening on {}", unix_address(&path)));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600, "mode");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (NOBODY, NOBODY),
        "owner and group"
    );
    // Root may connect whatever the mode.
    connect_unix_greeted(&path);
}

/// A socket file nobody listens on (a listener bound and dropped) is replaced: the start
/// succeeds and serves there.
#[test]
fn stale_socket_file_is_replaced() {
    let (_dir, path) = socket_dir("stale.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());
    let _server = start_echo(&path, &[]);
    let mut s = connect_unix_greeted(&path);
    assert_eq!(echo_unix(&mut s, b"fresh\n"), b"fresh\n");
}

/// A live server on the path refuses the start (exit 1) naming the path and saying a server
/// listens there; the file is the same socket and the test's listener still accepts.
#[test]
fn live_server_on_the_path_refuses_the_start_and_keeps_its_socket() {
    let (_dir, path) = socket_dir("live.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let inode = std::fs::metadata(&path).unwrap().ino();

    let err = expect_exit(&run(&["-l", &unix_address(&path)]), 1);
    assert!(
        err.contains(path.to_str().unwrap()),
        "path not named: {err}"
    );
    assert!(err.contains("listening"), "no `listening` in: {err}");

    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        inode,
        "the live server's socket file was replaced"
    );
    // forkecho's probe may be queued first: accept until the connection that sent `x`.
    let mut client = connect_unix(&path);
    client.write_all(b"x").unwrap();
    loop {
        let (mut accepted, _) = listener.accept().expect("the test's listener accepts");
        accepted.set_read_timeout(Some(WAIT)).unwrap();
        let mut byte = [0; 1];
        if accepted.read(&mut byte).unwrap_or(0) == 1 {
            assert_eq!(&byte, b"x");
            break;
        }
    }
}

/// A regular file (with content), a FIFO or a directory at the path refuses the start
/// (exit 1, naming the path) and is left as it was: same content, still a FIFO (never opened:
/// a FIFO opened for writing would wait for a reader), still a directory.
#[test]
fn regular_file_fifo_or_directory_at_the_path_refuses_the_start_untouched() {
    let (_dir, base) = socket_dir("x");
    let file = base.with_file_name("file");
    std::fs::write(&file, "precious\n").unwrap();
    let fifo = base.with_file_name("fifo");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o644)).unwrap();
    let directory = base.with_file_name("directory");
    std::fs::create_dir(&directory).unwrap();

    for path in [&file, &fifo, &directory] {
        let err = expect_exit(&run(&["-l", &unix_address(path)]), 1);
        assert!(
            err.contains(path.to_str().unwrap()),
            "path not named: {err}"
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious\n");
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(std::fs::metadata(&directory).unwrap().is_dir());
}

/// A live server whose backlog is full (a connect would block) is as alive as one that
/// accepts: the start is refused at once (exit 1) naming the path, never stuck in a connect,
/// and its socket file is left.
#[test]
fn live_server_with_a_full_backlog_refuses_the_start_without_waiting() {
    let (_dir, path) = socket_dir("full.sock");
    let (_listener, _queued) = full_listener(&path);
    let inode = std::fs::metadata(&path).unwrap().ino();
    let err = expect_exit(&run(&["-l", &unix_address(&path)]), 1);
    assert!(
        err.contains(path.to_str().unwrap()),
        "path not named: {err}"
    );
    assert!(err.contains("listening"), "no `listening` in: {err}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        inode,
        "socket replaced"
    );
}

/// The socket file has `unix_socket_mode` whatever umask forkecho inherits (a service
/// manager's `UMask=0077` would otherwise make it 0600): nobody can connect to the default
/// 0666 socket.
#[test]
fn socket_mode_ignores_the_inherited_umask() {
    let (_dir, path) = socket_dir("umask.sock");
    let address = unix_address(&path);
    let builder = Server::builder()
        .args(["-l", address.as_str()])
        .tweak(|cmd| {
            // Safe: umask is async-signal-safe and changes nothing else.
            unsafe {
                cmd.pre_exec(|| {
                    libc::umask(0o077);
                    Ok(())
                });
            }
        });
    let _server = spawn_listening(builder, &path);
    let mode = std::fs::metadata(&path).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o666, "mode under umask 077");
    let mut nobody = NobodyClient::connect(&path);
    assert_eq!(nobody.banner_or_eof(), Ok(()), "nobody on a 0666 socket");
}

/// Flags with a mode that is not octal permission bits, or an owner or group that does not
/// exist, are config errors (exit 2) naming the key, and no socket file is made.
#[test]
fn bad_socket_mode_owner_or_group_is_a_config_error() {
    let (_dir, path) = socket_dir("bad.sock");
    let address = unix_address(&path);
    for (flag, value, key) in [
        ("--unix-socket-mode", "0999", "unix_socket_mode"),
        ("--unix-socket-mode", "rw-rw-rw-", "unix_socket_mode"),
        (
            "--unix-socket-owner",
            "no-such-user-forkecho",
            "unix_socket_owner",
        ),
        (
            "--unix-socket-group",
            "no-such-group-forkecho",
            "unix_socket_group",
        ),
    ] {
        let err = expect_exit(&run(&["-l", &address, flag, value]), 2);
        assert!(
            err.contains(key) || err.contains(flag),
            "{flag} {value}: key not named: {err}"
        );
        assert!(!path.exists(), "{flag} {value}: a socket file was made");
    }
}

/// Every shutdown, smart (SIGTERM), fast (SIGINT) or immediate (SIGQUIT), exits 0 and removes
/// the socket file.
#[test]
fn shutdown_removes_the_socket_file() {
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT] {
        let (_dir, path) = socket_dir("bye.sock");
        let mut server = start_echo(&path, &[]);
        server.signal(signal);
        let status = server.wait_exit(WAIT);
        assert_eq!(status.code(), Some(0), "exit status on {signal}");
        assert!(!path.exists(), "socket file left at {path:?} on {signal}");
    }
}

/// A file that replaced the socket while the server ran is not removed at exit: neither a
/// regular file nor another server's socket (which still takes connections afterwards).
#[test]
fn shutdown_leaves_a_file_that_replaced_the_socket() {
    for by_a_socket in [false, true] {
        let (_dir, path) = socket_dir("replaced.sock");
        let mut server = start_echo(&path, &[]);
        std::fs::remove_file(&path).unwrap();
        let other = match by_a_socket {
            true => Some(UnixListener::bind(&path).unwrap()),
            false => {
                std::fs::write(&path, "not yours\n").unwrap();
                None
            }
        };
        server.signal(Signal::SIGTERM);
        assert_eq!(server.wait_exit(WAIT).code(), Some(0), "exit status");
        match other {
            Some(listener) => {
                let _client = connect_unix(&path);
                listener
                    .accept()
                    .expect("the other server's socket still works");
            }
            None => assert_eq!(
                std::fs::read_to_string(&path).ok().as_deref(),
                Some("not yours\n"),
                "the file at the path after exit"
            ),
        }
    }
}

/// SIGHUP with a UNIX address added to `listen` starts listening there; with it removed again,
/// the listener closes and its socket file is removed, while TCP goes on.
#[test]
fn reload_adds_and_removes_a_unix_listener() {
    let (_dir, path) = socket_dir("reload.sock");
    let tcp = format!("127.0.0.1:{}", free_port());
    let server = Server::builder()
        .config(&format!("listen = [\"{tcp}\"]\n"))
        .start();

    server.rewrite_config(&format!(
        "listen = [\"{tcp}\", \"{}\"]\n",
        unix_address(&path)
    ));
    server.signal(Signal::SIGHUP);
    let line = server.wait_for_line("reloaded configuration");
    let added = format!("listen +{}", unix_address(&path));
    assert!(
        line.contains(&added)
            || server.count_lines(&format!("listening on {}", unix_address(&path))) == 1,
        "neither {added:?} in {line:?} nor a `listening on` line"
    );
    let mut s = connect_unix_greeted(&path);
    assert_eq!(echo_unix(&mut s, b"added\n"), b"added\n");

    server.rewrite_config(&format!("listen = [\"{tcp}\"]\n"));
    server.signal(Signal::SIGHUP);
    server.wait_for_lines("reloaded configuration", 2);
    assert!(
        wait_until(WAIT, || !path.exists()),
        "socket file still at {path:?} after the reload removed it"
    );
    assert!(UnixStream::connect(&path).is_err(), "still connectable");
    assert_serves(&server, b"tcp still\n");
    // The session from before the removal goes on.
    assert_eq!(echo_unix(&mut s, b"still\n"), b"still\n");
}

/// A reload that keeps a UNIX address (and changes the banner) keeps its listener: not
/// refused as a live server on the path (itself), the same socket file, the new banner.
#[test]
fn reload_keeps_an_unchanged_unix_listener() {
    let (_dir, path) = socket_dir("kept.sock");
    let listen = format!("listen = [\"{}\"]\n", unix_address(&path));
    let server = spawn_listening(
        Server::builder().config(&format!("{listen}banner = \"old\\n\"\n")),
        &path,
    );
    let inode = std::fs::metadata(&path).unwrap().ino();
    let mut before = connect_unix(&path);
    assert_eq!(read_n(&mut before, 4), b"old\n");

    server.rewrite_config(&format!("{listen}banner = \"new\\n\"\n"));
    server.signal(Signal::SIGHUP);
    let line = server.wait_for_line("reloaded configuration");
    assert!(!line.contains("unix:"), "the unchanged address in {line}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        inode,
        "socket file"
    );
    let mut after = connect_unix(&path);
    assert_eq!(read_n(&mut after, 4), b"new\n");
    assert_eq!(echo_unix(&mut before, b"on\n"), b"on\n");
}

/// A reload adding a UNIX address where a live server with a full backlog listens, or where
/// a FIFO is, is refused naming the path; the loop waits on neither (TCP serves right after
/// each refusal) and both are left as they were.
#[test]
fn reload_onto_a_taken_path_is_refused_without_waiting() {
    let (dir, busy) = socket_dir("busy.sock");
    let (_listener, _queued) = full_listener(&busy);
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o644)).unwrap();
    let tcp = format!("127.0.0.1:{}", free_port());
    let server = Server::builder()
        .config(&format!("listen = [\"{tcp}\"]\n"))
        .start();

    for (n, path) in [&busy, &fifo].into_iter().enumerate() {
        server.rewrite_config(&format!(
            "listen = [\"{tcp}\", \"{}\"]\n",
            unix_address(path)
        ));
        server.signal(Signal::SIGHUP);
        server.wait_for_lines("reload refused", n + 1);
        let refused = server
            .log_lines()
            .into_iter()
            .filter(|l| l.contains("reload refused"))
            .nth(n)
            .unwrap();
        assert!(refused.contains(path.to_str().unwrap()), "{refused}");
        assert_serves(&server, b"still serving\n");
    }
    assert!(std::fs::metadata(&busy).unwrap().file_type().is_socket());
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert_eq!(server.count_lines("reloaded configuration"), 0);
}

// ---- Rules and limits by uid ----

/// `--deny uid:0` refuses this process (root) with the refusal message and logs
/// `refused <peer>: denied by rule uid:0`; deny wins over a matching allow.
#[test]
fn deny_uid_refuses_and_wins_over_allow() {
    let (_dir, path) = socket_dir("deny.sock");
    let server = start_echo(
        &path,
        &[
            "--allow",
            "uid:0",
            "--deny",
            "uid:0",
            "--refusal-message",
            "go away\\n",
        ],
    );
    let mut s = connect_unix(&path);
    assert_refused(&mut s, b"go away\n", "root with deny uid:0");
    server.wait_for_line(&format!("refused {}: denied by rule uid:0", own_peer()));
    assert_eq!(
        server.count_lines(" -> child "),
        0,
        "a refused client got a child"
    );
}

/// `--allow uid:65534`: only nobody is served on the UNIX listener; root is refused as not
/// allowed. The log names nobody's socat by its own credentials.
#[test]
fn allow_uid_admits_only_that_uid() {
    let (_dir, path) = socket_dir("allow.sock");
    let server = start_echo(&path, &["--allow", &format!("uid:{NOBODY}")]);
    let mut root = connect_unix(&path);
    assert_refused(&mut root, b"", "root outside allow uid:65534");
    server.wait_for_line(&format!("refused {}: ", own_peer()));

    let mut nobody = NobodyClient::connect(&path);
    assert_eq!(
        nobody.banner_or_eof(),
        Ok(()),
        "nobody with allow uid:65534"
    );
    child_pid_for(&server, &nobody.peer());
}

/// Rules apply to their own kind of peer: IP entries to TCP peers, uid entries to UNIX peers,
/// and a kind with no `allow` entry is allowed. With only `127.0.0.2` allowed root over UNIX
/// is served and TCP from 127.0.0.1 refused; with only `uid:65534` allowed the reverse;
/// `deny 127.0.0.0/8` leaves UNIX peers alone and `deny uid:0` TCP peers.
#[test]
fn rules_apply_to_their_own_kind_of_peer() {
    for (rule, value, tcp_served, unix_served) in [
        ("--allow", "127.0.0.2", false, true),
        ("--allow", "uid:65534", true, false),
        ("--deny", "127.0.0.0/8", false, true),
        ("--deny", "uid:0", true, false),
    ] {
        let (_dir, path) = socket_dir("kinds.sock");
        let address = unix_address(&path);
        let server = Server::builder()
            .args(["-l", "127.0.0.1:0", "-l", address.as_str(), rule, value])
            .start();
        server.wait_for_line(&format!("listening on {address}"));
        let mut unix = connect_unix(&path);
        let mut tcp = connect_from(server.addr(), "127.0.0.1");
        assert_eq!(
            banner_or_eof(&mut unix).is_ok(),
            unix_served,
            "root over UNIX with {rule} {value}"
        );
        assert_eq!(
            banner_or_eof(&mut tcp).is_ok(),
            tcp_served,
            "TCP from 127.0.0.1 with {rule} {value}"
        );
    }
}

/// `max_per_source` counts sessions per uid: root's third session is refused with
/// `2 sessions from uid:0 already (max_per_source)`, while nobody, another source, is served;
/// once one of root's sessions ended root is served again.
#[test]
fn max_per_source_counts_per_uid() {
    let (_dir, path) = socket_dir("per-source.sock");
    let server = start_echo(&path, &["--max-per-source", "2"]);
    let mut kept: Vec<UnixStream> = (0..2).map(|_| connect_unix_greeted(&path)).collect();
    let mut third = connect_unix(&path);
    assert_refused(&mut third, b"", "root's 3rd session at max_per_source 2");
    server.wait_for_line(&format!(
        "refused {}: 2 sessions from uid:0 already (max_per_source)",
        own_peer()
    ));

    let mut nobody = NobodyClient::connect(&path);
    assert_eq!(nobody.banner_or_eof(), Ok(()), "nobody, another source");

    // Once one of root's sessions has ended, root has room for one more.
    kept.pop();
    server.wait_for_line(&format!("({}) exited", own_peer()));
    connect_unix_greeted(&path);
}

/// `max_rate_per_source` keeps one token bucket per uid: root's second connection within
/// 100 s is refused (`too many new connections from uid:0`), nobody's first is served.
#[test]
fn max_rate_per_source_counts_per_uid() {
    let (_dir, path) = socket_dir("rate.sock");
    let server = start_echo(
        &path,
        &["--max-rate-per-source", "0.01", "--rate-burst", "1"],
    );
    let _first = connect_unix_greeted(&path);
    let mut second = connect_unix(&path);
    assert_refused(&mut second, b"", "root's 2nd connection within 100 s");
    server.wait_for_line(&format!(
        "refused {}: too many new connections from uid:0 (max_rate_per_source)",
        own_peer()
    ));

    let mut nobody = NobodyClient::connect(&path);
    assert_eq!(nobody.banner_or_eof(), Ok(()), "nobody has its own bucket");
}

// ---- A program per connection ----

/// Prints the environment NUL-separated, then `END` and a NUL, then waits for the client to
/// close (as in tests/exec.rs).
const PRINT_ENV: &[&str] = &["sh", "-c", "env -0; printf 'END\\000'; exec cat >/dev/null"];

/// A program serving a UNIX connection gets ucspi-unix's variables: PROTO=UNIX, the socket's
/// path, its own pid (as under unixserver, which forks and execs) with the server's uid/gid,
/// and the client's pid/euid/egid (root's, then nobody's); and no TCP variables.
#[test]
fn program_environment_for_a_unix_connection() {
    let (_dir, path) = socket_dir("exec.sock");
    let address = unix_address(&path);
    let mut args = vec!["-l", address.as_str(), "--"];
    args.extend_from_slice(PRINT_ENV);
    let server = start_unix(&args, &path);

    let mut s = connect_unix(&path);
    let env = read_environment(&mut s);
    let parent = [
        ("PROTO", "UNIX".to_string()),
        ("UNIXLOCALPATH", path.display().to_string()),
        ("UNIXLOCALUID", geteuid().to_string()),
        ("UNIXLOCALGID", getegid().to_string()),
    ];
    assert_variables(&env, &parent, "root's session");
    // The program's own pid: the session's child, which exec'd it.
    let me = format!(
        "accepted uid:{},gid:{},pid:{}",
        geteuid(),
        getegid(),
        std::process::id()
    );
    let accepted = server.wait_for_line(&me);
    let child = accepted
        .split("-> child ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert_eq!(
        env.get("UNIXLOCALPID").map(String::as_str),
        Some(child),
        "{env:#?}"
    );
    let client = [
        ("UNIXREMOTEPID", std::process::id().to_string()),
        ("UNIXREMOTEEUID", geteuid().to_string()),
        ("UNIXREMOTEEGID", getegid().to_string()),
    ];
    assert_variables(&env, &client, "root's session");
    for key in ["TCPREMOTEIP", "TCPLOCALIP", "REMOTE_ADDR"] {
        assert!(!env.contains_key(key), "{key} is set: {env:#?}");
    }

    // Another user's client: its own credentials, the same parent's.
    let mut nobody = NobodyClient::connect(&path);
    let env = nobody.read_within_wait(read_environment);
    assert_variables(&env, &parent, "nobody's session");
    assert_ne!(env.get("UNIXLOCALPID"), Some(&server.pid().to_string()));
    let client = [
        ("UNIXREMOTEPID", nobody.child.id().to_string()),
        ("UNIXREMOTEEUID", NOBODY.to_string()),
        ("UNIXREMOTEEGID", NOBODY.to_string()),
    ];
    assert_variables(&env, &client, "nobody's session");
}
