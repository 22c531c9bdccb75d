//! The request path as a whole, shared by the `request_path` fuzz target and its corpus replay
//! (`tests/it/fuzz_corpus.rs`), which both include this file with `#[path]`: arbitrary bytes
//! on a client connection to an in-process sidecar in front of two simulated vLLM workers.
//!
//! An input's first byte says how the client behaves: bit 0 set, it shuts down its write side
//! once the bytes are out (it leaves, so whatever the bytes started is cancelled); clear, it
//! waits for the sidecar to answer and close the connection (the sidecar's idle and header
//! timers are short here), leaving after [`PATIENCE`] if it has not. The other bytes are written as
//! they are, with every `$P` replaced by the prefiller's `host:port`, so an input can ask for
//! P/D.
//!
//! After every input [`check_request_path`] panics unless:
//! - the sidecar closed the connection within [`CLOSE_LIMIT`] of the client leaving (no
//!   request without an answer or a close);
//! - an HTTP/1 reply starts with a well-formed response head, and the first response's body,
//!   when it is an error with a body, is JSON;
//! - no thread of the sidecar or the simulators panicked;
//! - the prefiller is idle with no KV lease held and the decoder is idle (nothing stranded);
//! - the sidecar still serves: `GET /health` and a P/D completion both answer 200.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use sidecar::{App, Config, Connector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use vllm_sim::{SimConfig, SimServer};

/// How long a client that stays waits for the sidecar to close before it leaves.
pub const PATIENCE: Duration = Duration::from_millis(100);
/// How long the sidecar may take to close a connection the client has left.
pub const CLOSE_LIMIT: Duration = Duration::from_secs(5);
/// The sidecar's header-read and idle timeouts here: short, so a client that stays hears
/// the close soon after the last answer.
const SIDECAR_TIMERS: Duration = Duration::from_millis(20);
/// Request bodies above this get a 413, so inputs can reach that path cheaply.
const MAX_BODY: usize = 16 * 1024;
/// Replies are kept up to this many bytes (the checks only look at the first response).
const MAX_REPLY: usize = 1 << 20;
/// Names the world's runtime threads, so the panic hook counts only the servers' panics.
const WORLD_THREAD: &str = "request-path-world";

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// The servers every input runs against, started once per process.
struct World {
    rt: Runtime,
    sidecar: SocketAddr,
    prefiller: SimServer,
    decoder: SimServer,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some(WORLD_THREAD) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(WORLD_THREAD)
            .enable_all()
            .build()
            .expect("runtime");
        let (sidecar, prefiller, decoder) = rt.block_on(async {
            let sim = || {
                vllm_sim::spawn(SimConfig {
                    ttft_ms: 0,
                    itl_ms: 0,
                    kv_transfer_ms: 0,
                    // Far beyond any run, so a stranded lease cannot expire unseen.
                    kv_lease_duration_ms: 3_600_000,
                    ..SimConfig::default()
                })
            };
            let prefiller = sim().await.expect("prefiller starts");
            let decoder = sim().await.expect("decoder starts");
            let mut config =
                Config::new(&decoder.api_addr().to_string(), Connector::NixlV2).expect("config");
            config.header_read_timeout = SIDECAR_TIMERS;
            config.idle_timeout = SIDECAR_TIMERS;
            config.max_body_bytes = MAX_BODY;
            let app = App::build(config).await.expect("the sidecar assembles");
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let sidecar = listener.local_addr().expect("addr");
            tokio::spawn(app.serve(listener, std::future::pending()));
            (sidecar, prefiller, decoder)
        });
        World {
            rt,
            sidecar,
            prefiller,
            decoder,
        }
    })
}

/// Runs one input (see the module documentation); panics if an invariant fails.
pub fn check_request_path(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    // The simulators' control routes would let an input reconfigure the decoder behind the
    // sidecar's back (pass-through reaches them), and every later input would fail for it.
    // So would the faults that strand a lease whatever the sidecar does: a prefiller that
    // keeps one it does not report (`omit_kv_params`, `null_kv_params`), a decoder that fails
    // before it pulls (`decode_http_<code>`) or that takes longer to admit a decode than
    // `-decode-admission-grace` (`stall_ms`, which stalls both legs).
    let has = |needle: &[u8]| {
        bytes
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    if has(b"/sim") || has(b"_kv_params") || has(b"decode_http") || has(b"stall_ms") {
        return;
    }
    let w = world();
    let input = substitute(bytes, w.prefiller.api_addr().to_string().as_bytes());
    w.rt.block_on(async {
        let reply = exchange(w.sidecar, &input, mode & 1 == 1).await;
        if !input.starts_with(b"PRI * HTTP/2.0") {
            check_http1_reply(&input, &reply);
        }
        settle(w).await;
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a server thread panicked");
        still_serves(w).await;
    });
}

/// `bytes` with every `$P` replaced by `prefiller`.
fn substitute(bytes: &[u8], prefiller: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 32);
    let mut rest = bytes;
    while let Some(at) = rest.windows(2).position(|w| w == b"$P") {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(prefiller);
        rest = &rest[at + 2..];
    }
    out.extend_from_slice(rest);
    out
}

/// Writes `input` on a new connection (then leaves at once if `leave`) and reads until the
/// sidecar closes it; returns what it wrote back.
async fn exchange(sidecar: SocketAddr, input: &[u8], leave: bool) -> Vec<u8> {
    let stream = TcpStream::connect(sidecar).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let reading = async {
        let mut reply = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rd.read(&mut buf).await {
                // A reset is a close too.
                Ok(0) | Err(_) => return reply,
                Ok(n) if reply.len() < MAX_REPLY => reply.extend_from_slice(&buf[..n]),
                Ok(_) => {}
            }
        }
    };
    tokio::pin!(reading);
    // The sidecar may refuse the bytes half-way and close: a failed write is not an error.
    let writing = async {
        let _ = wr.write_all(input).await;
        if leave {
            let _ = wr.shutdown().await;
        }
    };
    let stayed = tokio::select! {
        reply = &mut reading => return reply,
        () = async { writing.await; tokio::time::sleep(if leave { CLOSE_LIMIT } else { PATIENCE }).await } => !leave,
    };
    if stayed {
        let _ = wr.shutdown().await;
        if let Ok(reply) = tokio::time::timeout(CLOSE_LIMIT, &mut reading).await {
            return reply;
        }
    }
    panic!("the sidecar neither answered nor closed within {CLOSE_LIMIT:?} of the client leaving");
}

/// The reply must start with a response head; the first response's body, when it is an error
/// with a complete body, must be JSON (vLLM-shaped errors).
fn check_http1_reply(input: &[u8], reply: &[u8]) {
    if reply.is_empty() {
        return;
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut head = httparse::Response::new(&mut headers);
    let len = match head.parse(reply) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => panic!("a truncated response head: {:?}", lossy(reply)),
        Err(e) => panic!("not an HTTP/1 response ({e}): {:?}", lossy(reply)),
    };
    let status = head.code.unwrap_or(0);
    // HEAD answers announce a body they do not carry.
    if status < 400 || input.starts_with(b"HEAD ") {
        return;
    }
    let header = |name: &str| {
        head.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    let rest = &reply[len..];
    let body = if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        dechunk(rest)
    } else {
        header("content-length")
            .and_then(|cl| cl.trim().parse::<usize>().ok())
            .and_then(|cl| rest.get(..cl).map(<[u8]>::to_vec))
    };
    if let Some(body) = body.filter(|b| !b.is_empty()) {
        assert!(
            serde_json::from_slice::<serde_json::Value>(&body).is_ok(),
            "a {status} with a body that is not JSON: {:?}",
            lossy(&body)
        );
    }
}

/// The body of a complete chunked message at the start of `bytes`, if it is all there.
fn dechunk(mut bytes: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = bytes.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&bytes[..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        bytes = &bytes[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(bytes.get(..size)?);
        bytes = bytes.get(size + 2..)?;
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned()
}

/// Waits until nothing the input started is still running: the prefiller idle with no KV
/// lease held, the decoder idle.
async fn settle(w: &World) {
    for (sim, until) in [(&w.prefiller, "idle_and_no_leases"), (&w.decoder, "idle")] {
        let path = format!("/sim/wait?until={until}&timeout_ms=4000");
        let reply = get(sim.api_addr(), &path).await;
        if !reply.starts_with(b"HTTP/1.1 200") {
            let state = get(sim.api_addr(), "/sim/state").await;
            // Judge the next input on its own: free what this one left behind.
            post(
                sim.api_addr(),
                "/sim/reset",
                br#"{"counters":false,"requests":false,"release_leases":true}"#,
            )
            .await;
            let body = state.split(|&b| b == b'{').skip(1).count();
            let json: serde_json::Value = state
                .iter()
                .position(|&b| b == b'{')
                .and_then(|at| serde_json::from_slice(&state[at..]).ok())
                .unwrap_or_default();
            panic!(
                "{} not {until} within 4 s ({body} objects): in flight {}, kv {}",
                sim.api_addr(),
                json["in_flight"],
                json["kv"]
            );
        }
    }
}

/// The sidecar answers its health check and a P/D completion.
async fn still_serves(w: &World) {
    let health = get(w.sidecar, "/health").await;
    assert!(
        health.starts_with(b"HTTP/1.1 200"),
        "/health after the input: {:?}",
        lossy(&health)
    );
    let body = br#"{"model":"sim-model","prompt":"still serving","max_tokens":2}"#;
    let request = [
        format!(
            "POST /v1/completions HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\n\
             x-prefiller-host-port: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            w.prefiller.api_addr(),
            body.len()
        )
        .as_bytes(),
        body,
    ]
    .concat();
    let reply = round_trip(w.sidecar, &request).await;
    assert!(
        reply.starts_with(b"HTTP/1.1 200") && reply.windows(9).any(|b| b == b"\"choices\""),
        "a P/D completion after the input: {:?}",
        lossy(&reply)
    );
}

async fn post(addr: SocketAddr, path: &str, body: &[u8]) -> Vec<u8> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    round_trip(addr, &[head.as_bytes(), body].concat()).await
}

async fn get(addr: SocketAddr, path: &str) -> Vec<u8> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    round_trip(addr, request.as_bytes()).await
}

/// One request with `connection: close`, read to the end, within [`CLOSE_LIMIT`].
async fn round_trip(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    tokio::time::timeout(CLOSE_LIMIT, async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply).await;
        reply
    })
    .await
    .unwrap_or_else(|_| panic!("{addr} did not answer within {CLOSE_LIMIT:?}"))
}
