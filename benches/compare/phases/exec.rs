//! Phase 5: the connection rate of servers that run a program (`cat`) for each connection.
//!
//! connect → 64-byte echo → close from CLIENTS clients, as phase 1, without a banner (a program
//! speaks its own protocol; forkecho sends none in exec mode). For a session this short the
//! program's exec dominates, so the minimal C vfork+exec loop is the limit.

use std::time::Duration;

use super::rate::{connection_rate, RateTrial};
use crate::contenders::Contender;

/// Clients connecting at once in phase 5.
pub const CLIENTS: usize = 4;

/// One trial of `length` on `c`, which sends no banner.
pub fn exec_rate(c: &Contender, length: Duration) -> RateTrial {
    debug_assert_eq!(c.banner, 0, "{} sends a banner in exec mode", c.name);
    connection_rate(c, CLIENTS, length)
}
