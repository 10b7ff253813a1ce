//! Prometheus metrics of one replica, rendered as text on `GET /metrics`.
//!
//! Every label value is a `&'static str` from a closed set (method names are normalised by the
//! server, unknown ones become `other`), so no client can blow up cardinality. Session ids, URIs and
//! arguments never become labels. The full list is in `docs/telemetry.md`.
//!
//! When OTLP metrics are exported (see [`crate::telemetry`]), the same measurements are recorded
//! into OpenTelemetry instruments with semantic-convention names (`mcp.server.operation.duration`,
//! `http.server.request.duration`, `db.client.operation.duration`, ...); otherwise those
//! instruments do not exist and cost nothing.

use crate::telemetry::attr;
use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use opentelemetry::KeyValue;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, text::encode},
    metrics::{
        MetricType,
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationOutcome {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToolOutcome {
    tool: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToolLabel {
    tool: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointOutcome {
    endpoint: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

/// A family that `/metrics` declares (`# HELP`, `# TYPE`) even before its first sample: the
/// catalogue is the same on every replica from its start, so dashboards and alert rules can be
/// checked against it, and a family whose labels have not occurred yet shows as known, not absent.
#[derive(Debug)]
struct Declared<M>(M);

impl<M: EncodeMetric> EncodeMetric for Declared<M> {
    fn encode(&self, encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

/// Declares the Prometheus families, one line each: field, type, constructor, name, help. They are
/// registered in declaration order (the order of `/metrics`).
macro_rules! families {
    ($($field:ident: $ty:ty = $make:expr, $name:literal, $help:literal;)*) => {
        struct Families {
            $($field: $ty,)*
        }

        impl Families {
            fn register(registry: &mut Registry) -> Self {
                $(
                    let $field: $ty = $make;
                    registry.register($name, $help, Declared($field.clone()));
                )*
                Self { $($field,)* }
            }
        }
    };
}

#[rustfmt::skip]
families! {
    ready: Gauge = Default::default(), "shoal_ready", "1 while this replica is ready (not draining, its cluster bus subscribed and round-tripping, Redis answering its watchdog), else 0; sampled every second";
    sessions_active: Gauge = Default::default(), "shoal_sessions_active", "Legacy sessions with an in-memory worker on this replica";
    streams_active: Family<KindLabel, Gauge> = Default::default(), "shoal_streams_active", "Open server-to-client streams on this replica (kind=get|listen)";
    mcp_requests: Family<RequestLabels, Counter> = Default::default(), "shoal_mcp_requests", "MCP requests handled, by JSON-RPC method and outcome (ok|error|tool_error|cancelled)";
    mcp_duration: Family<MethodLabel, Histogram> = timed(), "shoal_mcp_request_duration_seconds", "Time to handle an MCP request, by JSON-RPC method";
    http_rejections: Family<ReasonLabel, Counter> = Default::default(), "shoal_http_rejections", "HTTP requests rejected before MCP handling, by reason";
    auth_failures: Family<ReasonLabel, Counter> = Default::default(), "shoal_auth_failures", "Requests refused by authentication, by reason (missing|malformed|invalid_token|expired|unknown_key|wrong_issuer|wrong_audience|unknown_api_key|insufficient_scope|issuer_unavailable|foreign_session)";
    quota_rejections: Family<KindLabel, Counter> = Default::default(), "shoal_quota_rejections", "Requests refused by a quota, by kind (requests|concurrent_calls|sessions|streams, global_ prefixed for the cluster-wide quotas)";
    session_creates: Counter = Default::default(), "shoal_session_creates", "Legacy sessions initialized on this replica";
    session_restores: Counter = Default::default(), "shoal_session_restores", "Legacy sessions restored from the shared store onto this replica";
    forwards: Family<KindLabel, Counter> = Default::default(), "shoal_forwards", "Client messages forwarded to another replica (kind=response|cancel)";
    bus_messages: Family<KindLabel, Counter> = Default::default(), "shoal_bus_messages", "Cluster bus messages received, by kind";
    feed_lagged: Counter = Default::default(), "shoal_feed_lagged", "Times a GET stream fell behind live delivery and re-read the event log";
    listener_dropped: Counter = Default::default(), "shoal_listener_dropped", "Notifications dropped because a subscriptions/listen stream was full";
    backend_errors: Family<OperationLabel, Counter> = Default::default(), "shoal_backend_errors", "Failed operations on the shared state backend, by operation";
    events_appended: Counter = Default::default(), "shoal_events_appended", "Events appended to session event logs by this replica";
    fanouts_unfinished: Counter = Default::default(), "shoal_fanouts_unfinished", "Resource changes whose fanout failed a first time on this replica (an append or the last step; it tries again, then leaves them to the janitor)";
    fanouts_finished_by_janitor: Counter = Default::default(), "shoal_fanouts_finished_by_janitor", "Pending resource changes the janitor on this replica finished";
    process_rss: Gauge = Default::default(), "shoal_process_resident_memory_bytes", "Resident set size of this replica's process";
    runtime_alive_tasks: Gauge = Default::default(), "shoal_runtime_alive_tasks", "Tasks alive in this replica's async runtime";
    tool_duration: Family<ToolOutcome, Histogram> = timed(), "shoal_tool_duration_seconds", "Time to run a tool call (cache included), by tool and outcome (ok|tool_error|error|cancelled)";
    tool_in_flight: Family<ToolLabel, Gauge> = Default::default(), "shoal_tool_calls_in_flight", "Tool calls holding one of their tool's concurrency slots on this replica";
    tool_rejections: Family<ToolOutcome, Counter> = Default::default(), "shoal_tool_rejections", "Tool calls refused or cut by request isolation, by tool and outcome (busy|timeout)";
    db_pool_max: Gauge = Default::default(), "shoal_db_pool_connections_max", "PostgreSQL pool size";
    db_pool_in_use: Gauge = Default::default(), "shoal_db_pool_connections_in_use", "PostgreSQL connections checked out by tool calls";
    db_pool_waiting: Gauge = Default::default(), "shoal_db_pool_waiting", "Tool calls waiting for a PostgreSQL connection";
    db_pool_wait: Histogram = histogram(), "shoal_db_pool_wait_seconds", "Time tool calls waited for a PostgreSQL connection";
    db_operation: Family<OperationOutcome, Histogram> = timed(), "shoal_db_operation_duration_seconds", "PostgreSQL operations by kind and outcome";
    cache_lookups: Family<OutcomeLabel, Counter> = Default::default(), "shoal_cache_lookups", "Result-cache lookups by outcome (hit|miss|stale|coalesced|bypass)";
    cache_hit_duration: Histogram = histogram(), "shoal_cache_hit_duration_seconds", "Time to answer a tool call from the result cache";
    cache_invalidations: Counter = Default::default(), "shoal_cache_invalidations", "Cache entries dropped because what they depend on changed";
    rpc_requests: Family<EndpointOutcome, Counter> = Default::default(), "shoal_rpc_requests", "Upstream JSON-RPC requests by endpoint and outcome";
    rpc_duration: Family<EndpointLabel, Histogram> = timed(), "shoal_rpc_request_duration_seconds", "Upstream JSON-RPC latency by endpoint";
    rpc_in_flight: Family<EndpointLabel, Gauge> = Default::default(), "shoal_rpc_in_flight", "Upstream requests in flight by endpoint";
    rpc_healthy: Family<EndpointLabel, Gauge> = Default::default(), "shoal_rpc_endpoint_healthy", "1 while an upstream endpoint is eligible, 0 while it cools down";
    http_duration: Family<HttpLabels, Histogram> = timed(), "shoal_http_request_duration_seconds", "HTTP requests by method, route and status, until the response body ended (a GET stream counts its whole life)";
    redis_duration: Family<OperationLabel, Histogram> = timed(), "shoal_redis_operation_duration_seconds", "Shared-state (Redis) operations by shoal operation name, errors included";
    process_cpu: FloatCounter = Default::default(), "shoal_process_cpu_seconds", "CPU time (user + system) used by this replica's process";
    runtime_busy: FloatGauge = Default::default(), "shoal_runtime_busy_ratio", "Share of the async runtime's worker time spent running tasks over the last second (0..1)";
    runtime_workers: Gauge = Default::default(), "shoal_runtime_workers", "Worker threads of this replica's async runtime";
    scheduling_delay: Histogram = fine_histogram(), "shoal_runtime_scheduling_delay_seconds", "Time a freshly spawned probe task waited to be polled (the event-loop lag of the runtime)";
    bus_roundtrip: Histogram = fine_histogram(), "shoal_bus_roundtrip_seconds", "Time for a probe published on the cluster bus to come back to this replica (pub/sub lag)";
}

/// A histogram family with the duration buckets of [`histogram`].
fn timed<S: Clone + std::hash::Hash + Eq>() -> Family<S, Histogram> {
    Family::new_with_constructor(histogram as fn() -> Histogram)
}

struct Inner {
    registry: Registry,
    families: Families,
    otel: Option<Otel>,
}

impl std::ops::Deref for Inner {
    type Target = Families;

    fn deref(&self) -> &Families {
        &self.families
    }
}

/// The OpenTelemetry instruments, present while OTLP metrics are exported.
struct Otel {
    operation_duration: opentelemetry::metrics::Histogram<f64>,
    http_duration: opentelemetry::metrics::Histogram<f64>,
    db_duration: opentelemetry::metrics::Histogram<f64>,
    rpc_duration: opentelemetry::metrics::Histogram<f64>,
    cache_lookups: opentelemetry::metrics::Counter<u64>,
    sessions: opentelemetry::metrics::Counter<u64>,
    forwards: opentelemetry::metrics::Counter<u64>,
    rejections: opentelemetry::metrics::Counter<u64>,
    auth_failures: opentelemetry::metrics::Counter<u64>,
    quota_rejections: opentelemetry::metrics::Counter<u64>,
    scheduling_delay: opentelemetry::metrics::Histogram<f64>,
    bus_roundtrip: opentelemetry::metrics::Histogram<f64>,
    // Observable instruments report through callbacks; holding them keeps them registered.
    _observed: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The replica's metric families. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn histogram() -> Histogram {
    // 100 µs .. ~52 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// Boundaries of the OTLP duration histograms: the same as [`histogram`]'s.
fn otel_boundaries() -> Vec<f64> {
    (0..20).map(|i| 0.0001 * 2f64.powi(i)).collect()
}

fn fine_histogram() -> Histogram {
    // 10 µs .. ~1.3 s: scheduling delay and bus round trips are usually well under a millisecond.
    Histogram::new(exponential_buckets(0.00001, 2.0, 18))
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let families = Families::register(&mut registry);
        for kind in ["get", "listen"] {
            // Rendered from the start, at 0, instead of appearing with the first stream.
            let _ = families.streams_active.get_or_create(&KindLabel { kind });
        }
        let otel = crate::telemetry::meter().map(|meter| {
            Otel::new(
                meter,
                &Observed {
                    sessions_active: families.sessions_active.clone(),
                    streams_active: families.streams_active.clone(),
                    db_pool_max: families.db_pool_max.clone(),
                    db_pool_in_use: families.db_pool_in_use.clone(),
                    db_pool_waiting: families.db_pool_waiting.clone(),
                    process_rss: families.process_rss.clone(),
                    process_cpu: families.process_cpu.clone(),
                    runtime_busy: families.runtime_busy.clone(),
                    runtime_alive_tasks: families.runtime_alive_tasks.clone(),
                },
            )
        });
        Self {
            inner: Arc::new(Inner {
                registry,
                families,
                otel,
            }),
        }
    }

    /// Renders every family in the Prometheus text format, after sampling the process gauges.
    pub fn render(&self) -> String {
        self.sample_process();
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }

    /// Samples the resident set size and the runtime's alive tasks.
    pub fn sample_process(&self) {
        if let Some(rss) = resident_memory_bytes() {
            self.inner.process_rss.set(rss as i64);
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            self.inner
                .runtime_alive_tasks
                .set(handle.metrics().num_alive_tasks() as i64);
        }
    }

    /// CPU seconds used since the previous call.
    pub fn process_cpu_add(&self, seconds: f64) {
        if seconds > 0.0 {
            self.inner.process_cpu.inc_by(seconds);
        }
    }

    /// Whether the replica is ready (the `shoal_ready` gauge).
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.set(i64::from(ready));
    }

    /// The runtime's busy ratio over the last sampling interval and its worker count.
    pub fn runtime_sample(&self, busy_ratio: f64, workers: usize) {
        self.inner.runtime_busy.set(busy_ratio);
        self.inner.runtime_workers.set(workers as i64);
    }

    /// One scheduling-delay probe.
    pub fn scheduling_delay(&self, delay: Duration) {
        let seconds = delay.as_secs_f64();
        self.inner.scheduling_delay.observe(seconds);
        if let Some(otel) = &self.inner.otel {
            otel.scheduling_delay.record(seconds, &[]);
        }
    }

    /// One bus round-trip probe.
    pub fn bus_roundtrip(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        self.inner.bus_roundtrip.observe(seconds);
        if let Some(otel) = &self.inner.otel {
            otel.bus_roundtrip.record(seconds, &[]);
        }
    }

    /// One HTTP request ended (its response body finished or was dropped).
    pub fn http_request(
        &self,
        method: &'static str,
        route: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        let seconds = elapsed.as_secs_f64();
        self.inner
            .http_duration
            .get_or_create(&HttpLabels {
                method,
                route,
                status,
            })
            .observe(seconds);
        if let Some(otel) = &self.inner.otel {
            otel.http_duration.record(
                seconds,
                &[
                    KeyValue::new(attr::HTTP_REQUEST_METHOD, method),
                    KeyValue::new(attr::HTTP_ROUTE, route),
                    KeyValue::new(attr::HTTP_RESPONSE_STATUS_CODE, i64::from(status)),
                ],
            );
        }
    }

    /// One shared-state operation finished.
    pub fn redis_operation(&self, operation: &'static str, ok: bool, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        self.inner
            .redis_duration
            .get_or_create(&OperationLabel { operation })
            .observe(seconds);
        if let Some(otel) = &self.inner.otel {
            let mut attributes = vec![
                KeyValue::new(attr::DB_SYSTEM_NAME, "redis"),
                KeyValue::new(attr::DB_OPERATION_NAME, operation),
            ];
            if !ok {
                attributes.push(KeyValue::new(attr::ERROR_TYPE, "backend_error"));
            }
            otel.db_duration.record(seconds, &attributes);
        }
    }

    /// A session worker was created or restored (+1) or dropped (-1).
    pub fn sessions_active_add(&self, delta: i64) {
        self.inner.sessions_active.inc_by(delta);
    }

    /// A legacy session was initialized here.
    pub fn session_created(&self) {
        self.inner.session_creates.inc();
        if let Some(otel) = &self.inner.otel {
            otel.sessions.add(1, &[KeyValue::new("kind", "create")]);
        }
    }

    /// A legacy session was restored here.
    pub fn session_restored(&self) {
        self.inner.session_restores.inc();
        if let Some(otel) = &self.inner.otel {
            otel.sessions.add(1, &[KeyValue::new("kind", "restore")]);
        }
    }

    /// A stream of `kind` (`get` or `listen`) opened (+1) or closed (-1).
    pub fn streams_active_add(&self, kind: &'static str, delta: i64) {
        self.inner
            .streams_active
            .get_or_create(&KindLabel { kind })
            .inc_by(delta);
    }

    /// One MCP request other than `tools/call` finished (tool calls go through [`Self::tool_call`]).
    pub fn mcp_request(&self, method: &'static str, outcome: &'static str, elapsed: Duration) {
        self.record_request(method, None, outcome, elapsed);
    }

    fn record_request(
        &self,
        method: &'static str,
        tool: Option<&'static str>,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        let seconds = elapsed.as_secs_f64();
        self.inner
            .mcp_requests
            .get_or_create(&RequestLabels { method, outcome })
            .inc();
        self.inner
            .mcp_duration
            .get_or_create(&MethodLabel { method })
            .observe(seconds);
        if let Some(otel) = &self.inner.otel {
            let mut attributes = Vec::with_capacity(3);
            attributes.push(KeyValue::new(attr::MCP_METHOD_NAME, method));
            if let Some(tool) = tool {
                attributes.push(KeyValue::new(attr::GEN_AI_TOOL_NAME, tool));
            }
            if outcome != "ok" {
                attributes.push(KeyValue::new(attr::ERROR_TYPE, outcome));
            }
            otel.operation_duration.record(seconds, &attributes);
        }
    }

    /// An HTTP request was rejected before reaching the MCP layer.
    pub fn http_rejection(&self, reason: &'static str) {
        self.inner
            .http_rejections
            .get_or_create(&ReasonLabel { reason })
            .inc();
        if let Some(otel) = &self.inner.otel {
            otel.rejections.add(1, &[KeyValue::new("reason", reason)]);
        }
    }

    /// A request was refused by authentication (or used another principal's session).
    pub fn auth_failure(&self, reason: &'static str) {
        self.inner
            .auth_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
        if let Some(otel) = &self.inner.otel {
            otel.auth_failures
                .add(1, &[KeyValue::new("reason", reason)]);
        }
    }

    /// A request was refused by a quota of `kind`.
    pub fn quota_rejection(&self, kind: &'static str) {
        self.inner
            .quota_rejections
            .get_or_create(&KindLabel { kind })
            .inc();
        if let Some(otel) = &self.inner.otel {
            otel.quota_rejections.add(1, &[KeyValue::new("kind", kind)]);
        }
    }

    /// A client's response to a server request found no replica waiting for it (the replica that
    /// sent the request is gone).
    pub fn forward_undelivered(&self) {
        self.forwarded("undelivered");
    }

    /// A client message was forwarded to another replica.
    pub fn forwarded(&self, kind: &'static str) {
        self.inner.forwards.get_or_create(&KindLabel { kind }).inc();
        if let Some(otel) = &self.inner.otel {
            otel.forwards.add(1, &[KeyValue::new("kind", kind)]);
        }
    }

    /// A bus message of `kind` was received.
    pub fn bus_message(&self, kind: &'static str) {
        self.inner
            .bus_messages
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// A feed's live channel overflowed.
    pub fn feed_lagged(&self) {
        self.inner.feed_lagged.inc();
    }

    /// A listener's channel overflowed.
    pub fn listener_dropped(&self) {
        self.inner.listener_dropped.inc();
    }

    /// A backend operation failed.
    pub fn backend_error(&self, operation: &'static str) {
        self.inner
            .backend_errors
            .get_or_create(&OperationLabel { operation })
            .inc();
    }

    /// An event was appended to a session log.
    pub fn event_appended(&self) {
        self.inner.events_appended.inc();
    }

    /// A resource change's fanout was left pending for the janitor.
    pub fn fanout_unfinished(&self) {
        self.inner.fanouts_unfinished.inc();
    }

    /// The janitor finished `changes` pending resource changes.
    pub fn fanouts_finished_by_janitor(&self, changes: u64) {
        self.inner.fanouts_finished_by_janitor.inc_by(changes);
    }

    /// A `tools/call` request finished: counted as an MCP request and as a call of `tool`.
    pub fn tool_call(&self, tool: &'static str, outcome: &'static str, elapsed: Duration) {
        self.record_request("tools/call", Some(tool), outcome, elapsed);
        self.inner
            .tool_duration
            .get_or_create(&ToolOutcome { tool, outcome })
            .observe(elapsed.as_secs_f64());
    }

    /// A tool call took (+1) or released (-1) one of its tool's slots.
    pub fn tool_in_flight(&self, tool: &'static str, delta: i64) {
        self.inner
            .tool_in_flight
            .get_or_create(&ToolLabel { tool })
            .inc_by(delta);
    }

    /// Request isolation refused (`busy`) or cut (`timeout`) a tool call.
    pub fn tool_rejected(&self, tool: &'static str, outcome: &'static str) {
        self.inner
            .tool_rejections
            .get_or_create(&ToolOutcome { tool, outcome })
            .inc();
    }

    /// The PostgreSQL pool size.
    pub fn db_pool_size(&self, size: i64) {
        self.inner.db_pool_max.set(size);
    }

    /// Connections in use.
    pub fn db_pool_in_use(&self, in_use: i64) {
        self.inner.db_pool_in_use.set(in_use);
    }

    /// Calls waiting for a connection.
    pub fn db_pool_waiting(&self, waiting: i64) {
        self.inner.db_pool_waiting.set(waiting);
    }

    /// How long a call waited for a connection.
    pub fn db_pool_wait(&self, waited: Duration) {
        self.inner.db_pool_wait.observe(waited.as_secs_f64());
    }

    /// One PostgreSQL operation; `error` is the failure kind, if any.
    pub fn db_operation(
        &self,
        operation: &'static str,
        error: Option<&'static str>,
        elapsed: Duration,
    ) {
        let seconds = elapsed.as_secs_f64();
        self.inner
            .db_operation
            .get_or_create(&OperationOutcome {
                operation,
                outcome: error.unwrap_or("ok"),
            })
            .observe(seconds);
        if let Some(otel) = &self.inner.otel {
            let mut attributes = vec![
                KeyValue::new(attr::DB_SYSTEM_NAME, "postgresql"),
                KeyValue::new(attr::DB_OPERATION_NAME, operation),
            ];
            if let Some(error) = error {
                attributes.push(KeyValue::new(attr::ERROR_TYPE, error));
            }
            otel.db_duration.record(seconds, &attributes);
        }
    }

    /// A result-cache lookup.
    pub fn cache_lookup(&self, outcome: &'static str) {
        self.inner
            .cache_lookups
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        if let Some(otel) = &self.inner.otel {
            otel.cache_lookups
                .add(1, &[KeyValue::new(attr::SHOAL_CACHE_OUTCOME, outcome)]);
        }
    }

    /// A call answered from the cache in `elapsed`.
    pub fn cache_hit(&self, elapsed: Duration) {
        self.inner.cache_hit_duration.observe(elapsed.as_secs_f64());
    }

    /// Cache entries invalidated.
    pub fn cache_invalidated(&self, entries: u64) {
        self.inner.cache_invalidations.inc_by(entries);
    }

    /// An upstream request to `endpoint` finished with `outcome` after `elapsed`.
    pub fn rpc_request(&self, endpoint: &'static str, outcome: &'static str, elapsed: Duration) {
        self.inner
            .rpc_requests
            .get_or_create(&EndpointOutcome { endpoint, outcome })
            .inc();
        let seconds = elapsed.as_secs_f64();
        self.inner
            .rpc_duration
            .get_or_create(&EndpointLabel { endpoint })
            .observe(seconds);
        if let Some(otel) = &self.inner.otel {
            let mut attributes = vec![
                KeyValue::new(attr::RPC_SYSTEM_NAME, "jsonrpc"),
                KeyValue::new(attr::SHOAL_RPC_ENDPOINT, endpoint),
            ];
            if outcome != "ok" {
                attributes.push(KeyValue::new(attr::ERROR_TYPE, outcome));
            }
            otel.rpc_duration.record(seconds, &attributes);
        }
    }

    /// Requests in flight to `endpoint` changed by `delta`.
    pub fn rpc_in_flight(&self, endpoint: &'static str, delta: i64) {
        self.inner
            .rpc_in_flight
            .get_or_create(&EndpointLabel { endpoint })
            .inc_by(delta);
    }

    /// Whether `endpoint` is eligible (not cooling down).
    pub fn rpc_healthy(&self, endpoint: &'static str, healthy: bool) {
        self.inner
            .rpc_healthy
            .get_or_create(&EndpointLabel { endpoint })
            .set(i64::from(healthy));
    }
}

/// Handles on the Prometheus gauges that the OTLP observable instruments report.
struct Observed {
    sessions_active: Gauge,
    streams_active: Family<KindLabel, Gauge>,
    db_pool_max: Gauge,
    db_pool_in_use: Gauge,
    db_pool_waiting: Gauge,
    process_rss: Gauge,
    process_cpu: FloatCounter,
    runtime_busy: FloatGauge,
    runtime_alive_tasks: Gauge,
}

impl Otel {
    fn new(meter: &opentelemetry::metrics::Meter, observed: &Observed) -> Self {
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(otel_boundaries())
                .build()
        };
        let counter = |name: &'static str, description: &'static str| {
            meter
                .u64_counter(name)
                .with_description(description)
                .build()
        };
        Self {
            operation_duration: seconds(
                "mcp.server.operation.duration",
                "MCP requests by method, tool and error type",
            ),
            http_duration: seconds(
                "http.server.request.duration",
                "HTTP requests until the response body ended",
            ),
            db_duration: seconds(
                "db.client.operation.duration",
                "Redis and PostgreSQL operations",
            ),
            rpc_duration: seconds(
                "rpc.client.call.duration",
                "Upstream JSON-RPC requests by endpoint",
            ),
            cache_lookups: counter("shoal.cache.lookups", "Result-cache lookups by outcome"),
            sessions: counter(
                "shoal.sessions",
                "Legacy sessions created or restored on this replica",
            ),
            forwards: counter(
                "shoal.forwards",
                "Client messages forwarded to another replica",
            ),
            rejections: counter(
                "shoal.http.rejections",
                "HTTP requests rejected before MCP handling",
            ),
            auth_failures: counter(
                "shoal.auth.failures",
                "Requests refused by authentication, by reason",
            ),
            quota_rejections: counter(
                "shoal.quota.rejections",
                "Requests refused by a quota, by kind",
            ),
            scheduling_delay: seconds(
                "shoal.runtime.scheduling_delay",
                "Time a freshly spawned probe task waited to be polled",
            ),
            bus_roundtrip: seconds(
                "shoal.bus.roundtrip",
                "Round trip of a probe through the cluster bus",
            ),
            _observed: observed_instruments(meter, observed),
        }
    }
}

/// The OTLP instruments read at each export from the values the probe and the gauges keep; held
/// for as long as the meter provider exports them.
fn observed_instruments(
    meter: &opentelemetry::metrics::Meter,
    observed: &Observed,
) -> Vec<Box<dyn std::any::Any + Send + Sync>> {
    let mut instruments = integer_gauges(meter, observed);
    let busy = observed.runtime_busy.clone();
    instruments.push(Box::new(
        meter
            .f64_observable_gauge("shoal.runtime.busy_ratio")
            .with_unit("1")
            .with_description("Share of runtime worker time spent running tasks")
            .with_callback(move |observer| observer.observe(busy.get(), &[]))
            .build(),
    ));
    let cpu = observed.process_cpu.clone();
    instruments.push(Box::new(
        meter
            .f64_observable_counter("process.cpu.time")
            .with_unit("s")
            .with_description("CPU time used by the replica process")
            .with_callback(move |observer| observer.observe(cpu.get(), &[]))
            .build(),
    ));
    instruments
}

/// The integer gauges of [`observed_instruments`]: sessions, streams, the PostgreSQL pool, memory
/// and tasks.
fn integer_gauges(
    meter: &opentelemetry::metrics::Meter,
    observed: &Observed,
) -> Vec<Box<dyn std::any::Any + Send + Sync>> {
    let mut instruments = Vec::new();
    let sessions = observed.sessions_active.clone();
    instruments.push(i64_gauge(
        meter,
        "shoal.sessions.active",
        "{session}",
        "Legacy sessions with a worker on this replica",
        Box::new(move || vec![(sessions.get(), Vec::new())]),
    ));
    let streams = observed.streams_active.clone();
    instruments.push(i64_gauge(
        meter,
        "shoal.streams.active",
        "{stream}",
        "Open server-to-client streams on this replica",
        Box::new(move || {
            ["get", "listen"]
                .into_iter()
                .map(|kind| {
                    (
                        streams.get_or_create(&KindLabel { kind }).get(),
                        vec![KeyValue::new("kind", kind)],
                    )
                })
                .collect()
        }),
    ));
    let (max, in_use) = (
        observed.db_pool_max.clone(),
        observed.db_pool_in_use.clone(),
    );
    instruments.push(i64_gauge(
        meter,
        "db.client.connection.count",
        "{connection}",
        "PostgreSQL pool connections by state",
        Box::new(move || {
            let used = in_use.get();
            vec![
                (
                    used,
                    vec![KeyValue::new(attr::DB_CLIENT_CONNECTION_STATE, "used")],
                ),
                (
                    (max.get() - used).max(0),
                    vec![KeyValue::new(attr::DB_CLIENT_CONNECTION_STATE, "idle")],
                ),
            ]
        }),
    ));
    let waiting = observed.db_pool_waiting.clone();
    instruments.push(i64_gauge(
        meter,
        "db.client.connection.pending_requests",
        "{request}",
        "Tool calls waiting for a PostgreSQL connection",
        Box::new(move || vec![(waiting.get(), Vec::new())]),
    ));
    let rss = observed.process_rss.clone();
    instruments.push(i64_gauge(
        meter,
        "process.memory.usage",
        "By",
        "Resident set size of the replica process",
        Box::new(move || vec![(rss.get(), Vec::new())]),
    ));
    let tasks = observed.runtime_alive_tasks.clone();
    instruments.push(i64_gauge(
        meter,
        "shoal.runtime.alive_tasks",
        "{task}",
        "Tasks alive in the async runtime",
        Box::new(move || vec![(tasks.get(), Vec::new())]),
    ));
    instruments
}

/// An integer gauge whose callback reports what `read` returns (value and attributes).
fn i64_gauge(
    meter: &opentelemetry::metrics::Meter,
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    read: Box<dyn Fn() -> Vec<(i64, Vec<KeyValue>)> + Send + Sync>,
) -> Box<dyn std::any::Any + Send + Sync> {
    Box::new(
        meter
            .i64_observable_gauge(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |observer| {
                for (value, attributes) in read() {
                    observer.observe(value, &attributes);
                }
            })
            .build(),
    )
}

/// CPU time (user + system) used by this process so far, from `/proc/self/stat` through the
/// `procfs` crate, which converts clock ticks with the kernel's own rate (Linux only).
pub fn process_cpu_seconds() -> Option<f64> {
    #[cfg(target_os = "linux")]
    {
        let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
        let ticks = procfs::ticks_per_second();
        (ticks > 0).then(|| (stat.utime + stat.stime) as f64 / ticks as f64)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// The process's resident set size in bytes, with the kernel's page size (4 KiB, 16 KiB or
/// 64 KiB, as the kernel was built; Linux only).
fn resident_memory_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
        use procfs::WithCurrentSystemInfo as _;
        Some(stat.rss_bytes().get())
    }
    #[cfg(not(target_os = "linux"))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_their_labels() {
        let metrics = Metrics::new();
        metrics.sessions_active_add(2);
        metrics.streams_active_add("get", 1);
        metrics.mcp_request("tools/call", "ok", Duration::from_millis(3));
        metrics.http_rejection("body_too_large");
        let text = metrics.render();
        assert!(text.contains("shoal_sessions_active 2"), "{text}");
        assert!(
            text.contains("shoal_streams_active{kind=\"get\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("shoal_mcp_requests_total{method=\"tools/call\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("shoal_mcp_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains("shoal_http_rejections_total{reason=\"body_too_large\"} 1"),
            "{text}"
        );
    }

    /// The resident size is read with the kernel's page size: touching 64 MiB shows as about
    /// 64 MiB more (a wrong page size would scale the difference).
    #[cfg(target_os = "linux")]
    #[test]
    fn resident_memory_follows_what_the_process_touches() {
        let before = resident_memory_bytes().expect("rss");
        let block = std::hint::black_box(vec![1_u8; 64 << 20]);
        let after = resident_memory_bytes().expect("rss");
        let grown = after.saturating_sub(before);
        assert!(
            (60 << 20..=72 << 20).contains(&grown),
            "grew by {grown} bytes"
        );
        drop(block);
    }

    #[test]
    fn process_cpu_time_is_read_and_grows() {
        let before = process_cpu_seconds().expect("cpu time");
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(300) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let after = process_cpu_seconds().expect("cpu time");
        assert!(after > before, "{before} -> {after}");
    }
}
