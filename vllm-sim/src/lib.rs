//! vLLM P/D simulator (`vllm-sim`): one process (or in-process server) is one simulated vLLM
//! instance that can act as prefiller and decoder, with KV leases and a side channel.
//! SPEC.md beside this crate is its specification; `§` references in the code point there.

// A simulated engine runs work in tasks by design (requests, lease timers, side channel);
// the sidecar's rule that a spawned task must justify outliving its request is not for it.
#![allow(clippy::disallowed_methods)]

mod api;
mod api_generate;
mod api_messages;
mod api_responses;
mod config;
mod control;
mod counters;
mod decode;
mod encoder;
mod engine;
mod engine_work;
mod faults;
mod generate;
mod handoff;
mod http_util;
mod kv;
mod mooncake;
mod offloading;
mod p2p_source;
mod prompt;
mod reqlog;
mod responses;
mod server;
mod sglang;
mod side_channel;
mod state;
mod validate;
mod wire;

pub use config::{
    Era, ErrorFormat, LeaseMode, OnInvalidKvParams, OnUnknownLease, OutputMode, Protocol, Role,
    SimArgs, SimConfig,
};
pub use prompt::{token_id, MM_ITEM_TOKENS, VOCAB_SIZE};
pub use server::{rank_config, spawn, spawn_ranks, SimServer};
