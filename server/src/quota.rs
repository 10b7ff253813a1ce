//! Quotas: how much one principal, and everyone together, may use of the cluster.
//!
//! Every decision is made in the shared state ([`Backend::quota_admit`]: one script per subject,
//! the principal's then the cluster-wide one, all or nothing), so a quota holds across replicas, survives a replica's restart and is the same whichever replica a balancer
//! picks. Four kinds, each per principal and cluster-wide (`SHOAL_QUOTA_*`, 0 = unlimited):
//!
//! - **requests per second with a burst**, on every `/mcp` request (GCRA on Redis's clock);
//! - **concurrent tool calls** and **open streams** (GET streams and `subscriptions/listen`): a
//!   lease per call or stream, renewed by the replica holding it and dropped when it ends, so the
//!   leases of a replica that dies lapse within [`LEASE`];
//! - **open sessions** (legacy era): a reservation at `initialize`, bound to the session it
//!   creates, dropped at DELETE, and noticed gone within
//!   [`shoal_shared::backend::SESSION_RECHECK`] of an idle expiry.
//!
//! A principal's limits are decided when it is authenticated ([`Policy::limits`]): its API key's
//! own `quota` table, else the first tier of `SHOAL_QUOTA_TIERS_FILE` it matches (by scope, or by
//! a token claim), else the defaults. The anonymous principal of `SHOAL_AUTH=none` (every caller
//! at once) has no per-principal limits; the cluster-wide ones apply to it.
//!
//! Over a quota the HTTP layer answers `429 Too Many Requests` with `Retry-After` and a JSON-RPC
//! error naming the quota ([`Refusal`]); when the shared state cannot decide, `503` (quotas fail
//! closed).

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::Deserialize;
use shoal_shared::{
    backend::{Backend, QUOTA_CLUSTER, QuotaCheck, QuotaKind, QuotaRefusal},
    config::QuotaConfig,
    metrics::Metrics,
};

use crate::principal::{Limits, Overrides, Principal};

/// How long a call or stream lease lasts unless its replica renews it (every third of it).
pub const LEASE: Duration = Duration::from_secs(60);

/// A quota tier: who it applies to and the limits it sets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tier {
    /// A label for logs.
    #[serde(default)]
    name: Option<String>,
    /// Applies to principals granted this scope.
    #[serde(default)]
    scope: Option<String>,
    /// Applies to token holders whose claim `claim` is (or, for a list, contains) `value`.
    #[serde(default)]
    claim: Option<String>,
    #[serde(default)]
    value: Option<String>,
    quota: Overrides,
}

impl Tier {
    /// How logs and errors name the tier at `index`.
    fn label(&self, index: usize) -> String {
        format!(
            "{} ({})",
            index + 1,
            self.name.as_deref().unwrap_or("unnamed")
        )
    }

    fn matches(
        &self,
        scopes: &[String],
        claims: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> bool {
        if let Some(scope) = &self.scope {
            return scopes.iter().any(|held| held == scope);
        }
        let (Some(claim), Some(value), Some(claims)) = (&self.claim, &self.value, claims) else {
            return false;
        };
        let same = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s == value,
            serde_json::Value::Bool(b) => value.parse::<bool>() == Ok(*b),
            serde_json::Value::Number(n) => {
                value.parse::<serde_json::Number>().ok().as_ref() == Some(n)
            }
            _ => false,
        };
        match claims.get(claim) {
            Some(serde_json::Value::Array(items)) => items.iter().any(same),
            Some(other) => same(other),
            None => false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TiersFile {
    #[serde(default)]
    tier: Vec<Tier>,
}

/// How a principal's limits are decided: defaults and tiers.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    defaults: Limits,
    tiers: Vec<Tier>,
}

impl Policy {
    /// The policy of `config`, reading `SHOAL_QUOTA_TIERS_FILE` when set.
    ///
    /// # Errors
    /// When the tiers file cannot be read or is not valid.
    pub fn from_config(config: &QuotaConfig) -> anyhow::Result<Self> {
        let tiers = match &config.tiers_file {
            Some(path) => read_tiers(path)?,
            None => vec![],
        };
        Ok(Self {
            defaults: Limits::defaults(config),
            tiers,
        })
    }

    /// The name of the first tier that matches on a token claim, if any.
    pub fn claim_tier(&self) -> Option<String> {
        self.tiers
            .iter()
            .enumerate()
            .find(|(_, tier)| tier.claim.is_some())
            .map(|(index, tier)| tier.label(index))
    }

    /// The limits of a principal granted `scopes`, with token `claims` (OAuth) and its API key's
    /// own `quota` table: the key's table over the first matching tier over the defaults.
    pub fn limits(
        &self,
        scopes: &[String],
        claims: Option<&serde_json::Map<String, serde_json::Value>>,
        own: Option<&Overrides>,
    ) -> Limits {
        let tiered = match self.tiers.iter().find(|tier| tier.matches(scopes, claims)) {
            Some(tier) => self.defaults.with(&tier.quota),
            None => self.defaults,
        };
        match own {
            Some(own) => tiered.with(own),
            None => tiered,
        }
    }
}

fn read_tiers(path: &Path) -> anyhow::Result<Vec<Tier>> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))?;
    let file: TiersFile = toml::from_str(&text)
        .map_err(|error| anyhow::anyhow!("invalid quota tiers file {}: {error}", path.display()))?;
    for (index, tier) in file.tier.iter().enumerate() {
        let by_scope = tier.scope.is_some();
        let by_claim = tier.claim.is_some() && tier.value.is_some();
        if by_scope == by_claim || (tier.claim.is_some() != tier.value.is_some()) {
            anyhow::bail!(
                "invalid quota tiers file {}: tier {} needs either `scope`, or `claim` and `value`",
                path.display(),
                tier.label(index),
            );
        }
        if tier
            .claim
            .as_deref()
            .is_some_and(|claim| claim.trim().is_empty())
        {
            anyhow::bail!(
                "invalid quota tiers file {}: tier {} names an empty claim",
                path.display(),
                tier.label(index),
            );
        }
    }
    tracing::info!(tiers = file.tier.len(), path = %path.display(), "quota tiers loaded");
    Ok(file.tier)
}

/// What a request asks of the quotas besides its rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demand {
    /// A request and nothing more.
    Request,
    /// A `tools/call` (holds a concurrent-call lease while it runs).
    ToolCall,
    /// A GET stream or a `subscriptions/listen` (holds a stream lease while open).
    Stream,
    /// A legacy `initialize` (reserves a session).
    Session,
}

impl Demand {
    fn cap(self) -> Option<QuotaKind> {
        match self {
            Demand::Request => None,
            Demand::ToolCall => Some(QuotaKind::Calls),
            Demand::Stream => Some(QuotaKind::Streams),
            Demand::Session => Some(QuotaKind::Sessions),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over a quota: `kind` names it (the metric label), `retry_after` when to try again.
    Over {
        /// `requests`, `concurrent_calls`, `sessions` or `streams`, `global_` prefixed for the
        /// cluster-wide quotas.
        kind: &'static str,
        /// When a retry can pass (rates), or a short pause (caps free when something ends).
        retry_after: Duration,
    },
    /// The shared state could not decide.
    Unavailable,
}

impl Refusal {
    /// What the client is told.
    pub fn message(&self) -> &'static str {
        match self {
            Refusal::Over { kind, .. } => match *kind {
                "requests" => "Too Many Requests: request rate quota exceeded",
                "concurrent_calls" => "Too Many Requests: concurrent tool call quota exceeded",
                "sessions" => "Too Many Requests: open session quota exceeded",
                "streams" => "Too Many Requests: open stream quota exceeded",
                "global_requests" => {
                    "Too Many Requests: the server's request rate limit is reached"
                }
                "global_concurrent_calls" => {
                    "Too Many Requests: the server's concurrent tool call limit is reached"
                }
                "global_sessions" => "Too Many Requests: the server's session limit is reached",
                _ => "Too Many Requests: the server's stream limit is reached",
            },
            Refusal::Unavailable => "quotas cannot be checked: shared state unavailable",
        }
    }
}

/// One cap a lease is recorded in: its kind and subject.
type Cap = (QuotaKind, Arc<str>);

/// How long a client should wait after a cap refused it (caps free when a call, stream or
/// session ends, which cannot be predicted).
const CAP_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Releases waiting for the release loop (beyond them, a release takes a round trip of its own).
const RELEASE_QUEUE: usize = 4096;

/// Most leases renewed by one script.
const RENEW_CHUNK: usize = 1000;

/// Most releases sent in one round trip.
const RELEASE_BATCH: usize = 256;

/// A lease to give back: its member and the caps it is recorded in.
type Release = (Arc<str>, Vec<Cap>);

/// Most rate refusals a replica remembers (one per principal over its rate, and one for the
/// cluster); when full, the lapsed ones are dropped, and past that a refusal is not remembered.
const OVER_RATE_MEMORY: usize = 10_000;

/// The quotas of a replica. Cheap to share.
pub struct Quotas {
    backend: Backend,
    global: Limits,
    metrics: Metrics,
    /// Subjects (a principal's id, or the cluster) over their request rate, and until when. Exact,
    /// not a guess: under GCRA no request of a refused subject passes before the retry time the
    /// refusal named, on any replica, so until then this replica answers 429 from memory without
    /// reading the body or asking Redis (an exhausted rate costs its holder nothing to enforce).
    over_rate: Mutex<HashMap<Arc<str>, tokio::time::Instant>>,
    /// Leases of calls and streams this replica holds, renewed every third of [`LEASE`].
    held: Mutex<HashMap<Arc<str>, Vec<Cap>>>,
    /// Ended leases, given back in batches by [`Quotas::run`] (one round trip for all the calls
    /// that ended while the previous batch was on its way).
    releases: tokio::sync::mpsc::Sender<Release>,
    /// Where releases that find the queue full run, tracked, so shutdown waits for them.
    tasks: tokio_util::task::TaskTracker,
    pending: Mutex<Option<tokio::sync::mpsc::Receiver<Release>>>,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("global", &self.global)
            .finish()
    }
}

impl Quotas {
    /// Quotas kept in `backend`, with the cluster-wide limits of `config`.
    pub fn new(
        backend: Backend,
        config: &QuotaConfig,
        metrics: Metrics,
        tasks: tokio_util::task::TaskTracker,
    ) -> Arc<Self> {
        let (releases, pending) = tokio::sync::mpsc::channel(RELEASE_QUEUE);
        Arc::new(Self {
            tasks,
            backend,
            global: Limits::global(config),
            metrics,
            over_rate: Mutex::default(),
            held: Mutex::default(),
            releases,
            pending: Mutex::new(Some(pending)),
        })
    }

    /// The refusal of any request of `principal` while it (or the cluster) is over its request
    /// rate, as this replica last heard from the shared state: no round trip.
    pub fn refused_from_memory(&self, principal: &Principal) -> Option<Refusal> {
        let now = tokio::time::Instant::now();
        let mut over = self.over_rate.lock().unwrap_or_else(|e| e.into_inner());
        if over.is_empty() {
            return None;
        }
        for (subject, kind) in [
            (&*principal.id, "requests"),
            (QUOTA_CLUSTER, "global_requests"),
        ] {
            match over.get(subject).copied() {
                Some(until) if until > now => {
                    self.metrics.quota_rejection(kind);
                    return Some(Refusal::Over {
                        kind,
                        retry_after: until - now,
                    });
                }
                // Lapsed: forgotten, so that the map empties again and the check costs nothing.
                Some(_) => {
                    over.remove(subject);
                }
                None => {}
            }
        }
        None
    }

    /// Remembers that `subject` is over its request rate for `retry_after` from `asked` (when the
    /// decision was asked for: Redis's retry time runs from its own clock, and counting it from
    /// the reply would refuse for one round trip too long).
    fn remember_over_rate(
        &self,
        subject: &str,
        asked: tokio::time::Instant,
        retry_after: Duration,
    ) {
        let now = tokio::time::Instant::now();
        let until = asked + retry_after;
        if until <= now {
            return;
        }
        let mut over = self.over_rate.lock().unwrap_or_else(|e| e.into_inner());
        if over.len() >= OVER_RATE_MEMORY && !over.contains_key(subject) {
            over.retain(|_, until| *until > now);
            if over.len() >= OVER_RATE_MEMORY {
                return;
            }
        }
        over.insert(Arc::from(subject), until);
    }

    /// The checks a request of `principal` asking for `demand` must pass: its own rate and cap,
    /// then the cluster's, each only when set.
    fn checks<'a>(&'a self, principal: &'a Principal, demand: Demand) -> Vec<QuotaCheck<'a>> {
        let own = &principal.limits;
        let mut checks: Vec<QuotaCheck<'_>> = Vec::with_capacity(4);
        for (limits, subject) in [(own, &*principal.id), (&self.global, QUOTA_CLUSTER)] {
            if limits.requests_per_sec > 0 {
                checks.push(QuotaCheck {
                    kind: QuotaKind::Rate,
                    subject,
                    limit: limits.requests_per_sec,
                    burst: limits.burst(),
                });
            }
            if let Some(kind) = demand.cap()
                && limits.cap(kind) > 0
            {
                checks.push(QuotaCheck {
                    kind,
                    subject,
                    limit: limits.cap(kind),
                    burst: 0,
                });
            }
        }
        checks
    }

    /// Counts and logs a refusal, remembers a rate refusal until it can pass (asked at `asked`),
    /// and says what the client is told.
    fn refused(
        &self,
        principal: &Principal,
        checks: &[QuotaCheck<'_>],
        QuotaRefusal { index, retry_after }: QuotaRefusal,
        asked: tokio::time::Instant,
    ) -> Refusal {
        let refusing = &checks[index];
        let kind = label(refusing.kind, refusing.subject == QUOTA_CLUSTER);
        self.metrics.quota_rejection(kind);
        tracing::info!(kind, principal = %principal.name, "refused request: quota");
        if refusing.kind == QuotaKind::Rate
            && let Some(retry_after) = retry_after
        {
            self.remember_over_rate(refusing.subject, asked, retry_after);
        }
        Refusal::Over {
            kind,
            retry_after: retry_after.unwrap_or(CAP_RETRY_AFTER),
        }
    }

    /// Admits a request of `principal` that asks for `demand`: `Ok(Some(lease))` when it holds a
    /// call, stream or session slot until the lease is dropped (or bound to a session), `Ok(None)`
    /// when nothing is held. No round trip when no limit applies.
    ///
    /// # Errors
    /// A [`Refusal`] when a quota is exhausted or the shared state cannot decide.
    pub async fn admit(
        self: &Arc<Self>,
        principal: &Principal,
        demand: Demand,
    ) -> Result<Option<Lease>, Refusal> {
        let checks = self.checks(principal, demand);
        if checks.is_empty() {
            return Ok(None);
        }
        // Rates need no member; caps record this one.
        let member: Arc<str> = if checks.iter().any(|check| check.kind != QuotaKind::Rate) {
            Arc::from(format!("{:032x}", rand::random::<u128>()))
        } else {
            Arc::from("")
        };
        let asked = tokio::time::Instant::now();
        match self.backend.quota_admit(&checks, &member, LEASE).await {
            Ok(None) => {}
            Ok(Some(refusal)) => {
                return Err(self.refused(principal, &checks, refusal, asked));
            }
            Err(error) => {
                tracing::warn!(%error, "quota not checked: shared state unavailable");
                return Err(Refusal::Unavailable);
            }
        }
        let caps: Vec<Cap> = checks
            .iter()
            .filter(|check| check.kind != QuotaKind::Rate)
            .map(|check| (check.kind, Arc::from(check.subject)))
            .collect();
        if caps.is_empty() {
            return Ok(None);
        }
        let renewed = demand != Demand::Session;
        if renewed {
            self.held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(member.clone(), caps.clone());
        }
        Ok(Some(Lease(Arc::new(Held {
            quotas: self.clone(),
            member,
            caps,
            renewed,
            bound: AtomicBool::new(false),
        }))))
    }

    /// A legacy session of `principal` was deleted: it no longer counts against the session caps.
    pub async fn session_closed(&self, principal: &Principal, session: &str) {
        let mut releases: Vec<(QuotaKind, &str, &str)> = Vec::with_capacity(2);
        if principal.limits.sessions > 0 {
            releases.push((QuotaKind::Sessions, &principal.id, session));
        }
        if self.global.sessions > 0 {
            releases.push((QuotaKind::Sessions, QUOTA_CLUSTER, session));
        }
        if !releases.is_empty()
            && let Err(error) = self.backend.quota_release(&releases).await
        {
            tracing::debug!(%error, "session quota not released (noticed within the recheck)");
        }
    }

    /// Gives back ended leases in batches, and renews the leases this replica holds every third
    /// of [`LEASE`], until `stop` fires; then gives back what is still queued.
    pub async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let Some(mut pending) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return; // already running
        };
        let mut every = tokio::time::interval(LEASE / 3);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(RELEASE_BATCH);
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    // Shutting down: give back what the ended requests held, not in a minute.
                    while let Ok(ended) = pending.try_recv() {
                        batch.push(ended);
                        if batch.len() == RELEASE_BATCH {
                            release(&self.backend, &batch).await;
                            batch.clear();
                        }
                    }
                    if !batch.is_empty() {
                        release(&self.backend, &batch).await;
                    }
                    return;
                }
                _ = every.tick() => self.renew().await,
                received = pending.recv_many(&mut batch, RELEASE_BATCH) => {
                    if received == 0 {
                        return;
                    }
                    release(&self.backend, &batch).await;
                    batch.clear();
                }
            }
        }
    }

    async fn renew(&self) {
        let mut by_cap: HashMap<Cap, Vec<String>> = HashMap::new();
        for (member, caps) in self.held.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            for cap in caps {
                by_cap
                    .entry(cap.clone())
                    .or_default()
                    .push(member.to_string());
            }
        }
        for ((kind, subject), members) in by_cap {
            // Bounded scripts: a principal with many open streams renews them in chunks.
            for chunk in members.chunks(RENEW_CHUNK) {
                if let Err(error) = self
                    .backend
                    .quota_renew((kind, &subject), chunk, LEASE)
                    .await
                {
                    tracing::warn!(%error, "quota leases not renewed");
                }
            }
        }
    }
}

/// Gives back `batch` in one round trip.
async fn release(backend: &Backend, batch: &[Release]) {
    let releases: Vec<(QuotaKind, &str, &str)> = batch
        .iter()
        .flat_map(|(member, caps)| {
            caps.iter()
                .map(move |(kind, subject)| (*kind, &**subject, &**member))
        })
        .collect();
    if let Err(error) = backend.quota_release(&releases).await {
        tracing::debug!(%error, "quota leases not released (they lapse by themselves)");
    }
}

fn label(kind: QuotaKind, global: bool) -> &'static str {
    match (kind, global) {
        (QuotaKind::Rate, false) => "requests",
        (QuotaKind::Calls, false) => "concurrent_calls",
        (QuotaKind::Sessions, false) => "sessions",
        (QuotaKind::Streams, false) => "streams",
        (QuotaKind::Rate, true) => "global_requests",
        (QuotaKind::Calls, true) => "global_concurrent_calls",
        (QuotaKind::Sessions, true) => "global_sessions",
        (QuotaKind::Streams, true) => "global_streams",
    }
}

/// A tool call's lease handed to the call itself, in the HTTP request's extensions (rmcp passes
/// the request's parts to the handler): the call takes it when it starts and holds it until it
/// returns or is cancelled. The response body holds another clone, so the slot is given back when
/// both the call and its response are done: a legacy client that hangs up after the headers
/// leaves its call running (rmcp keeps it for resumption), and the call keeps counting.
/// Taken rather than shared, so no copy of the request parts kept elsewhere (a session restore
/// replays `initialize` with them) can hold the slot.
#[derive(Debug, Clone)]
pub struct CallLease(Arc<std::sync::Mutex<Option<Lease>>>);

impl CallLease {
    /// `lease`, to be taken by the call it admitted.
    pub fn new(lease: Lease) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(lease))))
    }

    /// The lease, once: the call that takes it holds it until it ends.
    pub fn take(&self) -> Option<Lease> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A call, stream or session slot held in the quotas; dropping the last clone gives it back
/// (unless it was bound to a session, which then holds it until deleted).
#[derive(Debug, Clone)]
pub struct Lease(Arc<Held>);

struct Held {
    quotas: Arc<Quotas>,
    member: Arc<str>,
    caps: Vec<Cap>,
    renewed: bool,
    bound: AtomicBool,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("caps", &self.caps).finish()
    }
}

impl Lease {
    /// Binds an `initialize`'s session reservation to the session it created: the slot is then
    /// held until the session is deleted or expires.
    pub async fn bind_session(&self, session: &str) {
        let held = &self.0;
        let subjects: Vec<&str> = held.caps.iter().map(|(_, subject)| &**subject).collect();
        match held
            .quotas
            .backend
            .quota_bind_session(&subjects, &held.member, session)
            .await
        {
            Ok(()) => held.bound.store(true, Ordering::SeqCst),
            Err(error) => tracing::warn!(%error, "session quota reservation not bound"),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.renewed {
            self.quotas
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.member);
        }
        if self.bound.load(Ordering::SeqCst) {
            return;
        }
        let ended = (self.member.clone(), std::mem::take(&mut self.caps));
        // Usually queued for the next batch; with the queue full, released on its own.
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(ended)) =
            self.quotas.releases.try_send(ended)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let backend = self.quotas.backend.clone();
            self.quotas
                .tasks
                .spawn_on(async move { release(&backend, &[ended]).await }, &runtime);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tiers: &str) -> Policy {
        let file: TiersFile = toml::from_str(tiers).expect("tiers");
        Policy {
            defaults: Limits {
                requests_per_sec: 10,
                burst: 20,
                concurrent_calls: 4,
                sessions: 5,
                streams: 6,
                share_percent: 50,
            },
            tiers: file.tier,
        }
    }

    #[test]
    fn a_key_overrides_its_tier_which_overrides_the_defaults() {
        let policy = policy(
            "[[tier]]\nname = \"gold\"\nscope = \"quota:gold\"\nquota = { requests_per_sec = 100, sessions = 0 }\n\
             [[tier]]\nclaim = \"groups\"\nvalue = \"batch\"\nquota = { concurrent_calls = 50 }\n",
        );
        let scopes = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(policy.limits(&scopes(&["kv"]), None, None), policy.defaults);
        let gold = policy.limits(&scopes(&["kv", "quota:gold"]), None, None);
        assert_eq!(
            (gold.requests_per_sec, gold.burst, gold.sessions),
            (100, 20, 0)
        );
        let claims = serde_json::json!({ "groups": ["staff", "batch"] });
        let batch = policy.limits(&scopes(&["kv"]), claims.as_object(), None);
        assert_eq!((batch.concurrent_calls, batch.requests_per_sec), (50, 10));
        let own = Overrides {
            requests_per_sec: Some(1),
            ..Overrides::default()
        };
        let keyed = policy.limits(&scopes(&["quota:gold"]), None, Some(&own));
        assert_eq!((keyed.requests_per_sec, keyed.sessions), (1, 0));
    }

    #[test]
    fn a_rate_without_burst_allows_one_second_of_requests() {
        let limits = Limits {
            requests_per_sec: 7,
            ..Limits::UNLIMITED
        };
        assert_eq!(limits.burst(), 7);
    }
}
