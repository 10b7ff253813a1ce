//! Every fault under the load generator's baseline: 150 sessions of both protocol eras (even ones
//! legacy with GET streams, odd ones 2026-07-28 with `subscriptions/listen`) through nginx in
//! front of 3 replicas on real Redis (append-only file on, as in compose), each fault injected by
//! the run's own chaos schedule through the test kit's control endpoint. Clients retry as the
//! official SDKs do (a refused connection, 502/503/504: again, with backoff) and resume their
//! streams. Each test checks what the fault may cost (some retries, reopened streams) and what it
//! must not: lost or duplicated notifications, lost writes, and failed calls beyond those a Redis
//! fault catches in flight (see [`assert_failures_only_as_the_fault_struck`]).

mod common;

use common::{describe, loadtest_bin, server_bin};
use std::{process::Output, sync::Arc, time::Duration};

use serde_json::Value;
use shoal_testkit::{
    control::{self, SharedTopology},
    topology::{RedisKind, Topology, TopologyOptions, repo_root},
};

/// A running cluster and its control endpoint.
struct Chaos {
    topology: SharedTopology,
    control: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Chaos {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// 3 replicas (each reaching Redis through a fault proxy), Redis with AOF, nginx; PostgreSQL with
/// the demo schema when `postgres`.
async fn chaos_cluster(postgres: bool) -> Chaos {
    let mut options = TopologyOptions::cluster(server_bin(), 3);
    options.redis_aof = true;
    options.redis_proxied = vec![0, 1, 2];
    options.postgres = postgres;
    chaos_on(options).await
}

/// The chaos cluster of `options`: a 1 s Redis command timeout, no caching of database reads, the
/// control endpoint.
async fn chaos_on(mut options: TopologyOptions) -> Chaos {
    let postgres = options.postgres;
    // A replica knows Redis is unreachable after one command timeout: 1 s here (2 s by default).
    options.env.push((
        "SHOAL_REDIS_TIMEOUT_MS".into(),
        REDIS_TIMEOUT_MS.to_string(),
    ));
    // Every database read reaches PostgreSQL (cached results would hide its outage).
    options
        .env
        .push(("SHOAL_CACHE_TTLS".into(), "pg_query=0".into()));
    let topology = Topology::start(options).await.expect("the cluster starts");
    if postgres {
        let sql = std::fs::read_to_string(repo_root().join("deploy/postgres/demo.sql"))
            .expect("the demo schema");
        topology
            .postgres_client()
            .await
            .expect("connect")
            .batch_execute(&sql)
            .await
            .expect("the demo schema loads");
    }
    let topology = Arc::new(tokio::sync::Mutex::new(topology));
    let (addr, task) = control::serve(topology.clone(), 0)
        .await
        .expect("the control endpoint");
    Chaos {
        topology,
        control: format!("http://{addr}"),
        task,
    }
}

/// One fault of a schedule: its name, when, the control route that injects it, and optionally
/// (after, route) to heal it.
struct Fault<'a> {
    name: &'a str,
    at: &'a str,
    route: &'a str,
    heal: Option<(&'a str, &'a str)>,
}

impl Chaos {
    /// The baseline with `faults`, for `duration`; returns the output and the JSON report.
    async fn run(&self, faults: &[Fault<'_>], duration: &str, extra: &[&str]) -> (Output, Value) {
        let url = self.topology.lock().await.mcp_url();
        let dir = tempfile::tempdir().expect("temp dir");
        let schedule = dir.path().join("schedule.toml");
        let mut text = String::new();
        for fault in faults {
            text.push_str(&format!(
                "[[fault]]\nname = {:?}\nat = {:?}\nrun = \"curl -fsS -X POST {}{}\"\n",
                fault.name, fault.at, self.control, fault.route
            ));
            if let Some((after, route)) = fault.heal {
                text.push_str(&format!(
                    "heal_after = {after:?}\nheal = \"curl -fsS -X POST {}{route}\"\n",
                    self.control
                ));
            }
        }
        std::fs::write(&schedule, text).expect("schedule written");
        let report = dir.path().join("report.json");
        let output = tokio::time::timeout(
            Duration::from_secs(240),
            tokio::process::Command::new(loadtest_bin())
                .args(["run", "--url", &url, "--quiet", "--scenario", "baseline"])
                .args(["--era", "both", "--sessions", "150", "--warmup", "2s"])
                .args([
                    "--duration",
                    duration,
                    "--retries",
                    &RETRIES.to_string(),
                    "--chaos",
                ])
                .arg(&schedule)
                .arg("--json")
                .arg(&report)
                .args(extra)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the load generator finishes")
        .expect("the load generator runs");
        let report = std::fs::read(&report)
            .ok()
            .map(|bytes| serde_json::from_slice(&bytes).expect("a JSON report"))
            .unwrap_or_else(|| panic!("no report: {}", describe(&output)));
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        (output, report)
    }
}

/// The report's window of fault `name`.
fn window<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["faults"]
        .as_array()
        .and_then(|faults| faults.iter().find(|w| w["name"] == name))
        .unwrap_or_else(|| panic!("no window {name}: {report:#}"))
}

/// Every command of the schedule (fault and heal) ran and succeeded: the run's log marks a
/// failed one ` FAILED: `.
fn assert_fault_commands_succeeded(output: &Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stdout.contains(" FAILED: "),
        "a fault command failed: {stdout}"
    );
}

/// Nothing lost: no notification lost or duplicated, every key holds its last acknowledged
/// write, notifications were expected and delivered in both eras' share of the run.
fn assert_nothing_lost(report: &Value) {
    let n = &report["notifications"];
    assert!(n["expected"].as_u64().unwrap_or(0) > 100, "{report:#}");
    assert_eq!(n["lost"], 0, "lost notifications: {report:#}");
    assert_eq!(n["duplicated"], 0, "duplicated notifications: {report:#}");
    assert_eq!(n["expected"], n["delivered"], "{report:#}");
    assert_eq!(report["lost_writes"], serde_json::json!([]), "{report:#}");
}

/// No call failed (after the clients' retries).
fn assert_no_failed_call(output: &Output, report: &Value) {
    assert_eq!(report["errors"], 0, "{report:#}");
    assert!(output.status.success(), "{}", describe(output));
}

const REDIS_TIMEOUT_MS: u64 = 1000;

/// How often the clients retry a call that failed transiently (backoff 0.1, 0.2, 0.4, then 0.8 s:
/// about 15 s of trying). A replica cut off from Redis answers every call it gets 503, and nginx
/// cannot send a POST it already sent elsewhere: round robin gives it a third of the attempts
/// (measured: 1 457, 450, 155, 61, 14, 4 and 1 of 2 146 retried calls needed 1 to 7 retries, a
/// geometric spread with p = 0.32). With 10 retries, one call of a run failed outright about once
/// in 50 runs (2 146 × 0.32^10 ≈ 0.02; CI met it); with 20 about once in four million runs. What
/// would end it for any client is a replica that leaves the pool while it cannot serve
/// (docs/operations.md, "A replica cut off from Redis").
const RETRIES: u32 = 20;

/// A Redis fault catches calls in flight: a call that already passed the door when Redis went
/// away waits for its command to time out and ends in a tool error ("shared state is temporarily
/// unavailable; retry shortly"), and so do calls that arrive before the replica knows (its first
/// command timeout). Once it knows, it fails closed: 503 with `Retry-After`, retried elsewhere by
/// the clients. So: the only failures are the shared-state tool errors of the kv tools, and they
/// all end within two command timeouts (plus a second of slack) of the fault.
fn assert_failures_only_as_the_fault_struck(report: &Value, fault: &str) {
    let errors = report["errors_by_kind"].as_object().expect("errors");
    assert!(
        errors
            .keys()
            .all(|kind| kind == "tool_error_kv_get" || kind == "tool_error_kv_set"),
        "{errors:?} in {:#} {:#}",
        report["faults"],
        report["timeline"]
    );
    let at = window(report, fault)["at_secs"].as_f64().expect("at");
    let until = at + 2.0 * REDIS_TIMEOUT_MS as f64 / 1000.0 + 1.0;
    for point in report["timeline"].as_array().expect("timeline") {
        let second = point["second"].as_f64().expect("second");
        if point["errors"].as_u64() > Some(0) {
            assert!(
                second >= at.floor() && second < until,
                "failures at second {second}, the fault struck at {at}: {report:#}"
            );
        }
    }
    let n = &report["notifications"];
    assert!(n["lost"] == 0 && n["duplicated"] == 0, "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_loses_no_call_and_no_notification() {
    let chaos = chaos_cluster(false).await;
    let (output, report) = chaos
        .run(
            &[Fault {
                name: "r2 killed",
                at: "3s",
                route: "/replicas/r2/kill",
                heal: Some(("5s", "/replicas/r2/start")),
            }],
            "14s",
            &[],
        )
        .await;
    assert_no_failed_call(&output, &report);
    assert_nothing_lost(&report);
    let fault = window(&report, "r2 killed");
    // r2's streams ended with it and were resumed on the others (how nothing was lost).
    assert!(fault["streams_reopened"].as_u64() > Some(0), "{fault:#}");
    assert!(fault["ok"].as_u64() > Some(1000), "{fault:#}");
}

/// The Redis primary the replicas use killed (SIGKILL) under the baseline: on a Sentinel set the
/// sentinels promote the replica, on a Redis Cluster the replica of the primary serving the keys'
/// slot takes over, within a few seconds; the shoal replicas follow by themselves. In between they
/// fail closed (503, retried by the clients; the calls already running end in tool errors);
/// nothing acknowledged is lost (the primary dies with its replica in sync: what asynchronous
/// replication can lose, the writes of the last instant before a crash, is in
/// docs/operations.md), and every notification arrives once.
mod a_redis_primary_killed_under_load_fails_over_and_loses_nothing {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sentinel() {
        primary_killed(RedisKind::Sentinel).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster() {
        primary_killed(RedisKind::Cluster).await;
    }
}

async fn primary_killed(redis: RedisKind) {
    let chaos = chaos_on(TopologyOptions::cluster(server_bin(), 3).on(redis)).await;
    survives_a_redis_fault(&chaos, "Redis primary killed", "/redis/primary-kill", "14s").await;
}

/// The baseline with one Redis fault at 3 s (no heal), for `duration`: every fault command
/// succeeded, nothing was lost, calls failed only as the fault struck, service went on and
/// recovered within 10 s.
async fn survives_a_redis_fault(chaos: &Chaos, name: &str, route: &str, duration: &str) {
    let (output, report) = chaos
        .run(
            &[Fault {
                name,
                at: "3s",
                route,
                heal: None,
            }],
            duration,
            &[],
        )
        .await;
    assert_fault_commands_succeeded(&output);
    assert_nothing_lost(&report);
    assert_failures_only_as_the_fault_struck(&report, name);
    let fault = window(&report, name);
    assert!(
        fault["ok"].as_u64() > Some(1000),
        "service went on: {fault:#}"
    );
    assert!(
        fault["time_to_recover_secs"]
            .as_f64()
            .is_some_and(|s| s < 10.0),
        "{fault:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_with_its_append_only_file_loses_nothing() {
    let chaos = chaos_cluster(false).await;
    // Every legacy session survived (a lost one would answer 404, an error here), every write is
    // still there and notified once; calls failed only as the restart struck.
    survives_a_redis_fault(&chaos, "Redis restarted", "/redis/restart", "12s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_partitioned_from_redis_for_10s_fails_closed_and_loses_nothing() {
    let chaos = chaos_cluster(false).await;
    let (output, report) = chaos
        .run(
            &[Fault {
                name: "r2 cut off from Redis",
                at: "3s",
                route: "/redis/partition/r2",
                heal: Some(("10s", "/redis/heal/r2")),
            }],
            "18s",
            &[],
        )
        .await;
    assert_fault_commands_succeeded(&output);
    assert_nothing_lost(&report);
    assert_failures_only_as_the_fault_struck(&report, "r2 cut off from Redis");
    let fault = window(&report, "r2 cut off from Redis");
    // r2 refused work (503, retried elsewhere) and ended its streams (resumed elsewhere).
    assert!(fault["retried"].as_u64() > Some(0), "{fault:#}");
    assert!(fault["streams_reopened"].as_u64() > Some(0), "{fault:#}");
    // Healed without an operator: r2 serves again (checked from outside, after the run).
    let base = {
        let mut topology = chaos.topology.lock().await;
        topology.replica("r2").expect("r2").base_url()
    };
    let ready = reqwest::get(format!("{base}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_frozen_for_5s_delays_calls_within_their_limits_and_loses_nothing() {
    let chaos = chaos_cluster(false).await;
    let (output, report) = chaos
        .run(
            &[Fault {
                name: "Redis frozen",
                at: "3s",
                route: "/redis/freeze",
                heal: Some(("5s", "/redis/thaw")),
            }],
            "14s",
            &[],
        )
        .await;
    assert_fault_commands_succeeded(&output);
    assert_nothing_lost(&report);
    assert_failures_only_as_the_fault_struck(&report, "Redis frozen");
    let fault = window(&report, "Redis frozen");
    assert!(fault["retried"].as_u64() > Some(0), "{fault:#}");
    // No attempt waited for the whole freeze: each answered within the command timeout and was
    // retried; the slowest call (retries included) is bounded by the freeze plus backoff.
    let slowest = report["overall"]["max_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(slowest < 9_000.0, "slowest call {slowest} ms: {report:#}");
    // Service is back within a second of the thaw: no client saw a failure (a refused attempt, a
    // stream that ended or could not be reopened) later than that. Not when each stream was
    // reopened: the clients back off up to a second between attempts, so that measured their
    // backoff (a run failed at 1.017 s: an attempt refused just before the doors opened, the next
    // one a second later). Every replica answered 503 during the freeze,
    // so nginx's passive health checks ejected all of them; the balancer must still route to
    // them (deploy/nginx/nginx.conf: each replica again as a never-ejected backup) instead of
    // answering 502 "no live upstreams" until its fail_timeout lets a probe through.
    let recovered = fault["time_to_recover_secs"].as_f64().expect("recovery");
    assert!(
        recovered < 1.0,
        "recovered {recovered} s after the thaw: {fault:#}"
    );
    let log = {
        let topology = chaos.topology.lock().await;
        topology
            .balancer
            .as_ref()
            .expect("balancer")
            .dir()
            .join("error.log")
    };
    let log = std::fs::read_to_string(log).expect("nginx's error log");
    let lockouts = log
        .lines()
        .filter(|l| l.contains("no live upstreams"))
        .count();
    assert_eq!(
        lockouts, 0,
        "nginx locked every replica out {lockouts} times"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_fails_database_calls_clearly_and_only_while_it_is_down() {
    let chaos = chaos_cluster(true).await;
    let (output, report) = chaos
        .run(
            &[Fault {
                name: "PostgreSQL stopped",
                at: "3s",
                route: "/postgres/stop",
                heal: Some(("4s", "/postgres/start")),
            }],
            "14s",
            &[
                "--mix",
                "kv_get=35,echo=25,kv_set=20,sleep=10,pg_query=10",
                "--max-error-rate",
                "1",
            ],
        )
        .await;
    assert_nothing_lost(&report);
    assert_fault_commands_succeeded(&output);
    // Only database calls failed, as tool errors (isError), and only during the outage.
    let errors = report["errors_by_kind"].as_object().expect("errors");
    assert!(
        errors.keys().all(|kind| kind == "tool_error_pg_query"),
        "{errors:?}"
    );
    let steady = window(&report, "steady");
    assert_eq!(steady["failed"], 0, "{steady:#}");
    let fault = window(&report, "PostgreSQL stopped");
    assert!(
        fault["failed"].as_u64() > Some(0),
        "the outage showed: {fault:#}"
    );
    // The pool recovered by itself, soon after PostgreSQL was back: the last failure came
    // within seconds of the restart, and database calls succeeded after it.
    let recover = fault["time_to_recover_secs"]
        .as_f64()
        .expect("recovery time");
    assert!(recover < 5.0, "{fault:#}");
    let (_, last_failure) = (
        fault["disturbed"][0].as_f64(),
        fault["disturbed"][1].as_f64().expect("disturbed"),
    );
    let later_ok: u64 = report["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .filter(|p| p["second"].as_f64().is_some_and(|s| s > last_failure + 1.0))
        .map(|p| p["ok"].as_u64().unwrap_or(0))
        .sum();
    assert!(later_ok > 0, "{report:#}");
    assert!(report["operations"]["pg_query"]["count"].as_u64() > Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_no_call_and_no_notification() {
    let chaos = chaos_cluster(false).await;
    let (output, report) = chaos
        .run(
            &[Fault {
                name: "rolling restart",
                at: "2s",
                route: "/replicas/rolling-restart",
                heal: None,
            }],
            "14s",
            &[],
        )
        .await;
    assert_no_failed_call(&output, &report);
    assert_nothing_lost(&report);
    let fault = window(&report, "rolling restart");
    // Every replica drained its streams in turn; the clients resumed them on the others.
    assert!(fault["streams_reopened"].as_u64() > Some(2), "{fault:#}");
}
