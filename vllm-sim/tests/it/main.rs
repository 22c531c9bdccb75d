//! The simulator's integration tests: one binary, one support module.

// Test code: a failed expectation is the test failing, and its servers are bounded by the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod support;

mod abort;
mod continuation;
mod decode_first;
mod dp;
mod encoder;
mod http;
mod mooncake;
mod multimodal;
mod offloading;
mod p2p_source;
mod pd;
mod routes;
mod sglang;
mod tokenize_once;

pub const COMPLETIONS: &str = "/v1/completions";
pub const CHAT: &str = "/v1/chat/completions";
pub const RESPONSES: &str = "/v1/responses";
pub const MESSAGES: &str = "/v1/messages";
pub const GENERATE: &str = "/inference/v1/generate";
