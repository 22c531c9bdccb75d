//! Connectors whose decoder fetches the prefilled KV cache itself (SGLang's bootstrap room,
//! Mooncake's transfer id):
//! both legs go at once. Unlike every other proxy, a prefill that fails is not swallowed: until
//! the decode has produced its first byte, the prefill's failure cancels the decode and is the
//! client's answer, instead of a decode waiting on a room nobody fills (aibrix#2289).

use std::sync::Arc;

use http::request::Parts;
use http::Response;
use http_body_util::BodyExt;
use tracing::{debug, debug_span, Instrument};

use super::prefill::{self, Attempts, Prefilled};
use super::{leg, Abandoned, PdContext, RetryPolicy};
use crate::body::{self, ProxyBody};
use crate::error::ProxyError;
use crate::json_edit::Spliced;
use crate::observe::metrics::RequestGuard;
use crate::runtime::AbortOnDrop;
use crate::upstream::decoder::from_upstream;
use crate::upstream::{Leg, Target};

/// The two legs' heads and bodies (SGLang sends one body twice; Mooncake's differ).
pub(super) struct Legs {
    pub prefill_head: Arc<Parts>,
    pub prefill_body: Spliced,
    pub decode_head: Arc<Parts>,
    pub decode_body: Spliced,
}

/// Sends the prefill to `prefiller` and the decode to `decode_uri` at once, and answers with
/// the decode, or with the prefill's failure if it comes first.
pub(super) async fn serve(
    cx: &PdContext,
    legs: Legs,
    prefiller: Target,
    decode_uri: http::Uri,
    guard: &mut RequestGuard,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Legs {
        prefill_head,
        prefill_body,
        decode_head,
        decode_body,
    } = legs;
    let prefill = {
        let (upstream, metrics, head) = (cx.upstream.clone(), cx.metrics.clone(), prefill_head);
        let (body, timeout) = (prefill_body, cx.prefill_timeout);
        let breakers = Arc::clone(&cx.breakers);
        async move {
            let attempts = Attempts {
                upstream: &upstream,
                body: &body,
                prefillers: std::slice::from_ref(&prefiller),
                // A retry elsewhere would not match the room the decoder was told of.
                policy: RetryPolicy::default(),
                breakers: &breakers,
                abandoned: &Abandoned::default(),
                metrics: &metrics,
            };
            let prefilled = prefill::prefill(attempts, |to, body| {
                leg(&head, to.uri(head.uri.path_and_query()), body)
            });
            match crate::runtime::within(timeout, prefilled).await {
                Ok(result) => result,
                Err(_) => {
                    breakers.timed_out(&prefiller);
                    Err(ProxyError::Timeout {
                        leg: Leg::Prefill,
                        target: prefiller.authority().to_string(),
                        after: timeout,
                    })
                }
            }
        }
        .instrument(debug_span!("prefill"))
    };
    // Boxed: it may outlive this function (step 2).
    let mut prefill = Box::pin(prefill);
    let decode = cx
        .decoder
        .send(leg(&decode_head, decode_uri, body::spliced(decode_body)))
        .instrument(debug_span!("decode"));
    tokio::pin!(decode);

    // 1. Whichever answers first: a failed prefill ends the request here.
    let resp = tokio::select! {
        prefilled = &mut prefill => {
            let resp = refusal(prefilled?);
            if let Some(resp) = resp {
                return Ok(resp);
            }
            guard.prefill_done();
            return Ok(from_upstream(decode.await?));
        }
        resp = &mut decode => resp?,
    };

    // 2. The decode's head came first. Until its first byte, the prefill may still fail; after
    //    it, the KV cache has arrived and the decode is the answer.
    let (head, mut decode_body) = from_upstream(resp).into_parts();
    let first = tokio::select! {
        prefilled = &mut prefill => {
            if let Some(resp) = refusal(prefilled?) {
                return Ok(resp);
            }
            guard.prefill_done();
            return Ok(Response::from_parts(head, decode_body));
        }
        first = decode_body.frame() => first,
    };
    // The prefill's connection may still carry the transfer: let it finish (bounded by the
    // prefill timeout), but no longer than the client's response lives.
    #[allow(clippy::disallowed_methods)]
    let rest = AbortOnDrop(tokio::spawn(
        async move {
            if let Err(e) = prefill.await {
                debug!(error = %e, "prefill failed after the decode started");
            }
        }
        // Its lines still name the request (the leg's own span is opened only at debug).
        .in_current_span(),
    ));
    // The first frame, already read, goes back in front; the body holds the prefill's
    // task, so the prefill is aborted when the client's response ends early.
    Ok(Response::from_parts(
        head,
        body::replay(first, decode_body, rest),
    ))
}

/// The client's answer when the prefill did not succeed (`None` when it did).
fn refusal(prefilled: Prefilled) -> Option<Response<ProxyBody>> {
    match prefilled {
        Prefilled::Reply { .. } => None,
        Prefilled::Rejected(resp) => Some(resp),
    }
}
