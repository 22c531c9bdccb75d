//! `pd-soak`, the load generator for `scripts/soak.sh` (`make soak`): a bounded mix of good P/D
//! requests, bad requests and cancelled ones against a running sidecar, while sampling the
//! sidecar's VmRSS and open descriptors from /proc. Exits non-zero if a request got an
//! unexpected answer, memory grew past the tolerance after warm-up, or descriptors did not
//! return to the baseline.
//!
//! With `--chaos` (`SOAK_CHAOS=1 make soak`) it also disconnects raw clients at every phase
//! (`raw.rs`), sends simulator faults (`fault.rs`), kills and restarts the simulators
//! (`chaos.rs`), judges each request by whether an outage touched it (`outcome.rs`), and
//! audits the prefiller's leases against the requests and outages (`leases.rs`).
//!
//! ```text
//! pd-soak --addr 127.0.0.1:PORT --prefiller 127.0.0.1:PORT --pid SIDECAR_PID
//!      [--requests 200000] [--max-secs 600] [--concurrency 32] [--rss-tolerance 0.5]
//!      [--fd-slack 4] [--max-body 65536]
//!      [--chaos --sim-bin PATH --prefill-sim PID:PORT:SIDE --decode-sim PID:PORT:SIDE
//!       --sim-dir DIR [--seed N] [--kill-gap-ms 5000] -- SIM_ARGS...]
//! ```

// A test tool, not a server: a poisoned lock or a malformed built-in request is a bug to stop
// on, and its workers are bounded by --requests and --max-secs.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod chaos;
mod fault;
mod leases;
mod mix;
mod outcome;
mod raw;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use chaos::{Chaos, Control, Role, Sim, Windows};
use outcome::{Records, Stats, CLASS_NAMES};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Every request ends within this, or it is a hang.
const DEADLINE: Duration = Duration::from_secs(30);
/// A request is held to its exact answer only if it started this long after an outage ended.
const OUTAGE_MARGIN: Duration = Duration::from_secs(1);

/// A bounded soak of a running sidecar (see the module documentation).
#[derive(clap::Parser)]
#[command(name = "pd-soak")]
pub struct Opts {
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
    /// Chaos mode: raw disconnects, simulator faults, simulator kills and a lease audit.
    #[arg(long)]
    chaos: bool,
    /// The chaos run's seed (default: from the clock); printed, so a run can be replayed.
    #[arg(long)]
    seed: Option<u64>,
    /// Chaos: the vllm-sim binary, to start a killed simulator again.
    #[arg(long)]
    sim_bin: Option<PathBuf>,
    /// Chaos: the prefill simulator, PID:PORT:SIDE_CHANNEL_PORT.
    #[arg(long)]
    prefill_sim: Option<String>,
    /// Chaos: the decode simulator, PID:PORT:SIDE_CHANNEL_PORT.
    #[arg(long)]
    decode_sim: Option<String>,
    /// Chaos: where a restarted simulator appends NAME.out and NAME.log and writes NAME.pid.
    #[arg(long)]
    sim_dir: Option<PathBuf>,
    /// Chaos: mean time between kills, in ms (each gap uniform in 0.5-1.5 of it).
    #[arg(long, default_value_t = 5000)]
    kill_gap_ms: u64,
    /// Chaos: the simulators' arguments besides --port, --side-channel-port and --engine-id.
    #[arg(last = true)]
    sim_args: Vec<String>,
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

fn chaos_setup(
    o: &Opts,
    epoch: Instant,
    seed: u64,
    records: Arc<Records>,
) -> (Arc<Chaos>, Vec<Sim>) {
    let need = |v: &Option<String>, flag: &str| {
        v.clone()
            .unwrap_or_else(|| die(&format!("--chaos needs --{flag}")))
    };
    let sims = vec![
        Sim::parse(Role::Prefill, &need(&o.prefill_sim, "prefill-sim")),
        Sim::parse(Role::Decode, &need(&o.decode_sim, "decode-sim")),
    ];
    let chaos = Chaos {
        windows: Arc::new(Windows::default()),
        bin: o
            .sim_bin
            .clone()
            .unwrap_or_else(|| die("--chaos needs --sim-bin")),
        args: o.sim_args.clone(),
        dir: o
            .sim_dir
            .clone()
            .unwrap_or_else(|| die("--chaos needs --sim-dir")),
        epoch,
        counters: Default::default(),
        audit: Default::default(),
        prefiller: o.prefiller.clone(),
        decoder: sims[1].addr(),
        records,
        seed,
    };
    (Arc::new(chaos), sims)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = Arc::new(<Opts as clap::Parser>::parse());
    let seed = o.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
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
    let stats = Arc::new(Stats::default());
    let records = Arc::new(Records::new(if o.chaos { o.requests } else { 0 }));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(o.max_secs);

    // Chaos: the killer, and the lease audit every second.
    let stop = Arc::new(AtomicBool::new(false));
    let (chaos, killer, auditor) = if o.chaos {
        println!("soak: chaos seed {seed} (SOAK_SEED={seed} replays the same requests)");
        let (chaos, sims) = chaos_setup(&o, start, seed, records.clone());
        let killer = {
            let (chaos, stop) = (chaos.clone(), stop.clone());
            let (rng, gap) = (mix::Rng::new(seed ^ 0x6b69_6c6c), o.kill_gap_ms);
            tokio::spawn(async move { chaos.run(sims, stop, rng, gap).await })
        };
        let auditor = {
            let (chaos, stop) = (chaos.clone(), stop.clone());
            tokio::spawn(async move {
                let ctl = Control::new();
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    chaos.audit(&ctl).await;
                }
            })
        };
        (Some(chaos), Some(killer), Some(auditor))
    } else {
        (None, None, None)
    };

    let mut workers = Vec::new();
    for _ in 0..o.concurrency {
        let (client, o, stats, next, oversized, records) = (
            client.clone(),
            o.clone(),
            stats.clone(),
            next.clone(),
            oversized.clone(),
            records.clone(),
        );
        let chaos = chaos.clone();
        let windows = chaos.as_ref().map(|c| c.windows.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= o.requests || Instant::now() >= deadline {
                    break;
                }
                let mut plan = mix::plan(i, seed, o.chaos);
                let head = plan.head.clone();
                let began = start.elapsed();
                let got = {
                    let sent = mix::send(&client, &o, i, &mut plan, &oversized);
                    tokio::pin!(sent);
                    match tokio::time::timeout(DEADLINE, &mut sent).await {
                        Ok(got) => Some(got),
                        Err(_) => {
                            if let Some(c) = &chaos {
                                // Before the request is dropped: its connections are open.
                                let head = head.load(Ordering::Relaxed);
                                let d = c.diagnose(i, began).await;
                                println!("soak: #{i} hangs (response head arrived: {head}):{d}");
                            }
                            None
                        }
                    }
                };
                let ended = start.elapsed();
                if o.chaos {
                    records.set(i, began, ended);
                }
                let touched = windows
                    .as_ref()
                    .is_some_and(|w| w.touch(began, ended, OUTAGE_MARGIN, None));
                stats.record(i, &plan, touched, got);
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
                "soak: {:>4.0}s {sent} sent, rss={rss} KiB fds={fds}, {} failed",
                start.elapsed().as_secs_f64(),
                stats.failed.load(Ordering::Relaxed)
            );
        }
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let load_end = start.elapsed();
    let (rss_end, fds_end) = sample(o.pid);
    let total: u64 = stats.done.iter().map(|d| d.load(Ordering::Relaxed)).sum();
    drop(client);
    // The last outage ends with its restart: every simulator is up from here on.
    stop.store(true, Ordering::Relaxed);
    let sims = match killer {
        Some(k) => k.await.unwrap(),
        None => Vec::new(),
    };
    if let Some(a) = auditor {
        a.await.unwrap();
    }

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

    let count = |names: &[&str], counts: &[AtomicU64]| -> String {
        let pairs = names.iter().zip(counts);
        let v: Vec<String> = pairs
            .filter(|(_, c)| c.load(Ordering::Relaxed) > 0)
            .map(|(n, c)| format!("{n}={}", c.load(Ordering::Relaxed)))
            .collect();
        v.join(" ")
    };
    let failed = stats.failed.load(Ordering::Relaxed);
    let rss_warm = rss_warm.unwrap_or(rss0);
    println!(
        "soak: {total} requests in {elapsed:.1} s ({:.0}/s), {failed} unexpected answers",
        total as f64 / elapsed
    );
    println!("soak: mix {}", count(&mix::NAMES, &stats.done));
    println!(
        "soak: outcomes {} (held to the exact answer: {}, to a clean end: {})",
        count(&CLASS_NAMES, &stats.classes),
        stats.strict.load(Ordering::Relaxed),
        stats.lenient.load(Ordering::Relaxed)
    );
    let statuses = stats.error_statuses.lock().unwrap().clone();
    if !statuses.is_empty() {
        let v: Vec<String> = statuses.iter().map(|(s, n)| format!("{s}={n}")).collect();
        println!("soak: error statuses {}", v.join(" "));
    }
    println!(
        "soak: rss KiB: baseline {rss0}, after warm-up {rss_warm}, max {rss_max}, end of load \
         {rss_end}, settled {rss_after}"
    );
    println!(
        "soak: fds: baseline {fds0}, max {fds_max}, end of load {fds_end}, settled {fds_after}"
    );

    let mut ok = true;
    if let Some(chaos) = chaos {
        let names = &fault::NAMES[..fault::NAMES.len() - 1];
        println!("soak: faults {}", count(names, &stats.faults));
        println!("soak: chaos {}", chaos.windows.summary());
        // Every request is over; judge the leases of the last ones once they settled.
        let ctl = Control::new();
        let settled = load_end + leases::SETTLED;
        if let Some(wait) = settled.checked_sub(start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        chaos.audit(&ctl).await;
        let audit = chaos.audit.lock().await;
        println!(
            "soak: leases held after their request: {} (explained: {} by a decoder outage, {} \
             by a fault that strands them; unexplained: {})",
            audit.held, audit.by_decoder_outage, audit.by_fault, audit.unexplained
        );
        if audit.unexplained > 0 {
            ok = false;
            for l in &audit.first_unexplained {
                println!("soak: FAIL stranded lease {l}");
            }
        }
        let mut counters = chaos.counters.lock().unwrap().clone();
        for sim in &sims {
            if let Some(s) = ctl.state(&sim.addr()).await {
                counters.push((sim.role, s["counters"].clone()));
            }
        }
        let t = |role, path| chaos::total(&counters, role, path);
        println!(
            "soak: over all incarnations (each killed one as read just before its kill): \
             decoder requests={} completed={} aborted={}; prefiller leases created={} \
             pulled={} released_by_notify={} expired_by_audit={}",
            t(Role::Decode, "/requests_total"),
            t(Role::Decode, "/requests_completed"),
            t(Role::Decode, "/requests_aborted/decode"),
            t(Role::Prefill, "/leases_created"),
            t(Role::Prefill, "/leases_pulled"),
            t(Role::Prefill, "/leases_released_by_notify"),
            t(Role::Prefill, "/leases_expired"),
        );
    }
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
