//! §3.8: without `SHOAL_REDIS_URL` the same binary runs alone on in-memory backends, with the same
//! behaviour minus the cluster.

use serde_json::json;
use shoal_testkit::{client::McpClient, topology::TopologyOptions};

use crate::helpers::*;

fn embedded() -> TopologyOptions {
    let mut options = cluster_options(1);
    options.redis = false;
    options.balancer = false;
    options
}

#[tokio::test]
async fn embedded_default_serves_both_eras_alone() {
    let topology = start(embedded()).await;
    let url = topology.mcp_url();
    let health = reqwest::get(format!("{}/readyz", topology.replicas[0].base_url()))
        .await
        .expect("readyz");
    assert_eq!(health.status(), 200, "ready without Redis");

    // Legacy: subscribe, GET stream, notification, resume, DELETE.
    let client = legacy_client(&url).await;
    subscribe(&client, "kv://solo").await;
    let mut stream = client.open_get(None).await.expect("GET");
    call_ok(&client, "kv_set", json!({"key": "solo", "value": "1"})).await;
    let (first, _) = next_matching(&mut stream, "the first update", |m| {
        is_update_of(m, "kv://solo")
    })
    .await;
    drop(stream);
    call_ok(&client, "kv_set", json!({"key": "solo", "value": "2"})).await;
    let mut resumed = client.open_get(first.as_deref()).await.expect("resume");
    let (second, _) = next_matching(&mut resumed, "the missed update", |m| {
        is_update_of(m, "kv://solo")
    })
    .await;
    assert_ne!(first, second);
    let exchange = call_ok(&client, "kv_get", json!({"key": "solo"})).await;
    assert_eq!(text_of(exchange.result().expect("result")), "2");
    assert_eq!(client.delete().await.expect("DELETE"), 204);
    assert_eq!(
        client
            .request("tools/list", serde_json::Value::Null)
            .await
            .expect("request")
            .status,
        404
    );

    // 2026-07-28: listen and a change.
    let listener = McpClient::modern(&url);
    let (_, mut listen) = listener
        .open_request(
            "subscriptions/listen",
            json!({"notifications": {"resourceSubscriptions": ["kv://solo"]}}),
        )
        .await
        .expect("listen");
    acknowledged(&mut listen).await;
    let writer = McpClient::modern(&url);
    call_ok(&writer, "kv_set", json!({"key": "solo", "value": "3"})).await;
    next_matching(&mut listen, "the update", |m| is_update_of(m, "kv://solo")).await;
}
