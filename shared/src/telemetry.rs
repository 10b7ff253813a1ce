//! Logs, traces and OTLP metrics.
//!
//! - **Logs**: `tracing` with an `EnvFilter` (`RUST_LOG`, default `info`), JSON lines in production
//!   and text on a terminal. While tracing is on, each JSON line carries the `trace_id` and `span_id`
//!   of the span it was written in. Tool arguments and results are never logged; secrets never reach
//!   log output (`SecretString`).
//! - **Traces**: OpenTelemetry over OTLP (gRPC or HTTP/protobuf), configured by the standard
//!   `OTEL_*` variables, and off unless `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Off means free: every constructor of [`Span`] then
//!   returns [`Span::none`] after one relaxed atomic load, before building a single attribute.
//! - **Metrics**: the same families as `/metrics`, pushed over OTLP when
//!   `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set (see
//!   [`crate::metrics`]).
//!
//! Spans go straight to the OpenTelemetry SDK (no `tracing` bridge: it cost several microseconds
//! per span). The current span travels with futures through the OpenTelemetry [`Context`]:
//! [`Span::wrap`] attaches it while the future is polled, and children started with
//! [`Span::child`] find their parent there.

use std::{
    borrow::Cow,
    collections::HashMap,
    future::Future,
    io::IsTerminal,
    pin::Pin,
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    task::Poll,
};

pub use opentelemetry::{Context, KeyValue, trace::SpanKind};
use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{Link, SpanBuilder, Status, TraceContextExt, Tracer as _, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    metrics::SdkMeterProvider,
    propagation::TraceContextPropagator,
    trace::{SdkTracerProvider, Tracer},
};
use tracing::{Event, Subscriber};
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        self, FmtContext, FormatEvent, FormatFields,
        format::Writer,
        time::{FormatTime, SystemTime},
    },
    prelude::*,
    registry::LookupSpan,
};

use crate::config::LogFormat;

static TRACES: AtomicBool = AtomicBool::new(false);
static METER: OnceLock<opentelemetry::metrics::Meter> = OnceLock::new();
static TRACER: OnceLock<Tracer> = OnceLock::new();

/// Attribute keys of spans and metrics, written once. Semantic-convention names where one exists
/// (`docs/telemetry.md` lists them with their meaning), `shoal.*` for shoal's own.
pub mod attr {
    // OpenTelemetry semantic conventions
    /// `db.client.connection.state`
    pub const DB_CLIENT_CONNECTION_STATE: &str = "db.client.connection.state";
    /// `db.collection.name`
    pub const DB_COLLECTION_NAME: &str = "db.collection.name";
    /// `db.operation.name`
    pub const DB_OPERATION_NAME: &str = "db.operation.name";
    /// `db.response.returned_rows`
    pub const DB_RESPONSE_RETURNED_ROWS: &str = "db.response.returned_rows";
    /// `db.system.name`
    pub const DB_SYSTEM_NAME: &str = "db.system.name";
    /// `enduser.id`: the authenticated principal's name (never a credential).
    pub const ENDUSER_ID: &str = "enduser.id";
    /// `error.type`
    pub const ERROR_TYPE: &str = "error.type";
    /// `http.request.method`
    pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
    /// `http.response.status_code`
    pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
    /// `http.route`
    pub const HTTP_ROUTE: &str = "http.route";
    /// `network.protocol.name`
    pub const NETWORK_PROTOCOL_NAME: &str = "network.protocol.name";
    /// `network.protocol.version`
    pub const NETWORK_PROTOCOL_VERSION: &str = "network.protocol.version";
    /// `rpc.method`
    pub const RPC_METHOD: &str = "rpc.method";
    /// `rpc.response.status_code`
    pub const RPC_RESPONSE_STATUS_CODE: &str = "rpc.response.status_code";
    /// `rpc.system.name`
    pub const RPC_SYSTEM_NAME: &str = "rpc.system.name";
    /// `server.address`
    pub const SERVER_ADDRESS: &str = "server.address";
    /// `url.path`
    pub const URL_PATH: &str = "url.path";
    /// `url.scheme`
    pub const URL_SCHEME: &str = "url.scheme";
    // MCP and GenAI semantic conventions
    /// `gen_ai.operation.name`
    pub const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
    /// `gen_ai.prompt.name`
    pub const GEN_AI_PROMPT_NAME: &str = "gen_ai.prompt.name";
    /// `gen_ai.tool.name`
    pub const GEN_AI_TOOL_NAME: &str = "gen_ai.tool.name";
    /// `jsonrpc.request.id`
    pub const JSONRPC_REQUEST_ID: &str = "jsonrpc.request.id";
    /// `mcp.method.name`
    pub const MCP_METHOD_NAME: &str = "mcp.method.name";
    /// `mcp.protocol.version`
    pub const MCP_PROTOCOL_VERSION: &str = "mcp.protocol.version";
    /// `mcp.resource.uri`
    pub const MCP_RESOURCE_URI: &str = "mcp.resource.uri";
    /// `mcp.session.id`: the attribute of the MCP semantic conventions, so OTLP backends that
    /// follow them group a session's spans. It carries the session's tag ([`super::session_tag`]),
    /// never the id itself (a bearer credential).
    pub const MCP_SESSION_ID: &str = "mcp.session.id";
    // shoal's own
    /// `shoal.cache.outcome`
    pub const SHOAL_CACHE_OUTCOME: &str = "shoal.cache.outcome";
    /// `shoal.cache.ttl_ms`
    pub const SHOAL_CACHE_TTL_MS: &str = "shoal.cache.ttl_ms";
    /// `shoal.replica.name`
    pub const SHOAL_REPLICA_NAME: &str = "shoal.replica.name";
    /// `shoal.rpc.endpoint`
    pub const SHOAL_RPC_ENDPOINT: &str = "shoal.rpc.endpoint";
    /// `shoal.rpc.outcome`
    pub const SHOAL_RPC_OUTCOME: &str = "shoal.rpc.outcome";
    /// `shoal.session.restored`
    pub const SHOAL_SESSION_RESTORED: &str = "shoal.session.restored";
}

/// Whether spans are being recorded and exported. Cheap: one relaxed atomic load.
#[inline]
pub fn tracing_enabled() -> bool {
    TRACES.load(Ordering::Relaxed)
}

/// The meter for OTLP metrics, when they are exported.
pub fn meter() -> Option<&'static opentelemetry::metrics::Meter> {
    METER.get()
}

/// Where the OTLP exporters send, from the standard environment variables.
#[derive(Debug, Clone, Default)]
pub struct OtlpSettings {
    /// Export spans.
    pub traces: bool,
    /// Export metrics.
    pub metrics: bool,
}

impl OtlpSettings {
    /// Reads `OTEL_SDK_DISABLED`, `OTEL_{TRACES,METRICS}_EXPORTER` and the endpoint variables.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Self::default();
        }
        let generic = var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
        let exporter_on = |name: &str| var(name).is_none_or(|v| v.trim() != "none");
        Self {
            traces: (generic || var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some())
                && exporter_on("OTEL_TRACES_EXPORTER"),
            metrics: (generic || var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").is_some())
                && exporter_on("OTEL_METRICS_EXPORTER"),
        }
    }
}

/// Keeps telemetry alive; dropping it flushes and shuts down the exporters. Hold it until `main`
/// returns.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take()
            && let Err(error) = tracer.shutdown()
        {
            eprintln!("flushing spans failed: {error}");
        }
        if let Some(meter) = self.meter.take()
            && let Err(error) = meter.shutdown()
        {
            eprintln!("flushing metrics failed: {error}");
        }
    }
}

fn resource(instance: &str, replica_name: Option<&str>) -> Resource {
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "shoal".to_owned());
    Resource::builder()
        .with_service_name(service)
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance.to_owned()),
        ])
        .with_attributes(
            replica_name.map(|name| KeyValue::new(attr::SHOAL_REPLICA_NAME, name.to_owned())),
        )
        .build()
}

/// The keyed hash of the session tags (see [`session_tag`]), its key already absorbed: each tag
/// clones it and hashes only the session id.
static SESSION_TAG_MAC: OnceLock<hmac::Hmac<sha2::Sha256>> = OnceLock::new();
/// How long a session tag is (hex digits): enough to tell sessions apart in a trace backend.
const SESSION_TAG_LEN: usize = 16;

/// Sets the key of [`session_tag`] (the first call wins: one key per process).
pub fn set_session_tag_key(key: Vec<u8>) {
    use hmac::KeyInit as _;
    if let Ok(mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key) {
        let _ = SESSION_TAG_MAC.set(mac);
    }
}

/// Whether [`set_session_tag_key`] was called.
pub fn session_tag_key_set() -> bool {
    SESSION_TAG_MAC.get().is_some()
}

/// What logs and spans carry instead of a session id, which is a bearer credential: a keyed hash
/// (HMAC-SHA-256, truncated to 16 hex digits), the same on every replica sharing the key so one
/// session's spans still group, and useless for taking the session over. `None` until the key is
/// set (then telemetry carries nothing of the session).
pub fn session_tag(session: &str) -> Option<String> {
    use hmac::Mac as _;
    let mut mac = SESSION_TAG_MAC.get()?.clone();
    mac.update(session.as_bytes());
    let mut tag = hex::encode(mac.finalize().into_bytes());
    tag.truncate(SESSION_TAG_LEN);
    Some(tag)
}

/// The log filter when `RUST_LOG` is unset: `info`, but rmcp only from `warn` (rmcp logs every new
/// session id at `info`, and a session id is a bearer credential).
pub const DEFAULT_LOG_FILTER: &str = "info,rmcp=warn";

/// Installs the global subscriber and, when the environment asks for them, the OTLP exporters.
/// Call once, first thing in `main`, inside the Tokio runtime. `instance` is this replica's
/// generated id (`service.instance.id`), `name` its optional human name (`shoal.replica.name`).
pub fn init(format: LogFormat, instance: &str, name: Option<&str>) -> TelemetryGuard {
    let settings = OtlpSettings::from_env();
    let mut guard = TelemetryGuard::default();
    let resource = resource(instance, name);
    let mut errors = Vec::new();

    let tracer = if settings.traces {
        match opentelemetry_otlp::SpanExporter::builder().build() {
            Ok(exporter) => Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource.clone())
                    .build(),
            ),
            Err(error) => {
                errors.push(format!("OTLP span exporter: {error}"));
                None
            }
        }
    } else {
        None
    };
    if settings.metrics {
        match opentelemetry_otlp::MetricExporter::builder().build() {
            Ok(exporter) => {
                let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build();
                let provider = SdkMeterProvider::builder()
                    .with_reader(reader)
                    .with_resource(resource)
                    .build();
                let _ = METER.set(opentelemetry::metrics::MeterProvider::meter(
                    &provider, "shoal",
                ));
                guard.meter = Some(provider);
            }
            Err(error) => errors.push(format!("OTLP metric exporter: {error}")),
        }
    }

    let env_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let log_layer = if json {
        fmt::layer()
            .event_format(JsonWithTrace)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).boxed()
    };
    let result = tracing_subscriber::registry()
        .with(env_filter)
        .with(log_layer)
        .try_init();
    if let Err(error) = result {
        eprintln!("telemetry already initialised: {error}");
        return guard;
    }
    for error in errors {
        tracing::error!(%error, "OpenTelemetry export disabled");
    }
    if let Some(provider) = &tracer {
        let _ = TRACER.set(provider.tracer("shoal"));
        TRACES.store(true, Ordering::Relaxed);
        tracing::info!("exporting traces over OTLP");
    }
    if guard.meter.is_some() {
        tracing::info!("exporting metrics over OTLP");
    }
    guard.tracer = tracer;
    guard
}

/// The trace context named by a W3C `traceparent` (and optional `tracestate`), if it parses.
pub fn context_from_traceparent(traceparent: &str, tracestate: Option<&str>) -> Option<Context> {
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let context = TraceContextPropagator::new().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

fn traceparent_of_context(context: &Context) -> Option<String> {
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(context, &mut carrier);
    carrier.remove("traceparent")
}

/// The W3C `traceparent` of the current span, while tracing and inside a span.
pub fn current_traceparent() -> Option<String> {
    if !tracing_enabled() {
        return None;
    }
    traceparent_of_context(&Context::current())
}

/// Where a new span hangs.
#[derive(Debug)]
pub enum Parent<'a> {
    /// The current span, if any; else the span starts a trace.
    Current,
    /// This context (a remote parent from a `traceparent`, or a span's); none starts a trace.
    Context(Option<&'a Context>),
}

/// A span, or nothing while tracing is off. It ends when dropped. Cheap to create when off: the
/// constructors check [`tracing_enabled`] before running the attribute closure.
#[derive(Debug, Default)]
#[must_use = "a span ends when dropped"]
pub struct Span {
    context: Option<Context>,
}

impl Span {
    /// No span.
    pub const fn none() -> Self {
        Self { context: None }
    }

    /// A span named `name` of `kind` under `parent`, with the attributes `attributes` returns
    /// (called only while tracing).
    pub fn start(
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: Parent<'_>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Self {
        Self::start_linked(name, kind, parent, None, attributes)
    }

    /// Like [`Span::start`], with a link to `link` (a span of another trace, or the publisher of a
    /// message).
    pub fn start_linked(
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: Parent<'_>,
        link: Option<&Context>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Self {
        if !tracing_enabled() {
            return Self::none();
        }
        let Some(tracer) = TRACER.get() else {
            return Self::none();
        };
        let current;
        let parent = match parent {
            Parent::Current => {
                current = Context::current();
                &current
            }
            Parent::Context(Some(context)) => context,
            Parent::Context(None) => {
                current = Context::new();
                &current
            }
        };
        let mut builder = SpanBuilder::from_name(name)
            .with_kind(kind)
            .with_attributes(attributes());
        if let Some(link) = link {
            let link = link.span().span_context().clone();
            if link.is_valid() {
                builder = builder.with_links(vec![Link::with_context(link)]);
            }
        }
        let span = tracer.build_with_context(builder, parent);
        Self {
            context: Some(parent.with_span(span)),
        }
    }

    /// A child of the current span, only inside one: dependency calls made by background work
    /// (the janitor, stream checkpoints, probes) would otherwise each start a trace of their own.
    pub fn child(
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Self {
        if !tracing_enabled() || !Context::current().has_active_span() {
            return Self::none();
        }
        Self::start(name, kind, Parent::Current, attributes)
    }

    /// Whether there is no span (tracing off, or not inside a traced request).
    pub fn is_none(&self) -> bool {
        self.context.is_none()
    }

    /// Whether the span records (it exists and was sampled): attributes are worth computing.
    pub fn is_recording(&self) -> bool {
        self.context
            .as_ref()
            .is_some_and(|context| context.span().is_recording())
    }

    /// Sets an attribute (when recording).
    pub fn set(&self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(context) = &self.context {
            let span = context.span();
            if span.is_recording() {
                span.set_attribute(KeyValue::new(key, value));
            }
        }
    }

    /// Renames the span (when recording).
    pub fn rename(&self, name: impl Into<Cow<'static, str>>) {
        if let Some(context) = &self.context {
            let span = context.span();
            if span.is_recording() {
                span.update_name(name);
            }
        }
    }

    /// Marks the span failed with `error_type` (`error.type` and an error status).
    pub fn mark_error(&self, error_type: &str) {
        if let Some(context) = &self.context {
            let span = context.span();
            if span.is_recording() {
                span.set_attribute(KeyValue::new(attr::ERROR_TYPE, error_type.to_owned()));
                span.set_status(Status::error(error_type.to_owned()));
            }
        }
    }

    /// The span's context (to pass to another task as a parent).
    pub fn context(&self) -> Option<&Context> {
        self.context.as_ref()
    }

    /// The span's W3C `traceparent`.
    pub fn traceparent(&self) -> Option<String> {
        self.context.as_ref().and_then(traceparent_of_context)
    }

    /// `future`, polled with this span as the current one.
    pub fn wrap<F: Future>(&self, future: F) -> Traced<F> {
        Traced {
            future,
            context: self.context.clone(),
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(context) = &self.context {
            context.span().end();
        }
    }
}

pin_project_lite::pin_project! {
    /// A future polled with a span as the current one (see [`Span::wrap`]).
    #[derive(Debug)]
    pub struct Traced<F> {
        #[pin]
        future: F,
        context: Option<Context>,
    }
}

impl<F: Future> Future for Traced<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _guard = this
            .context
            .as_ref()
            .map(|context| context.clone().attach());
        this.future.poll(cx)
    }
}

/// JSON log lines in the shape of `tracing-subscriber`'s JSON format (`timestamp`, `level`,
/// `target`, `fields`), plus `trace_id` and `span_id` while tracing is on.
struct JsonWithTrace;

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut timestamp = String::with_capacity(32);
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut fields = serde_json::Map::new();
        event.record(&mut JsonVisitor(&mut fields));
        let meta = event.metadata();
        let mut line = serde_json::Map::with_capacity(6);
        line.insert("timestamp".into(), timestamp.into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        line.insert("fields".into(), fields.into());
        if tracing_enabled() {
            let context = Context::current();
            let span = context.span();
            let span_context = span.span_context();
            if span_context.is_valid() {
                line.insert(
                    "trace_id".into(),
                    span_context.trace_id().to_string().into(),
                );
                line.insert("span_id".into(), span_context.span_id().to_string().into());
            }
        }
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.0
            .insert(field.name().to_owned(), value.to_string().into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_or_are_refused() {
        let context = context_from_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        )
        .expect("valid");
        assert_eq!(
            context.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(context_from_traceparent("00-nope", None).is_none());
        assert!(
            context_from_traceparent(
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                None
            )
            .is_none()
        );
    }

    #[test]
    fn spans_are_free_while_tracing_is_off() {
        assert!(!tracing_enabled());
        let span = Span::start("probe", SpanKind::Internal, Parent::Current, || {
            unreachable!("attributes are not built while tracing is off")
        });
        assert!(span.is_none());
        assert!(span.traceparent().is_none());
        assert!(current_traceparent().is_none());
    }
}
