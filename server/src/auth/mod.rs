//! Who is calling: authentication of every `/mcp` request before it reaches rmcp, and the
//! principal it yields.
//!
//! One [`Authenticator`] per replica, chosen by `SHOAL_AUTH`: [`oauth`] (bearer JWTs checked
//! against each issuer's JWKS), [`api_keys`] (static keys, stored hashed) or none (one anonymous
//! principal). The HTTP layer calls [`Authenticator::authenticate`] and answers a failure with
//! [`AuthRefusal::response`]: `401` with a `WWW-Authenticate: Bearer` challenge that points at the
//! protected resource metadata (RFC 9728, [`Authenticator::resource_metadata`]), `403
//! insufficient_scope`, or `503` when an issuer cannot be reached. The principal travels on with
//! the request (in its extensions) to the session manager, which binds each session to it.

pub mod api_keys;
pub mod oauth;

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, StatusCode, header};
use shoal_shared::config::{AuthMode, Config};

use crate::{principal::Principal, quota::Policy};

/// Why a request was refused at the door (not authenticated, or short of a scope), and how to
/// answer it. Not a failure of the server: those are [`crate::mcp::error::Failure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRefusal {
    /// Metric and log label: `missing`, `malformed`, `invalid_token`, `expired`, `unknown_key`,
    /// `wrong_issuer`, `wrong_audience`, `unknown_api_key`, `insufficient_scope`,
    /// `issuer_unavailable`.
    pub reason: &'static str,
    /// `error_description` for the client; names no secret and no internal detail.
    pub description: &'static str,
}

impl AuthRefusal {
    /// A refusal for `reason`, told to the client as `description`.
    pub const fn new(reason: &'static str, description: &'static str) -> Self {
        Self {
            reason,
            description,
        }
    }

    fn status(&self) -> StatusCode {
        match self.reason {
            "insufficient_scope" => StatusCode::FORBIDDEN,
            "issuer_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The OAuth `error` code the client is told (RFC 6750 §3), in the challenge and the body;
    /// `None` for a request that carried no credentials (it gets a bare challenge).
    pub fn error_code(&self) -> Option<&'static str> {
        match self.reason {
            "missing" => None,
            "insufficient_scope" => Some("insufficient_scope"),
            "issuer_unavailable" => Some("temporarily_unavailable"),
            _ => Some("invalid_token"),
        }
    }
}

/// The configured way of authenticating callers.
pub struct Authenticator {
    method: Method,
    /// The scopes this server knows (RFC 9728 `scopes_supported`, the `scope` of challenges).
    scopes: Vec<String>,
    /// `WWW-Authenticate` parameters every challenge carries: `resource_metadata="…"` (oauth) or
    /// `realm="shoal"` (api-keys).
    challenge_base: String,
    /// The protected resource metadata document (oauth only).
    metadata: Option<serde_json::Value>,
}

enum Method {
    None,
    ApiKeys(api_keys::ApiKeys),
    Oauth(oauth::Oauth),
}

impl Authenticator {
    /// The authenticator `config` asks for; `scopes` are the scopes the enabled toolsets define.
    /// Principals carry the quota limits of `SHOAL_QUOTA_*`, their tier and their key.
    ///
    /// # Errors
    /// Fails when the API keys file or the quota tiers file cannot be read or parsed.
    pub fn from_config(config: &Config, scopes: Vec<String>) -> anyhow::Result<Self> {
        let auth = &config.auth;
        let policy = Policy::from_config(&config.quota)?;
        // Only OAuth tokens carry claims: a tier on a claim would never match anyone else.
        if config.auth_mode() != AuthMode::Oauth
            && let Some(tier) = policy.claim_tier()
        {
            anyhow::bail!(
                "quota tier {tier} matches on a token claim, but only SHOAL_AUTH=oauth principals have claims: \
                 match it on a scope instead"
            );
        }
        let policy = Arc::new(policy);
        let (method, challenge_base, metadata) = match config.auth_mode() {
            AuthMode::None => {
                if auth.mode.is_none() {
                    tracing::warn!(
                        "SHOAL_AUTH is unset: serving without authentication, on loopback only"
                    );
                } else {
                    tracing::warn!(
                        listen = %config.http.listen,
                        "SHOAL_AUTH=none: every caller may use every tool"
                    );
                }
                (Method::None, String::new(), None)
            }
            AuthMode::ApiKeys => {
                let path = auth
                    .api_keys_file
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("SHOAL_API_KEYS_FILE is unset"))?;
                (
                    Method::ApiKeys(api_keys::ApiKeys::load(path, policy)?),
                    "realm=\"shoal\"".to_owned(),
                    None,
                )
            }
            AuthMode::Oauth => {
                let resource = auth.resource_url.clone().unwrap_or_default();
                let metadata_url = metadata_url(&resource);
                let document = serde_json::json!({
                    "resource": resource,
                    "authorization_servers": auth.oauth_issuers,
                    "scopes_supported": scopes,
                    "bearer_methods_supported": ["header"],
                    "resource_name": "shoal MCP server",
                });
                (
                    Method::Oauth(oauth::Oauth::new(auth, resource, policy)?),
                    format!("resource_metadata=\"{metadata_url}\""),
                    Some(document),
                )
            }
        };
        Ok(Self {
            method,
            scopes,
            challenge_base,
            metadata,
        })
    }

    /// Whether callers are authenticated at all (sessions are then bound to their principal).
    pub fn is_on(&self) -> bool {
        !matches!(self.method, Method::None)
    }

    /// Starts what the method runs in the background (API keys file reloads, JWKS warm-up) until
    /// `stop` fires.
    pub(crate) fn start(&self, background: &crate::background::Background) {
        match &self.method {
            Method::None => {}
            Method::ApiKeys(keys) => keys.watch(background),
            Method::Oauth(oauth) => oauth.warm_up(background),
        }
    }

    /// The caller of a request with these headers.
    ///
    /// # Errors
    /// A [`AuthRefusal`] when the request carries no credentials, bad ones, or ones that grant
    /// nothing on this server.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthRefusal> {
        let principal = match &self.method {
            Method::None => return Ok(Principal::anonymous()),
            Method::ApiKeys(keys) => keys.authenticate(bearer(headers)?)?,
            Method::Oauth(oauth) => oauth.authenticate(bearer(headers)?).await?,
        };
        if !principal.has_any(&self.scopes) {
            return Err(AuthRefusal::new(
                "insufficient_scope",
                "the token grants no scope of this server",
            ));
        }
        Ok(principal)
    }

    /// The status and `WWW-Authenticate` challenge of a failed authentication. `scope` names the
    /// scopes one operation needs; without it the challenge lists every scope of the server.
    pub fn challenge(
        &self,
        failure: &AuthRefusal,
        scope: Option<&str>,
    ) -> (StatusCode, Option<HeaderValue>) {
        let status = failure.status();
        let mut params = vec![];
        if !self.challenge_base.is_empty() {
            params.push(self.challenge_base.clone());
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return (status, None); // the issuer, not the token, is at fault
        }
        if let Some(code) = failure.error_code() {
            params.push(format!("error=\"{code}\""));
            params.push(format!("error_description=\"{}\"", failure.description));
        }
        match scope {
            Some(scope) => params.push(format!("scope=\"{scope}\"")),
            None if !self.scopes.is_empty() => {
                params.push(format!("scope=\"{}\"", self.scopes.join(" ")));
            }
            None => {}
        }
        let value = format!("Bearer {}", params.join(", "));
        (status, HeaderValue::from_str(&value).ok())
    }

    /// The protected resource metadata document (RFC 9728), in `oauth` mode.
    pub fn resource_metadata(&self) -> Option<&serde_json::Value> {
        self.metadata.as_ref()
    }
}

/// Where the metadata of `resource` is published (RFC 9728 §3.1), e.g. `https://h/mcp` →
/// `https://h/.well-known/oauth-protected-resource/mcp`.
fn metadata_url(resource: &str) -> String {
    well_known(resource, "oauth-protected-resource").unwrap_or_default()
}

/// The well-known URI `name` of `url`, inserted between its origin and its path, as RFC 8414 §3.1
/// (authorization server metadata) and RFC 9728 §3.1 (protected resource metadata) both build it.
pub(crate) fn well_known(url: &str, name: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let path = url.path().trim_end_matches('/');
    let origin = url.origin().ascii_serialization();
    Some(format!("{origin}/.well-known/{name}{path}"))
}

/// The bearer token of `Authorization`, the only place credentials are read from (never the query
/// string).
fn bearer(headers: &HeaderMap) -> Result<&str, AuthRefusal> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AuthRefusal::new("missing", "no credentials"));
    };
    let malformed = AuthRefusal::new(
        "malformed",
        "the Authorization header is not a bearer token",
    );
    if values.next().is_some() {
        return Err(malformed);
    }
    let value = value.to_str().map_err(|_| malformed.clone())?;
    let (scheme, token) = value.split_once(' ').ok_or(malformed.clone())?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.len() > 16 * 1024 {
        return Err(malformed);
    }
    Ok(token)
}

/// The scopes the enabled toolsets define: `<toolset>` (its read-only tools and resources) and
/// `<toolset>:write` (its write tools as well).
pub fn toolset_scopes(toolsets: &[&str]) -> Vec<String> {
    toolsets
        .iter()
        .flat_map(|toolset| [(*toolset).to_owned(), format!("{toolset}:write")])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(value).expect("header"),
        );
        headers
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header_only() {
        assert_eq!(bearer(&headers("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(&headers("bearer  abc ")), Ok("abc"));
        assert_eq!(
            bearer(&HeaderMap::new()).expect_err("none").reason,
            "missing"
        );
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            assert_eq!(
                bearer(&headers(bad)).expect_err(bad).reason,
                "malformed",
                "{bad}"
            );
        }
        let mut two = headers("Bearer a");
        two.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        assert_eq!(bearer(&two).expect_err("two").reason, "malformed");
    }

    #[test]
    fn metadata_lives_under_the_well_known_path_of_the_resource() {
        assert_eq!(
            metadata_url("https://mcp.example.com/mcp"),
            "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
        );
        assert_eq!(
            metadata_url("http://127.0.0.1:8080/"),
            "http://127.0.0.1:8080/.well-known/oauth-protected-resource"
        );
    }

    #[test]
    fn principals_are_namespaced_and_name_no_secret() {
        let a = Principal::new("https://issuer.example", "alice", vec![]);
        let b = Principal::new("api-key", "alice", vec![]);
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.len(), 32);
        assert_eq!(&*a.name, "alice");
        assert!(Principal::anonymous().has_any(&["kv".to_owned()]));
        assert!(!a.has_any(&["kv".to_owned()]));
    }

    #[test]
    fn write_scopes_imply_read_and_star_grants_everything() {
        let scoped = |scopes: &[&str]| {
            Principal::new(
                "api-key",
                "p",
                scopes.iter().map(|s| (*s).to_owned()).collect(),
            )
        };
        let reader = scoped(&["kv"]);
        assert!(reader.may("kv", false) && !reader.may("kv", true));
        assert!(!reader.may("kvx", false) && !reader.may("postgres", false));
        let writer = scoped(&["kv:write"]);
        assert!(writer.may("kv", false) && writer.may("kv", true));
        assert!(!scoped(&["kvx:write"]).may("kv", false));
        let all = scoped(&["*"]);
        assert!(all.may("postgres", true) && all.is_unrestricted());
        assert!(!writer.is_unrestricted());
    }
}
