//! Chaos mode's process kills: the prefill or the decode simulator is killed (SIGKILL) at
//! random moments, with streams in flight, kept down 50-500 ms, and started again on the same
//! ports with the same arguments. Each outage is a window, from just before the kill to the
//! restarted simulator answering `/health`, so each request can be judged by whether one
//! touched it.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::die;
use crate::leases::Audit;
use crate::mix::Rng;
use crate::outcome::Records;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// One outage, in time since the run's start.
pub struct Window {
    pub role: Role,
    pub kill_at: Duration,
    /// `None` while the simulator is still down.
    pub ready_at: Option<Duration>,
}

#[derive(Default)]
pub struct Windows(Mutex<Vec<Window>>);

impl Windows {
    /// Whether `[start, end]` meets an outage of `role` (of either if `None`), counting the
    /// outage as lasting `after` past the restart. A window still open counts from its kill.
    pub fn touch(
        &self,
        start: Duration,
        end: Duration,
        after: Duration,
        role: Option<Role>,
    ) -> bool {
        for w in self.0.lock().unwrap().iter().rev() {
            if w.ready_at.is_some_and(|r| r + after < start) {
                // Outages are one at a time, in order: the earlier ones ended earlier still.
                break;
            }
            if w.kill_at <= end && role.is_none_or(|r| r == w.role) {
                return true;
            }
        }
        false
    }

    /// Kills per role, and the shortest, mean and longest outage.
    pub fn summary(&self) -> String {
        let list = self.0.lock().unwrap();
        let kills = |role| list.iter().filter(|w| w.role == role).count();
        let ms: Vec<f64> = list
            .iter()
            .filter_map(|w| w.ready_at.map(|r| (r - w.kill_at).as_secs_f64() * 1e3))
            .collect();
        let total: f64 = ms.iter().sum();
        format!(
            "{} kills (prefill {}, decode {}); outage from kill to /health ready: min {:.0} ms, \
             mean {:.0} ms, max {:.0} ms, {:.1} s in all",
            list.len(),
            kills(Role::Prefill),
            kills(Role::Decode),
            ms.iter().copied().fold(f64::INFINITY, f64::min).min(total),
            total / ms.len().max(1) as f64,
            ms.iter().copied().fold(0.0, f64::max),
            total / 1e3
        )
    }
}

/// JSON calls to the simulators' control endpoints, on fresh connections (a restarted
/// simulator must not meet a pooled connection to the one before).
pub struct Control(Client<HttpConnector, Full<Bytes>>);

impl Control {
    pub fn new() -> Self {
        Control(
            Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(HttpConnector::new()),
        )
    }

    /// Status and body, or `None` if the call failed or took over 5 s.
    pub async fn call(
        &self,
        addr: &str,
        method: &str,
        path: &str,
        body: String,
    ) -> Option<(u16, Bytes)> {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .ok()?;
        let call = async {
            let resp = self.0.request(req).await.ok()?;
            let status = resp.status().as_u16();
            Some((status, resp.into_body().collect().await.ok()?.to_bytes()))
        };
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .ok()?
    }

    pub async fn state(&self, addr: &str) -> Option<Value> {
        let (200, body) = self.call(addr, "GET", "/sim/state", String::new()).await? else {
            return None;
        };
        serde_json::from_slice(&body).ok()
    }
}

/// A simulator as scripts/soak.sh started it: `PID:PORT:SIDE_CHANNEL_PORT`.
pub struct Sim {
    pub role: Role,
    pub port: u16,
    side_port: u16,
    proc: Proc,
}

enum Proc {
    /// Started by the script: killed by pid.
    Started(u32),
    /// Restarted by us.
    Child(Child),
}

impl Sim {
    pub fn parse(role: Role, spec: &str) -> Sim {
        let f: Vec<u32> = spec.split(':').filter_map(|f| f.parse().ok()).collect();
        let [pid, port, side] = f[..] else {
            die(&format!(
                "--{}-sim {spec:?}: expected PID:PORT:SIDE_CHANNEL_PORT",
                role.name()
            ));
        };
        Sim {
            role,
            port: port as u16,
            side_port: side as u16,
            proc: Proc::Started(pid),
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        match &mut self.proc {
            Proc::Started(pid) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            Proc::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The kills, and what they need to start a simulator again.
pub struct Chaos {
    pub windows: Arc<Windows>,
    pub bin: PathBuf,
    /// The simulators' arguments, less `--port`, `--side-channel-port` and `--engine-id`.
    pub args: Vec<String>,
    /// Where a restarted simulator appends to NAME.out and NAME.log and writes NAME.pid.
    pub dir: PathBuf,
    pub epoch: Instant,
    /// Each killed incarnation's counters, read just before its kill.
    pub counters: Mutex<Vec<(Role, Value)>>,
    /// The lease audit, and what it judges by.
    pub audit: tokio::sync::Mutex<Audit>,
    pub prefiller: String,
    pub decoder: String,
    pub records: Arc<Records>,
    pub seed: u64,
}

impl Chaos {
    /// Kills a simulator every `gap` (uniform in 0.5-1.5 of it) until `stop`; returns the
    /// simulators, all up.
    pub async fn run(
        &self,
        mut sims: Vec<Sim>,
        stop: Arc<AtomicBool>,
        mut rng: Rng,
        gap: u64,
    ) -> Vec<Sim> {
        let ctl = Control::new();
        loop {
            let until = Instant::now() + Duration::from_millis(rng.range(gap / 2, gap * 3 / 2));
            while Instant::now() < until {
                if stop.load(Ordering::Relaxed) {
                    return sims;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let which = rng.below(sims.len() as u64) as usize;
            let down = Duration::from_millis(rng.range(50, 500));
            self.outage(&mut sims[which], down, &ctl).await;
        }
    }

    /// Judges the prefiller's settled leases (`leases.rs`).
    pub async fn audit(&self, ctl: &Control) {
        let now = self.epoch.elapsed();
        let (records, windows) = (&self.records, &self.windows);
        let mut audit = self.audit.lock().await;
        audit
            .sweep(ctl, &self.prefiller, records, windows, self.seed, now)
            .await;
    }

    /// At a hang, with the request still open: the outages around it, what each simulator
    /// logged for it, and the machine's TCP sockets (`SIM_DIR/hang-<i>.ss`).
    pub async fn diagnose(&self, i: u64, began: Duration) -> String {
        let mut out = String::new();
        for w in self.windows.0.lock().unwrap().iter() {
            if w.kill_at + Duration::from_secs(5) >= began {
                out.push_str(&format!(
                    "\n    {} outage: killed at {:?}, ready at {:?} (request began at {began:?})",
                    w.role.name(),
                    w.kill_at,
                    w.ready_at
                ));
            }
        }
        let ctl = Control::new();
        let id = format!("soak-{i}");
        for addr in [&self.prefiller, &self.decoder] {
            let Some((200, body)) = ctl.call(addr, "GET", "/sim/requests", String::new()).await
            else {
                out.push_str(&format!("\n    {addr}: no /sim/requests"));
                continue;
            };
            let log: Vec<Value> = serde_json::from_slice(&body).unwrap_or_default();
            let mine = log
                .iter()
                .filter(|r| r["headers"]["x-request-id"][0] == id.as_str());
            for r in mine {
                let fields = ["t_ms", "class", "status", "outcome", "first_byte_ms"];
                let v: Vec<String> = fields.iter().map(|f| format!("{f}={}", r[*f])).collect();
                out.push_str(&format!("\n    {addr} logged it: {}", v.join(" ")));
            }
        }
        let ss = Command::new("ss").args(["-tanpio"]).output();
        if let Ok(ss) = ss {
            let path = self.dir.join(format!("hang-{i}.ss"));
            let _ = std::fs::write(&path, ss.stdout);
            out.push_str(&format!("\n    sockets: {}", path.display()));
        }
        out
    }

    async fn outage(&self, sim: &mut Sim, down: Duration, ctl: &Control) {
        if sim.role == Role::Prefill {
            // Its leases die with it: judge those that can be judged first.
            self.audit(ctl).await;
        }
        // What this incarnation counted, for the run's totals (it counts on until the kill).
        if let Some(s) = ctl.state(&sim.addr()).await {
            self.counters
                .lock()
                .unwrap()
                .push((sim.role, s["counters"].clone()));
        }
        // Recorded before the signal, so nothing the kill causes predates its window.
        self.windows.0.lock().unwrap().push(Window {
            role: sim.role,
            kill_at: self.epoch.elapsed(),
            ready_at: None,
        });
        sim.kill();
        // Dead once its listener refuses.
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(sim.addr()).await.is_ok() {
            if Instant::now() > deadline {
                die(&format!(
                    "the {} simulator survived SIGKILL",
                    sim.role.name()
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(down).await;
        self.start(sim, ctl).await;
        if let Some(w) = self.windows.0.lock().unwrap().last_mut() {
            w.ready_at = Some(self.epoch.elapsed());
        }
    }

    /// Starts the simulator again on its ports, retrying while they are still held, until
    /// `/health` answers 200.
    async fn start(&self, sim: &mut Sim, ctl: &Control) {
        let name = sim.role.name();
        let file = |ext: &str| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(format!("{name}.{ext}")))
                .unwrap_or_else(|e| die(&format!("{name}.{ext}: {e}")))
        };
        for _ in 0..50 {
            let mut child = Command::new(&self.bin)
                .args(["--port", &sim.port.to_string()])
                .args(["--side-channel-port", &sim.side_port.to_string()])
                .args(["--engine-id", &format!("{name}-engine")])
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(file("out"))
                .stderr(file("log"))
                .spawn()
                .unwrap_or_else(|e| die(&format!("starting {}: {e}", self.bin.display())));
            // The script stops it by this file on exit.
            let _ = std::fs::write(self.dir.join(format!("{name}.pid")), child.id().to_string());
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if let Some((200, _)) = ctl.call(&sim.addr(), "GET", "/health", String::new()).await
                {
                    sim.proc = Proc::Child(child);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        die(&format!(
            "the {name} simulator did not start again on :{}",
            sim.port
        ));
    }
}

/// Sums a counter over every incarnation of `role`: those killed (as read before their kill)
/// and the current one.
pub fn total(counters: &[(Role, Value)], role: Role, path: &str) -> u64 {
    counters
        .iter()
        .filter(|(r, _)| *r == role)
        .filter_map(|(_, c)| c.pointer(path).and_then(Value::as_u64))
        .sum()
}
