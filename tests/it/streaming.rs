//! Each SSE event the decoder writes reaches the client when it is written, not later.

use crate::support::recorder::Recorder;
use crate::support::*;
use sidecar::Connector;

#[tokio::test]
async fn each_event_reaches_the_client_before_the_next_is_written() {
    let p = sim(|_| {}).await;
    // The second token comes a minute after the first: a buffering proxy would hold the first.
    let d = sim(|c| c.itl_ms = 60_000).await;
    let sidecar = Sidecar::for_decoder(d.api_addr(), Connector::NixlV2).await;
    let body = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stream":true}"#;
    let mut client = send(
        sidecar.addr,
        post("/v1/chat/completions", Some(p.api_addr()), body),
    )
    .await;
    assert_eq!(client.head().await.status(), 200);
    let mut received = Vec::new();
    // The role chunk and token 0 come at once; both must arrive while token 1 is a minute away.
    while count_events(&received) < 2 {
        let data = client.next_data().await.expect("stream still open");
        received.extend_from_slice(&data);
    }
    let text = String::from_utf8(received).unwrap();
    assert!(text.contains(r#""role":"assistant""#), "{text}");
    assert!(text.contains(" t0"), "{text}");
    assert!(!text.contains("[DONE]"));
}

#[tokio::test]
async fn the_stream_is_relayed_event_for_event() {
    let Pd { p, d, sidecar } = Pd::start(Connector::NixlV2).await;
    let body = r#"{"prompt":"a b c","max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}"#;
    let (resp, bytes) = call_pd(sidecar.addr, &p, body).await;
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    // 8 token events, the usage event, [DONE]; each `data: <json>`.
    assert_eq!(events.len(), 10, "{text}");
    for e in &events[..9] {
        let v = json(e.strip_prefix("data: ").expect("data line").as_bytes());
        assert_eq!(v["object"], "text_completion");
    }
    assert_eq!(events[9], "data: [DONE]");
    let record = &sim_requests(&d).await[0];
    assert_eq!(record["events_sent"], 10, "{record}");
}

/// Events the decoder wrote in one burst leave the sidecar in one write (one HTTP chunk), not
/// one chunk per event: a chunk per event is a syscall per event here and in the client.
#[tokio::test]
async fn a_burst_of_events_is_relayed_in_few_chunks() {
    const EVENTS: usize = 32;
    let mut response = String::from(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    let mut expected = String::new();
    for i in 0..EVENTS {
        let event = format!("data: {{\"choices\":[{{\"text\":\" t{i}\"}}]}}\n\n");
        response.push_str(&format!("{:x}\r\n{event}\r\n", event.len()));
        expected.push_str(&event);
    }
    response.push_str("0\r\n\r\n");
    // The recorder writes the whole response at once.
    let d = Recorder::start(response.leak().as_bytes()).await;
    let sidecar = Sidecar::for_decoder(d.addr, Connector::NixlV2).await;
    let mut client = send(
        sidecar.addr,
        post("/v1/completions", None, r#"{"prompt":"a","stream":true}"#),
    )
    .await;
    assert_eq!(client.head().await.status(), 200);
    // Each chunk the sidecar writes reaches this client as at least one frame.
    let (mut frames, mut received) = (0, Vec::new());
    while let Some(data) = client.next_data().await {
        frames += 1;
        received.extend_from_slice(&data);
    }
    assert_eq!(String::from_utf8(received).unwrap(), expected);
    assert!(frames <= 4, "{EVENTS} events came in {frames} chunks");
}

fn count_events(bytes: &[u8]) -> usize {
    bytes.windows(2).filter(|w| w == b"\n\n").count()
}
