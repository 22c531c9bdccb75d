//! Where a request goes, decided once from its method, path and prefiller header.

use http::{Method, Request};

use crate::error::ProxyError;
use crate::security::allowlist::Allowlist;
use crate::upstream::{self, Target};

/// How a request was routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Prefilled remotely, decoded locally.
    Pd,
    /// Relayed to the local vLLM as is.
    PassThrough,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Pd => "pd",
            Route::PassThrough => "pass_through",
        }
    }
}

/// The routing decision for one request.
#[derive(Debug)]
pub enum Routing {
    /// Relayed to the local vLLM as is.
    PassThrough,
    /// Prefilled on this prefiller, then decoded locally.
    Pd(Target),
    /// Meant for P/D but refused before any upstream is called (bad header, SSRF).
    Refused {
        prefiller: Option<Target>,
        error: ProxyError,
    },
}

/// The completion routes with a prefiller header go P/D; everything else passes through.
pub fn decide<B>(req: &Request<B>, prefiller_tls: bool, allowlist: &Allowlist) -> Routing {
    let path = req.uri().path();
    let completion = path == "/v1/completions" || path == "/v1/chat/completions";
    if req.method() != Method::POST || !completion {
        return Routing::PassThrough;
    }
    match upstream::prefiller_from(req.headers(), prefiller_tls) {
        Ok(None) => Routing::PassThrough,
        Ok(Some(prefiller)) if !allowlist.allows(&prefiller) => Routing::Refused {
            error: ProxyError::PrefillerNotAllowed {
                prefiller: prefiller.authority().to_string(),
            },
            prefiller: Some(prefiller),
        },
        Ok(Some(prefiller)) => Routing::Pd(prefiller),
        Err(e) => Routing::Refused {
            prefiller: None,
            error: ProxyError::BadPrefillerHeader(e),
        },
    }
}

impl Routing {
    /// The metrics label: a refused P/D request still counts as P/D.
    pub fn route(&self) -> Route {
        match self {
            Routing::PassThrough => Route::PassThrough,
            Routing::Pd(_) | Routing::Refused { .. } => Route::Pd,
        }
    }

    /// The prefiller named, for the request span.
    pub fn prefiller(&self) -> Option<&Target> {
        match self {
            Routing::Pd(p) => Some(p),
            Routing::Refused { prefiller, .. } => prefiller.as_ref(),
            Routing::PassThrough => None,
        }
    }
}
