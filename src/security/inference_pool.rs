//! Keeps SSRF protection's pod set current from a Kubernetes InferencePool and its pods.
//!
//! The pool names a pod selector and target ports; every `podIP:port` of a matching pod is an
//! allowed prefiller. Until the first listing arrives the set is empty, so protection fails
//! closed rather than open. Watches restart with backoff when the API server drops them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::runtime::AbortOnDrop;
use crate::security::allowlist::PoolSet;

/// Which InferencePool API the cluster serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolApi {
    /// `inference.networking.k8s.io/v1`: `spec.selector.matchLabels`, `spec.targetPorts[].number`.
    V1,
    /// `inference.networking.x-k8s.io/v1alpha2`: `spec.selector`, `spec.targetPortNumber`.
    V1Alpha2,
}

impl std::str::FromStr for PoolApi {
    type Err = String;

    fn from_str(group: &str) -> Result<Self, String> {
        match group {
            "inference.networking.k8s.io" => Ok(Self::V1),
            "inference.networking.x-k8s.io" => Ok(Self::V1Alpha2),
            other => Err(format!(
                "unknown InferencePool group '{other}' (expected inference.networking.k8s.io or inference.networking.x-k8s.io)"
            )),
        }
    }
}

impl PoolApi {
    fn resource(self) -> ApiResource {
        let (group, version) = match self {
            PoolApi::V1 => ("inference.networking.k8s.io", "v1"),
            PoolApi::V1Alpha2 => ("inference.networking.x-k8s.io", "v1alpha2"),
        };
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: format!("{group}/{version}"),
            kind: "InferencePool".into(),
            plural: "inferencepools".into(),
        }
    }

    /// The pool's pod selector and ports, if its spec has them.
    fn targets(self, pool: &DynamicObject) -> Option<Targets> {
        let spec = pool.data.get("spec")?;
        let (labels, ports): (&Value, Vec<u16>) = match self {
            PoolApi::V1 => (
                spec.pointer("/selector/matchLabels")?,
                spec.get("targetPorts")?
                    .as_array()?
                    .iter()
                    .filter_map(|p| p.get("number")?.as_u64()?.try_into().ok())
                    .collect(),
            ),
            PoolApi::V1Alpha2 => (
                spec.get("selector")?,
                vec![spec.get("targetPortNumber")?.as_u64()?.try_into().ok()?],
            ),
        };
        let labels: BTreeMap<&str, &str> = labels
            .as_object()?
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
            .collect();
        if labels.is_empty() || ports.is_empty() {
            return None;
        }
        let selector = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        Some(Targets { selector, ports })
    }
}

/// What the pool allows: pods matching `selector`, on `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Targets {
    selector: String,
    ports: Vec<u16>,
}

/// Watches the pool `namespace/name` and keeps the returned set current.
pub fn spawn(
    client: Client,
    namespace: String,
    name: String,
    api: PoolApi,
) -> (watch::Receiver<PoolSet>, AbortOnDrop) {
    let (tx, rx) = watch::channel(PoolSet::default());
    // Lives as long as the returned handle: the App holds it while it serves.
    #[allow(clippy::disallowed_methods)]
    let task = tokio::spawn(watch_pool(client, namespace, name, api, tx));
    (rx, AbortOnDrop(task))
}

async fn watch_pool(
    client: Client,
    namespace: String,
    name: String,
    api: PoolApi,
    tx: watch::Sender<PoolSet>,
) {
    let pools: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &api.resource());
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(pools, config).default_backoff().boxed();
    let mut current: Option<Targets> = None;
    let mut listed: Option<Targets> = None;
    // Aborted on drop too, so aborting this watch stops the pods' watch with it.
    let mut pods: Option<AbortOnDrop> = None;
    while let Some(event) = events.next().await {
        let next = match event {
            Err(e) => {
                warn!(error = %e, pool = %name, "InferencePool watch failed; retrying");
                continue;
            }
            Ok(Event::Init) => {
                listed = None;
                continue;
            }
            Ok(Event::InitApply(pool)) => {
                listed = api.targets(&pool);
                continue;
            }
            // A pool missing from a fresh listing was deleted while we were not watching.
            Ok(Event::InitDone) => listed.take(),
            Ok(Event::Apply(pool)) => api.targets(&pool),
            Ok(Event::Delete(_)) => None,
        };
        if next == current {
            continue;
        }
        info!(pool = %name, targets = ?next, "InferencePool changed");
        drop(pods.take());
        tx.send_replace(PoolSet::default());
        if let Some(targets) = &next {
            // The pods' watch for the current pool; aborted when the pool changes or goes.
            #[allow(clippy::disallowed_methods)]
            let task = tokio::spawn(watch_pods(
                client.clone(),
                namespace.clone(),
                targets.clone(),
                tx.clone(),
            ));
            pods = Some(AbortOnDrop(task));
        }
        current = next;
    }
}

async fn watch_pods(
    client: Client,
    namespace: String,
    targets: Targets,
    tx: watch::Sender<PoolSet>,
) {
    let api: Api<Pod> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&targets.selector);
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut pods: HashMap<String, IpAddr> = HashMap::new();
    let mut listing: HashMap<String, IpAddr> = HashMap::new();
    while let Some(event) = events.next().await {
        match event {
            Err(e) => {
                warn!(error = %e, "pod watch failed; retrying");
                continue;
            }
            Ok(Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(Event::InitApply(pod)) => {
                if let Some((name, ip)) = endpoint(&pod) {
                    listing.insert(name, ip);
                }
                continue;
            }
            Ok(Event::InitDone) => pods = std::mem::take(&mut listing),
            Ok(Event::Apply(pod)) => {
                let name = pod.metadata.name.clone().unwrap_or_default();
                match endpoint(&pod) {
                    Some((name, ip)) => pods.insert(name, ip),
                    None => pods.remove(&name),
                };
            }
            Ok(Event::Delete(pod)) => {
                pods.remove(&pod.metadata.name.clone().unwrap_or_default());
            }
        }
        let set: HashSet<(IpAddr, u16)> = pods
            .values()
            .flat_map(|ip| targets.ports.iter().map(move |port| (*ip, *port)))
            .collect();
        tx.send_replace(Arc::new(set));
    }
}

/// A pod's name and IP, unless it has no IP yet or is shutting down.
fn endpoint(pod: &Pod) -> Option<(String, IpAddr)> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ip = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
    Some((pod.metadata.name.clone()?, ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(spec: Value) -> DynamicObject {
        let mut obj = DynamicObject::new("pool", &PoolApi::V1.resource());
        obj.data = serde_json::json!({ "spec": spec });
        obj
    }

    #[test]
    fn both_api_versions_give_selector_and_ports() {
        let v1 = pool(
            serde_json::json!({"selector":{"matchLabels":{"role":"prefill","app":"vllm"}},"targetPorts":[{"number":8000},{"number":8200}]}),
        );
        assert_eq!(
            PoolApi::V1.targets(&v1),
            Some(Targets {
                selector: "app=vllm,role=prefill".into(),
                ports: vec![8000, 8200]
            })
        );
        let alpha = pool(serde_json::json!({"selector":{"app":"vllm"},"targetPortNumber":8000}));
        assert_eq!(
            PoolApi::V1Alpha2.targets(&alpha),
            Some(Targets {
                selector: "app=vllm".into(),
                ports: vec![8000]
            })
        );
        // A v1alpha2-shaped spec read as v1 yields nothing rather than a wrong selector.
        assert_eq!(PoolApi::V1.targets(&alpha), None);
    }
}
