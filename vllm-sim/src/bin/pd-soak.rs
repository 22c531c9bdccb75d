//! `pd-soak`, the load generator for `scripts/soak.sh` (`make soak`): a bounded mix of good P/D requests, bad
//! requests and cancelled ones against a running sidecar, while sampling the sidecar's VmRSS
//! and open descriptors from /proc. Exits non-zero if a request got an unexpected answer,
//! memory grew past the tolerance after warm-up, or descriptors did not return to the baseline.
//!
//! ```text
//! pd-soak --addr 127.0.0.1:PORT --prefiller 127.0.0.1:PORT --pid SIDECAR_PID
//!      [--requests 200000] [--max-secs 600] [--concurrency 32] [--rss-tolerance 0.5]
//!      [--fd-slack 4] [--max-body 65536]
//! ```

// A test tool, not a server: a poisoned lock or a malformed built-in request is a bug to stop
// on, and its workers are bounded by --requests and --max-secs.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A bounded soak of a running sidecar (see the module documentation).
#[derive(clap::Parser)]
#[command(name = "pd-soak")]
struct Opts {
    /// The sidecar, host:port.
    #[arg(long)]
    addr: String,
    /// The prefiller the P/D requests name, host:port.
    #[arg(long)]
    prefiller: String,
    /// The sidecar's process id, for /proc sampling.
    #[arg(long)]
    pid: u32,
    /// Requests to send in all.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Upper bound on the run, in seconds.
    #[arg(long, default_value_t = 600)]
    max_secs: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Allowed RSS growth after warm-up, as a fraction.
    #[arg(long, default_value_t = 0.5)]
    rss_tolerance: f64,
    /// Descriptors the sidecar may hold above its baseline at the end.
    #[arg(long, default_value_t = 4)]
    fd_slack: usize,
    /// The largest request body the sidecar accepts (bigger ones must get 413).
    #[arg(long, default_value_t = 65_536)]
    max_body: usize,
}

fn die(msg: &str) -> ! {
    eprintln!("soak: {msg}");
    std::process::exit(2)
}

/// VmRSS in KiB and the number of open descriptors of `pid`.
fn sample(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Good,
    GoodStream,
    CancelMidStream,
    CancelEarly,
    InvalidJson,
    NotObject,
    Oversized,
    BadPrefiller,
    PassThrough,
}

const KINDS: usize = 9;

/// The mix, by request number: half good P/D requests, the rest spread over the others.
fn kind(i: u64) -> Kind {
    match i % 20 {
        0..=7 => Kind::Good,
        8..=10 => Kind::GoodStream,
        11 | 12 => Kind::CancelMidStream,
        13 | 14 => Kind::CancelEarly,
        15 => Kind::InvalidJson,
        16 => Kind::NotObject,
        17 => Kind::Oversized,
        18 => Kind::BadPrefiller,
        _ => Kind::PassThrough,
    }
}

struct Stats {
    done: [AtomicU64; KINDS],
    failed: AtomicU64,
    first_failures: Mutex<Vec<String>>,
}

impl Stats {
    fn fail(&self, msg: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_failures.lock().unwrap();
        if f.len() < 10 {
            f.push(msg);
        }
    }
}

/// An error with its sources, which hyper keeps the useful part in.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn pd_request(o: &Opts, path: &str, body: Bytes, prefiller: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}{path}", o.addr))
        .header("content-type", "application/json")
        .header("x-prefiller-host-port", prefiller)
        .body(Full::new(body))
        .unwrap()
}

async fn one(client: &HttpClient, o: &Opts, i: u64, oversized: &Bytes) -> Result<(), String> {
    let k = kind(i);
    let completion = Bytes::from(format!(
        r#"{{"model":"sim-model","prompt":"soak request {i}","max_tokens":4}}"#
    ));
    let stream = |max: u32| {
        Bytes::from(format!(
            r#"{{"model":"sim-model","messages":[{{"role":"user","content":"soak {i}"}}],"stream":true,"max_tokens":{max}}}"#
        ))
    };
    let (req, want) = match k {
        Kind::Good => (
            pd_request(o, "/v1/completions", completion, &o.prefiller),
            StatusCode::OK,
        ),
        Kind::GoodStream => (
            pd_request(o, "/v1/chat/completions", stream(4), &o.prefiller),
            StatusCode::OK,
        ),
        Kind::CancelMidStream => {
            let req = pd_request(o, "/v1/chat/completions", stream(64), &o.prefiller);
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let mut body = resp.into_body();
            // One event, then hang up with the stream still running.
            let _ = body.frame().await;
            return Ok(());
        }
        Kind::CancelEarly => {
            // Give up somewhere in the prefill, the decode admission or the decode.
            let req = pd_request(o, "/v1/completions", completion, &o.prefiller);
            let wait = Duration::from_micros(200 + (i * 7919) % 8000);
            let _ = tokio::time::timeout(wait, async {
                let resp = client.request(req).await.ok()?;
                resp.into_body().collect().await.ok()
            })
            .await;
            return Ok(());
        }
        Kind::InvalidJson => (
            pd_request(
                o,
                "/v1/completions",
                Bytes::from_static(br#"{"prompt":"x","#),
                &o.prefiller,
            ),
            StatusCode::BAD_REQUEST,
        ),
        Kind::NotObject => (
            pd_request(
                o,
                "/v1/completions",
                Bytes::from_static(b"[1,2]"),
                &o.prefiller,
            ),
            StatusCode::BAD_REQUEST,
        ),
        Kind::Oversized => (
            pd_request(o, "/v1/completions", oversized.clone(), &o.prefiller),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        Kind::BadPrefiller => (
            pd_request(o, "/v1/completions", completion, "http://p:1/path?x"),
            StatusCode::BAD_REQUEST,
        ),
        Kind::PassThrough => (
            Request::get(format!("http://{}/v1/models", o.addr))
                .body(Full::new(Bytes::new()))
                .unwrap(),
            StatusCode::OK,
        ),
    };
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("{k:?}: {}", chain(&e)))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{k:?}: body: {e}"))?
        .to_bytes();
    if status != want {
        return Err(format!(
            "{k:?}: status {status}, expected {want}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    let complete = match k {
        Kind::Good => body.windows(9).any(|w| w == b"\"choices\""),
        Kind::GoodStream => body.ends_with(b"data: [DONE]\n\n"),
        _ => true,
    };
    if !complete {
        return Err(format!(
            "{k:?}: incomplete body: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = Arc::new(<Opts as clap::Parser>::parse());
    let oversized = Bytes::from(format!(
        r#"{{"prompt":"{}"}}"#,
        "x".repeat(o.max_body + 1024)
    ));
    let (rss0, fds0) = sample(o.pid);
    if rss0 == 0 {
        die(&format!("cannot read /proc/{}/status", o.pid));
    }
    println!("soak: baseline   rss={rss0} KiB fds={fds0}");

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(2))
        .build(connector);
    let stats = Arc::new(Stats {
        done: Default::default(),
        failed: AtomicU64::new(0),
        first_failures: Mutex::new(Vec::new()),
    });
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(o.max_secs);

    let mut workers = Vec::new();
    for _ in 0..o.concurrency {
        let (client, o, stats, next, oversized) = (
            client.clone(),
            o.clone(),
            stats.clone(),
            next.clone(),
            oversized.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= o.requests || Instant::now() >= deadline {
                    break;
                }
                let r =
                    tokio::time::timeout(Duration::from_secs(30), one(&client, &o, i, &oversized))
                        .await;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => stats.fail(format!("#{i} {e}")),
                    Err(_) => stats.fail(format!("#{i} {:?}: no answer in 30 s", kind(i))),
                }
                stats.done[kind(i) as usize].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Samples every 250 ms while the load runs. Warm-up ends at 10% of the requests.
    let warm_at = o.requests / 10;
    let mut rss_warm = None;
    let mut rss_max = 0;
    let mut fds_max = 0;
    let mut last_print = Instant::now();
    while !workers.iter().all(|w| w.is_finished()) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (rss, fds) = sample(o.pid);
        let sent = next.load(Ordering::Relaxed).min(o.requests);
        if rss_warm.is_none() && sent >= warm_at {
            println!("soak: warmed up  rss={rss} KiB fds={fds} after {sent} requests");
            rss_warm = Some(rss);
        }
        if rss_warm.is_some() {
            rss_max = rss_max.max(rss);
        }
        fds_max = fds_max.max(fds);
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            println!(
                "soak: {:>4.0}s {sent} sent, rss={rss} KiB fds={fds}",
                start.elapsed().as_secs_f64()
            );
        }
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (rss_end, fds_end) = sample(o.pid);
    let total: u64 = stats.done.iter().map(|d| d.load(Ordering::Relaxed)).sum();
    drop(client);

    // The sidecar retires idle upstream connections after 4 s; ours close when the client
    // is dropped. Give both time to go.
    let settle = Instant::now();
    let mut fds_after = fds_end;
    while settle.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        fds_after = sample(o.pid).1;
        if fds_after <= fds0 + o.fd_slack {
            break;
        }
    }
    let rss_after = sample(o.pid).0;

    let names = [
        "good",
        "good_stream",
        "cancel_mid_stream",
        "cancel_early",
        "invalid_json",
        "not_object",
        "oversized",
        "bad_prefiller",
        "pass_through",
    ];
    let mix: Vec<String> = names
        .iter()
        .zip(&stats.done)
        .map(|(n, d)| format!("{n}={}", d.load(Ordering::Relaxed)))
        .collect();
    let failed = stats.failed.load(Ordering::Relaxed);
    let rss_warm = rss_warm.unwrap_or(rss0);
    println!(
        "soak: {total} requests in {elapsed:.1} s ({:.0}/s), {failed} unexpected answers",
        total as f64 / elapsed
    );
    println!("soak: mix {}", mix.join(" "));
    println!(
        "soak: rss KiB: baseline {rss0}, after warm-up {rss_warm}, max {rss_max}, end of load \
         {rss_end}, settled {rss_after}"
    );
    println!(
        "soak: fds: baseline {fds0}, max {fds_max}, end of load {fds_end}, settled {fds_after}"
    );

    let mut ok = true;
    if failed > 0 {
        ok = false;
        for f in stats.first_failures.lock().unwrap().iter() {
            println!("soak: FAIL {f}");
        }
    }
    if total < o.requests && start.elapsed() < Duration::from_secs(o.max_secs) {
        ok = false;
        println!("soak: FAIL only {total} of {} requests ran", o.requests);
    }
    let limit = (rss_warm as f64 * (1.0 + o.rss_tolerance)) as u64;
    if rss_end > limit {
        ok = false;
        println!("soak: FAIL rss grew from {rss_warm} to {rss_end} KiB (limit {limit})");
    }
    if fds_after > fds0 + o.fd_slack {
        ok = false;
        println!(
            "soak: FAIL {fds_after} fds open after the load, baseline {fds0} (+{} slack)",
            o.fd_slack
        );
    }
    println!("soak: load checks {}", if ok { "PASS" } else { "FAIL" });
    std::process::exit(if ok { 0 } else { 1 });
}
