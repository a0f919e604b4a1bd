//! Admission control: every peer that connects would cost a process, so the parent decides,
//! before forking, whether this one may have one. The checks run in this order, cheapest and
//! most definite first, and the first that fails refuses the connection:
//!
//! 1. access rules: `deny` prefixes, then `allow` prefixes (deny wins; an empty allow list
//!    allows everyone);
//! 2. `max_per_source`: live sessions from the same source (an IPv4 address, or an IPv6 /64 by
//!    default: one host usually owns a whole /64, so counting single IPv6 addresses would let it
//!    open unlimited sessions);
//! 3. `max_rate_per_source`: new connections per second from the same source, as a token bucket
//!    holding up to `rate_burst` tokens.
//!
//! `max_children` is not a refusal: at the limit the loop stops polling its listeners, so new
//! clients wait in the kernel's backlog and are served as children end.
//!
//! A refusal costs no fork and no blocking call: the optional `refusal_message` is written once
//! to the non-blocking socket (a short write into an empty send buffer) and the socket is closed.
//! [`Limits`] is one plain value the loop reads on every decision, so a reload can replace it
//! whole; [`Admission`] holds what must survive a reload (token buckets, refusal counts).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

pub const DEFAULT_MAX_CHILDREN: usize = 1024;
pub const DEFAULT_MAX_PER_SOURCE: usize = 32;
pub const DEFAULT_SOURCE_PREFIX_V4: u8 = 32;
pub const DEFAULT_SOURCE_PREFIX_V6: u8 = 64;

/// Most token buckets kept at once; see [`Admission::take_token`].
const MAX_BUCKETS: usize = 100_000;
/// How often idle buckets are swept out at most.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The limits in force. Validated at load (see `config`), replaced whole on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most live children; at the limit accepting pauses.
    pub max_children: usize,
    /// Most live sessions per source; 0 = no limit.
    pub max_per_source: usize,
    /// IPv4 addresses in one /N count as one source.
    pub source_prefix_v4: u8,
    /// IPv6 addresses in one /N count as one source.
    pub source_prefix_v6: u8,
    /// Peers in any of these are refused (checked first).
    pub deny: Vec<IpNet>,
    /// If not empty, only peers in one of these are served.
    pub allow: Vec<IpNet>,
    /// New connections per second per source; `None` = no limit.
    pub rate: Option<Rate>,
    /// Sent to a refused client before its connection is closed; empty = nothing.
    pub refusal_message: Vec<u8>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_children: DEFAULT_MAX_CHILDREN,
            max_per_source: DEFAULT_MAX_PER_SOURCE,
            source_prefix_v4: DEFAULT_SOURCE_PREFIX_V4,
            source_prefix_v6: DEFAULT_SOURCE_PREFIX_V6,
            deny: Vec::new(),
            allow: Vec::new(),
            rate: None,
            refusal_message: Vec::new(),
        }
    }
}

impl Limits {
    /// True when `live` children leave no room under `max_children`.
    pub fn children_full(&self, live: usize) -> bool {
        live >= self.max_children
    }

    /// True when a source with `live` sessions may not open another (`max_per_source`).
    pub fn per_source_full(&self, live: usize) -> bool {
        self.max_per_source != 0 && live >= self.max_per_source
    }
}

/// A token bucket's shape: refills at `per_second`, holds at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// Why a connection was refused; one counter each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// In a `deny` prefix (the prefix).
    Denied(IpNet),
    /// `allow` is set and the peer is in none of its prefixes.
    NotAllowed,
    /// `max_per_source` sessions from this source are already running.
    PerSource { source: IpNet, limit: usize },
    /// The source's token bucket is empty.
    Rate { source: IpNet },
    /// The connection was queued on a listener that is closing (shutdown, or removed by a
    /// reload) and cannot have a session: shutting down fast, or at `max_children`. Answered
    /// rather than reset, which is what closing a listener does to its queue.
    Closing,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Denied(rule) => write!(f, "denied by rule {rule}"),
            Refusal::NotAllowed => write!(f, "not in any allow rule"),
            Refusal::PerSource { source, limit } => {
                write!(f, "{limit} sessions from {source} already (max_per_source)")
            }
            Refusal::Rate { source } => {
                write!(
                    f,
                    "too many new connections from {source} (max_rate_per_source)"
                )
            }
            Refusal::Closing => f.write_str("its listener is closing"),
        }
    }
}

/// Refusals since start, by reason: the one place a later status dump reads them from.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RefusalCounts {
    pub denied: u64,
    pub not_allowed: u64,
    pub per_source: u64,
    pub rate: u64,
    pub closing: u64,
}

impl RefusalCounts {
    pub fn total(&self) -> u64 {
        self.denied + self.not_allowed + self.per_source + self.rate + self.closing
    }

    /// Counts one refusal under its reason.
    pub fn count(&mut self, refusal: &Refusal) {
        match refusal {
            Refusal::Denied(_) => self.denied += 1,
            Refusal::NotAllowed => self.not_allowed += 1,
            Refusal::PerSource { .. } => self.per_source += 1,
            Refusal::Rate { .. } => self.rate += 1,
            Refusal::Closing => self.closing += 1,
        }
    }
}

impl fmt::Display for RefusalCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "denied: {}, not allowed: {}, per source: {}, rate: {}, closing: {}",
            self.denied, self.not_allowed, self.per_source, self.rate, self.closing
        )
    }
}

/// The source a peer counts under: its address truncated to the configured prefix.
pub fn source_of(ip: IpAddr, limits: &Limits) -> IpNet {
    // A v4 client reaching a dual-stack socket shows up as ::ffff:a.b.c.d; count it as IPv4.
    let ip = ip.to_canonical();
    let prefix = match ip {
        IpAddr::V4(_) => limits.source_prefix_v4,
        IpAddr::V6(_) => limits.source_prefix_v6,
    };
    // Prefix lengths are validated at load, so this cannot fail; fall back to the host.
    IpNet::new(ip, prefix)
        .map(|net| net.trunc())
        .unwrap_or_else(|_| IpNet::from(ip))
}

/// One source's token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Admission state that outlives any one `Limits`: token buckets and refusal counts.
#[derive(Debug)]
pub struct Admission {
    buckets: HashMap<IpNet, Bucket>,
    last_sweep: Instant,
    /// Refusals since start, by reason.
    pub refused: RefusalCounts,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            buckets: HashMap::new(),
            last_sweep: Instant::now(),
            refused: RefusalCounts::default(),
        }
    }
}

impl Admission {
    /// Decides whether `ip`, whose source has `live_from_source` sessions running, may have a
    /// child. A refusal is counted here; the caller logs it and closes the connection.
    pub fn admit(
        &mut self,
        ip: IpAddr,
        source: IpNet,
        live_from_source: usize,
        limits: &Limits,
        now: Instant,
    ) -> Result<(), Refusal> {
        let verdict = check_rules(ip.to_canonical(), limits)
            .and_then(|()| check_per_source(source, live_from_source, limits))
            .and_then(|()| match limits.rate {
                Some(rate) if !self.take_token(source, rate, now) => Err(Refusal::Rate { source }),
                _ => Ok(()),
            });
        if let Err(refusal) = &verdict {
            self.refused.count(refusal);
        }
        verdict
    }

    /// Number of sources with a token bucket (for tests and status).
    pub fn tracked_sources(&self) -> usize {
        self.buckets.len()
    }

    /// Takes one token from `source`'s bucket, refilled for the time since it was last used.
    ///
    /// The table must not grow without bound under a flood of distinct sources: a bucket that
    /// has refilled completely is the same as no bucket, so those are swept out, at most once
    /// a second whatever happens (the sweep is O(n) and runs in the loop). Should the table
    /// hold `MAX_BUCKETS` between sweeps (more distinct sources per `burst / per_second`
    /// seconds than that), a new source is let through untracked, at O(1): `max_children` and
    /// `max_per_source` still bound what it can cost.
    fn take_token(&mut self, source: IpNet, rate: Rate, now: Instant) -> bool {
        if now >= self.last_sweep + SWEEP_INTERVAL {
            self.sweep(rate, now);
        }
        let full = Bucket {
            tokens: rate.burst,
            updated: now,
        };
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(&source) {
            return true;
        }
        let bucket = self.buckets.entry(source).or_insert(full);
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate.per_second).min(rate.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops every bucket that would be full by now.
    fn sweep(&mut self, rate: Rate, now: Instant) {
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * rate.per_second < rate.burst
        });
        self.last_sweep = now;
    }
}

fn check_rules(ip: IpAddr, limits: &Limits) -> Result<(), Refusal> {
    if let Some(rule) = limits.deny.iter().find(|net| net_contains(net, ip)) {
        return Err(Refusal::Denied(*rule));
    }
    if !limits.allow.is_empty() && !limits.allow.iter().any(|net| net_contains(net, ip)) {
        return Err(Refusal::NotAllowed);
    }
    Ok(())
}

fn check_per_source(source: IpNet, live: usize, limits: &Limits) -> Result<(), Refusal> {
    if limits.per_source_full(live) {
        return Err(Refusal::PerSource {
            source,
            limit: limits.max_per_source,
        });
    }
    Ok(())
}

/// Prefix membership. Families match strictly, except that an IPv6 rule within the IPv4-mapped
/// range (::ffff:0:0/96 and narrower) also matches the IPv4 addresses it maps.
fn net_contains(net: &IpNet, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpNet::V4(n), IpAddr::V4(a)) => n.contains(&a),
        (IpNet::V6(n), IpAddr::V6(a)) => n.contains(&a),
        // Only a rule inside ::ffff:0:0/96 speaks of IPv4: `::/0` means "all IPv6", and must
        // not deny every IPv4 client too.
        (IpNet::V6(n), IpAddr::V4(a)) => n.prefix_len() >= 96 && n.contains(&a.to_ipv6_mapped()),
        // Callers pass canonical addresses: an IPv6 peer here is not a mapped IPv4 one.
        (IpNet::V4(_), IpAddr::V6(_)) => false,
    }
}

/// Parses `ADDR/LEN` or a bare address (a single host).
pub fn parse_prefix(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let parsed = if s.contains('/') {
        s.parse::<IpNet>().ok()
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    };
    let net = parsed.ok_or_else(|| {
        format!("`{s}` is not an address prefix such as 10.0.0.0/8, 127.0.0.2 or ::1/128")
    })?;
    // A typo such as 192.168.1.10/2 would otherwise silently widen a rule to 192.0.0.0/2.
    if net.trunc() != net {
        return Err(format!(
            "`{s}` has bits set after the prefix; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn admit(adm: &mut Admission, limits: &Limits, peer: &str, live: usize, now: Instant) -> bool {
        let source = source_of(ip(peer), limits);
        adm.admit(ip(peer), source, live, limits, now).is_ok()
    }

    #[test]
    fn sources_group_ipv6_by_64() {
        let l = Limits::default();
        assert_eq!(
            source_of(ip("2001:db8::1"), &l),
            source_of(ip("2001:db8::ffff:1"), &l)
        );
        assert_ne!(
            source_of(ip("2001:db8:0:1::1"), &l),
            source_of(ip("2001:db8::1"), &l)
        );
        assert_eq!(
            source_of(ip("::ffff:127.0.0.1"), &l),
            parse_prefix("127.0.0.1").unwrap()
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let limits = Limits {
            allow: vec![parse_prefix("127.0.0.0/8").unwrap()],
            deny: vec![parse_prefix("127.0.0.2").unwrap()],
            ..Limits::default()
        };
        let mut adm = Admission::default();
        let now = Instant::now();
        assert!(admit(&mut adm, &limits, "127.0.0.1", 0, now));
        assert!(!admit(&mut adm, &limits, "127.0.0.2", 0, now));
        assert!(!admit(&mut adm, &limits, "10.0.0.1", 0, now));
        assert_eq!(adm.refused.denied, 1);
        assert_eq!(adm.refused.not_allowed, 1);
    }

    #[test]
    fn ipv6_rules_do_not_cover_ipv4_unless_mapped() {
        let all_v6 = parse_prefix("::/0").unwrap();
        assert!(!net_contains(&all_v6, ip("127.0.0.1")));
        assert!(net_contains(&all_v6, ip("2001:db8::1")));
        let mapped = parse_prefix("::ffff:127.0.0.0/104").unwrap();
        assert!(net_contains(&mapped, ip("127.0.0.9")));
    }

    #[test]
    fn per_source_limit_counts_live_sessions() {
        let limits = Limits {
            max_per_source: 2,
            ..Limits::default()
        };
        let mut adm = Admission::default();
        let now = Instant::now();
        assert!(admit(&mut adm, &limits, "127.0.0.1", 1, now));
        assert!(!admit(&mut adm, &limits, "127.0.0.1", 2, now));
        assert_eq!(adm.refused.per_source, 1);
    }

    #[test]
    fn token_bucket_allows_burst_then_refills() {
        let limits = Limits {
            rate: Some(Rate {
                per_second: 5.0,
                burst: 5.0,
            }),
            ..Limits::default()
        };
        let mut adm = Admission::default();
        let t0 = Instant::now();
        let admitted = (0..20)
            .filter(|_| admit(&mut adm, &limits, "127.0.0.1", 0, t0))
            .count();
        assert_eq!(admitted, 5);
        assert_eq!(adm.refused.rate, 15);
        assert!(admit(
            &mut adm,
            &limits,
            "127.0.0.1",
            0,
            t0 + Duration::from_millis(200)
        ));
        assert!(!admit(
            &mut adm,
            &limits,
            "127.0.0.1",
            0,
            t0 + Duration::from_millis(200)
        ));
    }

    #[test]
    fn bucket_table_expires_idle_sources() {
        let limits = Limits {
            rate: Some(Rate {
                per_second: 10.0,
                burst: 2.0,
            }),
            ..Limits::default()
        };
        let mut adm = Admission::default();
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let peer = std::net::Ipv4Addr::from(0x0a00_0000u32 + i).to_string();
            assert!(admit(&mut adm, &limits, &peer, 0, t0));
        }
        assert_eq!(adm.tracked_sources(), 1000);
        // Long after every bucket has refilled, the next decision sweeps them all out.
        assert!(admit(
            &mut adm,
            &limits,
            "127.0.0.1",
            0,
            t0 + Duration::from_secs(5)
        ));
        assert_eq!(adm.tracked_sources(), 1);
    }

    #[test]
    fn prefixes_parse() {
        assert_eq!(
            parse_prefix("10.0.0.0/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        let typo = parse_prefix("10.1.2.3/8").unwrap_err();
        assert!(typo.contains("did you mean 10.0.0.0/8"), "{typo}");
        assert_eq!(parse_prefix("::1").unwrap().to_string(), "::1/128");
        assert!(parse_prefix("10.0.0.0/33").is_err());
        assert!(parse_prefix("example.com").is_err());
    }
}
