//! An OTLP receiver that keeps what it is sent in memory: spans and metric names, over gRPC
//! (`opentelemetry-proto`'s tonic services) and over HTTP/protobuf (`POST /v1/traces`,
//! `POST /v1/metrics`). No Jaeger or collector binary can be installed here; this stands in for
//! one in the tests and, as `shoal-otlp-sink`, in the compose stack.
//!
//! Its HTTP port also answers `GET /api/spans` (the collected spans as JSON) and
//! `GET /api/metrics` (the names of the metrics received), for scripts.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value},
};
use prost::Message as _;
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};

/// One span as received.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReceivedSpan {
    /// Trace id, lowercase hex.
    pub trace_id: String,
    /// Span id, lowercase hex.
    pub span_id: String,
    /// Parent span id, lowercase hex; empty for a root span.
    pub parent_span_id: String,
    /// Name.
    pub name: String,
    /// OTLP span kind (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    /// Attributes.
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// OTLP status code (0 unset, 1 ok, 2 error).
    pub status_code: i32,
    /// Links as `(trace_id, span_id)`.
    pub links: Vec<(String, String)>,
    /// Resource attributes of the process that sent it.
    pub resource: BTreeMap<String, serde_json::Value>,
    /// Start, in nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// End, in nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
}

impl ReceivedSpan {
    /// A string attribute.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).and_then(serde_json::Value::as_str)
    }

    /// The `service.instance.id` of the sender.
    pub fn instance(&self) -> Option<&str> {
        self.resource
            .get("service.instance.id")
            .and_then(serde_json::Value::as_str)
    }
}

#[derive(Debug, Default)]
struct Store {
    spans: VecDeque<ReceivedSpan>,
    metrics: BTreeSet<String>,
    /// Spans kept; 0 = count exports only, without decoding HTTP bodies (for benchmarks, where the
    /// receiver shares the machine with the server it measures).
    capacity: usize,
    exports: u64,
    bytes: u64,
}

/// What a receiver got, in numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReceivedStats {
    /// Export requests (traces and metrics).
    pub exports: u64,
    /// Bytes of HTTP export bodies.
    pub bytes: u64,
    /// Spans kept.
    pub spans: usize,
}

impl Store {
    fn add_spans(&mut self, request: ExportTraceServiceRequest) {
        self.exports += 1;
        if self.capacity == 0 {
            return;
        }
        for resource_spans in request.resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    if self.spans.len() >= self.capacity {
                        self.spans.pop_front();
                    }
                    self.spans.push_back(ReceivedSpan {
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent_span_id: hex::encode(&span.parent_span_id),
                        name: span.name,
                        kind: span.kind,
                        attributes: attributes(&span.attributes),
                        status_code: span.status.map(|s| s.code).unwrap_or_default(),
                        links: span
                            .links
                            .iter()
                            .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                            .collect(),
                        resource: resource.clone(),
                        start_unix_nanos: span.start_time_unix_nano,
                        end_unix_nanos: span.end_time_unix_nano,
                    });
                }
            }
        }
    }

    fn add_metrics(&mut self, request: ExportMetricsServiceRequest) {
        self.exports += 1;
        for resource_metrics in request.resource_metrics {
            for scope in resource_metrics.scope_metrics {
                for metric in scope.metrics {
                    self.metrics.insert(metric.name);
                }
            }
        }
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, serde_json::Value> {
    list.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map_or(serde_json::Value::Null, value),
            )
        })
        .collect()
}

fn value(value: &AnyValue) -> serde_json::Value {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone().into(),
        Some(any_value::Value::BoolValue(b)) => (*b).into(),
        Some(any_value::Value::IntValue(i)) => (*i).into(),
        Some(any_value::Value::DoubleValue(d)) => (*d).into(),
        Some(any_value::Value::ArrayValue(array)) => array
            .values
            .iter()
            .map(self::value)
            .collect::<Vec<_>>()
            .into(),
        Some(any_value::Value::KvlistValue(list)) => {
            serde_json::Value::Object(attributes(&list.values).into_iter().collect())
        }
        Some(any_value::Value::BytesValue(bytes)) => hex::encode(bytes).into(),
        _ => serde_json::Value::Null,
    }
}

#[derive(Clone)]
struct Services(Arc<Mutex<Store>>);

impl Services {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[tonic::async_trait]
impl TraceService for Services {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.store().add_spans(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Services {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.store().add_metrics(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// A running receiver; it stops when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    grpc: SocketAddr,
    http: SocketAddr,
    store: Arc<Mutex<Store>>,
    _stop: watch::Sender<()>,
}

/// Spans kept by default; the oldest are dropped past it.
pub const DEFAULT_CAPACITY: usize = 200_000;

impl OtlpReceiver {
    /// Starts a receiver on free loopback ports.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start() -> std::io::Result<Self> {
        Self::bind(
            "127.0.0.1:0".parse().expect("address"),
            "127.0.0.1:0".parse().expect("address"),
            DEFAULT_CAPACITY,
        )
        .await
    }

    /// Starts a receiver with gRPC on `grpc` and HTTP on `http`, keeping at most `capacity` spans
    /// (0: count exports without decoding them).
    ///
    /// # Errors
    /// When an address cannot be bound.
    pub async fn bind(
        grpc: SocketAddr,
        http: SocketAddr,
        capacity: usize,
    ) -> std::io::Result<Self> {
        let store = Arc::new(Mutex::new(Store {
            capacity,
            ..Store::default()
        }));
        let services = Services(store.clone());
        let (stop_tx, stop_rx) = watch::channel(());

        let grpc_listener = TcpListener::bind(grpc).await?;
        let grpc = grpc_listener.local_addr()?;
        let mut grpc_stop = stop_rx.clone();
        let router = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(services.clone()))
            .add_service(MetricsServiceServer::new(services.clone()));
        tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener);
            let stopped = async move {
                let _ = grpc_stop.changed().await;
            };
            if let Err(error) = router.serve_with_incoming_shutdown(incoming, stopped).await {
                tracing::warn!(%error, "OTLP gRPC receiver failed");
            }
        });

        let http_listener = TcpListener::bind(http).await?;
        let http = http_listener.local_addr()?;
        let mut http_stop = stop_rx;
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = http_listener.accept() => accepted,
                    _ = http_stop.changed() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let services = services.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let services = services.clone();
                        async move { Ok::<_, Infallible>(answer(request, &services).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            grpc,
            http,
            store,
            _stop: stop_tx,
        })
    }

    /// The gRPC endpoint, for `OTEL_EXPORTER_OTLP_ENDPOINT` with protocol `grpc`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The HTTP endpoint, for `OTEL_EXPORTER_OTLP_ENDPOINT` with protocol `http/protobuf`.
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Every span received so far, oldest first.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.store().spans.iter().cloned().collect()
    }

    /// The names of every metric received so far.
    pub fn metric_names(&self) -> BTreeSet<String> {
        self.store().metrics.clone()
    }

    /// Counts of what was received.
    pub fn stats(&self) -> ReceivedStats {
        let store = self.store();
        ReceivedStats {
            exports: store.exports,
            bytes: store.bytes,
            spans: store.spans.len(),
        }
    }

    /// Forgets what was received.
    pub fn clear(&self) {
        let mut store = self.store();
        store.spans.clear();
        store.metrics.clear();
    }

    /// Waits until `done` holds for the spans received, checking every 50 ms, for at most `timeout`.
    /// Returns the spans it last saw and whether `done` held.
    pub async fn wait_for_spans(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> (Vec<ReceivedSpan>, bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return (spans, true);
            }
            if tokio::time::Instant::now() >= deadline {
                return (spans, false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn json_reply(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

async fn answer(request: Request<Incoming>, services: &Services) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    match (method.as_str(), path.as_str()) {
        ("POST", "/v1/traces" | "/v1/metrics") => {
            let Ok(body) = request.into_body().collect().await else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    b"unreadable body".to_vec(),
                );
            };
            export(&path, body.to_bytes(), services)
        }
        ("GET", "/api/spans") => {
            let spans: Vec<ReceivedSpan> = services.store().spans.iter().cloned().collect();
            json_reply(&spans)
        }
        ("GET", "/api/stats") => {
            let store = services.store();
            json_reply(&ReceivedStats {
                exports: store.exports,
                bytes: store.bytes,
                spans: store.spans.len(),
            })
        }
        ("GET", "/api/metrics") => json_reply(&services.store().metrics.clone()),
        ("GET", "/healthz") => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
    }
}

/// One OTLP/HTTP export: counted, and kept (decoded) unless the sink only counts spans.
fn export(path: &str, body: Bytes, services: &Services) -> Response<Full<Bytes>> {
    let traces = path == "/v1/traces";
    {
        let mut store = services.store();
        store.bytes += body.len() as u64;
        if store.capacity == 0 && traces {
            store.exports += 1;
            return reply(
                StatusCode::OK,
                "application/x-protobuf",
                ExportTraceServiceResponse::default().encode_to_vec(),
            );
        }
    }
    let acknowledgment = if traces {
        ExportTraceServiceRequest::decode(body).map(|export| {
            services.store().add_spans(export);
            ExportTraceServiceResponse::default().encode_to_vec()
        })
    } else {
        ExportMetricsServiceRequest::decode(body).map(|export| {
            services.store().add_metrics(export);
            ExportMetricsServiceResponse::default().encode_to_vec()
        })
    };
    match acknowledgment {
        Ok(acknowledgment) => reply(StatusCode::OK, "application/x-protobuf", acknowledgment),
        Err(_) => reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            b"bad protobuf".to_vec(),
        ),
    }
}
