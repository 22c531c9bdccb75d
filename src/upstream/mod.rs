//! The pooled HTTP clients for both legs, the local decoder behind its deadline, and
//! upstream addresses (the prefiller's from request headers).

pub mod decoder;
pub mod decoder_health;
pub mod half_close;
mod leg;
pub mod target;

pub use decoder::Decoder;
pub use leg::Leg;
pub use target::{prefillers_from, targets_from, Target};

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ProxyBody;
use crate::observe::otel::spans;
use crate::runtime::busy_poll::BusyPoll;
use crate::security::tls::ClientTls;
use half_close::TrackingConnector;

/// vLLM's uvicorn closes keep-alive connections idle for 5 s; we retire ours sooner so a
/// request rarely races the server's close.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Prefill connections can be half-closed from outside hyper (`half_close.rs`); decode
/// connections need not, and do without the extra descriptor that costs.
type PrefillClient = Client<HttpsConnector<TrackingConnector>, ProxyBody>;
type DecodeClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

/// The pooled clients, built once and shared by every request: one per leg, since each leg
/// has its own TLS settings. Each speaks plain HTTP or TLS as the target's scheme says.
#[derive(Clone)]
pub struct Upstream {
    prefill: PrefillClient,
    decode: DecodeClient,
    busy_poll: BusyPoll,
}

impl Upstream {
    /// Plain-HTTP-only clients with default TLS settings. `connect_timeout` bounds each connect.
    pub fn new(connect_timeout: Duration) -> Self {
        Self::with_tls(
            connect_timeout,
            crate::config::DEFAULT_MAX_IDLE_PER_HOST,
            &ClientTls::default(),
            &ClientTls::default(),
        )
        .unwrap_or_else(|_| unreachable!("default TLS settings read no files"))
    }

    /// Clients for both legs with their TLS settings, keeping up to `max_idle` idle
    /// connections per upstream (`-max-idle-conns-per-host`).
    pub fn with_tls(
        connect_timeout: Duration,
        max_idle: usize,
        prefill: &ClientTls,
        decode: &ClientTls,
    ) -> Result<Self, String> {
        Ok(Self {
            prefill: leg_client(
                TrackingConnector(http_connector(connect_timeout)),
                max_idle,
                prefill,
            )?,
            decode: leg_client(http_connector(connect_timeout), max_idle, decode)?,
            busy_poll: BusyPoll::default(),
        })
    }

    /// The same clients, opening a busy-polling window whenever a request is sent.
    pub fn with_busy_poll(mut self, busy_poll: BusyPoll) -> Self {
        self.busy_poll = busy_poll;
        self
    }

    /// Sends `req` on `leg`'s client and resolves with the response head; the body streams
    /// afterwards.
    ///
    /// A traced request's leg gets its CLIENT span here, which every leg passes through; the
    /// span rides the response (see [`spans::LegSpan`]) until its body ends.
    pub async fn send(
        &self,
        leg: Leg,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let pending = spans::start_leg(&mut req, leg).map(spans::Pending::new);
        // The answer is awaited from now: keep polling for it if busy polling is on.
        self.busy_poll.touch();
        let sent = match leg {
            Leg::Encode | Leg::Prefill => self.prefill.request(req).await,
            Leg::Decode => self.decode.request(req).await,
        };
        if let Some(span) = pending.and_then(spans::Pending::settle) {
            if sent.is_err() {
                // The kind `upstream_errors_total` gives any failure to get a response head.
                span.failed("unreachable");
            }
            return sent.map(|mut resp| {
                span.responded(resp.status());
                resp.extensions_mut().insert(span);
                resp
            });
        }
        sent
    }

    /// Sends `req` on the decode leg's client (its TLS settings and pool) as no request's
    /// leg: no span, no busy-polling window. The readiness check of vLLM's `/health`.
    pub async fn probe(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.decode.request(req).await
    }
}

fn http_connector(connect_timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(crate::runtime::limit(connect_timeout));
    connector.enforce_http(false);
    connector
}

fn leg_client<C>(
    connector: C,
    max_idle: usize,
    tls: &ClientTls,
) -> Result<Client<HttpsConnector<C>, ProxyBody>, String>
where
    C: tower_service::Service<http::Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper_util::client::legacy::connect::Connection
        + hyper::rt::Read
        + hyper::rt::Write
        + Send
        + Unpin
        + 'static,
    C::Future: Send + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls.client_config()?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(max_idle)
        // A pooled connection the server closed before our request reached it is retried
        // on a fresh one: the request never ran, so this is safe even for POST.
        .retry_canceled_requests(true)
        .build(connector))
}
