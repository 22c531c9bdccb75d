//! A client that leaves cancels whatever leg is in flight at once, and the prefiller's KV
//! blocks are released promptly on every cancellation and failure path, not at lease expiry.

use std::time::{Duration, Instant};

use crate::support::*;
use sidecar::Connector;

/// How fast a leg must be closed after the client leaves (the issue's bound).
const CLOSE_BOUND: Duration = Duration::from_millis(100);
/// Leases in these tests last a minute: anything released sooner was released on purpose.
const LONG_LEASE: &str = r#"{"kv_lease_duration_ms":60000,"abort_request_timeout_ms":60000}"#;

/// The abandon grace the prefill tests use: a running prefill is closed this long after its
/// client left (a prefill that finishes in it pins blocks, so it is let finish).
const ABANDON_GRACE: Duration = Duration::from_millis(200);

#[tokio::test]
async fn leaving_during_prefill_closes_the_prefill_and_never_calls_the_decoder() {
    let p = sim(|c| c.ttft_ms = 60_000).await;
    let d = sim(|_| {}).await;
    let mut cfg = config(d.api_addr());
    cfg.prefill_abandon_grace = ABANDON_GRACE;
    let sidecar = Sidecar::start(cfg).await;
    let client = send_pd(
        sidecar.addr,
        &p,
        r#"{"prompt":"long prompt","max_tokens":4}"#,
    )
    .await;
    assert!(sim_wait(&p, "busy", LIMIT).await, "the prefill started");

    let closed_after = leave_and_wait_idle(client, &p).await;
    assert!(
        closed_after >= ABANDON_GRACE && closed_after < ABANDON_GRACE + CLOSE_BOUND,
        "prefill closed {closed_after:?} after the client left"
    );

    let state = sim_state(&p).await;
    assert_eq!(counter(&state, "requests_aborted/prefill"), 1, "{state}");
    assert_eq!(counter(&state, "leases_created"), 0);
    assert_eq!(state["kv"]["free_blocks"], state["kv"]["total_blocks"]);
    assert_eq!(
        counter(&sim_state(&d).await, "requests_total"),
        0,
        "no decode for a client that left"
    );
}

#[tokio::test]
async fn leaving_during_decode_closes_the_decode_and_the_blocks_were_pulled() {
    let p = sim(|_| {}).await;
    let d = sim(|c| c.itl_ms = 60_000).await;
    let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
    let mut client = send_pd(
        sidecar.addr,
        &p,
        r#"{"prompt":"p","max_tokens":5,"stream":true}"#,
    )
    .await;
    assert_eq!(client.head().await.status(), 200);
    let first = client.next_data().await.expect("a first token");
    assert!(first.starts_with(b"data: "));

    let closed_after = leave_and_wait_idle(client, &d).await;
    assert!(
        closed_after < CLOSE_BOUND,
        "decode closed {closed_after:?} after the client left"
    );
    assert_eq!(counter(&sim_state(&d).await, "requests_aborted/decode"), 1);
    assert!(sim_wait(&p, "no_leases", LIMIT).await);
    assert_eq!(counter(&sim_state(&p).await, "leases_pulled"), 1);
}

#[tokio::test]
async fn leaving_before_the_decoder_ran_the_request_releases_the_prefill_blocks() {
    let p = sim(|_| {}).await;
    let d = sim(|_| {}).await;
    sim_config(&p, LONG_LEASE).await;
    // The decoder admits nothing: the decode waits in its queue, as under load.
    sim_config(&d, r#"{"max_num_seqs":0}"#).await;
    let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
    let client = send_pd(sidecar.addr, &p, r#"{"prompt":"p","max_tokens":5}"#).await;
    assert!(sim_wait(&d, "queued", LIMIT).await);
    assert_eq!(sim_state(&p).await["kv"]["leases_held"], 1);

    drop(client);
    assert!(
        sim_wait(&p, "no_leases", Duration::from_secs(2)).await,
        "released long before the 60 s lease"
    );
    let p_state = sim_state(&p).await;
    assert_eq!(
        counter(&p_state, "leases_released_by_notify"),
        1,
        "{p_state}"
    );
    assert_eq!(
        counter(&sim_state(&d).await, "decode_abort_notifies_sent"),
        1
    );
}

/// vLLM cannot free a prefill's blocks without a decoder, so a request that finds the decoder
/// gone after its prefill leaves them to the lease. What the sidecar can do is not repeat it:
/// once the decoder refused a connection, P/D requests check it before prefilling.
#[tokio::test]
async fn a_down_decoder_is_noticed_and_later_requests_pin_no_blocks() {
    let p = sim(|_| {}).await;
    sim_config(
        &p,
        r#"{"kv_lease_duration_ms":300,"abort_request_timeout_ms":300}"#,
    )
    .await;
    let gone = dead_addr().await;
    let sidecar = Sidecar::for_decoder(gone, Connector::NixlV2).await;
    let body = r#"{"prompt":"p","max_tokens":5}"#;

    let (resp, _) = call_pd(sidecar.addr, &p, body).await;
    assert_eq!(resp.status(), 502);
    assert!(sim_wait(&p, "idle_and_no_leases", LIMIT).await);
    assert_eq!(
        counter(&sim_state(&p).await, "leases_expired"),
        1,
        "freed by the lease only"
    );

    for _ in 0..3 {
        let (resp, bytes) = call_pd(sidecar.addr, &p, body).await;
        assert_eq!(resp.status(), 502);
        assert!(String::from_utf8_lossy(&bytes).contains("no prefill was sent"));
    }
    let state = sim_state(&p).await;
    assert_eq!(
        counter(&state, "requests_total"),
        1,
        "no prefill while the decoder is down"
    );

    // The decoder comes back on its port: P/D resumes.
    let d = sim(|c| c.port = gone.port()).await;
    let (resp, _) = call_pd(sidecar.addr, &p, body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(counter(&sim_state(&d).await, "decode_completed"), 1);
}

#[tokio::test]
async fn leaving_during_a_non_streaming_decode_closes_it() {
    let p = sim(|_| {}).await;
    let d = sim(|c| c.itl_ms = 60_000).await;
    // A JSON decode shows no sign of admission until it is done, so an abandoned one stays
    // open for the admission grace; the bound below is on top of a short grace.
    let mut config = config(d.api_addr());
    config.decode_admission_grace = Duration::from_millis(20);
    let sidecar = Sidecar::start(config).await;
    let client = send(
        sidecar.addr,
        post(
            "/v1/chat/completions",
            Some(p.api_addr()),
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
        ),
    )
    .await;
    assert!(sim_wait(&d, "busy", LIMIT).await);
    let left = Instant::now();
    leave_and_wait_idle(client, &d).await;
    assert!(
        left.elapsed() < CLOSE_BOUND,
        "decode closed {:?} after the client left",
        left.elapsed()
    );
    assert_eq!(counter(&sim_state(&d).await, "requests_aborted/decode"), 1);
    assert!(sim_wait(&p, "no_leases", LIMIT).await);
}

/// A prefill request still being written when its client leaves cannot have started on the
/// prefiller: it is closed at once, without the grace.
#[tokio::test]
async fn a_prefill_still_being_sent_is_closed_at_once() {
    use tokio::io::AsyncReadExt;
    // A prefiller that accepts and reads nothing, so a large request stays unsent.
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p_addr = stalled.local_addr().unwrap();
    let d = sim(|_| {}).await;
    let mut cfg = config(d.api_addr());
    cfg.prefill_abandon_grace = Duration::from_secs(30);
    let app = sidecar::App::build(cfg).await.unwrap();
    let metrics = app.metrics().clone();
    let sidecar = Sidecar::serve(app).await;
    let body = format!(r#"{{"prompt":"{}"}}"#, "a ".repeat(8 << 20));
    let client = send(sidecar.addr, post("/v1/completions", Some(p_addr), &body)).await;
    let (mut conn, _) = tokio::time::timeout(LIMIT, stalled.accept())
        .await
        .unwrap()
        .unwrap();
    // The sidecar is writing: its socket buffers fill and the rest waits.
    let mut first = [0u8; 1024];
    conn.read_exact(&mut first).await.unwrap();
    let left = std::time::Instant::now();
    drop(client);
    // Read on only once the sidecar has seen the client go (reading lets the write go on).
    let cancelled = r#"llm_d_sidecar_cancellations_total{route="pd",phase="prefill"} 1"#;
    for _ in 0..1000 {
        if metrics.render().contains(cancelled) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(metrics.render().contains(cancelled));
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LIMIT, conn.read_to_end(&mut rest))
        .await
        .expect("the prefill connection was closed");
    assert!(rest.len() + 1024 < body.len(), "the whole request was sent");
    assert!(
        left.elapsed() < Duration::from_secs(5),
        "closed {:?} after the client left: the 30 s grace applied",
        left.elapsed()
    );
}

/// A property over the moment the client leaves, swept across the whole prefill (1,000
/// clients): a prefill vLLM received may finish within -prefill-abandon-grace, and one that
/// finishes is followed by a decode, so no lease is left held (leases last 60 s here, so a
/// stranded one shows). Before the grace and the half-close, 5 of 340 leases were stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lease_is_stranded_whenever_the_client_leaves() {
    let p = sim(|c| c.ttft_ms = 80).await;
    sim_config(&p, LONG_LEASE).await;
    let d = sim(|_| {}).await;
    let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
    let seed = 0x5eed_u64;
    let mut rng = fastrand::Rng::with_seed(seed);
    const ROUNDS: usize = 25;
    const CLIENTS: usize = 40;
    for _ in 0..ROUNDS {
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            // 0 to 130 ms: before, around and after the 80 ms prefill and the 50 ms grace.
            let leave_after = Duration::from_micros(rng.u64(0..130_000));
            let addr = sidecar.addr;
            let p_addr = p.api_addr();
            clients.push(tokio::spawn(async move {
                let client = send(
                    addr,
                    post(
                        "/v1/completions",
                        Some(p_addr),
                        r#"{"prompt":"a b","max_tokens":2}"#,
                    ),
                )
                .await;
                tokio::time::sleep(leave_after).await;
                drop(client);
            }));
        }
        for c in clients {
            c.await.unwrap();
        }
    }
    let released = sim_wait(&p, "no_leases", Duration::from_secs(5)).await;
    let state = sim_state(&p).await;
    assert!(
        released,
        "leases stranded (seed {seed:#x}): {} held of {} created; {}",
        state["kv"]["leases_held"],
        counter(&state, "leases_created"),
        state["counters"]
    );
    // Prefills pinned blocks for clients that were leaving, and every lease was released by a
    // decode that reached the decoder: none was left to expire.
    let created = counter(&state, "leases_created");
    assert!(created > 0, "{state}");
    assert_eq!(
        counter(&state, "leases_pulled") + counter(&state, "leases_released_by_notify"),
        created,
        "{state}"
    );
}
