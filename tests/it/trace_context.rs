//! W3C trace context reaches both P/D legs (the logs' side is in tests/logs.rs).

use crate::support::*;
use serde_json::Value;
use sidecar::Connector;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn with_headers(
    mut req: hyper::Request<http_body_util::Full<bytes::Bytes>>,
    headers: &[(&'static str, &'static str)],
) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    for (name, value) in headers {
        req.headers_mut()
            .insert(*name, value.parse().expect("header value"));
    }
    req
}

/// The one request a simulator received.
async fn only_request(sim: &vllm_sim::SimServer) -> Value {
    let mut all = sim_requests(sim).await;
    assert_eq!(all.len(), 1, "{all:?}");
    all.remove(0)
}

#[tokio::test]
async fn the_clients_traceparent_and_tracestate_reach_both_legs_unchanged() {
    let Pd { p, d, sidecar } = Pd::start(Connector::NixlV2).await;
    let req = with_headers(
        post("/v1/completions", Some(p.api_addr()), r#"{"prompt":"p"}"#),
        &[
            ("traceparent", TRACEPARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    );
    let (resp, _) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 200);
    for leg in [only_request(&p).await, only_request(&d).await] {
        assert_eq!(record_header(&leg, "traceparent"), Some(TRACEPARENT));
        assert_eq!(record_header(&leg, "tracestate"), Some("congo=t61rcWkgMzE"));
    }
}

#[tokio::test]
async fn without_a_traceparent_both_legs_share_a_new_trace() {
    let Pd { p, d, sidecar } = Pd::start(Connector::NixlV2).await;
    let (resp, _) = call_pd(sidecar.addr, &p, r#"{"prompt":"p"}"#).await;
    assert_eq!(resp.status(), 200);
    let prefill = only_request(&p).await;
    let decode = only_request(&d).await;
    let tp = record_header(&prefill, "traceparent").expect("prefill leg has a traceparent");
    assert_eq!(record_header(&decode, "traceparent"), Some(tp));
    let fields: Vec<&str> = tp.split('-').collect();
    assert_eq!(fields.len(), 4, "{tp}");
    assert_eq!((fields[0], fields[3]), ("00", "01"));
    assert_eq!((fields[1].len(), fields[2].len()), (32, 16));
    assert!(tp[3..]
        .bytes()
        .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));

    // A second request starts another trace.
    let (resp, _) = call_pd(sidecar.addr, &p, r#"{"prompt":"p"}"#).await;
    assert_eq!(resp.status(), 200);
    let second = sim_requests(&p).await.pop().expect("second prefill");
    assert_ne!(record_header(&second, "traceparent"), Some(tp));
}

#[tokio::test]
async fn pass_through_forwards_trace_headers_and_adds_none() {
    let d = sim(|_| {}).await;
    let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
    let req = with_headers(get("/v1/models"), &[("traceparent", TRACEPARENT)]);
    let (resp, _) = call(sidecar.addr, req).await;
    assert_eq!(resp.status(), 200);
    let (resp, _) = call(sidecar.addr, get("/v1/models")).await;
    assert_eq!(resp.status(), 200);
    let all = sim_requests(&d).await;
    assert_eq!(record_header(&all[0], "traceparent"), Some(TRACEPARENT));
    assert_eq!(record_header(&all[1], "traceparent"), None);
}
