//! The load generator against a local 3-replica cluster (real Redis, replicas and nginx), as CI
//! runs it: the article's baseline scenario for a short time in both protocol eras, and the exit
//! status when a run goes wrong. Faults under the same load are in `chaos.rs`.

mod common;

use common::{describe, loadtest_bin, server_bin};
use std::{process::Output, time::Duration};

use serde_json::Value;
use shoal_testkit::topology::{Topology, TopologyOptions};

async fn cluster() -> Topology {
    Topology::start(TopologyOptions::cluster(server_bin(), 3))
        .await
        .expect("3 replicas, Redis and nginx start")
}

/// Runs `shoal-loadtest run` with `args`; returns its output and the JSON report (when written).
async fn run(url: &str, args: &[&str]) -> (Output, Option<Value>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let report = dir.path().join("report.json");
    let output = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(loadtest_bin())
            .args(["run", "--url", url, "--quiet", "--json"])
            .arg(&report)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the load generator finishes")
    .expect("the load generator runs");
    let report = std::fs::read(&report)
        .ok()
        .map(|bytes| serde_json::from_slice(&bytes).expect("a JSON report"));
    (output, report)
}

/// Every tool of the baseline mix succeeded, and every write's notification arrived.
fn assert_clean_baseline(output: &Output, report: &Value) {
    assert!(output.status.success(), "{}", describe(output));
    assert_eq!(report["errors"], 0, "{report:#}");
    for tool in ["kv_get", "echo", "kv_set", "sleep"] {
        let count = report["operations"][tool]["count"].as_u64().unwrap_or(0);
        assert!(count > 0, "no successful {tool} calls: {report:#}");
    }
    let notifications = &report["notifications"];
    assert!(
        notifications["expected"].as_u64().unwrap_or(0) > 0,
        "{report:#}"
    );
    assert_eq!(notifications["lost"], 0, "{report:#}");
    assert_eq!(
        notifications["expected"], notifications["delivered"],
        "{report:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_through_the_balancer_in_both_eras() {
    let topology = cluster().await;
    let url = topology.mcp_url();
    for era in ["legacy", "modern"] {
        let (output, report) = run(
            &url,
            &[
                "--scenario",
                "baseline",
                "--era",
                era,
                "--sessions",
                "150",
                "--warmup",
                "1s",
                "--duration",
                "6s",
            ],
        )
        .await;
        let report = report.unwrap_or_else(|| panic!("no report: {}", describe(&output)));
        assert_eq!(report["config"]["sessions"], 150);
        assert_clean_baseline(&output, &report);
        let table = String::from_utf8_lossy(&output.stdout);
        assert!(table.contains("p99.9 ms"), "{table}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_failures_exits_non_zero() {
    let topology = cluster().await;
    // A tool the server does not have: every call is a JSON-RPC error.
    let (output, report) = run(
        &topology.mcp_url(),
        &[
            "--scenario",
            "max",
            "--mix",
            "no_such_tool=1",
            "--sessions",
            "2",
            "--warmup",
            "0s",
            "--duration",
            "1s",
        ],
    )
    .await;
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stderr.contains("FAILED") || stdout.contains("FAILED"),
        "{}",
        describe(&output)
    );
    if let Some(report) = report {
        assert!(report["errors"].as_u64().unwrap_or(0) > 0, "{report:#}");
    }
}
