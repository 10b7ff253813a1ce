//! Toolsets as values (issue 28): the `time` toolset, added as one module and one arm of
//! `tools::enabled`, served like any other through a balancer, with its scope.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn the_time_toolset_tells_and_converts_time() {
    let topology = start(cluster_options(2).env("SHOAL_TOOLSETS", "kv,time")).await;
    let client = legacy_client(&topology.mcp_url()).await;

    let listed = client
        .request("tools/list", json!({}))
        .await
        .expect("tools/list");
    let names: Vec<String> = listed.result().expect("tools")["tools"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|tool| tool["name"].as_str().map(str::to_owned))
        .collect();
    for name in ["now", "convert", "kv_get"] {
        assert!(names.contains(&name.to_owned()), "{name} in {names:?}");
    }

    let converted = call_ok(
        &client,
        "convert",
        json!({"time": "2026-12-07T10:00:00Z", "to": "Asia/Tokyo"}),
    )
    .await;
    let answer = &converted.result().expect("result")["structuredContent"];
    assert_eq!(answer["time"], "2026-12-07T19:00:00+09:00");
    assert_eq!(answer["zone"], "Asia/Tokyo");
    assert_eq!(answer["unix_ms"], 1_796_637_600_000_i64);

    // A civil time read in one zone (New York, winter: five hours behind UTC).
    let civil = call_ok(
        &client,
        "convert",
        json!({"time": "2026-12-07T05:00:00", "from": "America/New_York", "to": "UTC"}),
    )
    .await;
    assert_eq!(
        civil.result().expect("result")["structuredContent"]["unix_ms"],
        1_796_637_600_000_i64
    );

    let now = call_ok(&client, "now", json!({"zone": "Europe/Paris"})).await;
    let answer = &now.result().expect("result")["structuredContent"];
    assert_eq!(answer["zone"], "Europe/Paris");
    let told = answer["unix_ms"].as_i64().expect("unix_ms");
    let here = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    assert!((here - told).abs() < 60_000, "now said {told}, here {here}");

    // Bad input: a clear tool error, nothing else.
    let refused = client
        .request(
            "tools/call",
            json!({"name": "convert", "arguments": {"time": "2026-12-07T10:00:00Z", "to": "Mars/Olympus"}}),
        )
        .await
        .expect("tools/call");
    let result = refused.result().expect("a tool result");
    assert_eq!(result["isError"], json!(true));
    assert!(text_of(result).contains("unknown time zone"), "{result}");
    let unreadable = client
        .request(
            "tools/call",
            json!({"name": "now", "arguments": {"zone": "x".repeat(10_000)}}),
        )
        .await
        .expect("tools/call");
    assert_eq!(
        unreadable.result().expect("a tool result")["isError"],
        Value::Bool(true)
    );
}
