//! Who may be called and how: the SSRF allowlist for prefillers (static rules plus the
//! InferencePool's pods) and the rustls settings for serving and for each upstream leg.

pub mod allowlist;
pub mod inference_pool;
pub mod tls;
