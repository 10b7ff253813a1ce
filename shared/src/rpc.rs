//! JSON-RPC upstreams with client-side load balancing and fallback.
//!
//! Each call picks an endpoint by power of two choices over a latency-and-load score (an EWMA of
//! latency times requests in flight), so slow endpoints receive little traffic. A timeout, a
//! connection error, an HTTP 5xx or an HTTP 429 moves the call to another endpoint and puts the
//! failing one in a cool-down (a 429's `Retry-After` sets its length); cooled-down endpoints get
//! no traffic until it ends. A JSON-RPC error answered by an endpoint is a real answer and is not
//! retried. Connections are pooled and kept alive per endpoint.

use crate::telemetry::attr;
use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rand::Rng;
use serde_json::{Value, json};

use crate::{
    metrics::Metrics,
    telemetry::{KeyValue, Span, SpanKind},
};

/// Upstream settings.
#[derive(Debug, Clone)]
pub struct RpcConfig {
    /// Endpoint URLs.
    pub endpoints: Vec<String>,
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// How long a failing endpoint is left alone.
    pub cooldown: Duration,
    /// Endpoints tried per call at most.
    pub max_attempts: usize,
    /// Largest response body read from an upstream.
    pub max_response_bytes: usize,
}

impl From<&crate::config::UpstreamConfig> for RpcConfig {
    fn from(config: &crate::config::UpstreamConfig) -> Self {
        Self {
            endpoints: config.endpoints.clone(),
            attempt_timeout: Duration::from_millis(config.timeout_ms),
            cooldown: Duration::from_millis(config.cooldown_ms),
            max_attempts: config.max_attempts,
            max_response_bytes: config.max_response_bytes,
        }
    }
}

/// The longest cool-down an upstream's `Retry-After` can ask for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No endpoint answered: every attempt failed (and why).
    #[error("no upstream endpoint answered ({})", .0.join("; "))]
    AllFailed(Vec<String>),
    /// An endpoint answered with a JSON-RPC error.
    #[error("upstream error {code}: {message}")]
    Upstream {
        /// JSON-RPC error code.
        code: i64,
        /// Its message.
        message: String,
    },
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
}

#[derive(Debug)]
struct Endpoint {
    url: String,
    label: &'static str,
    /// EWMA of latency, in microseconds.
    ewma_us: AtomicU64,
    in_flight: AtomicUsize,
    cooldown_until: Mutex<Option<Instant>>,
}

impl Endpoint {
    fn eligible(&self, now: Instant) -> bool {
        self.cooldown_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|until| until <= now)
    }

    fn score(&self) -> u64 {
        (self.ewma_us.load(Ordering::Relaxed) + 100)
            * (self.in_flight.load(Ordering::Relaxed) as u64 + 1)
    }

    fn observe(&self, latency: Duration) {
        let sample = latency.as_micros() as u64;
        let old = self.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 7 + sample * 3) / 10
        };
        self.ewma_us.store(new, Ordering::Relaxed);
    }
}

/// What one attempt produced.
enum Attempt {
    Answer(Value),
    /// A JSON-RPC error: final.
    Rejected(RpcError),
    /// Try elsewhere; cool this endpoint down for the given time.
    Failed(String, Duration),
}

/// The upstream pool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RpcPool {
    http: reqwest::Client,
    endpoints: Arc<Vec<Endpoint>>,
    config: Arc<RpcConfig>,
    metrics: Metrics,
    next_id: Arc<AtomicU64>,
}

/// The label of an endpoint in metrics, logs, spans and errors: host and port only, never the
/// user info, path or query string a URL may carry credentials in.
fn label_of(url: &str) -> &'static str {
    let label = match reqwest::Url::parse(url) {
        Ok(parsed) => match (parsed.host_str(), parsed.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => "unknown".to_owned(),
        },
        Err(_) => "unknown".to_owned(),
    };
    // Endpoints come from configuration (a closed, small set): a leaked label per endpoint keeps
    // metric labels `'static` without a registry.
    Box::leak(label.into_boxed_str())
}

/// Reads a response body of at most `limit` bytes (refused by its Content-Length, or as soon as
/// the chunks pass the limit).
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, &'static str> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err("reply too large");
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|_| "unreadable reply")? {
        if body.len() + chunk.len() > limit {
            return Err("reply too large");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl RpcPool {
    /// A pool over the configured endpoints.
    ///
    /// # Errors
    /// When no endpoint is configured or an URL is not http(s).
    pub fn new(config: RpcConfig, metrics: Metrics) -> Result<Self, RpcError> {
        if config.endpoints.is_empty() {
            return Err(RpcError::Config("no upstream endpoint configured".into()));
        }
        if let Some(bad) = config
            .endpoints
            .iter()
            .find(|url| !(url.starts_with("http://") || url.starts_with("https://")))
        {
            return Err(RpcError::Config(format!(
                "upstream endpoint {bad:?} is not an http(s) URL"
            )));
        }
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(32)
            .pool_idle_timeout(Duration::from_secs(60))
            .connect_timeout(config.attempt_timeout.min(Duration::from_secs(2)))
            .build()
            .map_err(|e| RpcError::Config(e.to_string()))?;
        let endpoints = config
            .endpoints
            .iter()
            .map(|url| {
                let label = label_of(url);
                metrics.rpc_healthy(label, true);
                Endpoint {
                    url: url.clone(),
                    label,
                    ewma_us: AtomicU64::new(0),
                    in_flight: AtomicUsize::new(0),
                    cooldown_until: Mutex::new(None),
                }
            })
            .collect();
        Ok(Self {
            http,
            endpoints: Arc::new(endpoints),
            config: Arc::new(config),
            metrics,
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Power of two choices among eligible endpoints not tried yet.
    fn pick(&self, tried: &HashSet<usize>) -> Option<usize> {
        let now = Instant::now();
        let candidates: Vec<usize> = (0..self.endpoints.len())
            .filter(|i| !tried.contains(i) && self.endpoints[*i].eligible(now))
            .collect();
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            n => {
                let mut rng = rand::rng();
                let a = candidates[rng.random_range(0..n)];
                let mut b = candidates[rng.random_range(0..n - 1)];
                if b == a {
                    b = candidates[n - 1];
                }
                Some(if self.endpoints[a].score() <= self.endpoints[b].score() {
                    a
                } else {
                    b
                })
            }
        }
    }

    /// Calls `method` with `params` on the best available endpoint, falling back to others.
    ///
    /// # Errors
    /// [`RpcError::Upstream`] when an endpoint answered with an error; [`RpcError::AllFailed`]
    /// when none answered.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        let mut tried = HashSet::new();
        let mut failures = Vec::new();
        for _ in 0..self.config.max_attempts.max(1) {
            let Some(index) = self.pick(&tried) else {
                break;
            };
            tried.insert(index);
            let endpoint = &self.endpoints[index];
            match self.attempt(endpoint, method, &params).await {
                Attempt::Answer(value) => return Ok(value),
                Attempt::Rejected(error) => return Err(error),
                Attempt::Failed(reason, cooldown) => {
                    *endpoint
                        .cooldown_until
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + cooldown);
                    self.metrics.rpc_healthy(endpoint.label, false);
                    tracing::info!(endpoint = endpoint.label, %reason, cooldown_ms = cooldown.as_millis() as u64, "upstream endpoint failed; cooling it down");
                    failures.push(format!("{}: {reason}", endpoint.label));
                }
            }
        }
        if failures.is_empty() {
            failures.push("every endpoint is cooling down after failures".into());
        }
        Err(RpcError::AllFailed(failures))
    }

    async fn attempt(&self, endpoint: &Endpoint, method: &str, params: &Value) -> Attempt {
        let span = if crate::telemetry::tracing_enabled() {
            let method: String = method.chars().take(64).collect();
            Span::child(format!("jsonrpc {method}"), SpanKind::Client, || {
                vec![
                    KeyValue::new(attr::RPC_SYSTEM_NAME, "jsonrpc"),
                    KeyValue::new(attr::RPC_METHOD, method),
                    KeyValue::new(attr::SERVER_ADDRESS, endpoint.label),
                ]
            })
        } else {
            Span::none()
        };
        let outcome = span
            .wrap(self.attempt_inner(endpoint, method, params))
            .await;
        if span.is_recording() {
            let label = outcome_label(&outcome);
            span.set(attr::SHOAL_RPC_OUTCOME, label);
            if label != "ok" {
                span.mark_error(label);
            }
        }
        outcome
    }

    async fn attempt_inner(&self, endpoint: &Endpoint, method: &str, params: &Value) -> Attempt {
        self.metrics.rpc_healthy(endpoint.label, true);
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        self.metrics.rpc_in_flight(endpoint.label, 1);
        let start = Instant::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let mut request = self
            .http
            .post(&endpoint.url)
            .timeout(self.config.attempt_timeout)
            .json(&body);
        if let Some(traceparent) = crate::telemetry::current_traceparent() {
            request = request.header("traceparent", traceparent);
        }
        let response = request.send().await;
        let outcome = match response {
            Err(error) if error.is_timeout() => {
                // A timeout teaches the balancer the endpoint is slow.
                endpoint.observe(self.config.attempt_timeout);
                Attempt::Failed("timed out".into(), self.config.cooldown)
            }
            Err(_) => Attempt::Failed("connection failed".into(), self.config.cooldown),
            Ok(response) if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER))
                    .unwrap_or(self.config.cooldown);
                Attempt::Failed("rate limited (HTTP 429)".into(), retry_after)
            }
            Ok(response) if response.status().is_server_error() => Attempt::Failed(
                format!("HTTP {}", response.status().as_u16()),
                self.config.cooldown,
            ),
            Ok(response) if !response.status().is_success() => Attempt::Failed(
                format!("HTTP {}", response.status().as_u16()),
                self.config.cooldown,
            ),
            Ok(response) => match read_capped(response, self.config.max_response_bytes)
                .await
                .and_then(|body| {
                    serde_json::from_slice::<Value>(&body).map_err(|_| "unreadable reply")
                }) {
                Ok(reply) => {
                    endpoint.observe(start.elapsed());
                    if let Some(error) = reply.get("error") {
                        Attempt::Rejected(RpcError::Upstream {
                            code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
                            message: error
                                .get("message")
                                .and_then(Value::as_str)
                                .unwrap_or("unknown error")
                                .to_owned(),
                        })
                    } else {
                        match reply.get("result") {
                            Some(result) => Attempt::Answer(result.clone()),
                            None => Attempt::Failed(
                                "malformed JSON-RPC reply".into(),
                                self.config.cooldown,
                            ),
                        }
                    }
                }
                Err(reason) => Attempt::Failed(reason.into(), self.config.cooldown),
            },
        };
        endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.metrics.rpc_in_flight(endpoint.label, -1);
        self.metrics
            .rpc_request(endpoint.label, outcome_label(&outcome), start.elapsed());
        outcome
    }
}

fn outcome_label(outcome: &Attempt) -> &'static str {
    match outcome {
        Attempt::Answer(_) => "ok",
        Attempt::Rejected(_) => "rpc_error",
        Attempt::Failed(reason, _) if reason.starts_with("rate limited") => "rate_limited",
        Attempt::Failed(reason, _) if reason == "timed out" => "timeout",
        Attempt::Failed(_, _) => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_host_and_port() {
        assert_eq!(label_of("http://127.0.0.1:8899/rpc"), "127.0.0.1:8899");
        assert_eq!(label_of("https://api.example.com"), "api.example.com");
        assert_eq!(
            label_of("https://user:secret@node.example.com:8545/v1/KEY?apikey=KEY2#x"),
            "node.example.com:8545"
        );
        assert_eq!(label_of("not a url"), "unknown");
    }

    #[test]
    fn bad_configuration_is_refused() {
        let config = |endpoints: Vec<&str>| RpcConfig {
            endpoints: endpoints.into_iter().map(str::to_owned).collect(),
            attempt_timeout: Duration::from_secs(1),
            cooldown: Duration::from_secs(1),
            max_attempts: 3,
            max_response_bytes: 1024,
        };
        assert!(RpcPool::new(config(vec![]), Metrics::new()).is_err());
        assert!(RpcPool::new(config(vec!["ftp://x"]), Metrics::new()).is_err());
        assert!(RpcPool::new(config(vec!["http://x"]), Metrics::new()).is_ok());
    }

    #[test]
    fn faster_endpoints_win_the_choice() {
        let pool = RpcPool::new(
            RpcConfig {
                endpoints: vec!["http://a".into(), "http://b".into()],
                attempt_timeout: Duration::from_secs(1),
                cooldown: Duration::from_secs(1),
                max_attempts: 2,
                max_response_bytes: 1024,
            },
            Metrics::new(),
        )
        .expect("pool");
        pool.endpoints[0].observe(Duration::from_millis(200));
        pool.endpoints[1].observe(Duration::from_millis(2));
        for _ in 0..20 {
            assert_eq!(pool.pick(&HashSet::new()), Some(1));
        }
        *pool.endpoints[1].cooldown_until.lock().expect("lock") =
            Some(Instant::now() + Duration::from_secs(60));
        assert_eq!(
            pool.pick(&HashSet::new()),
            Some(0),
            "a cooling endpoint is skipped"
        );
        assert_eq!(pool.pick(&HashSet::from([0])), None);
    }
}
