//! The official MCP SDK clients as users run them, through the balancer in front of three
//! replicas. (The TypeScript SDK's client, with OAuth discovery, is in `auth`.)

use std::time::Duration;

use serde_json::{Value, json};
use shoal_testkit::topology::repo_root;

use crate::helpers::*;

/// The official Python SDK (`mcp`, testkit/python/requirements.txt) opens a legacy session, lists
/// and calls tools across the replicas, and closes it: its DELETE is answered 204, so the SDK logs
/// nothing (it accepts only 200 or 204, and logged "Session termination failed: 202" before).
#[tokio::test]
async fn the_python_sdk_client_runs_a_session_and_ends_it_cleanly() {
    let python = repo_root().join("testkit/python/.venv/bin/python");
    assert!(
        python.exists(),
        "the Python SDK is not installed: python3 -m venv testkit/python/.venv && \
         testkit/python/.venv/bin/pip install -r testkit/python/requirements.txt (scripts/test.sh does it)"
    );
    let topology = start(cluster_options(3)).await;
    let url = topology.mcp_url();
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&python)
            .arg(repo_root().join("testkit/python/sdk-client.py"))
            .arg(&url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the SDK client finished in time")
    .expect("python runs");
    assert!(
        output.status.success(),
        "SDK client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "no JSON report ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(
        report["protocol"], "2025-11-25",
        "a legacy session: {report}"
    );
    assert!(
        report["listed"]
            .as_array()
            .expect("tools")
            .contains(&json!("kv_get")),
        "{report}"
    );
    assert_eq!(report["written"], "through the Python SDK");
    assert_eq!(
        report["warnings"],
        json!([]),
        "the SDK complained: {report}"
    );
}
