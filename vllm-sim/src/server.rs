//! Listeners and lifecycle: binds the API and side-channel ports, runs background loops,
//! and stops every task on shutdown or drop.

use super::config::SimConfig;
use super::state::Shared;
use super::{api, decode, side_channel};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Clone, Copy)]
enum Listener {
    Api,
    SideChannel,
    /// Same service as the side channel, on its own port (sglang's and mooncake's
    /// bootstrap servers, §7.18, §7.20).
    Bootstrap,
}

/// A running simulated vLLM instance. Dropping it aborts all of its tasks.
pub struct SimServer {
    shared: Arc<Shared>,
}

impl SimServer {
    pub fn api_addr(&self) -> SocketAddr {
        self.shared.api_addr
    }

    pub fn side_channel_addr(&self) -> SocketAddr {
        self.shared.side_addr
    }

    /// The bootstrap listener: sglang's `bootstrap_port`, mooncake's `/query` (§7.18, §7.20).
    pub fn bootstrap_addr(&self) -> SocketAddr {
        self.shared.bootstrap_addr
    }

    /// The P2P port of `--protocol offloading` (§7.19): the side channel.
    pub fn p2p_addr(&self) -> SocketAddr {
        self.shared.side_addr
    }

    /// The current engine id (`POST /sim/config {"engine_id":…}` changes it).
    pub fn engine_id(&self) -> String {
        self.shared.engine_id()
    }

    /// Stops both listeners and every request/background task.
    pub async fn shutdown(self) {
        self.shared.abort_all();
        // Let aborted tasks observe cancellation before the caller proceeds.
        tokio::task::yield_now().await;
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        self.shared.abort_all();
    }
}

/// Binds both listeners (ready to accept when this returns) and starts serving.
pub async fn spawn(cfg: SimConfig) -> std::io::Result<SimServer> {
    let api = TcpListener::bind((cfg.host.as_str(), cfg.port)).await?;
    let side = TcpListener::bind((cfg.host.as_str(), cfg.side_channel_port)).await?;
    let boot = TcpListener::bind((cfg.host.as_str(), cfg.bootstrap_port)).await?;
    let shared = Arc::new(Shared::new(
        cfg,
        api.local_addr()?,
        side.local_addr()?,
        boot.local_addr()?,
    ));
    shared.spawn(accept_loop(api, shared.clone(), Listener::Api));
    shared.spawn(accept_loop(side, shared.clone(), Listener::SideChannel));
    shared.spawn(accept_loop(boot, shared.clone(), Listener::Bootstrap));
    shared.spawn(side_channel::sweep_loop(shared.clone()));
    shared.spawn(decode::heartbeat_loop(shared.clone()));
    let encoder = shared.read(|i| i.cfg.mm_encoder_only);
    tracing::info!(api = %shared.api_addr, side_channel = %shared.side_addr, bootstrap = %shared.bootstrap_addr, engine_id = %shared.engine_id(), mm_encoder_only = encoder, "vllm-sim listening");
    Ok(SimServer { shared })
}

/// The configuration of data-parallel rank `rank` of `base`: fixed ports move up by the rank
/// (as vLLM's per-rank API servers and llm-d's DP manifests number them), ephemeral ones stay
/// ephemeral, and a given engine id gets the rank as a suffix (ranks are distinct engines).
pub fn rank_config(base: &SimConfig, rank: u16) -> std::io::Result<SimConfig> {
    let shift = |port: u16, what: &str| -> std::io::Result<u16> {
        if port == 0 {
            return Ok(0);
        }
        port.checked_add(rank).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{what} {port} + rank {rank} is past 65535"),
            )
        })
    };
    let mut cfg = base.clone();
    cfg.port = shift(base.port, "port")?;
    cfg.side_channel_port = shift(base.side_channel_port, "side channel port")?;
    cfg.bootstrap_port = shift(base.bootstrap_port, "bootstrap port")?;
    if rank > 0 {
        cfg.engine_id = base.engine_id.as_ref().map(|e| format!("{e}_dp{rank}"));
    }
    Ok(cfg)
}

/// `ranks` data-parallel ranks of `base`, each a whole instance on its own ports (see
/// [`rank_config`]); all bound when this returns, or none.
pub async fn spawn_ranks(base: SimConfig, ranks: u16) -> std::io::Result<Vec<SimServer>> {
    let mut servers = Vec::with_capacity(usize::from(ranks));
    for rank in 0..ranks.max(1) {
        // A failure drops (and so stops) the ranks already started.
        servers.push(spawn(rank_config(&base, rank)?).await?);
    }
    Ok(servers)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, which: Listener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Transient (e.g. EMFILE): back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if !matches!(which, Listener::Api) && shared.read(|i| i.faults.side_channel_down) {
            // Fault `side_channel_down`: the peer sees the connection closed at once.
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let s = shared.clone();
        shared.spawn(async move {
            let svc = service_fn(move |req| {
                let s = s.clone();
                async move {
                    match which {
                        Listener::Api => api::handle(s, req).await,
                        Listener::SideChannel | Listener::Bootstrap => {
                            side_channel::handle(s, req).await
                        }
                    }
                }
            });
            // half_close stays off: an EOF from the client closes the connection and drops
            // the in-flight service future/body, which is how aborts are detected.
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with error");
            }
        });
    }
}
