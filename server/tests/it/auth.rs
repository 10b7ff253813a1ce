//! Authentication (`docs/security.md`, "Authentication"): API keys and OAuth bearer tokens from a
//! real authorization server (`oidc-provider`, started by the test kit), checked on every replica
//! behind the balancer; sessions bound to the principal that opened them.

use std::{collections::HashSet, time::Duration};

use reqwest::{StatusCode, header::HeaderValue};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shoal_testkit::{
    client::McpClient,
    oidc::{OidcClient, OidcProvider},
    topology::{Topology, TopologyError, TopologyOptions, free_port},
};

use crate::helpers::*;

pub(crate) const ALICE: &str = "alice-key-0123456789abcdef0123456789abcdef";
pub(crate) const BOB: &str = "bob-key-0123456789abcdef0123456789abcdef";
const NARROW: &str = "narrow-key-0123456789abcdef0123456789abcdef";

pub(crate) fn key_entry(principal: &str, scopes: &[&str], key: &str) -> String {
    let scopes: Vec<String> = scopes.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[[key]]\nprincipal = \"{principal}\"\nscopes = [{}]\nsha256 = \"{}\"\n\n",
        scopes.join(", "),
        hex::encode(Sha256::digest(key.as_bytes()))
    )
}

/// Three replicas behind nginx with `SHOAL_AUTH=api-keys` and the keys file `keys`.
pub(crate) async fn api_key_cluster(keys: &tempfile::NamedTempFile) -> Topology {
    start(
        cluster_options(3)
            .env("SHOAL_AUTH", "api-keys")
            .env("SHOAL_API_KEYS_FILE", keys.path().display()),
    )
    .await
}

pub(crate) fn keys_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).expect("write keys");
    file
}

pub(crate) fn as_caller(mut client: McpClient, token: &str) -> McpClient {
    client.extra_headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    client
}

pub(crate) async fn initialized(url: &str, token: &str) -> McpClient {
    let mut client = as_caller(McpClient::legacy(url), token);
    client.initialize().await.expect("initialize");
    client
}

/// A raw POST of `body` on `session` with `token` (none: no Authorization): status, headers.
pub(crate) async fn post_raw(
    url: &str,
    session: Option<&str>,
    token: Option<&str>,
    body: &Value,
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-protocol-version", "2025-11-25")
        .timeout(Duration::from_secs(10))
        .json(body);
    if let Some(session) = session {
        request = request.header("mcp-session-id", session);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("POST");
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap_or_default())
}

pub(crate) fn initialize_body() -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "auth-test", "version": "1"}}})
}

fn challenge(headers: &reqwest::header::HeaderMap) -> String {
    headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// No key, a malformed header and an unknown key are refused with a Bearer challenge, and create
/// nothing: no session record, no Redis key.
#[tokio::test]
async fn unauthenticated_requests_are_challenged_and_create_nothing() {
    let keys = keys_file(&key_entry("alice", &["kv:write"], ALICE));
    let topology = api_key_cluster(&keys).await;
    let url = topology.mcp_url();
    let before = redis_keys_with(&topology, ":sess:").await;

    let (status, headers, body) = post_raw(&url, None, None, &initialize_body()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        challenge(&headers),
        "Bearer realm=\"shoal\", scope=\"kv kv:write conformance conformance:write\""
    );
    let (status, headers, body) = post_raw(&url, None, Some(BOB), &initialize_body()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        challenge(&headers).contains("error=\"invalid_token\""),
        "{headers:?}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON")["error"],
        "invalid_token"
    );
    let response = reqwest::Client::new()
        .post(&url)
        .header("authorization", format!("Basic {ALICE}"))
        .json(&initialize_body())
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    assert_eq!(redis_keys_with(&topology, ":sess:").await, before);
    assert!(metric_sum(&topology, "shoal_auth_failures_total{reason=\"missing\"}").await >= 1.0);
    assert!(
        metric_sum(
            &topology,
            "shoal_auth_failures_total{reason=\"unknown_api_key\"}"
        )
        .await
            >= 1.0
    );
    assert!(metric_sum(&topology, "shoal_session_creates_total").await == 0.0);

    // The right key opens a session, which works on every replica.
    let alice = initialized(&url, ALICE).await;
    let mut served = HashSet::new();
    for n in 0..6 {
        let exchange = call_ok(
            &alice,
            "kv_set",
            json!({"key": format!("a{n}"), "value": "x"}),
        )
        .await;
        served.insert(replica_of(&exchange.headers));
    }
    assert_eq!(served.len(), 3, "{served:?}");
}

/// A key whose scopes grant nothing on this server gets 403 insufficient_scope.
#[tokio::test]
async fn a_key_without_a_scope_of_this_server_is_forbidden() {
    let keys = keys_file(&key_entry("narrow", &["billing"], NARROW));
    let topology = api_key_cluster(&keys).await;
    let (status, headers, _) =
        post_raw(&topology.mcp_url(), None, Some(NARROW), &initialize_body()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let challenge = challenge(&headers);
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert!(challenge.contains("scope=\"kv kv:write"), "{challenge}");
}

/// Another principal cannot use a session, on any replica: POST, GET, a GET resume, a response
/// to a server request (as a forwarded sampling answer would be), a cancellation and DELETE are
/// all refused as for an unknown session, and the owner's session is untouched.
#[tokio::test]
async fn a_session_is_used_only_by_its_principal_on_every_replica() {
    let keys = keys_file(&format!(
        "{}{}",
        key_entry("alice", &["kv:write"], ALICE),
        key_entry("bob", &["kv:write"], BOB)
    ));
    let topology = api_key_cluster(&keys).await;
    let url = topology.mcp_url();
    let alice = initialized(&url, ALICE).await;
    let session = alice.session_id().expect("session").to_owned();
    call_ok(&alice, "kv_set", json!({"key": "mine", "value": "secret"})).await;

    let mut bob = as_caller(McpClient::legacy(&url), BOB);
    bob.set_session_id(Some(session.clone()));
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "kv_get", "arguments": {"key": "mine"}}});
    let answer = json!({"jsonrpc": "2.0", "id": 3, "result": {"role": "assistant",
        "content": {"type": "text", "text": "x"}, "model": "m"}});
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": 7}});
    let mut refused_on = HashSet::new();
    for _ in 0..3 {
        for body in [&call, &answer, &cancel] {
            let (status, headers, text) = post_raw(&url, Some(&session), Some(BOB), body).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{body}: {text}");
            assert!(!text.contains("secret"));
            refused_on.insert(replica_of(&headers));
        }
        let stream = bob.open_get(None).await.expect("GET");
        assert_eq!(stream.status, StatusCode::NOT_FOUND);
        refused_on.insert(replica_of(&stream.headers));
        let resumed = bob
            .open_get(Some(&format!("{session}/0-1")))
            .await
            .expect("GET resume");
        assert_eq!(resumed.status, StatusCode::NOT_FOUND);
        assert_eq!(bob.delete().await.expect("DELETE"), StatusCode::NOT_FOUND);
    }
    assert_eq!(refused_on.len(), 3, "every replica refused: {refused_on:?}");
    assert!(
        metric_sum(
            &topology,
            "shoal_auth_failures_total{reason=\"foreign_session\"}"
        )
        .await
            >= 15.0
    );

    // The owner's session is intact everywhere.
    for _ in 0..3 {
        let exchange = call_ok(&alice, "kv_get", json!({"key": "mine"})).await;
        assert_eq!(text_of(exchange.result().expect("result")), "secret");
    }
    assert_eq!(
        alice.delete().await.expect("DELETE"),
        StatusCode::NO_CONTENT
    );
}

/// The keys file is re-read when it changes: a new key works and a removed key stops working on
/// every replica, without a restart.
#[tokio::test]
async fn api_keys_rotate_by_editing_the_file() {
    let keys = keys_file(&key_entry("alice", &["kv:write"], ALICE));
    let topology = api_key_cluster(&keys).await;
    let url = topology.mcp_url();
    initialized(&url, ALICE).await;

    std::fs::write(keys.path(), key_entry("alice", &["kv:write"], BOB)).expect("rewrite keys");
    for replica in &topology.replicas {
        let at = replica.mcp_url();
        eventually(
            "the new key is accepted",
            Duration::from_secs(10),
            async || {
                (post_raw(&at, None, Some(BOB), &initialize_body()).await.0 == StatusCode::OK)
                    .then_some(())
            },
        )
        .await;
        let (status, _, _) = post_raw(&at, None, Some(ALICE), &initialize_body()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "the old key is gone");
    }
}

// ---------------------------------------------------------------------------------------------
// OAuth

struct OauthCluster {
    topology: Topology,
    provider: OidcProvider,
    resource: String,
    client: OidcClient,
}

async fn oauth_cluster(extra: &[(&str, &str)]) -> OauthCluster {
    // The balancer's port is chosen before it binds (the resource URL names it, and the
    // authorization server must know it first): another test may take that port meanwhile, so a
    // taken port means starting over on another one.
    for _ in 0..5 {
        let port = free_port();
        let resource = format!("http://127.0.0.1:{port}/mcp");
        let client = OidcClient::new("shoal-test", &["kv", "kv:write", "compute"]);
        let other = OidcClient::new("no-scope", &["billing"]);
        let provider = OidcProvider::start(
            &[resource.clone(), "http://127.0.0.1:1/elsewhere".to_owned()],
            &[client.clone(), other],
        )
        .await
        .expect("start the OAuth test server");
        let mut options: TopologyOptions = cluster_options(3)
            .env("SHOAL_AUTH", "oauth")
            .env("SHOAL_OAUTH_ISSUERS", provider.issuer())
            // The test issuer serves plain HTTP on loopback.
            .env("SHOAL_OAUTH_ALLOW_HTTP", "true")
            .env("SHOAL_RESOURCE_URL", &resource)
            .env("SHOAL_OAUTH_LEEWAY_SECS", "5");
        for (key, value) in extra {
            options = options.env(key, value);
        }
        options.balancer_port = Some(port);
        match Topology::start(options).await {
            Ok(topology) => {
                return OauthCluster {
                    topology,
                    provider,
                    resource,
                    client,
                };
            }
            Err(TopologyError::PortInUse { .. }) => continue,
            Err(error) => panic!("cannot start the test topology: {error}"),
        }
    }
    panic!("no free balancer port in five tries");
}

/// Discovery as MCP clients do it: a 401 naming the metadata document, the document at both
/// well-known paths naming the issuer and the scopes, then a token for this resource works on
/// every replica.
#[tokio::test]
async fn oauth_discovery_then_a_token_works_on_every_replica() {
    let cluster = oauth_cluster(&[]).await;
    let url = cluster.topology.mcp_url();
    let base = url.trim_end_matches("/mcp");
    let (status, headers, _) = post_raw(&url, None, None, &initialize_body()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let metadata_url = format!("{base}/.well-known/oauth-protected-resource/mcp");
    assert_eq!(
        challenge(&headers),
        format!(
            "Bearer resource_metadata=\"{metadata_url}\", scope=\"kv kv:write conformance conformance:write\""
        )
    );
    for path in [
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
    ] {
        let document: Value = reqwest::get(format!("{base}{path}"))
            .await
            .expect("metadata")
            .json()
            .await
            .expect("JSON");
        assert_eq!(document["resource"], cluster.resource.as_str());
        assert_eq!(
            document["authorization_servers"],
            json!([cluster.provider.issuer()])
        );
        assert_eq!(document["bearer_methods_supported"], json!(["header"]));
        assert_eq!(
            document["scopes_supported"],
            json!(["kv", "kv:write", "conformance", "conformance:write"])
        );
    }

    let token = cluster
        .provider
        .token(&cluster.client, &cluster.resource, "kv kv:write")
        .await
        .expect("token");
    let client = initialized(&url, &token).await;
    let mut served = HashSet::new();
    for n in 0..6 {
        let exchange = call_ok(
            &client,
            "kv_set",
            json!({"key": format!("o{n}"), "value": "v"}),
        )
        .await;
        served.insert(replica_of(&exchange.headers));
    }
    assert_eq!(served.len(), 3, "{served:?}");
}

/// Tokens refused with 401 invalid_token: expired, for another audience, from an untrusted
/// issuer, without an audience, and signed by a key the issuer never published; a token whose
/// scopes grant nothing here gets 403 insufficient_scope.
#[tokio::test]
async fn oauth_refuses_bad_tokens() {
    let cluster = oauth_cluster(&[]).await;
    let url = cluster.topology.mcp_url();
    let provider = &cluster.provider;
    let resource = cluster.resource.as_str();
    let cases = [
        (
            "expired",
            provider.mint(json!({"aud": resource}), -120, false).await,
            "expired",
        ),
        (
            "wrong audience",
            provider
                .mint(json!({"aud": "http://127.0.0.1:1/elsewhere"}), 300, false)
                .await,
            "wrong_audience",
        ),
        (
            "wrong issuer",
            provider
                .mint(
                    json!({"aud": resource, "iss": "http://127.0.0.1:1"}),
                    300,
                    false,
                )
                .await,
            "wrong_issuer",
        ),
        (
            "no audience",
            provider.mint(json!({"aud": null}), 300, false).await,
            "invalid_token",
        ),
        (
            "unpublished key",
            provider.mint(json!({"aud": resource}), 300, true).await,
            "unknown_key",
        ),
    ];
    for (what, token, reason) in cases {
        let token = token.expect("mint");
        let (status, headers, body) = post_raw(&url, None, Some(&token), &initialize_body()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        let challenge = challenge(&headers);
        assert!(
            challenge.contains("error=\"invalid_token\""),
            "{what}: {challenge}"
        );
        assert!(
            challenge.contains("resource_metadata="),
            "{what}: {challenge}"
        );
        assert!(
            metric_sum(
                &cluster.topology,
                &format!("shoal_auth_failures_total{{reason=\"{reason}\"}}")
            )
            .await
                >= 1.0,
            "{what} counted as {reason}"
        );
    }
    // The real token endpoint refuses another audience itself; a valid token of a client with no
    // scope of this server is forbidden.
    let other = OidcClient::new("no-scope", &["billing"]);
    let token = provider
        .token(&other, resource, "billing")
        .await
        .expect("token");
    let (status, headers, _) = post_raw(&url, None, Some(&token), &initialize_body()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(challenge(&headers).contains("error=\"insufficient_scope\""));
    // A good token from the same issuer still works.
    let token = provider
        .token(&cluster.client, resource, "kv")
        .await
        .expect("token");
    let (status, _, body) = post_raw(&url, None, Some(&token), &initialize_body()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// A signing key rotation at the issuer is picked up at the first token signed with the new key,
/// on every replica, without a restart; tokens of the old key stay valid while it is published.
#[tokio::test]
async fn oauth_follows_a_key_rotation() {
    let cluster = oauth_cluster(&[]).await;
    let provider = &cluster.provider;
    let resource = cluster.resource.as_str();
    let old = provider
        .token(&cluster.client, resource, "kv")
        .await
        .expect("token");
    for replica in &cluster.topology.replicas {
        let (status, _, _) =
            post_raw(&replica.mcp_url(), None, Some(&old), &initialize_body()).await;
        assert_eq!(status, StatusCode::OK);
    }
    provider.rotate().await.expect("rotate");
    let new = provider
        .token(&cluster.client, resource, "kv")
        .await
        .expect("token");
    assert_ne!(
        kid_of(&old),
        kid_of(&new),
        "the issuer signs with a new key"
    );
    for replica in &cluster.topology.replicas {
        let at = replica.mcp_url();
        let (status, _, body) = post_raw(&at, None, Some(&new), &initialize_body()).await;
        assert_eq!(status, StatusCode::OK, "{}: {body}", replica.name);
        let (status, _, _) = post_raw(&at, None, Some(&old), &initialize_body()).await;
        assert_eq!(status, StatusCode::OK, "the old key is still published");
    }
}

/// Two clients of one issuer are two principals: one cannot use the other's session.
#[tokio::test]
async fn oauth_sessions_are_bound_to_the_token_subject() {
    let cluster = oauth_cluster(&[]).await;
    let url = cluster.topology.mcp_url();
    let resource = cluster.resource.as_str();
    let token = cluster
        .provider
        .token(&cluster.client, resource, "kv")
        .await
        .expect("token");
    let owner = initialized(&url, &token).await;
    let session = owner.session_id().expect("session").to_owned();
    let intruder = cluster
        .provider
        .mint(json!({"aud": resource, "sub": "someone-else", "client_id": "someone-else", "scope": "kv"}), 300, false)
        .await
        .expect("mint");
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    for _ in 0..3 {
        let (status, _, _) = post_raw(&url, Some(&session), Some(&intruder), &list).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, body) = post_raw(&url, Some(&session), Some(&token), &list).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

fn kid_of(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().expect("header");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .expect("base64url");
    serde_json::from_slice::<Value>(&bytes).expect("JSON")["kid"]
        .as_str()
        .expect("kid")
        .to_owned()
}

/// The official TypeScript SDK's client-credentials client, started without a token, completes
/// discovery (401 → protected resource metadata → authorization server metadata), gets a token
/// for this resource and runs a session through the balancer in front of three replicas.
#[tokio::test]
async fn the_typescript_sdk_client_discovers_authenticates_and_calls_tools() {
    let cluster = oauth_cluster(&[]).await;
    let url = cluster.topology.mcp_url();
    let script = shoal_testkit::oidc::rig_dir().join("sdk-client.mjs");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("node")
            .arg(&script)
            .args([
                url.as_str(),
                cluster.client.id.as_str(),
                cluster.client.secret.as_str(),
                "kv kv:write",
                cluster.provider.issuer(),
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the SDK client finished in time")
    .expect("node runs");
    assert!(
        output.status.success(),
        "SDK client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    let requests: Vec<&str> = report["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let base = url.trim_end_matches("/mcp");
    let issuer = cluster.provider.issuer();
    let position = |wanted: &str| {
        requests
            .iter()
            .position(|line| *line == wanted)
            .unwrap_or_else(|| panic!("no {wanted:?} in {requests:#?}"))
    };
    let challenged = position(&format!("POST {url} -> 401"));
    let metadata = position(&format!(
        "GET {base}/.well-known/oauth-protected-resource/mcp -> 200"
    ));
    let token = position(&format!("POST {issuer}/token -> 200"));
    let served = position(&format!("POST {url} -> 200"));
    // The session ends with 204 No Content (the Python SDK accepts only 200 or 204).
    let ended = position(&format!("DELETE {url} -> 204"));
    assert!(
        challenged < metadata && metadata < token && token < served && served < ended,
        "{requests:#?}"
    );
    assert!(
        report["listed"]
            .as_array()
            .expect("tools")
            .contains(&json!("kv_get"))
    );
    assert_eq!(report["written"], "through the SDK");
    assert!(metric_sum(&cluster.topology, "shoal_session_restores_total").await >= 1.0);
}

/// What a principal sees and may call follows its scopes: `kv` lists and calls the read-only kv
/// tools only (a write is 403 `insufficient_scope` naming `kv:write`, on every replica), sees no
/// conformance tool, resource or prompt and cannot read one; `kv:write` adds the write tools; `*`
/// sees everything, listed as public where filtered lists are private.
#[tokio::test]
async fn what_a_principal_lists_and_calls_follows_its_scopes() {
    const READER: &str = "reader-key-0123456789abcdef0123456789abcdef";
    const WRITER: &str = "writer-key-0123456789abcdef0123456789abcdef";
    const ADMIN: &str = "admin-key-0123456789abcdef0123456789abcdef";
    let keys = keys_file(&format!(
        "{}{}{}",
        key_entry("reader", &["kv"], READER),
        key_entry("writer", &["kv:write"], WRITER),
        key_entry("admin", &["*"], ADMIN)
    ));
    let topology = api_key_cluster(&keys).await;
    let url = topology.mcp_url();
    let tools_of = async |key: &str| {
        let client = initialized(&url, key).await;
        let exchange = client
            .request("tools/list", json!({}))
            .await
            .expect("tools/list");
        let result = exchange.result().expect("result").clone();
        let names: HashSet<String> = result["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .filter_map(|tool| tool["name"].as_str().map(str::to_owned))
            .collect();
        (client, names, result["cacheScope"].clone())
    };
    let (reader, read_tools, read_scope) = tools_of(READER).await;
    let (writer, write_tools, _) = tools_of(WRITER).await;
    let (admin, all_tools, all_scope) = tools_of(ADMIN).await;
    assert!(
        read_tools.contains("kv_get") && !read_tools.contains("kv_set"),
        "{read_tools:?}"
    );
    assert!(
        !read_tools.iter().any(|t| t.starts_with("test_")),
        "{read_tools:?}"
    );
    assert!(write_tools.contains("kv_set") && write_tools.contains("kv_get"));
    assert!(write_tools.is_subset(&all_tools) && write_tools.len() < all_tools.len());
    assert!(
        all_tools.iter().any(|t| t.starts_with("test_")),
        "{all_tools:?}"
    );
    assert_eq!(read_scope, json!("private"));
    assert_eq!(all_scope, json!("public"));

    // A write by the reader is refused before it runs, on every replica, naming the scope it needs.
    let session = reader.session_id().expect("session").to_owned();
    let set = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "kv_set", "arguments": {"key": "k", "value": "reader"}}});
    let mut refused_on = HashSet::new();
    for _ in 0..3 {
        let (status, headers, body) = post_raw(&url, Some(&session), Some(READER), &set).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(
            challenge(&headers).contains("error=\"insufficient_scope\"")
                && challenge(&headers).contains("scope=\"kv:write\""),
            "{headers:?}"
        );
        refused_on.insert(replica_of(&headers));
    }
    assert_eq!(refused_on.len(), 3, "{refused_on:?}");
    call_ok(&writer, "kv_set", json!({"key": "k", "value": "writer"})).await;
    let read = call_ok(&reader, "kv_get", json!({"key": "k"})).await;
    assert_eq!(
        text_of(read.result().expect("result")),
        "writer",
        "the reader's write never ran"
    );

    // Resources and prompts of a toolset outside the grants do not exist for the caller.
    let uris = async |client: &McpClient| -> Vec<String> {
        let exchange = client
            .request("resources/list", json!({}))
            .await
            .expect("list");
        exchange.result().expect("result")["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .filter_map(|r| r["uri"].as_str().map(str::to_owned))
            .collect()
    };
    let reader_uris = uris(&reader).await;
    assert!(
        reader_uris.contains(&"kv://k".to_owned()),
        "{reader_uris:?}"
    );
    assert!(
        !reader_uris.iter().any(|u| u.starts_with("test://")),
        "{reader_uris:?}"
    );
    assert!(uris(&admin).await.iter().any(|u| u.starts_with("test://")));
    let static_text = json!({"uri": "test://static-text"});
    let refused = reader
        .request("resources/read", static_text.clone())
        .await
        .expect("read");
    assert!(
        refused.response().expect("response").get("error").is_some(),
        "{refused:?}"
    );
    let allowed = admin
        .request("resources/read", static_text)
        .await
        .expect("read");
    allowed.result().expect("the admin reads it");
    let prompts = reader
        .request("prompts/list", json!({}))
        .await
        .expect("prompts");
    assert_eq!(prompts.result().expect("result")["prompts"], json!([]));

    // A listen stream follows only what the caller may read: one naming a resource outside the
    // grants is refused with the scope it needs; the caller's own resources are followed.
    let modern = |key: &str| McpClient::modern(&url).with_bearer(Some(key));
    let (_, refused) = modern(READER)
        .open_request(
            "subscriptions/listen",
            listen_params_for(&["kv://k", "test://watched-resource"]),
        )
        .await
        .expect("listen");
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let challenged = challenge(&refused.headers);
    assert!(
        challenged.contains("insufficient_scope") && challenged.contains("scope=\"conformance\""),
        "{challenged}"
    );
    let (_, mut followed) = modern(READER)
        .open_request("subscriptions/listen", listen_params_for(&["kv://k"]))
        .await
        .expect("listen");
    assert_eq!(followed.status, StatusCode::OK);
    acknowledged(&mut followed).await;
    call_ok(&writer, "kv_set", json!({"key": "k", "value": "again"})).await;
    next_matching(&mut followed, "the update of kv://k", |m| {
        is_update_of(m, "kv://k")
    })
    .await;
    let (_, mut everything) = modern(ADMIN)
        .open_request(
            "subscriptions/listen",
            listen_params_for(&["test://watched-resource"]),
        )
        .await
        .expect("listen");
    acknowledged(&mut everything).await;
}

fn listen_params_for(uris: &[&str]) -> Value {
    json!({"notifications": {"resourceSubscriptions": uris}})
}

/// An MRTR `requestState` is bound to the principal it was issued to: another principal's retry
/// with it is refused as a forged state (-32602), the issuer's own retry completes, on any replica.
#[tokio::test]
async fn request_state_is_bound_to_its_principal() {
    let keys = keys_file(&format!(
        "{}{}",
        key_entry("alice", &["*"], ALICE),
        key_entry("bob", &["*"], BOB)
    ));
    let topology = api_key_cluster(&keys).await;
    let url = topology.mcp_url();
    let alice = McpClient::modern(&url).with_bearer(Some(ALICE));
    let bob = McpClient::modern(&url).with_bearer(Some(BOB));
    const TOOL: &str = "test_input_required_result_request_state";
    let first = alice
        .request("tools/call", json!({"name": TOOL, "arguments": {}}))
        .await
        .expect("tools/call");
    let state = first.result().expect("result")["requestState"]
        .as_str()
        .expect("a requestState")
        .to_owned();
    let retry = json!({"name": TOOL, "arguments": {},
        "inputResponses": {"confirm": {"action": "accept", "content": {"ok": true}}},
        "requestState": state});
    for _ in 0..3 {
        let stolen = bob
            .request("tools/call", retry.clone())
            .await
            .expect("tools/call");
        let error = &stolen.response().expect("response")["error"];
        assert_eq!(error["code"], -32602, "{stolen:?}");
    }
    let resumed = alice
        .request("tools/call", retry)
        .await
        .expect("tools/call");
    assert_eq!(
        text_of(resumed.result().expect("alice resumes")),
        "state-ok: confirmed=true"
    );
}

/// Second review, finding 5: a quota tier may match on any claim of the token, the ones shoal
/// reads itself (`client_id`, `sub`, `iss`, `scope`…) included: a restrictive tier for one client
/// holds, and leaves the others alone.
#[tokio::test]
async fn quota_tiers_match_on_every_claim_of_the_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tiers = dir.path().join("tiers.toml");
    std::fs::write(
        &tiers,
        "[[tier]]\nname = \"untrusted\"\nclaim = \"client_id\"\nvalue = \"shoal-test\"\n\
         quota = { requests_per_sec = 1, burst = 1 }\n",
    )
    .expect("tiers file");
    let tiers = tiers.to_str().expect("UTF-8 path");
    let cluster = oauth_cluster(&[("SHOAL_QUOTA_TIERS_FILE", tiers)]).await;
    let url = cluster.topology.mcp_url();
    let token = cluster
        .provider
        .token(&cluster.client, &cluster.resource, "kv")
        .await
        .expect("token");
    let (first, _, body) = post_raw(&url, None, Some(&token), &initialize_body()).await;
    assert_eq!(first, StatusCode::OK, "{body}");
    let (second, headers, body) = post_raw(&url, None, Some(&token), &initialize_body()).await;
    assert_eq!(
        second,
        StatusCode::TOO_MANY_REQUESTS,
        "the tier holds: {body}"
    );
    assert!(headers.get("retry-after").is_some());
    let other = cluster
        .provider
        .mint(
            json!({"client_id": "another-client", "sub": "another"}),
            300,
            false,
        )
        .await
        .expect("mint");
    for _ in 0..3 {
        let (status, _, body) = post_raw(&url, None, Some(&other), &initialize_body()).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "another client is not in the tier: {body}"
        );
    }
}

/// Second review, finding 6: keys are fetched again on a schedule, so a key the issuer stopped
/// publishing (a compromised one, removed) stops verifying without a token naming a new key, and a
/// token it verified is no longer accepted from the replicas' memory of verified tokens.
#[tokio::test]
async fn oauth_stops_accepting_a_key_the_issuer_removed() {
    let cluster = oauth_cluster(&[
        ("SHOAL_OAUTH_JWKS_MAX_AGE_SECS", "2"),
        ("SHOAL_OAUTH_JWKS_REFRESH_SECS", "1"),
    ])
    .await;
    let provider = &cluster.provider;
    let resource = cluster.resource.as_str();
    let old = provider
        .token(&cluster.client, resource, "kv")
        .await
        .expect("token");
    for replica in &cluster.topology.replicas {
        let (status, _, _) =
            post_raw(&replica.mcp_url(), None, Some(&old), &initialize_body()).await;
        assert_eq!(status, StatusCode::OK, "remembered by {}", replica.name);
    }
    provider.retire_old_keys().await.expect("retire");
    // Only the schedule can tell the replicas: no token names the new key yet.
    for replica in &cluster.topology.replicas {
        let at = replica.mcp_url();
        eventually("the removed key to stop verifying", WAIT, async || {
            let (status, _, _) = post_raw(&at, None, Some(&old), &initialize_body()).await;
            (status == StatusCode::UNAUTHORIZED).then_some(())
        })
        .await;
    }
    let new = provider
        .token(&cluster.client, resource, "kv")
        .await
        .expect("token");
    for replica in &cluster.topology.replicas {
        let (status, _, body) =
            post_raw(&replica.mcp_url(), None, Some(&new), &initialize_body()).await;
        assert_eq!(status, StatusCode::OK, "{}: {body}", replica.name);
    }
}

/// Second review, finding 6: an `http://` issuer is refused at start unless allowed explicitly
/// (its keys could be replaced by anyone on the path).
#[tokio::test]
async fn an_http_issuer_is_refused_unless_allowed() {
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(server_bin())
            .env_clear()
            .env("SHOAL_LISTEN", "127.0.0.1:0")
            .env("SHOAL_AUTH", "oauth")
            .env("SHOAL_OAUTH_ISSUERS", "http://127.0.0.1:9/")
            .env("SHOAL_RESOURCE_URL", "http://127.0.0.1:8080/mcp")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the replica exits at once")
    .expect("runs");
    assert!(!output.status.success());
    let printed = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("SHOAL_OAUTH_ISSUERS") && printed.contains("SHOAL_OAUTH_ALLOW_HTTP"),
        "{printed}"
    );
}
