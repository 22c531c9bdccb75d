//! A raw HTTP/1.1 upstream that records each request's bytes exactly as they arrived and
//! answers with a canned response: for assertions about what went over the wire. `GET
//! /health` (the sidecar's readiness check of vLLM) is answered 200 and not recorded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// One recorded request: its head (request line and headers) and body bytes.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub head: String,
    pub body: Vec<u8>,
}

impl Recorded {
    /// The value of header `name` (case-insensitive), if present once or more (first value).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// The recording server.
pub struct Recorder {
    pub addr: SocketAddr,
    pub requests: mpsc::UnboundedReceiver<Recorded>,
    seen: Arc<Mutex<usize>>,
    task: JoinHandle<()>,
}

impl Recorder {
    /// Serves `response` (raw bytes, a complete HTTP/1.1 response) to every request.
    pub async fn start(response: &'static [u8]) -> Recorder {
        Self::start_with(&[response], false).await
    }

    /// Serves `responses` in turn, one per request (the last one again after the end).
    pub async fn start_sequence(responses: &[&'static [u8]]) -> Recorder {
        Self::start_with(responses, false).await
    }

    /// Like `start`, but closes each connection right after its response without announcing
    /// it (no `Connection: close`), as a server closing an idle keep-alive connection does.
    pub async fn start_closing(response: &'static [u8]) -> Recorder {
        Self::start_with(&[response], true).await
    }

    async fn start_with(responses: &[&'static [u8]], close_after: bool) -> Recorder {
        let responses: Arc<[&'static [u8]]> = responses.into();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = mpsc::unbounded_channel();
        let seen = Arc::new(Mutex::new(0));
        let counter = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let tx = tx.clone();
                let counter = counter.clone();
                let responses = Arc::clone(&responses);
                tokio::spawn(async move {
                    while let Some(rec) = read_request(&mut sock).await {
                        // The sidecar's readiness check, answered as vLLM does and not
                        // recorded: tests see only the requests the sidecar relays.
                        if rec.head.starts_with("GET /health ") {
                            if sock.write_all(HEALTHY).await.is_err() || close_after {
                                return;
                            }
                            continue;
                        }
                        let response = {
                            let mut seen = counter.lock().expect("lock");
                            *seen += 1;
                            responses[(*seen - 1).min(responses.len() - 1)]
                        };
                        let _ = tx.send(rec);
                        if sock.write_all(response).await.is_err() || close_after {
                            return;
                        }
                    }
                });
            }
        });
        Recorder {
            addr,
            requests: rx,
            seen,
            task,
        }
    }

    /// The next recorded request.
    pub async fn next(&mut self) -> Recorded {
        tokio::time::timeout(super::LIMIT, self.requests.recv())
            .await
            .expect("a request in time")
            .expect("recorder running")
    }

    /// How many requests arrived so far.
    pub fn count(&self) -> usize {
        *self.seen.lock().expect("lock")
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// vLLM's answer to `GET /health`.
const HEALTHY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

/// Reads one request with a Content-Length or chunked body; None at EOF.
async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Recorded> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut rest = buf[head_end..].to_vec();
    let rec = Recorded {
        head,
        body: Vec::new(),
    };
    let len = rec
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok());
    let chunked = rec
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let body = if let Some(len) = len {
        while rest.len() < len {
            let mut chunk = [0u8; 8192];
            let n = sock.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        rest[..len].to_vec()
    } else if chunked {
        while find(&rest, b"0\r\n\r\n").is_none() {
            let mut chunk = [0u8; 8192];
            let n = sock.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        dechunk(&rest)
    } else {
        Vec::new()
    };
    Some(Recorded { body, ..rec })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = find(data, b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..i]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[i + 2..i + 2 + size]);
        data = &data[i + 2 + size + 2..];
    }
    out
}
