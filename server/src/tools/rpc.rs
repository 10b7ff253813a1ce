//! Toolset `rpc`: JSON-RPC calls to the configured upstream endpoints (`SHOAL_RPC_ENDPOINTS`),
//! balanced and failed over client-side (`shoal_shared::rpc`). Solana-style helpers for the
//! common reads, and a generic call limited to an allow-list of methods.

use std::time::Duration;

use rmcp::{
    ErrorData as McpError, handler::server::wrapper::Parameters, model::CallToolResult, tool,
    tool_router,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use shoal_shared::{cache::Freshness, rpc::RpcPool};

use crate::toolbox::{ToolHost, Toolset, policy::Declared};

/// The toolset (on only with `SHOAL_RPC_ENDPOINTS`).
#[derive(Debug)]
pub struct Rpc;

impl Toolset for Rpc {
    fn name(&self) -> &'static str {
        "rpc"
    }

    fn needs(&self) -> crate::toolbox::Needs {
        crate::toolbox::Needs {
            rpc: true,
            ..Default::default()
        }
    }

    fn router(&self) -> rmcp::handler::server::router::tool::ToolRouter<ToolHost> {
        ToolHost::rpc_tools()
    }

    fn policies(&self) -> Vec<(String, Declared)> {
        policies()
    }
}

/// Policies of the toolset's tools.
pub fn policies() -> Vec<(String, Declared)> {
    vec![
        // Balances move with every transaction: seconds, shared by everyone asking about an address.
        (
            "get_balance".into(),
            Declared::new(Freshness::Dynamic).ttl(Duration::from_secs(10)),
        ),
        // The slot advances twice a second: a one-second cache still absorbs bursts.
        (
            "get_slot".into(),
            Declared::new(Freshness::Realtime).ttl(Duration::from_secs(1)),
        ),
        ("rpc_call".into(), Declared::new(Freshness::Realtime)),
    ]
}

/// Arguments of `get_balance`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct BalanceParams {
    /// Account address (base58, 32 to 44 characters).
    pub address: String,
}

/// Arguments of `rpc_call`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct CallParams {
    /// JSON-RPC method; must be on the operator's allow-list (SHOAL_RPC_ALLOWED_METHODS).
    pub method: String,
    /// Parameters (an array or an object), as the method expects.
    #[serde(default)]
    pub params: Option<Value>,
}

fn valid_address(address: &str) -> bool {
    (32..=44).contains(&address.len())
        && address
            .chars()
            .all(|c| c.is_ascii_alphanumeric() && !matches!(c, '0' | 'O' | 'I' | 'l'))
}

impl ToolHost {
    fn upstreams(&self) -> Result<&RpcPool, McpError> {
        self.state.rpc.as_ref().ok_or_else(|| {
            crate::mcp::error::Failure::internal("the rpc toolset", "used while not configured")
                .into()
        })
    }

    async fn upstream(&self, method: &str, params: Value) -> Result<CallToolResult, McpError> {
        match self.upstreams()?.call(method, params).await {
            Ok(result) => Ok(CallToolResult::structured(json!({"result": result}))),
            Err(error) => Ok(crate::mcp::error::Failure::Upstream(error).into_tool_result()),
        }
    }
}

#[tool_router(router = rpc_tools, vis = "pub(crate)")]
impl ToolHost {
    #[tool(
        description = "Get the balance of an account, in lamports, from the configured JSON-RPC nodes (Solana \
                       getBalance). Cached for a few seconds and shared between callers.",
        annotations(read_only_hint = true, open_world_hint = true)
    )]
    async fn get_balance(
        &self,
        Parameters(params): Parameters<BalanceParams>,
    ) -> Result<CallToolResult, McpError> {
        if !valid_address(&params.address) {
            return Ok(crate::toolbox::failed(
                "address must be 32 to 44 base58 characters",
            ));
        }
        self.upstream("getBalance", json!([params.address])).await
    }

    #[tool(
        description = "Get the current slot from the configured JSON-RPC nodes (Solana getSlot).",
        annotations(read_only_hint = true, open_world_hint = true)
    )]
    async fn get_slot(&self) -> Result<CallToolResult, McpError> {
        self.upstream("getSlot", json!([])).await
    }

    #[tool(
        description = "Call a JSON-RPC method on the configured nodes. Only methods on the operator's allow-list are \
                       accepted; the answer is the method's `result`.",
        annotations(read_only_hint = true, open_world_hint = true)
    )]
    async fn rpc_call(
        &self,
        Parameters(params): Parameters<CallParams>,
    ) -> Result<CallToolResult, McpError> {
        if !self
            .state
            .config
            .rpc
            .allowed_methods
            .contains(&params.method)
        {
            return Ok(crate::toolbox::failed(format!(
                "method {} is not allowed; allowed: {}",
                params.method,
                self.state.config.rpc.allowed_methods.join(", ")
            )));
        }
        self.upstream(&params.method, params.params.unwrap_or_else(|| json!([])))
            .await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_are_base58() {
        assert!(super::valid_address(
            "4Nd1mYQ9P8Ew7ZsDMhCXHqkuhbuBFvf6VGK2mX4EdhyS"
        ));
        assert!(!super::valid_address("short"));
        assert!(!super::valid_address(
            "0Nd1mYQ9P8Ew7ZsDMhCXHqkuhbuBFvf6VGK2mX4Edhy"
        ));
    }
}
