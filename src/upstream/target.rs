//! Upstream addresses: a scheme plus `host:port`, and the prefiller named by a request's
//! `x-prefiller-host-port` / `x-prefiller-url` header.

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{HeaderMap, HeaderName};

use crate::headers::{PREFILLER_HOST_PORT, PREFILLER_URL};

/// An upstream server: scheme plus `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    scheme: Scheme,
    authority: Authority,
}

impl Target {
    /// A plain-HTTP target.
    pub fn http(authority: Authority) -> Self {
        Self {
            scheme: Scheme::HTTP,
            authority,
        }
    }

    /// A target with the given scheme: TLS when `tls`.
    pub fn new(authority: Authority, tls: bool) -> Self {
        let scheme = if tls { Scheme::HTTPS } else { Scheme::HTTP };
        Self { scheme, authority }
    }

    /// The URI for `path_and_query` on this target.
    pub fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            path_and_query
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        // Scheme, authority and path were each validated already.
        Uri::from_parts(parts).unwrap_or_default()
    }

    /// `host:port`, for logs and error messages.
    pub fn authority(&self) -> &str {
        self.authority.as_str()
    }

    /// The host, IPv6 in brackets.
    pub fn host(&self) -> &str {
        self.authority.host()
    }

    /// The port, or the scheme's default.
    pub fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            })
    }
}

/// The prefillers a request names: `x-prefiller-host-port`, else `x-prefiller-url`. The llm-d
/// scheduler may send a comma-separated list, or the header more than once; every entry is
/// returned in order, each parsed on its own (a bad one fails only if it is picked, as in
/// pd-sidecar). Empty means "no P/D for this request"; a value that is not visible ASCII is
/// an error. TLS is used with `tls` (`-prefiller-use-tls`) or an `https://` value.
pub fn prefillers_from(
    headers: &HeaderMap,
    tls: bool,
) -> Result<Vec<Result<Target, String>>, String> {
    let name = if headers.contains_key(PREFILLER_HOST_PORT) {
        PREFILLER_HOST_PORT
    } else {
        PREFILLER_URL
    };
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        let value = value
            .to_str()
            .map_err(|_| "the header is not visible ASCII".to_string())?;
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            out.push(parse_target(entry, tls));
        }
    }
    Ok(out)
}

/// Every `host:port` entry of the `name` header lines, as [`prefillers_from`] reads them; a
/// line that is not visible ASCII is one bad entry.
pub fn targets_from(
    headers: &HeaderMap,
    name: &HeaderName,
    tls: bool,
) -> Vec<Result<Target, String>> {
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        let Ok(value) = value.to_str() else {
            out.push(Err("the header is not visible ASCII".to_string()));
            continue;
        };
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            out.push(parse_target(entry, tls));
        }
    }
    out
}

fn parse_target(value: &str, tls: bool) -> Result<Target, String> {
    let default = if tls { Scheme::HTTPS } else { Scheme::HTTP };
    // The Go sidecar stripped "http://" and applied its TLS flag; so do we.
    let (scheme, rest) = if let Some(rest) = value.strip_prefix("http://") {
        (default, rest)
    } else if let Some(rest) = value.strip_prefix("https://") {
        (Scheme::HTTPS, rest)
    } else {
        (default, value)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('@') {
        return Err(format!("'{value}' must be host:port with no path"));
    }
    let authority: Authority = rest
        .parse()
        .map_err(|_| format!("'{value}' is not a valid host:port"))?;
    if authority.host().is_empty() {
        return Err(format!("'{value}' has no host"));
    }
    if authority.as_str() != authority.host() && authority.port_u16().is_none() {
        return Err(format!("'{value}' has an invalid port"));
    }
    Ok(Target { scheme, authority })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn target(h: &str, v: &str) -> Result<Option<Target>, String> {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::HeaderName::from_bytes(h.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
        match prefillers_from(&headers, false)?.into_iter().next() {
            None => Ok(None),
            Some(first) => first.map(Some),
        }
    }

    #[test]
    fn every_entry_of_every_header_line_is_a_candidate() {
        let mut headers = HeaderMap::new();
        headers.append(PREFILLER_HOST_PORT, HeaderValue::from_static("a:1, b:2"));
        headers.append(PREFILLER_HOST_PORT, HeaderValue::from_static(",c:3"));
        headers.append(PREFILLER_URL, HeaderValue::from_static("ignored:4"));
        headers.append(PREFILLER_HOST_PORT, HeaderValue::from_static("bad:port"));
        let names: Vec<String> = prefillers_from(&headers, false)
            .unwrap()
            .iter()
            .map(|t| {
                t.as_ref()
                    .map_or("bad".into(), |t| t.authority().to_string())
            })
            .collect();
        assert_eq!(names, ["a:1", "b:2", "c:3", "bad"]);
    }

    #[test]
    fn both_headers_and_forms_are_accepted() {
        let want = Some(Target::http("10.0.0.1:8000".parse().unwrap()));
        assert_eq!(
            target("x-prefiller-host-port", "10.0.0.1:8000").unwrap(),
            want
        );
        assert_eq!(
            target("x-prefiller-url", "http://10.0.0.1:8000").unwrap(),
            want
        );
        assert_eq!(
            target("x-prefiller-url", "http://10.0.0.1:8000/").unwrap(),
            want
        );
        assert_eq!(
            target("x-prefiller-host-port", " 10.0.0.1:8000 , b:1").unwrap(),
            want
        );
        assert_eq!(
            target("x-prefiller-host-port", "[::1]:8000")
                .unwrap()
                .unwrap()
                .authority(),
            "[::1]:8000"
        );
    }

    #[test]
    fn empty_means_no_pd_and_garbage_is_an_error() {
        assert_eq!(target("x-prefiller-host-port", "").unwrap(), None);
        assert!(prefillers_from(&HeaderMap::new(), false)
            .unwrap()
            .is_empty());
        assert!(target("x-prefiller-url", "http://h:1/v1").is_err());
        assert!(target("x-prefiller-url", "http://user@h:1").is_err());
        assert!(target("x-prefiller-host-port", "h:notaport").is_err());
    }

    #[test]
    fn uri_keeps_path_and_query() {
        let t = Target::http("p:8000".parse().unwrap());
        let pq = PathAndQuery::from_static("/v1/completions?x=1");
        assert_eq!(
            t.uri(Some(&pq)).to_string(),
            "http://p:8000/v1/completions?x=1"
        );
    }
}
