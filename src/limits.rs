//! Admission control: every peer that connects would cost a process, so the parent decides,
//! before forking, whether this one may have one. The checks run in this order, cheapest and
//! most definite first, and the first that fails refuses the connection:
//!
//! 1. access rules: `deny` rules, then `allow` rules (deny wins). A rule is an address prefix,
//!    for TCP clients, or `uid:N`, for processes connecting to a UNIX-domain listener. An allow
//!    list speaks only of the kind of peer its rules name: with no prefix in it every TCP client
//!    is allowed, with no uid every local process. Prefixes are looked up in an index, one hash
//!    set per prefix length in use (see `PrefixIndex`), so a decision costs the same with ten
//!    rules or two hundred thousand; a refusal names the most specific deny rule that matches;
//! 2. `max_per_source`: live sessions from the same source (an IPv4 address, or an IPv6 /64 by
//!    default: one host usually owns a whole /64, so counting single IPv6 addresses would let it
//!    open unlimited sessions; on a UNIX-domain listener, the connecting process's uid);
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
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hashbrown::hash_table::{Entry, HashTable};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::conn::Peer;

/// Most token buckets kept at once; see [`Admission::take_token`].
const MAX_BUCKETS: usize = 100_000;
/// How often idle buckets are swept out at most.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The limits in force. Validated at load (see `config`, which gives the defaults), replaced
/// whole on reload.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Limits {
    /// Most live children; at the limit accepting pauses.
    pub max_children: usize,
    /// Most live sessions per source; 0 = no limit.
    pub max_per_source: usize,
    /// IPv4 addresses in one /N count as one source.
    pub source_prefix_v4: u8,
    /// IPv6 addresses in one /N count as one source.
    pub source_prefix_v6: u8,
    /// TCP peers in any of these are refused (checked first). Set `deny` and `allow` before
    /// the first decision: they are indexed once (see [`Limits::index_rules`]), and a reload
    /// builds a new `Limits` rather than editing these.
    pub deny: Vec<IpNet>,
    /// If not empty, only TCP peers in one of these are served.
    pub allow: Vec<IpNet>,
    /// Local peers (UNIX-domain listeners) with one of these uids are refused.
    pub deny_uids: Vec<u32>,
    /// If not empty, only local peers with one of these uids are served.
    pub allow_uids: Vec<u32>,
    /// New connections per second per source; `None` = no limit.
    pub rate: Option<Rate>,
    /// Sent to a refused client before its connection is closed; empty = nothing.
    pub refusal_message: Vec<u8>,
    /// `deny` and `allow` indexed for lookup; derived from them, so it takes no part in `==`.
    rules: RulesCell,
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

    /// Indexes `deny` and `allow` now, unless done already. Call it once the lists are final:
    /// otherwise the first decision builds the index, in the accept path (a few milliseconds
    /// for 200,000 rules). Once built, a call costs one atomic load.
    pub fn index_rules(&self) {
        self.rules();
    }

    fn rules(&self) -> &Rules {
        let rules = self
            .rules
            .0
            .get_or_init(|| Rules::new(&self.deny, &self.allow));
        debug_assert_eq!(
            rules.indexed,
            (self.deny.len(), self.allow.len()),
            "deny/allow changed after they were indexed"
        );
        rules
    }
}

/// The index of `Limits::deny` and `Limits::allow`, built on first use. Clones carry it along;
/// equality ignores it, since equal lists give equal indexes.
#[derive(Clone, Default)]
struct RulesCell(OnceLock<Rules>);

impl PartialEq for RulesCell {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for RulesCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.get() {
            Some(rules) => write!(
                f,
                "indexed ({} deny, {} allow prefixes)",
                rules.indexed.0, rules.indexed.1
            ),
            None => f.write_str("not indexed yet"),
        }
    }
}

/// Both rule lists, indexed.
#[derive(Clone)]
struct Rules {
    deny: PrefixIndex,
    allow: PrefixIndex,
    /// Lengths of the `deny` and `allow` lists this was built from.
    indexed: (usize, usize),
}

impl Rules {
    fn new(deny: &[IpNet], allow: &[IpNet]) -> Rules {
        Rules {
            deny: PrefixIndex::new(deny),
            allow: PrefixIndex::new(allow),
            indexed: (deny.len(), allow.len()),
        }
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
    /// By a `deny` rule: for a TCP peer the most specific prefix that holds it, as configured.
    Denied(Source),
    /// `allow` has rules of the peer's kind and the peer matches none of them.
    NotAllowed,
    /// `max_per_source` sessions from this source are already running.
    PerSource { source: Source, limit: usize },
    /// The source's token bucket is empty.
    Rate { source: Source },
    /// The connection was queued on a listener that is closing (shutdown, or removed by a
    /// reload) and cannot have a session: shutting down fast, or at `max_children`. Answered
    /// rather than reset, which is what closing a listener does to its queue.
    Closing,
    /// On a PROXY listener, from an address outside `trusted_proxies`.
    UntrustedProxy { listener: std::net::SocketAddr },
    /// On a PROXY listener, no valid header: malformed, too long, late, or cut short.
    ProxyHeader(&'static str),
}

impl Refusal {
    /// The reason as one word, as the metrics and structured logs name it.
    pub fn name(&self) -> &'static str {
        match self {
            Refusal::Denied(_) => "denied",
            Refusal::NotAllowed => "not_allowed",
            Refusal::PerSource { .. } => "per_source",
            Refusal::Rate { .. } => "rate",
            Refusal::Closing => "closing",
            Refusal::UntrustedProxy { .. } => "untrusted_proxy",
            Refusal::ProxyHeader(_) => "proxy_header",
        }
    }
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
            Refusal::UntrustedProxy { listener } => {
                write!(f, "not a trusted proxy (PROXY listener {listener})")
            }
            Refusal::ProxyHeader(problem) => write!(f, "PROXY header {problem}"),
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
    pub untrusted_proxy: u64,
    pub proxy_header: u64,
}

impl RefusalCounts {
    /// Each reason's name (as the metrics label it) and count.
    pub fn by_reason(&self) -> [(&'static str, u64); 7] {
        [
            ("denied", self.denied),
            ("not_allowed", self.not_allowed),
            ("per_source", self.per_source),
            ("rate", self.rate),
            ("closing", self.closing),
            ("untrusted_proxy", self.untrusted_proxy),
            ("proxy_header", self.proxy_header),
        ]
    }

    pub fn total(&self) -> u64 {
        self.denied
            + self.not_allowed
            + self.per_source
            + self.rate
            + self.closing
            + self.untrusted_proxy
            + self.proxy_header
    }

    /// Counts one refusal under its reason.
    pub fn count(&mut self, refusal: &Refusal) {
        match refusal {
            Refusal::Denied(_) => self.denied += 1,
            Refusal::NotAllowed => self.not_allowed += 1,
            Refusal::PerSource { .. } => self.per_source += 1,
            Refusal::Rate { .. } => self.rate += 1,
            Refusal::Closing => self.closing += 1,
            Refusal::UntrustedProxy { .. } => self.untrusted_proxy += 1,
            Refusal::ProxyHeader(_) => self.proxy_header += 1,
        }
    }
}

impl fmt::Display for RefusalCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "denied: {}, not allowed: {}, per source: {}, rate: {}, closing: {}, untrusted \
             proxy: {}, PROXY header: {}",
            self.denied,
            self.not_allowed,
            self.per_source,
            self.rate,
            self.closing,
            self.untrusted_proxy,
            self.proxy_header
        )
    }
}

/// What sessions are counted under for `max_per_source` and the rate limit, and what a rule
/// names: a TCP peer's address cut to its prefix, or a local peer's uid. Displayed as rules are
/// written (`10.0.0.0/24`, `uid:1000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Net(IpNet),
    Uid(u32),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Net(net) => net.fmt(f),
            Source::Uid(uid) => write!(f, "uid:{uid}"),
        }
    }
}

impl std::str::FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Source, String> {
        match s.strip_prefix("uid:") {
            Some(uid) => uid
                .parse()
                .map(Source::Uid)
                .map_err(|_| format!("`{s}`: no uid")),
            None => s
                .parse()
                .map(Source::Net)
                .map_err(|_| format!("`{s}` is not a source")),
        }
    }
}

/// The source `peer` counts under.
pub fn source_of(peer: &Peer, limits: &Limits) -> Source {
    match peer {
        Peer::Ip(addr) => Source::Net(net_source_of(addr.ip(), limits)),
        Peer::Local(credentials) => Source::Uid(credentials.uid),
    }
}

/// The source an IP address counts under: the address truncated to the configured prefix.
fn net_source_of(ip: IpAddr, limits: &Limits) -> IpNet {
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
    buckets: HashMap<Source, Bucket>,
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
    /// Decides whether `peer`, whose source has `live_from_source` sessions running, may have
    /// a child. A refusal is counted here; the caller logs it and closes the connection.
    pub fn admit(
        &mut self,
        peer: &Peer,
        source: Source,
        live_from_source: usize,
        limits: &Limits,
        now: Instant,
    ) -> Result<(), Refusal> {
        let verdict = check_rules(peer, limits)
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

    /// The token buckets and refusal counts, as an upgrade passes them on.
    pub fn export(&self, now: Instant) -> (Vec<crate::upgrade::BucketState>, Vec<u64>) {
        let buckets = self
            .buckets
            .iter()
            .map(|(source, bucket)| crate::upgrade::BucketState {
                source: source.to_string(),
                tokens: bucket.tokens,
                age_ns: u64::try_from(now.saturating_duration_since(bucket.updated).as_nanos())
                    .unwrap_or(u64::MAX),
            })
            .collect();
        let refused = self.refused.by_reason().iter().map(|(_, n)| *n).collect();
        (buckets, refused)
    }

    /// Takes over what [`Admission::export`] gave.
    pub fn import(
        &mut self,
        buckets: &[crate::upgrade::BucketState],
        refused: &[u64],
        now: Instant,
    ) -> Result<(), String> {
        for state in buckets {
            let updated = now
                .checked_sub(Duration::from_nanos(state.age_ns))
                .unwrap_or(now);
            let bucket = Bucket {
                tokens: state.tokens,
                updated,
            };
            self.buckets.insert(state.source.parse()?, bucket);
        }
        let count = |i: usize| refused.get(i).copied().unwrap_or(0);
        self.refused = RefusalCounts {
            denied: count(0),
            not_allowed: count(1),
            per_source: count(2),
            rate: count(3),
            closing: count(4),
            untrusted_proxy: count(5),
            proxy_header: count(6),
        };
        Ok(())
    }

    /// Number of sources with a token bucket.
    #[cfg(test)]
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
    fn take_token(&mut self, source: Source, rate: Rate, now: Instant) -> bool {
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

/// Deny wins over allow; an allow list with no rule of the peer's kind allows it.
fn check_rules(peer: &Peer, limits: &Limits) -> Result<(), Refusal> {
    match peer {
        Peer::Ip(addr) => check_ip_rules(addr.ip().to_canonical(), limits),
        Peer::Local(credentials) => check_uid_rules(credentials.uid, limits),
    }
}

/// A refusal names the most specific deny prefix that contains `ip`, as it was configured.
fn check_ip_rules(ip: IpAddr, limits: &Limits) -> Result<(), Refusal> {
    let rules = limits.rules();
    if let Some(rule) = rules.deny.most_specific(ip) {
        return Err(Refusal::Denied(Source::Net(rule)));
    }
    if !limits.allow.is_empty() && rules.allow.most_specific(ip).is_none() {
        return Err(Refusal::NotAllowed);
    }
    Ok(())
}

/// Uid rules are few (one per account that may connect): a linear search is enough.
fn check_uid_rules(uid: u32, limits: &Limits) -> Result<(), Refusal> {
    if limits.deny_uids.contains(&uid) {
        return Err(Refusal::Denied(Source::Uid(uid)));
    }
    if !limits.allow_uids.is_empty() && !limits.allow_uids.contains(&uid) {
        return Err(Refusal::NotAllowed);
    }
    Ok(())
}

fn check_per_source(source: Source, live: usize, limits: &Limits) -> Result<(), Refusal> {
    if limits.per_source_full(live) {
        return Err(Refusal::PerSource {
            source,
            limit: limits.max_per_source,
        });
    }
    Ok(())
}

/// A set of prefixes that answers "which is the most specific one containing this address?"
/// with one hash probe per distinct prefix length (at most 33 for IPv4 and 129 for IPv6),
/// however many prefixes it holds, and without allocating.
///
/// Families match strictly, except that an IPv6 prefix within the IPv4-mapped range
/// (::ffff:0:0/96 and narrower) also matches the IPv4 addresses it maps: it is stored as the
/// IPv4 prefix it stands for. Canonical IPv6 addresses are never in that range, so it could
/// match nothing else; and `::/0`, shorter than /96, stays an IPv6 prefix that no IPv4 address
/// is in.
///
/// Why hash sets rather than sorted vectors searched by halving: a probe costs the same for
/// any number of prefixes, where a binary search costs a cache miss or more per halving (for
/// 200,000 host and /24 prefixes, hash sets answered three times as fast). The price is room:
/// an IPv4 prefix takes 5 bytes a slot, with between 8/7 and 16/7 slots a prefix (the slot
/// count is a power of two at most 7/8 full), where a sorted vector takes 4 bytes.
#[derive(Clone)]
struct PrefixIndex {
    v4: ByLength<u32>,
    v6: ByLength<u128>,
    /// IPv4 prefixes `(length, network)` that came only from IPv4-mapped IPv6 rules, sorted: a
    /// refusal names such a rule in the form it was written.
    mapped_only: Vec<(u8, u32)>,
}

impl PrefixIndex {
    fn new(rules: &[IpNet]) -> PrefixIndex {
        // Counted first so that each table is allocated once at its final size: the parent
        // forks per connection, and every page it keeps resident is copied into each child's
        // page table.
        let mut v4_counts = [0; 33];
        let mut v6_counts = [0; 129];
        for rule in rules {
            match indexed_form(rule) {
                Indexed::V4 { len, .. } | Indexed::Mapped { len, .. } => {
                    v4_counts[usize::from(len)] += 1
                }
                Indexed::V6 { len, .. } => v6_counts[usize::from(len)] += 1,
            }
        }
        let mut index = PrefixIndex {
            v4: ByLength::with_counts(&v4_counts),
            v6: ByLength::with_counts(&v6_counts),
            mapped_only: Vec::new(),
        };
        for rule in rules {
            match indexed_form(rule) {
                Indexed::V4 { len, net } => {
                    index.v4.insert(len, net);
                }
                Indexed::V6 { len, net } => {
                    index.v6.insert(len, net);
                }
                Indexed::Mapped { .. } => {}
            }
        }
        // After every IPv4 rule, so that a prefix given both ways is named in its IPv4 form.
        for rule in rules {
            if let Indexed::Mapped { len, net } = indexed_form(rule) {
                if index.v4.insert(len, net) {
                    index.mapped_only.push((len, net));
                }
            }
        }
        index.mapped_only.sort_unstable();
        index.mapped_only.shrink_to_fit();
        index
    }

    /// The longest prefix containing `ip` (canonical: IPv4-mapped addresses as IPv4), in the
    /// form it was configured.
    fn most_specific(&self, ip: IpAddr) -> Option<IpNet> {
        match ip {
            IpAddr::V4(a) => {
                let (len, net) = self.v4.longest_match(u32::from(a))?;
                Some(self.v4_rule(len, net))
            }
            IpAddr::V6(a) => {
                let (len, net) = self.v6.longest_match(u128::from(a))?;
                Some(IpNet::V6(host_net_v6(net, len)))
            }
        }
    }

    fn v4_rule(&self, len: u8, net: u32) -> IpNet {
        if self.mapped_only.binary_search(&(len, net)).is_ok() {
            let mapped = Ipv4Addr::from(net).to_ipv6_mapped();
            IpNet::V6(host_net_v6(u128::from(mapped), len + 96))
        } else {
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(net), len).expect("length at most 32"))
        }
    }

    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.v4.heap_bytes()
            + self.v6.heap_bytes()
            + self.mapped_only.capacity() * std::mem::size_of::<(u8, u32)>()
    }
}

fn host_net_v6(net: u128, len: u8) -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::from(net), len).expect("length at most 128")
}

/// Where a rule goes in a [`PrefixIndex`]: its network as an integer, and its length.
enum Indexed {
    V4 {
        len: u8,
        net: u32,
    },
    V6 {
        len: u8,
        net: u128,
    },
    /// An IPv6 rule within ::ffff:0:0/96, as the IPv4 prefix it maps.
    Mapped {
        len: u8,
        net: u32,
    },
}

fn indexed_form(rule: &IpNet) -> Indexed {
    match rule {
        IpNet::V4(n) => Indexed::V4 {
            len: n.prefix_len(),
            net: u32::from(n.network()),
        },
        IpNet::V6(n) => {
            let len = n.prefix_len();
            match n.network().to_ipv4_mapped() {
                Some(v4) if len >= 96 => Indexed::Mapped {
                    len: len - 96,
                    net: u32::from(v4),
                },
                _ => Indexed::V6 {
                    len,
                    net: u128::from(n.network()),
                },
            }
        }
    }
}

/// One hash set of networks per prefix length in use, longest first.
#[derive(Clone)]
struct ByLength<K> {
    tables: Vec<(u8, HashTable<K>)>,
    seed: Seed,
}

impl<K: Key> ByLength<K> {
    /// Empty tables sized for `counts[len]` networks of each length.
    fn with_counts(counts: &[usize]) -> ByLength<K> {
        let tables = (0..counts.len())
            .rev()
            .filter(|&len| counts[len] > 0)
            .map(|len| (len as u8, HashTable::with_capacity(counts[len])))
            .collect();
        ByLength {
            tables,
            seed: Seed::random(),
        }
    }

    /// Adds `net`/`len`; false if it was there already. `len` must have a table.
    fn insert(&mut self, len: u8, net: K) -> bool {
        let seed = self.seed;
        let Some((_, table)) = self.tables.iter_mut().find(|(l, _)| *l == len) else {
            unreachable!("a table for every length counted");
        };
        match table.entry(net.hash(seed), |k| *k == net, |k| k.hash(seed)) {
            Entry::Occupied(_) => false,
            Entry::Vacant(slot) => {
                slot.insert(net);
                true
            }
        }
    }

    /// The longest `(length, network)` that contains `addr`.
    fn longest_match(&self, addr: K) -> Option<(u8, K)> {
        self.tables.iter().find_map(|(len, table)| {
            let net = addr.masked(*len);
            table.find(net.hash(self.seed), |k| *k == net)?;
            Some((*len, net))
        })
    }

    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        let tables: usize = self.tables.iter().map(|(_, t)| t.allocation_size()).sum();
        tables + self.tables.capacity() * std::mem::size_of::<(u8, HashTable<K>)>()
    }
}

/// An address as an integer, for [`ByLength`].
trait Key: Copy + Eq {
    /// The address with all but its first `len` bits cleared.
    fn masked(self, len: u8) -> Self;
    fn hash(self, seed: Seed) -> u64;
}

impl Key for u32 {
    fn masked(self, len: u8) -> u32 {
        self & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
    }

    fn hash(self, seed: Seed) -> u64 {
        folded_multiply(u64::from(self) ^ seed.0, seed.1)
    }
}

impl Key for u128 {
    fn masked(self, len: u8) -> u128 {
        self & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
    }

    fn hash(self, seed: Seed) -> u64 {
        folded_multiply(self as u64 ^ seed.0, (self >> 64) as u64 ^ seed.1)
    }
}

/// Random per set of tables: lookups take addresses a client chooses, and with a fixed hash a
/// client could pick ones whose probes run long.
#[derive(Clone, Copy)]
struct Seed(u64, u64);

impl Seed {
    fn random() -> Seed {
        let state = RandomState::new();
        Seed(state.hash_one(0u8), state.hash_one(1u8) | 1)
    }
}

/// Mixes two words into one hash (foldhash's and ahash's step): their full 128-bit product,
/// its halves xored, so that every input bit reaches both the low bits hashbrown picks a slot
/// with and the top bits it tags the slot with.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    full as u64 ^ (full >> 64) as u64
}

/// Prefix membership. Families match strictly, except that an IPv6 rule within the IPv4-mapped
/// range (::ffff:0:0/96 and narrower) also matches the IPv4 addresses it maps.
#[cfg(test)]
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

/// A rule of `allow` or `deny`, as written: a prefix, or `uid:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Prefix(IpNet),
    Uid(u32),
}

/// Parses a rule: `uid:N` (a local peer's uid), or a prefix as [`parse_prefix`] takes it.
pub fn parse_rule(s: &str) -> Result<Rule, String> {
    let s = s.trim();
    match s.strip_prefix("uid:") {
        Some(uid) => uid.parse().map(Rule::Uid).map_err(|_| {
            format!("`{s}` is not a uid rule such as uid:1000 (a number, not a user name)")
        }),
        None => parse_prefix(s)
            .map(Rule::Prefix)
            .map_err(|e| format!("{e}, or a uid rule such as uid:1000")),
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

    /// The limits forkecho runs with when nothing is configured.
    fn defaults() -> Limits {
        crate::config::Config::built_in().limits
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn admit(adm: &mut Admission, limits: &Limits, peer: &str, live: usize, now: Instant) -> bool {
        let peer = Peer::Ip(std::net::SocketAddr::new(ip(peer), 1));
        let source = source_of(&peer, limits);
        adm.admit(&peer, source, live, limits, now).is_ok()
    }

    #[test]
    fn sources_group_ipv6_by_64() {
        let l = defaults();
        assert_eq!(
            net_source_of(ip("2001:db8::1"), &l),
            net_source_of(ip("2001:db8::ffff:1"), &l)
        );
        assert_ne!(
            net_source_of(ip("2001:db8:0:1::1"), &l),
            net_source_of(ip("2001:db8::1"), &l)
        );
        assert_eq!(
            net_source_of(ip("::ffff:127.0.0.1"), &l),
            parse_prefix("127.0.0.1").unwrap()
        );
    }

    fn local(uid: u32) -> Peer {
        Peer::Local(crate::conn::Credentials {
            pid: 1,
            uid,
            gid: 1,
        })
    }

    #[test]
    fn uid_rules_speak_of_local_peers_and_prefixes_of_tcp_ones() {
        let limits = Limits {
            allow: vec![parse_prefix("10.0.0.0/8").unwrap()],
            allow_uids: vec![1000, 1001],
            deny_uids: vec![1001],
            ..defaults()
        };
        assert_eq!(check_rules(&local(1000), &limits), Ok(()));
        assert_eq!(
            check_rules(&local(1001), &limits).unwrap_err().to_string(),
            "denied by rule uid:1001"
        );
        assert_eq!(check_rules(&local(0), &limits), Err(Refusal::NotAllowed));
        let tcp = |ip: &str| Peer::Ip(std::net::SocketAddr::new(ip.parse().unwrap(), 1));
        assert_eq!(check_rules(&tcp("10.1.1.1"), &limits), Ok(()));
        assert_eq!(
            check_rules(&tcp("127.0.0.1"), &limits),
            Err(Refusal::NotAllowed)
        );
        // An allow list with only prefixes says nothing about local peers, and the reverse.
        let prefixes_only = Limits {
            allow: vec![parse_prefix("10.0.0.0/8").unwrap()],
            ..defaults()
        };
        assert_eq!(check_rules(&local(0), &prefixes_only), Ok(()));
        let uids_only = Limits {
            allow_uids: vec![1000],
            ..defaults()
        };
        assert_eq!(check_rules(&tcp("127.0.0.1"), &uids_only), Ok(()));
    }

    #[test]
    fn a_local_peer_counts_under_its_uid() {
        let l = defaults();
        assert_eq!(source_of(&local(1000), &l), Source::Uid(1000));
        assert_eq!(Source::Uid(1000).to_string(), "uid:1000");
        assert_eq!(local(7).to_string(), "uid:7,gid:1,pid:1");
        assert_eq!(parse_rule("uid:12"), Ok(Rule::Uid(12)));
        assert!(parse_rule("uid:root").unwrap_err().contains("a number"));
        assert!(parse_rule("nonsense").unwrap_err().contains("uid:1000"));
    }

    #[test]
    fn deny_wins_over_allow() {
        let limits = Limits {
            allow: vec![parse_prefix("127.0.0.0/8").unwrap()],
            deny: vec![parse_prefix("127.0.0.2").unwrap()],
            ..defaults()
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
            ..defaults()
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
            ..defaults()
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
            ..defaults()
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

    fn limits_with(deny: &[&str], allow: &[&str]) -> Limits {
        let parse = |rules: &[&str]| rules.iter().map(|r| parse_prefix(r).unwrap()).collect();
        Limits {
            deny: parse(deny),
            allow: parse(allow),
            ..defaults()
        }
    }

    #[test]
    fn refusal_names_the_most_specific_deny_rule() {
        let limits = limits_with(&["10.0.0.0/8", "10.1.2.0/24", "10.1.0.0/16"], &[]);
        assert_eq!(
            check_ip_rules(ip("10.1.2.3"), &limits)
                .unwrap_err()
                .to_string(),
            "denied by rule 10.1.2.0/24"
        );
        assert_eq!(
            check_ip_rules(ip("10.9.0.1"), &limits),
            Err(Refusal::Denied(Source::Net(
                parse_prefix("10.0.0.0/8").unwrap()
            )))
        );
        assert_eq!(check_ip_rules(ip("11.0.0.1"), &limits), Ok(()));
    }

    #[test]
    fn mapped_rules_cover_ipv4_and_are_named_as_written() {
        let limits = limits_with(&["::ffff:127.0.0.0/104", "::/0"], &[]);
        assert_eq!(
            check_ip_rules(ip("127.0.0.9"), &limits)
                .unwrap_err()
                .to_string(),
            "denied by rule ::ffff:127.0.0.0/104"
        );
        assert_eq!(check_ip_rules(ip("10.0.0.1"), &limits), Ok(()));
        assert_eq!(
            check_ip_rules(ip("2001:db8::1"), &limits)
                .unwrap_err()
                .to_string(),
            "denied by rule ::/0"
        );
        // Given both ways, the IPv4 form is named.
        let both = limits_with(&["::ffff:127.0.0.2/128", "127.0.0.2"], &[]);
        assert_eq!(
            check_ip_rules(ip("127.0.0.2"), &both)
                .unwrap_err()
                .to_string(),
            "denied by rule 127.0.0.2/32"
        );
        // ::ffff:0:0/96 is all of IPv4 and none of IPv6.
        let v4_only = limits_with(&[], &["::ffff:0:0/96"]);
        assert_eq!(check_ip_rules(ip("192.0.2.1"), &v4_only), Ok(()));
        assert_eq!(
            check_ip_rules(ip("::1"), &v4_only),
            Err(Refusal::NotAllowed)
        );
    }

    #[test]
    fn index_takes_no_part_in_equality() {
        let built = limits_with(&["127.0.0.2"], &["127.0.0.0/8"]);
        built.index_rules();
        let unbuilt = limits_with(&["127.0.0.2"], &["127.0.0.0/8"]);
        assert_eq!(built, unbuilt);
        assert_ne!(built, limits_with(&["127.0.0.3"], &["127.0.0.0/8"]));
        let clone = built.clone();
        assert_eq!(
            check_ip_rules(ip("127.0.0.2"), &clone),
            Err(Refusal::Denied(Source::Net(
                parse_prefix("127.0.0.2").unwrap()
            )))
        );
    }

    /// 200,000 host rules, as a blocklist would give, plus one /24 rule every 1,000.
    fn big_deny_list() -> Vec<IpNet> {
        (0..200_000u32)
            .map(|i| {
                if i % 1000 == 0 {
                    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0b00_0000 + (i << 8)), 24).unwrap())
                } else {
                    IpNet::V4(Ipv4Net::from(Ipv4Addr::from(0x0a00_0000 + i)))
                }
            })
            .collect()
    }

    #[test]
    fn a_200_000_rule_deny_list_builds_and_answers() {
        let limits = Limits {
            deny: big_deny_list(),
            allow: vec![parse_prefix("0.0.0.0/0").unwrap()],
            ..defaults()
        };
        limits.index_rules();
        assert_eq!(
            check_ip_rules(ip("10.3.13.63"), &limits)
                .unwrap_err()
                .to_string(),
            "denied by rule 10.3.13.63/32"
        );
        assert_eq!(
            check_ip_rules(ip("11.3.232.77"), &limits)
                .unwrap_err()
                .to_string(),
            "denied by rule 11.3.232.0/24"
        );
        assert_eq!(check_ip_rules(ip("10.3.13.64"), &limits), Ok(()));
        assert_eq!(
            check_ip_rules(ip("10.0.0.1"), &limits),
            Err(Refusal::Denied(Source::Net(
                parse_prefix("10.0.0.1").unwrap()
            )))
        );
        assert_eq!(check_ip_rules(ip("127.0.0.1"), &limits), Ok(()));
        assert_eq!(check_ip_rules(ip("::1"), &limits), Err(Refusal::NotAllowed));
    }

    /// The rules as checked before the index: a scan of both lists in configured order.
    fn check_rules_linear(ip: IpAddr, limits: &Limits) -> Result<(), Refusal> {
        if let Some(rule) = limits.deny.iter().find(|net| net_contains(net, ip)) {
            return Err(Refusal::Denied(Source::Net(*rule)));
        }
        if !limits.allow.is_empty() && !limits.allow.iter().any(|net| net_contains(net, ip)) {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }

    /// A rule's length counted in the family it matches: a mapped rule's in IPv4 bits.
    fn specificity(rule: &IpNet) -> u8 {
        match rule {
            IpNet::V6(n) if n.prefix_len() >= 96 && n.network().to_ipv4_mapped().is_some() => {
                n.prefix_len() - 96
            }
            _ => rule.prefix_len(),
        }
    }

    /// Rules and addresses drawn around a few base addresses, so that rules nest and overlap
    /// and addresses fall inside them: (kind, base, length) for each rule, where kind 0 is
    /// IPv4, 1 IPv6 and 2 IPv4-mapped IPv6.
    fn rule_from(kind: u8, base: usize, len: u8, v4: &[u32; 4], v6: &[u128; 4]) -> IpNet {
        match kind {
            0 => IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(v4[base]), len % 33)
                    .unwrap()
                    .trunc(),
            ),
            1 => IpNet::V6(
                Ipv6Net::new(Ipv6Addr::from(v6[base]), len % 129)
                    .unwrap()
                    .trunc(),
            ),
            _ => {
                let mapped = Ipv4Addr::from(v4[base]).to_ipv6_mapped();
                IpNet::V6(Ipv6Net::new(mapped, 96 + len % 33).unwrap().trunc())
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn index_agrees_with_the_linear_scan(
            v4 in proptest::prelude::any::<[u32; 4]>(),
            v6 in proptest::prelude::any::<[u128; 4]>(),
            deny in proptest::collection::vec((0u8..3, 0usize..4, 0u8..=255), 0..12),
            allow in proptest::collection::vec((0u8..3, 0usize..4, 0u8..=255), 0..12),
            deny_everything in proptest::prelude::any::<(bool, bool)>(),
            probes in proptest::collection::vec(
                (proptest::prelude::any::<bool>(), 0usize..4, 0u32..=128, proptest::prelude::any::<u128>()),
                1..24,
            ),
        ) {
            let rules = |list: &[(u8, usize, u8)]| -> Vec<IpNet> {
                list.iter().map(|&(kind, base, len)| rule_from(kind, base, len, &v4, &v6)).collect()
            };
            let mut limits = Limits {
                deny: rules(&deny),
                allow: rules(&allow),
                ..defaults()
            };
            if deny_everything.0 {
                limits.deny.push(parse_prefix("0.0.0.0/0").unwrap());
            }
            if deny_everything.1 {
                limits.deny.push(parse_prefix("::/0").unwrap());
            }
            for (is_v4, base, host_bits, noise) in probes {
                // The base address with its last `host_bits` bits replaced by noise.
                let peer = if is_v4 {
                    let keep = u32::MAX.checked_shl(host_bits.min(32)).unwrap_or(0);
                    IpAddr::V4(Ipv4Addr::from((v4[base] & keep) | (noise as u32 & !keep)))
                } else {
                    let keep = u128::MAX.checked_shl(host_bits).unwrap_or(0);
                    IpAddr::V6(Ipv6Addr::from((v6[base] & keep) | (noise & !keep))).to_canonical()
                };
                let indexed = check_ip_rules(peer, &limits);
                let linear = check_rules_linear(peer, &limits);
                match (&indexed, &linear) {
                    (Err(Refusal::Denied(Source::Net(rule))), Err(Refusal::Denied(_))) => {
                        let most_specific = limits.deny.iter()
                            .filter(|net| net_contains(net, peer))
                            .map(specificity)
                            .max();
                        proptest::prop_assert!(limits.deny.contains(rule), "{rule} not configured");
                        proptest::prop_assert!(net_contains(rule, peer), "{rule} does not hold {peer}");
                        proptest::prop_assert_eq!(Some(specificity(rule)), most_specific);
                    }
                    _ => proptest::prop_assert_eq!(&indexed, &linear, "peer {}", peer),
                }
            }
        }
    }

    /// Lookups a second, index against scan, and the index's size:
    /// `cargo test --release --lib limits::tests::measure -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_rule_lookups() {
        let big = big_deny_list();
        let peers: Vec<IpAddr> = (0..1_000_000u32)
            .map(|i| {
                IpAddr::V4(Ipv4Addr::from(
                    0x0a00_0000 + i.wrapping_mul(2_654_435_761) % 400_000,
                ))
            })
            .collect();
        for rules in [10, 200_000] {
            let limits = Limits {
                deny: big[..rules].to_vec(),
                ..defaults()
            };
            let started = Instant::now();
            limits.index_rules();
            let built = started.elapsed();
            let per_second = |check: fn(IpAddr, &Limits) -> Result<(), Refusal>, n: usize| {
                let started = Instant::now();
                let refused = peers[..n]
                    .iter()
                    .filter(|&&p| check(p, &limits).is_err())
                    .count();
                std::hint::black_box(refused);
                n as f64 / started.elapsed().as_secs_f64()
            };
            let linear_probes = if rules > 1000 { 2_000 } else { peers.len() };
            let rules_index = limits.rules();
            println!(
                "{rules} rules: index {:.1} M lookups/s, scan {:.3} M lookups/s, \
                 built in {built:.1?}, index {} bytes on the heap, lists {} bytes",
                per_second(check_ip_rules, peers.len()) / 1e6,
                per_second(check_rules_linear, linear_probes) / 1e6,
                rules_index.deny.heap_bytes() + rules_index.allow.heap_bytes(),
                limits.deny.capacity() * std::mem::size_of::<IpNet>(),
            );
        }
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
