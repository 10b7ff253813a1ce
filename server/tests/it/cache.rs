//! The shared TTL result cache across real replicas: hits across replicas, key-order
//! independence, partition isolation, writes never cached, expiry, and cluster-wide single flight.

use std::time::Duration;

use serde_json::{Value, json};
use shoal_testkit::{
    client::McpClient,
    topology::Topology,
    upstream::{Behavior, FakeUpstream},
};

use sha2::Digest as _;

use crate::helpers::*;

const ADDRESS: &str = "4Nd1mYQ9P8Ew7ZsDMhCXHqkuhbuBFvf6VGK2mX4EdhyS";

async fn cached_cluster(upstream: &FakeUpstream, postgres: bool, env: &[(&str, &str)]) -> Topology {
    let mut options = cluster_options(3)
        .env("SHOAL_TOOLSETS", "kv,postgres,rpc,compute")
        .env("SHOAL_RPC_ENDPOINTS", upstream.url())
        .env("SHOAL_POSTGRES_ALLOW_WRITES", "true");
    for (key, value) in env {
        options = options.env(key, value);
    }
    options.postgres = postgres;
    start(options).await
}

#[tokio::test]
async fn results_are_shared_across_replicas_until_they_expire() {
    let upstream = FakeUpstream::start(Behavior::Healthy)
        .await
        .expect("upstream");
    let topology =
        cached_cluster(&upstream, false, &[("SHOAL_CACHE_TTLS", "get_balance=2s")]).await;
    let client = McpClient::modern(topology.mcp_url());
    let mut replicas = std::collections::HashSet::new();
    for _ in 0..6 {
        let exchange = call_ok(&client, "get_balance", json!({"address": ADDRESS})).await;
        assert_eq!(
            exchange.result().expect("result")["structuredContent"]["result"]["value"],
            json!(5_000_000_000u64)
        );
        replicas.insert(replica_of(&exchange.headers));
    }
    assert_eq!(replicas.len(), 3, "asked every replica");
    assert_eq!(
        upstream.requests(),
        1,
        "one upstream call served six requests on three replicas"
    );
    // After the TTL the next call refreshes.
    eventually("the entry to expire", WAIT, async || {
        call_ok(&client, "get_balance", json!({"address": ADDRESS})).await;
        (upstream.requests() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn argument_order_does_not_matter_and_errors_are_not_cached() {
    let upstream = FakeUpstream::start(Behavior::Healthy)
        .await
        .expect("upstream");
    let topology = cached_cluster(&upstream, false, &[]).await;
    let client = McpClient::modern(topology.mcp_url());
    // Raw bodies, so the two calls really send their arguments in different orders.
    let raw = |arguments: &str| {
        let client = &client;
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"hash","arguments":{arguments},"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}"#
        );
        async move {
            let response = client
                .http()
                .post(client.url())
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "tools/call")
                .header("mcp-name", "hash")
                .body(body)
                .send()
                .await
                .expect("send");
            response.json::<Value>().await.expect("json")
        }
    };
    let lookups = async || {
        let mut hits = 0.0;
        for replica in &topology.replicas {
            hits += metric(
                &replica.base_url(),
                "shoal_cache_lookups_total{outcome=\"hit\"}",
            )
            .await;
        }
        hits
    };
    let first = raw(r#"{"data":"order","rounds":1000}"#).await;
    let before = lookups().await;
    let second = raw(r#"{"rounds":1000,"data":"order"}"#).await;
    assert_eq!(first["result"], second["result"]);
    assert_eq!(
        lookups().await,
        before + 1.0,
        "the reordered call was a cache hit"
    );

    // Tool errors are not cached: an invalid address reaches the tool every time.
    let errors_before =
        metric_sum(&topology, "shoal_cache_lookups_total{outcome=\"bypass\"}").await;
    for _ in 0..3 {
        let result = client
            .call_tool("get_balance", json!({"address": "bad"}))
            .await
            .expect("call");
        assert_eq!(result["isError"], json!(true));
    }
    assert_eq!(
        metric_sum(&topology, "shoal_cache_lookups_total{outcome=\"bypass\"}").await,
        errors_before + 3.0
    );
}

/// A `private` result is cached per verified principal (API keys here): its owner is served from
/// the cache, another principal never sees it; writes always execute.
#[tokio::test]
async fn private_results_stay_with_their_principal_and_writes_are_never_cached() {
    let upstream = FakeUpstream::start(Behavior::Healthy)
        .await
        .expect("upstream");
    let keys = tempfile::NamedTempFile::new().expect("keys file");
    let entry = |principal: &str, scope: &str, key: &str| {
        format!(
            "[[key]]\nprincipal = \"{principal}\"\nscopes = [\"{scope}\"]\nsha256 = \"{}\"\n",
            hex::encode(sha2::Sha256::digest(key.as_bytes()))
        )
    };
    std::fs::write(
        keys.path(),
        entry(
            "alice",
            "postgres:write",
            "alice-0123456789abcdef0123456789abcdef",
        ) + &entry("bob", "postgres", "bob-0123456789abcdef0123456789abcdef"),
    )
    .expect("write keys");
    let keys_path = keys.path().display().to_string();
    let topology = cached_cluster(
        &upstream,
        true,
        &[
            ("SHOAL_AUTH", "api-keys"),
            ("SHOAL_API_KEYS_FILE", &keys_path),
        ],
    )
    .await;
    let db = topology.postgres_client().await.expect("connect");
    db.batch_execute("CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL); INSERT INTO counters VALUES (1, 0);")
        .await
        .expect("schema");
    let as_principal = |token: &str| {
        let mut client = McpClient::modern(topology.mcp_url());
        client.extra_headers.insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        client
    };
    let alice = as_principal("alice-0123456789abcdef0123456789abcdef");
    let bob = as_principal("bob-0123456789abcdef0123456789abcdef");
    let query = json!({"sql": "SELECT clock_timestamp()::text AS at"});
    let at = |result: Value| {
        result["structuredContent"]["rows"][0]["at"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let a1 = at(alice
        .call_tool("pg_query", query.clone())
        .await
        .expect("query"));
    let a2 = at(alice
        .call_tool("pg_query", query.clone())
        .await
        .expect("query"));
    assert_eq!(
        a1, a2,
        "alice's second call is served from her cached result"
    );
    let b1 = at(bob
        .call_tool("pg_query", query.clone())
        .await
        .expect("query"));
    assert_ne!(a1, b1, "bob never sees alice's private result");

    // Writes always execute.
    for _ in 0..3 {
        call_ok(
            &alice,
            "pg_execute",
            json!({"sql": "UPDATE counters SET n = n + 1 WHERE id = 1"}),
        )
        .await;
    }
    let n: i32 = db
        .query_one("SELECT n FROM counters WHERE id = 1", &[])
        .await
        .expect("read")
        .get(0);
    assert_eq!(n, 3, "three identical writes, three executions");
    // A write invalidates cached reads of what it changed.
    let count = json!({"sql": "SELECT n FROM counters WHERE id = 1"});
    let before = alice
        .call_tool("pg_query", count.clone())
        .await
        .expect("query")["structuredContent"]["rows"][0]["n"]
        .clone();
    call_ok(
        &alice,
        "pg_execute",
        json!({"sql": "UPDATE counters SET n = n + 1 WHERE id = 1"}),
    )
    .await;
    let after = alice.call_tool("pg_query", count).await.expect("query")["structuredContent"]["rows"][0]["n"].clone();
    assert_eq!(
        (before, after),
        (json!(3), json!(4)),
        "the cached read was invalidated by the write"
    );
}

#[tokio::test]
async fn concurrent_misses_across_replicas_run_the_backend_once() {
    let upstream = FakeUpstream::start(Behavior::Slow(Duration::from_millis(500)))
        .await
        .expect("upstream");
    let topology = cached_cluster(&upstream, false, &[]).await;
    let url = topology.mcp_url();
    // 150 legacy sessions (the article's 50 engineers × 3 servers), spread over the replicas.
    let mut sessions = Vec::new();
    for _ in 0..150 {
        sessions.push(legacy_client(&url).await);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(sessions.len()));
    let mut calls = tokio::task::JoinSet::new();
    for session in sessions {
        let barrier = barrier.clone();
        calls.spawn(async move {
            barrier.wait().await;
            let exchange = session
                .request(
                    "tools/call",
                    json!({"name": "get_balance", "arguments": {"address": ADDRESS}}),
                )
                .await
                .expect("call");
            (
                replica_of(&exchange.headers),
                exchange.result().expect("result").clone(),
            )
        });
    }
    let mut replicas = std::collections::HashSet::new();
    while let Some(joined) = calls.join_next().await {
        let (replica, result) = joined.expect("join");
        assert_ne!(result["isError"], json!(true), "{result}");
        assert_eq!(
            result["structuredContent"]["result"]["value"],
            json!(5_000_000_000u64)
        );
        replicas.insert(replica);
    }
    assert_eq!(replicas.len(), 3);
    assert_eq!(
        upstream.requests(),
        1,
        "150 concurrent misses on three replicas ran the backend once"
    );
    assert!(
        metric_sum(
            &topology,
            "shoal_cache_lookups_total{outcome=\"coalesced\"}"
        )
        .await
            >= 100.0,
        "the others picked up the one result"
    );
}

/// Issue 11, acceptance 5: a cold miss costs the filling replica three Redis round trips on the
/// cache path (`GET` the entry, `SET NX` the fill lock, one script that stores, announces and
/// unlocks), and a hit one. Counted from Redis's own `MONITOR`, which lists every command a client
/// sent (commands a script runs are listed apart, as `lua`).
#[tokio::test]
async fn a_cold_miss_costs_three_redis_round_trips() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let upstream = FakeUpstream::start(Behavior::Healthy)
        .await
        .expect("upstream");
    let topology =
        cached_cluster(&upstream, false, &[("SHOAL_CACHE_TTLS", "get_balance=60s")]).await;
    let admin = topology.redis.as_ref().expect("redis").admin_url();
    let client = McpClient::modern(topology.mcp_url());
    // A fresh Redis knows no script yet: the first use of each costs one `NOSCRIPT` answer and a
    // `SCRIPT LOAD` once per Redis lifetime. A miss on another entry first loads them, so what is
    // counted below is every later cold miss.
    call_ok(
        &client,
        "get_balance",
        json!({"address": "So11111111111111111111111111111111111111112"}),
    )
    .await;

    let mut monitor = tokio::process::Command::new("redis-cli")
        .args(["-u", &admin, "monitor"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-cli monitor");
    let mut lines = BufReader::new(monitor.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next_line().await.expect("read").as_deref(),
        Some("OK"),
        "MONITOR started"
    );
    let mut cache_commands = async |marker: &str| {
        let echoed = tokio::process::Command::new("redis-cli")
            .args(["-u", &admin, "echo", marker])
            .output()
            .await
            .expect("redis-cli echo");
        assert!(echoed.status.success());
        let mut seen = Vec::new();
        loop {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("MONITOR shows the marker")
                .expect("read")
                .expect("MONITOR open");
            if line.contains(marker) {
                return seen;
            }
            // Commands the replica sent for the cache entry, its fill lock or on the cache
            // channel; not the ones a script ran inside Redis.
            if !line.contains("[0 lua]")
                && (line.contains(":cache:")
                    || line.contains(":cache-lock:")
                    || line.contains(":cache\" "))
            {
                seen.push(line);
            }
        }
    };

    call_ok(&client, "get_balance", json!({"address": ADDRESS})).await;
    let miss = cache_commands("shoal-marker-miss").await;
    let verbs: Vec<&str> = miss
        .iter()
        .filter_map(|line| line.split('"').nth(1))
        .collect();
    assert_eq!(
        verbs,
        ["GET", "SET", "EVALSHA"],
        "a cold miss: look, lock, store + announce + unlock: {miss:#?}"
    );
    assert_eq!(upstream.requests(), 2, "one upstream call per entry");

    call_ok(&client, "get_balance", json!({"address": ADDRESS})).await;
    let hit = cache_commands("shoal-marker-hit").await;
    assert_eq!(hit.len(), 1, "a hit is one GET: {hit:#?}");
    assert_eq!(
        upstream.requests(),
        2,
        "the second call was served from the cache"
    );
}
