//! Bad input gets the status or JSON-RPC error the spec names, is logged once, and leaves every
//! other client unaffected.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use shoal_testkit::client::McpClient;

use crate::helpers::*;

struct Probe {
    http: reqwest::Client,
    url: String,
}

impl Probe {
    async fn post(
        &self,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, String) {
        let mut request = self.http.post(&self.url).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("send");
        let status = response.status();
        (status, response.text().await.unwrap_or_default())
    }

    async fn json_post(
        &self,
        extra: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, String) {
        let mut headers = vec![
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
        ];
        headers.extend_from_slice(extra);
        self.post(&headers, body).await
    }
}

fn error_code(body: &str) -> Option<i64> {
    serde_json::from_str::<Value>(body)
        .ok()?
        .pointer("/error/code")?
        .as_i64()
}

fn log_count(topology: &shoal_testkit::topology::Topology, needle: &str) -> usize {
    std::fs::read_to_string(topology.replicas[0].log())
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(needle))
        .count()
}

#[tokio::test]
async fn malformed_requests_get_clear_errors_and_harm_no_one() {
    let mut options = cluster_options(1)
        .env("SHOAL_MAX_BODY_BYTES", 64 * 1024)
        .env("SHOAL_KV_MAX_VALUE_BYTES", 16 * 1024);
    options.balancer = false;
    let topology = start(options).await;
    let url = topology.mcp_url();
    let base = topology.replicas[0].base_url();
    let good = legacy_client(&url).await;
    let session = good.session_id().expect("session").to_owned();
    let probe = Probe {
        http: reqwest::Client::new(),
        url: url.clone(),
    };
    let tools_list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string();
    let with_session = [
        ("mcp-session-id", session.as_str()),
        ("mcp-protocol-version", "2025-11-25"),
    ];

    // Headers.
    let (status, _) = probe
        .post(
            &[
                ("content-type", "application/json"),
                ("accept", "application/json"),
            ],
            tools_list.clone(),
        )
        .await;
    assert_eq!(status, 406, "Accept without text/event-stream");
    let (status, _) = probe
        .post(
            &[
                ("content-type", "text/plain"),
                ("accept", "application/json, text/event-stream"),
            ],
            tools_list.clone(),
        )
        .await;
    assert_eq!(status, 415, "wrong Content-Type");

    // Bodies.
    let (status, body) = probe
        .json_post(&with_session, "{\"jsonrpc\": \"2.0\", \"id\": 1, ")
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, Some(-32700)),
        "malformed JSON: {body}"
    );
    assert_eq!(log_count(&topology, "malformed JSON-RPC"), 1, "logged once");
    let (status, body) = probe
        .json_post(&with_session, format!("[{tools_list}]"))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, Some(-32600)),
        "batch: {body}"
    );
    let (status, body) = probe.json_post(&with_session, "{\"hello\": 1}").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, Some(-32600)),
        "not JSON-RPC: {body}"
    );
    let (status, body) = probe.json_post(&with_session, "\"just a string\"").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, Some(-32600)),
        "not an object: {body}"
    );
    let huge = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "kv_set", "arguments": {"key": "huge", "value": "x".repeat(100 * 1024)}}});
    let (status, body) = probe.json_post(&with_session, huge.to_string()).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, Some(-32600)),
        "oversized: {body}"
    );

    // Sessions.
    let unknown = [
        ("mcp-session-id", "00000000-0000-4000-8000-000000000000"),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    let (status, _) = probe.json_post(&unknown, tools_list.clone()).await;
    assert_eq!(status, 404, "unknown session");
    let (status, _) = probe.json_post(&[], tools_list.clone()).await;
    assert_eq!(status, 400, "a non-initialize request without session");
    let get = |headers: Vec<(&'static str, String)>| {
        let mut request = probe.http.get(&url);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send()
    };
    assert_eq!(
        get(vec![("accept", "text/event-stream".into())])
            .await
            .expect("GET")
            .status(),
        400
    );
    assert_eq!(
        get(vec![
            ("accept", "text/event-stream".into()),
            ("mcp-session-id", "nope".into())
        ])
        .await
        .expect("GET")
        .status(),
        404
    );
    assert_eq!(
        get(vec![
            ("accept", "application/json".into()),
            ("mcp-session-id", session.clone())
        ])
        .await
        .expect("GET")
        .status(),
        406
    );
    let delete = |session: Option<&str>| {
        let mut request = probe.http.delete(&url);
        if let Some(session) = session {
            request = request.header("mcp-session-id", session);
        }
        request.send()
    };
    assert_eq!(delete(None).await.expect("DELETE").status(), 400);
    assert_eq!(
        delete(Some("00000000-0000-4000-8000-000000000000"))
            .await
            .expect("DELETE")
            .status(),
        404
    );
    assert_eq!(
        probe.http.put(&url).send().await.expect("PUT").status(),
        405
    );

    // A Last-Event-ID from another session replays nothing.
    let other = legacy_client(&url).await;
    let foreign = format!("{}.0-0", other.session_id().expect("session"));
    let mut stream = good.open_get(Some(&foreign)).await.expect("GET");
    assert_eq!(stream.status, 200);
    assert!(
        matches!(stream.next_message(WAIT).await, Ok(None)),
        "an empty, closed stream"
    );

    // DNS rebinding.
    let (status, _) = probe
        .json_post(
            &[("host", "evil.example.com")],
            json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}).to_string(),
        )
        .await;
    assert_eq!(status, 403, "foreign Host");
    let (status, _) = probe
        .json_post(&[("origin", "http://evil.example.com")], tools_list.clone())
        .await;
    assert_eq!(status, 403, "foreign Origin");

    // Tool calls.
    let result = good
        .call_tool("kv_set", json!({"key": "k", "value": 42}))
        .await
        .expect("call");
    assert_eq!(
        result["isError"],
        json!(true),
        "bad argument type is a tool error: {result}"
    );
    let result = good
        .call_tool("kv_set", json!({"value": "v"}))
        .await
        .expect("call");
    assert_eq!(result["isError"], json!(true), "missing argument: {result}");
    let result = good
        .call_tool("kv_set", json!({"key": "has space", "value": "v"}))
        .await
        .expect("call");
    assert_eq!(result["isError"], json!(true), "invalid key: {result}");
    let result = good
        .call_tool(
            "kv_set",
            json!({"key": "big", "value": "x".repeat(20 * 1024)}),
        )
        .await
        .expect("call");
    assert_eq!(
        result["isError"],
        json!(true),
        "value over SHOAL_KV_MAX_VALUE_BYTES: {result}"
    );
    let exchange = good
        .request(
            "tools/call",
            json!({"name": "no_such_tool", "arguments": {}}),
        )
        .await
        .expect("call");
    assert_eq!(
        exchange.response().and_then(|r| r.pointer("/error/code")),
        Some(&json!(-32602)),
        "unknown tool"
    );
    let exchange = good
        .request("no/such/method", json!({}))
        .await
        .expect("call");
    assert_eq!(
        exchange.response().and_then(|r| r.pointer("/error/code")),
        Some(&json!(-32601)),
        "unknown method"
    );
    let exchange = good
        .request("resources/read", json!({"uri": "kv://missing"}))
        .await
        .expect("read");
    assert_eq!(
        exchange.response().and_then(|r| r.pointer("/error/code")),
        Some(&json!(-32002)),
        "missing resource"
    );

    // The well-behaved client never noticed.
    call_ok(&good, "kv_set", json!({"key": "still", "value": "fine"})).await;
    let exchange = call_ok(&good, "kv_get", json!({"key": "still"})).await;
    assert_eq!(text_of(exchange.result().expect("result")), "fine");
    assert_eq!(
        metric(&base, "shoal_http_rejections_total{reason=\"parse_error\"}").await,
        1.0
    );
    assert_eq!(
        metric(
            &base,
            "shoal_http_rejections_total{reason=\"body_too_large\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&base, "shoal_http_rejections_total{reason=\"host\"}").await,
        1.0
    );
    assert_eq!(
        metric(&base, "shoal_http_rejections_total{reason=\"origin\"}").await,
        1.0
    );
}

/// 2026-07-28 requests are validated too: removed methods are 404, a missing `_meta` is 400.
#[tokio::test]
async fn stateless_requests_are_validated() {
    let mut options = cluster_options(1);
    options.balancer = false;
    let topology = start(options).await;
    let client = McpClient::modern(topology.mcp_url());
    let exchange = client.request("ping", json!({})).await.expect("ping");
    assert_eq!(exchange.status, 404, "ping is gone in 2026-07-28");
    assert_eq!(
        exchange.response().and_then(|r| r.pointer("/error/code")),
        Some(&json!(-32601))
    );
    let bare = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list", "params": {}});
    let response = client
        .http()
        .post(client.url())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/list")
        .body(bare.to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400, "missing _meta");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], json!(-32602));
    assert_eq!(body["id"], json!(9), "errors echo the request id");
    // And a good request still works.
    call_ok(&client, "kv_set", json!({"key": "modern", "value": "ok"})).await;
}

/// Second review, finding 9: a replica holds at most `SHOAL_MAX_CONNECTIONS` connections; one more
/// is told `503` with `Retry-After` and closed. An h2c connection with no open request is closed
/// (GOAWAY) after the idle timeout, as an idle HTTP/1 connection is: before, an h2c peer that sent
/// its preface held its connection for as long as it answered pings.
#[tokio::test]
async fn connections_are_capped_and_idle_h2c_connections_are_closed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let topology = start(
        cluster_options(1)
            .env("SHOAL_MAX_CONNECTIONS", 4)
            .env("SHOAL_HEADER_READ_TIMEOUT_MS", 2000)
            .env("SHOAL_HTTP_IDLE_TIMEOUT_SECS", 2),
    )
    .await;
    let base = topology.replicas[0].base_url();
    let addr = base.trim_start_matches("http://").to_owned();

    // Connections that send nothing hold their slot until the header read timeout: the fifth
    // at the latest is refused (a probe of the test kit may still hold one).
    let mut held = Vec::new();
    let mut refusal = None;
    for _ in 0..5 {
        let mut stream = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let mut answer = Vec::new();
        match tokio::time::timeout(Duration::from_millis(300), stream.read_to_end(&mut answer))
            .await
        {
            Ok(_) => {
                refusal = Some(String::from_utf8_lossy(&answer).into_owned());
                break;
            }
            Err(_) => held.push(stream), // still open: it holds a slot
        }
    }
    let refusal = refusal.expect("a connection over the limit is refused");
    assert!(
        refusal.starts_with("HTTP/1.1 503 Service Unavailable")
            && refusal.contains("Retry-After: 1"),
        "{refusal}"
    );
    assert!(held.len() <= 4, "{} connections held", held.len());
    drop(held);

    // Slots free again: an h2c peer sends its preface and an empty SETTINGS frame, then nothing.
    let mut h2 = eventually("a free connection slot", WAIT, async || {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.ok()?;
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .ok()?;
        let mut first = [0_u8; 9];
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut first))
            .await
            .ok()?
            .ok()?;
        // The server's SETTINGS frame (type 4), not a refusal.
        (first[3] == 4).then_some(stream)
    })
    .await;
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(8), h2.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "an idle h2c connection was still open after 8 s (read {rest:?})"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}, before the idle timeout",
        started.elapsed()
    );
    // A GOAWAY (frame type 7) told the peer why.
    assert!(
        rest.windows(9)
            .any(|frame| frame[3] == 7 && frame[5..9] == [0, 0, 0, 0]),
        "no GOAWAY in {rest:?}"
    );

    // The replica still serves.
    let alive = reqwest::get(format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(alive.status(), StatusCode::OK);
}

/// Reads one HTTP/1.1 response (head, then a `Content-Length` or chunked body) from `stream`.
async fn read_response(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut data = Vec::new();
    let mut byte = [0_u8; 1];
    while !data.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("a response in time")
            .expect("read");
        assert_eq!(read, 1, "closed after {:?}", String::from_utf8_lossy(&data));
        data.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&data).into_owned();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // Chunks until the last, empty one.
        let mut rest = Vec::new();
        while !rest.ends_with(b"\r\n0\r\n\r\n") && !rest.starts_with(b"0\r\n\r\n") {
            let read = tokio::time::timeout(WAIT, stream.read(&mut byte))
                .await
                .expect("a body in time")
                .expect("read");
            assert_eq!(read, 1, "closed in the body");
            rest.push(byte[0]);
        }
        return head + &String::from_utf8_lossy(&rest);
    }
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0_u8; length];
    stream.read_exact(&mut body).await.expect("body");
    head + &String::from_utf8_lossy(&body)
}

/// How long `stream` stays open (reading nothing) before the replica closes it.
async fn time_until_closed(stream: &mut tokio::net::TcpStream) -> Duration {
    use tokio::io::AsyncReadExt as _;
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("closed by the replica");
    assert!(
        matches!(read, Ok(0)) || read.is_err(),
        "sent {rest:?} before closing"
    );
    started.elapsed()
}

/// A kept-alive connection stays open between requests for `SHOAL_HTTP_IDLE_TIMEOUT_SECS`, longer
/// than the header read timeout: a balancer in front keeps idle connections to the replicas up to
/// its own idle timeout (60 s for nginx and an AWS ALB), and a request it sent on a connection the
/// replica was closing would fail. Before, an idle connection was closed after the header read
/// timeout. The header read timeout still bounds a request that began: its headers must follow in
/// time.
#[tokio::test]
async fn kept_alive_connections_idle_longer_than_headers_may_take() {
    use tokio::io::AsyncWriteExt as _;
    let topology = start(
        cluster_options(1)
            .env("SHOAL_HEADER_READ_TIMEOUT_MS", 500)
            .env("SHOAL_HTTP_IDLE_TIMEOUT_SECS", 3),
    )
    .await;
    let addr = topology.replicas[0]
        .base_url()
        .trim_start_matches("http://")
        .to_owned();
    let request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    stream.write_all(request).await.expect("write");
    assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));
    // Idle for three header read timeouts: still open, and it serves the next request.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.write_all(request).await.expect("write");
    let second = read_response(&mut stream).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    // Then closed once idle for the idle timeout.
    let open_for = time_until_closed(&mut stream).await;
    assert!(
        open_for >= Duration::from_millis(2500) && open_for < Duration::from_secs(10),
        "an idle connection closed after {open_for:?}, the idle timeout is 3 s"
    );

    // A request begun on a kept-alive connection whose headers stop coming: closed after the
    // header read timeout, not the idle timeout.
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(request).await.expect("write");
    assert!(read_response(&mut slow).await.starts_with("HTTP/1.1 200"));
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .expect("write");
    let open_for = time_until_closed(&mut slow).await;
    assert!(
        open_for < Duration::from_millis(2500),
        "a request whose headers stopped was held {open_for:?}"
    );
}

/// A request id reused within a legacy session while its request is pending is refused (400,
/// -32600, the id named, no id on the error: it would answer the pending request) instead of
/// waiting behind the first; other ids are served meanwhile, and once the first is answered its id
/// may be used again.
#[tokio::test]
async fn a_request_id_pending_in_its_session_is_refused_when_reused() {
    let topology = cluster(1).await;
    let client = legacy_client(&topology.mcp_url()).await;
    let call = |ms: u64| {
        json!({"jsonrpc": "2.0", "id": "dup", "method": "tools/call",
               "params": {"name": "sleep", "arguments": {"ms": ms}}})
    };
    let first = client
        .post_message(&call(1500))
        .send()
        .await
        .expect("first");
    assert_eq!(first.status(), 200);

    let second = client.post_message(&call(0)).send().await.expect("second");
    assert_eq!(second.status(), 400);
    let refusal: Value = second.json().await.expect("a JSON-RPC error");
    assert_eq!(refusal["error"]["code"], -32600, "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("\"dup\""), "{message}");
    assert!(refusal["id"].is_null(), "{refusal}");

    call_ok(&client, "echo", json!({"text": "meanwhile"})).await;
    let answered = first.text().await.expect("the first answer");
    assert!(answered.contains("\"id\":\"dup\""), "{answered}");
    assert!(answered.contains("\"result\""), "{answered}");

    let again = client.post_message(&call(0)).send().await.expect("again");
    assert_eq!(
        again.status(),
        200,
        "the id is free once its request was answered"
    );
    let answered = again.text().await.expect("answer");
    assert!(answered.contains("\"result\""), "{answered}");
}
