//! SSRF protection from a Kubernetes InferencePool: only `podIP:port` of the pool's pods may
//! be prefillers, kept current as the pool and its pods change (checked against a fake API
//! server serving list and watch).

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::fake_kube::FakeKube;
use crate::support::*;
use serde_json::{json, Value};
use sidecar::config::SsrfConfig;
use sidecar::security::inference_pool::PoolApi;
use sidecar::App;

const POOLS: &str = "/apis/inference.networking.k8s.io/v1/namespaces/llm/inferencepools";
const PODS: &str = "/api/v1/namespaces/llm/pods";

fn pool(labels: Value, ports: &[u16]) -> Value {
    let ports: Vec<Value> = ports.iter().map(|p| json!({"number": p})).collect();
    json!({
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": "pool", "namespace": "llm", "resourceVersion": "1"},
        "spec": {"selector": {"matchLabels": labels}, "targetPorts": ports}
    })
}

fn pod(name: &str, role: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "llm", "resourceVersion": "1", "labels": {"role": role}},
        "status": {"podIP": ip}
    })
}

/// Polls until a P/D request naming `prefiller` gets `want` (403 or 200): the watch has no
/// outside signal, so this is bounded polling.
async fn until_status(sidecar: SocketAddr, prefiller: SocketAddr, want: u16) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let (resp, _) = call(
            sidecar,
            post(
                "/v1/completions",
                Some(prefiller),
                r#"{"prompt":"x","max_tokens":1}"#,
            ),
        )
        .await;
        if resp.status() == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{prefiller} never got {want} (last {})",
            resp.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn only_the_pools_pods_on_its_ports_are_allowed_as_the_pool_changes() {
    let p1 = sim(|_| {}).await;
    let p2 = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    // All simulators listen on 127.0.0.1: the pool's port decides which one is allowed.
    let kube = FakeKube::start(vec![
        (
            POOLS,
            "InferencePoolList",
            vec![pool(json!({"role": "prefill"}), &[p1.api_addr().port()])],
        ),
        (
            PODS,
            "PodList",
            vec![
                pod("prefill-0", "prefill", "127.0.0.1"),
                pod("decode-0", "decode", "10.9.9.9"),
            ],
        ),
    ])
    .await;
    let mut cfg = config(d.api_addr());
    cfg.ssrf = Some(SsrfConfig {
        rules: vec![],
        inference_pool: Some(("llm".into(), "pool".into())),
        pool_api: PoolApi::V1,
    });
    let app = App::build_with_kube_api(cfg, Some(&kube.url()))
        .await
        .expect("the sidecar assembles");
    let sidecar = Sidecar::serve(app).await;

    until_status(sidecar.addr, p1.api_addr(), 200).await;
    let (resp, body) = call_pd(sidecar.addr, &p2, r#"{"prompt":"x"}"#).await;
    assert_eq!(resp.status(), 403, "same host, port not in the pool");
    assert_eq!(json(&body)["error"]["type"], "PermissionDeniedError");
    assert_eq!(counter(&sim_state(&p2).await, "requests_total"), 0);

    // The pool moves to p2's port (MODIFIED): p1 is refused, p2 allowed.
    kube.push(
        POOLS,
        "MODIFIED",
        pool(json!({"role": "prefill"}), &[p2.api_addr().port()]),
    );
    until_status(sidecar.addr, p2.api_addr(), 200).await;
    until_status(sidecar.addr, p1.api_addr(), 403).await;

    // The pod goes away (DELETED): nothing is allowed.
    kube.push(PODS, "DELETED", pod("prefill-0", "prefill", "127.0.0.1"));
    until_status(sidecar.addr, p2.api_addr(), 403).await;

    // A new pod matching the selector appears (ADDED): allowed again.
    kube.push(PODS, "ADDED", pod("prefill-1", "prefill", "127.0.0.1"));
    until_status(sidecar.addr, p2.api_addr(), 200).await;

    // The pool is deleted: fail closed.
    kube.push(
        POOLS,
        "DELETED",
        pool(json!({"role": "prefill"}), &[p2.api_addr().port()]),
    );
    until_status(sidecar.addr, p2.api_addr(), 403).await;
}

#[tokio::test]
async fn without_a_kubernetes_api_protection_refuses_to_start() {
    let d = sim(|_| {}).await;
    let mut cfg = config(d.api_addr());
    cfg.ssrf = Some(SsrfConfig {
        rules: vec![],
        inference_pool: Some(("llm".into(), "pool".into())),
        pool_api: PoolApi::V1,
    });
    let built = tokio::time::timeout(LIMIT, App::build_with_kube_api(cfg, Some("not a url")))
        .await
        .expect("returns");
    let Err(err) = built else {
        panic!("no API, no start")
    };
    assert!(err.to_string().contains("-enable-ssrf-protection"), "{err}");
}
