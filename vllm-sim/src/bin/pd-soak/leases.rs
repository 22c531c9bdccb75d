//! Chaos mode's lease audit: every lease the prefiller still holds once its request is over
//! must be explained, else it is the stranded-lease bug the soak looks for.
//!
//! The sidecar cannot release blocks when the decoder is dead (docs/decisions/0001), so a
//! lease may remain if its request, stretched by the sidecar's late-reply bounds, met a
//! decoder outage; and some faults strand leases by the simulator's design
//! (`Fault::strands_lease`). Explained leases are expired (`/sim/expire_leases`) so they do
//! not fill the pool; unexplained ones are left held, and the script's final
//! `idle_and_no_leases` check sees them too.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::chaos::{Control, Role, Windows};
use crate::mix;
use crate::outcome::Records;

/// How long the sidecar may act for a request after its client is gone:
/// -prefill-abandon-grace (500 ms), the 2 s late read after the half-close, then
/// -decode-admission-grace (500 ms) for the releasing decode (docs/design.md).
const LATE: Duration = Duration::from_millis(3000);
/// Slack on top, for a busy machine and the restart's own settling.
const MARGIN: Duration = Duration::from_secs(1);
/// A lease is judged only this long after its request ended, when nothing can end it any more.
pub const SETTLED: Duration = Duration::from_secs(8);

#[derive(Default)]
pub struct Audit {
    /// Held leases judged after their request was over.
    pub held: u64,
    pub by_decoder_outage: u64,
    pub by_fault: u64,
    pub unexplained: u64,
    /// Unexplained leases stay held: judged once.
    judged: HashSet<String>,
    pub first_unexplained: Vec<String>,
}

/// `cmpl-soak-<i>-0-<suffix>` or `chatcmpl-soak-<i>-<suffix>` (SPEC §7.6): request `i`.
fn request_of(id: &str) -> Option<u64> {
    let rest = id
        .strip_prefix("cmpl-")
        .or_else(|| id.strip_prefix("chatcmpl-"))?
        .strip_prefix("soak-")?;
    rest.split('-').next()?.parse().ok()
}

impl Audit {
    /// Judges the leases of requests over for [`SETTLED`] at `now`, and expires the explained.
    #[allow(clippy::too_many_arguments)]
    pub async fn sweep(
        &mut self,
        ctl: &Control,
        prefiller: &str,
        records: &Records,
        windows: &Windows,
        seed: u64,
        now: Duration,
    ) {
        let Some(state) = ctl.state(prefiller).await else {
            return; // Down: its leases went with it.
        };
        let mut expire = Vec::new();
        let leases = state["leases"].as_array().cloned().unwrap_or_default();
        for lease in leases.iter().filter(|l| l["state"] == "held") {
            let Some(id) = lease["remote_request_id"].as_str() else {
                continue;
            };
            if self.judged.contains(id) {
                continue;
            }
            let request = request_of(id);
            let life = request.and_then(|i| records.get(i));
            if life.is_some_and(|(_, end)| end + SETTLED > now)
                || (request.is_some() && life.is_none())
            {
                continue; // Not over, or not over long enough.
            }
            self.held += 1;
            let fault = request.and_then(|i| mix::plan(i, seed, true).fault);
            if fault.is_some_and(|f| f.strands_lease()) {
                self.by_fault += 1;
            } else if life.is_some_and(|(start, end)| {
                windows.touch(start, end + LATE, MARGIN, Some(Role::Decode))
            }) {
                self.by_decoder_outage += 1;
            } else {
                self.unexplained += 1;
                self.judged.insert(id.to_string());
                if self.first_unexplained.len() < 10 {
                    let plan = request.map(|i| mix::plan(i, seed, true));
                    self.first_unexplained.push(format!(
                        "{id}: request {:?} {:?}, lived {life:?} (since the start), lease {}",
                        request,
                        plan.map(|p| p.kind),
                        lease
                    ));
                }
                continue;
            }
            expire.push(Value::from(id));
        }
        if !expire.is_empty() {
            let body = json!({ "remote_request_ids": expire }).to_string();
            let _ = ctl
                .call(prefiller, "POST", "/sim/expire_leases", body)
                .await;
        }
    }
}
