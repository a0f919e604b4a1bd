//! The seven measurements, each a trial on one contender; `interleave` runs a trial across all
//! contenders, round by round.

mod exec;
mod hold;
mod holder;
mod longlived;
mod proxy;
mod rate;
mod sessions;
mod storm;
mod stream;
mod upgrade;

pub use exec::{exec_rate, CLIENTS as EXEC_CLIENTS};
pub use hold::{hold_sessions, Held};
pub use holder::holder_main;
pub use longlived::{request_response, small_write_stream, Exchanges, MESSAGE, STREAM_WRITE};
pub use proxy::{proxy_rate, proxy_v2_header, CLIENTS as PROXY_CLIENTS, TARGET as PROXY_TARGET};
pub use rate::{connection_rate, RateTrial};
pub use sessions::CHILDREN_WAIT;
pub use storm::{reap_storm, Storm};
pub use stream::stream;
pub use upgrade::{upgrade_gap, Gap, TARGET as UPGRADE_TARGET, UPGRADES};

use crate::contenders::Contender;

/// Runs `trial` for every contender, `rounds` times, alternating contenders each round; the
/// results are per contender, in the contenders' order.
pub fn interleave<T>(
    contenders: &[Contender],
    rounds: usize,
    mut trial: impl FnMut(&Contender) -> T,
) -> Vec<Vec<T>> {
    let mut results: Vec<Vec<T>> = contenders.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, c) in contenders.iter().enumerate() {
            results[i].push(trial(c));
        }
    }
    results
}
