//! The behaviours of `docs/design.md` §3, each through a real nginx round-robin balancer in front of
//! three real replica processes sharing a real Redis.

use std::{collections::HashSet, time::Duration};

use serde_json::{Value, json};
use shoal_testkit::client::McpClient;

use crate::helpers::*;

on_each_redis!(
    legacy_session_roams_across_all_replicas,
    resource_update_reaches_the_get_stream_on_another_replica,
    killed_replica_stream_resumes_without_loss_or_duplicates,
    delete_ends_the_session_everywhere,
    sampling_response_is_forwarded_to_the_waiting_replica,
    cancellation_reaches_the_replica_running_the_tool,
    listen_stream_receives_changes_from_other_replicas,
);

/// §3.1: a legacy session initialized on one replica is served by every replica, each restoring it
/// from Redis the first time it sees it.
async fn legacy_session_roams_across_all_replicas(redis: RedisKind) {
    let topology = cluster_on(redis, 3).await;
    let client = legacy_client(&topology.mcp_url()).await;
    let mut served = HashSet::new();
    for n in 0..9 {
        let exchange = call_ok(
            &client,
            "kv_set",
            json!({"key": format!("roam{n}"), "value": format!("v{n}")}),
        )
        .await;
        served.insert(replica_of(&exchange.headers));
    }
    for n in 0..9 {
        let exchange = call_ok(&client, "kv_get", json!({"key": format!("roam{n}")})).await;
        assert_eq!(text_of(exchange.result().expect("result")), format!("v{n}"));
        served.insert(replica_of(&exchange.headers));
    }
    assert_eq!(
        served.len(),
        3,
        "round robin spread the session over every replica: {served:?}"
    );
    assert_eq!(
        metric_sum(&topology, "shoal_session_creates_total").await,
        1.0
    );
    assert!(
        metric_sum(&topology, "shoal_session_restores_total").await >= 2.0,
        "the replicas that did not initialize the session restored it"
    );
}

/// §3.2: a write on one replica reaches the subscriber's GET stream held by another, promptly.
async fn resource_update_reaches_the_get_stream_on_another_replica(redis: RedisKind) {
    let topology = cluster_on(redis, 3).await;
    let subscriber = legacy_client(&topology.mcp_url()).await;
    subscribe(&subscriber, "kv://fan").await;
    let mut stream = subscriber.open_get(None).await.expect("GET");
    assert_eq!(stream.status, 200);
    let holder = replica_of(&stream.headers);

    let writer = legacy_client(&topology.mcp_url()).await;
    let mut written_on = holder.clone();
    for _ in 0..6 {
        let exchange = call_ok(&writer, "kv_set", json!({"key": "fan", "value": "x"})).await;
        written_on = replica_of(&exchange.headers);
        if written_on != holder {
            break;
        }
    }
    assert_ne!(
        written_on, holder,
        "a write landed on another replica than the GET stream"
    );
    let (id, _) = next_matching(&mut stream, "the update notification", |m| {
        is_update_of(m, "kv://fan")
    })
    .await;
    let id = id.expect("the event has an id");
    assert!(
        id.starts_with(&format!("{}.", subscriber.session_id().expect("session"))),
        "event ids name their session: {id}"
    );
}

/// §3.3: the replica holding the GET stream is killed with SIGKILL; the client reconnects with
/// `Last-Event-ID` (landing elsewhere) and receives every event raised meanwhile, none twice.
async fn killed_replica_stream_resumes_without_loss_or_duplicates(redis: RedisKind) {
    let mut topology = cluster_on(redis, 3).await;
    let url = topology.mcp_url();
    let subscriber = legacy_client(&url).await;
    let keys: Vec<String> = (0..30).map(|n| format!("k{n:02}")).collect();
    for key in &keys {
        subscribe(&subscriber, &format!("kv://{key}")).await;
    }
    let writer = legacy_client(&url).await;
    let mut stream = subscriber.open_get(None).await.expect("GET");
    let holder = replica_of(&stream.headers);
    let mut received: Vec<(String, String)> = Vec::new();

    for key in &keys[..10] {
        call_ok(&writer, "kv_set", json!({"key": key, "value": "1"})).await;
        receive(&mut stream, key, &mut received).await;
    }
    topology.replica(&holder).expect("holder").kill9().await;
    // The stream breaks with its replica.
    assert!(
        matches!(stream.next_message(WAIT).await, Ok(None)),
        "the stream ended with its replica"
    );

    for key in &keys[10..20] {
        call_ok(&writer, "kv_set", json!({"key": key, "value": "2"})).await;
    }
    let last = received.last().expect("events before the kill").0.clone();
    let mut resumed = subscriber.open_get(Some(&last)).await.expect("resume");
    assert_eq!(resumed.status, 200);
    assert_ne!(
        replica_of(&resumed.headers),
        holder,
        "resumed on a surviving replica"
    );
    for key in &keys[10..20] {
        receive(&mut resumed, key, &mut received).await;
    }
    for key in &keys[20..] {
        call_ok(&writer, "kv_set", json!({"key": key, "value": "3"})).await;
        receive(&mut resumed, key, &mut received).await;
    }
    // Nothing else arrives (no duplicate of an earlier event).
    match resumed.next_message(Duration::from_millis(500)).await {
        Err(()) => {}
        other => panic!("unexpected extra event: {other:?}"),
    }
    let order: Vec<&String> = received.iter().map(|(_, key)| key).collect();
    assert_eq!(
        order,
        keys.iter().collect::<Vec<_>>(),
        "every event, in order"
    );
    let ids: HashSet<&String> = received.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), keys.len(), "no event delivered twice");
}

async fn receive(
    stream: &mut shoal_testkit::client::EventStream,
    key: &str,
    received: &mut Vec<(String, String)>,
) {
    let uri = format!("kv://{key}");
    let (id, _) = next_matching(stream, &uri, |m| is_update_of(m, &uri)).await;
    received.push((id.expect("event id"), key.to_owned()));
}

/// §3.4: DELETE on one replica ends the session everywhere: its GET stream closes, every replica
/// answers 404, and its Redis keys are gone.
async fn delete_ends_the_session_everywhere(redis: RedisKind) {
    let topology = cluster_on(redis, 3).await;
    let client = legacy_client(&topology.mcp_url()).await;
    let session = client.session_id().expect("session").to_owned();
    for _ in 0..3 {
        call_ok(&client, "test_simple_text", json!({})).await;
    }
    subscribe(&client, "kv://del").await;
    let mut stream = client.open_get(None).await.expect("GET");
    assert_eq!(stream.status, 200);

    assert_eq!(client.delete().await.expect("DELETE"), 204);
    assert!(
        matches!(stream.next_message(WAIT).await, Ok(None)),
        "the GET stream ended"
    );
    let mut answered = HashSet::new();
    for _ in 0..6 {
        let exchange = client
            .request("tools/list", Value::Null)
            .await
            .expect("request");
        assert_eq!(
            exchange.status, 404,
            "deleted session is unknown everywhere"
        );
        answered.insert(replica_of(&exchange.headers));
    }
    assert_eq!(answered.len(), 3, "asked every replica: {answered:?}");
    assert_eq!(
        client.delete().await.expect("DELETE"),
        404,
        "deleting twice"
    );
    assert!(
        redis_keys_with(&topology, &session).await.is_empty(),
        "no Redis key left"
    );
    assert_eq!(
        redis_cli(
            &topology,
            &["SCARD", &keys_of(&topology).subscribers("kv://del")]
        )
        .await,
        "0"
    );
    eventually("every replica dropped its worker", WAIT, async || {
        (metric_sum(&topology, "shoal_sessions_active").await == 0.0).then_some(())
    })
    .await;
}

/// Calls EXPIRE has served so far (Redis `INFO commandstats`).
async fn expire_calls(topology: &shoal_testkit::topology::Topology) -> u64 {
    let info = redis_cli(topology, &["INFO", "commandstats"]).await;
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_expire:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

/// A busy session slides its TTL in Redis once per touch interval and replica, not on every
/// request; with the interval at 0, every request slides it.
#[tokio::test]
async fn busy_sessions_slide_their_ttl_once_per_interval() {
    for (interval_ms, calls) in [(60_000, 30), (0, 30)] {
        let topology =
            start(cluster_options(1).env("SHOAL_SESSION_TOUCH_INTERVAL_MS", interval_ms)).await;
        let client = legacy_client(&topology.mcp_url()).await;
        call_ok(&client, "echo", json!({"text": "warm"})).await;
        let before = expire_calls(&topology).await;
        for n in 0..calls {
            call_ok(&client, "echo", json!({"text": format!("busy {n}")})).await;
        }
        let slides = expire_calls(&topology).await - before;
        if interval_ms == 0 {
            assert!(slides >= calls, "{slides} slides for {calls} calls");
        } else {
            // Once at most (the warm-up call slid it, unless the interval ran out meanwhile).
            assert!(slides <= 1, "{slides} slides for {calls} calls");
        }
        let ttl: i64 = redis_cli(
            &topology,
            &[
                "TTL",
                &keys_of(&topology).session(client.session_id().expect("session")),
            ],
        )
        .await
        .trim()
        .parse()
        .expect("TTL");
        assert!(ttl > 1700, "the session's TTL was slid: {ttl}");
    }
}

/// §3.4: an idle session expires everywhere, with its Redis keys and every replica's worker.
#[tokio::test]
async fn idle_sessions_expire_everywhere() {
    let topology = start(cluster_options(3).env("SHOAL_SESSION_IDLE_TTL_SECS", 2)).await;
    let client = legacy_client(&topology.mcp_url()).await;
    let session = client.session_id().expect("session").to_owned();
    for _ in 0..3 {
        call_ok(&client, "test_simple_text", json!({})).await;
    }
    assert!(
        metric_sum(&topology, "shoal_sessions_active").await >= 3.0,
        "every replica holds a worker"
    );
    eventually("the session record to expire in Redis", WAIT, async || {
        redis_keys_with(&topology, &session)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    eventually("every replica to drop its worker", WAIT, async || {
        (metric_sum(&topology, "shoal_sessions_active").await == 0.0).then_some(())
    })
    .await;
    let mut answered = HashSet::new();
    for _ in 0..3 {
        let exchange = client
            .request("tools/list", Value::Null)
            .await
            .expect("request");
        assert_eq!(exchange.status, 404);
        answered.insert(replica_of(&exchange.headers));
    }
    assert_eq!(answered.len(), 3);
}

/// §3.5: a tool on one replica asks the client for sampling; the client's response lands on
/// another replica, which forwards it; the tool completes.
async fn sampling_response_is_forwarded_to_the_waiting_replica(redis: RedisKind) {
    let topology = cluster_on(redis, 3).await;
    let client = legacy_client(&topology.mcp_url()).await;
    let (id, mut stream) = client
        .open_request(
            "tools/call",
            json!({"name": "test_sampling", "arguments": {"prompt": "say hi"}}),
        )
        .await
        .expect("tools/call");
    let runner = replica_of(&stream.headers);
    let (_, request) = next_matching(&mut stream, "sampling/createMessage", |m| {
        m.get("method") == Some(&json!("sampling/createMessage"))
    })
    .await;
    let status_and_replica = {
        let response = json!({
            "role": "assistant",
            "content": {"type": "text", "text": "hi from the model"},
            "model": "test-model",
            "stopReason": "endTurn"
        });
        let body = json!({"jsonrpc": "2.0", "id": request["id"], "result": response});
        let response = client.post_message(&body).send().await.expect("respond");
        (response.status(), replica_of(response.headers()))
    };
    assert_eq!(status_and_replica.0, 202);
    assert_ne!(
        status_and_replica.1, runner,
        "the response landed on another replica"
    );
    let (_, result) = next_matching(&mut stream, "the tool result", |m| {
        m.get("id") == Some(&json!(id))
    })
    .await;
    let text = text_of(&result["result"]);
    assert!(text.contains("hi from the model"), "{result}");
    let receiver = topology
        .replicas
        .iter()
        .find(|r| r.id == status_and_replica.1)
        .expect("replica");
    assert_eq!(
        metric(
            &receiver.base_url(),
            "shoal_forwards_total{kind=\"response\"}"
        )
        .await,
        1.0
    );
}

/// §3.6: `notifications/cancelled` posted to another replica cancels the tool where it runs.
async fn cancellation_reaches_the_replica_running_the_tool(redis: RedisKind) {
    let topology = cluster_on(redis, 3).await;
    let client = legacy_client(&topology.mcp_url()).await;
    let (id, mut stream) = client
        .open_request(
            "tools/call",
            json!({"name": "sleep", "arguments": {"ms": 60000}, "_meta": {"progressToken": "p1"}}),
        )
        .await
        .expect("tools/call");
    let runner = replica_of(&stream.headers);
    next_matching(&mut stream, "a progress notification", |m| {
        m.get("method") == Some(&json!("notifications/progress"))
    })
    .await;
    let body = json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": id, "reason": "test"}});
    let response = client.post_message(&body).send().await.expect("cancel");
    assert_eq!(response.status(), 202);
    assert_ne!(
        replica_of(response.headers()),
        runner,
        "the cancellation landed on another replica"
    );
    // The request stream ends without a result, long before the 60 s sleep would.
    loop {
        match stream.next_message(WAIT).await {
            Ok(Some(event)) => {
                let message = event.message.expect("message");
                assert!(
                    message.get("result").is_none(),
                    "a cancelled request gets no result: {message}"
                );
            }
            Ok(None) => break,
            Err(()) => panic!("the cancelled tool kept running"),
        }
    }
    let runner_url = topology
        .replicas
        .iter()
        .find(|r| r.id == runner)
        .expect("runner")
        .base_url();
    eventually("the tool to stop as cancelled", WAIT, async || {
        (metric(
            &runner_url,
            "shoal_mcp_requests_total{method=\"tools/call\",outcome=\"cancelled\"}",
        )
        .await
            == 1.0)
            .then_some(())
    })
    .await;
}

/// §3.7: a 2026-07-28 `subscriptions/listen` stream on one replica receives a change raised on
/// another, with its subscription id.
async fn listen_stream_receives_changes_from_other_replicas(redis: RedisKind) {
    let topology = cluster_on(redis, 3).await;
    let listener = McpClient::modern(topology.mcp_url());
    let (id, mut stream) = listener
        .open_request("subscriptions/listen", listen_params("kv://listen"))
        .await
        .expect("listen");
    assert_eq!(stream.status, 200);
    let holder = replica_of(&stream.headers);
    let ack = acknowledged(&mut stream).await;
    assert_eq!(
        ack.pointer("/params/_meta/io.modelcontextprotocol~1subscriptionId"),
        Some(&json!(id))
    );

    let writer = McpClient::modern(topology.mcp_url());
    let mut written_on = holder.clone();
    for _ in 0..6 {
        let exchange = call_ok(&writer, "kv_set", json!({"key": "listen", "value": "x"})).await;
        written_on = replica_of(&exchange.headers);
        if written_on != holder {
            break;
        }
    }
    assert_ne!(written_on, holder);
    let (_, update) = next_matching(&mut stream, "the update", |m| {
        is_update_of(m, "kv://listen")
    })
    .await;
    assert_eq!(
        update.pointer("/params/_meta/io.modelcontextprotocol~1subscriptionId"),
        Some(&json!(id))
    );
}

/// §3.7: listen handlers end when their client goes away.
#[tokio::test]
async fn listen_handlers_end_when_the_client_goes_away() {
    let topology = cluster(3).await;
    let listener = McpClient::modern(topology.mcp_url());
    let (_, mut stream) = listener
        .open_request("subscriptions/listen", listen_params("kv://gone"))
        .await
        .expect("listen");
    let holder = replica_of(&stream.headers);
    acknowledged(&mut stream).await;
    let url = topology
        .replicas
        .iter()
        .find(|r| r.id == holder)
        .expect("holder")
        .base_url();
    assert_eq!(
        metric(&url, "shoal_streams_active{kind=\"listen\"}").await,
        1.0
    );
    drop(stream);
    drop(listener);
    eventually("the listen handler to end", WAIT, async || {
        (metric(&url, "shoal_streams_active{kind=\"listen\"}").await == 0.0).then_some(())
    })
    .await;
}

/// Issue 11, acceptance 4: a replica's identity is generated, so replicas started without a name
/// and without `HOSTNAME` (systemd units, plain shells) still tell themselves apart in
/// `x-shoal-replica` (and in `service.instance.id` and bus addresses, the same id).
#[tokio::test]
async fn replicas_without_a_name_still_have_distinct_identities() {
    let topology = start(
        cluster_options(3)
            .env("SHOAL_REPLICA_NAME", "")
            .env("HOSTNAME", ""),
    )
    .await;
    let mut ids = HashSet::new();
    for replica in &topology.replicas {
        let exchange = McpClient::modern(replica.mcp_url())
            .request("tools/list", json!({}))
            .await
            .expect("tools/list");
        let id = replica_of(&exchange.headers);
        assert!(
            id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "a generated id, not a name: {id:?}"
        );
        ids.insert(id);
    }
    assert_eq!(ids.len(), 3, "three replicas, three identities: {ids:?}");
    // Through the balancer the same three answer.
    let client = McpClient::modern(topology.mcp_url());
    let mut seen = HashSet::new();
    for _ in 0..6 {
        let exchange = client
            .request("tools/list", json!({}))
            .await
            .expect("tools/list");
        seen.insert(replica_of(&exchange.headers));
    }
    assert_eq!(seen, ids);
}
