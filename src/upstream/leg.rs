//! The legs of a P/D request: prefill and decode each have their own client (and TLS
//! settings); encoder calls (E/PD) go out on the prefill leg's client.

use std::fmt;

/// Which leg an upstream failure happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    Encode,
    Prefill,
    Decode,
}

impl Leg {
    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Encode => "encode",
            Leg::Prefill => "prefill",
            Leg::Decode => "decode",
        }
    }
}

impl fmt::Display for Leg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
