//! OTLP receivers for the tracing tests: the collector's gRPC service from opentelemetry-proto's
//! definitions (served by hyper's HTTP/2 server), and OTLP/HTTP in protobuf and JSON. Each
//! decodes what it receives into [`Exported`] spans, the same shape for every protocol.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tower_service::Service;

/// The OTLP protocol a receiver speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Grpc,
    HttpProtobuf,
    HttpJson,
}

impl Wire {
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`'s word for it.
    pub fn protocol(self) -> &'static str {
        match self {
            Wire::Grpc => "grpc",
            Wire::HttpProtobuf => "http/protobuf",
            Wire::HttpJson => "http/json",
        }
    }
}

/// One exported span, ids in lowercase hex (empty for no parent).
#[derive(Debug, Clone)]
pub struct Exported {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// OTLP's SpanKind: 2 server, 3 client.
    pub kind: i32,
    /// OTLP's status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
    /// Unix nanoseconds.
    pub start: u64,
    pub end: u64,
    pub attributes: BTreeMap<String, String>,
}

impl Exported {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// A running receiver; each export request it answers is one batch on `batches`.
pub struct Receiver {
    pub addr: SocketAddr,
    batches: mpsc::UnboundedReceiver<Vec<Exported>>,
    /// The request paths the HTTP receivers were posted to.
    pub paths: mpsc::UnboundedReceiver<String>,
    _task: JoinHandle<()>,
}

impl Receiver {
    /// A receiver for `wire` on an ephemeral loopback port.
    pub async fn start(wire: Wire) -> Receiver {
        Receiver::start_on("127.0.0.1:0".parse().expect("addr"), wire).await
    }

    /// A receiver for `wire` on `addr`.
    pub async fn start_on(addr: SocketAddr, wire: Wire) -> Receiver {
        let listener = TcpListener::bind(addr).await.expect("bind the receiver");
        let addr = listener.local_addr().expect("addr");
        let (tx, batches) = mpsc::unbounded_channel();
        let (path_tx, paths) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let io = TokioIo::new(sock);
                let (tx, path_tx) = (tx.clone(), path_tx.clone());
                tokio::spawn(async move {
                    match wire {
                        Wire::Grpc => {
                            let server = TraceServiceServer::new(Collector(tx));
                            let svc = service_fn(move |req: Request<Incoming>| {
                                let mut server = server.clone();
                                async move { server.call(req).await }
                            });
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await;
                        }
                        Wire::HttpProtobuf | Wire::HttpJson => {
                            let svc = service_fn(move |req: Request<Incoming>| {
                                let (tx, path_tx) = (tx.clone(), path_tx.clone());
                                async move {
                                    Ok::<_, Infallible>(http_export(req, wire, tx, path_tx).await)
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, svc)
                                .await;
                        }
                    }
                });
            }
        });
        Receiver {
            addr,
            batches,
            paths,
            _task: task,
        }
    }

    /// The endpoint to give the exporter.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received until `done` holds for them, within the tests' limit.
    pub async fn until(&mut self, done: impl Fn(&[Exported]) -> bool) -> Vec<Exported> {
        let mut spans = Vec::new();
        let wait = async {
            while !done(&spans) {
                let batch = self.batches.recv().await.expect("the receiver runs");
                spans.extend(batch);
            }
        };
        tokio::time::timeout(super::LIMIT, wait)
            .await
            .unwrap_or_else(|_| panic!("spans in time; got {spans:#?}"));
        spans
    }

    /// The spans received so far, without waiting.
    pub fn received(&mut self) -> Vec<Exported> {
        let mut spans = Vec::new();
        while let Ok(batch) = self.batches.try_recv() {
            spans.extend(batch);
        }
        spans
    }
}

struct Collector(mpsc::UnboundedSender<Vec<Exported>>);

#[async_trait::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(spans(request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn http_export(
    req: Request<Incoming>,
    wire: Wire,
    tx: mpsc::UnboundedSender<Vec<Exported>>,
    paths: mpsc::UnboundedSender<String>,
) -> Response<Full<Bytes>> {
    let _ = paths.send(req.uri().path().to_string());
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = req.into_body().collect().await.expect("body").to_bytes();
    let decoded = match wire {
        Wire::HttpJson => {
            assert_eq!(content_type, "application/json");
            serde_json::from_slice::<ExportTraceServiceRequest>(&body).expect("OTLP JSON")
        }
        _ => {
            assert_eq!(content_type, "application/x-protobuf");
            prost::Message::decode(body).expect("OTLP protobuf")
        }
    };
    let _ = tx.send(spans(decoded));
    let (content_type, reply) = match wire {
        Wire::HttpJson => ("application/json", Bytes::from_static(b"{}")),
        _ => ("application/x-protobuf", Bytes::new()),
    };
    Response::builder()
        .header("content-type", content_type)
        .body(Full::new(reply))
        .expect("response")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn spans(request: ExportTraceServiceRequest) -> Vec<Exported> {
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let resource = rs
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                out.push(Exported {
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    status: span.status.map_or(0, |s| s.code),
                    start: span.start_time_unix_nano,
                    end: span.end_time_unix_nano,
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
    out
}
