//! OAuth 2.1 bearer tokens (`SHOAL_AUTH=oauth`): JWT access tokens checked against the JWKS of
//! the issuers in `SHOAL_OAUTH_ISSUERS`, for the audience `SHOAL_RESOURCE_URL` (RFC 8707).
//!
//! Each issuer's `jwks_uri` comes from its metadata (RFC 8414 first, then OpenID discovery), whose
//! `issuer` must equal the configured URL (`https://`, unless `SHOAL_OAUTH_ALLOW_HTTP`). Keys are
//! cached by `kid`; a token signed with a key the cache lacks refetches the JWKS (at most once per
//! `SHOAL_OAUTH_JWKS_REFRESH_SECS` per issuer, whether the issuer ever loaded or not), so a
//! rotation is picked up at its first token, without a restart. Each issuer's keys are also
//! fetched again on a schedule (`SHOAL_OAUTH_JWKS_MAX_AGE_SECS`, sooner when the JWKS response's
//! `Cache-Control: max-age` says so): a key the issuer removed stops verifying then, and every
//! remembered token is forgotten, so none verified by the removed key lives on. A verified token
//! is remembered by its SHA-256 until it expires, so a client's next requests cost one hash and
//! one lookup.
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

use super::{AuthRefusal, Principal};
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
    verified: Arc<Verified>,
    /// Decides each principal's quota limits (by scope or claim).
    policy: Arc<Policy>,
}

/// Verified tokens by SHA-256, with their principal and until when they are remembered.
type Verified = Mutex<HashMap<[u8; 32], (Principal, Instant)>>;

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
    /// The longest a fetched key set is trusted before it is fetched again.
    max_age: Duration,
    /// The authenticator's remembered tokens, forgotten when a key disappears.
    verified: Arc<Verified>,
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
        let max_age = Duration::from_secs(config.oauth_jwks_max_age_secs).max(refresh);
        let verified = Arc::new(Verified::default());
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
                    max_age,
                    verified: verified.clone(),
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
            verified,
            policy,
        })
    }

    /// Keeps every issuer's keys fresh in the background until `stop`: fetched at once (so the
    /// first token does not wait), then again on the issuer's schedule ([`Issuer::refresh_keys`]).
    pub(crate) fn warm_up(&self, background: &crate::background::Background) {
        for issuer in &self.issuers {
            let issuer = issuer.clone();
            let stop = background.stop.clone();
            background.spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = issuer.refresh_keys() => {}
                }
            });
        }
    }

    /// The principal of access token `token`.
    ///
    /// # Errors
    /// A [`AuthRefusal`] naming why the token is refused.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthRefusal> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(principal) = self.remembered(&digest) {
            return Ok(principal);
        }
        let invalid = AuthRefusal::new("invalid_token", "the access token is not valid");
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid.clone())?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthRefusal::new(
                "invalid_token",
                "the access token's algorithm is not accepted",
            ));
        }
        if header.typ.as_deref().is_some_and(|typ| {
            !typ.eq_ignore_ascii_case("at+jwt") && !typ.eq_ignore_ascii_case("jwt")
        }) {
            return Err(AuthRefusal::new(
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
            .ok_or(AuthRefusal::new(
                "wrong_issuer",
                "the token's issuer is not trusted",
            ))?;
        let (key, key_alg) = issuer.key(header.kid.as_deref()).await?;
        if key_alg.is_some_and(|alg| alg != header.alg) {
            return Err(AuthRefusal::new(
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
            .map_err(|_| {
                AuthRefusal::new("invalid_token", "the token's claims are not well-formed")
            })?;
        let exp = claims.exp;
        let principal = principal_of(claims, &all, &self.policy)?;
        self.remember(digest, &principal, exp, issuer, header.kid.as_deref());
        Ok(principal)
    }

    fn remembered(&self, digest: &[u8; 32]) -> Option<Principal> {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified
            .get(digest)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(principal, _)| principal.clone())
    }

    /// Remembers a verified token until its `exp` (without the leeway), if the key that verified
    /// it (`kid` of `issuer`) is still published: checked under the lock a key removal clears the
    /// remembered tokens under, so no token of a removed key is remembered after the removal.
    fn remember(
        &self,
        digest: [u8; 32],
        principal: &Principal,
        exp: u64,
        issuer: &Issuer,
        kid: Option<&str>,
    ) {
        let Some(left) = exp.checked_sub(jsonwebtoken::get_current_timestamp()) else {
            return;
        };
        let until = Instant::now() + Duration::from_secs(left);
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if issuer.lookup(kid).is_none() {
            return;
        }
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
) -> Result<Principal, AuthRefusal> {
    let name = claims
        .sub
        .or(claims.client_id)
        .filter(|name| !name.is_empty() && name.len() <= 256)
        .ok_or(AuthRefusal::new(
            "invalid_token",
            "the token names no subject",
        ))?;
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
fn refusal(kind: &ErrorKind) -> AuthRefusal {
    match kind {
        ErrorKind::ExpiredSignature => AuthRefusal::new("expired", "the access token has expired"),
        ErrorKind::ImmatureSignature => {
            AuthRefusal::new("invalid_token", "the access token is not valid yet")
        }
        ErrorKind::InvalidAudience => AuthRefusal::new(
            "wrong_audience",
            "the access token was not issued for this resource",
        ),
        ErrorKind::InvalidIssuer => {
            AuthRefusal::new("wrong_issuer", "the token's issuer is not trusted")
        }
        ErrorKind::MissingRequiredClaim(_) => AuthRefusal::new(
            "invalid_token",
            "the access token lacks a required claim (exp, iss, aud)",
        ),
        _ => AuthRefusal::new("invalid_token", "the access token is not valid"),
    }
}

impl Issuer {
    /// The key `kid` names, fetching the JWKS again (rate-limited) when it is not known.
    async fn key(&self, kid: Option<&str>) -> Result<Key, AuthRefusal> {
        if let Some(found) = self.lookup(kid) {
            return Ok(found);
        }
        let mut last = self.fetch.lock().await;
        // Another request may have fetched while this one waited.
        if let Some(found) = self.lookup(kid) {
            return Ok(found);
        }
        // Throttled whether the issuer ever loaded or not: a flood of tokens naming an issuer
        // that is down costs one fetch per interval, not one each.
        if last.is_none_or(|at| at.elapsed() >= self.refresh) {
            *last = Some(Instant::now());
            if let Err(error) = self.fetch_keys().await {
                tracing::warn!(issuer = %self.url, %error, "cannot fetch the issuer's keys");
            }
        }
        if let Some(found) = self.lookup(kid) {
            return Ok(found);
        }
        let never_loaded = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        Err(if never_loaded {
            AuthRefusal::new("issuer_unavailable", "the token's issuer cannot be reached")
        } else {
            AuthRefusal::new(
                "unknown_key",
                "the access token is signed with an unknown key",
            )
        })
    }

    /// Fetches the keys now and then again on schedule, forever: after `max_age` (or the JWKS
    /// response's `max-age`, within `refresh`..`max_age`); while it fails, again after a backoff
    /// from 1 s up to `refresh` (the keys held so far stay in use meanwhile).
    async fn refresh_keys(&self) {
        let mut backoff = Duration::from_secs(1).min(self.refresh);
        loop {
            let wait = match self.fetch_keys().await {
                Ok(max_age) => {
                    backoff = Duration::from_secs(1).min(self.refresh);
                    max_age.map_or(self.max_age, |age| age.clamp(self.refresh, self.max_age))
                }
                Err(error) => {
                    tracing::warn!(issuer = %self.url, %error, "cannot fetch the issuer's keys; trying again");
                    let wait = backoff;
                    backoff = (backoff * 2).min(self.refresh);
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
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

    /// Reads the issuer's metadata and JWKS and replaces the cached keys; returns the JWKS
    /// response's `Cache-Control: max-age`, if any. When a key held before is gone, every
    /// remembered token is forgotten (one may have been verified by it).
    async fn fetch_keys(&self) -> anyhow::Result<Option<Duration>> {
        let metadata = self.metadata().await?;
        let (jwks, max_age): (RawJwks, _) =
            get_json_with_max_age(&self.http, &metadata.jwks_uri).await?;
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
        // Swapped under the remembered tokens' lock (see `Oauth::remember`).
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        let previous = std::mem::replace(
            &mut *self.keys.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(keys.clone()),
        );
        let removed: Vec<&String> = previous
            .keys()
            .filter(|kid| !keys.contains_key(*kid))
            .collect();
        if !removed.is_empty() {
            verified.clear();
        }
        drop(verified);
        if !removed.is_empty() {
            tracing::warn!(issuer = %self.url, removed = ?removed, "the issuer stopped publishing keys: they no longer verify, remembered tokens are checked again");
        }
        if previous.len() != keys.len() || !removed.is_empty() {
            tracing::info!(issuer = %self.url, keys = keys.len(), "issuer keys loaded");
        }
        Ok(max_age)
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
    get_json_with_max_age(http, url)
        .await
        .map(|(value, _)| value)
}

/// [`get_json`], with the response's `Cache-Control: max-age` (`no-store`/`no-cache`: zero).
async fn get_json_with_max_age<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<(T, Option<Duration>)> {
    let mut response = http.get(url).send().await?.error_for_status()?;
    let max_age = response
        .headers()
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|value| value.to_str().ok())
        .and_then(max_age_of);
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        anyhow::ensure!(
            body.len() + chunk.len() <= MAX_DOCUMENT_BYTES,
            "{url} answered more than {MAX_DOCUMENT_BYTES} bytes"
        );
        body.extend_from_slice(&chunk);
    }
    Ok((serde_json::from_slice(&body)?, max_age))
}

/// The freshness a `Cache-Control` value gives: `max-age=N`, or zero for `no-store`/`no-cache`.
fn max_age_of(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|directive| {
        let directive = directive.trim().to_ascii_lowercase();
        if directive == "no-store" || directive == "no-cache" {
            return Some(Duration::ZERO);
        }
        directive
            .strip_prefix("max-age=")
            .and_then(|secs| secs.trim_matches('"').parse().ok())
            .map(Duration::from_secs)
    })
}
