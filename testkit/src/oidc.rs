//! A real OAuth 2.1 authorization server for the authentication tests: `testkit/oidc/server.mjs`,
//! built on the `oidc-provider` npm package, run with the machine's Node.js on a free loopback
//! port. It issues JWT access tokens to client-credentials clients with RFC 8707 resource
//! indicators, publishes its JWKS through its metadata, rotates its signing key on request, and
//! (for negative tests only) mints tokens with chosen claims, lifetimes and keys.
//!
//! Its packages are installed by `npm ci --prefix testkit/oidc` (`scripts/test.sh` does it).

use std::{path::PathBuf, process::Stdio, time::Duration};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::topology::{TopologyError, TopologyResult, repo_root};

/// A running test authorization server; stopped when dropped.
#[derive(Debug)]
pub struct OidcProvider {
    issuer: String,
    http: reqwest::Client,
    _child: Child,
}

/// One client of the authorization server (client-credentials grant).
#[derive(Debug, Clone)]
pub struct OidcClient {
    /// `client_id`.
    pub id: String,
    /// `client_secret`.
    pub secret: String,
    /// The scopes it may request.
    pub scopes: Vec<String>,
}

impl OidcClient {
    /// A client `id` (secret `<id>-secret`) allowed `scopes`.
    pub fn new(id: &str, scopes: &[&str]) -> Self {
        Self {
            id: id.to_owned(),
            secret: format!("{id}-secret"),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

/// The rig's directory (`testkit/oidc`).
pub fn rig_dir() -> PathBuf {
    repo_root().join("testkit").join("oidc")
}

impl OidcProvider {
    /// Starts the server for `clients`, accepting the resource indicators `resources`.
    ///
    /// # Errors
    /// When Node.js or the rig's packages are missing, or it does not come up in time.
    pub async fn start(resources: &[String], clients: &[OidcClient]) -> TopologyResult<Self> {
        let dir = rig_dir();
        if !dir.join("node_modules").join("oidc-provider").is_dir() {
            return Err(TopologyError::Broken(format!(
                "the OAuth test server's packages are not installed: run `npm ci --prefix {}`",
                dir.display()
            )));
        }
        let clients: Vec<Value> = clients
            .iter()
            .map(|c| json!({"client_id": c.id, "client_secret": c.secret, "scopes": c.scopes}))
            .collect();
        let mut child = Command::new("node")
            .arg(dir.join("server.mjs"))
            .env("PORT", "0")
            .env("RESOURCES", resources.join(","))
            .env("CLIENTS", Value::Array(clients).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| TopologyError::Spawn {
                what: "node testkit/oidc/server.mjs".into(),
                source,
            })?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| TopologyError::Broken("the OAuth test server did not start".into()))?
            .map_err(|e| TopologyError::Broken(format!("the OAuth test server: {e}")))?
            .unwrap_or_default();
        let issuer = ready
            .strip_prefix("READY ")
            .ok_or_else(|| TopologyError::Broken(format!("the OAuth test server said {ready:?}")))?
            .trim()
            .to_owned();
        // Keep reading stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| TopologyError::Broken(format!("HTTP client: {e}")))?;
        Ok(Self {
            issuer,
            http,
            _child: child,
        })
    }

    /// The issuer URL (`http://127.0.0.1:<port>`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// An access token for `client` from the token endpoint (client credentials, HTTP Basic),
    /// for `resource` with `scope`.
    ///
    /// # Errors
    /// When the server refuses (the body of its error).
    pub async fn token(
        &self,
        client: &OidcClient,
        resource: &str,
        scope: &str,
    ) -> TopologyResult<String> {
        let response = self
            .http
            .post(format!("{}/token", self.issuer))
            .basic_auth(&client.id, Some(&client.secret))
            .form(&[
                ("grant_type", "client_credentials"),
                ("resource", resource),
                ("scope", scope),
            ])
            .send()
            .await
            .map_err(|e| TopologyError::Broken(format!("token request: {e}")))?;
        let body: Value = response
            .json()
            .await
            .map_err(|e| TopologyError::Broken(format!("token response: {e}")))?;
        body["access_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| TopologyError::Broken(format!("no token: {body}")))
    }

    /// Signs with a new key (new `kid`), keeping the old ones published.
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn rotate(&self) -> TopologyResult<()> {
        self.admin("rotate", json!({})).await.map(|_| ())
    }

    /// Signs with a new key and stops publishing every older one (a compromised key removed).
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn retire_old_keys(&self) -> TopologyResult<()> {
        self.admin("rotate?retire_old=1", json!({}))
            .await
            .map(|_| ())
    }

    /// A token forged for negative tests: `claims` override the defaults (`null` removes one),
    /// `ttl` seconds from now (negative: already expired), signed with the current key or, with
    /// `unpublished`, a key the JWKS does not list.
    ///
    /// # Errors
    /// When the server does not answer.
    pub async fn mint(&self, claims: Value, ttl: i64, unpublished: bool) -> TopologyResult<String> {
        let key = if unpublished {
            "unpublished"
        } else {
            "current"
        };
        let answer = self
            .admin("mint", json!({"claims": claims, "ttl": ttl, "key": key}))
            .await?;
        answer["access_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| TopologyError::Broken(format!("mint answered {answer}")))
    }

    async fn admin(&self, action: &str, body: Value) -> TopologyResult<Value> {
        self.http
            .post(format!("{}/__admin/{action}", self.issuer))
            .json(&body)
            .send()
            .await
            .map_err(|e| TopologyError::Broken(format!("{action}: {e}")))?
            .json()
            .await
            .map_err(|e| TopologyError::Broken(format!("{action}: {e}")))
    }
}
