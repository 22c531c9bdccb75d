//! The KV-lease safety net: what happens to a leg when its client leaves.
//!
//! Cancellation is by ownership almost everywhere: the client's future owns each leg, so
//! dropping it closes the upstream connection and vLLM aborts the request. The exceptions are
//! here, because a P/D prefill that finished has pinned KV blocks on the prefiller that only
//! a decoder seeing the request (and then being closed) makes it free; a decode never sent
//! strands them until vLLM's lease expires (30 s to 480 s, by version).
//!
//! - Both legs of a P/D request run in a [`LegTask`], polled by the request's own task (no
//!   task per leg, no wake-up hop between them). Dropped before it resolved, the leg is moved
//!   into a task of its own, whose handle goes to its [`OnAbandon`] policy.
//! - The prefill's policy ([`PrefillAbandoned`]): abort it, unless the connector pins blocks
//!   and vLLM has the whole request; then let it run on for `-prefill-abandon-grace`, then
//!   half-close the connection (vLLM aborts the prefill) and read on for
//!   [`LATE_REPLY_READ`], since a reply may cross our FIN; if one arrives, send the decode
//!   anyway ([`LateReplyRelease`]) so the decoder releases the blocks.
//! - A pinned decode's policy ([`CloseWhenAdmitted`]): let the request be written out in full
//!   and admitted, then close it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::CONTENT_TYPE;
use http::request::Parts;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, Instrument};

use super::leg_parts;
use super::prefill::Prefilled;
use crate::body::{self, SentSignal};
use crate::connector::{Connector, Handoff, Pairing};
use crate::error::ProxyError;
use crate::json_edit::{JsonObject, Spliced};
use crate::upstream::decoder::LegFailure;
use crate::upstream::half_close;
use crate::upstream::{Leg, Target, Upstream};
use hyper_util::client::legacy::connect::CaptureConnection;

/// After the abandon grace, how long the half-closed prefill connection is read for a reply
/// that crossed our FIN. vLLM answers EOF by aborting and closing at once; this bounds a
/// prefiller that does not.
pub const LATE_REPLY_READ: Duration = Duration::from_secs(2);

type UpstreamResult = Result<Response<Incoming>, hyper_util::client::legacy::Error>;

/// What to do with a leg's task when the request that owns it is dropped unfinished.
pub trait OnAbandon<T>: Send + 'static {
    fn abandon(self, pending: JoinHandle<T>);
}

/// A leg owned by the request: [`LegTask::result`] polls it to its end in the request's task;
/// dropping it first moves it into a task of its own and hands that to the `A` policy.
pub struct LegTask<T: Send + 'static, A: OnAbandon<T>> {
    /// `None` once it resolved: nothing left to abandon.
    leg: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
    on_abandon: Option<A>,
}

impl<T: Send + 'static, A: OnAbandon<T>> LegTask<T, A> {
    fn start(leg: impl Future<Output = T> + Send + 'static, on_abandon: A) -> Self {
        Self {
            leg: Some(Box::pin(leg)),
            on_abandon: Some(on_abandon),
        }
    }

    /// The leg's output; an error only if it panicked.
    pub async fn result(mut self) -> Result<T, String> {
        let Some(leg) = self.leg.as_mut() else {
            return Err("the leg's result was already taken".into());
        };
        // As a task of its own would, a panicking leg fails its request, not the connection.
        let out = std::panic::AssertUnwindSafe(leg.as_mut())
            .catch_unwind()
            .await;
        self.leg = None;
        out.map_err(|_| "the leg panicked".to_string())
    }
}

impl<T: Send + 'static, A: OnAbandon<T>> Drop for LegTask<T, A> {
    fn drop(&mut self) {
        let (Some(leg), Some(on_abandon)) = (self.leg.take(), self.on_abandon.take()) else {
            return;
        };
        // Without a runtime (it is shutting down) there is nothing left to run the leg on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // The request's future is dropped inside its span (`Instrumented` enters it to
            // drop), so the leg's lines keep naming the request once it runs alone.
            let leg = leg.in_current_span();
            // Outlives the request by design: the abandon policy decides when it ends.
            on_abandon.abandon(runtime.spawn(leg));
        }
    }
}

/// The prefill leg's task.
pub type PrefillTask = LegTask<Result<Prefilled, ProxyError>, PrefillAbandoned>;

/// What a prefill and its abandon policy share: whether the request dropped it (then no
/// further attempt starts), and the connection its current attempt went out on (to
/// half-close when the grace ends, see `upstream/half_close.rs`).
#[derive(Clone, Default)]
pub struct Abandoned {
    flag: Arc<AtomicBool>,
    attempt: Arc<Mutex<Option<Attempt>>>,
}

/// The current attempt's connection (until its response head arrives), and whether its
/// request was written out in full.
struct Attempt {
    /// Where it went (a failover moves on), for the breaker when the deadline ends it.
    prefiller: Target,
    connection: Option<CaptureConnection>,
    sent: oneshot::Receiver<Instant>,
    was_sent: bool,
}

impl Abandoned {
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.flag.store(true, Ordering::Release);
    }

    /// Notes the connection the next attempt goes out on, and its body's sent signal.
    pub fn track(
        &self,
        prefiller: &Target,
        connection: CaptureConnection,
        sent: oneshot::Receiver<Instant>,
    ) {
        if let Ok(mut slot) = self.attempt.lock() {
            *slot = Some(Attempt {
                prefiller: prefiller.clone(),
                connection: Some(connection),
                sent,
                was_sent: false,
            });
        }
    }

    /// The prefiller the current attempt went to, if one was sent.
    pub fn in_flight(&self) -> Option<Target> {
        let slot = self.attempt.lock().ok()?;
        slot.as_ref().map(|a| a.prefiller.clone())
    }

    /// Forgets the current attempt's connection: its response head arrived, so a half-close
    /// would gain nothing, and once its body is read hyper pools the connection for other
    /// requests, which a half-close must never touch.
    pub fn head_arrived(&self) {
        if let Ok(mut slot) = self.attempt.lock() {
            if let Some(attempt) = slot.as_mut() {
                attempt.connection = None;
            }
        }
    }

    /// Whether vLLM has the current attempt's whole request: before that it cannot have
    /// started the prefill, so closing the connection strands nothing.
    fn request_sent(&self) -> bool {
        let Ok(mut slot) = self.attempt.lock() else {
            return true;
        };
        let Some(attempt) = slot.as_mut() else {
            return false;
        };
        if !attempt.was_sent {
            // Closed (the body was dropped unsent) means the request failed before vLLM had it.
            attempt.was_sent = attempt.sent.try_recv().is_ok();
        }
        attempt.was_sent
    }

    /// Half-closes the current attempt's connection; false if there is none to close.
    fn half_close(&self) -> bool {
        self.attempt
            .lock()
            .ok()
            .and_then(|slot| {
                slot.as_ref()
                    .and_then(|a| a.connection.as_ref())
                    .map(half_close::shut_down_sending)
            })
            .unwrap_or(false)
    }
}

/// Starts the prefill leg; `release` is what hands late-pinned blocks to a decoder (`None`
/// for connectors that pin none); `abandoned` is shared with the leg; `grace` is how long an
/// abandoned prefill that vLLM received may run on (`-prefill-abandon-grace`).
pub fn send_prefill(
    leg: impl Future<Output = Result<Prefilled, ProxyError>> + Send + 'static,
    release: Option<LateReplyRelease>,
    abandoned: Abandoned,
    grace: Duration,
) -> PrefillTask {
    LegTask::start(
        leg,
        PrefillAbandoned {
            release,
            abandoned,
            grace,
        },
    )
}

/// A prefill dropped before it resolved (the client left, or the prefill timed out).
pub struct PrefillAbandoned {
    release: Option<LateReplyRelease>,
    abandoned: Abandoned,
    grace: Duration,
}

impl OnAbandon<Result<Prefilled, ProxyError>> for PrefillAbandoned {
    fn abandon(self, mut pending: JoinHandle<Result<Prefilled, ProxyError>>) {
        // Before anything else: an attempt in flight may finish, but none starts.
        self.abandoned.set();
        let Some(release) = self.release else {
            // Dropping the request alone would let hyper finish writing the body first.
            self.abandoned.half_close();
            pending.abort();
            return;
        };
        let (abandoned, grace) = (self.abandoned, self.grace);
        // Bounded by the grace and LATE_REPLY_READ, then by the decode's admission grace.
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(async move {
            let late = if !abandoned.request_sent() {
                // vLLM never had the whole request, so it cannot have started: stop at once.
                // (Dropping the request alone would let hyper finish writing the body first.)
                // If the last byte went out just before the FIN, vLLM may answer: read on.
                abandoned.half_close();
                if !abandoned.request_sent() {
                    return pending.abort();
                }
                read_on(&mut pending).await
            } else {
                // A prefill that finishes pins blocks only a decode frees, and vLLM can pin
                // them and still lose the reply if it sees the connection end as it answers:
                // so let a prefill that is nearly done finish, and read its reply.
                match tokio::time::timeout(grace, &mut pending).await {
                    Ok(late) => Some(late),
                    // Still prefilling: stop sending so vLLM aborts it, but read on, since a
                    // reply may be crossing our FIN. Without a connection to half-close, close.
                    Err(_) if abandoned.half_close() => read_on(&mut pending).await,
                    Err(_) => None,
                }
            };
            match late {
                Some(Ok(Ok(Prefilled::Reply { body, from }))) => release.release(&body, &from),
                Some(_) => {}
                None => pending.abort(),
            }
        });
    }
}

/// Reads a half-closed prefill on for [`LATE_REPLY_READ`]: its outcome, or `None` if none came.
async fn read_on<T>(pending: &mut JoinHandle<T>) -> Option<Result<T, tokio::task::JoinError>> {
    tokio::time::timeout(LATE_REPLY_READ, pending).await.ok()
}

/// Everything needed to send the decode leg without the client: after a prefill that pinned
/// blocks, a decoder that sees the request (and is then closed) makes the prefiller free them.
pub struct LateReplyRelease {
    pub connector: Connector,
    pub original: Bytes,
    /// The client's request head, and the decode leg's address.
    pub head: Arc<Parts>,
    pub uri: http::Uri,
    pub upstream: Upstream,
    pub grace: Duration,
    /// The request's pairing.
    pub pairing: Pairing,
}

impl LateReplyRelease {
    fn release(self, reply: &Bytes, from: &Target) {
        let Ok(request) = JsonObject::parse(&self.original) else {
            return;
        };
        let Ok(plan) =
            self.connector
                .decode_plan(&request, &self.original, reply, &self.pairing, from.host())
        else {
            return;
        };
        if plan.handoff == Handoff::Remote {
            debug!("client left as its prefill finished; handing the KV blocks to the decoder to release");
            drop(deliver_then_close(
                &self.upstream,
                leg_parts(&self.head, self.uri),
                plan.body,
                self.grace,
            ));
        }
    }
}

/// A pinned decode's task.
pub type DecodeTask = LegTask<UpstreamResult, CloseWhenAdmitted>;

/// Sends the decode leg of a request whose prefiller pinned KV blocks for it. Dropped before
/// the decoder answered, the request is still written out in full and kept open until the
/// decoder shows it admitted it (see [`CloseWhenAdmitted`]).
pub fn deliver_then_close(
    upstream: &Upstream,
    parts: Parts,
    body: Spliced,
    grace: Duration,
) -> DecodeTask {
    let (body, sent) = SentSignal::new(body);
    let req = Request::from_parts(parts, body::boxed(body));
    let upstream = upstream.clone();
    LegTask::start(
        async move { upstream.send(Leg::Decode, req).await },
        CloseWhenAdmitted { sent, grace },
    )
}

impl DecodeTask {
    /// The decoder's response head, for `Decoder::within_deadline`.
    pub async fn response(self) -> Result<Response<Incoming>, LegFailure> {
        match self.result().await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(LegFailure::Upstream(e)),
            Err(task) => Err(LegFailure::Task(task)),
        }
    }
}

/// Closes an abandoned decode once the decoder shows it admitted it, or `grace` after it was
/// sent, whichever comes first. vLLM answers a JSON request only when done, and sends a
/// stream's headers before it admits the request, so the first stream event is the signal;
/// the deadline bounds how long a request nobody reads may keep a GPU busy.
pub struct CloseWhenAdmitted {
    /// Resolves with when hyper took the whole body.
    sent: oneshot::Receiver<Instant>,
    /// The longest an abandoned request stays open after it was sent.
    grace: Duration,
}

impl OnAbandon<UpstreamResult> for CloseWhenAdmitted {
    fn abandon(self, mut pending: JoinHandle<UpstreamResult>) {
        debug!("closing an abandoned decode once it is admitted");
        // Bounded: ends `grace` after the request was sent, or when it failed to be.
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(async move {
            // The sender drops if the request failed before being written: nothing to wait for.
            if let Ok(sent_at) = self.sent.await {
                let admitted = async {
                    if let Ok(Ok(resp)) = (&mut pending).await {
                        if is_event_stream(&resp) {
                            // The head is kept: a traced leg's span ends with this wait.
                            let (_head, mut body) = resp.into_parts();
                            let _ = body.frame().await;
                        }
                    }
                };
                let _ = tokio::time::timeout_at(sent_at + self.grace, admitted).await;
            }
            // Dropping the response, or aborting the task, closes the upstream connection.
            pending.abort();
        });
    }
}

fn is_event_stream(resp: &Response<Incoming>) -> bool {
    resp.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use tokio::io::AsyncReadExt;

    /// A decode abandoned before it was even sent is still delivered whole, then closed: the
    /// decoder must see it to release the prefiller's blocks.
    #[tokio::test]
    async fn an_abandoned_decode_is_delivered_then_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Upstream::new(Duration::from_secs(5));
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = Method::POST;
        parts.uri = format!("http://{addr}/v1/completions").parse().unwrap();
        let body = Bytes::from_static(br#"{"prompt":"p","kv_transfer_params":{"x":1}}"#);
        // Dropped at once, as when the client leaves during the hand-off.
        drop(deliver_then_close(
            &upstream,
            parts,
            Spliced::from(body.clone()),
            Duration::from_millis(50),
        ));

        let (mut sock, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut received = Vec::new();
        // read_to_end returns once the sidecar closes the connection.
        tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut received))
            .await
            .expect("the abandoned request is closed after the grace period")
            .unwrap();
        let text = String::from_utf8(received).unwrap();
        assert!(
            text.starts_with("POST /v1/completions HTTP/1.1\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with(std::str::from_utf8(&body).unwrap()),
            "{text}"
        );
    }
}
