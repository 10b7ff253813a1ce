//! Quotas (`docs/security.md`, "Quotas"): per principal and cluster-wide, kept in Redis, so they
//! hold whichever replica the balancer picks, and survive a replica's restart.

use std::{collections::HashSet, time::Duration};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shoal_testkit::{
    client::{EventStream, McpClient},
    topology::Topology,
};

use crate::auth::{ALICE, BOB, initialize_body, initialized, keys_file, post_raw};
use crate::helpers::*;

/// A keys file entry granting `kv:write` and `conformance:write` with the `quota` table `quota`.
fn key_with_quota(principal: &str, key: &str, quota: &str) -> String {
    format!(
        "[[key]]\nprincipal = \"{principal}\"\nscopes = [\"kv:write\", \"conformance:write\"]\n\
         sha256 = \"{}\"\nquota = {{ {quota} }}\n\n",
        hex::encode(Sha256::digest(key.as_bytes()))
    )
}

async fn quota_cluster(keys: &tempfile::NamedTempFile, extra: &[(&str, &str)]) -> Topology {
    let mut options = cluster_options(3)
        .env("SHOAL_AUTH", "api-keys")
        .env("SHOAL_API_KEYS_FILE", keys.path().display());
    for (name, value) in extra {
        options = options.env(name, value);
    }
    start(options).await
}

/// The quota a 429 names (`error.data.quota`), after checking the answer's shape: status 429, a
/// `Retry-After` of whole seconds, a JSON-RPC error.
fn refused_quota(status: StatusCode, headers: &reqwest::header::HeaderMap, body: &str) -> String {
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let retry: u64 = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!(retry >= 1, "Retry-After {retry}");
    let body: Value = serde_json::from_str(body).expect("a JSON-RPC error");
    assert_eq!(body["error"]["code"], -32000, "{body}");
    assert_eq!(body["error"]["data"]["retryAfterSeconds"], retry, "{body}");
    body["error"]["data"]["quota"]
        .as_str()
        .expect("the quota")
        .to_owned()
}

/// [`refused_quota`] of a request opened as a stream.
async fn stream_refusal(mut stream: EventStream) -> String {
    let (status, headers) = (stream.status, stream.headers.clone());
    let body = stream
        .next_event()
        .await
        .and_then(|event| event.message)
        .expect("a JSON body");
    refused_quota(status, &headers, &body.to_string())
}

fn ping() -> Value {
    json!({"jsonrpc": "2.0", "id": 9, "method": "ping"})
}

/// A principal's request rate holds across the cluster: sent to the three replicas in turn, no
/// more requests pass than its burst plus its rate over the time taken (three replicas limiting
/// on their own would pass three bursts), each replica refuses some, another principal is never
/// refused, and the quota refills.
#[tokio::test]
async fn a_principal_over_its_rate_is_refused_on_every_replica_and_others_are_not() {
    let keys = keys_file(&format!(
        "{}{}",
        key_with_quota("alice", ALICE, "requests_per_sec = 2, burst = 4"),
        key_with_quota("bob", BOB, "requests_per_sec = 1000")
    ));
    let topology = quota_cluster(&keys, &[]).await;
    let alice = initialized(&topology.mcp_url(), ALICE).await;
    let alice_session = alice.session_id().expect("session").to_owned();
    let bob = initialized(&topology.mcp_url(), BOB).await;
    let bob_session = bob.session_id().expect("session").to_owned();

    let replicas: Vec<String> = topology.replicas.iter().map(|r| r.mcp_url()).collect();
    let started = std::time::Instant::now();
    let mut passed = 0;
    let mut refused_on = HashSet::new();
    for round in 0..30 {
        let at = &replicas[round % 3];
        let (status, headers, body) =
            post_raw(at, Some(&alice_session), Some(ALICE), &ping()).await;
        if status == StatusCode::OK {
            passed += 1;
        } else {
            assert_eq!(refused_quota(status, &headers, &body), "requests");
            refused_on.insert(replica_of(&headers));
        }
        let (status, _, body) = post_raw(at, Some(&bob_session), Some(BOB), &ping()).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "bob is not limited by alice: {body}"
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = 4.0 + 2.0 * elapsed;
    assert!(
        f64::from(passed) <= allowed.floor(),
        "{passed} requests passed in {elapsed:.2} s; the quota allows {allowed:.1}"
    );
    assert_eq!(refused_on.len(), 3, "every replica refused: {refused_on:?}");
    assert!(
        metric_sum(&topology, "shoal_quota_rejections_total{kind=\"requests\"}").await
            >= f64::from(30 - passed)
    );

    // The rate refills: within a second or so, alice passes again.
    eventually("alice's rate refills", Duration::from_secs(3), async || {
        (post_raw(&replicas[0], Some(&alice_session), Some(ALICE), &ping())
            .await
            .0
            == StatusCode::OK)
            .then_some(())
    })
    .await;
}

/// Concurrent tool calls and open sessions are capped across the cluster, the caps survive a
/// replica's restart (they live in Redis), and they free when calls end and sessions are deleted.
#[tokio::test]
async fn call_and_session_caps_hold_cluster_wide_and_free_again() {
    let keys = keys_file(&format!(
        "{}{}",
        key_with_quota("alice", ALICE, "concurrent_calls = 1, sessions = 2"),
        key_with_quota("bob", BOB, "concurrent_calls = 1")
    ));
    let mut topology = quota_cluster(&keys, &[]).await;
    let urls: Vec<String> = topology.replicas.iter().map(|r| r.mcp_url()).collect();
    let at = |i: usize| urls[i].clone();
    let first = initialized(&at(0), ALICE).await;
    let second = initialized(&at(1), ALICE).await;
    let (status, headers, body) = post_raw(&at(2), None, Some(ALICE), &initialize_body()).await;
    assert_eq!(refused_quota(status, &headers, &body), "sessions");
    let bob = initialized(&at(2), BOB).await;

    // One call of alice's runs (it waits for the client's sampling answer) on one replica...
    let (_, mut running) = first
        .open_request(
            "tools/call",
            json!({"name": "test_sampling", "arguments": {"prompt": "hold"}}),
        )
        .await
        .expect("tools/call");
    let (_, sampling) = next_matching(&mut running, "sampling/createMessage", |m| {
        m.get("method") == Some(&json!("sampling/createMessage"))
    })
    .await;
    // ...so a second one is refused on another, while bob's calls run.
    let kv_get = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "kv_get", "arguments": {"key": "k"}}});
    let second_session = second.session_id().expect("session").to_owned();
    let (status, headers, body) =
        post_raw(&at(1), Some(&second_session), Some(ALICE), &kv_get).await;
    assert_eq!(refused_quota(status, &headers, &body), "concurrent_calls");
    call_ok(&bob, "kv_set", json!({"key": "k", "value": "v"})).await;

    // The session cap is in Redis: a restarted replica still refuses a third session.
    topology.replicas[2]
        .restart()
        .await
        .expect("replica restarts");
    let (status, headers, body) = post_raw(&at(2), None, Some(ALICE), &initialize_body()).await;
    assert_eq!(refused_quota(status, &headers, &body), "sessions");

    // The call ends when the client answers: the next call passes.
    let answer = json!({"role": "assistant", "content": {"type": "text", "text": "ok"},
        "model": "m", "stopReason": "endTurn"});
    assert_eq!(
        first
            .respond(sampling["id"].clone(), answer)
            .await
            .expect("respond"),
        StatusCode::ACCEPTED
    );
    next_matching(&mut running, "the call's result", |m| {
        m.get("result").is_some()
    })
    .await;
    eventually(
        "the call slot is free",
        Duration::from_secs(5),
        async || {
            (post_raw(&at(1), Some(&second_session), Some(ALICE), &kv_get)
                .await
                .0
                == StatusCode::OK)
                .then_some(())
        },
    )
    .await;

    // A deleted session frees its slot at once.
    assert_eq!(
        first.delete().await.expect("DELETE"),
        StatusCode::NO_CONTENT
    );
    let (status, _, body) = post_raw(&at(2), None, Some(ALICE), &initialize_body()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Open streams are capped per principal and for the whole cluster; a closed stream frees its slot.
#[tokio::test]
async fn stream_caps_hold_per_principal_and_for_the_cluster() {
    let keys = keys_file(&format!(
        "{}{}",
        key_with_quota("alice", ALICE, "streams = 1"),
        key_with_quota("bob", BOB, "streams = 5")
    ));
    let topology = quota_cluster(&keys, &[("SHOAL_QUOTA_GLOBAL_STREAMS", "2")]).await;
    // A `subscriptions/listen` for `uri` by the holder of `key`, on replica `i`.
    let listen = async |i: usize, key: &str, uri: &str| {
        McpClient::modern(topology.replicas[i].mcp_url())
            .with_bearer(Some(key))
            .open_request("subscriptions/listen", listen_params(uri))
            .await
            .expect("listen")
            .1
    };
    let mut alice_stream = listen(0, ALICE, "kv://a").await;
    acknowledged(&mut alice_stream).await;
    let refused = listen(1, ALICE, "kv://a").await;
    assert_eq!(stream_refusal(refused).await, "streams");

    let mut bob_stream = listen(1, BOB, "kv://b").await;
    acknowledged(&mut bob_stream).await;
    // Two streams are open in the cluster: bob's second is over the global cap, not his own.
    let refused = listen(2, BOB, "kv://b").await;
    assert_eq!(stream_refusal(refused).await, "global_streams");

    // Alice hangs up: a slot is free again, on any replica.
    drop(alice_stream);
    let mut reopened = eventually("a stream slot frees", Duration::from_secs(10), async || {
        let stream = listen(2, BOB, "kv://b").await;
        (stream.status == StatusCode::OK).then_some(stream)
    })
    .await;
    acknowledged(&mut reopened).await;
}

/// Second review, finding 1: the concurrent-call quota counts the work, not the HTTP response. A
/// legacy client that hangs up after each response's headers leaves its call running (rmcp keeps
/// legacy request streams for resumption); before, that released the call's slot at once, and a
/// key with `concurrent_calls = 2` had eight statements running. Now the slot stays taken until
/// the call ends: never more than two run, the others are refused with 429, and the slots free
/// when the calls end.
#[tokio::test]
async fn a_call_holds_its_slot_until_it_ends_even_when_the_client_hangs_up() {
    let keys = keys_file(&format!(
        "[[key]]\nprincipal = \"alice\"\nscopes = [\"postgres\"]\nsha256 = \"{}\"\n\
         quota = {{ concurrent_calls = 2 }}\n",
        hex::encode(Sha256::digest(ALICE.as_bytes()))
    ));
    let mut options = cluster_options(1)
        .env("SHOAL_AUTH", "api-keys")
        .env("SHOAL_API_KEYS_FILE", keys.path().display())
        .env("SHOAL_TOOLSETS", "kv,postgres")
        .env("SHOAL_POSTGRES_STATEMENT_TIMEOUT_MS", 20_000);
    options.postgres = true;
    let topology = start(options).await;
    let db = topology.postgres_client().await.expect("connect");
    let client = initialized(&topology.mcp_url(), ALICE).await;
    let running = async || -> i64 {
        db.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
             AND pid <> pg_backend_pid() AND strpos(query, 'pg_sleep(3) AS held') > 0",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
    };
    let mut statuses = Vec::new();
    for n in 0..6 {
        let body = client.request_body(
            100 + n,
            "tools/call",
            // A different statement each time (identical reads would share one run: single flight).
            json!({"name": "pg_query", "arguments": {"sql": format!("SELECT pg_sleep(3) AS held, {n} AS call")}}),
        );
        let response = client.post_message(&body).send().await.expect("POST");
        statuses.push(response.status());
        if n < 2 {
            assert_eq!(response.status(), StatusCode::OK, "call {n}: {response:?}");
            eventually("the call's statement to run", WAIT, async || {
                (running().await > n).then_some(())
            })
            .await;
        }
        // Hang up after the headers: the call goes on without its client.
        drop(response);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS,
        ]
    );
    assert_eq!(running().await, 2, "at most the quota runs");
    // The calls end by themselves, and their slots free with them.
    eventually("a slot to free when the calls end", WAIT, async || {
        let result = client
            .call_tool("pg_query", json!({"sql": "SELECT 1 AS one"}))
            .await
            .ok()?;
        (result["isError"] != json!(true)).then_some(())
    })
    .await;
}

const CAROL: &str = "carol-key-0123456789abcdef0123456789abcdef";
const DAVE: &str = "dave-key-0123456789abcdef0123456789abcdef";
const ERIN: &str = "erin-key-0123456789abcdef0123456789abcdef";

/// A keys file entry with `scopes` and the `quota` table `quota`.
fn scoped_key_with_quota(principal: &str, key: &str, scopes: &str, quota: &str) -> String {
    format!(
        "[[key]]\nprincipal = \"{principal}\"\nscopes = [{scopes}]\n\
         sha256 = \"{}\"\nquota = {{ {quota} }}\n\n",
        hex::encode(Sha256::digest(key.as_bytes()))
    )
}

/// Calls of Lua scripts Redis has served so far (every quota decision is one).
async fn script_calls(topology: &Topology) -> u64 {
    let info = redis_cli(topology, &["INFO", "commandstats"]).await;
    info.lines()
        .filter_map(|line| {
            line.strip_prefix("cmdstat_evalsha:calls=")
                .or_else(|| line.strip_prefix("cmdstat_eval:calls="))
        })
        .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// Sends 20 requests (`send`) of a principal with 3 requests of its burst left and a rate of 1/s:
/// how many were answered `refused`, how many 429 for the request rate (every other answer must
/// be that), and how many the rate allowed over the time taken (3 + the seconds, rounded up).
async fn refused_then_over_rate(
    refused: StatusCode,
    mut send: impl AsyncFnMut() -> (StatusCode, reqwest::header::HeaderMap, String),
) -> (u32, u32, u32) {
    let started = std::time::Instant::now();
    let (mut refusals, mut over) = (0u32, 0u32);
    for _ in 0..20 {
        let (status, headers, body) = send().await;
        if status == refused {
            refusals += 1;
        } else {
            assert_eq!(refused_quota(status, &headers, &body), "requests");
            over += 1;
        }
    }
    let allowed = 3 + started.elapsed().as_secs_f64().ceil() as u32;
    (refusals, over, allowed)
}

/// Requests refused before admission for the caller's own fault are charged to its rate (issue
/// 27, finding 7): naming random session ids (each a lookup and a 404) or calling a tool outside
/// its scopes (a 403) soon gets 429 instead, so a principal cannot make unbounded free work. Over
/// its rate, a principal's requests are answered from the replica's memory: no Redis round trip
/// (counted in Redis's command statistics), and no body read (a request whose body never comes
/// is answered at once).
#[tokio::test]
async fn refused_requests_are_charged_and_an_exhausted_rate_costs_nothing() {
    let keys = keys_file(&format!(
        "{}{}{}{}",
        key_with_quota("alice", ALICE, "requests_per_sec = 1, burst = 3"),
        key_with_quota("erin", ERIN, "requests_per_sec = 1, burst = 3"),
        scoped_key_with_quota("carol", CAROL, "\"kv\"", "requests_per_sec = 1, burst = 5"),
        scoped_key_with_quota(
            "dave",
            DAVE,
            "\"kv:write\"",
            "requests_per_sec = 1, burst = 1"
        ),
    ));
    let topology = quota_cluster(&keys, &[]).await;
    let url = topology.replicas[0].mcp_url();

    // Random well-formed session ids: a few 404s (the burst, and what refills meanwhile), then 429.
    let (unknown, over, allowed) = refused_then_over_rate(StatusCode::NOT_FOUND, async || {
        let session = uuid::Uuid::new_v4().to_string();
        post_raw(&url, Some(&session), Some(ALICE), &ping()).await
    })
    .await;
    assert!(
        unknown <= allowed && over >= 20 - allowed,
        "{unknown} answered 404 and {over} 429; the rate allows {allowed}"
    );

    // Calls outside the caller's scopes: a few 403s, then 429.
    let carol = initialized(&url, CAROL).await;
    let session = carol.session_id().expect("session").to_owned();
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "kv_set", "arguments": {"key": "k", "value": "v"}}});
    // Its burst of 5, less the initialize and the initialized notification: 3 left, as alice's.
    let (forbidden, over, allowed) = refused_then_over_rate(StatusCode::FORBIDDEN, async || {
        post_raw(&url, Some(&session), Some(CAROL), &call).await
    })
    .await;
    assert!(
        forbidden <= allowed && over >= 20 - allowed,
        "{forbidden} answered 403 and {over} 429; the rate allows {allowed}"
    );

    // Over its rate, a flood costs no round trip: about two quota decisions a second reach Redis
    // (the refusal that starts a window, the request that passes when it ends), not one each.
    let erin = initialized(&topology.replicas[1].mcp_url(), ERIN).await;
    let session = erin.session_id().expect("session").to_owned();
    let flood_url = topology.replicas[1].mcp_url();
    let before = script_calls(&topology).await;
    let started = std::time::Instant::now();
    let mut refused = 0;
    for _ in 0..200 {
        let (status, _, _) = post_raw(&flood_url, Some(&session), Some(ERIN), &ping()).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            refused += 1;
        }
    }
    let decided = script_calls(&topology).await - before;
    let bound = 2 * (started.elapsed().as_secs_f64().ceil() as u64 + 1) + 10;
    assert!(refused >= 150, "{refused} of 200 refused");
    assert!(
        decided <= bound,
        "{decided} scripts ran in Redis for 200 requests of a principal over its rate (bound {bound})"
    );

    // Over its rate, a request is answered before its body arrives (it is never read).
    let (status, _, _) = post_raw(&url, None, Some(DAVE), &ping()).await;
    assert_ne!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "dave's first request"
    );
    let (status, headers, body) = post_raw(&url, None, Some(DAVE), &ping()).await;
    assert_eq!(refused_quota(status, &headers, &body), "requests");
    let port = topology.replicas[0].port();
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {DAVE}\r\n\
         Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
         Content-Length: 500000\r\n\r\n{{\"jsonrpc\": \"2.0\", \"id\": 1, "
    );
    tokio::io::AsyncWriteExt::write_all(&mut socket, head.as_bytes())
        .await
        .expect("write");
    let mut answer = vec![0u8; 64];
    let read = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::io::AsyncReadExt::read(&mut socket, &mut answer),
    )
    .await
    .expect("answered without waiting for the body")
    .expect("read");
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
}

/// Second review, finding 1 (second half): one principal within its quotas cannot take all of a
/// replica's capacity of one kind. With a pool of four connections and the default share (half),
/// a principal's third and fourth concurrent statements are refused at once, and another
/// principal's query runs at once instead of waiting for the pool; likewise for a tool's slots
/// (`sleep`, four slots on the replica).
#[tokio::test]
async fn one_principal_holds_at_most_its_share_of_a_replicas_pool_and_slots() {
    let keys = keys_file(&format!(
        "{}{}",
        scoped_key_with_quota(
            "alice",
            ALICE,
            "\"postgres\", \"kv:write\"",
            "concurrent_calls = 32"
        ),
        scoped_key_with_quota(
            "bob",
            BOB,
            "\"postgres\", \"kv:write\"",
            "concurrent_calls = 32"
        ),
    ));
    let mut options = cluster_options(1)
        .env("SHOAL_AUTH", "api-keys")
        .env("SHOAL_API_KEYS_FILE", keys.path().display())
        .env("SHOAL_TOOLSETS", "kv,postgres")
        .env("SHOAL_POSTGRES_POOL_MAX", 4)
        .env("SHOAL_POSTGRES_ACQUIRE_TIMEOUT_MS", 5000)
        .env("SHOAL_TOOL_CONCURRENCY_LIMITS", "sleep=4");
    options.postgres = true;
    options.balancer = false;
    let topology = start(options).await;
    let url = topology.replicas[0].mcp_url();
    // One client shared by alice's calls: its request ids are distinct (a fork starts its own).
    let alice = std::sync::Arc::new(initialized(&url, ALICE).await);
    let bob = initialized(&url, BOB).await;

    for (what, calls, quick) in [
        (
            "database connections",
            (0..4)
                .map(|n| {
                    (
                        "pg_query",
                        json!({"sql": format!("SELECT pg_sleep(3) AS held, {n} AS call")}),
                    )
                })
                .collect::<Vec<_>>(),
            ("pg_query", json!({"sql": "SELECT 1 AS one"})),
        ),
        (
            "sleep slots",
            (0..4)
                .map(|_| ("sleep", json!({"ms": 3000})))
                .collect::<Vec<_>>(),
            ("sleep", json!({"ms": 10})),
        ),
    ] {
        let started = std::time::Instant::now();
        let running: Vec<_> = calls
            .into_iter()
            .map(|(tool, arguments)| {
                let alice = alice.clone();
                tokio::spawn(async move { alice.call_tool(tool, arguments).await.expect("call") })
            })
            .collect();
        // Two of alice's calls are refused at once, naming her share; two run.
        let mut pending = Vec::new();
        for call in running {
            pending.push(call);
        }
        let mut finished = Vec::new();
        while finished.len() < 2 && started.elapsed() < WAIT {
            let mut still = Vec::new();
            for call in pending.drain(..) {
                if call.is_finished() {
                    finished.push(call.await.expect("task"));
                } else {
                    still.push(call);
                }
            }
            pending = still;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let refused = finished
            .iter()
            .filter(|result| {
                result["isError"] == json!(true) && text_of(result).contains("your share")
            })
            .count();
        assert_eq!(
            refused, 2,
            "two of alice's calls refused ({what}): {finished:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "refused at once, not after waiting ({what}): {:?}",
            started.elapsed()
        );
        assert_eq!(pending.len(), 2, "two of alice's calls run ({what})");
        // Bob is not kept waiting behind alice.
        let asked = std::time::Instant::now();
        let (tool, arguments) = quick;
        let result = bob.call_tool(tool, arguments).await.expect("bob's call");
        assert_ne!(
            result["isError"],
            json!(true),
            "bob's call ({what}): {result}"
        );
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "bob waited {:?} for {what}",
            asked.elapsed()
        );
        for call in pending {
            let result = call.await.expect("task");
            assert_ne!(
                result["isError"],
                json!(true),
                "alice's call ran ({what}): {result}"
            );
        }
    }
}
