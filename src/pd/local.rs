//! A decoder-only chat request the sidecar reads whole instead of relaying: its multimodal
//! items are encoded first (E/D), or its decode runs in chunks (`-decode-chunk-size`).

use std::net::SocketAddr;

use http::{Request, Response};
use hyper::body::Incoming;
use tracing::{debug_span, Instrument};

use super::{chunked, encode_stage, leg, parse, read_request, with_request_id, PdContext};
use crate::body::{self, ProxyBody};
use crate::error::ProxyError;
use crate::json_edit::Spliced;
use crate::observe::metrics::RequestGuard;
use crate::routing::Local;
use crate::upstream::decoder::from_upstream;

/// Encodes (if encoders are named) and decodes the request on the local vLLM.
pub async fn serve(
    cx: &PdContext,
    req: Request<Incoming>,
    local: Local,
    client: SocketAddr,
    guard: &mut RequestGuard,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (parts, original, request_id) = read_request(cx, req, client, guard).await?;
    let original = encode_stage(cx, &parts, original, &local.encoders, &request_id).await?;
    let uri = cx.decoder.uri(parts.uri.path_and_query());
    let chunking = (local.api == crate::api::Api::ChatCompletions)
        .then(|| parse(&original).map(|r| chunked::applies(cx.decode_chunk_size, &r)))
        .transpose()?
        .flatten();
    if let Some(chunking) = chunking {
        let first = chunked::FirstChunk {
            body: Spliced::from(original.clone()),
            pinned: false,
        };
        let resp = chunked::decode(cx, parts, uri, original, first, chunking)
            .instrument(debug_span!("chunked_decode"))
            .await?;
        return Ok(with_request_id(resp, request_id));
    }
    let resp = cx
        .decoder
        .send(leg(&parts, uri, body::full(original)))
        .instrument(debug_span!("decode"))
        .await?;
    Ok(with_request_id(from_upstream(resp), request_id))
}
