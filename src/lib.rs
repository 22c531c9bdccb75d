//! llm-d routing sidecar: a P/D (prefill/decode) reverse proxy for vLLM.

pub mod sim;
