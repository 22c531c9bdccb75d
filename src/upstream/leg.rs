//! The two legs of a P/D request; each has its own client (and TLS settings).

use std::fmt;

/// Which leg an upstream failure happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    Prefill,
    Decode,
}

impl fmt::Display for Leg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Leg::Prefill => "prefill",
            Leg::Decode => "decode",
        })
    }
}
