//! Logs, traces and OTLP metrics.
//!
//! - **Logs**: `tracing` with an `EnvFilter` (`RUST_LOG`, default `info`), JSON lines in production
//!   and text on a terminal. While tracing is on, each JSON line carries the `trace_id` and `span_id`
//!   of the span it was written in. Tool arguments and results are never logged; secrets never reach
//!   log output (`SecretString`).
//! - **Traces**: OpenTelemetry over OTLP (gRPC or HTTP/protobuf), configured by the standard
//!   `OTEL_*` variables, and off unless `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Off means free: [`otel_span!`](crate::otel_span) then
//!   yields `Span::none()` without touching the subscriber.
//! - **Metrics**: the same families as `/metrics`, pushed over OTLP when
//!   `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set (see
//!   [`crate::metrics`]).
//!
//! Spans are `tracing` spans of target [`SPAN_TARGET`], turned into OpenTelemetry spans by
//! `tracing-opentelemetry`; only that target reaches the exporter. Dynamic span names use the
//! `otel.name` field, the kind `otel.kind`, the status `otel.status_code`.

use std::{
    collections::HashMap,
    io::IsTerminal,
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use opentelemetry::{
    Context, KeyValue,
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource, metrics::SdkMeterProvider, propagation::TraceContextPropagator,
    trace::SdkTracerProvider,
};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter,
    filter::{FilterExt, filter_fn},
    fmt::{
        self, FmtContext, FormatEvent, FormatFields,
        format::Writer,
        time::{FormatTime, SystemTime},
    },
    prelude::*,
    registry::LookupSpan,
};

use crate::config::LogFormat;

/// The `tracing` target of every span exported over OTLP.
pub const SPAN_TARGET: &str = "shoal::otel";

static TRACES: AtomicBool = AtomicBool::new(false);
static METER: OnceLock<opentelemetry::metrics::Meter> = OnceLock::new();

/// Whether spans are being recorded and exported. Cheap: one relaxed atomic load.
#[inline]
pub fn tracing_enabled() -> bool {
    TRACES.load(Ordering::Relaxed)
}

/// The meter for OTLP metrics, when they are exported.
pub fn meter() -> Option<&'static opentelemetry::metrics::Meter> {
    METER.get()
}

/// An exported span of target [`SPAN_TARGET`] while tracing is on, `Span::none()` otherwise.
///
/// `otel_span!("name", field = value, ...)`: the fields are `tracing` fields; dotted names become
/// OpenTelemetry attributes as written.
#[macro_export]
macro_rules! otel_span {
    ($name:literal $(, $($fields:tt)*)?) => {
        if $crate::telemetry::tracing_enabled() {
            ::tracing::info_span!(target: "shoal::otel", $name $(, $($fields)*)?)
        } else {
            ::tracing::Span::none()
        }
    };
}

/// Like [`otel_span!`](crate::otel_span), but only inside an exported span: dependency calls made
/// by background work (the janitor, stream checkpoints, probes) would otherwise each start a trace
/// of their own.
#[macro_export]
macro_rules! otel_child_span {
    ($name:literal $(, $($fields:tt)*)?) => {
        if $crate::telemetry::in_exported_span() {
            ::tracing::info_span!(target: "shoal::otel", $name $(, $($fields)*)?)
        } else {
            ::tracing::Span::none()
        }
    };
}

/// Whether tracing is on and the current span is exported.
#[inline]
pub fn in_exported_span() -> bool {
    tracing_enabled()
        && tracing::Span::current()
            .metadata()
            .is_some_and(|meta| meta.target() == SPAN_TARGET)
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

fn resource(instance: &str) -> Resource {
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "shoal".to_owned());
    Resource::builder()
        .with_service_name(name)
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance.to_owned()),
        ])
        .build()
}

/// Installs the global subscriber and, when the environment asks for them, the OTLP exporters.
/// Call once, first thing in `main`, inside the Tokio runtime. `instance` names this replica
/// (`service.instance.id`).
pub fn init(format: LogFormat, instance: &str) -> TelemetryGuard {
    let settings = OtlpSettings::from_env();
    let mut guard = TelemetryGuard::default();
    let resource = resource(instance);
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

    let env_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Exported spans are for the exporter only: the log layer skips them (their fields would be
    // formatted for nothing) and finds trace ids through the OpenTelemetry context instead.
    let log_filter = env_filter.and(filter_fn(|meta| meta.target() != SPAN_TARGET));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let log_layer = if json {
        fmt::layer()
            .event_format(JsonWithTrace)
            .with_writer(std::io::stderr)
            .with_filter(log_filter)
            .boxed()
    } else {
        fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(log_filter)
            .boxed()
    };
    let otel_layer = tracer.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("shoal"))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false)
            .with_level(false)
            .with_filter(filter_fn(|meta| {
                meta.is_span() && meta.target() == SPAN_TARGET
            }))
    });
    let result = tracing_subscriber::registry()
        .with(log_layer)
        .with(otel_layer)
        .try_init();
    if let Err(error) = result {
        eprintln!("telemetry already initialised: {error}");
        return guard;
    }
    for error in errors {
        tracing::error!(%error, "OpenTelemetry export disabled");
    }
    if tracer.is_some() {
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

/// The W3C `traceparent` of `span`, when tracing is on and the span is recorded.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !tracing_enabled() || span.is_none() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// The W3C `traceparent` of the current span (see [`traceparent_of`]).
pub fn current_traceparent() -> Option<String> {
    if !tracing_enabled() {
        return None;
    }
    traceparent_of(&tracing::Span::current())
}

/// Makes `span` a child of the context named by `traceparent`, when there is one.
pub fn set_parent_from(span: &tracing::Span, traceparent: Option<&str>) {
    if span.is_none() {
        return;
    }
    if let Some(context) = traceparent.and_then(|tp| context_from_traceparent(tp, None)) {
        let _ = span.set_parent(context);
    }
}

/// Marks `span` failed with `error_type` (`error.type` and an error status).
pub fn mark_error(span: &tracing::Span, error_type: &str) {
    if span.is_none() {
        return;
    }
    span.set_attribute("error.type", error_type.to_owned());
    span.set_status(opentelemetry::trace::Status::error(error_type.to_owned()));
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
            let context = tracing::Span::current().context();
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
        let span = crate::otel_span!("probe", answer = 42);
        assert!(span.is_none());
        assert!(traceparent_of(&span).is_none());
    }
}
