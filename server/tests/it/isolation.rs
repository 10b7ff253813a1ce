//! Request isolation: CPU-heavy calls that saturate their limit do not stop light calls.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::json;
use shoal_testkit::client::McpClient;

use crate::helpers::*;

#[tokio::test]
async fn light_calls_complete_while_heavy_calls_saturate_their_limit() {
    let mut options = cluster_options(1)
        .env("SHOAL_TOOLSETS", "kv,compute")
        .env("SHOAL_TOOL_QUEUE_TIMEOUT_MS", 100);
    options.redis = false;
    options.balancer = false;
    let topology = start(options).await;
    let url = topology.mcp_url();
    let base = topology.replicas[0].base_url();

    // Two clients keep both slots of `hash` taken with back-to-back heavy calls (distinct inputs:
    // nothing comes from the cache) until the light calls are done; single calls would end
    // (about 0.3 s each) before a loaded machine got through the checks below.
    let stop = Arc::new(AtomicBool::new(false));
    let mut heavy = Vec::new();
    for n in 0..2 {
        let client = McpClient::modern(&url);
        let stop = stop.clone();
        heavy.push(tokio::spawn(async move {
            let mut completed = 0_u32;
            for round in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let result = client
                    .call_tool(
                        "hash",
                        json!({"data": format!("heavy-{n}-{round}"), "rounds": 5_000_000}),
                    )
                    .await
                    .expect("hash");
                // A slot freed between two calls may go to the probe below: then this one is
                // refused as busy, which is the behaviour under test, not a failure.
                if result["isError"] != json!(true) {
                    assert_eq!(
                        result["structuredContent"]["rounds"],
                        json!(5_000_000),
                        "{result}"
                    );
                    completed += 1;
                } else {
                    assert!(text_of(&result).contains("busy"), "{result}");
                }
            }
            completed
        }));
    }
    eventually("both slots of hash to be taken", WAIT, async || {
        (metric(&base, "shoal_tool_calls_in_flight{tool=\"hash\"}").await == 2.0).then_some(())
    })
    .await;
    // Another heavy call is refused quickly: the limit is saturated. (It can slip into the gap
    // between two calls of a saturating client; it is then retried with new data.)
    let client = McpClient::modern(&url);
    let mut attempt = 0;
    let refused = eventually("a heavy call to be refused as busy", WAIT, async || {
        attempt += 1;
        let result = client
            .call_tool(
                "hash",
                json!({"data": format!("third-{attempt}"), "rounds": 5_000_000}),
            )
            .await
            .expect("hash");
        text_of(&result).contains("busy").then_some(result)
    })
    .await;
    assert_eq!(refused["isError"], json!(true));
    assert!(
        metric(
            &base,
            "shoal_tool_rejections_total{tool=\"hash\",outcome=\"busy\"}"
        )
        .await
            >= 1.0
    );

    // Light calls on the same replica complete meanwhile.
    let light = McpClient::modern(&url);
    for n in 0..20 {
        let result = light
            .call_tool("echo", json!({"text": format!("ping {n}")}))
            .await
            .expect("echo");
        assert_eq!(text_of(&result), format!("ping {n}"));
    }
    assert!(
        heavy.iter().all(|task| !task.is_finished()),
        "the heavy load was still running while the light calls completed"
    );
    stop.store(true, Ordering::SeqCst);
    for task in heavy {
        let completed = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("heavy calls finish")
            .expect("join");
        assert!(completed >= 1, "each heavy client completed calls");
    }
}
