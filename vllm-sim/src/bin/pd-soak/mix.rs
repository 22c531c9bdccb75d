//! What each request is, and how the ones hyper's client can send are sent.
//!
//! The plain soak's mix is fixed by request number, as it always was. Chaos mode draws each
//! request's kind, fault and timing from a generator seeded by the run's seed and the request
//! number, so a seed replays the same requests (not the same interleaving).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::fault::Fault;
use crate::outcome::{self, Check, Got, Want};
use crate::{raw, HttpClient, Opts};

/// SplitMix64: small, seedable, and enough to spread timings and picks.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    pub fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Good,
    GoodStream,
    CancelMidStream,
    CancelEarly,
    InvalidJson,
    NotObject,
    Oversized,
    BadPrefiller,
    PassThrough,
    /// Chaos: a good request carrying an `x-sim-fault`.
    Faulted,
    /// Chaos: raw sockets the client closes while sending the head, mid-body, after the
    /// whole request, after the response head, and mid-stream (`raw.rs`).
    RawHead,
    RawBody,
    RawAfterRequest,
    RawAfterHead,
    RawMidStream,
}

pub const NAMES: [&str; 15] = [
    "good",
    "good_stream",
    "cancel_mid_stream",
    "cancel_early",
    "invalid_json",
    "not_object",
    "oversized",
    "bad_prefiller",
    "pass_through",
    "faulted",
    "raw_head",
    "raw_body",
    "raw_after_request",
    "raw_after_head",
    "raw_mid_stream",
];

/// The plain mix: half good P/D requests, the rest spread over the others.
fn fixed(n: u64) -> Kind {
    match n % 20 {
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

/// One request: its kind, its fault, whether it streams (faulted ones), and its generator.
pub struct Plan {
    pub kind: Kind,
    pub fault: Option<Fault>,
    pub stream: bool,
    pub rng: Rng,
    /// Set once the response head arrived, for a hang's diagnosis.
    pub head: Arc<AtomicBool>,
}

/// Request `i`'s plan. Chaos: half the plain mix, 20% raw disconnects (4% per phase), 30%
/// faulted requests.
pub fn plan(i: u64, seed: u64, chaos: bool) -> Plan {
    let mut rng = Rng::new(seed ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let kind = if !chaos {
        fixed(i)
    } else {
        match rng.below(100) {
            0..=49 => fixed(rng.below(20)),
            50..=53 => Kind::RawHead,
            54..=57 => Kind::RawBody,
            58..=61 => Kind::RawAfterRequest,
            62..=65 => Kind::RawAfterHead,
            66..=69 => Kind::RawMidStream,
            _ => Kind::Faulted,
        }
    };
    let (fault, stream) = match kind {
        Kind::Faulted => (Some(Fault::pick(&mut rng)), rng.coin()),
        _ => (None, false),
    };
    Plan {
        kind,
        fault,
        stream,
        rng,
        head: Arc::default(),
    }
}

impl Plan {
    /// The answer a request must get when no outage touched it; `None` for those the client
    /// leaves before any answer is due.
    pub fn want(&self) -> Option<Want> {
        let ok = |check| Want {
            status: StatusCode::OK,
            check,
        };
        let status = |code| Want {
            status: StatusCode::from_u16(code).unwrap(),
            check: Check::Any,
        };
        Some(match self.kind {
            Kind::Good => ok(Check::Choices),
            // Leaving after a 200 head is the plan; anything else must be a whole stream.
            Kind::GoodStream | Kind::CancelMidStream | Kind::RawAfterHead | Kind::RawMidStream => {
                ok(Check::Done)
            }
            Kind::InvalidJson | Kind::NotObject | Kind::BadPrefiller => status(400),
            Kind::Oversized => status(413),
            Kind::PassThrough => ok(Check::Any),
            Kind::Faulted => {
                let fault = self.fault?;
                Want {
                    status: fault.expected(self.stream),
                    check: if self.stream {
                        Check::Done
                    } else {
                        Check::Choices
                    },
                }
            }
            Kind::CancelEarly | Kind::RawHead | Kind::RawBody | Kind::RawAfterRequest => {
                return None
            }
        })
    }
}

pub fn completion_body(i: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"sim-model","prompt":"soak request {i}","max_tokens":4}}"#
    ))
}

pub fn stream_body(i: u64, max_tokens: u32) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"sim-model","messages":[{{"role":"user","content":"soak {i}"}}],"stream":true,"max_tokens":{max_tokens}}}"#
    ))
}

fn pd_request(o: &Opts, i: u64, path: &str, body: Bytes, prefiller: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}{path}", o.addr))
        .header("content-type", "application/json")
        .header("x-prefiller-host-port", prefiller)
        // The prefiller's lease is named after it, so the lease audit finds the request.
        .header("x-request-id", format!("soak-{i}"))
        .body(Full::new(body))
        .unwrap()
}

/// Sends request `i` as planned.
pub async fn send(client: &HttpClient, o: &Opts, i: u64, p: &mut Plan, oversized: &Bytes) -> Got {
    let head = p.head.clone();
    let answer = |resp| answer(resp, &head);
    let completion = || completion_body(i);
    let pd = |path, body| pd_request(o, i, path, body, &o.prefiller);
    let req = match p.kind {
        Kind::Good => pd("/v1/completions", completion()),
        Kind::GoodStream => pd("/v1/chat/completions", stream_body(i, 4)),
        Kind::CancelMidStream => {
            let req = pd("/v1/chat/completions", stream_body(i, 64));
            let resp = match client.request(req).await {
                Ok(resp) => resp,
                Err(e) => return outcome::from_error(&e),
            };
            if resp.status() != StatusCode::OK {
                return answer(resp).await;
            }
            // One event, then hang up with the stream still running.
            let _ = resp.into_body().frame().await;
            return Got::Left;
        }
        Kind::CancelEarly => {
            // Give up somewhere in the prefill, the decode admission or the decode.
            let wait = Duration::from_micros(200 + (i * 7919) % 8000);
            let req = pd("/v1/completions", completion());
            let sent = tokio::time::timeout(wait, async {
                match client.request(req).await {
                    Ok(resp) => answer(resp).await,
                    Err(e) => outcome::from_error(&e),
                }
            });
            return sent.await.unwrap_or(Got::Left);
        }
        Kind::InvalidJson => pd("/v1/completions", Bytes::from_static(br#"{"prompt":"x","#)),
        Kind::NotObject => pd("/v1/completions", Bytes::from_static(b"[1,2]")),
        Kind::Oversized => pd("/v1/completions", oversized.clone()),
        Kind::BadPrefiller => {
            pd_request(o, i, "/v1/completions", completion(), "http://p:1/path?x")
        }
        Kind::PassThrough => Request::get(format!("http://{}/v1/models", o.addr))
            .body(Full::new(Bytes::new()))
            .unwrap(),
        Kind::Faulted => {
            let mut req = if p.stream {
                pd("/v1/chat/completions", stream_body(i, 4))
            } else {
                pd("/v1/completions", completion())
            };
            if let Some(f) = p.fault {
                req.headers_mut()
                    .insert("x-sim-fault", f.header().parse().unwrap());
            }
            req
        }
        Kind::RawHead
        | Kind::RawBody
        | Kind::RawAfterRequest
        | Kind::RawAfterHead
        | Kind::RawMidStream => return raw::send(o, i, p).await,
    };
    match client.request(req).await {
        Ok(resp) => answer(resp).await,
        Err(e) => outcome::from_error(&e),
    }
}

async fn answer(resp: http::Response<hyper::body::Incoming>, head: &AtomicBool) -> Got {
    head.store(true, Ordering::Relaxed);
    let status = resp.status();
    match resp.into_body().collect().await {
        Ok(body) => Got::Answer {
            status,
            body: body.to_bytes(),
        },
        Err(e) => outcome::from_error(&e),
    }
}
