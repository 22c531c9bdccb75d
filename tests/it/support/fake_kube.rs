//! A fake Kubernetes API server on loopback: serves list and watch for one collection per
//! path, with the test pushing ADDED / MODIFIED / DELETED events into open watches.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// One watched collection: its objects and a channel of events for open watches.
struct Collection {
    kind: &'static str,
    objects: Vec<Value>,
    events: broadcast::Sender<(String, Value)>,
}

/// The fake API server.
pub struct FakeKube {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

struct State {
    collections: HashMap<String, Collection>,
    version: u64,
}

impl FakeKube {
    /// Serves `collections`: `(path, list kind, initial objects)`.
    pub async fn start(collections: Vec<(&str, &'static str, Vec<Value>)>) -> FakeKube {
        let mut state = State {
            collections: HashMap::new(),
            version: 1,
        };
        for (path, kind, objects) in collections {
            let (events, _) = broadcast::channel(64);
            state.collections.insert(
                path.to_string(),
                Collection {
                    kind,
                    objects,
                    events,
                },
            );
        }
        let state = Arc::new(Mutex::new(state));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(serve(&shared, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), service)
                        .await;
                });
            }
        });
        FakeKube { addr, state, task }
    }

    /// The API server URL for the sidecar's Kubernetes client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies an event to `path`'s collection and sends it to open watches.
    pub fn push(&self, path: &str, kind: &str, mut object: Value) {
        let mut state = self.state.lock().expect("lock");
        state.version += 1;
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        let coll = state.collections.get_mut(path).expect("known collection");
        let name = object["metadata"]["name"].clone();
        coll.objects.retain(|o| o["metadata"]["name"] != name);
        if kind != "DELETED" {
            coll.objects.push(object.clone());
        }
        let _ = coll.events.send((kind.to_string(), object));
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn serve(state: &Mutex<State>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let selector = param(&query, "labelSelector");
    let state = match state.lock() {
        Ok(s) => s,
        Err(_) => return status(500),
    };
    let Some(coll) = state.collections.get(&path) else {
        return status(404);
    };
    if param(&query, "watch").is_some_and(|w| w == "true" || w == "1") {
        let mut events = coll.events.subscribe();
        let stream = async_stream(move |tx: tokio::sync::mpsc::Sender<Bytes>| async move {
            while let Ok((kind, object)) = events.recv().await {
                if !matches(&object, selector.as_deref()) {
                    continue;
                }
                let mut line = serde_json::to_vec(&json!({"type": kind, "object": object}))
                    .unwrap_or_default();
                line.push(b'\n');
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(stream)
            .unwrap_or_else(|_| status(500));
    }
    let items: Vec<&Value> = coll
        .objects
        .iter()
        .filter(|o| matches(o, selector.as_deref()))
        .collect();
    let list = json!({
        "apiVersion": "v1",
        "kind": coll.kind,
        "metadata": {"resourceVersion": state.version.to_string()},
        "items": items,
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(list.to_string())).boxed())
        .unwrap_or_else(|_| status(500))
}

/// A streaming body fed by `producer` through a channel.
fn async_stream<F, Fut>(producer: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(producer(tx));
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|b| b.map(|b| Ok::<_, Infallible>(Frame::data(b))))
    });
    StreamBody::new(stream).boxed()
}

fn matches(object: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    selector.split(',').filter(|s| !s.is_empty()).all(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        object["metadata"]["labels"][k].as_str() == Some(v)
    })
}

fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: u16) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() =
        hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp
}
