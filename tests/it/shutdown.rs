//! SIGTERM/SIGINT: stop accepting, let in-flight streams finish within the drain timeout.

use std::time::Duration;

use crate::support::*;
use sidecar::{Config, Connector};

#[tokio::test]
async fn in_flight_streams_finish_and_new_connections_are_refused() {
    let p = sim(|_| {}).await;
    let d = sim(|c| c.itl_ms = 30).await;
    let mut sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
    let body = r#"{"prompt":"x","max_tokens":10,"stream":true}"#;
    let mut client = send(
        sidecar.addr,
        post("/v1/completions", Some(p.api_addr()), body),
    )
    .await;
    let mut received = client.next_data().await.expect("first event").to_vec();

    let server = sidecar.begin_shutdown();
    while let Some(data) = client.next_data().await {
        received.extend_from_slice(&data);
    }
    let text = String::from_utf8(received).unwrap();
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "the stream finished: {text}"
    );
    let result = tokio::time::timeout(LIMIT, server)
        .await
        .expect("exits after draining");
    assert!(result.expect("join").is_ok());
    assert!(
        tokio::net::TcpStream::connect(sidecar.addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn the_drain_timeout_bounds_shutdown() {
    let p = sim(|_| {}).await;
    let d = sim(|c| c.itl_ms = 60_000).await;
    let mut config = Config::new(&d.api_addr().to_string(), Connector::NixlV2).unwrap();
    config.drain_timeout = Duration::from_millis(200);
    let mut sidecar = Sidecar::start(config).await;
    let body = r#"{"prompt":"x","max_tokens":10,"stream":true}"#;
    let mut client = send(
        sidecar.addr,
        post("/v1/completions", Some(p.api_addr()), body),
    )
    .await;
    client.next_data().await.expect("first event");
    let server = sidecar.begin_shutdown();
    let result = tokio::time::timeout(LIMIT, server)
        .await
        .expect("exits at the drain timeout");
    assert!(result.expect("join").is_ok());
}
