//! Prefiller choice and prefill retries (-enable-prefiller-sampling, -prefill-max-retries):
//! which prefiller each attempt went to, counted on the simulators themselves.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;
use sidecar::observe::metrics::Metrics;

fn retries(metrics: &Metrics, reason: &str) -> u64 {
    metric(
        metrics,
        &format!("llm_d_sidecar_prefill_retries_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test]
async fn a_503_prefill_is_retried_on_the_next_prefiller() {
    let p1 = sim(|_| {}).await;
    sim_config(&p1, r#"{"faults":["prefill_http_503"]}"#).await;
    let p2 = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = sidecar_configured(d.api_addr(), fast_retries(1)).await;
    let (resp, body) = call_naming(
        sidecar.addr,
        &format!("{},{}", p1.api_addr(), p2.api_addr()),
    )
    .await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!((prefills(&p1).await, prefills(&p2).await), (1, 1));
    // The decode pulled the blocks of the prefiller that answered.
    assert_eq!(counter(&sim_state(&p2).await, "leases_pulled"), 1);
    assert_eq!(retries(&metrics, "http_503"), 1);
}

#[tokio::test]
async fn retries_stop_at_the_limit_and_the_last_failure_is_answered() {
    let p = sim(|_| {}).await;
    sim_config(&p, r#"{"faults":["prefill_http_502"]}"#).await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = sidecar_configured(d.api_addr(), fast_retries(2)).await;
    let (resp, body) = call_naming(sidecar.addr, &p.api_addr().to_string()).await;
    assert_eq!(resp.status(), 502, "{}", String::from_utf8_lossy(&body));
    // One prefiller in the list: every attempt goes to it.
    assert_eq!(prefills(&p).await, 3);
    assert_eq!(retries(&metrics, "http_502"), 2);
    assert_eq!(counter(&sim_state(&d).await, "requests_total"), 0);
}

#[tokio::test]
async fn without_retries_a_failed_prefill_is_sent_once() {
    let p = sim(|_| {}).await;
    sim_config(&p, r#"{"faults":["prefill_http_503"]}"#).await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = sidecar_configured(d.api_addr(), |_| {}).await;
    let (resp, _) = call_naming(sidecar.addr, &p.api_addr().to_string()).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(prefills(&p).await, 1);
    assert_eq!(retries(&metrics, "http_503"), 0);
}

#[tokio::test]
async fn what_may_have_pinned_blocks_is_not_retried() {
    // A 500 may come after vLLM allocated blocks; a 4xx is the client's own answer.
    for fault in ["prefill_http_500", "prefill_http_400"] {
        let p1 = sim(|_| {}).await;
        sim_config(&p1, &format!(r#"{{"faults":["{fault}"]}}"#)).await;
        let p2 = sim(|_| {}).await;
        let d = sim(|_| {}).await;
        let (sidecar, _) = sidecar_configured(d.api_addr(), fast_retries(3)).await;
        let (resp, _) = call_naming(
            sidecar.addr,
            &format!("{},{}", p1.api_addr(), p2.api_addr()),
        )
        .await;
        assert!(resp.status().is_client_error() || resp.status().is_server_error());
        assert_eq!(
            (prefills(&p1).await, prefills(&p2).await),
            (1, 0),
            "{fault}"
        );
    }
}

#[tokio::test]
async fn a_prefiller_that_refuses_connections_is_skipped() {
    let dead = dead_addr().await;
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = sidecar_configured(d.api_addr(), fast_retries(1)).await;
    let (resp, body) = call_naming(sidecar.addr, &format!("{dead}, {}", p.api_addr())).await;
    assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(prefills(&p).await, 1);
    assert_eq!(retries(&metrics, "connect"), 1);
}

#[tokio::test]
async fn no_retry_is_sent_once_the_client_left() {
    let p1 = sim(|_| {}).await;
    sim_config(&p1, r#"{"faults":["prefill_http_503"]}"#).await;
    let p2 = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = sidecar_configured(d.api_addr(), |c| {
        c.prefill_retry.max_retries = 1;
        c.prefill_retry.backoff = Duration::from_millis(300);
    })
    .await;
    let header = format!("{},{}", p1.api_addr(), p2.api_addr());
    let client = send(sidecar.addr, naming(&header, r#"{"prompt":"a"}"#)).await;
    // The first attempt failed and its retry is waiting out the backoff: the client leaves.
    for _ in 0..200 {
        if retries(&metrics, "http_503") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(retries(&metrics, "http_503"), 1, "the retry was scheduled");
    drop(client);
    // Absence can only be seen by waiting past the latest the retry would have gone out
    // (the backoff is at most 1.5 x 300 ms).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        prefills(&p2).await,
        0,
        "a retry went out after the client left"
    );
    assert_eq!(prefills(&p1).await, 1);
}

#[tokio::test]
async fn sampling_spreads_prefills_over_the_list() {
    let p1 = sim(|_| {}).await;
    let p2 = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let header = format!("{},{}", p1.api_addr(), p2.api_addr());
    let (plain, _) = sidecar_configured(d.api_addr(), |_| {}).await;
    for _ in 0..10 {
        assert_eq!(call_naming(plain.addr, &header).await.0.status(), 200);
    }
    assert_eq!(
        (prefills(&p1).await, prefills(&p2).await),
        (10, 0),
        "first entry by default"
    );
    let (sampled, _) = sidecar_configured(d.api_addr(), |c| c.prefiller_sampling = true).await;
    for _ in 0..40 {
        assert_eq!(call_naming(sampled.addr, &header).await.0.status(), 200);
    }
    // Uniform: all 40 on one prefiller has probability 2^-39.
    let (a, b) = (prefills(&p1).await - 10, prefills(&p2).await);
    assert_eq!(a + b, 40);
    assert!(a > 0 && b > 0, "{a} / {b}");
}

#[tokio::test]
async fn no_retry_goes_out_in_the_late_reply_grace_either() {
    // The client leaves during the first attempt; its 503 comes back within the grace the
    // sidecar gives an abandoned prefill, and the retry would go out inside it too.
    let p1 = sim(|_| {}).await;
    sim_config(&p1, r#"{"faults":["stall_ms:30","prefill_http_503"]}"#).await;
    let p2 = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = sidecar_configured(d.api_addr(), |c| {
        c.prefill_retry.max_retries = 1;
        c.prefill_retry.backoff = Duration::from_millis(1);
    })
    .await;
    let header = format!("{},{}", p1.api_addr(), p2.api_addr());
    let client = send(sidecar.addr, naming(&header, r#"{"prompt":"a"}"#)).await;
    assert!(sim_wait(&p1, "busy", LIMIT).await);
    drop(client);
    assert!(sim_wait(&p1, "idle", LIMIT).await);
    // Long past the retry's 1 ms backoff: anything the sidecar would send has been sent.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        prefills(&p2).await,
        0,
        "a retry went out after the client left"
    );
    assert_eq!(retries(&metrics, "http_503"), 0);
}

#[tokio::test]
async fn a_retry_waiting_out_its_backoff_is_not_sent_once_the_client_left() {
    // The backoff (15-45 ms) ends inside the grace (-prefill-abandon-grace, 500 ms) the sidecar
    // gives a prefill whose client left: the retry must check for that itself.
    let p1 = sim(|_| {}).await;
    sim_config(&p1, r#"{"faults":["prefill_http_503"]}"#).await;
    let p2 = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let (sidecar, metrics) = sidecar_configured(d.api_addr(), |c| {
        c.prefill_retry.max_retries = 1;
        c.prefill_retry.backoff = Duration::from_millis(30);
    })
    .await;
    let header = format!("{},{}", p1.api_addr(), p2.api_addr());
    let client = send(sidecar.addr, naming(&header, r#"{"prompt":"a"}"#)).await;
    for _ in 0..2000 {
        if retries(&metrics, "http_503") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(retries(&metrics, "http_503"), 1, "the retry was scheduled");
    drop(client);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        prefills(&p2).await,
        0,
        "a retry went out after the client left"
    );
}

#[tokio::test]
async fn a_malformed_entry_counts_only_if_picked() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    let (sidecar, _) = sidecar_configured(d.api_addr(), fast_retries(2)).await;
    let (resp, _) = call_naming(sidecar.addr, &format!("{}, bad:port", p.api_addr())).await;
    assert_eq!(
        resp.status(),
        200,
        "as pd-sidecar: only the picked entry is parsed"
    );
    let (resp, body) = call_naming(sidecar.addr, &format!("bad:port, {}", p.api_addr())).await;
    assert_eq!(resp.status(), 400);
    assert!(String::from_utf8_lossy(&body).contains("bad:port"));
    assert_eq!(prefills(&p).await, 1);
}

#[tokio::test]
async fn after_a_retry_errors_name_the_prefiller_that_answered() {
    let p1 = sim(|_| {}).await;
    sim_config(&p1, r#"{"faults":["prefill_http_503"]}"#).await;
    let html: &'static [u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 4\r\n\r\nnope";
    let p2 = crate::support::recorder::Recorder::start(html).await;
    let d = sim(|_| {}).await;
    let (sidecar, _) = sidecar_configured(d.api_addr(), fast_retries(1)).await;
    let (resp, body) = call_naming(sidecar.addr, &format!("{},{}", p1.api_addr(), p2.addr)).await;
    assert_eq!(resp.status(), 502);
    let message = json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains(&p2.addr.to_string()), "{message}");
}

/// Reads one request (head and Content-Length body) from `sock` into `buf`.
async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                buf.drain(..end + 4 + len);
                return true;
            }
        }
        let mut chunk = [0u8; 4096];
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A client that leaves during its retry backoff must not half-close the connection its
/// failed attempt used: hyper has pooled it, and another request may be on it (a review found
/// exactly that: B got a 502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoning_in_backoff_never_touches_a_pooled_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p_addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let fin_during_b = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(AtomicUsize::new(0));
    {
        let (seen, fin, conns) = (seen.clone(), fin_during_b.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                conns.fetch_add(1, Ordering::SeqCst);
                let (seen, fin) = (seen.clone(), fin.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while read_request(&mut sock, &mut buf).await {
                        let n = seen.fetch_add(1, Ordering::SeqCst);
                        if n == 0 {
                            let body = r#"{"error":{"message":"busy"}}"#;
                            let r = format!("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                            sock.write_all(r.as_bytes()).await.unwrap();
                        } else {
                            // Request B: stall 1.5 s, watching for a FIN.
                            let mut b = [0u8; 16];
                            if let Ok(Ok(0)) =
                                tokio::time::timeout(Duration::from_millis(1500), sock.read(&mut b))
                                    .await
                            {
                                fin.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            let body = r#"{"id":"x","choices":[{"text":""}]}"#;
                            let r = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                            let _ = sock.write_all(r.as_bytes()).await;
                        }
                    }
                });
            }
        });
    }
    let d = sim(|_| {}).await;
    let mut cfg = config(d.api_addr());
    cfg.connector = sidecar::Connector::NixlV2;
    cfg.prefill_retry.max_retries = 1;
    cfg.prefill_retry.backoff = Duration::from_secs(2);
    let sidecar = Sidecar::start(cfg).await;
    // A: gets the 503 and waits out its backoff (1-3 s).
    let a = send(
        sidecar.addr,
        post(
            "/v1/completions",
            Some(p_addr),
            r#"{"prompt":"a","max_tokens":2}"#,
        ),
    )
    .await;
    while seen.load(Ordering::SeqCst) < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A's connection goes back to the pool once the 503 is read: then B may reuse it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // B: reuses that pooled connection.
    let b = tokio::spawn(call(
        sidecar.addr,
        post(
            "/v1/completions",
            Some(p_addr),
            r#"{"prompt":"b","max_tokens":2}"#,
        ),
    ));
    while seen.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "B reused A's pooled prefill connection"
    );
    drop(a); // A's client leaves during its backoff
    let (resp, _) = b.await.unwrap();
    assert_eq!(
        fin_during_b.load(Ordering::SeqCst),
        0,
        "B's prefill connection got A's FIN"
    );
    assert_eq!(resp.status(), 200);
}
