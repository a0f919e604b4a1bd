//! What a poll event is about. mio gives every registered source a `Token` (a `usize`); the
//! loop encodes the kind of source in the token's top byte and an index in the rest, so that
//! kinds can be added (pending PROXY connections, a control socket) without renumbering the
//! others and without a sentinel value.

use mio::Token;

/// A source the loop polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// signal-hook's self-pipe.
    Signals,
    /// Listener `i` (its index in the loop's listener list).
    Listener(usize),
    /// Connection `i` of those waiting for their PROXY header (`headers`).
    Header(usize),
    /// The control socket.
    ControlListener,
    /// Control connection `i`.
    Control(usize),
    /// The metrics endpoint.
    MetricsListener,
    /// Metrics connection `i`.
    Metrics(usize),
}

/// Bits below the kind.
const KIND_SHIFT: u32 = usize::BITS - 8;
const INDEX_MASK: usize = (1 << KIND_SHIFT) - 1;
const SIGNALS: usize = 0;
const LISTENER: usize = 1;
const HEADER: usize = 2;
const CONTROL_LISTENER: usize = 3;
const CONTROL: usize = 4;
const METRICS_LISTENER: usize = 5;
const METRICS: usize = 6;

impl Source {
    /// The token to register this source under.
    pub(super) fn token(self) -> Token {
        match self {
            Source::Signals => Token(SIGNALS << KIND_SHIFT),
            Source::Listener(i) => {
                debug_assert!(i <= INDEX_MASK);
                Token((LISTENER << KIND_SHIFT) | i)
            }
            Source::Header(i) => {
                debug_assert!(i <= INDEX_MASK);
                Token((HEADER << KIND_SHIFT) | i)
            }
            Source::ControlListener => Token(CONTROL_LISTENER << KIND_SHIFT),
            Source::Control(i) => {
                debug_assert!(i <= INDEX_MASK);
                Token((CONTROL << KIND_SHIFT) | i)
            }
            Source::MetricsListener => Token(METRICS_LISTENER << KIND_SHIFT),
            Source::Metrics(i) => {
                debug_assert!(i <= INDEX_MASK);
                Token((METRICS << KIND_SHIFT) | i)
            }
        }
    }

    /// The source a token was registered for; `None` for a token the loop never gave out.
    pub(super) fn of(token: Token) -> Option<Source> {
        let index = token.0 & INDEX_MASK;
        match token.0 >> KIND_SHIFT {
            SIGNALS if index == 0 => Some(Source::Signals),
            LISTENER => Some(Source::Listener(index)),
            HEADER => Some(Source::Header(index)),
            CONTROL_LISTENER if index == 0 => Some(Source::ControlListener),
            CONTROL => Some(Source::Control(index)),
            METRICS_LISTENER if index == 0 => Some(Source::MetricsListener),
            METRICS => Some(Source::Metrics(index)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_decode_to_the_source_they_encode() {
        for source in [
            Source::Signals,
            Source::Listener(0),
            Source::Listener(70_000),
            Source::Header(0),
            Source::Header(1023),
            Source::ControlListener,
            Source::Control(0),
            Source::Control(7),
            Source::MetricsListener,
            Source::Metrics(15),
        ] {
            assert_eq!(Source::of(source.token()), Some(source));
        }
        assert_ne!(Source::Signals.token(), Source::Listener(0).token());
        assert_eq!(Source::of(Token(usize::MAX)), None);
    }
}
