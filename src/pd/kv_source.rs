//! A decoder-only request with a KV cache source (`x-kv-cache-source-host-port`, no
//! prefiller): the local decoder pulls the cached prefix from the peer's P2P port instead of
//! computing it (vLLM's OffloadingConnector P2P tier, pd-sidecar's `decodeWithP2PSource`).

use std::net::SocketAddr;

use http::{Request, Response};
use hyper::body::Incoming;
use tracing::{debug, debug_span, Instrument};

use super::{leg, parse, read_request, with_request_id, PdContext};
use crate::body::{self, ProxyBody};
use crate::connector::{with_kv_source, Pairing};
use crate::error::ProxyError;
use crate::observe::metrics::RequestGuard;
use crate::upstream::decoder::from_upstream;
use crate::upstream::Target;

/// Decodes the request locally with `kv_transfer_params` naming `source` alone.
pub async fn serve(
    cx: &PdContext,
    req: Request<Incoming>,
    source: Target,
    client: SocketAddr,
    guard: &mut RequestGuard,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (parts, original, request_id) = read_request(cx, req, client, guard).await?;
    let request = parse(&original)?;
    let mut pairing = Pairing::new(cx.pairing_ports);
    pairing.kv_source_host = Some(source.host().to_owned());
    let body = with_kv_source(&request, &pairing)
        .ok_or_else(|| ProxyError::Internal("a KV source pull without a source".into()))?;
    debug!(
        source = source.authority(),
        "decoding with a prefix pulled from a KV cache source"
    );
    let uri = cx.decoder.uri(parts.uri.path_and_query());
    let resp = cx
        .decoder
        .send(leg(&parts, uri, body::spliced(body)))
        .instrument(debug_span!("decode"))
        .await?;
    Ok(with_request_id(from_upstream(resp), request_id))
}
