//! Mooncake's bootstrap lookup: which engine (and data-parallel rank) a prefiller runs, from
//! `GET /query` on its bootstrap port. Cached per prefiller, but only for [`FRESH_FOR`] and
//! until a leg to that prefiller fails, so a restarted prefiller (a new engine id) is found
//! again; pd-sidecar caches the answer forever.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Method, Request};
use tracing::debug;

use crate::body::{self, CollectError};
use crate::connector::{parse_query, Engine};
use crate::error::{describe, ProxyError};
use crate::upstream::{Leg, Target, Upstream};

/// How long an answer is used before it is asked again.
const FRESH_FOR: Duration = Duration::from_secs(30);
/// How long the lookup may take (pd-sidecar's is 5 s too).
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prefillers remembered at most (pd-sidecar's LRU holds 1024).
const CAPACITY: usize = 1024;
const ANSWER_LIMIT: usize = 64 * 1024;

/// The engines of the prefillers asked lately.
#[derive(Default)]
pub struct Bootstraps {
    known: Mutex<HashMap<String, (Instant, Vec<Engine>)>>,
}

impl Bootstraps {
    /// An engine of `prefiller`, whose bootstrap server listens on `port` of its host: one
    /// rank at random, which spreads requests over its ranks as pd-sidecar does.
    pub async fn engine(
        &self,
        upstream: &Upstream,
        prefiller: &Target,
        port: u16,
    ) -> Result<Engine, ProxyError> {
        let fresh = self
            .lock()
            .get(prefiller.authority())
            .filter(|(at, _)| at.elapsed() < FRESH_FOR)
            .map(|(_, engines)| pick(engines));
        if let Some(engine) = fresh {
            return Ok(engine);
        }
        let engines = query(upstream, prefiller, port).await?;
        let engine = pick(&engines);
        let key = prefiller.authority().to_owned();
        let mut known = self.lock();
        if known.len() >= CAPACITY && !known.contains_key(&key) {
            // The oldest answer goes: it is the likeliest to be stale anyway.
            let oldest = known
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                known.remove(&oldest);
            }
        }
        known.insert(key, (Instant::now(), engines));
        Ok(engine)
    }

    /// Drops what is known of `prefiller`, after a leg to it failed.
    pub fn forget(&self, prefiller: &Target) {
        self.lock().remove(prefiller.authority());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Vec<Engine>)>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One of `engines` (never empty: `parse_query` refuses an answer without one), at random.
fn pick(engines: &[Engine]) -> Engine {
    engines[fastrand::usize(..engines.len())].clone()
}

async fn query(
    upstream: &Upstream,
    prefiller: &Target,
    port: u16,
) -> Result<Vec<Engine>, ProxyError> {
    let host = prefiller.host();
    let url = format!("http://{host}:{port}/query");
    let failed = |detail: String| ProxyError::PrefillUnreachable {
        prefiller: prefiller.authority().to_string(),
        detail: format!("Mooncake bootstrap {url}: {detail}"),
    };
    let req = Request::builder()
        .method(Method::GET)
        .uri(&url)
        .body(body::empty())
        .map_err(|e| failed(e.to_string()))?;
    let answer = async {
        let resp = upstream
            .send(Leg::Prefill, req)
            .await
            .map_err(|e| describe(&e))?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        body::collect_limited(resp.into_body(), ANSWER_LIMIT)
            .await
            .map_err(|e| match e {
                CollectError::TooLarge => format!("answer longer than {ANSWER_LIMIT} bytes"),
                CollectError::Read(e) => describe(&*e),
            })
    };
    let answer = tokio::time::timeout(QUERY_TIMEOUT, answer)
        .await
        .map_err(|_| failed(format!("no answer within {QUERY_TIMEOUT:?}")))?
        .map_err(failed)?;
    let engines = parse_query(&answer).map_err(failed)?;
    debug!(
        prefiller = prefiller.authority(),
        engines = engines.len(),
        "Mooncake bootstrap queried"
    );
    Ok(engines)
}
