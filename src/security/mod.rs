//! Who may be called and how: the SSRF allowlist for prefillers (static rules plus the
//! InferencePool's pods) and the rustls settings for serving and for each upstream leg; and
//! what a client may not say: the transfer parameters removed from its requests.

pub mod allowlist;
pub mod client_params;
pub mod inference_pool;
pub mod tls;
