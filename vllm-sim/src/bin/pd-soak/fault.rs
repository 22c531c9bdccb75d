//! Chaos mode's simulator faults, sent as `x-sim-fault` (the sidecar forwards it to both
//! legs), and what the sidecar answers for each when nothing else goes wrong.

use http::StatusCode;

use crate::mix::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    PrefillHttp(u16),
    DecodeHttp(u16),
    DropBeforeHeaders,
    DropAfterTokens(u64),
    Stall(u64),
    OmitKvParams,
    NullKvParams,
    SideChannelDown,
    Dead,
}

/// Every fault the simulator offers (vllm-sim/src/faults.rs), with the codes we send.
pub const NAMES: [&str; 14] = [
    "prefill_http_503",
    "prefill_http_500",
    "prefill_http_429",
    "decode_http_500",
    "decode_http_503",
    "decode_http_400",
    "drop_before_headers",
    "drop_after_tokens",
    "stall_ms",
    "omit_kv_params",
    "null_kv_params",
    "side_channel_down",
    "dead",
    // Not a fault: the index of requests that carry none.
    "none",
];

impl Fault {
    pub fn pick(rng: &mut Rng) -> Fault {
        match rng.below(13) {
            0 => Fault::PrefillHttp(503),
            1 => Fault::PrefillHttp(500),
            2 => Fault::PrefillHttp(429),
            3 => Fault::DecodeHttp(500),
            4 => Fault::DecodeHttp(503),
            5 => Fault::DecodeHttp(400),
            6 => Fault::DropBeforeHeaders,
            7 => Fault::DropAfterTokens(rng.below(4)),
            8 => Fault::Stall(rng.range(1, 100)),
            9 => Fault::OmitKvParams,
            10 => Fault::NullKvParams,
            11 => Fault::SideChannelDown,
            _ => Fault::Dead,
        }
    }

    pub fn index(self) -> usize {
        match self {
            Fault::PrefillHttp(503) => 0,
            Fault::PrefillHttp(500) => 1,
            Fault::PrefillHttp(_) => 2,
            Fault::DecodeHttp(500) => 3,
            Fault::DecodeHttp(503) => 4,
            Fault::DecodeHttp(_) => 5,
            Fault::DropBeforeHeaders => 6,
            Fault::DropAfterTokens(_) => 7,
            Fault::Stall(_) => 8,
            Fault::OmitKvParams => 9,
            Fault::NullKvParams => 10,
            Fault::SideChannelDown => 11,
            Fault::Dead => 12,
        }
    }

    pub fn header(self) -> String {
        match self {
            Fault::DropAfterTokens(n) => format!("drop_after_tokens:{n}"),
            Fault::Stall(n) => format!("stall_ms:{n}"),
            other => NAMES[other.index()].to_string(),
        }
    }

    /// The sidecar's status (src/error.rs): a prefiller's 503 stays 503, its other 5xx and a
    /// prefill connection closed without a reply are 502, its 4xx is relayed; the decoder's
    /// answer is relayed as it is. Faults apply to both legs, so those that break any request
    /// (drop_*, dead) stop at the prefill.
    pub fn expected(self, stream: bool) -> StatusCode {
        let code = match self {
            Fault::PrefillHttp(503) => 503,
            Fault::PrefillHttp(c) if c >= 500 => 502,
            Fault::PrefillHttp(c) | Fault::DecodeHttp(c) => c,
            Fault::DropBeforeHeaders | Fault::DropAfterTokens(_) | Fault::Dead => 502,
            Fault::Stall(_) | Fault::OmitKvParams | Fault::NullKvParams => 200,
            // The decoder's KV pull fails: a 500, or once streaming, an error event.
            Fault::SideChannelDown if stream => 200,
            Fault::SideChannelDown => 500,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Whether a successful prefill leaves a lease that no decoder ends, by the simulator's
    /// design (SPEC §7.10.3, §7.11): an injected decode error neither pulls nor notifies, a
    /// reply without params pins blocks the sidecar cannot name, a failed pull frees nothing.
    pub fn strands_lease(self) -> bool {
        matches!(
            self,
            Fault::DecodeHttp(_)
                | Fault::OmitKvParams
                | Fault::NullKvParams
                | Fault::SideChannelDown
        )
    }
}
