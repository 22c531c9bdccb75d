//! How a request ended, and whether that was acceptable.
//!
//! A request no outage touched and that carries no unexpected fault is held to its exact
//! expected answer (strict). Any other request may end in a complete 2xx, a vLLM-shaped JSON
//! error, or the connection closing; a hang, a non-JSON error or a protocol error is a failure.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;

use crate::fault;
use crate::mix::{self, Plan};

/// What the client saw.
#[derive(Debug)]
pub enum Got {
    /// The client hung up on purpose.
    Left,
    /// A whole response.
    Answer { status: StatusCode, body: Bytes },
    /// The sidecar closed or reset the connection before the response was whole.
    Closed(String),
    /// Anything else: no connection to the sidecar, a malformed response.
    Broken(String),
}

/// What a complete 2xx body must hold.
#[derive(Clone, Copy, Debug)]
pub enum Check {
    /// A completion: a JSON body with `"choices"`.
    Choices,
    /// An SSE stream that ends with `[DONE]`.
    Done,
    Any,
}

#[derive(Clone, Copy, Debug)]
pub struct Want {
    pub status: StatusCode,
    pub check: Check,
}

/// The outcome classes counted.
#[derive(Clone, Copy)]
pub enum Class {
    Complete,
    ErrorJson,
    Closed,
    Left,
}

pub const CLASS_NAMES: [&str; 4] = ["complete_2xx", "error_json", "closed", "client_left"];

/// Sorts a client error: the peer closing or resetting is a close, anything else (no
/// connection to the sidecar, a parse error) is broken. hyper keeps the cause in its sources.
pub fn from_error(e: &(dyn std::error::Error + 'static)) -> Got {
    let text = chain(e);
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                return Got::Closed(text);
            }
            if h.is_parse() || h.is_parse_status() || h.is_user() {
                return Got::Broken(text);
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if is_close(io) {
                return Got::Closed(text);
            }
        }
        if let Some(l) = err.downcast_ref::<hyper_util::client::legacy::Error>() {
            if l.is_connect() {
                return Got::Broken(text);
            }
        }
        source = err.source();
    }
    Got::Broken(text)
}

pub fn is_close(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}

/// An error with its sources, which hyper keeps the useful part in.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn complete(check: Check, body: &[u8]) -> bool {
    match check {
        Check::Choices => body.windows(9).any(|w| w == b"\"choices\""),
        Check::Done => body.ends_with(b"data: [DONE]\n\n"),
        Check::Any => true,
    }
}

/// vLLM's error shapes (SPEC §4.3): `{"error":{"message","type",…}}`, or the legacy
/// `{"object":"error","message","type",…}`.
fn vllm_error(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let shaped = |o: &serde_json::Value| o["message"].is_string() && o["type"].is_string();
    shaped(&v["error"]) || (v["object"] == "error" && shaped(&v))
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

/// The exact expected answer.
pub fn strict(got: &Got, want: Want) -> Result<Class, String> {
    match got {
        Got::Left => Ok(Class::Left),
        Got::Answer { status, body } if *status != want.status => Err(format!(
            "status {status}, expected {}: {}",
            want.status,
            snippet(body)
        )),
        answer @ Got::Answer { .. } => lenient(answer, want.check),
        Got::Closed(e) => Err(format!("connection closed: {e}")),
        Got::Broken(e) => Err(e.clone()),
    }
}

/// Any clean end: a complete 2xx, a vLLM-shaped error, a close.
pub fn lenient(got: &Got, check: Check) -> Result<Class, String> {
    match got {
        Got::Left => Ok(Class::Left),
        Got::Closed(_) => Ok(Class::Closed),
        Got::Answer { status, body } if status.is_success() => {
            if complete(check, body) {
                Ok(Class::Complete)
            } else {
                Err(format!(
                    "{status} with an incomplete body: {}",
                    snippet(body)
                ))
            }
        }
        Got::Answer { status, body } => {
            if vllm_error(body) {
                Ok(Class::ErrorJson)
            } else {
                Err(format!(
                    "{status} whose body is not a vLLM error: {}",
                    snippet(body)
                ))
            }
        }
        Got::Broken(e) => Err(e.clone()),
    }
}

/// When each request started and ended (µs since the run's start, +1 so 0 means not yet),
/// for the lease audit.
pub struct Records {
    start: Vec<AtomicU64>,
    end: Vec<AtomicU64>,
}

impl Records {
    pub fn new(n: u64) -> Self {
        let v = || (0..n).map(|_| AtomicU64::new(0)).collect();
        Records {
            start: v(),
            end: v(),
        }
    }

    pub fn set(&self, i: u64, start: Duration, end: Duration) {
        let us = |d: Duration| d.as_micros() as u64 + 1;
        self.start[i as usize].store(us(start), Ordering::Relaxed);
        self.end[i as usize].store(us(end), Ordering::Relaxed);
    }

    /// The request's lifetime, once it ended.
    pub fn get(&self, i: u64) -> Option<(Duration, Duration)> {
        let at = |v: &[AtomicU64]| v.get(i as usize).map(|a| a.load(Ordering::Relaxed));
        match (at(&self.start)?, at(&self.end)?) {
            (s, e) if s > 0 && e > 0 => {
                Some((Duration::from_micros(s - 1), Duration::from_micros(e - 1)))
            }
            _ => None,
        }
    }
}

#[derive(Default)]
pub struct Stats {
    pub done: [AtomicU64; mix::NAMES.len()],
    pub faults: [AtomicU64; fault::NAMES.len()],
    pub classes: [AtomicU64; CLASS_NAMES.len()],
    pub error_statuses: Mutex<BTreeMap<u16, u64>>,
    pub strict: AtomicU64,
    pub lenient: AtomicU64,
    pub failed: AtomicU64,
    pub first_failures: Mutex<Vec<String>>,
}

impl Stats {
    /// Judges and counts request `i`; `got` is `None` if it hit the deadline, `touched` if
    /// an outage overlapped it.
    pub fn record(&self, i: u64, plan: &Plan, touched: bool, got: Option<Got>) {
        let verdict = match (&got, plan.want()) {
            (None, _) => Err("no answer within the deadline".to_string()),
            (Some(got), Some(want)) if !touched => {
                self.strict.fetch_add(1, Ordering::Relaxed);
                strict(got, want)
            }
            (Some(got), want) => {
                self.lenient.fetch_add(1, Ordering::Relaxed);
                lenient(got, want.map_or(Check::Any, |w| w.check))
            }
        };
        self.done[plan.kind as usize].fetch_add(1, Ordering::Relaxed);
        let f = plan.fault.map_or(fault::NAMES.len() - 1, |f| f.index());
        self.faults[f].fetch_add(1, Ordering::Relaxed);
        match verdict {
            Ok(class) => {
                self.classes[class as usize].fetch_add(1, Ordering::Relaxed);
                if let (Class::ErrorJson, Some(Got::Answer { status, .. })) = (class, &got) {
                    *self
                        .error_statuses
                        .lock()
                        .unwrap()
                        .entry(status.as_u16())
                        .or_default() += 1;
                }
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut f = self.first_failures.lock().unwrap();
                if f.len() < 10 {
                    let fault = plan.fault.map(|f| format!(" [{}]", f.header()));
                    let when = if touched { " (outage)" } else { "" };
                    f.push(format!(
                        "#{i} {:?}{}{when}: {e}",
                        plan.kind,
                        fault.unwrap_or_default()
                    ));
                }
            }
        }
    }
}
