//! vLLM P/D simulator (`vllm-sim`): one process (or in-process server) is one simulated vLLM
//! instance that can act as prefiller and decoder, with KV leases and a side channel.

mod api;
mod config;
mod control;
mod counters;
mod decode;
mod engine;
mod engine_work;
mod faults;
mod generate;
mod http_util;
mod kv;
mod prompt;
mod reqlog;
mod responses;
mod server;
mod side_channel;
mod state;
mod validate;

pub use config::{
    Era, ErrorFormat, LeaseMode, OnInvalidKvParams, OnUnknownLease, OutputMode, Protocol, SimArgs,
    SimConfig,
};
pub use server::{spawn, SimServer};
