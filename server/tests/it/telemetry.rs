//! Traces and metrics: real replicas export over OTLP (gRPC and HTTP/protobuf) to the test kit's
//! in-memory receiver; traces cross the nginx balancer and the replicas; `/metrics` moves.

use serde_json::{Value, json};
use shoal_testkit::{
    client::McpClient,
    otlp::{OtlpReceiver, ReceivedSpan},
    topology::{Topology, TopologyOptions},
    upstream::{Behavior, FakeUpstream},
};

use crate::helpers::*;

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const STATUS_ERROR: i32 = 2;

/// A fresh W3C trace context: `(traceparent, trace id, parent span id)`.
fn new_trace() -> (String, String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    (format!("00-{trace_id}-{span_id}-01"), trace_id, span_id)
}

fn with_otlp(options: TopologyOptions, receiver: &OtlpReceiver, grpc: bool) -> TopologyOptions {
    let (endpoint, protocol) = if grpc {
        (receiver.grpc_endpoint(), "grpc")
    } else {
        (receiver.http_endpoint(), "http/protobuf")
    };
    options
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("OTEL_SERVICE_NAME", "shoal-test")
        .env("OTEL_BSP_SCHEDULE_DELAY", 100)
        .env("OTEL_METRIC_EXPORT_INTERVAL", 500)
}

async fn traced_topology(receiver: &OtlpReceiver, upstream: &FakeUpstream) -> Topology {
    let mut options = with_otlp(cluster_options(3), receiver, true)
        .env("SHOAL_TOOLSETS", "kv,postgres,rpc,conformance")
        .env("SHOAL_RPC_ENDPOINTS", upstream.url());
    options.postgres = true;
    let topology = start(options).await;
    let db = topology.postgres_client().await.expect("connect");
    db.batch_execute(
        "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);
         INSERT INTO items (name) SELECT 'secret-' || n FROM generate_series(1, 5) AS n;",
    )
    .await
    .expect("schema");
    topology
}

fn in_trace<'a>(spans: &'a [ReceivedSpan], trace_id: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.trace_id == trace_id).collect()
}

fn named<'a>(spans: &[&'a ReceivedSpan], name: &str) -> Option<&'a ReceivedSpan> {
    spans.iter().copied().find(|s| s.name == name)
}

fn child_of<'a>(
    spans: &[&'a ReceivedSpan],
    parent: &ReceivedSpan,
    pick: impl Fn(&ReceivedSpan) -> bool,
) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .copied()
        .find(|s| s.parent_span_id == parent.span_id && pick(s))
}

/// Whether `ancestor` is on the parent chain of `span`.
fn descends_from(spans: &[&ReceivedSpan], span: &ReceivedSpan, ancestor: &ReceivedSpan) -> bool {
    let mut current = span.parent_span_id.clone();
    for _ in 0..32 {
        if current == ancestor.span_id {
            return true;
        }
        match spans.iter().find(|s| s.span_id == current) {
            Some(parent) => current = parent.parent_span_id.clone(),
            None => return false,
        }
    }
    false
}

fn dump(spans: &[&ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {} parent={} kind={} on={:?} {:?}",
                s.span_id,
                s.name,
                s.parent_span_id,
                s.kind,
                s.instance(),
                s.attributes
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Calls `tool` on a legacy client with a `traceparent` header; returns the trace id and the
/// result.
async fn traced_call(client: &mut McpClient, tool: &str, arguments: Value) -> (String, Value) {
    let (traceparent, trace_id, _) = new_trace();
    client
        .extra_headers
        .insert("traceparent", traceparent.parse().expect("header"));
    let result = client.call_tool(tool, arguments).await.expect("tools/call");
    client.extra_headers.remove("traceparent");
    (trace_id, result)
}

/// Acceptance 1 of the observability issue: requests with a `traceparent` through the balancer to
/// three replicas, and the spans the receiver collected: one trace id per request end to end, the
/// HTTP → MCP → cache → Redis / PostgreSQL / RPC chain with the semantic-convention attributes,
/// `isError` as an error status, a restore replay inside the request's trace, and cross-replica
/// notification and forwarded-response spans in the originating traces.
#[tokio::test]
async fn traces_follow_requests_through_the_balancer_and_across_replicas() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let upstream = FakeUpstream::start(Behavior::Healthy)
        .await
        .expect("upstream");
    let topology = traced_topology(&receiver, &upstream).await;
    let mut client = legacy_client(&topology.mcp_url()).await;
    let session = client.session_id().expect("session").to_owned();

    // A cached PostgreSQL read, with the parent in the `traceparent` header.
    let (traceparent, pg_trace, client_span) = new_trace();
    client
        .extra_headers
        .insert("traceparent", traceparent.parse().expect("header"));
    let sql = "SELECT id, name FROM items ORDER BY id";
    let result = client
        .call_tool("pg_query", json!({"sql": sql}))
        .await
        .expect("pg_query");
    client.extra_headers.remove("traceparent");
    assert_ne!(result["isError"], json!(true), "{result}");

    let (spans, complete) = receiver
        .wait_for_spans(WAIT, |spans| {
            let trace = in_trace(spans, &pg_trace);
            trace.iter().any(|s| s.name.starts_with("SELECT"))
                && trace.iter().any(|s| s.name == "POST /mcp")
                && trace.iter().any(|s| s.name == "tools/call pg_query")
        })
        .await;
    let trace = in_trace(&spans, &pg_trace);
    assert!(complete, "spans of the pg_query trace:\n{}", dump(&trace));
    let http = trace
        .iter()
        .copied()
        .find(|s| s.name == "POST /mcp" && s.parent_span_id == client_span)
        .unwrap_or_else(|| panic!("HTTP span under the client's span:\n{}", dump(&trace)));
    assert_eq!(http.kind, SERVER);
    assert_eq!(http.attr("http.request.method"), Some("POST"));
    assert_eq!(http.attr("http.route"), Some("/mcp"));
    assert_eq!(
        http.attributes.get("http.response.status_code"),
        Some(&json!(200))
    );
    assert_eq!(
        http.resource.get("service.name"),
        Some(&json!("shoal-test"))
    );
    assert!(http.resource.contains_key("service.version"));
    let mcp = child_of(&trace, http, |s| s.name == "tools/call pg_query")
        .unwrap_or_else(|| panic!("MCP span under the HTTP span:\n{}", dump(&trace)));
    for (key, value) in [
        ("mcp.method.name", "tools/call"),
        ("gen_ai.tool.name", "pg_query"),
        ("gen_ai.operation.name", "execute_tool"),
        ("mcp.protocol.version", "2025-11-25"),
    ] {
        assert_eq!(mcp.attr(key), Some(value), "{key} of {:?}", mcp.attributes);
    }
    // The session appears as its keyed tag, never as its id (a bearer credential); the same tag on
    // the HTTP and MCP spans.
    let tag = mcp
        .attr("mcp.session.id")
        .expect("a session tag")
        .to_owned();
    assert!(
        tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()),
        "{tag}"
    );
    assert_eq!(http.attr("mcp.session.id"), Some(tag.as_str()));
    // The convention's attribute carries the tag, not the id.
    assert_ne!(Some(tag.as_str()), client.session_id(), "the id itself");
    assert!(mcp.attributes.contains_key("jsonrpc.request.id"));
    assert_eq!(mcp.instance(), http.instance(), "same replica");
    let cache = child_of(&trace, mcp, |s| s.name == "cache lookup")
        .unwrap_or_else(|| panic!("cache span under the MCP span:\n{}", dump(&trace)));
    assert_eq!(cache.attr("shoal.cache.outcome"), Some("miss"));
    let redis = child_of(&trace, cache, |s| s.name == "redis cache_get")
        .unwrap_or_else(|| panic!("Redis span under the cache span:\n{}", dump(&trace)));
    assert_eq!(redis.kind, CLIENT);
    assert_eq!(redis.attr("db.system.name"), Some("redis"));
    let pg = trace
        .iter()
        .copied()
        .find(|s| s.attr("db.system.name") == Some("postgresql"))
        .unwrap_or_else(|| panic!("PostgreSQL span:\n{}", dump(&trace)));
    assert!(descends_from(&trace, pg, cache), "{}", dump(&trace));
    assert_eq!(pg.name, "SELECT items");
    assert_eq!(pg.attr("db.operation.name"), Some("SELECT"));
    assert_eq!(pg.attr("db.collection.name"), Some("items"));
    assert_eq!(
        pg.attributes.get("db.response.returned_rows"),
        Some(&json!(5))
    );
    // No statement text, parameters or row values in any span.
    for span in &trace {
        let text = serde_json::to_string(&span.attributes).expect("json");
        assert!(
            !text.contains("ORDER BY") && !text.contains("secret-"),
            "raw values in {}: {text}",
            span.name
        );
    }

    // An upstream JSON-RPC call, cached: MCP → cache → jsonrpc client span.
    let (rpc_trace, result) = traced_call(
        &mut client,
        "get_balance",
        json!({"address": "So11111111111111111111111111111111111111112"}),
    )
    .await;
    assert_ne!(result["isError"], json!(true), "{result}");
    let (spans, complete) = receiver
        .wait_for_spans(WAIT, |spans| {
            // Each span is exported when it ends, the client span first and the MCP span last,
            // possibly in different batches: wait for every span the checks below read.
            let trace = in_trace(spans, &rpc_trace);
            trace
                .iter()
                .any(|s| s.attr("rpc.system.name") == Some("jsonrpc"))
                && trace.iter().any(|s| s.name == "cache lookup")
                && trace.iter().any(|s| s.name == "tools/call get_balance")
        })
        .await;
    let trace = in_trace(&spans, &rpc_trace);
    assert!(
        complete,
        "spans of the get_balance trace:\n{}",
        dump(&trace)
    );
    let mcp = named(&trace, "tools/call get_balance").expect("MCP span");
    let cache = child_of(&trace, mcp, |s| s.name == "cache lookup").expect("cache span");
    let rpc = trace
        .iter()
        .copied()
        .find(|s| s.attr("rpc.system.name") == Some("jsonrpc"))
        .expect("rpc span");
    assert_eq!(rpc.kind, CLIENT);
    assert_eq!(rpc.attr("rpc.method"), Some("getBalance"));
    assert_eq!(rpc.attr("shoal.rpc.outcome"), Some("ok"));
    assert!(descends_from(&trace, rpc, cache), "{}", dump(&trace));

    // A tool error (`isError`) marks the MCP span as an error.
    let (error_trace, result) = traced_call(
        &mut client,
        "pg_query",
        json!({"sql": "SELECT * FROM nope"}),
    )
    .await;
    assert_eq!(result["isError"], json!(true), "{result}");
    let (spans, complete) = receiver
        .wait_for_spans(WAIT, |spans| {
            in_trace(spans, &error_trace)
                .iter()
                .any(|s| s.name == "tools/call pg_query")
        })
        .await;
    let trace = in_trace(&spans, &error_trace);
    assert!(complete, "{}", dump(&trace));
    let mcp = named(&trace, "tools/call pg_query").expect("MCP span");
    assert_eq!(mcp.status_code, STATUS_ERROR, "{:?}", mcp.attributes);
    assert_eq!(mcp.attr("error.type"), Some("tool_error"));

    // A replica that had not seen the session yet restored it inside one of these traces (three
    // replicas, and the handshake reached at most two of them).
    let mut traced = vec![pg_trace.clone(), rpc_trace.clone(), error_trace.clone()];
    for _ in 0..3 {
        traced.push(
            traced_call(&mut client, "kv_get", json!({"key": "none"}))
                .await
                .0,
        );
    }
    let (spans, restored) = receiver
        .wait_for_spans(WAIT, |spans| {
            // The replay and the HTTP span it sits under (exported when the request ends).
            spans.iter().any(|s| {
                s.name == "initialize"
                    && s.attributes.get("shoal.session.restored") == Some(&json!(true))
                    && traced.contains(&s.trace_id)
                    && in_trace(spans, &s.trace_id)
                        .iter()
                        .any(|h| h.name == "POST /mcp")
            })
        })
        .await;
    assert!(restored, "a restore replay appeared in a request's trace");
    let replay = spans
        .iter()
        .find(|s| {
            s.name == "initialize"
                && s.attributes.get("shoal.session.restored") == Some(&json!(true))
                && traced.contains(&s.trace_id)
        })
        .expect("replay");
    let trace = in_trace(&spans, &replay.trace_id);
    let http = named(&trace, "POST /mcp").expect("HTTP span");
    assert_eq!(replay.parent_span_id, http.span_id, "{}", dump(&trace));
    // Restored on another replica: the same tag (one key for the cluster).
    assert_eq!(replay.attr("mcp.session.id"), Some(tag.as_str()));

    // A write on one replica (a 2026-07-28 request, parent in `_meta.traceparent`) reaches a GET
    // stream and a `subscriptions/listen` stream held by others: the deliveries there are spans of
    // the write's trace.
    let subscriber = legacy_client(&topology.mcp_url()).await;
    subscribe(&subscriber, "kv://traced").await;
    let mut stream = subscriber.open_get(None).await.expect("GET");
    let holder = replica_of(&stream.headers);
    let listener = McpClient::modern(topology.mcp_url());
    let (_, mut listen) = listener
        .open_request("subscriptions/listen", listen_params("kv://traced"))
        .await
        .expect("listen");
    let listen_holder = replica_of(&listen.headers);
    acknowledged(&mut listen).await;
    let writer = McpClient::modern(topology.mcp_url());
    let mut write = None;
    for _ in 0..9 {
        let (traceparent, trace_id, parent) = new_trace();
        let exchange = writer
            .request(
                "tools/call",
                json!({
                    "name": "kv_set",
                    "arguments": {"key": "traced", "value": "x"},
                    "_meta": {"traceparent": traceparent},
                }),
            )
            .await
            .expect("kv_set");
        exchange.result().expect("result");
        let written_on = replica_of(&exchange.headers);
        next_matching(&mut stream, "the update notification", |m| {
            is_update_of(m, "kv://traced")
        })
        .await;
        next_matching(&mut listen, "the listen update", |m| {
            is_update_of(m, "kv://traced")
        })
        .await;
        if written_on != holder && written_on != listen_holder {
            write = Some((trace_id, parent, written_on));
            break;
        }
    }
    let (write_trace, write_parent, written_on) =
        write.expect("a write landed on another replica than both streams");
    let (spans, complete) = receiver
        .wait_for_spans(WAIT, |spans| {
            let trace = in_trace(spans, &write_trace);
            [
                "notifications/resources/updated deliver",
                "notifications/resources/updated",
                // One script writes and tells the subscribers: its span is the publish.
                "redis kv_set",
                "tools/call kv_set",
                "POST /mcp",
            ]
            .iter()
            .all(|name| trace.iter().any(|s| s.name == *name))
        })
        .await;
    let trace = in_trace(&spans, &write_trace);
    assert!(complete, "spans of the kv_set trace:\n{}", dump(&trace));
    let http = trace
        .iter()
        .copied()
        .find(|s| s.name == "POST /mcp" && s.parent_span_id == write_parent)
        .unwrap_or_else(|| panic!("HTTP span under `_meta.traceparent`:\n{}", dump(&trace)));
    assert_eq!(http.instance(), Some(written_on.as_str()));
    let mcp = child_of(&trace, http, |s| s.name == "tools/call kv_set").expect("MCP span");
    assert_eq!(mcp.attr("mcp.protocol.version"), Some("2026-07-28"));
    let publish = named(&trace, "redis kv_set").expect("write and publish span");
    assert!(descends_from(&trace, publish, mcp), "{}", dump(&trace));
    let delivery = named(&trace, "notifications/resources/updated deliver").expect("delivery");
    assert_eq!(
        delivery.instance(),
        Some(holder.as_str()),
        "{}",
        dump(&trace)
    );
    assert_eq!(delivery.kind, PRODUCER);
    assert_eq!(delivery.attr("mcp.resource.uri"), Some("kv://traced"));
    let subscriber_tag = delivery
        .attr("mcp.session.id")
        .expect("the subscriber's tag");
    assert_ne!(subscriber_tag, tag, "sessions have different tags");
    assert!(
        descends_from(&trace, delivery, mcp),
        "the delivery on {holder} descends from the write on {written_on}:\n{}",
        dump(&trace)
    );
    assert!(
        delivery.links.iter().any(|(t, _)| *t == write_trace),
        "linked to the originating trace"
    );
    let listen_delivery =
        named(&trace, "notifications/resources/updated").expect("listen delivery");
    assert_eq!(listen_delivery.instance(), Some(listen_holder.as_str()));
    assert_eq!(listen_delivery.kind, PRODUCER);
    assert_eq!(
        listen_delivery.attr("mcp.resource.uri"),
        Some("kv://traced")
    );
    assert!(
        descends_from(&trace, listen_delivery, mcp),
        "{}",
        dump(&trace)
    );

    // A response to a request the client never got (its id names a replica that does not exist)
    // is refused with 410, and the replica logs it: by the session's tag, not its id.
    let stray = json!({"jsonrpc": "2.0", "id": "0123456789ab-7", "result": {}});
    let refused = subscriber
        .post_message(&stray)
        .send()
        .await
        .expect("respond");
    assert_eq!(refused.status(), 410);

    // Security review, finding 10: no live session id in any exported span or any replica's log.
    let spans = receiver.spans();
    for live in [session.as_str(), subscriber.session_id().expect("session")] {
        for span in &spans {
            for (key, value) in &span.attributes {
                assert!(
                    !value.to_string().contains(live),
                    "{key} of span {} carries a session id",
                    span.name
                );
            }
        }
        for replica in &topology.replicas {
            let log = std::fs::read_to_string(replica.log()).expect("log");
            assert!(
                !log.contains(live),
                "the log of {} carries a session id",
                replica.name
            );
        }
    }
}

/// A sampling response posted to another replica is forwarded over the bus; its delivery on the
/// waiting replica joins the trace of the POST that carried it.
#[tokio::test]
async fn forwarded_responses_carry_their_trace_across_replicas() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    // HTTP/protobuf this time.
    let topology = start(with_otlp(cluster_options(3), &receiver, false)).await;
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
    let (traceparent, trace_id, _) = new_trace();
    let body = json!({"jsonrpc": "2.0", "id": request["id"], "result": {
        "role": "assistant",
        "content": {"type": "text", "text": "hi"},
        "model": "test-model",
        "stopReason": "endTurn"
    }});
    let response = client
        .post_message(&body)
        .header("traceparent", traceparent)
        .send()
        .await
        .expect("respond");
    assert_eq!(response.status(), 202);
    let receiver_replica = replica_of(response.headers());
    assert_ne!(receiver_replica, runner, "the response landed elsewhere");
    next_matching(&mut stream, "the tool result", |m| {
        m.get("id") == Some(&json!(id))
    })
    .await;
    let (spans, complete) = receiver
        .wait_for_spans(WAIT, |spans| {
            let trace = in_trace(spans, &trace_id);
            ["response deliver", "POST /mcp", "redis publish_forward"]
                .iter()
                .all(|name| trace.iter().any(|s| s.name == *name))
        })
        .await;
    let trace = in_trace(&spans, &trace_id);
    assert!(complete, "{}", dump(&trace));
    let http = named(&trace, "POST /mcp").expect("HTTP span");
    assert_eq!(http.instance(), Some(receiver_replica.as_str()));
    let forward = named(&trace, "redis publish_forward").expect("publish span");
    assert!(descends_from(&trace, forward, http), "{}", dump(&trace));
    let delivery = named(&trace, "response deliver").expect("delivery span");
    assert_eq!(delivery.instance(), Some(runner.as_str()));
    assert!(descends_from(&trace, delivery, http), "{}", dump(&trace));
}

/// Acceptance 2: the protocol, dependency and system families exist on `/metrics` and move, and
/// the same measurements arrive over OTLP under their semantic-convention names.
#[tokio::test]
async fn metric_families_exist_and_move() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let upstream = FakeUpstream::start(Behavior::Healthy)
        .await
        .expect("upstream");
    let mut options = with_otlp(cluster_options(1), &receiver, false)
        .env("SHOAL_TOOLSETS", "kv,postgres,rpc")
        .env("SHOAL_RPC_ENDPOINTS", upstream.url())
        // Metrics only: traces off keeps this test about metrics.
        .env("OTEL_TRACES_EXPORTER", "none");
    options.postgres = true;
    options.balancer = false;
    let topology = start(options).await;
    let base = topology.replicas[0].base_url();
    let before = scrape(&base).await;
    for family in [
        // protocol
        "shoal_sessions_active",
        "shoal_streams_active",
        "shoal_session_creates_total",
        "shoal_session_restores_total",
        // dependency
        "shoal_db_pool_connections_max",
        "shoal_db_pool_connections_in_use",
        "shoal_db_pool_waiting",
        "shoal_cache_invalidations_total",
        // system
        "shoal_process_resident_memory_bytes",
        "shoal_process_cpu_seconds_total",
        "shoal_runtime_busy_ratio",
        "shoal_runtime_workers",
        "shoal_runtime_alive_tasks",
        "shoal_runtime_scheduling_delay_seconds_count",
        "shoal_bus_roundtrip_seconds_count",
    ] {
        assert!(
            before
                .keys()
                .any(|series| series.split('{').next() == Some(family)),
            "{family} missing from /metrics"
        );
    }

    let client = legacy_client(&topology.mcp_url()).await;
    for n in 0..5 {
        call_ok(
            &client,
            "kv_set",
            json!({"key": format!("m{n}"), "value": "v"}),
        )
        .await;
    }
    call_ok(&client, "pg_query", json!({"sql": "SELECT 1 AS one"})).await;
    call_ok(&client, "pg_query", json!({"sql": "SELECT 1 AS one"})).await;
    call_ok(
        &client,
        "get_balance",
        json!({"address": "So11111111111111111111111111111111111111112"}),
    )
    .await;

    // The probes run every second (the bus probe every five): wait for them to move too.
    let after = eventually("the system probes to move", WAIT, async || {
        let after = scrape(&base).await;
        let moved = |series: &str| after.get(series) > before.get(series);
        (moved("shoal_runtime_scheduling_delay_seconds_count")
            && moved("shoal_bus_roundtrip_seconds_count")
            && moved("shoal_process_cpu_seconds_total"))
        .then_some(after)
    })
    .await;
    let grew = |series: &str| {
        let (b, a) = (
            before.get(series).copied().unwrap_or(0.0),
            after.get(series).copied().unwrap_or(0.0),
        );
        assert!(a > b, "{series} did not move: {b} -> {a}");
    };
    // protocol
    grew("shoal_mcp_requests_total{method=\"tools/call\",outcome=\"ok\"}");
    grew("shoal_mcp_request_duration_seconds_count{method=\"initialize\"}");
    grew("shoal_tool_duration_seconds_count{tool=\"kv_set\",outcome=\"ok\"}");
    grew("shoal_session_creates_total");
    grew(
        "shoal_http_request_duration_seconds_count{method=\"POST\",route=\"/mcp\",status=\"200\"}",
    );
    // dependency
    grew("shoal_redis_operation_duration_seconds_count{operation=\"kv_set\"}");
    grew("shoal_db_operation_duration_seconds_count{operation=\"SELECT\",outcome=\"ok\"}");
    let rpc_calls = |metrics: &std::collections::HashMap<String, f64>| -> f64 {
        metrics
            .iter()
            .filter(|(series, _)| series.starts_with("shoal_rpc_request_duration_seconds_count"))
            .map(|(_, value)| value)
            .sum()
    };
    assert!(
        rpc_calls(&after) > rpc_calls(&before),
        "rpc latency did not move"
    );
    grew("shoal_cache_lookups_total{outcome=\"miss\"}");
    grew("shoal_cache_lookups_total{outcome=\"hit\"}");
    grew("shoal_db_pool_wait_seconds_count");
    // system
    grew("shoal_process_cpu_seconds_total");
    grew("shoal_runtime_scheduling_delay_seconds_count");
    grew("shoal_bus_roundtrip_seconds_count");
    assert!(after["shoal_process_resident_memory_bytes"] > 1_000_000.0);
    assert!(after["shoal_runtime_workers"] >= 1.0);
    let busy = after["shoal_runtime_busy_ratio"];
    assert!((0.0..=1.0).contains(&busy), "busy ratio {busy}");

    // The same families over OTLP (pushed every 500 ms here).
    let expected = [
        "mcp.server.operation.duration",
        "http.server.request.duration",
        "db.client.operation.duration",
        "rpc.client.call.duration",
        "shoal.cache.lookups",
        "shoal.sessions",
        "shoal.sessions.active",
        "shoal.streams.active",
        "db.client.connection.count",
        "db.client.connection.pending_requests",
        "process.cpu.time",
        "process.memory.usage",
        "shoal.runtime.busy_ratio",
        "shoal.runtime.scheduling_delay",
        "shoal.bus.roundtrip",
    ];
    let deadline = tokio::time::Instant::now() + WAIT;
    let names = loop {
        let names = receiver.metric_names();
        if expected.iter().all(|name| names.contains(*name))
            || tokio::time::Instant::now() >= deadline
        {
            break names;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    for name in expected {
        assert!(names.contains(name), "{name} not exported: {names:?}");
    }
    assert!(receiver.spans().is_empty(), "traces were off");
}

/// `/metrics` as `series → value`.
async fn scrape(base_url: &str) -> std::collections::HashMap<String, f64> {
    let text = reqwest::get(format!("{base_url}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}
