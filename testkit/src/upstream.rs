//! Fake JSON-RPC upstreams (Solana-style) that misbehave on purpose: slow, failing, rate-limiting,
//! dead. The real endpoints (public blockchain RPC nodes) cannot be reached from here, so the rpc
//! toolset is tested against these, on real sockets.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::watch};

/// How a fake upstream behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Answers at once.
    Healthy,
    /// Answers after a delay.
    Slow(Duration),
    /// Answers HTTP 500.
    Failing,
    /// Answers HTTP 429 with `Retry-After` seconds.
    RateLimited(u64),
    /// Answers every call with a result string of this many bytes.
    Huge(usize),
}

/// A running fake upstream; it stops when dropped.
#[derive(Debug)]
pub struct FakeUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    behavior: watch::Sender<Behavior>,
    _stop: watch::Sender<()>,
}

impl FakeUpstream {
    /// Starts a fake upstream on a free loopback port.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start(behavior: Behavior) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicUsize::new(0));
        let (behavior_tx, behavior_rx) = watch::channel(behavior);
        let (stop_tx, mut stop_rx) = watch::channel(());
        let counter = requests.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stop_rx.changed() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let counter = counter.clone();
                let behavior = behavior_rx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let counter = counter.clone();
                        let behavior = *behavior.borrow();
                        async move { Ok::<_, Infallible>(answer(request, behavior, &counter).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            requests,
            behavior: behavior_tx,
            _stop: stop_tx,
        })
    }

    /// A URL where nothing listens (a dead endpoint).
    pub fn dead_url() -> String {
        format!("http://127.0.0.1:{}/", super::topology::free_port())
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Changes how it behaves from now on.
    pub fn set_behavior(&self, behavior: Behavior) {
        let _ = self.behavior.send(behavior);
    }
}

async fn answer(
    request: Request<Incoming>,
    behavior: Behavior,
    counter: &AtomicUsize,
) -> Response<Full<Bytes>> {
    counter.fetch_add(1, Ordering::SeqCst);
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let call: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = |status: u16, body: Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("valid response")
    };
    match behavior {
        Behavior::Failing => return reply(500, json!({"error": "internal"})),
        Behavior::RateLimited(seconds) => {
            let mut response = reply(429, json!({"error": "slow down"}));
            response.headers_mut().insert(
                "retry-after",
                seconds.to_string().parse().expect("header value"),
            );
            return response;
        }
        Behavior::Slow(delay) => tokio::time::sleep(delay).await,
        Behavior::Healthy => {}
        Behavior::Huge(bytes) => {
            let id = call.get("id").cloned().unwrap_or(Value::Null);
            return reply(
                200,
                json!({"jsonrpc": "2.0", "id": id, "result": "x".repeat(bytes)}),
            );
        }
    }
    let id = call.get("id").cloned().unwrap_or(Value::Null);
    let result = match call.get("method").and_then(Value::as_str) {
        Some("getBalance") => json!({"context": {"slot": 1234}, "value": 5_000_000_000u64}),
        Some("getSlot") => json!(1234),
        Some("getHealth") => json!("ok"),
        Some(other) => {
            return reply(
                200,
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": format!("Method not found: {other}")}}),
            );
        }
        None => return reply(400, json!({"error": "not JSON-RPC"})),
    };
    reply(200, json!({"jsonrpc": "2.0", "id": id, "result": result}))
}
