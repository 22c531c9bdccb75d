//! Where a request goes, decided once from its method, path and prefiller header.

use http::{Method, Request};

use crate::api::Api;
use crate::error::ProxyError;
use crate::headers::{ENCODER_HOSTS_PORTS, KV_CACHE_SOURCE};
use crate::security::allowlist::Allowlist;
use crate::upstream::{self, Target};
use tracing::{debug, warn};

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
    Pd(Pd),
    /// No prefiller, but a KV cache source to pull a cached prefix from: decoded locally
    /// with `remote_kv_source` (vLLM's P2P tier).
    KvSource(Target),
    /// Decoded here, but not as is: its multimodal items are encoded first (E/D), or its
    /// decode runs in chunks (`-decode-chunk-size`).
    Local(Local),
    /// Meant for P/D but refused before any upstream is called (bad header, SSRF).
    Refused {
        prefiller: Option<Target>,
        error: ProxyError,
    },
}

/// A P/D request's route.
#[derive(Debug)]
pub struct Pd {
    pub api: Api,
    /// The prefiller picked first, then the ones a retry may go to.
    pub prefillers: Vec<Target>,
    /// Where the prefiller may pull a cached prefix from (`-enable-p2p-pull`): the
    /// `x-kv-cache-source-host-port` the scheduler named, if SSRF protection allows it and
    /// it is not the prefiller itself.
    pub kv_source: Option<Target>,
    pub encoders: Encoders,
}

/// A decoder-only chat request the sidecar reads whole (see [`Routing::Local`]).
#[derive(Debug)]
pub struct Local {
    pub api: Api,
    pub encoders: Encoders,
}

/// The encoders of `x-encoder-hosts-ports` (E/PD), when `-ec-connector` is set and the route
/// is chat: the ones SSRF protection allows, in order, and how many it did not.
#[derive(Debug, Default)]
pub struct Encoders {
    pub allowed: Vec<Target>,
    pub denied: usize,
}

/// How the prefiller is picked from the header's list.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pick {
    /// Prefillers named without a scheme use TLS (`-enable-tls=prefiller`).
    pub tls: bool,
    /// Uniformly at random (`-enable-prefiller-sampling`), instead of the first entry.
    pub sampling: bool,
    /// Read `x-kv-cache-source-host-port` (offloading, or nixlv2 with `-enable-p2p-pull`).
    pub p2p_pull: bool,
    /// `POD_IP:port`: a source naming it is this sidecar's own decoder.
    pub own: Option<std::net::SocketAddr>,
    /// `-ec-connector` is set: read `x-encoder-hosts-ports` on chat routes.
    pub encode: bool,
    /// Encoders named without a scheme use TLS (`-enable-tls=encoder`).
    pub encoder_tls: bool,
    /// `-decode-chunk-size` > 0: decoder-only chat requests are read whole, to chunk.
    pub chunked: bool,
}

/// The P/D routes ([`Api`]) with a prefiller header go P/D; everything else passes through.
pub fn decide<B>(req: &Request<B>, pick: Pick, allowlist: &Allowlist) -> Routing {
    let api = match Api::for_path(req.uri().path()) {
        Some(api) if req.method() == Method::POST => api,
        _ => return Routing::PassThrough,
    };
    let encoders = match api {
        Api::ChatCompletions if pick.encode => encoders(req.headers(), pick, allowlist),
        _ => Encoders::default(),
    };
    let list = match upstream::prefillers_from(req.headers(), pick.tls) {
        Ok(list) if list.is_empty() => {
            if !encoders.allowed.is_empty() || (pick.chunked && api == Api::ChatCompletions) {
                return Routing::Local(Local { api, encoders });
            }
            return match pick
                .p2p_pull
                .then(|| kv_source(req.headers(), None, pick, allowlist))
            {
                Some(Some(source)) => Routing::KvSource(source),
                _ => Routing::PassThrough,
            };
        }
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
    let kv_source = pick
        .p2p_pull
        .then(|| kv_source(req.headers(), Some(picked), pick, allowlist))
        .flatten();
    Routing::Pd(Pd {
        api,
        prefillers: order
            .filter_map(|t| t.as_ref().ok())
            .filter(|t| allowlist.allows(t))
            .cloned()
            .collect(),
        kv_source,
        encoders,
    })
}

/// The encoders the request names that may be called: entries that do not parse, and those
/// SSRF protection refuses, are dropped (pd-sidecar filters them the same way).
fn encoders(headers: &http::HeaderMap, pick: Pick, allowlist: &Allowlist) -> Encoders {
    let mut out = Encoders::default();
    for entry in upstream::targets_from(headers, &ENCODER_HOSTS_PORTS, pick.encoder_tls) {
        match entry {
            Ok(encoder) if allowlist.allows(&encoder) => out.allowed.push(encoder),
            Ok(encoder) => {
                warn!(
                    encoder = encoder.authority(),
                    "encoder not allowed by SSRF protection; dropped"
                );
                out.denied += 1;
            }
            Err(e) => debug!(error = %e, "x-encoder-hosts-ports entry dropped"),
        }
    }
    out
}

/// The KV cache source the scheduler named, when it may be used: it parses, SSRF protection
/// allows it (else it is ignored, as pd-sidecar does), and it is not the server that would
/// pull (the prefiller, or without one this pod's decoder), which would pull from itself.
fn kv_source(
    headers: &http::HeaderMap,
    prefiller: Option<&Target>,
    pick: Pick,
    allowlist: &Allowlist,
) -> Option<Target> {
    let value = headers.get(KV_CACHE_SOURCE)?.to_str().ok()?.trim();
    let source: Target = match value.parse::<http::uri::Authority>() {
        Ok(authority) if authority.port_u16().is_some() => Target::http(authority),
        _ => {
            debug!(
                value,
                "x-kv-cache-source-host-port is not host:port; ignored"
            );
            return None;
        }
    };
    if !allowlist.allows(&source) {
        warn!(
            source = source.authority(),
            "KV cache source not allowed by SSRF protection; ignored"
        );
        return None;
    }
    let itself = match prefiller {
        Some(prefiller) => source.authority() == prefiller.authority(),
        None => pick.own.is_some_and(|own| {
            source.authority().parse::<std::net::SocketAddr>().ok() == Some(own)
        }),
    };
    (!itself).then_some(source)
}

impl Routing {
    /// The metrics label: a refused P/D request still counts as P/D.
    pub fn route(&self) -> Route {
        match self {
            Routing::PassThrough | Routing::KvSource(_) | Routing::Local(_) => Route::PassThrough,
            Routing::Pd(_) | Routing::Refused { .. } => Route::Pd,
        }
    }

    /// The prefiller named, for the request span.
    pub fn prefiller(&self) -> Option<&Target> {
        match self {
            Routing::Pd(pd) => pd.prefillers.first(),
            Routing::Refused { prefiller, .. } => prefiller.as_ref(),
            Routing::PassThrough | Routing::KvSource(_) | Routing::Local(_) => None,
        }
    }

    /// pd-sidecar's `disagg_type`: the stages run remotely, if any.
    pub fn disagg_type(&self) -> Option<&'static str> {
        match self {
            Routing::Pd(pd) if pd.encoders.allowed.is_empty() => Some("p/d"),
            Routing::Pd(_) => Some("e/p/d"),
            Routing::Local(local) if !local.encoders.allowed.is_empty() => Some("e/d"),
            _ => None,
        }
    }

    /// Encoders the request named that SSRF protection refused.
    pub fn encoders_denied(&self) -> usize {
        match self {
            Routing::Pd(Pd { encoders, .. }) | Routing::Local(Local { encoders, .. }) => {
                encoders.denied
            }
            _ => 0,
        }
    }
}
