//! Who a caller is and what it may use: the [`Principal`] authentication decides (its id, name,
//! scopes) with the [`Limits`] its quota policy gives it. Authentication ([`crate::auth`]) builds
//! principals, the quotas ([`crate::quota`]) and the access checks read them; this module depends
//! on neither.

use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use shoal_shared::{backend::QuotaKind, config::QuotaConfig};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Stable opaque id (32 hex digits: a hash of the issuer and subject, or of the API key's
    /// principal name): what sessions record as their owner. Names no secret.
    pub id: Arc<str>,
    /// The name telemetry shows as `enduser.id`: the token's subject or the key's principal.
    pub name: Arc<str>,
    /// What the caller was granted.
    pub scopes: Arc<[String]>,
    /// What the caller may use ([`crate::quota`]).
    pub limits: Limits,
}

impl Principal {
    /// The one principal of `SHOAL_AUTH=none`: every caller, granted everything (built once;
    /// each request gets a clone of three `Arc`s).
    pub fn anonymous() -> Self {
        static ANONYMOUS: std::sync::LazyLock<Principal> = std::sync::LazyLock::new(|| Principal {
            id: Arc::from("anonymous"),
            name: Arc::from("anonymous"),
            scopes: Arc::from(vec!["*".to_owned()]),
            limits: Limits::UNLIMITED,
        });
        ANONYMOUS.clone()
    }

    /// A principal named `name` in the namespace `kind` (an issuer URL, or `api-key`), without
    /// limits until [`Principal::with_limits`].
    pub fn new(kind: &str, name: &str, scopes: Vec<String>) -> Self {
        let mut hash = Sha256::new();
        hash.update(kind.as_bytes());
        hash.update([0]);
        hash.update(name.as_bytes());
        let id = hex::encode(&hash.finalize()[..16]);
        Self {
            id: Arc::from(id),
            name: Arc::from(name),
            scopes: Arc::from(scopes),
            limits: Limits::UNLIMITED,
        }
    }

    /// The same principal with `limits`.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Whether the caller may use `toolset`: its read-only tools and resources, or with `write`
    /// its other tools too. `<toolset>:write` implies `<toolset>`; `*` grants everything.
    pub fn may(&self, toolset: &str, write: bool) -> bool {
        self.scopes.iter().any(|scope| {
            scope == "*"
                || scope
                    .strip_prefix(toolset)
                    .is_some_and(|rest| rest == ":write" || (rest.is_empty() && !write))
        })
    }

    /// Whether the caller is granted everything (`*`).
    pub fn is_unrestricted(&self) -> bool {
        self.scopes.iter().any(|scope| scope == "*")
    }

    /// Whether any of the caller's scopes is one of `supported` (or `*`).
    pub fn has_any(&self, supported: &[String]) -> bool {
        self.scopes
            .iter()
            .any(|scope| scope == "*" || supported.contains(scope))
    }
}

/// What one principal may use; 0 is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Sustained requests per second.
    pub requests_per_sec: u32,
    /// Requests at once above the rate (0: one second's worth).
    pub burst: u32,
    /// Tool calls running at once.
    pub concurrent_calls: u32,
    /// Legacy sessions open at once.
    pub sessions: u32,
    /// Long-lived streams open at once.
    pub streams: u32,
    /// The most of a replica's slots of a tool, and of each database pool, held at once, in
    /// percent (per replica; not a cluster-wide quota).
    pub share_percent: u8,
}

impl Limits {
    /// No limit at all.
    pub const UNLIMITED: Limits = Limits {
        requests_per_sec: 0,
        burst: 0,
        concurrent_calls: 0,
        sessions: 0,
        streams: 0,
        share_percent: 100,
    };

    /// The per-principal defaults of the configuration.
    pub fn defaults(config: &QuotaConfig) -> Self {
        Self {
            requests_per_sec: config.requests_per_sec,
            burst: config.burst,
            concurrent_calls: config.concurrent_calls,
            sessions: config.sessions,
            streams: config.streams,
            share_percent: config.principal_share_percent,
        }
    }

    /// The cluster-wide limits of the configuration.
    pub fn global(config: &QuotaConfig) -> Self {
        Self {
            requests_per_sec: config.global_requests_per_sec,
            burst: config.global_burst,
            concurrent_calls: config.global_concurrent_calls,
            sessions: config.global_sessions,
            streams: config.global_streams,
            share_percent: 100,
        }
    }

    /// These limits with `overrides` applied.
    pub fn with(self, overrides: &Overrides) -> Self {
        Self {
            requests_per_sec: overrides.requests_per_sec.unwrap_or(self.requests_per_sec),
            burst: overrides.burst.unwrap_or(self.burst),
            concurrent_calls: overrides.concurrent_calls.unwrap_or(self.concurrent_calls),
            sessions: overrides.sessions.unwrap_or(self.sessions),
            streams: overrides.streams.unwrap_or(self.streams),
            share_percent: overrides
                .share_percent
                .map_or(self.share_percent, |percent| percent.clamp(1, 100)),
        }
    }

    pub(crate) fn cap(&self, kind: QuotaKind) -> u32 {
        match kind {
            QuotaKind::Rate => self.requests_per_sec,
            QuotaKind::Calls => self.concurrent_calls,
            QuotaKind::Streams => self.streams,
            QuotaKind::Sessions => self.sessions,
        }
    }

    pub(crate) fn burst(&self) -> u32 {
        if self.burst == 0 {
            self.requests_per_sec
        } else {
            self.burst
        }
    }
}

/// A `quota` table (in the API keys file or a tier): the limits it sets, the others inherited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Sustained requests per second.
    pub requests_per_sec: Option<u32>,
    /// Requests at once above the rate.
    pub burst: Option<u32>,
    /// Tool calls running at once.
    pub concurrent_calls: Option<u32>,
    /// Legacy sessions open at once.
    pub sessions: Option<u32>,
    /// Long-lived streams open at once.
    pub streams: Option<u32>,
    /// Share of a replica's tool slots and database pools, in percent (1–100).
    pub share_percent: Option<u8>,
}
