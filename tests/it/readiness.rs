//! `/readyz` (alias `/readiness`), on the main and the admin port: 200 only while the local
//! vLLM's own `/health` answers 2xx (every rank's, with data parallelism) and the sidecar is
//! not draining. On SIGTERM it turns 503 at once while requests are still served for
//! `-drain-delay`; then the drain runs as before. `/health` (liveness) stays 200 throughout.
//! Every wait polls for the state it needs, within a deadline.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sidecar::{App, Config};
use tokio::net::TcpListener;

use crate::support::observed::Observed;
use crate::support::*;

impl Observed {
    /// Both ports, both names.
    fn probes(&self) -> [(SocketAddr, &'static str); 4] {
        [
            (self.sidecar.addr, "/readyz"),
            (self.sidecar.addr, "/readiness"),
            (self.admin, "/readyz"),
            (self.admin, "/readiness"),
        ]
    }
}

/// The sidecar and its admin listener, with readiness checked every 50 ms.
async fn observed(mut config: Config) -> Observed {
    config.readiness_interval = Duration::from_millis(50);
    Observed::with(config).await
}

/// `GET path` at `addr`: the status and the JSON body.
async fn probe(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (resp, body) = call(addr, get(path)).await;
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "{addr}{path}"
    );
    (resp.status().as_u16(), json(&body))
}

/// Polls `path` at `addr` until it answers `status` (within [`LIMIT`]); returns the body.
async fn until(addr: SocketAddr, path: &str, status: u16) -> Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (got, body) = probe(addr, path).await;
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{addr}{path} still answers {got} {body}, not {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn health(addr: SocketAddr) -> u16 {
    call(addr, get("/health")).await.0.status().as_u16()
}

/// The not-ready reason of a 503 body.
fn reason(body: &Value) -> &str {
    assert_eq!(body["status"], "not ready", "{body}");
    body["reason"].as_str().expect("a reason")
}

#[tokio::test]
async fn readiness_follows_the_decoders_health_on_both_ports() {
    let d = sim(|_| {}).await;
    let decoder = d.api_addr();
    let s = observed(config(decoder)).await;
    for (addr, path) in s.probes() {
        let body = until(addr, path, 200).await;
        assert_eq!(body, serde_json::json!({"status": "ready"}));
    }
    assert_eq!(metric(&s.metrics, "llm_d_sidecar_ready"), 1);

    // vLLM's /health fails (503): not ready, saying so; liveness is unchanged.
    sim_config(&d, r#"{"dead":true}"#).await;
    for (addr, path) in s.probes() {
        let body = until(addr, path, 503).await;
        let why = reason(&body);
        assert!(
            why.starts_with(&format!("vLLM /health failed: {decoder}: HTTP 503")),
            "{why}"
        );
    }
    assert_eq!(metric(&s.metrics, "llm_d_sidecar_ready"), 0);
    assert_eq!(
        (health(s.sidecar.addr).await, health(s.admin).await),
        (200, 200)
    );
    sim_config(&d, r#"{"dead":false}"#).await;
    for (addr, path) in s.probes() {
        until(addr, path, 200).await;
    }

    // vLLM is gone: not ready; back on its port: ready again.
    d.shutdown().await;
    for (addr, path) in s.probes() {
        let body = until(addr, path, 503).await;
        assert!(
            reason(&body).starts_with(&format!("vLLM /health failed: {decoder}: ")),
            "{body}"
        );
    }
    assert_eq!(
        (health(s.sidecar.addr).await, health(s.admin).await),
        (200, 200)
    );
    let d = restart_on(decoder).await;
    for (addr, path) in s.probes() {
        until(addr, path, 200).await;
    }
    assert_eq!(metric(&s.metrics, "llm_d_sidecar_ready"), 1);

    // Probes are answered by the sidecar: never sent to vLLM, never counted as requests.
    let seen = sim_requests(&d).await;
    assert!(
        seen.iter()
            .all(|r| r["path"] != "/readyz" && r["path"] != "/readiness"),
        "{seen:?}"
    );
    let text = s.metrics.render();
    assert!(
        text.lines()
            .filter(|l| l.starts_with("llm_d_sidecar_requests_total{"))
            .all(|l| l.ends_with(" 0")),
        "{text}"
    );
}

/// A simulator on `addr` again, once the port is free (the old one's listener closes as its
/// aborted task is dropped).
async fn restart_on(addr: SocketAddr) -> vllm_sim::SimServer {
    let deadline = Instant::now() + LIMIT;
    loop {
        let cfg = vllm_sim::SimConfig {
            port: addr.port(),
            ttft_ms: 5,
            itl_ms: 1,
            kv_transfer_ms: 1,
            ..vllm_sim::SimConfig::default()
        };
        match vllm_sim::spawn(cfg).await {
            Ok(sim) => return sim,
            Err(e) => assert!(Instant::now() < deadline, "cannot bind {addr} again: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A decoder whose `/health` answers 200 only once the test opens the gate; each request it
/// receives is announced on `seen`.
async fn gated_decoder() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    tokio::sync::watch::Sender<bool>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
    let (gate, open) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (seen_tx, open) = (seen_tx.clone(), open.clone());
            let service = service_fn(move |_req| {
                let _ = seen_tx.send(());
                let mut open = open.clone();
                async move {
                    let _ = open.wait_for(|o| *o).await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    (addr, seen, gate)
}

#[tokio::test]
async fn not_ready_until_the_first_check_answers() {
    let (decoder, mut seen, gate) = gated_decoder().await;
    let mut cfg = config(decoder);
    // Each check may take 1 s; the next is 5 s later.
    cfg.readiness_interval = Duration::from_secs(5);
    let started = Instant::now();
    let app = App::build(cfg).await.expect("assembles");
    let s = Sidecar::serve(app).await;
    tokio::time::timeout(LIMIT, seen.recv())
        .await
        .expect("the first check in time")
        .expect("a check");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the first check runs at startup, not after an interval"
    );
    // vLLM has not answered yet: not ready (a very slow machine may have timed it out).
    let (status, body) = probe(s.addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let why = reason(&body);
    assert!(
        why == "vLLM /health not checked yet" || why.contains("no answer within 1s"),
        "{why}"
    );
    assert_eq!(health(s.addr).await, 200, "liveness does not wait for vLLM");
    gate.send_replace(true);
    until(s.addr, "/readyz", 200).await;
}

#[tokio::test]
async fn with_data_parallel_ranks_every_vllm_must_be_healthy() {
    let base = vllm_sim::SimConfig {
        ttft_ms: 5,
        itl_ms: 1,
        ..vllm_sim::SimConfig::default()
    };
    let d = vllm_sim::spawn_ranks(base, 2).await.expect("ranks start");
    let mut cfg = config(d[0].api_addr());
    cfg.rank_decoders = vec![sidecar::upstream::Target::http(
        d[1].api_addr().to_string().parse().unwrap(),
    )];
    cfg.readiness_interval = Duration::from_millis(50);
    let app = App::build(cfg).await.expect("assembles");
    let (_sidecar, ports) = Sidecar::serve_ranks(app).await;
    for port in &ports {
        until(*port, "/readyz", 200).await;
    }
    // Rank 1's vLLM fails: the sidecar (every rank's listener) is not ready, naming it.
    sim_config(&d[1], r#"{"dead":true}"#).await;
    for port in &ports {
        let body = until(*port, "/readyz", 503).await;
        let why = reason(&body);
        assert!(
            why.starts_with(&format!("vLLM /health failed: {}: ", d[1].api_addr())),
            "{why}"
        );
    }
    sim_config(&d[1], r#"{"dead":false}"#).await;
    for port in &ports {
        until(*port, "/readyz", 200).await;
    }
}

/// The spawned sidecar, killed if the test ends before it exits.
struct Child(Option<std::process::Child>);

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Child {
    fn signal(&self, name: &str) {
        let id = self.0.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([format!("-{name}"), id.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn running(&mut self) -> bool {
        self.0
            .as_mut()
            .expect("running")
            .try_wait()
            .unwrap()
            .is_none()
    }

    /// Waits for the process to exit, within [`LIMIT`]; its exit code.
    async fn exit_code(mut self) -> Option<i32> {
        let mut child = self.0.take().expect("running");
        let id = child.id();
        let waited = tokio::time::timeout(
            LIMIT,
            tokio::task::spawn_blocking(move || child.wait().map(|s| s.code())),
        )
        .await;
        match waited {
            Ok(joined) => joined.unwrap().unwrap(),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &id.to_string()])
                    .status();
                panic!("the sidecar did not exit in time");
            }
        }
    }
}

/// Starts the binary (plain HTTP, loopback, no admin port) in front of `decoder` with `args`;
/// returns it with its port, once it is ready.
async fn spawn_ready(decoder: SocketAddr, args: &[&str]) -> (Child, SocketAddr) {
    let mut all = vec![
        "-vllm-host=127.0.0.1".to_owned(),
        "-readiness-interval=100ms".to_owned(),
        format!("-vllm-port={}", decoder.port()),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let (child, addr) = spawn_binary(&all).await;
    let child = Child(Some(child));
    until(addr, "/readyz", 200).await;
    (child, addr)
}

#[tokio::test]
async fn sigterm_turns_readiness_off_and_requests_are_served_through_the_drain_delay() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    // A window longer than the test: the second SIGTERM ends it.
    let (mut child, addr) = spawn_ready(d.api_addr(), &["-drain-delay=120s"]).await;
    child.signal("TERM");
    let body = until(addr, "/readyz", 503).await;
    assert_eq!(reason(&body), "draining");
    assert_eq!(until(addr, "/readiness", 503).await, body);
    // Still accepting (each call is a new connection) and serving, both routes.
    assert_eq!(health(addr).await, 200, "liveness");
    let (resp, body) = call(addr, get("/v1/models")).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    let (resp, body) = call_pd(addr, &p, r#"{"prompt":"hi","max_tokens":2}"#).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(counter(&sim_state(&p).await, "leases_pulled"), 1);
    assert!(child.running(), "still serving");
    // A second signal hurries: the drain runs now, not in two minutes.
    let hurried = Instant::now();
    child.signal("TERM");
    assert_eq!(child.exit_code().await, Some(0));
    assert!(hurried.elapsed() < LIMIT);
}

#[tokio::test]
async fn after_the_drain_delay_the_sidecar_drains_as_before_and_exits() {
    let p = sim(|_| {}).await;
    // Thirty events 50 ms apart: the stream outlasts the delay.
    let d = sim(|c| c.itl_ms = 50).await;
    let delay = Duration::from_millis(500);
    let (child, addr) = spawn_ready(d.api_addr(), &["-drain-delay=500ms"]).await;
    let mut stream = send_pd(addr, &p, r#"{"prompt":"x","max_tokens":30,"stream":true}"#).await;
    let mut received = stream.next_data().await.expect("first event").to_vec();
    let signalled = Instant::now();
    child.signal("TERM");
    // New connections are accepted through the delay, refused once the drain starts.
    let refused = async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(LIMIT, refused)
        .await
        .expect("the drain starts after the delay");
    assert!(
        signalled.elapsed() >= delay,
        "the listener closed {:?} after SIGTERM, before -drain-delay",
        signalled.elapsed()
    );
    // The stream in flight finishes during the drain, then the process exits.
    while let Some(data) = stream.next_data().await {
        received.extend_from_slice(&data);
    }
    let text = String::from_utf8(received).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(child.exit_code().await, Some(0));
}
