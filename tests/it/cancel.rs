//! A client that leaves cancels whatever leg is in flight at once, and the prefiller's KV
//! blocks are released promptly on every cancellation and failure path, not at lease expiry.

use std::time::{Duration, Instant};

use crate::support::*;
use sidecar::Connector;

/// How fast a leg must be closed after the client leaves (the issue's bound).
const CLOSE_BOUND: Duration = Duration::from_millis(100);
/// Leases in these tests last a minute: anything released sooner was released on purpose.
const LONG_LEASE: &str = r#"{"kv_lease_duration_ms":60000,"abort_request_timeout_ms":60000}"#;

#[tokio::test]
async fn leaving_during_prefill_closes_the_prefill_and_never_calls_the_decoder() {
    let p = sim(|c| c.ttft_ms = 60_000).await;
    let d = sim(|_| {}).await;
    let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
    let client = send_pd(
        sidecar.addr,
        &p,
        r#"{"prompt":"long prompt","max_tokens":4}"#,
    )
    .await;
    assert!(sim_wait(&p, "busy", LIMIT).await, "the prefill started");

    let closed_after = leave_and_wait_idle(client, &p).await;
    assert!(
        closed_after < CLOSE_BOUND,
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

/// A client that leaves just as its prefill finishes: the prefiller has pinned blocks and its
/// reply is on the wire. The sidecar reads that late reply and hands the blocks to a decoder to
/// release, instead of stranding them. The delays (0 to 10 ms against a 4 ms prefill) only
/// spread the disconnects over the prefill's end, the race this covers; the assertions wait
/// on the simulator's state and check that the race happened.
#[tokio::test]
async fn clients_leaving_as_the_prefill_finishes_strand_no_blocks() {
    let p = sim(|c| c.ttft_ms = 4).await;
    let d = sim(|_| {}).await;
    sim_config(&p, LONG_LEASE).await;
    let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
    let mut clients = Vec::new();
    for i in 0..200u64 {
        let addr = sidecar.addr;
        let prefiller = p.api_addr();
        clients.push(tokio::spawn(async move {
            let client = send(
                addr,
                post(
                    "/v1/completions",
                    Some(prefiller),
                    r#"{"prompt":"p","max_tokens":2}"#,
                ),
            )
            .await;
            tokio::time::sleep(Duration::from_micros(i * 50)).await;
            drop(client);
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    assert!(sim_wait(&p, "idle", LIMIT).await);
    assert!(
        sim_wait(&p, "no_leases", Duration::from_secs(3)).await,
        "stranded leases: {}",
        sim_state(&p).await["kv"]
    );
    // The race happened: prefills pinned blocks for clients that were leaving (a prefill
    // whose client left gets LATE_REPLY_GRACE to finish, so none is aborted at 4 ms), and
    // every lease was released by a decode that reached the decoder, none left to expire.
    let state = sim_state(&p).await;
    let created = counter(&state, "leases_created");
    assert!(created > 0, "every client left before its prefill: {state}");
    assert_eq!(
        counter(&state, "leases_pulled") + counter(&state, "leases_released_by_notify"),
        created,
        "{state}"
    );
    assert_eq!(counter(&sim_state(&d).await, "requests_total"), created);
}
