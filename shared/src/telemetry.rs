//! Logging set-up: `tracing` with an `EnvFilter` (`RUST_LOG`, default `info`), JSON lines in
//! production and text on a terminal.
//!
//! Tool arguments and results are never logged; secrets never reach log output (`SecretString`).

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Keeps telemetry alive; dropping it flushes what is buffered. Hold it until `main` returns.
#[derive(Debug)]
pub struct TelemetryGuard {
    _private: (),
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    if let Err(error) = result {
        eprintln!("telemetry already initialised: {error}");
    }
    TelemetryGuard { _private: () }
}
