//! OAuth 2.1 bearer tokens (`SHOAL_AUTH=oauth`): JWT access tokens checked against the JWKS of
//! the issuers in `SHOAL_OAUTH_ISSUERS`, for the audience `SHOAL_RESOURCE_URL` (RFC 8707).
//!
//! Each issuer's `jwks_uri` comes from its metadata (RFC 8414 first, then OpenID discovery), whose
//! `issuer` must equal the configured URL. Keys are cached by `kid`; a token signed with a key the
//! cache lacks refetches the JWKS (at most once per `SHOAL_OAUTH_JWKS_REFRESH_SECS` per issuer), so
//! a rotation is picked up at its first token, without a restart. A verified token is remembered
//! by its SHA-256 until it expires, so a client's next requests cost one hash and one lookup.
//!
//! Checked on every token: a signature by a published key, with an algorithm in
//! `SHOAL_OAUTH_ALGORITHMS` matching the key; `iss` (one of the issuers), `aud` (this resource),
//! `exp` (required) and `nbf` with `SHOAL_OAUTH_LEEWAY_SECS` of skew; `typ`, when present, `at+jwt`
//! or `JWT`. Scopes come from `scope` (space-separated, RFC 9068) or `scp` (a list, as some
//! providers issue).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{Jwk, PublicKeyUse},
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use shoal_shared::config::AuthConfig;

use super::{Failure, Principal};
use crate::quota::Policy;

/// Largest metadata or JWKS document read from an issuer.
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// Verified tokens remembered at most (a full cache drops expired entries, then everything).
const TOKEN_CACHE_ENTRIES: usize = 10_000;

/// The `oauth` authenticator.
pub struct Oauth {
    issuers: Vec<Arc<Issuer>>,
    resource: String,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    verified: Mutex<HashMap<[u8; 32], (Principal, Instant)>>,
    /// Decides each principal's quota limits (by scope or claim).
    policy: Arc<Policy>,
}

/// A verification key and the algorithm its JWK names, if any.
type Key = (DecodingKey, Option<Algorithm>);

/// An issuer's keys by `kid`.
type KeySet = HashMap<String, Key>;

/// One trusted issuer and its keys.
struct Issuer {
    url: String,
    http: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    /// Held while fetching; the time of the last fetch that a token caused.
    fetch: tokio::sync::Mutex<Option<Instant>>,
    refresh: Duration,
}

#[derive(Deserialize)]
struct Unverified {
    iss: Option<String>,
}

/// The claims shoal reads from a verified token. Read from a copy of the whole claim set, which
/// quota tiers match on as it is: every claim, these included (a tier on `client_id`, `sub` or
/// `iss` must see them).
#[derive(Deserialize)]
struct Claims {
    iss: String,
    sub: Option<String>,
    client_id: Option<String>,
    exp: u64,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Metadata {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

impl Oauth {
    /// The authenticator for `config`'s issuers and `resource`.
    ///
    /// # Errors
    /// Fails when the HTTP client cannot be built.
    pub fn new(config: &AuthConfig, resource: String, policy: Arc<Policy>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.oauth_timeout_ms))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()?;
        let refresh = Duration::from_secs(config.oauth_jwks_refresh_secs);
        let issuers = config
            .oauth_issuers
            .iter()
            .map(|url| {
                Arc::new(Issuer {
                    url: url.clone(),
                    http: http.clone(),
                    keys: RwLock::default(),
                    fetch: tokio::sync::Mutex::new(None),
                    refresh,
                })
            })
            .collect();
        let algorithms = config
            .oauth_algorithms
            .iter()
            .filter_map(|name| name.parse().ok())
            .collect();
        Ok(Self {
            issuers,
            resource,
            algorithms,
            leeway: config.oauth_leeway_secs,
            verified: Mutex::default(),
            policy,
        })
    }

    /// Fetches every issuer's keys once in the background, so the first token does not wait.
    pub fn warm_up(&self, stop: tokio_util::sync::CancellationToken) {
        for issuer in &self.issuers {
            let issuer = issuer.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    result = issuer.fetch_keys() => if let Err(error) = result {
                        tracing::warn!(issuer = %issuer.url, %error, "issuer keys not loaded yet; retried at the first token");
                    }
                }
            });
        }
    }

    /// The principal of access token `token`.
    ///
    /// # Errors
    /// A [`Failure`] naming why the token is refused.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, Failure> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(principal) = self.remembered(&digest) {
            return Ok(principal);
        }
        let invalid = Failure::new("invalid_token", "the access token is not valid");
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid.clone())?;
        if !self.algorithms.contains(&header.alg) {
            return Err(Failure::new(
                "invalid_token",
                "the access token's algorithm is not accepted",
            ));
        }
        if header.typ.as_deref().is_some_and(|typ| {
            !typ.eq_ignore_ascii_case("at+jwt") && !typ.eq_ignore_ascii_case("jwt")
        }) {
            return Err(Failure::new(
                "invalid_token",
                "the token is not an access token",
            ));
        }
        // The issuer picks the keys; the signature check below proves the claim.
        let claimed = jsonwebtoken::dangerous::insecure_decode_claims::<Unverified>(token)
            .map_err(|_| invalid.clone())?;
        let issuer = claimed
            .iss
            .and_then(|iss| self.issuers.iter().find(|issuer| issuer.url == iss))
            .ok_or(Failure::new(
                "wrong_issuer",
                "the token's issuer is not trusted",
            ))?;
        let (key, key_alg) = issuer.key(header.kid.as_deref()).await?;
        if key_alg.is_some_and(|alg| alg != header.alg) {
            return Err(Failure::new(
                "invalid_token",
                "the token's algorithm does not match its key",
            ));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&issuer.url]);
        validation.set_audience(&[&self.resource]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        let all = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        )
        .map_err(|error| refusal(error.kind()))?
        .claims;
        let claims: Claims = serde_json::from_value(serde_json::Value::Object(all.clone()))
            .map_err(|_| Failure::new("invalid_token", "the token's claims are not well-formed"))?;
        let exp = claims.exp;
        let principal = principal_of(claims, &all, &self.policy)?;
        self.remember(digest, &principal, exp);
        Ok(principal)
    }

    fn remembered(&self, digest: &[u8; 32]) -> Option<Principal> {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified
            .get(digest)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(principal, _)| principal.clone())
    }

    /// Remembers a verified token until its `exp` (without the leeway).
    fn remember(&self, digest: [u8; 32], principal: &Principal, exp: u64) {
        let Some(left) = exp.checked_sub(jsonwebtoken::get_current_timestamp()) else {
            return;
        };
        let until = Instant::now() + Duration::from_secs(left);
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= TOKEN_CACHE_ENTRIES {
            let now = Instant::now();
            verified.retain(|_, (_, until)| *until > now);
            if verified.len() >= TOKEN_CACHE_ENTRIES {
                verified.clear();
            }
        }
        verified.insert(digest, (principal.clone(), until));
    }
}

fn principal_of(
    claims: Claims,
    all: &serde_json::Map<String, serde_json::Value>,
    policy: &Policy,
) -> Result<Principal, Failure> {
    let name = claims
        .sub
        .or(claims.client_id)
        .filter(|name| !name.is_empty() && name.len() <= 256)
        .ok_or(Failure::new("invalid_token", "the token names no subject"))?;
    let mut scopes: Vec<String> = claims
        .scope
        .as_deref()
        .unwrap_or_default()
        .split_ascii_whitespace()
        .map(str::to_owned)
        .collect();
    scopes.extend(claims.scp.unwrap_or_default());
    let limits = policy.limits(&scopes, Some(all), None);
    Ok(Principal::new(&claims.iss, &name, scopes).with_limits(limits))
}

/// The failure a rejected token is reported as.
fn refusal(kind: &ErrorKind) -> Failure {
    match kind {
        ErrorKind::ExpiredSignature => Failure::new("expired", "the access token has expired"),
        ErrorKind::ImmatureSignature => {
            Failure::new("invalid_token", "the access token is not valid yet")
        }
        ErrorKind::InvalidAudience => Failure::new(
            "wrong_audience",
            "the access token was not issued for this resource",
        ),
        ErrorKind::InvalidIssuer => {
            Failure::new("wrong_issuer", "the token's issuer is not trusted")
        }
        ErrorKind::MissingRequiredClaim(_) => Failure::new(
            "invalid_token",
            "the access token lacks a required claim (exp, iss, aud)",
        ),
        _ => Failure::new("invalid_token", "the access token is not valid"),
    }
}

impl Issuer {
    /// The key `kid` names, fetching the JWKS again (rate-limited) when it is not known.
    async fn key(&self, kid: Option<&str>) -> Result<Key, Failure> {
        if let Some(found) = self.lookup(kid) {
            return Ok(found);
        }
        let mut last = self.fetch.lock().await;
        // Another request may have fetched while this one waited.
        if let Some(found) = self.lookup(kid) {
            return Ok(found);
        }
        let never_loaded = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if never_loaded || last.is_none_or(|at| at.elapsed() >= self.refresh) {
            *last = Some(Instant::now());
            if let Err(error) = self.fetch_keys().await {
                tracing::warn!(issuer = %self.url, %error, "cannot fetch the issuer's keys");
                if never_loaded {
                    return Err(Failure::new(
                        "issuer_unavailable",
                        "the token's issuer cannot be reached",
                    ));
                }
            }
        }
        self.lookup(kid).ok_or(Failure::new(
            "unknown_key",
            "the access token is signed with an unknown key",
        ))
    }

    fn lookup(&self, kid: Option<&str>) -> Option<Key> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        match kid {
            Some(kid) => keys.get(kid).cloned(),
            // Without a kid only an issuer with a single key is unambiguous.
            None if keys.len() == 1 => keys.values().next().cloned(),
            None => None,
        }
    }

    /// Reads the issuer's metadata and JWKS and replaces the cached keys.
    async fn fetch_keys(&self) -> anyhow::Result<()> {
        let metadata = self.metadata().await?;
        let jwks: RawJwks = get_json(&self.http, &metadata.jwks_uri).await?;
        let mut keys = HashMap::new();
        for raw in jwks.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
                continue; // a key type this server does not verify with
            };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|alg| Algorithm::try_from(alg).ok());
            if let Ok(key) = DecodingKey::from_jwk(&jwk) {
                keys.insert(kid, (key, alg));
            }
        }
        anyhow::ensure!(!keys.is_empty(), "the JWKS holds no usable signing key");
        tracing::info!(issuer = %self.url, keys = keys.len(), "issuer keys loaded");
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(())
    }

    /// The issuer's metadata: RFC 8414 (`/.well-known/oauth-authorization-server` inserted before
    /// the issuer's path), else OpenID discovery (appended to it).
    async fn metadata(&self) -> anyhow::Result<Metadata> {
        let rfc8414 = super::well_known(&self.url, "oauth-authorization-server")
            .ok_or_else(|| anyhow::anyhow!("the issuer is not a URL"))?;
        let candidates = [
            rfc8414,
            format!(
                "{}/.well-known/openid-configuration",
                self.url.trim_end_matches('/')
            ),
        ];
        let mut last_error = None;
        for candidate in candidates {
            match get_json::<Metadata>(&self.http, &candidate).await {
                Ok(metadata) if metadata.issuer == self.url => return Ok(metadata),
                Ok(_) => anyhow::bail!("the metadata at {candidate} names another issuer"),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no metadata")))
    }
}

/// GETs a JSON document of at most [`MAX_DOCUMENT_BYTES`].
async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<T> {
    let mut response = http.get(url).send().await?.error_for_status()?;
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        anyhow::ensure!(
            body.len() + chunk.len() <= MAX_DOCUMENT_BYTES,
            "{url} answered more than {MAX_DOCUMENT_BYTES} bytes"
        );
        body.extend_from_slice(&chunk);
    }
    Ok(serde_json::from_slice(&body)?)
}
