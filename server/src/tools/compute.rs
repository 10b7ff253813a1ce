//! Toolset `compute`: CPU-bound tools. They run on the blocking thread pool, never on the async
//! workers, under a small concurrency limit, so heavy calls cannot starve light ones.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rmcp::{
    ErrorData as McpError, RoleServer, handler::server::wrapper::Parameters, model::CallToolResult,
    service::RequestContext, tool, tool_router,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use shoal_shared::cache::Freshness;

use crate::toolbox::{ToolHost, Toolset, policy::Declared};

/// The toolset.
#[derive(Debug)]
pub struct Compute;

impl Toolset for Compute {
    fn name(&self) -> &'static str {
        "compute"
    }

    fn router(&self) -> rmcp::handler::server::router::tool::ToolRouter<ToolHost> {
        ToolHost::compute_tools()
    }

    fn policies(&self) -> Vec<(String, Declared)> {
        policies()
    }
}

/// Most rounds of `hash`.
pub const MAX_ROUNDS: u32 = 5_000_000;

/// Policies of the toolset's tools.
pub fn policies() -> Vec<(String, Declared)> {
    // A pure function: results can be kept for long. Two concurrent calls per replica: one core
    // each, leaving the async workers room.
    vec![(
        "hash".into(),
        Declared::new(Freshness::Static)
            .limit(2)
            .timeout(Duration::from_secs(60)),
    )]
}

/// Arguments of `hash`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct HashParams {
    /// Text to hash.
    pub data: String,
    /// How many times to apply SHA-256 (1 to 5000000): the work, roughly 1 µs per round.
    pub rounds: u32,
}

fn iterate(data: &str, rounds: u32, cancelled: &AtomicBool) -> Option<[u8; 32]> {
    let mut digest: [u8; 32] = Sha256::digest(data.as_bytes()).into();
    for round in 1..rounds {
        if round % 10_000 == 0 && cancelled.load(Ordering::Relaxed) {
            return None;
        }
        digest = Sha256::digest(digest).into();
    }
    Some(digest)
}

#[tool_router(router = compute_tools, vis = "pub(crate)")]
impl ToolHost {
    #[tool(
        description = "Apply SHA-256 to the text the given number of times (1 to 5000000, about 1 µs each) and \
                       return the hex digest. CPU-bound: runs off the async workers with a small concurrency limit.",
        annotations(read_only_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn hash(
        &self,
        Parameters(params): Parameters<HashParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        if !(1..=MAX_ROUNDS).contains(&params.rounds) {
            return Ok(crate::toolbox::failed(format!(
                "rounds must be between 1 and {MAX_ROUNDS}"
            )));
        }
        let cancelled = Arc::new(AtomicBool::new(false));
        let flag = cancelled.clone();
        let watch = context.ct.clone();
        let watcher = tokio::spawn(async move {
            watch.cancelled().await;
            flag.store(true, Ordering::Relaxed);
        });
        let work =
            tokio::task::spawn_blocking(move || iterate(&params.data, params.rounds, &cancelled));
        let digest = work.await;
        watcher.abort();
        match digest {
            Ok(Some(digest)) => Ok(CallToolResult::structured(
                json!({"digest": hex::encode(digest), "rounds": params.rounds}),
            )),
            Ok(None) => Ok(crate::toolbox::failed("cancelled")),
            Err(error) => {
                Err(crate::mcp::error::Failure::internal("the hash worker", error).into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_chain_sha256() {
        let flag = AtomicBool::new(false);
        let once = iterate("abc", 1, &flag).expect("digest");
        assert_eq!(
            hex::encode(once),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let twice = iterate("abc", 2, &flag).expect("digest");
        assert_eq!(twice, <[u8; 32]>::from(Sha256::digest(once)));
        flag.store(true, Ordering::Relaxed);
        assert!(iterate("abc", 20_000, &flag).is_none());
    }
}
