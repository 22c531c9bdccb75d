//! SIGTERM/SIGINT: stop accepting, let in-flight streams finish within the drain timeout.

use std::time::Duration;

use crate::support::*;
use sidecar::Connector;

#[tokio::test]
async fn in_flight_streams_finish_and_new_connections_are_refused() {
    let p = sim(|_| {}).await;
    // Ten events 50 ms apart: the stream is still draining while new connections are tried.
    let d = sim(|c| c.itl_ms = 50).await;
    let mut sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
    let body = r#"{"prompt":"x","max_tokens":10,"stream":true}"#;
    let mut client = send_pd(sidecar.addr, &p, body).await;
    let mut received = client.next_data().await.expect("first event").to_vec();

    let addr = sidecar.addr;
    let mut server = std::pin::pin!(sidecar.begin_shutdown());
    // The listener closes as soon as the accept loop sees the signal: connect until refused.
    // A connection the kernel accepted before that is fine; one accepted for ever is the bug.
    let refused = async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(LIMIT, refused)
        .await
        .expect("new connections are refused during the drain");
    assert!(
        futures_poll_once(&mut server).await.is_none(),
        "the server waits for the stream"
    );
    let mut events = 0;
    while let Some(data) = client.next_data().await {
        received.extend_from_slice(&data);
        events += 1;
    }
    assert!(events > 0, "the stream was still running after the refusal");
    let text = String::from_utf8(received).unwrap();
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "the stream finished: {text}"
    );
    let result = tokio::time::timeout(LIMIT, server)
        .await
        .expect("exits after draining");
    assert!(result.expect("join").is_ok());
}

/// Polls `fut` once: `Some` if it is already done.
async fn futures_poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *fut).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test]
async fn the_drain_timeout_bounds_shutdown() {
    let p = sim(|_| {}).await;
    let d = sim(|c| c.itl_ms = 60_000).await;
    let mut config = config(d.api_addr());
    config.drain_timeout = Duration::from_millis(200);
    let mut sidecar = Sidecar::start(config).await;
    let body = r#"{"prompt":"x","max_tokens":10,"stream":true}"#;
    let mut client = send_pd(sidecar.addr, &p, body).await;
    client.next_data().await.expect("first event");
    let started = std::time::Instant::now();
    let server = sidecar.begin_shutdown();
    let result = tokio::time::timeout(LIMIT, server)
        .await
        .expect("exits at the drain timeout");
    let took = started.elapsed();
    assert!(result.expect("join").is_ok());
    // It waited for the drain, and not much longer: the stream itself would take a minute
    // per event. The upper margin is for a loaded CI machine.
    assert!(
        took >= Duration::from_millis(190),
        "shut down after {took:?}"
    );
    assert!(took < Duration::from_secs(2), "shut down after {took:?}");
    // The stream was cut, not finished.
    let mut rest = Vec::new();
    while let Ok(Some(data)) = client.try_next_data().await {
        rest.extend_from_slice(&data);
    }
    assert!(
        !String::from_utf8_lossy(&rest).contains("[DONE]"),
        "the stream was cut at the drain timeout"
    );
}
