//! Request isolation: CPU-heavy calls that saturate their limit do not stop light calls.

use std::time::Duration;

use serde_json::json;
use shoal_shared::testkit::client::McpClient;

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

    // Two heavy calls take both slots of `hash` (distinct inputs: nothing comes from the cache).
    let mut heavy = tokio::task::JoinSet::new();
    for n in 0..2 {
        let client = McpClient::modern(&url);
        heavy.spawn(async move {
            client
                .call_tool(
                    "hash",
                    json!({"data": format!("heavy-{n}"), "rounds": 3_000_000}),
                )
                .await
                .expect("hash")
        });
    }
    eventually("both slots of hash to be taken", WAIT, async || {
        (metric(&base, "shoal_tool_calls_in_flight{tool=\"hash\"}").await == 2.0).then_some(())
    })
    .await;
    // A third heavy call is refused at once: the limit is saturated.
    let client = McpClient::modern(&url);
    let refused = client
        .call_tool("hash", json!({"data": "third", "rounds": 5_000_000}))
        .await
        .expect("hash");
    assert!(text_of(&refused).contains("busy"), "{refused}");
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
    assert_eq!(heavy.len(), 2);
    assert!(
        heavy.try_join_next().is_none(),
        "the heavy calls were still running while the light ones completed"
    );
    while let Some(joined) = tokio::time::timeout(Duration::from_secs(120), heavy.join_next())
        .await
        .expect("heavy calls finish")
    {
        let result = joined.expect("join");
        assert_eq!(
            result["structuredContent"]["rounds"],
            json!(3_000_000),
            "{result}"
        );
    }
}
