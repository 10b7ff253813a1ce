//! Failures of the parts around a replica: Redis going away and coming back, a replica cut off
//! from Redis by a partition, and a replica shutting down gracefully.

use std::{collections::HashSet, time::Duration};

use serde_json::{Value, json};
use shoal_testkit::{
    client::{EventStream, McpClient},
    fault::Fault,
    topology::Topology,
};

use crate::helpers::*;

/// Redis unreachable: clear 503s with Retry-After, `/readyz` fails, nothing hangs; when Redis is
/// back every replica recovers by itself (commands and the bus).
#[tokio::test]
async fn redis_outage_gives_503_and_replicas_recover() {
    let mut topology = cluster(2).await;
    let url = topology.mcp_url();
    let client = legacy_client(&url).await;
    topology.redis.as_mut().expect("redis").kill().await;

    let exchange = client
        .request("tools/list", Value::Null)
        .await
        .expect("request");
    assert_eq!(
        exchange.status, 503,
        "a session request while Redis is down"
    );
    assert!(
        exchange.headers.get("retry-after").is_some(),
        "tells clients when to retry"
    );
    let body = exchange.response().expect("a JSON-RPC error body").clone();
    assert_eq!(body.pointer("/error/code"), Some(&json!(-32000)), "{body}");
    let mut fresh = McpClient::legacy(&url);
    let refused = fresh
        .initialize()
        .await
        .expect_err("no session can be created without Redis");
    assert!(
        refused
            .to_string()
            .contains("shared session state is unavailable"),
        "{refused}"
    );
    for replica in &topology.replicas {
        assert_eq!(
            ready(&replica.base_url()).await,
            503,
            "{} reports not ready",
            replica.name
        );
        assert_eq!(
            reqwest::get(format!("{}/healthz", replica.base_url()))
                .await
                .expect("healthz")
                .status(),
            200,
            "but alive"
        );
    }

    topology
        .redis
        .as_mut()
        .expect("redis")
        .restart()
        .await
        .expect("redis back");
    for replica in &topology.replicas {
        let base = replica.base_url();
        eventually("the replica to be ready again", WAIT, async || {
            (ready(&base).await == 200).then_some(())
        })
        .await;
    }
    // Redis came back empty (no persistence in this test): the old session is gone, new ones work,
    // and cross-replica notifications flow again through the re-established bus.
    let exchange = client
        .request("tools/list", Value::Null)
        .await
        .expect("request");
    assert_eq!(
        exchange.status,
        404,
        "{:?} {:?}\n{}",
        exchange.headers,
        exchange.events,
        topology.log_tail(30)
    );
    let mut subscriber = McpClient::legacy(&url);
    if let Err(error) = subscriber.initialize().await {
        panic!(
            "initialize after recovery: {error}\n{}",
            topology.log_tail(40)
        );
    }
    subscribe(&subscriber, "kv://back").await;
    let mut stream = subscriber.open_get(None).await.expect("GET");
    let holder = replica_of(&stream.headers);
    let writer = legacy_client(&url).await;
    for _ in 0..4 {
        let exchange = call_ok(&writer, "kv_set", json!({"key": "back", "value": "1"})).await;
        if replica_of(&exchange.headers) != holder {
            break;
        }
    }
    next_matching(&mut stream, "the update after recovery", |m| {
        is_update_of(m, "kv://back")
    })
    .await;
}

/// SIGTERM: the replica stops accepting, ends its GET and listen streams so clients reconnect
/// elsewhere, lets in-flight calls finish, and exits cleanly; clients resume on another replica.
#[tokio::test]
async fn sigterm_drains_streams_and_in_flight_calls() {
    let mut topology = cluster(2).await;
    let url = topology.mcp_url();
    let client = legacy_client(&url).await;
    subscribe(&client, "kv://drain").await;
    let mut stream = client.open_get(None).await.expect("GET");
    let victim = replica_of(&stream.headers);
    let direct = topology.replica(&victim).expect("victim").mcp_url();
    let priming = stream.next_event().await.expect("priming");
    let last_id = priming.id.expect("a resumable id");
    assert!(
        last_id.starts_with(client.session_id().expect("session")),
        "the GET stream primes with a resumable id: {last_id}"
    );

    // A slow call in flight on the same replica, and a 2026 listen stream there too.
    let mut same = McpClient::legacy(&direct);
    same.set_session_id(client.session_id().map(str::to_owned));
    let (call_id, mut call) = same
        .open_request(
            "tools/call",
            json!({"name": "sleep", "arguments": {"ms": 1500}}),
        )
        .await
        .expect("sleep");
    let listener = McpClient::modern(&direct);
    let (listen_id, mut listen) = listener
        .open_request(
            "subscriptions/listen",
            json!({"notifications": {"resourceSubscriptions": ["kv://drain"]}}),
        )
        .await
        .expect("listen");
    acknowledged(&mut listen).await;

    let replica = topology.replica(&victim).expect("victim");
    replica.send_sigterm();
    assert!(
        matches!(stream.next_message(WAIT).await, Ok(None)),
        "the GET stream ended"
    );
    let (_, final_result) = next_matching(&mut listen, "the listen stream's final result", |m| {
        m.get("id") == Some(&json!(listen_id))
    })
    .await;
    assert!(
        final_result.get("result").is_some(),
        "listen ends with a result: {final_result}"
    );
    let (_, result) = next_matching(&mut call, "the in-flight call's result", |m| {
        m.get("id") == Some(&json!(call_id))
    })
    .await;
    assert_eq!(
        text_of(&result["result"]),
        "slept 1500 ms",
        "the in-flight call completed"
    );
    let status = replica
        .wait(Duration::from_secs(15))
        .await
        .expect("the replica exited");
    assert!(status.success(), "clean exit: {status:?}");

    // The client resumes on the surviving replica, and nothing raised meanwhile is lost.
    let writer = legacy_client(&url).await;
    call_ok(&writer, "kv_set", json!({"key": "drain", "value": "after"})).await;
    let mut resumed = client.open_get(Some(&last_id)).await.expect("resume");
    assert_eq!(resumed.status, 200);
    assert_ne!(replica_of(&resumed.headers), victim);
    next_matching(&mut resumed, "the update raised during the failover", |m| {
        is_update_of(m, "kv://drain")
    })
    .await;
}

/// Three replicas, the third reaching Redis through a fault proxy (`redis_proxies[&2]`), and a
/// legacy client of that third replica subscribed to `uri` and following its GET stream.
async fn following_on_the_replica_to_cut(uri: &str) -> (Topology, McpClient, EventStream) {
    let topology = start(cluster_options(3).redis_through_proxy(2)).await;
    let mut subscriber = McpClient::legacy(topology.replicas[2].mcp_url());
    subscriber.initialize().await.expect("initialize");
    subscribe(&subscriber, uri).await;
    let stream = subscriber.open_get(None).await.expect("GET");
    assert_eq!(stream.status, 200);
    (topology, subscriber, stream)
}

/// A partition between one replica and Redis (a cut link: no connection error, only silence): the
/// cut-off replica ends its GET stream within seconds and refuses new streams (503) and readiness,
/// so its client resumes on a healthy replica with `Last-Event-ID` and receives every update raised
/// during the partition, each once; when the link heals the replica serves again by itself.
#[tokio::test]
async fn a_replica_cut_off_from_redis_ends_its_streams_and_recovers() {
    let (topology, subscriber, mut stream) = following_on_the_replica_to_cut("kv://p").await;
    let cut = &topology.replicas[2];
    let healthy = topology.replicas[0].mcp_url();
    let writer = legacy_client(&healthy).await;
    call_ok(&writer, "kv_set", json!({"key": "p", "value": "0"})).await;
    let (before, _) = next_matching(&mut stream, "the update before the cut", |m| {
        is_update_of(m, "kv://p")
    })
    .await;
    let before = before.expect("an event id");

    topology.redis_proxies[&2].set(Fault::Blackhole);
    for n in 1..=3 {
        call_ok(
            &writer,
            "kv_set",
            json!({"key": "p", "value": n.to_string()}),
        )
        .await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(event) = stream.next_event().await {
            assert!(
                event
                    .message
                    .as_ref()
                    .is_none_or(|m| !is_update_of(m, "kv://p")),
                "nothing reaches the cut-off replica: {event:?}"
            );
        }
    })
    .await;
    assert!(ended.is_ok(), "the cut-off replica ended its stream");
    let refused = subscriber.open_get(Some(&before)).await.expect("GET");
    assert_eq!(refused.status, 503, "no new stream on the cut-off replica");
    let base = cut.base_url();
    eventually("the cut-off replica reports not ready", WAIT, async || {
        (ready(&base).await == 503).then_some(())
    })
    .await;

    // The client resumes on a healthy replica: the three updates raised meanwhile, each once.
    let mut resumed = subscriber
        .fork_at(&healthy)
        .open_get(Some(&before))
        .await
        .expect("GET");
    assert_eq!(resumed.status, 200);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (id, _) = next_matching(&mut resumed, "an update raised during the partition", |m| {
            is_update_of(m, "kv://p")
        })
        .await;
        ids.push(id.expect("an event id"));
    }
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 3, "no update twice: {ids:?}");
    drop(resumed);

    // The link heals: the replica is ready and serves streams again, with no operator action.
    topology.redis_proxies[&2].set(Fault::Pass);
    eventually("the replica to be ready again", WAIT, async || {
        (ready(&base).await == 200).then_some(())
    })
    .await;
    let again = eventually("a stream on the healed replica", WAIT, async || {
        let stream = subscriber.open_get(None).await.expect("GET");
        (stream.status == 200).then_some(stream)
    })
    .await;
    assert_eq!(replica_of(&again.headers), replica_of(&refused.headers));
}

/// What a client following a GET stream sees when its replica is cut off from Redis while updates
/// go on elsewhere (a write every 100 ms through a healthy replica): the stream ends, the client
/// resumes on a healthy replica with `Last-Event-ID` (as SDK clients do), and the longest time
/// without an update, from before the cut to the first update on the resumed stream, stays under
/// 3 s (6.7 s before: two failed PINGs of the 2 s command timeout decided, then the stream waited
/// out one more command timeout for its final checkpoint; now at most 250 ms). Every acknowledged
/// write arrives, once.
#[tokio::test]
async fn a_partitioned_replicas_stream_is_silent_for_under_3s() {
    let (topology, subscriber, mut stream) = following_on_the_replica_to_cut("kv://silence").await;
    let healthy = topology.replicas[0].mcp_url();

    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (writer, stop) = (legacy_client(&healthy).await, stop.clone());
        tokio::spawn(async move {
            let mut acknowledged = 0usize;
            let mut every = tokio::time::interval(Duration::from_millis(100));
            while !stop.is_cancelled() {
                every.tick().await;
                let value = acknowledged.to_string();
                call_ok(&writer, "kv_set", json!({"key": "silence", "value": value})).await;
                acknowledged += 1;
            }
            acknowledged
        })
    };
    // Updates flow; then the cut.
    let (mut last_id, _) = next_matching(&mut stream, "an update before the cut", |m| {
        is_update_of(m, "kv://silence")
    })
    .await;
    let mut received = vec![tokio::time::Instant::now()];
    let mut ids = vec![last_id.clone().expect("an event id")];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut_at = tokio::time::Instant::now();
    topology.redis_proxies[&2].set(Fault::Blackhole);

    let mut resumed = false;
    while tokio::time::Instant::now() < cut_at + Duration::from_secs(8) {
        match stream.next_message(Duration::from_secs(10)).await {
            Ok(Some(event)) => {
                if event
                    .message
                    .as_ref()
                    .is_some_and(|m| is_update_of(m, "kv://silence"))
                {
                    received.push(tokio::time::Instant::now());
                    ids.push(event.id.clone().expect("an event id"));
                }
                if event.id.is_some() {
                    last_id = event.id;
                }
            }
            Ok(None) => {
                assert!(!resumed, "the resumed stream ended too");
                eprintln!("stream ended {:?} after the cut", cut_at.elapsed());
                resumed = true;
                stream = subscriber
                    .fork_at(&healthy)
                    .open_get(last_id.as_deref())
                    .await
                    .expect("GET");
                assert_eq!(stream.status, 200, "resumed on a healthy replica");
            }
            Err(()) => panic!("no event for 10 s"),
        }
    }
    stop.cancel();
    let acknowledged = writer.await.expect("writer");
    assert!(resumed, "the cut-off replica ended its stream");
    // The last writes' updates, still in flight when the writer stopped.
    while ids.len() < acknowledged {
        let (id, _) = next_matching(&mut stream, "the last updates", |m| {
            is_update_of(m, "kv://silence")
        })
        .await;
        ids.push(id.expect("an event id"));
    }
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "no update twice");
    assert!(
        ids.len() >= acknowledged,
        "{} updates for {acknowledged} writes",
        ids.len()
    );
    let silence = received
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .expect("updates");
    eprintln!("longest silence: {silence:?} ({} updates)", received.len());
    assert!(
        silence < Duration::from_secs(3),
        "the client heard nothing for {silence:?}"
    );
}

/// A Redis that is slow, not lost, ends no stream: three stalls of 1 s (SIGSTOP, as a long fork
/// or a paused VM) half a second apart, while a client writes every 100 ms and another follows the
/// updates on a GET stream. The stream never ends, and every write's update arrives on it.
#[tokio::test]
async fn a_redis_stall_of_1s_ends_no_stream() {
    let topology = cluster(2).await;
    let follower = legacy_client(&topology.replicas[1].mcp_url()).await;
    subscribe(&follower, "kv://stall").await;
    let mut stream = follower.open_get(None).await.expect("GET");
    assert_eq!(stream.status, 200);
    let writer = legacy_client(&topology.replicas[0].mcp_url()).await;
    let writes = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        for n in 0..40 {
            every.tick().await;
            call_ok(
                &writer,
                "kv_set",
                json!({"key": "stall", "value": n.to_string()}),
            )
            .await;
        }
    });
    let stalls = async {
        let redis = topology.redis.as_ref().expect("redis");
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            redis.freeze();
            tokio::time::sleep(Duration::from_secs(1)).await;
            redis.thaw();
        }
    };
    // Follow the stream through the stalls: it must never end.
    let mut ids = HashSet::new();
    let follow = async {
        loop {
            match stream.next_message(WAIT).await {
                Ok(Some(event)) => {
                    if event
                        .message
                        .as_ref()
                        .is_some_and(|m| is_update_of(m, "kv://stall"))
                    {
                        ids.insert(event.id.expect("an event id"));
                    }
                }
                Ok(None) => panic!("a stall of 1 s ended the stream ({} updates in)", ids.len()),
                Err(()) => panic!("no event for {WAIT:?} ({} updates in)", ids.len()),
            }
        }
    };
    tokio::select! {
        () = stalls => {}
        () = follow => unreachable!(),
    }
    writes.await.expect("every write acknowledged");
    while ids.len() < 40 {
        match stream.next_message(WAIT).await {
            Ok(Some(event)) => {
                if event
                    .message
                    .as_ref()
                    .is_some_and(|m| is_update_of(m, "kv://stall"))
                {
                    ids.insert(event.id.expect("an event id"));
                }
            }
            Ok(None) => panic!(
                "the stream ended after the stalls ({} updates in)",
                ids.len()
            ),
            Err(()) => panic!("{} updates of 40", ids.len()),
        }
    }
}

/// Redis frozen (SIGSTOP) for 5 s while a client writes every 50 ms and another follows the
/// updates on a GET stream: no request waits much beyond the command timeout (clear errors, no
/// hang), and afterwards the follower, reconnecting with `Last-Event-ID` as SDK clients do, has one
/// update per acknowledged write, none twice.
#[tokio::test]
async fn a_frozen_redis_bounds_every_request_and_loses_nothing() {
    const TIMEOUT_MS: u64 = 500;
    let topology = start(cluster_options(2).env("SHOAL_REDIS_TIMEOUT_MS", TIMEOUT_MS)).await;
    let url = topology.mcp_url();
    let follower = legacy_client(&url).await;
    subscribe(&follower, "kv://frozen").await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let reader = {
        let (follower, seen, stop) = (follower.fork(), seen.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last: Option<String> = None;
            while !stop.is_cancelled() {
                let Ok(mut stream) = follower.open_get(last.as_deref()).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                if stream.status != 200 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                loop {
                    let event = tokio::select! {
                        () = stop.cancelled() => return,
                        event = stream.next_event() => event,
                    };
                    let Some(event) = event else { break };
                    if let (Some(id), Some(message)) = (&event.id, &event.message)
                        && is_update_of(message, "kv://frozen")
                    {
                        seen.lock().expect("seen").push(id.clone());
                    }
                    if event.id.is_some() {
                        last = event.id;
                    }
                }
            }
        })
    };
    let writer = legacy_client(&url).await;
    let started = tokio::time::Instant::now();
    let (mut acknowledged, mut attempted, mut slowest) = (0usize, 0usize, Duration::ZERO);
    let mut frozen = false;
    let mut thawed = false;
    while started.elapsed() < Duration::from_secs(9) {
        if !frozen && started.elapsed() >= Duration::from_secs(1) {
            topology.redis.as_ref().expect("redis").freeze();
            frozen = true;
        }
        if frozen && !thawed && started.elapsed() >= Duration::from_secs(6) {
            topology.redis.as_ref().expect("redis").thaw();
            thawed = true;
        }
        let sent = tokio::time::Instant::now();
        attempted += 1;
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            writer.request(
                "tools/call",
                json!({"name": "kv_set", "arguments": {"key": "frozen", "value": attempted.to_string()}}),
            ),
        )
        .await
        .expect("no request hangs");
        slowest = slowest.max(sent.elapsed());
        if let Ok(exchange) = answer
            && exchange.status == 200
            && exchange
                .result()
                .is_ok_and(|result| result.get("isError") != Some(&json!(true)))
        {
            acknowledged += 1;
        }
        tokio::time::sleep_until(sent + Duration::from_millis(50)).await;
    }
    // Every Redis command is bounded by the timeout, and the first that fails ends the request.
    assert!(
        slowest <= Duration::from_millis(2 * TIMEOUT_MS),
        "the slowest request took {slowest:?}"
    );
    assert!(
        acknowledged > 0 && acknowledged < attempted,
        "{acknowledged} of {attempted} writes acknowledged: some before and after the freeze, not during"
    );
    eventually("an update for every acknowledged write", WAIT, async || {
        (seen.lock().expect("seen").len() >= acknowledged).then_some(())
    })
    .await;
    stop.cancel();
    let _ = reader.await;
    let seen = seen.lock().expect("seen").clone();
    let distinct: std::collections::HashSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "no update twice");
    assert!(seen.len() <= attempted, "no update that no write raised");
    eprintln!(
        "frozen Redis: {acknowledged} of {attempted} writes acknowledged, slowest request {slowest:?}, {} updates delivered",
        seen.len()
    );
}

/// The upstream addresses nginx's passive health checks have ejected so far ("upstream server
/// temporarily disabled" in its error log).
fn ejected_upstreams(topology: &Topology) -> HashSet<String> {
    let log = topology
        .balancer
        .as_ref()
        .expect("balancer")
        .dir()
        .join("error.log");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("upstream server temporarily disabled"))
        .filter_map(|line| line.split("upstream: \"").nth(1)?.split('"').next())
        .map(str::to_owned)
        .collect()
}

/// Redis frozen for every replica: each answers 503, so nginx's passive health checks eject all of
/// them (on the GET streams clients reopen). The balancer then still routes to the replicas (as backups that are never ejected):
/// clients get the replicas' 503 with Retry-After rather than nginx's bare 502, and calls succeed
/// as soon as the replicas are ready again, not whenever nginx next lets a request probe each one
/// (a probe that is a long-lived stream keeps a replica ejected for as long as it lasts).
#[tokio::test]
async fn a_balancer_that_ejected_every_replica_still_reaches_them() {
    let topology = start(cluster_options(3).env("SHOAL_REDIS_TIMEOUT_MS", 500)).await;
    let url = topology.mcp_url();
    let client = legacy_client(&url).await;
    let set =
        |value: &str| json!({"name": "kv_set", "arguments": {"key": "panic", "value": value}});
    topology.redis.as_ref().expect("redis").freeze();
    // nginx counts a 503 against a replica only when it may try another one: a GET (a POST that
    // reached a replica is never replayed). Reconnecting GET streams are what eject replicas.
    eventually("nginx to eject every replica", WAIT, async || {
        let stream = client.open_get(None).await.expect("an answer");
        assert_ne!(stream.status, 200, "no stream while Redis is frozen");
        (ejected_upstreams(&topology).len() == 3).then_some(())
    })
    .await;
    for _ in 0..3 {
        let exchange = client
            .request("tools/call", set("frozen"))
            .await
            .expect("an answer");
        assert_eq!(
            exchange.status, 503,
            "the replica's answer, not the balancer's: {:?}",
            exchange.headers
        );
        assert!(exchange.headers.get("retry-after").is_some());
        assert_ne!(replica_of(&exchange.headers), "?", "answered by a replica");
    }
    topology.redis.as_ref().expect("redis").thaw();
    for replica in &topology.replicas {
        let base = replica.base_url();
        eventually("the replica to be ready again", WAIT, async || {
            (ready(&base).await == 200).then_some(())
        })
        .await;
    }
    for value in ["1", "2", "3"] {
        let exchange = client
            .request("tools/call", set(value))
            .await
            .expect("an answer");
        assert_eq!(exchange.status, 200, "{:?}", exchange.headers);
        let result = exchange.result().expect("a result");
        assert_ne!(result.get("isError"), Some(&json!(true)), "{result}");
    }
}

/// A rolling restart of every replica (SIGTERM, one at a time, the next once the restarted one is
/// ready, as compose or Kubernetes do it) under looping clients of both eras: with the retry an SDK
/// client does (a refused connection, 502 or 503: try again shortly), no call fails and no legacy
/// session is lost.
#[tokio::test]
async fn a_rolling_restart_under_load_fails_no_call() {
    let mut topology = cluster(3).await;
    let url = topology.mcp_url();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = tokio::task::JoinSet::new();
    for n in 0..8 {
        let (url, stop) = (url.clone(), stop.clone());
        clients.spawn(async move {
            let client = if n % 2 == 0 {
                legacy_client(&url).await
            } else {
                McpClient::modern(&url)
            };
            let (mut done, mut retries, mut failures) = (0u32, 0u32, Vec::new());
            while !stop.is_cancelled() {
                let arguments = json!({"key": format!("roll-{n}"), "value": done.to_string()});
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let answer = client
                        .request(
                            "tools/call",
                            json!({"name": "kv_set", "arguments": arguments}),
                        )
                        .await;
                    let retry = match &answer {
                        Err(_) => true,
                        Ok(exchange) => matches!(exchange.status.as_u16(), 502 | 503),
                    };
                    if retry && attempt < 100 {
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    match answer {
                        Ok(exchange)
                            if exchange.status == 200
                                && exchange.result().is_ok_and(|r| {
                                    r.get("isError").is_none() || r["isError"] == json!(false)
                                }) =>
                        {
                            done += 1;
                        }
                        Ok(exchange) => {
                            failures.push(format!("{}: {:?}", exchange.status, exchange.response()))
                        }
                        Err(error) => failures.push(error.to_string()),
                    }
                    break;
                }
            }
            (done, retries, failures)
        });
    }
    // Let every client get going, then restart the replicas one by one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..topology.replicas.len() {
        let replica = &mut topology.replicas[i];
        replica.send_sigterm();
        let status = replica
            .wait(Duration::from_secs(20))
            .await
            .expect("the replica exited");
        assert!(status.success(), "clean exit: {status:?}");
        replica.restart().await.expect("the replica restarts");
        let base = replica.base_url();
        eventually("the restarted replica is ready", WAIT, async || {
            (ready(&base).await == 200).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    let (mut done, mut retries, mut failures) = (0, 0, Vec::new());
    while let Some(outcome) = clients.join_next().await {
        let (d, r, f) = outcome.expect("client task");
        done += d;
        retries += r;
        failures.extend(f);
    }
    eprintln!(
        "rolling restart: {done} calls done, {retries} retries, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} calls failed: {failures:?}",
        failures.len()
    );
    assert!(done > 100, "the clients kept calling: {done}");
}

/// A replica killed (SIGKILL) while it waits for a client's sampling answer and holds a GET
/// stream: the client's pending call ends at once (its response stream closes; no wait for a
/// timeout), its answer to the dead replica's request is refused with 410 (reported, not silently
/// dropped, and counted), a cancellation of the dead call is accepted, and the GET stream resumes
/// on another replica with nothing lost.
#[tokio::test]
async fn a_replica_killed_while_it_waits_for_a_sampling_answer_fails_cleanly() {
    let mut topology = cluster(3).await;
    let url = topology.mcp_url();
    let client = legacy_client(&url).await;
    subscribe(&client, "kv://killed").await;
    // The call that asks the client for sampling and the session's GET stream, both on r2 (the
    // session works on any replica; these requests go to r2 directly).
    let runner = topology.replicas[1].id.clone();
    let at_runner = client.fork_at(&topology.replicas[1].mcp_url());
    let (call_id, mut call) = at_runner
        .open_request(
            "tools/call",
            json!({"name": "test_sampling", "arguments": {"prompt": "say hi"}}),
        )
        .await
        .expect("tools/call");
    assert_eq!(replica_of(&call.headers), runner);
    let (_, request) = next_matching(&mut call, "sampling/createMessage", |m| {
        m.get("method") == Some(&json!("sampling/createMessage"))
    })
    .await;
    let mut stream = at_runner.open_get(None).await.expect("GET");
    assert_eq!(replica_of(&stream.headers), runner);
    let writer = legacy_client(&url).await;
    call_ok(
        &writer,
        "kv_set",
        json!({"key": "killed", "value": "before"}),
    )
    .await;
    let (before_id, _) = next_matching(&mut stream, "the update before the kill", |m| {
        is_update_of(m, "kv://killed")
    })
    .await;

    let killed_at = std::time::Instant::now();
    topology.replica(&runner).expect("the runner").kill9().await;

    // The pending call ends now, without its response: the client knows to give up or retry.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = call.next_event().await {
            assert!(
                event.message.as_ref().and_then(|m| m.get("id")) != Some(&json!(call_id)),
                "no response can come from a dead replica: {event:?}"
            );
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the call's stream stayed open after the kill"
    );
    assert!(killed_at.elapsed() < Duration::from_secs(5));

    // The answer to the dead replica's request: refused and reported, on whichever replica.
    let answer = json!({
        "jsonrpc": "2.0",
        "id": request["id"],
        "result": {
            "role": "assistant",
            "content": {"type": "text", "text": "too late"},
            "model": "test-model",
            "stopReason": "endTurn"
        }
    });
    let refused = client
        .post_message(&answer)
        .send()
        .await
        .expect("the answer is posted");
    let receiver = replica_of(refused.headers());
    assert_ne!(receiver, runner);
    assert_eq!(refused.status(), 410, "reported, not dropped");
    let body = refused.text().await.expect("body");
    assert!(body.contains("the request was abandoned"), "{body}");
    let receiver_url = topology
        .replica(&receiver)
        .expect("the receiving replica")
        .base_url();
    assert_eq!(
        metric(&receiver_url, "shoal_forwards_total{kind=\"undelivered\"}").await,
        1.0
    );
    // Cancelling the dead call is accepted (there is nothing left to cancel).
    let status = client
        .notify(
            "notifications/cancelled",
            json!({"requestId": call_id, "reason": "gave up"}),
        )
        .await
        .expect("cancel");
    assert_eq!(status, 202);

    // The GET stream ended with its replica; resumed elsewhere, it misses nothing.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while stream.next_event().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "the GET stream ended with its replica");
    call_ok(
        &writer,
        "kv_set",
        json!({"key": "killed", "value": "after"}),
    )
    .await;
    let mut resumed = client.open_get(before_id.as_deref()).await.expect("resume");
    assert_eq!(resumed.status, 200);
    assert_ne!(replica_of(&resumed.headers), runner);
    next_matching(&mut resumed, "the update written after the kill", |m| {
        is_update_of(m, "kv://killed")
    })
    .await;
    // And the session goes on, on the live replicas.
    let exchange = call_ok(&writer, "kv_get", json!({"key": "killed"})).await;
    assert!(text_of(&exchange.result().expect("result").clone()).contains("after"));
}
