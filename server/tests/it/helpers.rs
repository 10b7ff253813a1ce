//! Shared helpers: real topologies of this build's `shoal-server`, metric scraping, waiting for
//! events with generous timeouts, and reading Redis from the outside.

use std::{path::PathBuf, time::Duration};

use serde_json::{Value, json};
use shoal_testkit::{
    client::{EventStream, Exchange, McpClient},
    topology::{Topology, TopologyOptions},
};

/// Small limits for tests that drive a `Backend` directly, with one connection (every command
/// travels in order on it) and Redis commands timing out after `redis_timeout`.
pub fn backend_config(redis_timeout: Duration) -> shoal_shared::backend::BackendConfig {
    shoal_shared::backend::BackendConfig {
        session_ttl: Duration::from_secs(60),
        event_log_max_len: 100,
        event_retention: Duration::from_secs(60),
        max_subscriptions_per_session: 10,
        max_subscribers_per_uri: 10,
        kv_max_keys: 10,
        redis_timeout,
        redis_pool_size: 1,
    }
}

/// The status of the replica's `/readyz` at `base_url` (0 when it does not answer).
pub async fn ready(base_url: &str) -> u16 {
    reqwest::get(format!("{base_url}/readyz"))
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// Generous upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shoal-server"))
}

/// Options for `replicas` replicas on Redis behind nginx, with the test toolsets and fast
/// keep-alives (so vanished clients are noticed within a second or two).
pub fn cluster_options(replicas: usize) -> TopologyOptions {
    TopologyOptions::cluster(server_bin(), replicas)
        .env("SHOAL_TOOLSETS", "kv,conformance")
        .env("SHOAL_SSE_KEEPALIVE_SECS", 1)
        .env("SHOAL_SHUTDOWN_GRACE_SECS", 10)
}

pub async fn cluster(replicas: usize) -> Topology {
    start(cluster_options(replicas)).await
}

/// [`cluster`] on `redis`.
pub async fn cluster_on(redis: RedisKind, replicas: usize) -> Topology {
    start(cluster_options(replicas).on(redis)).await
}

/// Runs each named `async fn(RedisKind)` as three tests, `<name>::standalone`,
/// `<name>::sentinel` and `<name>::cluster`: the same body on one Redis, on a Sentinel set and on
/// a Redis Cluster, by parameter.
macro_rules! on_each_redis {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn standalone() {
                super::$name(shoal_testkit::topology::RedisKind::Standalone).await
            }
            #[tokio::test]
            async fn sentinel() {
                super::$name(shoal_testkit::topology::RedisKind::Sentinel).await
            }
            #[tokio::test]
            async fn cluster() {
                super::$name(shoal_testkit::topology::RedisKind::Cluster).await
            }
        }
    )*};
}
pub(crate) use on_each_redis;
pub use shoal_testkit::topology::RedisKind;

pub async fn start(options: TopologyOptions) -> Topology {
    match Topology::start(options).await {
        Ok(topology) => topology,
        Err(error) => panic!("cannot start the test topology: {error}"),
    }
}

/// The replica that answered.
pub fn replica_of(headers: &reqwest::header::HeaderMap) -> String {
    headers
        .get("x-shoal-replica")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned()
}

/// A legacy client on `url`, initialized.
pub async fn legacy_client(url: &str) -> McpClient {
    let mut client = McpClient::legacy(url);
    client.initialize().await.expect("initialize");
    client
}

/// Calls a tool and asserts it succeeded (no JSON-RPC error, no `isError`); returns the exchange.
pub async fn call_ok(client: &McpClient, name: &str, arguments: Value) -> Exchange {
    let exchange = client
        .request("tools/call", json!({"name": name, "arguments": arguments}))
        .await
        .expect("tools/call");
    let result = exchange.result().unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_ne!(
        result.get("isError"),
        Some(&json!(true)),
        "{name} failed: {result}"
    );
    exchange
}

/// The text of the first content item of a tool result.
pub fn text_of(result: &Value) -> String {
    result
        .pointer("/content/0/text")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Waits until `probe` returns `Some`, polling every 50 ms, for at most `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the metric sample `series` (name with labels, exactly as rendered) on the replica
/// at `base_url`, or 0 when the series does not exist yet.
pub async fn metric(base_url: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{base_url}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .unwrap_or(0.0)
}

/// The sum of `series` over every replica of the topology.
pub async fn metric_sum(topology: &Topology, series: &str) -> f64 {
    let mut sum = 0.0;
    for replica in &topology.replicas {
        sum += metric(&replica.base_url(), series).await;
    }
    sum
}

/// Runs `redis-cli` against the topology's Redis.
///
/// On a Redis Cluster, a command on a key follows the redirection to the key's node (`-c`); other
/// commands go to the primary of the key prefix's slot.
pub async fn redis_cli(topology: &Topology, args: &[&str]) -> String {
    redis_cli_on(topology.redis_port(), args).await
}

/// `redis-cli` against the node on `port` (redirections followed).
pub async fn redis_cli_on(port: u16, args: &[&str]) -> String {
    let port = port.to_string();
    let output = tokio::process::Command::new("redis-cli")
        .args(["-c", "-p", &port])
        .args(args)
        .output()
        .await
        .expect("redis-cli (install redis-tools)");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The Redis keys of the topology that mention `needle` (on every primary of a Redis Cluster).
pub async fn redis_keys_with(topology: &Topology, needle: &str) -> Vec<String> {
    let pattern = format!("{}:*{needle}*", topology.prefix);
    let mut keys = Vec::new();
    for port in topology.redis_primary_ports().await {
        keys.extend(
            redis_cli_on(port, &["--scan", "--pattern", &pattern])
                .await
                .lines()
                .map(str::to_owned)
                .filter(|l| !l.is_empty()),
        );
    }
    keys
}

/// The key names the replicas of `topology` use.
pub fn keys_of(topology: &Topology) -> shoal_shared::keys::Keys {
    shoal_shared::keys::Keys::new(topology.prefix.clone())
}

/// Reads messages from `stream` until one satisfies `matches`, failing after `WAIT`.
pub async fn next_matching(
    stream: &mut EventStream,
    what: &str,
    matches: impl Fn(&Value) -> bool,
) -> (Option<String>, Value) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match stream.next_message(remaining).await {
            Ok(Some(event)) => {
                let message = event.message.expect("message event");
                if matches(&message) {
                    return (event.id, message);
                }
            }
            Ok(None) => panic!("stream ended while waiting for {what}"),
            Err(()) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Waits on a `subscriptions/listen` stream for its acknowledgment and returns it.
pub async fn acknowledged(stream: &mut EventStream) -> Value {
    next_matching(stream, "the acknowledgment", |m| {
        m.get("method") == Some(&json!("notifications/subscriptions/acknowledged"))
    })
    .await
    .1
}

/// Subscribes a legacy `client` to updates of `uri` (`resources/subscribe`), which must succeed.
pub async fn subscribe(client: &McpClient, uri: &str) {
    client
        .request("resources/subscribe", json!({"uri": uri}))
        .await
        .expect("subscribe")
        .result()
        .expect("subscribed");
}

/// Whether `message` is `notifications/resources/updated` for `uri`.
pub fn is_update_of(message: &Value, uri: &str) -> bool {
    message.get("method").and_then(Value::as_str) == Some("notifications/resources/updated")
        && message.pointer("/params/uri").and_then(Value::as_str) == Some(uri)
}

/// Params of a 2026-07-28 `subscriptions/listen` for updates of `uri` and resource list changes.
pub fn listen_params(uri: &str) -> Value {
    json!({"notifications": {"resourceSubscriptions": [uri], "resourcesListChanged": true}})
}
