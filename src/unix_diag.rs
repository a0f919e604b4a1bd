//! Asking the kernel whether a UNIX-domain socket file has a listener, without connecting to
//! it (sock_diag over netlink, as `ss -xl` does). A connect would reach the listening server,
//! which, if it forks per connection, would start a session for nothing: so a live server's
//! socket is recognised here first, and only a socket the kernel shows no listener for is
//! probed by connecting (see `listen::clear_stale_socket`).
//!
//! The dump covers this network namespace only: a server in another namespace sharing the
//! file system is not seen here, which is why "not found" is never taken as "stale".

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const UDIAG_SHOW_VFS: u32 = 0x2;
const UNIX_DIAG_VFS: u16 = 1;

#[repr(C)]
struct Request {
    // nlmsghdr
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    // unix_diag_req
    family: u8,
    protocol: u8,
    pad: u16,
    states: u32,
    ino: u32,
    show: u32,
    cookie: [u32; 2],
}

/// The size of a `unix_diag_msg`, which precedes each answer's attributes.
const DIAG_MSG: usize = 16;
const NLMSG_HDR: usize = 16;

/// Whether a listening UNIX-domain socket in this network namespace is bound to the file with
/// device `dev` and inode `ino`; `None` if the kernel could not be asked.
pub fn has_listener(dev: u64, ino: u64) -> Option<bool> {
    query(dev, ino).ok()
}

fn query(dev: u64, ino: u64) -> io::Result<bool> {
    // Safe: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // Safe: `fd` was just created and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = Request {
        len: size_of::<Request>() as u32,
        kind: SOCK_DIAG_BY_FAMILY,
        flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        seq: 1,
        pid: 0,
        family: libc::AF_UNIX as u8,
        protocol: 0,
        pad: 0,
        states: 1 << TCP_LISTEN,
        ino: 0,
        show: UDIAG_SHOW_VFS,
        cookie: [u32::MAX; 2],
    };
    // Safe: `request` is a plain repr(C) value of that size.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            (&request as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buffer = vec![0u8; 32 * 1024];
    let mut found = false;
    loop {
        // Safe: recv writes at most `buffer.len()` bytes into it. The kernel answers a dump
        // at once; it never waits for anyone.
        let got = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut at = 0;
        let got = got as usize;
        if got == 0 {
            return Ok(found);
        }
        while at + NLMSG_HDR <= got {
            let len = u32_at(&buffer, at) as usize;
            let kind = u16::from_ne_bytes([buffer[at + 4], buffer[at + 5]]);
            if len < NLMSG_HDR || at + len > got {
                return Err(io::Error::other("malformed sock_diag answer"));
            }
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => return Err(io::Error::other("sock_diag refused the request")),
                _ => {
                    found |= names_file(&buffer[at + NLMSG_HDR..at + len], dev, ino);
                }
            }
            // Messages are aligned to 4 bytes.
            at += (len + 3) & !3;
        }
    }
}

/// Whether one `unix_diag_msg` and its attributes describe a socket bound to `dev`/`ino`.
fn names_file(message: &[u8], dev: u64, ino: u64) -> bool {
    let mut at = DIAG_MSG;
    while at + 4 <= message.len() {
        let len = u16::from_ne_bytes([message[at], message[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([message[at + 2], message[at + 3]]);
        if len < 4 || at + len > message.len() {
            return false;
        }
        if kind == UNIX_DIAG_VFS && len >= 12 {
            let vfs_ino = u32_at(message, at + 4);
            let vfs_dev = u32_at(message, at + 8);
            if u64::from(vfs_ino) == ino && vfs_dev == kernel_dev(dev) {
                return true;
            }
        }
        at += (len + 3) & !3;
    }
    false
}

/// A device number as the kernel keeps it (and sock_diag reports it): the major number above
/// 20 bits of minor, where stat(2) encodes the two differently.
fn kernel_dev(dev: u64) -> u32 {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    (major << 20) | (minor & 0xf_ffff)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_listening_socket_file_is_found_and_a_closed_one_is_not() {
        let dir = std::env::temp_dir().join(format!("forkecho-diag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(has_listener(meta.dev(), meta.ino()), Some(true));
        drop(listener);
        assert_eq!(has_listener(meta.dev(), meta.ino()), Some(false));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
