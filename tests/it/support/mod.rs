//! Test harness: the sidecar and simulated vLLM workers in-process on ephemeral loopback
//! ports, a one-connection HTTP client the tests can drop to play a client that leaves, and a
//! raw recording upstream for byte-level assertions.

pub mod fake_kube;
pub mod observed;
pub mod otlp;
pub mod recorder;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sidecar::{App, Config, Connector};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vllm_sim::{SimConfig, SimServer};

/// Every await on the network in tests is bounded by this.
pub const LIMIT: Duration = Duration::from_secs(10);

/// A running sidecar.
pub struct Sidecar {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Sidecar {
    /// Starts a sidecar with `config`, on 127.0.0.1 with an ephemeral port.
    pub async fn start(config: Config) -> Sidecar {
        Sidecar::serve(App::build(config).await.expect("the sidecar assembles")).await
    }

    /// Serves an assembled sidecar on 127.0.0.1 with an ephemeral port.
    pub async fn serve(app: App) -> Sidecar {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(listener, async {
            let _ = rx.await;
        }));
        Sidecar {
            addr,
            shutdown: Some(tx),
            task,
        }
    }

    /// Serves a data-parallel sidecar, one ephemeral listener per rank; returns them in rank
    /// order (the first is also `addr`).
    pub async fn serve_ranks(app: App) -> (Sidecar, Vec<SocketAddr>) {
        let mut listeners = Vec::new();
        for _ in 0..app.ranks() {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
        }
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve_ranks(listeners, async {
            let _ = rx.await;
        }));
        let sidecar = Sidecar {
            addr: addrs[0],
            shutdown: Some(tx),
            task,
        };
        (sidecar, addrs)
    }

    /// Starts a sidecar for the decoder at `decoder` with `connector`.
    pub async fn for_decoder(decoder: SocketAddr, connector: Connector) -> Sidecar {
        Sidecar::start(Config::new(&decoder.to_string(), connector).expect("config")).await
    }

    /// Signals shutdown and returns the server's join handle.
    pub fn begin_shutdown(&mut self) -> &mut JoinHandle<std::io::Result<()>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        &mut self.task
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A simulated vLLM worker with the spec defaults and fast timings.
pub async fn sim(configure: impl FnOnce(&mut SimConfig)) -> SimServer {
    let mut cfg = SimConfig {
        ttft_ms: 5,
        itl_ms: 1,
        kv_transfer_ms: 1,
        ..SimConfig::default()
    };
    configure(&mut cfg);
    vllm_sim::spawn(cfg).await.expect("sim starts")
}

/// An open client connection with one request in flight; drop it to disconnect.
pub struct InFlight {
    pub response: Option<Response<Incoming>>,
    conn: JoinHandle<()>,
    pending: Option<JoinHandle<hyper::Result<Response<Incoming>>>>,
}

impl InFlight {
    /// Waits for the response head.
    pub async fn head(&mut self) -> &mut Response<Incoming> {
        if let Some(pending) = self.pending.take() {
            let resp = tokio::time::timeout(LIMIT, pending)
                .await
                .expect("response head in time")
                .expect("join")
                .expect("response");
            self.response = Some(resp);
        }
        self.response.as_mut().expect("response")
    }

    /// Reads the next body frame's data (None at the end of the body).
    pub async fn next_data(&mut self) -> Option<Bytes> {
        self.try_next_data().await.expect("body frame")
    }

    /// As [`InFlight::next_data`], with a body that fails (a cut stream) as an `Err`.
    pub async fn try_next_data(&mut self) -> Result<Option<Bytes>, hyper::Error> {
        let body = self.head().await.body_mut();
        loop {
            let Some(frame) = tokio::time::timeout(LIMIT, body.frame())
                .await
                .expect("frame in time")
            else {
                return Ok(None);
            };
            if let Ok(data) = frame?.into_data() {
                return Ok(Some(data));
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Closing the connection is what a client that leaves does.
        self.conn.abort();
        if let Some(p) = self.pending.take() {
            p.abort();
        }
    }
}

/// Sends `req` to `addr` on a fresh connection and returns without waiting for the answer.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> InFlight {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let pending = tokio::spawn(async move { sender.send_request(req).await });
    InFlight {
        response: None,
        conn,
        pending: Some(pending),
    }
}

/// Sends `req` and collects the whole response.
pub async fn call(addr: SocketAddr, req: Request<Full<Bytes>>) -> (Response<()>, Bytes) {
    let mut inflight = send(addr, req).await;
    inflight.head().await;
    let resp = inflight.response.take().expect("response");
    let (parts, body) = resp.into_parts();
    let bytes = tokio::time::timeout(LIMIT, body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (Response::from_parts(parts, ()), bytes)
}

/// A POST with a JSON body and optional prefiller header.
pub fn post(path: &str, prefiller: Option<SocketAddr>, body: &str) -> Request<Full<Bytes>> {
    let mut b = Request::post(path)
        .header("host", "sidecar.test")
        .header("content-type", "application/json");
    if let Some(p) = prefiller {
        b = b.header("x-prefiller-host-port", p.to_string());
    }
    b.body(Full::new(Bytes::from(body.to_owned())))
        .expect("request")
}

/// A GET.
pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "sidecar.test")
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// Parses a JSON body.
pub fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// `GET /sim/state` of a simulator.
pub async fn sim_state(sim: &SimServer) -> Value {
    let (resp, body) = call(sim.api_addr(), get("/sim/state")).await;
    assert_eq!(resp.status(), 200);
    json(&body)
}

/// `GET /sim/requests`: every request the simulator received, oldest first.
pub async fn sim_requests(sim: &SimServer) -> Vec<Value> {
    let (resp, body) = call(sim.api_addr(), get("/sim/requests")).await;
    assert_eq!(resp.status(), 200);
    match json(&body) {
        Value::Array(a) => a,
        Value::Object(mut o) => match o.remove("requests") {
            Some(Value::Array(a)) => a,
            other => panic!("unexpected /sim/requests shape: {other:?}"),
        },
        other => panic!("unexpected /sim/requests shape: {other}"),
    }
}

/// The requests a simulator received on `path`, oldest first.
pub async fn sim_requests_to(sim: &SimServer, path: &str) -> Vec<Value> {
    let mut all = sim_requests(sim).await;
    all.retain(|r| r["path"] == path);
    all
}

/// `GET /sim/wait?until=...`: true if the condition held within `timeout`.
pub async fn sim_wait(sim: &SimServer, until: &str, timeout: Duration) -> bool {
    let path = format!("/sim/wait?until={until}&timeout_ms={}", timeout.as_millis());
    let (resp, _) = call(sim.api_addr(), get(&path)).await;
    resp.status() == 200
}

/// `POST /sim/config` with a JSON merge patch.
pub async fn sim_config(sim: &SimServer, patch: &str) {
    let (resp, body) = call(sim.api_addr(), post("/sim/config", None, patch)).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
}

/// The recorded body of a simulator request record, as JSON.
pub fn record_body(record: &Value) -> Value {
    json(
        record["body"]
            .as_str()
            .expect("body is a string")
            .as_bytes(),
    )
}

/// The first value of a header in a simulator request record.
pub fn record_header<'a>(record: &'a Value, name: &str) -> Option<&'a str> {
    record["headers"][name][0].as_str()
}

/// A counter from `/sim/state`.
pub fn counter(state: &Value, path: &str) -> i64 {
    state
        .pointer(&format!("/counters/{path}"))
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("no counter {path} in {state}"))
}

/// A loopback address where nothing listens.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

/// Sends a P/D completion with `body` to the sidecar at `sidecar`, naming `prefiller`;
/// returns at once (see [`InFlight`]).
pub async fn send_pd(sidecar: SocketAddr, prefiller: &SimServer, body: &str) -> InFlight {
    send(
        sidecar,
        post("/v1/completions", Some(prefiller.api_addr()), body),
    )
    .await
}

/// The client leaves (its connection is dropped); returns once `at` is idle again, with how
/// long that took.
pub async fn leave_and_wait_idle(client: InFlight, at: &SimServer) -> Duration {
    let left = std::time::Instant::now();
    drop(client);
    assert!(
        sim_wait(at, "idle", LIMIT).await,
        "{} stayed busy",
        at.api_addr()
    );
    left.elapsed()
}

/// Sends a P/D completion with `body` to the sidecar at `sidecar`, naming `prefiller`, and
/// reads the whole answer.
pub async fn call_pd(
    sidecar: SocketAddr,
    prefiller: &SimServer,
    body: &str,
) -> (Response<()>, Bytes) {
    call(
        sidecar,
        post("/v1/completions", Some(prefiller.api_addr()), body),
    )
    .await
}

/// The usual cast of a P/D test: a prefiller and a decoder (default simulators) and a
/// sidecar in front of the decoder.
pub struct Pd {
    pub p: SimServer,
    pub d: SimServer,
    pub sidecar: Sidecar,
}

impl Pd {
    pub async fn start(connector: Connector) -> Pd {
        let p = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        let sidecar = Sidecar::for_decoder(d.api_addr(), connector).await;
        Pd { p, d, sidecar }
    }
}

/// The default configuration (nixlv2) for a decoder at `decoder`, for tests that change a
/// setting before starting the sidecar.
pub fn config(decoder: SocketAddr) -> Config {
    Config::new(&decoder.to_string(), Connector::NixlV2).expect("config")
}

/// The readiness line `child` prints on stdout (`{"event":"listening","port":N,...}`), read
/// within [`LIMIT`]; `Value::Null` if it is not JSON.
pub async fn readiness(child: &mut std::process::Child) -> Value {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = tokio::time::timeout(LIMIT, rx)
        .await
        .expect("readiness line in time")
        .expect("readiness line");
    serde_json::from_str(&line).unwrap_or_default()
}

/// Starts the sidecar's binary with `args` after plain HTTP on a loopback port the OS picks and
/// no admin port, and returns it with the port its readiness line announced.
pub async fn spawn_binary(args: &[String]) -> (std::process::Child, SocketAddr) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llm-d-routing-sidecar"))
        .args(["-port=0", "-bind-address=127.0.0.1", "-metrics-port=0"])
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let event = readiness(&mut child).await;
    let port = u16::try_from(event["port"].as_u64().unwrap()).unwrap();
    (child, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// An HTTP/2 (prior knowledge, h2c) client connection to `addr`.
pub async fn h2_connect(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// The value of one exact series (name and labels) in a Prometheus rendering, 0 if absent.
pub fn metric(metrics: &sidecar::observe::metrics::Metrics, series: &str) -> u64 {
    let prefix = format!("{series} ");
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str())?.parse().ok())
        .unwrap_or(0)
}

/// A client for `https://` (and `http://`) URIs with the given trust settings.
pub fn tls_client(tls: sidecar::security::tls::ClientTls) -> sidecar::upstream::Upstream {
    sidecar::upstream::Upstream::with_tls(Duration::from_secs(5), 16, &tls, &tls).expect("client")
}

/// Trust settings that accept any certificate (the sidecar's self-signed one).
pub fn insecure_tls() -> sidecar::security::tls::ClientTls {
    sidecar::security::tls::ClientTls {
        insecure_skip_verify: true,
        ca_file: None,
    }
}

/// A sidecar in front of `decoder` with `configure` applied to [`config`], and its metrics.
pub async fn sidecar_configured(
    decoder: SocketAddr,
    configure: impl FnOnce(&mut Config),
) -> (Sidecar, sidecar::observe::metrics::Metrics) {
    let mut cfg = config(decoder);
    configure(&mut cfg);
    let app = App::build(cfg).await.expect("the sidecar assembles");
    let metrics = app.metrics().clone();
    (Sidecar::serve(app).await, metrics)
}

/// `max_retries` prefill retries, 20 ms apart: a retried request stays quick.
pub fn fast_retries(max_retries: u32) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.prefill_retry.max_retries = max_retries;
        c.prefill_retry.backoff = Duration::from_millis(20);
    }
}

/// A P/D completion with `body`, naming `prefillers` (a comma-separated header value).
pub fn naming(prefillers: &str, body: &str) -> Request<Full<Bytes>> {
    let mut req = post("/v1/completions", None, body);
    req.headers_mut().insert(
        "x-prefiller-host-port",
        prefillers.parse().expect("header value"),
    );
    req
}

/// A two-token P/D completion naming `prefillers`, sent and answered in full.
pub async fn call_naming(sidecar: SocketAddr, prefillers: &str) -> (Response<()>, Bytes) {
    call(
        sidecar,
        naming(prefillers, r#"{"prompt":"a b c","max_tokens":2}"#),
    )
    .await
}

/// How many requests a simulator served (its prefills, for a prefiller).
pub async fn prefills(sim: &SimServer) -> i64 {
    counter(&sim_state(sim).await, "requests_total")
}
