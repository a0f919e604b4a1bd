//! Phase 6: the connection rate of forkecho behind a balancer that speaks the PROXY protocol,
//! against the same build on a plain listener.
//!
//! connect → v2 header → banner → 64-byte echo → close from CLIENTS clients, as phase 1: the
//! header is what HAProxy's `send-proxy-v2` sends first on each connection it relays. The
//! parent then waits for the header in its poll loop before it forks, which costs it one more
//! wakeup and a peek and a read per connection; the target is ≥ 0.9× the plain listener's rate.

use std::time::Duration;

use super::rate::{connection_rate, RateTrial};
use crate::contenders::Contender;

/// Clients connecting at once in phase 6.
pub const CLIENTS: usize = 4;

/// The least the PROXY listener's rate / the plain listener's should be.
pub const TARGET: f64 = 0.9;

/// One trial of `length` on `c` (its clients send `c.header` first, if any).
pub fn proxy_rate(c: &Contender, length: Duration) -> RateTrial {
    connection_rate(c, CLIENTS, length)
}

/// The v2 header the load generator sends: PROXY, TCP over IPv4, client 127.0.0.1:40000 to
/// 127.0.0.1:2333, no TLVs (28 bytes; layout from HAProxy's `doc/proxy-protocol.txt`, 2.2).
pub fn proxy_v2_header() -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    // Version 2, command PROXY; family INET, protocol STREAM; 12 bytes of addresses.
    header.extend([0x21, 0x11, 0, 12]);
    header.extend([127, 0, 0, 1, 127, 0, 0, 1]);
    header.extend(40_000u16.to_be_bytes());
    header.extend(2333u16.to_be_bytes());
    header
}
