//! The rpc toolset's client-side load balancing and fallback, against fake upstreams started by
//! the test (the real JSON-RPC nodes cannot be reached from here).

use std::time::Duration;

use serde_json::{Value, json};
use shoal_testkit::{
    client::McpClient,
    topology::Topology,
    upstream::{Behavior, FakeUpstream},
};

use crate::helpers::*;

async fn rpc_replica(endpoints: &[String], env: &[(&str, &str)]) -> Topology {
    let mut options = cluster_options(1)
        .env("SHOAL_TOOLSETS", "rpc")
        .env("SHOAL_RPC_ENDPOINTS", endpoints.join(","))
        .env("SHOAL_RPC_TIMEOUT_MS", 500);
    for (key, value) in env {
        options = options.env(key, value);
    }
    options.redis = false;
    options.balancer = false;
    start(options).await
}

/// `rpc_call getSlot`: realtime, so never cached; every call reaches an upstream.
async fn get_slot(client: &McpClient) -> Value {
    client
        .call_tool("rpc_call", json!({"method": "getSlot"}))
        .await
        .expect("rpc_call")
}

#[tokio::test]
async fn slow_endpoints_get_little_traffic_and_timeouts_fall_back() {
    let fast = FakeUpstream::start(Behavior::Healthy)
        .await
        .expect("upstream");
    let slow = FakeUpstream::start(Behavior::Slow(Duration::from_millis(150)))
        .await
        .expect("upstream");
    let stuck = FakeUpstream::start(Behavior::Slow(Duration::from_secs(5)))
        .await
        .expect("upstream");
    let topology = rpc_replica(&[fast.url(), slow.url(), stuck.url()], &[]).await;
    let client = McpClient::modern(topology.mcp_url());
    for _ in 0..60 {
        let result = get_slot(&client).await;
        assert_ne!(
            result["isError"],
            json!(true),
            "every call succeeds: {result}"
        );
        assert_eq!(result["structuredContent"]["result"], json!(1234));
    }
    assert!(
        fast.requests() >= 50,
        "the fast endpoint took most calls: fast {}, slow {}",
        fast.requests(),
        slow.requests()
    );
    assert!(
        slow.requests() <= 6,
        "the slow endpoint got little traffic: {}",
        slow.requests()
    );
    assert!(
        stuck.requests() <= 1,
        "the stuck endpoint timed out once and cooled down: {}",
        stuck.requests()
    );
}

#[tokio::test]
async fn dead_and_rate_limited_endpoints_are_skipped() {
    let healthy = FakeUpstream::start(Behavior::Healthy)
        .await
        .expect("upstream");
    let limited = FakeUpstream::start(Behavior::RateLimited(60))
        .await
        .expect("upstream");
    let failing = FakeUpstream::start(Behavior::Failing)
        .await
        .expect("upstream");
    let dead = FakeUpstream::dead_url();
    // Four attempts per call: with three of four endpoints bad, the default of three attempts
    // could spend a call on the bad ones before they are known (and cooled down).
    let topology = rpc_replica(
        &[healthy.url(), limited.url(), failing.url(), dead.clone()],
        &[("SHOAL_RPC_MAX_ATTEMPTS", "4")],
    )
    .await;
    let client = McpClient::modern(topology.mcp_url());
    for _ in 0..40 {
        let result = get_slot(&client).await;
        assert_ne!(
            result["isError"],
            json!(true),
            "every call falls back to the healthy endpoint: {result}"
        );
    }
    assert!(
        limited.requests() <= 1,
        "a 429 moved traffic elsewhere (Retry-After 60 s): {}",
        limited.requests()
    );
    assert!(
        failing.requests() <= 1,
        "a 5xx cooled the endpoint down: {}",
        failing.requests()
    );
    let base = topology.replicas[0].base_url();
    let dead_label = dead.trim_start_matches("http://").trim_end_matches('/');
    let dead_attempts = metric(
        &base,
        &format!("shoal_rpc_requests_total{{endpoint=\"{dead_label}\",outcome=\"failed\"}}"),
    )
    .await;
    assert!(
        dead_attempts <= 1.0,
        "the dead endpoint is not tried again during its cool-down: {dead_attempts}"
    );
    assert_eq!(
        metric(
            &base,
            &format!("shoal_rpc_endpoint_healthy{{endpoint=\"{dead_label}\"}}")
        )
        .await,
        0.0
    );
    assert!(healthy.requests() >= 37, "{}", healthy.requests());
}

#[tokio::test]
async fn all_endpoints_down_is_a_clear_error() {
    let failing = FakeUpstream::start(Behavior::Failing)
        .await
        .expect("upstream");
    let topology = rpc_replica(&[FakeUpstream::dead_url(), failing.url()], &[]).await;
    let client = McpClient::modern(topology.mcp_url());
    let result = get_slot(&client).await;
    assert_eq!(result["isError"], json!(true), "{result}");
    let text = text_of(&result);
    assert!(text.contains("no upstream endpoint answered"), "{text}");
    assert!(
        text.contains("HTTP 500") && text.contains("connection failed"),
        "names each failure: {text}"
    );
    // And right after, while both cool down, the error says so instead of hammering them.
    let again = get_slot(&client).await;
    assert!(text_of(&again).contains("cooling down"), "{again}");
    // Methods outside the allow-list are refused without reaching any endpoint.
    let before = failing.requests();
    let refused = client
        .call_tool(
            "rpc_call",
            json!({"method": "sendTransaction", "params": []}),
        )
        .await
        .expect("call");
    assert!(text_of(&refused).contains("not allowed"), "{refused}");
    assert_eq!(failing.requests(), before);
}

/// Security review, finding 12: an upstream can neither exhaust a replica's memory with a huge
/// reply nor crash a request with an absurd `Retry-After`, and credentials in an endpoint URL
/// reach no label, log line or client-visible error.
#[tokio::test]
async fn hostile_upstreams_are_bounded_and_endpoint_secrets_stay_private() {
    let huge = FakeUpstream::start(Behavior::Huge(1_000_000))
        .await
        .expect("upstream");
    let topology = rpc_replica(&[huge.url()], &[("SHOAL_RPC_MAX_RESPONSE_BYTES", "65536")]).await;
    let client = McpClient::modern(topology.mcp_url());
    let result = get_slot(&client).await;
    assert_eq!(result["isError"], json!(true), "{result}");
    assert!(text_of(&result).contains("reply too large"), "{result}");
    drop(topology);

    // Retry-After far beyond any Instant: the attempt fails, the replica keeps serving.
    let limited = FakeUpstream::start(Behavior::RateLimited(u64::MAX))
        .await
        .expect("upstream");
    let failing = FakeUpstream::start(Behavior::Failing)
        .await
        .expect("upstream");
    let with_secrets = failing
        .url()
        .replace("http://", "http://operator:SECRETPASS@")
        + "v1/SECRETPATH?api-key=SECRETQUERY";
    let mut topology = rpc_replica(
        &[limited.url(), with_secrets],
        &[("SHOAL_RPC_MAX_ATTEMPTS", "2")],
    )
    .await;
    let client = McpClient::modern(topology.mcp_url());
    let result = get_slot(&client).await;
    assert_eq!(result["isError"], json!(true), "{result}");
    let message = text_of(&result);
    assert!(message.contains("rate limited"), "{message}");
    assert!(
        !message.contains("SECRET"),
        "client-visible error: {message}"
    );
    let base = topology.replicas[0].base_url();
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(!metrics.contains("SECRET"), "metrics carry a secret");
    assert!(
        topology.replicas[0].is_running(),
        "the replica survived the Retry-After"
    );
    let log = std::fs::read_to_string(topology.replicas[0].log()).expect("log");
    assert!(!log.contains("SECRET"), "the log carries a secret");
}
