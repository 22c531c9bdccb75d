//! Where a request goes, decided once from its method, path and prefiller header.

use http::{Method, Request};

use crate::api::Api;
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
    /// Prefilled on the first of these prefillers (a retry goes to the next), then decoded
    /// locally.
    Pd(Api, Vec<Target>),
    /// Meant for P/D but refused before any upstream is called (bad header, SSRF).
    Refused {
        prefiller: Option<Target>,
        error: ProxyError,
    },
}

/// How the prefiller is picked from the header's list.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pick {
    /// Prefillers named without a scheme use TLS (`-enable-tls=prefiller`).
    pub tls: bool,
    /// Uniformly at random (`-enable-prefiller-sampling`), instead of the first entry.
    pub sampling: bool,
}

/// The P/D routes ([`Api`]) with a prefiller header go P/D; everything else passes through.
pub fn decide<B>(req: &Request<B>, pick: Pick, allowlist: &Allowlist) -> Routing {
    let api = match Api::for_path(req.uri().path()) {
        Some(api) if req.method() == Method::POST => api,
        _ => return Routing::PassThrough,
    };
    let list = match upstream::prefillers_from(req.headers(), pick.tls) {
        Ok(list) if list.is_empty() => return Routing::PassThrough,
        Ok(list) => list,
        Err(e) => {
            return Routing::Refused {
                prefiller: None,
                error: ProxyError::BadPrefillerHeader(e),
            }
        }
    };
    let first = if pick.sampling {
        fastrand::usize(..list.len())
    } else {
        0
    };
    let picked = match &list[first] {
        Ok(picked) => picked,
        Err(e) => {
            return Routing::Refused {
                prefiller: None,
                error: ProxyError::BadPrefillerHeader(e.clone()),
            }
        }
    };
    if !allowlist.allows(picked) {
        return Routing::Refused {
            error: ProxyError::PrefillerNotAllowed {
                prefiller: picked.authority().to_string(),
            },
            prefiller: Some(picked.clone()),
        };
    }
    // Retries go down the list from the pick, skipping entries that do not parse and those
    // SSRF protection refuses.
    let order = list.iter().cycle().skip(first).take(list.len());
    Routing::Pd(
        api,
        order
            .filter_map(|t| t.as_ref().ok())
            .filter(|t| allowlist.allows(t))
            .cloned()
            .collect(),
    )
}

impl Routing {
    /// The metrics label: a refused P/D request still counts as P/D.
    pub fn route(&self) -> Route {
        match self {
            Routing::PassThrough => Route::PassThrough,
            Routing::Pd(..) | Routing::Refused { .. } => Route::Pd,
        }
    }

    /// The prefiller named, for the request span.
    pub fn prefiller(&self) -> Option<&Target> {
        match self {
            Routing::Pd(_, list) => list.first(),
            Routing::Refused { prefiller, .. } => prefiller.as_ref(),
            Routing::PassThrough => None,
        }
    }
}
