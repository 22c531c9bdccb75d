//! A sidecar with its admin listener (`/metrics`, `/readyz`, `/readiness`), as `main` runs them.

use std::net::SocketAddr;

use sidecar::observe::metrics::Metrics;
use sidecar::{App, Config, Connector};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{call, get, Sidecar};

pub struct Observed {
    pub sidecar: Sidecar,
    pub admin: SocketAddr,
    pub metrics: Metrics,
    admin_task: JoinHandle<std::io::Result<()>>,
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.admin_task.abort();
    }
}

impl Observed {
    /// In front of `decoder`, with `connector` and every other setting at its default.
    pub async fn start(decoder: SocketAddr, connector: Connector) -> Observed {
        Observed::with(Config::new(&decoder.to_string(), connector).expect("config")).await
    }

    pub async fn with(config: Config) -> Observed {
        let app = App::build(config).await.expect("the sidecar assembles");
        let metrics = app.metrics().clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let admin = listener.local_addr().expect("addr");
        let admin_task = tokio::spawn(sidecar::observe::admin::serve_with_readiness(
            listener,
            metrics.clone(),
            app.readiness().clone(),
        ));
        Observed {
            sidecar: Sidecar::serve(app).await,
            admin,
            metrics,
            admin_task,
        }
    }

    /// The sidecar's main address.
    pub fn addr(&self) -> SocketAddr {
        self.sidecar.addr
    }

    /// `GET /metrics` on the admin port, checked to be Prometheus text.
    pub async fn scrape(&self) -> String {
        let (resp, body) = call(self.admin, get("/metrics")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        String::from_utf8(body.to_vec()).expect("UTF-8")
    }
}
