//! `shoal-otlp-sink`: a minimal OTLP backend that keeps spans in memory. It stands in for Jaeger
//! or an OpenTelemetry Collector where neither can be installed (tests, CI, the compose stack on
//! machines without registry access), and lets scripts check what a cluster exported:
//! `GET /api/spans` (JSON), `GET /api/metrics` (metric names) and `GET /api/stats` (counts) on the
//! HTTP port, next to
//! `POST /v1/traces` and `POST /v1/metrics`; gRPC on the other port.

use std::net::SocketAddr;

use clap::Parser;
use shoal_testkit::otlp::{DEFAULT_CAPACITY, OtlpReceiver};

/// Receive OTLP traces and metrics (gRPC and HTTP/protobuf) and serve them back as JSON.
#[derive(Debug, Parser)]
#[command(name = "shoal-otlp-sink", version)]
struct Args {
    /// gRPC listen address.
    #[arg(long, env = "SINK_GRPC_LISTEN", default_value = "127.0.0.1:4317")]
    grpc: SocketAddr,
    /// HTTP listen address (OTLP/HTTP and the JSON API).
    #[arg(long, env = "SINK_HTTP_LISTEN", default_value = "127.0.0.1:4318")]
    http: SocketAddr,
    /// Spans kept; the oldest are dropped past it. 0: count exports and bytes without decoding
    /// them (`GET /api/stats`), for benchmarks where the sink shares the machine.
    #[arg(long, env = "SINK_MAX_SPANS", default_value_t = DEFAULT_CAPACITY)]
    max_spans: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let receiver = OtlpReceiver::bind(args.grpc, args.http, args.max_spans).await?;
    eprintln!(
        "shoal-otlp-sink: gRPC {} HTTP {} (GET /api/spans, /api/metrics, /api/stats)",
        receiver.grpc_endpoint(),
        receiver.http_endpoint()
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    drop(receiver);
    Ok(())
}
