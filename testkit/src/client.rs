//! A raw MCP-over-HTTP client that shows everything on the wire: status codes, headers, SSE event
//! ids, every message of a response stream. The integration tests and the load generator use it
//! where an SDK client would hide what they need to observe (which replica answered, resumption
//! ids, notifications racing responses).
//!
//! It speaks both protocol eras: legacy (`initialize`, `Mcp-Session-Id`, GET streams) and
//! 2026-07-28 (stateless requests with `_meta` and the SEP-2243 routing headers).

use std::{
    pin::Pin,
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

use futures::{Stream, StreamExt};
use reqwest::{StatusCode, header::HeaderMap};
use serde_json::{Value, json};
use sse_stream::{Sse, SseStream};

/// The legacy protocol version the client negotiates.
pub const LEGACY_VERSION: &str = "2025-11-25";
/// The stateless protocol version.
pub const MODERN_VERSION: &str = "2026-07-28";

/// Errors of the test client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Transport failure.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The server answered something unexpected.
    #[error("{0}")]
    Protocol(String),
}

/// Result of client operations.
pub type ClientResult<T> = Result<T, ClientError>;

/// Which protocol era a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Era {
    /// Sessions, 2025-11-25.
    Legacy,
    /// Stateless, 2026-07-28.
    Modern,
}

/// One SSE event as received.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The SSE `id:` field.
    pub id: Option<String>,
    /// The JSON-RPC message in `data:`, when there is one.
    pub message: Option<Value>,
    /// The SSE `retry:` field.
    pub retry: Option<u64>,
}

/// The messages a request produced, in order.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// SSE events (or the single JSON body as one event without id).
    pub events: Vec<Event>,
    /// The JSON-RPC id of the request.
    pub id: Value,
}

impl Exchange {
    /// Every JSON-RPC message received.
    pub fn messages(&self) -> impl Iterator<Item = &Value> {
        self.events.iter().filter_map(|e| e.message.as_ref())
    }

    /// The response to the request (result or error).
    pub fn response(&self) -> Option<&Value> {
        self.messages().find(|m| {
            m.get("id") == Some(&self.id) && (m.get("result").is_some() || m.get("error").is_some())
        })
    }

    /// The `result`, or an error describing what came instead.
    ///
    /// # Errors
    /// When the server answered with a JSON-RPC error or no response.
    pub fn result(&self) -> ClientResult<&Value> {
        let response = self.response().ok_or_else(|| {
            ClientError::Protocol(format!(
                "no response (status {}): {:?}",
                self.status, self.events
            ))
        })?;
        response
            .get("result")
            .ok_or_else(|| ClientError::Protocol(format!("error response: {response}")))
    }

    /// Notifications with `method` received before the response.
    pub fn notifications<'a>(&'a self, method: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.messages().filter(move |m| {
            m.get("method").and_then(Value::as_str) == Some(method) && m.get("id").is_none()
        })
    }
}

type SseItems = Pin<Box<dyn Stream<Item = Result<Sse, sse_stream::Error>> + Send>>;

/// An open SSE response (a GET stream, or a POST response read incrementally).
pub struct EventStream {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    inner: Option<SseItems>,
    body: Option<String>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl EventStream {
    /// The next event that carries something (id, data or retry), or `None` when the stream ended.
    pub async fn next_event(&mut self) -> Option<Event> {
        if let Some(body) = self.body.take() {
            return Some(Event {
                id: None,
                message: serde_json::from_str(&body).ok(),
                retry: None,
            });
        }
        let inner = self.inner.as_mut()?;
        loop {
            match inner.next().await? {
                Ok(sse) => {
                    if sse.id.is_none()
                        && sse.retry.is_none()
                        && sse.data.as_deref().is_none_or(str::is_empty)
                    {
                        continue; // keep-alive comment
                    }
                    let message = sse
                        .data
                        .as_deref()
                        .filter(|data| !data.is_empty())
                        .and_then(|data| serde_json::from_str(data).ok());
                    return Some(Event {
                        id: sse.id,
                        message,
                        retry: sse.retry,
                    });
                }
                Err(_) => return None,
            }
        }
    }

    /// The next event carrying a JSON-RPC message, waiting at most `timeout`. `Ok(None)` when the
    /// stream ended; `Err(())` on timeout.
    ///
    /// # Errors
    /// `Err(())` when nothing arrived within `timeout`.
    pub async fn next_message(&mut self, timeout: Duration) -> Result<Option<Event>, ()> {
        tokio::time::timeout(timeout, async {
            loop {
                match self.next_event().await {
                    Some(event) if event.message.is_some() => return Some(event),
                    Some(_) => continue,
                    None => return None,
                }
            }
        })
        .await
        .map_err(|_| ())
    }
}

/// A raw MCP client bound to one URL.
#[derive(Debug)]
pub struct McpClient {
    http: reqwest::Client,
    url: String,
    era: Era,
    session: Option<String>,
    next_id: AtomicI64,
    /// Extra headers sent with every request.
    pub extra_headers: HeaderMap,
}

impl McpClient {
    /// Another handle on the same session (same HTTP client, URL, session id and headers), for a
    /// task that reopens streams while the original keeps sending requests.
    pub fn fork(&self) -> Self {
        self.fork_at(&self.url)
    }

    /// Like [`McpClient::fork`], talking to another URL (e.g. another replica of the cluster).
    pub fn fork_at(&self, url: &str) -> Self {
        Self {
            http: self.http.clone(),
            url: url.to_owned(),
            era: self.era,
            session: self.session.clone(),
            next_id: AtomicI64::new(1_000_000_000),
            extra_headers: self.extra_headers.clone(),
        }
    }

    /// A legacy-era client (call [`McpClient::initialize`] first).
    pub fn legacy(url: impl Into<String>) -> Self {
        Self::new(url, Era::Legacy)
    }

    /// A 2026-07-28 (stateless) client.
    pub fn modern(url: impl Into<String>) -> Self {
        Self::new(url, Era::Modern)
    }

    /// A client of `era`.
    pub fn new(url: impl Into<String>, era: Era) -> Self {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(64)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("reqwest client");
        Self {
            http,
            url: url.into(),
            era,
            session: None,
            next_id: AtomicI64::new(1),
            extra_headers: HeaderMap::new(),
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request (an API key or an OAuth access
    /// token), when a token is given.
    ///
    /// # Panics
    /// When the token is not a valid header value.
    #[must_use]
    pub fn with_bearer(mut self, token: Option<&str>) -> Self {
        if let Some(token) = token {
            let value = http::HeaderValue::from_str(&format!("Bearer {token}"))
                .expect("a token is printable ASCII");
            self.extra_headers
                .insert(http::header::AUTHORIZATION, value);
        }
        self
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The session id (legacy, after `initialize`).
    pub fn session_id(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// Uses an existing session id (e.g. to act as the same client from another connection).
    pub fn set_session_id(&mut self, session: Option<String>) {
        self.session = session;
    }

    fn protocol(&self) -> &'static str {
        match self.era {
            Era::Legacy => LEGACY_VERSION,
            Era::Modern => MODERN_VERSION,
        }
    }

    fn next_id(&self) -> i64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn post(&self, body: &Value) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .headers(self.extra_headers.clone())
            .body(body.to_string());
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        if self.session.is_some() || self.era == Era::Modern {
            request = request.header("mcp-protocol-version", self.protocol());
        }
        if self.era == Era::Modern
            && let Some(method) = body.get("method").and_then(Value::as_str)
        {
            request = request.header("mcp-method", method);
            let name = match method {
                "tools/call" | "prompts/get" => body.pointer("/params/name"),
                "resources/read" => body.pointer("/params/uri"),
                _ => None,
            };
            if let Some(name) = name.and_then(Value::as_str) {
                request = request.header("mcp-name", name);
            }
        }
        request
    }

    /// The JSON-RPC request `method` with `params`, `_meta` added for the modern era.
    pub fn request_body(&self, id: i64, method: &str, params: Value) -> Value {
        let mut params = if params.is_null() { json!({}) } else { params };
        if self.era == Era::Modern
            && let Some(object) = params.as_object_mut()
        {
            let meta = object.entry("_meta").or_insert_with(|| json!({}));
            if let Some(meta) = meta.as_object_mut() {
                meta.insert(
                    "io.modelcontextprotocol/protocolVersion".into(),
                    json!(MODERN_VERSION),
                );
                meta.insert(
                    "io.modelcontextprotocol/clientInfo".into(),
                    json!({"name": "shoal-testkit", "version": "0.1.0"}),
                );
                meta.entry("io.modelcontextprotocol/clientCapabilities")
                    .or_insert_with(|| json!({}));
            }
        }
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
    }

    /// Legacy handshake: `initialize`, then `notifications/initialized`. Returns the result.
    ///
    /// # Errors
    /// When the server refuses or answers without a session id.
    pub async fn initialize(&mut self) -> ClientResult<Value> {
        self.initialize_with(
            json!({"sampling": {}, "elicitation": {}, "roots": {"listChanged": true}}),
        )
        .await
    }

    /// [`McpClient::initialize`] with explicit client capabilities.
    ///
    /// # Errors
    /// When the server refuses or answers without a session id.
    pub async fn initialize_with(&mut self, capabilities: Value) -> ClientResult<Value> {
        let body = json!({
            "jsonrpc": "2.0", "id": self.next_id(), "method": "initialize",
            "params": {
                "protocolVersion": LEGACY_VERSION,
                "capabilities": capabilities,
                "clientInfo": {"name": "shoal-testkit", "version": "0.1.0"}
            }
        });
        self.session = None;
        let exchange = self.exchange(body).await?;
        let session = exchange
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| {
                ClientError::Protocol(format!(
                    "initialize without session id: {:?}",
                    exchange.events
                ))
            })?;
        let result = exchange.result()?.clone();
        self.session = Some(session);
        let status = self
            .notify("notifications/initialized", Value::Null)
            .await?;
        if status != StatusCode::ACCEPTED {
            return Err(ClientError::Protocol(format!(
                "notifications/initialized answered {status}"
            )));
        }
        Ok(result)
    }

    /// Sends a request and reads the whole response stream.
    ///
    /// # Errors
    /// On transport failures.
    pub async fn request(&self, method: &str, params: Value) -> ClientResult<Exchange> {
        let body = self.request_body(self.next_id(), method, params);
        self.exchange(body).await
    }

    /// `tools/call` returning the `result` (which may have `isError`).
    ///
    /// # Errors
    /// On transport failures and JSON-RPC errors.
    pub async fn call_tool(&self, name: &str, arguments: Value) -> ClientResult<Value> {
        let exchange = self
            .request("tools/call", json!({"name": name, "arguments": arguments}))
            .await?;
        exchange.result().cloned()
    }

    /// Sends a prepared JSON-RPC body and reads the whole response.
    ///
    /// # Errors
    /// On transport failures.
    pub async fn exchange(&self, body: Value) -> ClientResult<Exchange> {
        let id = body.get("id").cloned().unwrap_or(Value::Null);
        let mut stream = self.open(body).await?;
        let mut events = Vec::new();
        while let Some(event) = stream.next_event().await {
            events.push(event);
        }
        Ok(Exchange {
            status: stream.status,
            headers: stream.headers,
            events,
            id,
        })
    }

    /// Sends a JSON-RPC request and returns its response stream to read incrementally.
    ///
    /// # Errors
    /// On transport failures.
    pub async fn open_request(
        &self,
        method: &str,
        params: Value,
    ) -> ClientResult<(i64, EventStream)> {
        let id = self.next_id();
        let body = self.request_body(id, method, params);
        Ok((id, self.open(body).await?))
    }

    /// POSTs a prepared body and returns the response as a stream.
    ///
    /// # Errors
    /// On transport failures.
    pub async fn open(&self, body: Value) -> ClientResult<EventStream> {
        let response = self.post(&body).send().await?;
        Ok(Self::event_stream(response).await)
    }

    async fn event_stream(response: reqwest::Response) -> EventStream {
        let status = response.status();
        let headers = response.headers().clone();
        let is_sse = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_sse {
            EventStream {
                status,
                headers,
                inner: Some(Box::pin(SseStream::from_bytes_stream(
                    response.bytes_stream(),
                ))),
                body: None,
            }
        } else {
            let body = response.text().await.unwrap_or_default();
            EventStream {
                status,
                headers,
                inner: None,
                body: (!body.is_empty()).then_some(body),
            }
        }
    }

    /// Sends a notification; returns the HTTP status.
    ///
    /// # Errors
    /// On transport failures.
    pub async fn notify(&self, method: &str, params: Value) -> ClientResult<StatusCode> {
        let mut body = json!({"jsonrpc": "2.0", "method": method});
        if !params.is_null() {
            body["params"] = params;
        }
        Ok(self.post(&body).send().await?.status())
    }

    /// The POST of JSON-RPC message `body` with this client's headers (session, protocol
    /// version, era headers), for tests that need the whole response or extra headers.
    pub fn post_message(&self, body: &Value) -> reqwest::RequestBuilder {
        self.post(body)
    }

    /// Answers a server-to-client request; returns the HTTP status.
    ///
    /// # Errors
    /// On transport failures.
    pub async fn respond(&self, id: Value, result: Value) -> ClientResult<StatusCode> {
        let body = json!({"jsonrpc": "2.0", "id": id, "result": result});
        Ok(self.post(&body).send().await?.status())
    }

    /// Opens the legacy GET stream, resuming after `last_event_id` when given.
    ///
    /// # Errors
    /// On transport failures.
    pub async fn open_get(&self, last_event_id: Option<&str>) -> ClientResult<EventStream> {
        let mut request = self
            .http
            .get(&self.url)
            .header("accept", "text/event-stream")
            .header("mcp-protocol-version", self.protocol())
            .headers(self.extra_headers.clone());
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        if let Some(last) = last_event_id {
            request = request.header("last-event-id", last);
        }
        Ok(Self::event_stream(request.send().await?).await)
    }

    /// Ends the session (legacy); returns the HTTP status.
    ///
    /// # Errors
    /// On transport failures.
    pub async fn delete(&self) -> ClientResult<StatusCode> {
        let mut request = self
            .http
            .delete(&self.url)
            .header("mcp-protocol-version", self.protocol())
            .headers(self.extra_headers.clone());
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        Ok(request.send().await?.status())
    }

    /// The underlying HTTP client, for hand-made requests.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }
}
