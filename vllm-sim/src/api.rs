//! The vLLM-compatible API listener: routing, `/health`, `/metrics`, `/version`,
//! `/v1/models`, and the `X-Request-Id` response header (§7.3, §1.6).

use super::control;
use super::generate::{self, log_request};
use super::http_util::{bytes_response, empty_response, json_response, not_found, Resp};
use super::state::Shared;
use super::validate::Endpoint;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;
use std::fmt::Write as _;
use std::sync::Arc;

pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Resp, std::io::Error> {
    let incoming_id = req.headers().get("x-request-id").cloned();
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let endpoint = Endpoint::for_path(&path);
    let mut resp = match (&method, endpoint, path.as_str()) {
        (&Method::POST, Some(e), _) => generate::handle(shared.clone(), e, req).await?,
        (_, _, p) if p.starts_with("/sim/") => {
            let query = req.uri().query().unwrap_or("").to_string();
            let raw = collect(req).await?;
            return Ok(control::handle(shared, &method, &path, &query, &raw).await);
        }
        (&Method::GET, _, "/health") => {
            let dead = shared.read(|i| i.faults.dead);
            empty_response(if dead {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            })
        }
        (&Method::GET, _, "/metrics") => metrics(&shared),
        _ => {
            let headers = req.headers().clone();
            let raw = collect(req).await?;
            log_request(&shared, method.as_str(), &path, &headers, &raw);
            match (&method, path.as_str()) {
                (&Method::GET, "/v1/models") => models(&shared),
                (&Method::GET, "/version") => json_response(
                    StatusCode::OK,
                    &json!({"version": concat!("sim-", env!("CARGO_PKG_VERSION"))}),
                ),
                (_, p)
                    if endpoint.is_some()
                        || matches!(p, "/v1/models" | "/version" | "/health" | "/metrics") =>
                {
                    json_response(
                        StatusCode::METHOD_NOT_ALLOWED,
                        &json!({"detail": "Method Not Allowed"}),
                    )
                }
                _ => not_found(),
            }
        }
    };
    let enabled = shared.read(|i| i.cfg.enable_request_id_headers);
    if enabled {
        let v = incoming_id.unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().simple().to_string())
                .unwrap_or(HeaderValue::from_static("0"))
        });
        resp.headers_mut().insert("x-request-id", v);
    }
    Ok(resp)
}

async fn collect(req: Request<Incoming>) -> Result<Bytes, std::io::Error> {
    req.into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e))
}

fn models(shared: &Shared) -> Resp {
    let (names, max_len) = shared.read(|i| (i.cfg.model_names(), i.cfg.max_model_len));
    let created = shared.created_unix;
    let data: Vec<_> = names
        .iter()
        .map(|n| {
            json!({
                "id": n, "object": "model", "created": created, "owned_by": "vllm",
                "root": n, "parent": null, "max_model_len": max_len,
                "permission": [{
                    "id": format!("modelperm-{}", uuid::Uuid::new_v4().simple()),
                    "object": "model_permission", "created": created,
                    "allow_create_engine": false, "allow_sampling": true, "allow_logprobs": true,
                    "allow_search_indices": false, "allow_view": true, "allow_fine_tuning": false,
                    "organization": "*", "group": null, "is_blocking": false,
                }],
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

fn metrics(shared: &Shared) -> Resp {
    let model = shared.read(|i| i.cfg.model_names().into_iter().next().unwrap_or_default());
    let text = shared.read(|i| {
        let (mut running, mut waiting) = (0u64, 0u64);
        for f in i.in_flight.values() {
            if f.queued {
                waiting += 1
            } else {
                running += 1
            }
        }
        let c = &i.counters;
        let total = i.kv.total().max(1) as f64;
        let usage = (i.kv.running_blocks() + i.kv.leased_blocks()) as f64 / total;
        let l = format!("model_name=\"{model}\"");
        let mut s = String::new();
        let mut g = |name: &str, kind: &str, v: String| {
            let _ = writeln!(s, "# TYPE {name} {kind}\n{name}{{{l}}} {v}");
        };
        g("vllm:num_requests_running", "gauge", running.to_string());
        g("vllm:num_requests_waiting", "gauge", waiting.to_string());
        g("vllm:kv_cache_usage_perc", "gauge", format!("{usage}"));
        g(
            "vllm:prompt_tokens_total",
            "counter",
            c.prompt_tokens_total.to_string(),
        );
        g(
            "vllm:generation_tokens_total",
            "counter",
            c.generation_tokens_total.to_string(),
        );
        g(
            "vllm:http_requests_client_disconnected_total",
            "counter",
            c.http_client_disconnected.to_string(),
        );
        g(
            "vllm_sim:kv_leases_active",
            "gauge",
            i.kv.leases_held().to_string(),
        );
        g(
            "vllm_sim:kv_leased_blocks",
            "gauge",
            i.kv.leased_blocks().to_string(),
        );
        let _ = writeln!(s, "# TYPE vllm:request_success_total counter");
        for reason in ["stop", "length", "abort"] {
            let n = c.success_by_reason.get(reason).copied().unwrap_or(0);
            let _ = writeln!(
                s,
                "vllm:request_success_total{{{l},finished_reason=\"{reason}\"}} {n}"
            );
        }
        s
    });
    bytes_response(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        Bytes::from(text),
    )
}
