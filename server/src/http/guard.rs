//! What is checked before a request reaches rmcp: the protocol version, the content type, the
//! JSON-RPC envelope (read without building the message) and the Host and Origin allow-lists.

use http::{HeaderMap, StatusCode, header};
use rmcp::model::ProtocolVersion;
use serde::Deserialize;

pub(super) fn known_version(value: &str) -> Option<ProtocolVersion> {
    ProtocolVersion::KNOWN_VERSIONS
        .iter()
        .find(|version| version.as_str() == value)
        .cloned()
}

pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// What this layer needs to know of a JSON-RPC message, read without building it.
#[derive(Debug, Default)]
pub(super) struct Envelope {
    pub(super) is_initialize: bool,
    /// A request (a method and an id), as opposed to a notification or a response.
    pub(super) is_request: bool,
    pub(super) id: Option<serde_json::Value>,
    /// `params._meta.traceparent` (2026-07-28 trace context propagation).
    pub(super) traceparent: Option<String>,
    /// `params.name` of a `tools/call` (checked against the caller's grants).
    pub(super) tool: Option<String>,
    /// A `subscriptions/listen` (a long-lived stream).
    pub(super) is_listen: bool,
    /// The resource URIs a `subscriptions/listen` asks to follow (checked against the grants).
    pub(super) listen_uris: Vec<String>,
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, default)]
    jsonrpc: Option<&'a str>,
    #[serde(borrow, default)]
    method: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    params: Option<RawParams>,
    #[serde(default)]
    result: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct RawParams {
    #[serde(rename = "_meta", default)]
    meta: Option<RawMeta>,
    #[serde(default)]
    name: Option<serde_json::Value>,
    /// `subscriptions/listen`'s filter (kept as a value: other methods may use the name freely).
    #[serde(default)]
    notifications: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawMeta {
    #[serde(default)]
    traceparent: Option<serde_json::Value>,
}

impl Envelope {
    /// Checks JSON syntax and JSON-RPC framing: `(code, message)` on failure.
    pub(super) fn peek(bytes: &[u8]) -> Result<Self, (i64, &'static str)> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first == Some(&b'[') {
            // Still check the syntax, so malformed JSON is a parse error whatever its shape.
            serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
                .map_err(|_| (-32700, "Parse error: invalid JSON"))?;
            return Err((
                -32600,
                "Invalid Request: JSON-RPC batches are not supported",
            ));
        }
        let raw: RawEnvelope<'_> = match serde_json::from_slice(bytes) {
            Ok(raw) => raw,
            Err(error) if error.is_data() => {
                return Err((
                    -32600,
                    "Invalid Request: expected a JSON-RPC message object",
                ));
            }
            Err(_) => return Err((-32700, "Parse error: invalid JSON")),
        };
        if raw.jsonrpc != Some("2.0") {
            return Err((-32600, "Invalid Request: jsonrpc must be \"2.0\""));
        }
        if raw.method.is_none() && raw.result.is_none() && raw.error.is_none() {
            return Err((
                -32600,
                "Invalid Request: a message needs a method, a result or an error",
            ));
        }
        let is_call = raw.method.as_deref() == Some("tools/call");
        let is_listen = raw.method.as_deref() == Some("subscriptions/listen");
        let (meta, name, notifications) = raw
            .params
            .map(|p| (p.meta, p.name, p.notifications))
            .unwrap_or_default();
        let listen_uris = notifications
            .filter(|_| is_listen)
            .and_then(|filter| match filter.get("resourceSubscriptions") {
                Some(serde_json::Value::Array(uris)) => Some(
                    uris.iter()
                        .filter_map(|uri| uri.as_str().map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Envelope {
            is_initialize: raw.method.as_deref() == Some("initialize"),
            is_request: raw.method.is_some() && raw.id.is_some(),
            is_listen,
            listen_uris,
            id: raw.id,
            traceparent: meta
                .and_then(|m| m.traceparent)
                .and_then(|tp| tp.as_str().map(str::to_owned)),
            tool: name
                .filter(|_| is_call)
                .and_then(|name| name.as_str().map(str::to_owned)),
        })
    }
}

/// The Host and Origin allow-lists (DNS-rebinding protection), with the same matching rules as
/// rmcp's, which enforces them again behind this layer.
#[derive(Debug)]
pub(super) struct OriginPolicy {
    hosts: Vec<(String, Option<u16>)>,
    origins: Vec<(String, String, PortRule)>,
}

/// Why the Host/Origin check refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rejection {
    pub(super) reason: &'static str,
    pub(super) status: StatusCode,
    pub(super) message: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortRule {
    Any,
    Exact(u16),
}

fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let authority: http::uri::Authority = authority.trim().parse().ok()?;
    let host = authority
        .host()
        .trim_matches(['[', ']'])
        .to_ascii_lowercase();
    Some((host, authority.port_u16()))
}

/// A 403 refusal of the Host/Origin check.
fn forbidden(reason: &'static str, message: &'static str) -> Rejection {
    Rejection {
        reason,
        status: StatusCode::FORBIDDEN,
        message,
    }
}

impl OriginPolicy {
    pub(super) fn new(hosts: &[String], origins: &[String]) -> Self {
        let hosts = hosts
            .iter()
            .filter_map(|host| {
                // Bare IPv6 addresses (`::1`) do not parse as authorities.
                split_authority(host)
                    .or_else(|| Some((host.trim_matches(['[', ']']).to_ascii_lowercase(), None)))
            })
            .collect();
        let origins = origins
            .iter()
            .filter_map(|origin| {
                let (base, any_port) = match origin.strip_suffix(":*") {
                    Some(base) => (base, true),
                    None => (origin.as_str(), false),
                };
                let (scheme, authority) = base.split_once("://")?;
                let (host, port) = split_authority(authority)?;
                let rule = match (any_port, port) {
                    (true, _) | (false, None) => PortRule::Any,
                    (false, Some(port)) => PortRule::Exact(port),
                };
                Some((scheme.to_ascii_lowercase(), host, rule))
            })
            .collect();
        Self { hosts, origins }
    }

    pub(super) fn check(&self, uri: &http::Uri, headers: &HeaderMap) -> Result<(), Rejection> {
        self.check_host(uri, headers)?;
        self.check_origin(headers)
    }

    /// The Host allow-list alone (also guards /metrics on the serving port).
    pub(super) fn check_host(&self, uri: &http::Uri, headers: &HeaderMap) -> Result<(), Rejection> {
        let bad_host = |message| Rejection {
            reason: "bad_host",
            status: StatusCode::BAD_REQUEST,
            message,
        };
        if !self.hosts.is_empty() {
            let authority = match headers.get(header::HOST) {
                Some(value) => value
                    .to_str()
                    .ok()
                    .and_then(split_authority)
                    .ok_or(bad_host("Bad Request: Invalid Host header\n"))?,
                None => uri
                    .authority()
                    .and_then(|a| split_authority(a.as_str()))
                    .ok_or(bad_host("Bad Request: missing Host header\n"))?,
            };
            let allowed = self.hosts.iter().any(|(host, port)| {
                *host == authority.0 && port.is_none_or(|p| Some(p) == authority.1)
            });
            if !allowed {
                return Err(forbidden("host", "Forbidden: Host header is not allowed\n"));
            }
        }
        Ok(())
    }

    fn check_origin(&self, headers: &HeaderMap) -> Result<(), Rejection> {
        if self.origins.is_empty() {
            return Ok(());
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let parsed = origin.to_str().ok().and_then(|origin| {
            let (scheme, authority) = origin.split_once("://")?;
            let (host, port) = split_authority(authority)?;
            let scheme = scheme.to_ascii_lowercase();
            let port = port.or(match scheme.as_str() {
                "http" => Some(80),
                "https" => Some(443),
                _ => None,
            });
            Some((scheme, host, port))
        });
        let Some((scheme, host, port)) = parsed else {
            return Err(forbidden("origin", "Forbidden: Invalid Origin header\n"));
        };
        let allowed = self.origins.iter().any(|(s, h, rule)| {
            *s == scheme
                && *h == host
                && match rule {
                    PortRule::Any => true,
                    PortRule::Exact(p) => Some(*p) == port,
                }
        });
        if allowed {
            Ok(())
        } else {
            Err(forbidden(
                "origin",
                "Forbidden: Origin header is not allowed\n",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    proptest::proptest! {
        /// The JSON-RPC entry on hostile bytes: a clean verdict or a JSON-RPC error code, never a
        /// panic; any JSON object with a method is at least looked at, never refused as unparsable.
        #[test]
        fn the_json_rpc_entry_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), method in ".{0,20}", id in proptest::prelude::any::<i64>()) {
            if let Err((code, _)) = Envelope::peek(&bytes) {
                proptest::prop_assert!(code == -32700 || code == -32600, "{code}");
            }
            let message = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method});
            if let Err((code, _)) = Envelope::peek(message.to_string().as_bytes()) {
                proptest::prop_assert_ne!(code, -32700);
            }
        }

        /// Host headers of any shape are answered (allowed, 400 or 403), never a panic.
        #[test]
        fn host_checks_never_panic(host in ".{0,60}", origin in ".{0,60}") {
            let policy = OriginPolicy::new(&["localhost".to_owned(), "a.example:8080".to_owned()], &["https://a.example".to_owned()]);
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(&host) {
                headers.insert(header::HOST, value);
            }
            if let Ok(value) = HeaderValue::from_str(&origin) {
                headers.insert(header::ORIGIN, value);
            }
            let _ = policy.check(&http::Uri::from_static("/mcp"), &headers);
        }
    }

    #[test]
    fn envelopes_are_checked() {
        assert!(
            Envelope::peek(br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#)
                .expect("ok")
                .is_initialize
        );
        assert!(
            !Envelope::peek(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#)
                .expect("ok")
                .is_initialize
        );
        assert_eq!(Envelope::peek(b"{nope").expect_err("parse").0, -32700);
        assert_eq!(Envelope::peek(b"[1,").expect_err("parse").0, -32700);
        assert_eq!(Envelope::peek(b"[]").expect_err("batch").0, -32600);
        assert_eq!(Envelope::peek(b"42").expect_err("shape").0, -32600);
        assert_eq!(
            Envelope::peek(br#"{"id":1,"method":"x"}"#)
                .expect_err("version")
                .0,
            -32600
        );
        assert_eq!(
            Envelope::peek(br#"{"jsonrpc":"2.0","id":1}"#)
                .expect_err("empty")
                .0,
            -32600
        );
    }

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(host).expect("header"));
        if let Some(origin) = origin {
            headers.insert(
                header::ORIGIN,
                HeaderValue::from_str(origin).expect("header"),
            );
        }
        headers
    }

    #[test]
    fn hosts_and_origins_are_enforced() {
        let hosts = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "lb.example:8080".to_owned(),
        ];
        let origins = vec![
            "http://localhost:*".to_owned(),
            "https://app.example".to_owned(),
        ];
        let policy = OriginPolicy::new(&hosts, &origins);
        let uri = http::Uri::from_static("/mcp");
        assert!(policy.check(&uri, &headers("localhost:3000", None)).is_ok());
        assert!(policy.check(&uri, &headers("[::1]:3000", None)).is_ok());
        assert!(
            policy
                .check(&uri, &headers("lb.example:8080", None))
                .is_ok()
        );
        assert_eq!(
            policy
                .check(&uri, &headers("lb.example:9090", None))
                .map_err(|e| e.reason),
            Err("host")
        );
        assert_eq!(
            policy
                .check(&uri, &headers("evil.example.com", None))
                .map_err(|e| e.reason),
            Err("host")
        );
        assert!(
            policy
                .check(&uri, &headers("localhost", Some("http://localhost:5173")))
                .is_ok()
        );
        assert!(
            policy
                .check(&uri, &headers("localhost", Some("https://app.example")))
                .is_ok()
        );
        assert_eq!(
            policy
                .check(&uri, &headers("localhost", Some("http://evil.example.com")))
                .map_err(|e| e.reason),
            Err("origin")
        );
    }
}

/// The ids of the legacy-session requests pending on this replica: a request id must not be reused
/// within a session while its request is pending (JSON-RPC, MCP), and a second one would be
/// answered only after the first (the session's responses are matched by id). Per replica: two
/// requests with one id sent to two replicas are served by two workers, each answering on its own
/// response, so nothing waits there.
#[derive(Debug, Default)]
pub(super) struct PendingIds {
    ids: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

impl PendingIds {
    /// Records `id` as pending in `session`, or `None` when it is pending already. The id is free
    /// again when the guard drops (with the response's body).
    pub(super) fn claim(
        self: &std::sync::Arc<Self>,
        session: &str,
        id: &serde_json::Value,
    ) -> Option<PendingId> {
        let key = (session.to_owned(), id.to_string());
        let mut ids = self
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ids.insert(key.clone()).then(|| PendingId {
            ids: self.clone(),
            key,
        })
    }
}

/// A request id held pending until its response has been sent.
#[derive(Debug)]
pub(crate) struct PendingId {
    ids: std::sync::Arc<PendingIds>,
    key: (String, String),
}

impl Drop for PendingId {
    fn drop(&mut self) {
        self.ids
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
    }
}
