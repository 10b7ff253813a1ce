//! The security review's session findings (issue 10, findings 7 and 8) through real replicas
//! behind the balancer: a session id is accepted only in its generated form, so nothing a client
//! sends in the header can reach another session; a `Last-Event-ID` from the future cannot blind
//! a session's streams.

use serde_json::json;

use shoal_testkit::{client::McpClient, fault::Fault};

use crate::helpers::*;

async fn subscribed_client(url: &str, uri: &str) -> shoal_testkit::client::McpClient {
    let client = legacy_client(url).await;
    subscribe(&client, uri).await;
    client
}

/// Finding 7: `DELETE` with `Mcp-Session-Id: <victim> junk` answered 404 yet ended the victim's
/// GET stream (the delete script published `del <header>`, and the bus splits on spaces).
#[tokio::test]
async fn a_malformed_session_id_reaches_no_session() {
    let topology = cluster(3).await;
    let url = topology.mcp_url();
    let victim = subscribed_client(&url, "kv://victim").await;
    let session = victim.session_id().expect("session").to_owned();
    let mut stream = victim.open_get(None).await.expect("GET");
    assert_eq!(stream.status, 200);

    let attacker = reqwest::Client::new();
    for value in [
        format!("{session} junk"),
        format!("{session}\tdel {session}"),
        session.to_uppercase(),
        format!("x{session}"),
    ] {
        for method in [
            reqwest::Method::DELETE,
            reqwest::Method::GET,
            reqwest::Method::POST,
        ] {
            let status = attacker
                .request(method.clone(), &url)
                .header("mcp-session-id", &value)
                .header("accept", "application/json, text/event-stream")
                .header("content-type", "application/json")
                .body(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string())
                .send()
                .await
                .expect("request")
                .status();
            assert_eq!(status, 404, "{method} with {value:?}");
        }
    }
    // Two session ids in one request are refused too.
    let status = attacker
        .delete(&url)
        .header("mcp-session-id", &session)
        .header("mcp-session-id", uuid::Uuid::new_v4().to_string())
        .send()
        .await
        .expect("request")
        .status();
    assert_eq!(status, 404);

    // The victim's session and GET stream live on: a write elsewhere reaches the stream.
    let writer = legacy_client(&url).await;
    call_ok(
        &writer,
        "kv_set",
        json!({"key": "victim", "value": "still here"}),
    )
    .await;
    next_matching(&mut stream, "the victim's update", |m| {
        is_update_of(m, "kv://victim")
    })
    .await;
    call_ok(&victim, "kv_get", json!({"key": "victim"})).await;
}

/// Finding 8: `Last-Event-ID: <session>.99999999999999-0` set the session's feed cursor past every
/// real event, so that stream and every later GET stream of the session received nothing.
#[tokio::test]
async fn a_last_event_id_from_the_future_does_not_blind_the_session() {
    let topology = cluster(3).await;
    let url = topology.mcp_url();
    let client = subscribed_client(&url, "kv://future").await;
    let session = client.session_id().expect("session").to_owned();
    let writer = legacy_client(&url).await;
    call_ok(
        &writer,
        "kv_set",
        json!({"key": "future", "value": "before"}),
    )
    .await;

    let mut stream = client
        .open_get(Some(&format!("{session}.99999999999999-0")))
        .await
        .expect("GET");
    assert_eq!(stream.status, 200);
    call_ok(
        &writer,
        "kv_set",
        json!({"key": "future", "value": "during"}),
    )
    .await;
    let (first, _) = next_matching(&mut stream, "an update on the resumed stream", |m| {
        is_update_of(m, "kv://future")
    })
    .await;
    drop(stream);

    // A later stream of the session is not blinded either.
    let mut stream = client.open_get(None).await.expect("GET");
    assert_eq!(stream.status, 200);
    call_ok(
        &writer,
        "kv_set",
        json!({"key": "future", "value": "after"}),
    )
    .await;
    let (second, _) = next_matching(&mut stream, "an update on a later stream", |m| {
        is_update_of(m, "kv://future")
    })
    .await;
    assert_ne!(first, second, "not the same event twice");
}

/// Sends a `subscriptions/listen` and reads its stream until `answer` appears (rmcp may keep a
/// refused listen's stream open after the error); returns what was read.
async fn listen_until_answered(
    url: &str,
    listener: &shoal_testkit::client::McpClient,
    params: serde_json::Value,
    answer: &str,
) -> String {
    let body = listener.request_body(7, "subscriptions/listen", params);
    let mut response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "subscriptions/listen")
        .body(body.to_string())
        .send()
        .await
        .expect("listen");
    let mut seen = String::new();
    let answered = tokio::time::timeout(WAIT, async {
        while let Ok(Some(chunk)) = response.chunk().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains(answer) {
                return;
            }
        }
    })
    .await;
    assert!(answered.is_ok(), "no answer: {seen}");
    seen
}

/// Finding 5: per-request state is bounded, each bound answered with the spec's error: the size of
/// `initialize` (stored with the session), the URIs of a listen stream and their length, the
/// length of a subscribed URI, and the subscribers of one URI.
#[tokio::test]
async fn per_request_state_is_bounded_with_clear_errors() {
    let options = cluster_options(1).env("SHOAL_MAX_SUBSCRIBERS_PER_URI", 2);
    let topology = start(options).await;
    let url = topology.mcp_url();

    let mut big = shoal_testkit::client::McpClient::legacy(url.clone());
    let error = big
        .initialize_with(json!({"experimental": {"padding": {"x": "y".repeat(100_000)}}}))
        .await
        .expect_err("a 100 KB initialize is refused");
    assert!(
        format!("{error:?}").contains("initialize request exceeds 65536 bytes"),
        "{error:?}"
    );
    let exchange = big
        .request("tools/list", serde_json::Value::Null)
        .await
        .expect("request");
    assert_ne!(exchange.status, 200, "no session was created");

    let long_uri = format!("kv://{}", "k".repeat(3000));
    let client = legacy_client(&url).await;
    let exchange = client
        .request("resources/subscribe", json!({"uri": long_uri}))
        .await
        .expect("subscribe");
    assert_eq!(
        exchange.response().and_then(|r| r.pointer("/error/code")),
        Some(&json!(-32602))
    );

    // Second review, finding 4: a listen over its limits, or naming a URI that is over-long,
    // unknown or not a resource, is refused with -32602 naming it, and never acknowledged first
    // (the client would believe it listens).
    let listener = shoal_testkit::client::McpClient::modern(url.clone());
    let many: Vec<String> = (0..300).map(|n| format!("kv://k{n}")).collect();
    let long_keys: Vec<String> = (0..5)
        .map(|n| format!("kv://{n}{}", "k".repeat(300)))
        .collect();
    for (uris, named) in [
        (many, "at most 256 are accepted".to_owned()),
        (
            vec![long_uri.clone()],
            "is longer than 2048 bytes".to_owned(),
        ),
        (long_keys.clone(), format!("no resource {}", long_keys[0])),
        (
            vec!["kv://fine".to_owned(), "nope://x".to_owned()],
            "no resource nope://x".to_owned(),
        ),
        (
            vec!["not a uri".to_owned()],
            "no resource not a uri".to_owned(),
        ),
    ] {
        let seen = listen_until_answered(
            &url,
            &listener,
            json!({"notifications": {"resourceSubscriptions": uris}}),
            "\"code\":-32602",
        )
        .await;
        assert!(!seen.contains("acknowledged"), "acknowledged first: {seen}");
        assert!(seen.contains(&named), "{named}: {seen}");
    }
    // Within every bound: acknowledged.
    let seen = listen_until_answered(
        &url,
        &listener,
        json!({"notifications": {"resourceSubscriptions": ["kv://fine"]}}),
        "subscriptions/acknowledged",
    )
    .await;
    assert!(!seen.contains("-32602"), "{seen}");

    // Two sessions may subscribe to kv://popular; the third is told why not.
    for n in 0..3 {
        let client = legacy_client(&url).await;
        let exchange = client
            .request("resources/subscribe", json!({"uri": "kv://popular"}))
            .await
            .expect("subscribe");
        let response = exchange.response().expect("a response");
        if n < 2 {
            assert!(response.get("result").is_some(), "{response}");
        } else {
            assert_eq!(
                response.pointer("/error/code"),
                Some(&json!(-32600)),
                "{response}"
            );
            assert!(response.to_string().contains("limit 2"), "{response}");
        }
    }
}

/// Finding 6: one client cannot use up what every client shares. A session has one live GET
/// stream (a newer one replaces the older, wherever each is held); a connection that never sends
/// a byte is closed; one session runs a bounded number of tool calls at once.
#[tokio::test]
async fn one_client_cannot_use_up_shared_limits() {
    let options = cluster_options(3)
        .env("SHOAL_HEADER_READ_TIMEOUT_MS", 500)
        .env("SHOAL_MAX_CALLS_PER_SESSION", 2);
    let topology = start(options).await;
    let url = topology.mcp_url();
    let client = subscribed_client(&url, "kv://one").await;
    let mut older = client.open_get(None).await.expect("GET");
    assert_eq!(older.status, 200);
    for _ in 0..4 {
        let newer = client.open_get(None).await.expect("GET");
        assert_eq!(newer.status, 200);
        assert!(
            matches!(older.next_message(WAIT).await, Ok(None)),
            "the replaced GET stream ended"
        );
        older = newer;
    }
    let writer = legacy_client(&url).await;
    call_ok(&writer, "kv_set", json!({"key": "one", "value": "x"})).await;
    next_matching(&mut older, "the update on the newest stream", |m| {
        is_update_of(m, "kv://one")
    })
    .await;
    eventually("one GET stream open in the cluster", WAIT, async || {
        (metric_sum(&topology, "shoal_streams_active{kind=\"get\"}").await == 1.0).then_some(())
    })
    .await;

    // A connection that sends nothing is closed by the replica.
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", topology.replicas[0].port()))
        .await
        .expect("connect");
    let mut buffer = [0_u8; 16];
    let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut idle, &mut buffer))
        .await
        .expect("closed by the replica, not left open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // Two calls of one session run on one replica; the third is refused at once.
    let direct = legacy_client(&topology.replicas[0].mcp_url()).await;
    let mut running = Vec::new();
    for _ in 0..2 {
        let (_, stream) = direct
            .open_request(
                "tools/call",
                json!({"name": "sleep", "arguments": {"ms": 20_000}}),
            )
            .await
            .expect("sleep");
        running.push(stream);
    }
    eventually("two calls running", WAIT, async || {
        let base = topology.replicas[0].base_url();
        (metric(&base, "shoal_tool_calls_in_flight{tool=\"sleep\"}").await == 2.0).then_some(())
    })
    .await;
    let result = direct
        .call_tool("sleep", json!({"ms": 1}))
        .await
        .expect("third call");
    assert_eq!(result["isError"], json!(true), "{result}");
    assert!(
        text_of(&result).contains("already runs 2 tool calls"),
        "{result}"
    );
    // Another session is not affected.
    call_ok(
        &legacy_client(&topology.replicas[0].mcp_url()).await,
        "sleep",
        json!({"ms": 1}),
    )
    .await;
}

/// Finding 9: the bus's subscriber connection is cut again and again while a writer keeps
/// changing a resource; the GET stream of its subscriber (on another replica) still receives every
/// change, none twice: the replica catches up only once it is subscribed again.
#[tokio::test]
async fn bus_reconnects_lose_no_event() {
    let topology = cluster(2).await;
    let subscriber = subscribed_client(&topology.replicas[0].mcp_url(), "kv://steady").await;
    let mut stream = subscriber.open_get(None).await.expect("GET");
    assert_eq!(stream.status, 200);
    let writer = legacy_client(&topology.replicas[1].mcp_url()).await;
    const WRITES: usize = 40;
    for n in 0..WRITES {
        call_ok(
            &writer,
            "kv_set",
            json!({"key": "steady", "value": n.to_string()}),
        )
        .await;
        if n % 8 == 3 {
            // Every subscriber connection of every replica is dropped at once.
            let killed = redis_cli(&topology, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
            assert_ne!(killed, "0", "a subscriber connection was cut");
        }
        tokio::time::sleep(std::time::Duration::from_millis(15)).await;
    }
    let mut ids = std::collections::HashSet::new();
    for n in 0..WRITES {
        let (id, _) = next_matching(&mut stream, &format!("update {n}"), |m| {
            is_update_of(m, "kv://steady")
        })
        .await;
        assert!(
            ids.insert(id.expect("event id")),
            "an event delivered twice"
        );
    }
    // And the replicas are ready again: the bus round-trips.
    for replica in &topology.replicas {
        let base = replica.base_url();
        eventually("the replica to be ready", WAIT, async || {
            let status = reqwest::get(format!("{base}/readyz")).await.ok()?.status();
            status.is_success().then_some(())
        })
        .await;
    }
}

/// One live GET stream per session even when the message that ends the older one is lost: a
/// newer stream opens on another replica while the older one's replica cannot hear the bus (its
/// Redis connections are cut; nothing it held back arrives), and the older stream ends once that
/// replica is connected again, instead of staying open with nothing ever reaching it.
#[tokio::test]
async fn a_replaced_stream_ends_even_when_its_end_message_was_lost() {
    // The cut below is short; the replica must not take Redis for lost meanwhile (that ends its
    // streams anyway, for another reason).
    let topology = start(
        cluster_options(2)
            .redis_through_proxy(1)
            .env("SHOAL_REDIS_LOST_AFTER_MS", 30_000),
    )
    .await;
    let cut = &topology.redis_proxies[&1];
    let client = subscribed_client(&topology.replicas[1].mcp_url(), "kv://lost-end").await;
    let mut older = client.open_get(None).await.expect("GET");
    assert_eq!(older.status, 200);

    cut.set(Fault::CutReplies);
    let mut newer = client
        .fork_at(&topology.replicas[0].mcp_url())
        .open_get(None)
        .await
        .expect("GET");
    assert_eq!(newer.status, 200);
    // The end message the newer stream's open published is held by the proxy: drop it.
    cut.close_connections().await;
    cut.set(Fault::Pass);

    assert!(
        matches!(older.next_message(WAIT).await, Ok(None)),
        "the replaced GET stream ended"
    );
    let log = std::fs::read_to_string(topology.replicas[1].log()).expect("log");
    assert!(
        !log.contains("shared state unreachable"),
        "ended because it was replaced, not because Redis was taken for lost"
    );
    // The newer stream is the session's one: it receives what follows.
    let writer = legacy_client(&topology.replicas[0].mcp_url()).await;
    call_ok(&writer, "kv_set", json!({"key": "lost-end", "value": "x"})).await;
    next_matching(&mut newer, "the update on the newer stream", |m| {
        is_update_of(m, "kv://lost-end")
    })
    .await;
}

/// `SHOAL_MAX_STREAMS` bounds the long-lived streams a replica holds, GET and
/// `subscriptions/listen` together: one more is refused at once (503 with `Retry-After` for a GET,
/// a JSON-RPC error for a listen), and a closed stream frees its slot.
#[tokio::test]
async fn a_replica_holds_at_most_its_stream_limit() {
    let topology = start(cluster_options(1).env("SHOAL_MAX_STREAMS", 2)).await;
    let url = topology.mcp_url();
    let base = topology.replicas[0].base_url();
    let first = subscribed_client(&url, "kv://a").await;
    let first_stream = first.open_get(None).await.expect("GET");
    assert_eq!(first_stream.status, 200);
    let listener = McpClient::modern(&url);
    let (_, mut listen) = listener
        .open_request("subscriptions/listen", listen_params("kv://a"))
        .await
        .expect("listen");
    acknowledged(&mut listen).await;

    // Full: a GET and a listen are both refused.
    let second = subscribed_client(&url, "kv://b").await;
    let refused = second.open_get(None).await.expect("GET");
    assert_eq!(refused.status, 503);
    assert_eq!(
        refused
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let exchange = McpClient::modern(&url)
        .request("subscriptions/listen", listen_params("kv://b"))
        .await
        .expect("listen");
    let response = exchange.response().expect("a response");
    assert!(
        response.pointer("/error/message").is_some_and(|m| m
            .as_str()
            .is_some_and(|m| m.contains("too many open streams"))),
        "{response}"
    );
    assert_eq!(
        metric(&base, "shoal_streams_active{kind=\"get\"}").await
            + metric(&base, "shoal_streams_active{kind=\"listen\"}").await,
        2.0
    );

    // A closed stream frees its slot.
    drop(listen);
    drop(listener);
    eventually("the listen stream's slot to be freed", WAIT, async || {
        (metric(&base, "shoal_streams_active{kind=\"listen\"}").await == 0.0).then_some(())
    })
    .await;
    let admitted = second.open_get(None).await.expect("GET");
    assert_eq!(admitted.status, 200);
    drop(first_stream);
}
