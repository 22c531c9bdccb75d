//! Data parallelism (`-data-parallel-size N`): one listener per vLLM rank, on `port+i`, in
//! front of the decoder rank on `model-server-port+i`. One process serves them all: one
//! connection pool per upstream, one metrics registry, one drain. Each rank has its own
//! [`Proxy`] (its decoder and its own endpoint differ); the rest is shared.
//!
//! The llm-d scheduler may send a request to the first port and name the rank it chose in
//! `x-data-parallel-host-port: <POD_IP>:<port+i>`; the request is then served by that rank.

use std::net::{IpAddr, SocketAddr};

use http::{Request, Response};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::headers::DATA_PARALLEL_HOST_PORT;
use crate::proxy::Proxy;

/// The ranks a sidecar serves, index = rank.
pub struct Ranks {
    ranks: Vec<Rank>,
    /// `POD_IP`: the host part `x-data-parallel-host-port` must name (unchecked when unset).
    pod_ip: Option<IpAddr>,
}

struct Rank {
    proxy: Proxy,
    /// The port its listener is bound to: how the scheduler's header names it.
    port: u16,
    /// Requests served by this rank, arrived on its own listener / redirected by the header.
    on_listener: Counter,
    by_header: Counter,
}

impl Ranks {
    /// `proxies[i]` serves the listener bound to `ports[i]`.
    pub(crate) fn new(proxies: Vec<Proxy>, ports: &[u16], pod_ip: Option<IpAddr>) -> Self {
        let ranks = proxies
            .into_iter()
            .zip(ports)
            .enumerate()
            .map(|(i, (proxy, &port))| {
                let [on_listener, by_header] = proxy.metrics.data_parallel_rank(i);
                Rank {
                    proxy,
                    port,
                    on_listener,
                    by_header,
                }
            })
            .collect();
        Self { ranks, pod_ip }
    }

    /// Rank 0's proxy, whose shared parts (metrics, tracing) every rank uses.
    pub(crate) fn primary(&self) -> &Proxy {
        &self.ranks[0].proxy
    }

    pub(crate) fn len(&self) -> usize {
        self.ranks.len()
    }

    /// Serves a request that arrived on rank `listener`'s port.
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
        listener: usize,
    ) -> Response<ProxyBody> {
        // Without data parallelism the header means nothing (pd-sidecar ignores it too); it
        // is stripped before forwarding either way.
        let named = match req.headers().get(DATA_PARALLEL_HOST_PORT) {
            Some(value) if self.ranks.len() > 1 => Some(self.rank_named(value)),
            _ => None,
        };
        let i = match named {
            None => listener,
            Some(Ok(i)) => i,
            Some(Err(e)) => return self.ranks[listener].proxy.refuse(req, client, e).await,
        };
        let rank = &self.ranks[i];
        if i == listener {
            rank.on_listener.inc();
        } else {
            rank.by_header.inc();
        }
        rank.proxy.handle(req, client).await
    }

    /// The rank `value` (`host:port`) names: its port is a rank's listener, and its host is
    /// `POD_IP` when that is known.
    fn rank_named(&self, value: &http::HeaderValue) -> Result<usize, ProxyError> {
        let unknown = || {
            ProxyError::UnknownDataParallelRank(
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        };
        let text = value.to_str().map_err(|_| unknown())?.trim();
        let authority: http::uri::Authority = text.parse().map_err(|_| unknown())?;
        let port = authority.port_u16().ok_or_else(unknown)?;
        if let Some(pod_ip) = self.pod_ip {
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            if host.parse::<IpAddr>().ok() != Some(pod_ip) {
                return Err(unknown());
            }
        }
        self.ranks
            .iter()
            .position(|r| r.port == port)
            .ok_or_else(unknown)
    }
}
