//! `-data-parallel-size`: one listener per vLLM rank, each in front of its own decoder rank,
//! and `x-data-parallel-host-port` sending a request to the rank it names.

use std::net::SocketAddr;

use crate::support::{
    call, config, json, metric, post, record_header, sim, sim_requests, sim_requests_to, Sidecar,
};
use sidecar::observe::metrics::Metrics;
use vllm_sim::SimServer;

const BODY: &str = r#"{"model":"sim-model","prompt":"hello there","max_tokens":3}"#;

/// Two decoder ranks (vllm-sim's data-parallel mode), one prefiller, and a sidecar with a
/// listener per rank that knows itself as 127.0.0.1 (`POD_IP`).
struct Ranks {
    p: SimServer,
    d: Vec<SimServer>,
    metrics: Metrics,
    ports: Vec<SocketAddr>,
    _sidecar: Sidecar,
}

impl Ranks {
    async fn start() -> Ranks {
        let p = sim(|_| {}).await;
        let base = vllm_sim::SimConfig {
            ttft_ms: 5,
            itl_ms: 1,
            kv_transfer_ms: 1,
            ..vllm_sim::SimConfig::default()
        };
        let d = vllm_sim::spawn_ranks(base, 2).await.expect("ranks start");
        let mut cfg = config(d[0].api_addr());
        cfg.rank_decoders = vec![sidecar::upstream::Target::http(
            d[1].api_addr().to_string().parse().unwrap(),
        )];
        cfg.pod_ip = Some("127.0.0.1".parse().unwrap());
        let app = sidecar::App::build(cfg).await.expect("assembles");
        let metrics = app.metrics().clone();
        let (sidecar, ports) = Sidecar::serve_ranks(app).await;
        Ranks {
            p,
            d,
            metrics,
            ports,
            _sidecar: sidecar,
        }
    }

    /// How many requests each decoder rank received.
    async fn received(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for d in &self.d {
            out.push(sim_requests_to(d, "/v1/completions").await.len());
        }
        out
    }
}

#[tokio::test]
async fn each_listener_reaches_its_own_rank_for_pd_and_pass_through() {
    let r = Ranks::start().await;
    for (rank, port) in r.ports.iter().enumerate() {
        let (resp, body) = call(*port, post("/v1/completions", None, BODY)).await;
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
        let (resp, body) = call(*port, post("/v1/completions", Some(r.p.api_addr()), BODY)).await;
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
        let wanted = if rank == 0 { [2, 0] } else { [2, 2] };
        assert_eq!(r.received().await, wanted, "after rank {rank}");
    }
    // The decode legs carried the prefiller's transfer parameters to each rank.
    for d in &r.d {
        let decode = sim_requests_to(d, "/v1/completions").await.pop().unwrap();
        let body = crate::support::record_body(&decode);
        assert_eq!(
            body["kv_transfer_params"]["do_remote_prefill"], true,
            "{body}"
        );
    }
    let series = r#"llm_d_sidecar_data_parallel_requests_total{rank="1",via="listener"}"#;
    assert_eq!(metric(&r.metrics, series), 2);
}

#[tokio::test]
async fn the_header_sends_a_request_to_the_rank_it_names_and_is_stripped() {
    let r = Ranks::start().await;
    let named = format!("127.0.0.1:{}", r.ports[1].port());
    for prefiller in [None, Some(r.p.api_addr())] {
        let mut req = post("/v1/completions", prefiller, BODY);
        req.headers_mut()
            .insert("x-data-parallel-host-port", named.parse().unwrap());
        let (resp, body) = call(r.ports[0], req).await;
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    }
    assert_eq!(r.received().await, [0, 2]);
    for rec in sim_requests(&r.d[1])
        .await
        .iter()
        .chain(&sim_requests(&r.p).await)
    {
        assert_eq!(
            record_header(rec, "x-data-parallel-host-port"),
            None,
            "{rec}"
        );
    }
    assert_eq!(
        metric(
            &r.metrics,
            r#"llm_d_sidecar_data_parallel_requests_total{rank="1",via="header"}"#
        ),
        2
    );
}

#[tokio::test]
async fn an_unknown_rank_is_a_vllm_shaped_400_and_nothing_is_sent() {
    let r = Ranks::start().await;
    let free = crate::support::dead_addr().await.port();
    for value in [
        format!("127.0.0.1:{free}"),
        // The right port on another pod.
        format!("10.9.9.9:{}", r.ports[1].port()),
        "not an address".to_string(),
    ] {
        let mut req = post("/v1/completions", Some(r.p.api_addr()), BODY);
        req.headers_mut()
            .insert("x-data-parallel-host-port", value.parse().unwrap());
        let (resp, body) = call(r.ports[0], req).await;
        assert_eq!(resp.status(), 400, "{value}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/json",
            "{value}"
        );
        let err = json(&body);
        assert_eq!(err["error"]["param"], "x-data-parallel-host-port", "{err}");
        assert_eq!(err["error"]["code"], 400, "{err}");
        assert!(
            err["error"]["message"].as_str().unwrap().contains(&value),
            "{err}"
        );
    }
    assert_eq!(r.received().await, [0, 0]);
    assert!(sim_requests(&r.p).await.is_empty());
    // It keeps serving.
    let (resp, _) = call(r.ports[1], post("/v1/completions", None, BODY)).await;
    assert_eq!(resp.status(), 200);
}
