//! Readiness (`GET /readyz`, alias `/readiness`, on the main and the admin listener): 200 only
//! while every local vLLM rank answers its own `GET /health` with 2xx and the sidecar is not
//! draining; 503 otherwise, with the reason.
//!
//! One background task checks vLLM every `-readiness-interval` (the first check at once) and
//! caches the result, so a probe costs an atomic load and a lock, never a request to vLLM.
//! Until the first check completes the sidecar is not ready. Each check is bounded by
//! [`check_timeout`]; the ranks are checked together, on the decoder's own client (so with
//! `-enable-tls=decoder` over TLS), outside any request: no span, no request metrics.
//!
//! Changes between ready and not ready are logged once, at info, with the reason; the
//! `llm_d_sidecar_ready` gauge follows them (1 ready, 0 not).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use tracing::info;

use crate::body::{self, ProxyBody};
use crate::error::describe;
use crate::observe::metrics::Metrics;
use crate::runtime::AbortOnDrop;
use crate::upstream::Decoder;

/// The longest a check of vLLM's `/health` may take: Kubernetes' default probe timeout
/// (`timeoutSeconds: 1`), what kubelet would allow vLLM's own readiness probe.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// A `/health` body larger than this is not read (vLLM's is empty).
const BODY_LIMIT: usize = 64 * 1024;

/// The bound on one check: the interval, at most [`CHECK_TIMEOUT`], so checks never overlap.
pub fn check_timeout(interval: Duration) -> Duration {
    interval.min(CHECK_TIMEOUT)
}

/// Whether the sidecar is ready, and why not. Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct Readiness(Arc<Inner>);

struct Inner {
    draining: AtomicBool,
    state: Mutex<State>,
    metrics: Metrics,
}

#[derive(Default)]
struct State {
    /// The last check of vLLM: `None` before the first completes; `Err` names what failed.
    vllm: Option<Result<(), String>>,
    /// What was last logged (and set on the gauge); `None` before anything was.
    ready: Option<bool>,
}

/// A readiness answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ready,
    NotReady(String),
}

impl Readiness {
    /// Not ready (vLLM not checked yet), reporting to `metrics`' `llm_d_sidecar_ready`.
    pub fn new(metrics: Metrics) -> Self {
        metrics.set_ready(false);
        Self(Arc::new(Inner {
            draining: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            metrics,
        }))
    }

    /// The current answer.
    pub fn status(&self) -> Status {
        let state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        self.status_of(&state)
    }

    fn status_of(&self, state: &State) -> Status {
        if self.0.draining.load(Ordering::Relaxed) {
            return Status::NotReady("draining".into());
        }
        match &state.vllm {
            None => Status::NotReady("vLLM /health not checked yet".into()),
            Some(Err(reason)) => Status::NotReady(reason.clone()),
            Some(Ok(())) => Status::Ready,
        }
    }

    /// Records a check of vLLM (`Err`: what failed, as the reason to report).
    pub fn record(&self, vllm: Result<(), String>) {
        let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        state.vllm = Some(vllm);
        self.changed(&mut state);
    }

    /// The sidecar is draining (SIGTERM): not ready from now on, whatever vLLM says.
    pub fn begin_drain(&self) {
        let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        self.0.draining.store(true, Ordering::Relaxed);
        self.changed(&mut state);
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Relaxed)
    }

    /// Logs and sets the gauge if readiness flipped.
    fn changed(&self, state: &mut State) {
        let status = self.status_of(state);
        let ready = status == Status::Ready;
        if state.ready == Some(ready) {
            return;
        }
        state.ready = Some(ready);
        self.0.metrics.set_ready(ready);
        match status {
            Status::Ready => info!("ready: vLLM /health answers 2xx"),
            Status::NotReady(reason) => info!(reason = %reason, "not ready"),
        }
    }

    /// The `/readyz` answer: 200 `{"status":"ready"}`, or 503
    /// `{"status":"not ready","reason":"..."}`.
    pub fn response(&self) -> Response<ProxyBody> {
        let (code, value) = match self.status() {
            Status::Ready => (StatusCode::OK, serde_json::json!({"status": "ready"})),
            Status::NotReady(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "not ready", "reason": reason}),
            ),
        };
        let mut resp = Response::new(body::full(value.to_string()));
        *resp.status_mut() = code;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }

    /// Starts the task that checks every decoder (one per data-parallel rank) now and then
    /// every `interval`; it ends when the returned handle is dropped.
    pub fn watch(&self, decoders: Vec<Arc<Decoder>>, interval: Duration) -> AbortOnDrop {
        let readiness = self.clone();
        let timeout = check_timeout(interval);
        // Lives as long as the App that owns the handle; each round is bounded by `timeout`.
        #[allow(clippy::disallowed_methods)]
        AbortOnDrop(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let checks = decoders.iter().map(|d| check(d, timeout));
                let failed = futures_util::future::join_all(checks)
                    .await
                    .into_iter()
                    .find_map(Result::err);
                readiness.record(failed.map_or(Ok(()), Err));
            }
        }))
    }
}

/// One `GET /health` to `decoder`'s vLLM within `timeout`: `Err` says what failed.
async fn check(decoder: &Decoder, timeout: Duration) -> Result<(), String> {
    let failed = |detail: String| {
        format!(
            "vLLM /health failed: {}: {detail}",
            decoder.target().authority()
        )
    };
    let uri = decoder.uri(Some(&PathAndQuery::from_static("/health")));
    let req = Request::get(uri)
        .body(body::empty())
        .map_err(|e| failed(e.to_string()))?;
    let asked = async {
        let resp = decoder
            .upstream()
            .probe(req)
            .await
            .map_err(|e| describe(&e))?;
        let status = resp.status();
        // Read to the end, so the connection goes back to the pool for the next check.
        let _ = Limited::new(resp.into_body(), BODY_LIMIT).collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    };
    match tokio::time::timeout(timeout, asked).await {
        Ok(result) => result.map_err(failed),
        Err(_) => Err(failed(format!("no answer within {timeout:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(r: &Readiness) -> String {
        match r.status() {
            Status::Ready => "ready".into(),
            Status::NotReady(reason) => reason,
        }
    }

    #[test]
    fn not_ready_until_the_first_check_then_as_checked_and_never_while_draining() {
        let metrics = Metrics::new();
        let r = Readiness::new(metrics.clone());
        assert_eq!(reason(&r), "vLLM /health not checked yet");
        assert!(metrics.render().contains("llm_d_sidecar_ready 0"));
        r.record(Ok(()));
        assert_eq!(r.status(), Status::Ready);
        assert!(metrics.render().contains("llm_d_sidecar_ready 1"));
        r.record(Err("vLLM /health failed: x:1: HTTP 503".into()));
        assert_eq!(reason(&r), "vLLM /health failed: x:1: HTTP 503");
        assert!(metrics.render().contains("llm_d_sidecar_ready 0"));
        r.record(Ok(()));
        r.begin_drain();
        assert_eq!(reason(&r), "draining");
        r.record(Ok(()));
        assert_eq!(
            reason(&r),
            "draining",
            "a healthy vLLM does not end the drain"
        );
        assert!(metrics.render().contains("llm_d_sidecar_ready 0"));
    }

    #[test]
    fn the_answer_is_small_json() {
        let r = Readiness::new(Metrics::new());
        let resp = r.response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        r.record(Ok(()));
        assert_eq!(r.response().status(), StatusCode::OK);
    }

    #[test]
    fn a_check_never_outlasts_the_interval_nor_a_second() {
        assert_eq!(
            check_timeout(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
        assert_eq!(check_timeout(Duration::from_secs(2)), CHECK_TIMEOUT);
    }
}
