//! Header hygiene for forwarded requests and responses.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The header naming the prefiller (`host:port`), set by the llm-d scheduler.
pub const PREFILLER_HOST_PORT: HeaderName = HeaderName::from_static("x-prefiller-host-port");
/// The legacy header naming the prefiller (`http://host:port` or `host:port`).
pub const PREFILLER_URL: HeaderName = HeaderName::from_static("x-prefiller-url");
/// Routing headers of pd-sidecar's features that a decoder must not see either: the encoders
/// of E/PD and the source of a P2P prefix pull (llm-d-router#999, #1937).
pub const ENCODER_HOSTS_PORTS: HeaderName = HeaderName::from_static("x-encoder-hosts-ports");
pub const KV_CACHE_SOURCE: HeaderName = HeaderName::from_static("x-kv-cache-source-host-port");
/// The data-parallel rank's sidecar (`POD_IP:port`) a request is for, set by the llm-d scheduler.
pub const DATA_PARALLEL_HOST_PORT: HeaderName =
    HeaderName::from_static("x-data-parallel-host-port");
/// The data-parallel rank vLLM serves a request on (Mooncake's prefill leg).
pub const DATA_PARALLEL_RANK: HeaderName = HeaderName::from_static("x-data-parallel-rank");
/// The request id both legs share; vLLM reads it as its own request id.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// W3C Trace Context headers.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// Marks a response the decoder produced without the prefiller's KV cache.
pub const PREFILL_FALLBACK: HeaderName = HeaderName::from_static("x-prefill-fallback");
/// On the sidecar's own error responses: what failed ([`crate::error::ProxyError::kind`]) and, for
/// an upstream's failure, which leg (encode, prefill, decode).
pub const ERROR_KIND: HeaderName = HeaderName::from_static("x-llm-d-error-kind");
pub const ERROR_LEG: HeaderName = HeaderName::from_static("x-llm-d-error-leg");
/// P/D responses: the prefill's and the decoder's first-byte durations (W3C Server Timing).
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// Connection-scoped headers a proxy must not forward (RFC 9110 §7.6.1: "a proxy or gateway
/// MUST … remove any header or trailer fields listed in Connection, and also these"), plus
/// the pre-standard ones that behave the same way.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including every name listed in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// What a message's `Transfer-Encoding` says of its framing.
#[derive(Debug, PartialEq, Eq)]
pub enum Framing {
    /// No transfer-coding.
    Plain,
    /// `chunked` alone, which hyper decodes.
    Chunked,
    /// Any other coding list, lowercased and comma-joined (hyper would pass it on unlabelled).
    Other(String),
}

/// The transfer-codings of `headers`, over every `Transfer-Encoding` line.
pub fn framing(headers: &HeaderMap) -> Framing {
    let codings: Vec<String> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect();
    match codings.as_slice() {
        [] => Framing::Plain,
        [only] if only == "chunked" => Framing::Chunked,
        _ => Framing::Other(codings.join(", ")),
    }
}

/// Prepares client headers for an upstream leg: no hop-by-hop headers, no routing headers
/// (they are for us, not vLLM), and no `Host` (the client sets the upstream's).
pub fn for_upstream(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    // hyper's client sends bodies without waiting for "100 Continue"; the header would mislead.
    headers.remove(header::EXPECT);
    for name in [
        PREFILLER_HOST_PORT,
        PREFILLER_URL,
        ENCODER_HOSTS_PORTS,
        KV_CACHE_SOURCE,
        DATA_PARALLEL_HOST_PORT,
    ] {
        headers.remove(name);
    }
}

/// The client's `x-request-id` if it sent a usable one, else a fresh UUID.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .cloned()
        .unwrap_or_else(fresh_request_id)
}

/// A fresh id shaped as a random (v4) UUID, in simple form (32 hex digits), from
/// [`crate::runtime::ids`] (no syscall per request).
fn fresh_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(crate::runtime::ids::next_bytes::<16>()).into_uuid();
    let mut text = [0u8; uuid::fmt::Simple::LENGTH];
    let text = id.simple().encode_lower(&mut text);
    // A hex string is always a valid header value.
    HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("sidecar"))
}

/// Appends the client address to `x-forwarded-for`, as reverse proxies conventionally do.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: std::net::IpAddr) {
    let name = HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {client}"),
        None => client.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.insert(PREFILLER_HOST_PORT, HeaderValue::from_static("p:1"));
        h.insert(header::HOST, HeaderValue::from_static("sidecar"));
        for_upstream(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::AUTHORIZATION], "Bearer t");
    }

    #[test]
    fn keeps_the_client_request_id() {
        let mut h = HeaderMap::new();
        assert_eq!(request_id(&h).len(), 32);
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| request_id(&h)).collect();
        assert_eq!(ids.len(), 1000, "fresh ids are unique");
        let id = uuid::Uuid::parse_str(request_id(&h).to_str().unwrap()).unwrap();
        assert_eq!(id.get_version_num(), 4);
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        h.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        assert_eq!(request_id(&h), "abc");
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        append_forwarded_for(&mut h, "10.0.0.9".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
    }
}
