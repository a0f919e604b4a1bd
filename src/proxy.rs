//! The PROXY protocol (HAProxy's `doc/proxy-protocol.txt`, v1 text and v2 binary): a load
//! balancer that forwards a connection first sends a header naming the real client. A
//! listener says whether it expects one ([`Mode`]) and from which balancers ([`Policy`]);
//! whether a header is present is configuration, never guessed.
//!
//! This module only decides on bytes: [`examine`] looks at what a connection has sent so far
//! (peeked, not consumed) and says whether a whole header is there, how long it is, and what it
//! names. The parent's loop does the waiting (`server::headers`), so that it never blocks on a
//! balancer that sends slowly, and consumes exactly the header's bytes: the client's own data
//! stays in the socket for the session.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use ppp::{v1, v2, HeaderResult, PartialResult};

/// Which header a listener expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// None: the peer is the client.
    #[default]
    Off,
    V1,
    V2,
    /// Either version.
    Any,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(Mode::Off),
            "v1" => Ok(Mode::V1),
            "v2" => Ok(Mode::V2),
            "any" => Ok(Mode::Any),
            other => Err(format!("`{other}` is not one of: off, v1, v2, any")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Off => "off",
            Mode::V1 => "v1",
            Mode::V2 => "v2",
            Mode::Any => "any",
        })
    }
}

/// What a PROXY listener accepts: headers of `mode`, from peers in `trusted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub trusted: Vec<IpNet>,
}

impl Policy {
    /// Whether `peer` may send a header here: one of the trusted proxies. An IPv4 peer of a
    /// dual-stack socket (`::ffff:a.b.c.d`) counts as its IPv4 address.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        // A prefix written IPv4-mapped (`::ffff:10.0.0.2`) means the IPv4 address.
        let mapped = match peer {
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
            IpAddr::V6(_) => None,
        };
        self.trusted
            .iter()
            .any(|net| net.contains(&peer) || mapped.is_some_and(|m| net.contains(&m)))
    }
}

/// Longest header read: a v1 header is at most 107 bytes; a v2 header is 16 bytes, 36 of
/// addresses for TCP over IPv6, and the TLVs a balancer adds (a unique id, TLS details), which
/// stay well under this in practice.
pub const MAX_HEADER: usize = 2048;

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Not a header of the version the listener expects, or not a header at all.
    Malformed,
    /// More than [`MAX_HEADER`] bytes without a complete header.
    TooLong,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Problem::Malformed => "malformed",
            Problem::TooLong => "too long",
        })
    }
}

/// What the bytes received so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Examined {
    /// Not a whole header yet, and nothing wrong so far: wait for more.
    Incomplete,
    /// A header of `len` bytes. `addresses` are the client's and the one it connected to,
    /// or `None` when the header says to use the connection's own (v1 `UNKNOWN`, v2 `LOCAL`:
    /// the balancer's health checks, or a family other than TCP over IPv4/IPv6).
    Header {
        len: usize,
        addresses: Option<(SocketAddr, SocketAddr)>,
    },
    Refused(Problem),
}

/// Looks at the first bytes a connection on a `mode` listener sent (at most [`MAX_HEADER`] of
/// them are ever looked at). Pure: no I/O, and no panic on any input.
pub fn examine(received: &[u8], mode: Mode) -> Examined {
    let received = &received[..received.len().min(MAX_HEADER)];
    if v1_so_far(received) {
        return Examined::Incomplete;
    }
    let result = HeaderResult::parse(received);
    // A v1 line that has ended cannot become whole: `ppp` calls some of them incomplete
    // (`PROXY TCP4 1.2.3.4\r\n`, missing its ports).
    if result.is_incomplete() && received.starts_with(b"PROXY ") {
        return Examined::Refused(Problem::Malformed);
    }
    if result.is_incomplete() {
        return match received.len() >= MAX_HEADER {
            true => Examined::Refused(Problem::TooLong),
            false => Examined::Incomplete,
        };
    }
    match (result, mode) {
        (HeaderResult::V1(Ok(header)), Mode::V1 | Mode::Any) => Examined::Header {
            len: header.header.len(),
            addresses: v1_addresses(&header.addresses),
        },
        (HeaderResult::V2(Ok(header)), Mode::V2 | Mode::Any) => Examined::Header {
            len: header.len(),
            addresses: v2_addresses(&header),
        },
        _ => Examined::Refused(Problem::Malformed),
    }
}

/// Longest v1 header, its CRLF included.
const MAX_V1_HEADER: usize = 107;

/// True while `received` can still become a v1 header: it starts as one does, within the
/// longest a v1 header may be, with no line feed or NUL yet and a carriage return, if any,
/// as its last byte (the CRLF may be arriving). Decided here rather than by `ppp`, whose v1
/// parser refuses some prefixes of a valid header (one that ends after a port and its space)
/// instead of waiting for the rest, and a header split there is normal; a line that can no
/// longer be a header goes to `ppp`, which refuses it at once.
fn v1_so_far(received: &[u8]) -> bool {
    const START: &[u8] = b"PROXY ";
    let n = received.len().min(START.len());
    received[..n] == START[..n]
        && received.len() < MAX_V1_HEADER
        && !received.contains(&b'\n')
        && !received.contains(&0)
        && received
            .iter()
            .position(|&b| b == b'\r')
            .is_none_or(|i| i + 1 == received.len())
}

fn v1_addresses(addresses: &v1::Addresses) -> Option<(SocketAddr, SocketAddr)> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        v1::Addresses::Tcp6(a) => Some((
            canonical(SocketAddr::from((a.source_address, a.source_port))),
            canonical(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        )),
        v1::Addresses::Unknown => None,
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is, as everything downstream names it.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn v2_addresses(header: &v2::Header) -> Option<(SocketAddr, SocketAddr)> {
    if header.command != v2::Command::Proxy || header.protocol != v2::Protocol::Stream {
        return None;
    }
    match header.addresses {
        v2::Addresses::IPv4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        v2::Addresses::IPv6(a) => Some((
            canonical(SocketAddr::from((a.source_address, a.source_port))),
            canonical(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        )),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const V1_TCP4: &[u8] = b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 2333\r\n";

    /// A v2 PROXY header for TCP over IPv4, with `tlv` bytes after the addresses.
    fn v2_tcp4(tlv: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x21); // version 2, PROXY
        h.push(0x11); // TCP over IPv4
        h.extend(((12 + tlv.len()) as u16).to_be_bytes());
        h.extend([203, 0, 113, 7, 192, 0, 2, 1]);
        h.extend(5555u16.to_be_bytes());
        h.extend(2333u16.to_be_bytes());
        h.extend(tlv);
        h
    }

    fn header_of(received: &[u8], mode: Mode) -> (usize, Option<(SocketAddr, SocketAddr)>) {
        match examine(received, mode) {
            Examined::Header { len, addresses } => (len, addresses),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_header_is_measured_exactly_and_names_client_and_destination() {
        let client: SocketAddr = "203.0.113.7:5555".parse().unwrap();
        let destination: SocketAddr = "192.0.2.1:2333".parse().unwrap();
        let mut v1 = V1_TCP4.to_vec();
        v1.extend(b"hello");
        assert_eq!(
            header_of(&v1, Mode::V1),
            (V1_TCP4.len(), Some((client, destination)))
        );
        let mut v2 = v2_tcp4(&[0x04, 0, 1, 0]); // a NOOP TLV
        let len = v2.len();
        v2.extend(b"hello");
        assert_eq!(
            header_of(&v2, Mode::Any),
            (len, Some((client, destination)))
        );
        assert_eq!(header_of(b"PROXY UNKNOWN\r\nhello", Mode::Any), (15, None));
    }

    #[test]
    fn a_version_the_listener_does_not_expect_is_refused() {
        assert_eq!(
            examine(V1_TCP4, Mode::V2),
            Examined::Refused(Problem::Malformed)
        );
        assert_eq!(
            examine(&v2_tcp4(&[]), Mode::V1),
            Examined::Refused(Problem::Malformed)
        );
        assert_eq!(
            examine(b"GET / HTTP/1.0\r\n\r\n", Mode::Any),
            Examined::Refused(Problem::Malformed)
        );
    }

    #[test]
    fn a_header_that_never_ends_is_refused_at_the_cap() {
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(MAX_HEADER + 10, b'1');
        assert!(matches!(examine(&long, Mode::Any), Examined::Refused(_)));
        let mut v2 = v2_tcp4(&[]);
        v2[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        v2.resize(MAX_HEADER, 0);
        assert_eq!(examine(&v2, Mode::V2), Examined::Refused(Problem::TooLong));
    }

    proptest! {
        /// Every prefix of a valid header is incomplete, never refused or misread.
        #[test]
        fn every_prefix_of_a_header_waits_for_more(
            cut in 0usize..V1_TCP4.len(),
            tlv in proptest::collection::vec(any::<u8>(), 0..64),
            v2_cut in 0usize..200,
        ) {
            prop_assert_eq!(examine(&V1_TCP4[..cut], Mode::Any), Examined::Incomplete);
            // TLV bytes are opaque to the length check: any content, the header ends where
            // its length says.
            let v2 = v2_tcp4(&tlv);
            let cut = v2_cut.min(v2.len() - 1);
            prop_assert_eq!(examine(&v2[..cut], Mode::V2), Examined::Incomplete);
        }

        /// Garbage never panics, and a header is never longer than what was received.
        #[test]
        fn garbage_is_refused_or_waited_for_never_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            mode in prop_oneof![Just(Mode::V1), Just(Mode::V2), Just(Mode::Any)],
        ) {
            if let Examined::Header { len, .. } = examine(&bytes, mode) {
                prop_assert!(len <= bytes.len());
            }
        }
    }
}
