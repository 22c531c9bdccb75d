//! Chaos mode's client disconnects on raw sockets, at the phases hyper's client cannot stop
//! at: part of the head, part of the body, the whole request with no answer yet (spread over
//! the prefill, the decode admission and the decode), the response head, k stream events.
//! Each closes with a FIN or, at random, a reset.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::mix::{self, Kind, Plan};
use crate::outcome::{self, Got};
use crate::Opts;

pub async fn send(o: &Opts, i: u64, p: &mut Plan) -> Got {
    match run(o, i, p).await {
        Ok(got) => got,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Got::Broken(format!("connect: {e}"))
        }
        Err(e) if outcome::is_close(&e) => Got::Closed(e.to_string()),
        Err(e) => Got::Broken(e.to_string()),
    }
}

async fn run(o: &Opts, i: u64, p: &mut Plan) -> std::io::Result<Got> {
    let rng = &mut p.rng;
    let stream = match p.kind {
        Kind::RawAfterHead | Kind::RawMidStream => true,
        _ => rng.coin(),
    };
    // The simulators' prefill (and KV transfer) time for this request, so that the client's
    // departure lands at every point of it.
    let ttft = rng.range(2, 40);
    let (path, body) = if stream {
        ("/v1/chat/completions", mix::stream_body(i, 64))
    } else {
        ("/v1/completions", mix::completion_body(i))
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
         x-prefiller-host-port: {}\r\nx-request-id: soak-{i}\r\nx-sim-ttft-ms: {ttft}\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        o.addr,
        o.prefiller,
        body.len()
    );
    let head = head.as_bytes();
    let reset = rng.coin();
    let mut s = TcpStream::connect(&o.addr).await?;
    s.set_nodelay(true)?;
    match p.kind {
        Kind::RawHead => {
            let cut = rng.range(1, head.len() as u64 - 1) as usize;
            s.write_all(&head[..cut]).await?;
            pause(rng.below(3000)).await;
            Ok(leave(s, reset))
        }
        Kind::RawBody => {
            let cut = rng.below(body.len() as u64) as usize;
            s.write_all(head).await?;
            s.write_all(&body[..cut]).await?;
            pause(rng.below(3000)).await;
            if rng.coin() {
                return Ok(leave(s, reset));
            }
            // Half-close and wait: the sidecar may answer 400 or close.
            s.shutdown().await?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await?;
            Ok(parse(&raw))
        }
        Kind::RawAfterRequest => {
            s.write_all(head).await?;
            s.write_all(&body).await?;
            pause(rng.below((2 * ttft + 6) * 1000)).await;
            Ok(leave(s, reset))
        }
        _ => {
            s.write_all(head).await?;
            s.write_all(&body).await?;
            let events = match p.kind {
                Kind::RawMidStream => rng.range(1, 16) as usize,
                _ => 0,
            };
            let mut raw = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    // Over before we left: judge what came.
                    return Ok(parse(&raw));
                }
                raw.extend_from_slice(&buf[..n]);
                let Some(end) = find(&raw, b"\r\n\r\n") else {
                    continue;
                };
                if status(&raw) != Some(200) {
                    // Not the stream we meant to leave: read it whole (connection: close).
                    s.read_to_end(&mut raw).await?;
                    return Ok(parse(&raw));
                }
                if count(&raw[end..], b"data: ") >= events {
                    return Ok(leave(s, reset));
                }
            }
        }
    }
}

async fn pause(micros: u64) {
    if micros > 0 {
        tokio::time::sleep(Duration::from_micros(micros)).await;
    }
}

/// Closes the socket: a FIN, or with `reset` an RST (SO_LINGER 0).
fn leave(s: TcpStream, reset: bool) -> Got {
    if reset {
        let _ = s.set_zero_linger();
    }
    drop(s);
    Got::Left
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + needle.len())
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

fn status(raw: &[u8]) -> Option<u16> {
    let line = raw.split(|b| *b == b'\n').next()?;
    let code = line.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// A response read to the connection's end. Cut short is a close; a head that is not
/// HTTP/1.1 is broken.
fn parse(raw: &[u8]) -> Got {
    let Some(end) = find(raw, b"\r\n\r\n") else {
        return Got::Closed(format!("closed after {} bytes of the head", raw.len()));
    };
    let Some(code) = status(raw).and_then(|c| StatusCode::from_u16(c).ok()) else {
        return Got::Broken(format!(
            "bad status line: {}",
            String::from_utf8_lossy(&raw[..end.min(80)])
        ));
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let rest = &raw[end..];
    let body = if head.contains("\r\ntransfer-encoding: chunked") {
        match dechunk(rest) {
            Some(b) => b,
            None => return Got::Closed("closed mid-body (chunked)".into()),
        }
    } else if let Some(len) = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        if rest.len() < len {
            return Got::Closed(format!("closed after {} of {len} body bytes", rest.len()));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Got::Answer {
        status: code,
        body: Bytes::from(body),
    }
}

/// A chunked body's data, or `None` if it ends before the last chunk.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line = find(rest, b"\r\n")?;
        let size = std::str::from_utf8(&rest[..line - 2]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}
