//! The toolsets: groups of tools, resources and prompts enabled by `SHOAL_TOOLSETS`, each a value
//! implementing [`Toolset`] in a module of its own. Adding one: a module here, and one arm in
//! [`enabled`].

pub mod compute;
pub mod conformance;
pub mod kv;
pub mod mrtr;
pub mod postgres;
pub mod rpc;
pub mod time;

use std::sync::Arc;

use crate::toolbox::Toolset;

/// The toolsets this build knows.
pub const KNOWN_TOOLSETS: [&str; 6] = ["kv", "postgres", "rpc", "compute", "conformance", "time"];

/// The toolsets `SHOAL_TOOLSETS` enables; those whose backend is not configured stay off (logged).
///
/// # Errors
/// Names an unknown toolset, or a configuration a toolset refuses.
pub fn enabled(config: &shoal_shared::config::Config) -> Result<Vec<Arc<dyn Toolset>>, String> {
    let mut toolsets: Vec<Arc<dyn Toolset>> = Vec::new();
    for name in &config.tools.toolsets {
        let toolset: Arc<dyn Toolset> = match name.as_str() {
            "kv" => Arc::new(kv::Kv),
            "conformance" => Arc::new(conformance::Conformance),
            "compute" => Arc::new(compute::Compute),
            "time" => Arc::new(time::Time),
            "postgres" => match postgres::Postgres::from_config(config)? {
                Some(postgres) => Arc::new(postgres),
                None => continue,
            },
            "rpc" if !config.rpc.endpoints.is_empty() => Arc::new(rpc::Rpc),
            "rpc" => {
                tracing::info!("toolset rpc is off: SHOAL_RPC_ENDPOINTS is empty");
                continue;
            }
            other => {
                return Err(format!(
                    "unknown toolset {other:?} in SHOAL_TOOLSETS (known: {})",
                    KNOWN_TOOLSETS.join(", ")
                ));
            }
        };
        if !toolsets.iter().any(|t| t.name() == toolset.name()) {
            toolsets.push(toolset);
        }
    }
    Ok(toolsets)
}

/// Deserializes a model value from JSON built in code (static fixtures).
pub(crate) fn model<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("static model value matches its schema")
}

/// The `notifications/resources/updated` message for `uri` as logged for legacy sessions, linked
/// to the current span while tracing (see [`crate::mcp::trace::updated_message`]).
pub(crate) fn updated_notification(uri: &str) -> String {
    let message =
        crate::mcp::trace::updated_message(uri, shoal_shared::telemetry::current_traceparent());
    serde_json::to_string(&message).expect("a notification serializes")
}
