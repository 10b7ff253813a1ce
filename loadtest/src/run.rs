//! The load scenarios: many concurrent MCP sessions (legacy) or stateless clients (2026-07-28)
//! calling a weighted mix of tools, closed-loop or open-loop, optionally subscribed to resources to
//! measure notification delivery, optionally under a chaos schedule (see [`crate::chaos`]).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rand::Rng;
use serde_json::{Value, json};
use shoal_testkit::client::{Era, EventStream, McpClient};
use tokio::task::JoinSet;

use crate::{
    chaos::Schedule,
    ledger::{Ledger, Received},
    stats::Stats,
};

/// How requests are paced.
#[derive(Debug, Clone, Copy)]
pub enum Pacing {
    /// Each session sends its next request when the previous one answered, after `think`.
    Closed {
        /// Pause between a response and the next request.
        think: Duration,
    },
    /// Requests are scheduled at a constant total rate whatever the latency; latency is measured
    /// from the scheduled time, so a slow server cannot hide behind fewer requests (no coordinated
    /// omission).
    Open {
        /// Requests per second, over all sessions.
        rate: f64,
    },
}

/// One entry of the tool mix.
#[derive(Debug, Clone)]
pub struct MixEntry {
    /// Tool name.
    pub tool: String,
    /// Relative weight.
    pub weight: u32,
}

/// Parses `tool=weight,tool=weight`.
pub fn parse_mix(spec: &str) -> Result<Vec<MixEntry>, String> {
    spec.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            let (tool, weight) = part.split_once('=').unwrap_or((part, "1"));
            let weight = weight
                .trim()
                .parse::<u32>()
                .map_err(|_| format!("bad weight in {part:?}"))?;
            Ok(MixEntry {
                tool: tool.trim().to_owned(),
                weight,
            })
        })
        .collect()
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// MCP endpoint.
    pub url: String,
    /// Bearer token (API key or OAuth access token) every request carries.
    pub token: Option<String>,
    /// Protocol era.
    pub era: Era,
    /// Both eras: even-numbered sessions legacy, odd-numbered 2026-07-28 (`era` is ignored).
    pub mixed_eras: bool,
    /// Concurrent sessions (or stateless clients).
    pub sessions: usize,
    /// Measured duration.
    pub duration: Duration,
    /// Unmeasured warm-up.
    pub warmup: Duration,
    /// Pacing.
    pub pacing: Pacing,
    /// Tool mix.
    pub mix: Vec<MixEntry>,
    /// Subscribe every session to a resource another session writes.
    pub subscribe: bool,
    /// `sleep` duration for the slow tool, ms.
    pub slow_ms: u64,
    /// Rounds of `hash` (the CPU-bound tool).
    pub hash_rounds: u64,
    /// The statement `pg_query` runs.
    pub pg_sql: String,
    /// Faults injected during the measured run.
    pub schedule: Schedule,
    /// Where the notification streams are opened (default: `url`); with a replica's own URL here
    /// and another replica's in `url`, every notification crosses replicas.
    pub notify_url: Option<String>,
    /// Times a request that failed in transport, with 502/503/504, or whose response stream ended
    /// without the response (a replica that died under it) is sent again, as a resilient client
    /// would; each retry is reported as a recovery.
    pub retries: u32,
}

impl RunConfig {
    /// The era session `index` speaks.
    pub fn era_of(&self, index: usize) -> Era {
        match (self.mixed_eras, index % 2) {
            (false, _) => self.era,
            (true, 0) => Era::Legacy,
            (true, _) => Era::Modern,
        }
    }
}

const PRELOADED_KEYS: usize = 100;

fn subscription_key(session: usize) -> String {
    format!("lt-sub-{session}")
}

struct Worker {
    index: usize,
    config: Arc<RunConfig>,
    client: McpClient,
    stats: Arc<Stats>,
    ledger: Arc<Ledger>,
    weights: Vec<u32>,
    /// Writes this worker sent (their values are unique).
    writes: std::sync::atomic::AtomicU64,
}

impl Worker {
    /// Calls tools until `stop` fires, at the configured pacing; hands the client back.
    async fn drive(self, started: Instant, stop: Stop) -> McpClient {
        match self.config.pacing {
            Pacing::Closed { think } => {
                while !stop.fired() {
                    let tool = self.pick().to_owned();
                    self.call(&tool, Instant::now()).await;
                    if !think.is_zero() {
                        tokio::select! {
                            () = stop.wait() => break,
                            () = tokio::time::sleep(think) => {}
                        }
                    }
                }
            }
            Pacing::Open { rate } => {
                let per_worker = rate / self.config.sessions as f64;
                let interval = Duration::from_secs_f64(1.0 / per_worker.max(1e-6));
                // Spread the workers' schedules over one interval.
                let offset = interval.mul_f64(self.index as f64 / self.config.sessions as f64);
                let mut next = started + offset;
                while !stop.fired() {
                    let now = Instant::now();
                    if next > now {
                        tokio::select! {
                            () = stop.wait() => break,
                            () = tokio::time::sleep(next - now) => {}
                        }
                    }
                    let tool = self.pick().to_owned();
                    self.call(&tool, next).await;
                    next += interval;
                }
            }
        }
        self.client
    }

    fn pick(&self) -> &str {
        let total: u32 = self.weights.iter().sum();
        let mut roll = rand::rng().random_range(0..total.max(1));
        for (entry, weight) in self.config.mix.iter().zip(&self.weights) {
            if roll < *weight {
                return &entry.tool;
            }
            roll -= weight;
        }
        &self.config.mix[0].tool
    }

    fn arguments(&self, tool: &str) -> Value {
        let mut rng = rand::rng();
        match tool {
            "kv_get" => json!({"key": format!("lt-{}", rng.random_range(0..PRELOADED_KEYS))}),
            "kv_set" if self.config.subscribe => {
                let key = subscription_key((self.index + 1) % self.config.sessions);
                let n = self
                    .writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                json!({"key": key, "value": format!("v{}-{n}", self.index)})
            }
            "kv_set" => {
                json!({"key": format!("lt-{}", rng.random_range(0..PRELOADED_KEYS)), "value": format!("v{}", rng.random::<u32>())})
            }
            "sleep" => json!({"ms": self.config.slow_ms}),
            "echo" => json!({"text": "hello"}),
            "hash" => {
                json!({"data": format!("lt-{}", rng.random::<u64>()), "rounds": self.config.hash_rounds})
            }
            "get_balance" => json!({"address": "4Nd1mYQ9P8Ew7ZsDMhCXHqkuhbuBFvf6VGK2mX4EdhyS"}),
            "pg_query" => json!({"sql": self.config.pg_sql}),
            _ => json!({}),
        }
    }

    async fn call(&self, tool: &str, intended: Instant) {
        let arguments = self.arguments(tool);
        // A write another session is subscribed to: accounted in the ledger.
        let watched = (tool == "kv_set" && self.config.subscribe).then(|| {
            let key = arguments["key"].as_str().unwrap_or_default().to_owned();
            let ticket = self.ledger.sent(&key, self.stats.current_window());
            (key, ticket)
        });
        let mut attempt = 0;
        let outcome = loop {
            let outcome = self
                .client
                .request("tools/call", json!({"name": tool, "arguments": arguments}))
                .await;
            let transient = match &outcome {
                Err(error) => Some(format!("transport: {}", short(&error.to_string()))),
                Ok(exchange) if matches!(exchange.status.as_u16(), 502..=504) => {
                    Some(format!("http_{}", exchange.status.as_u16()))
                }
                // The response stream ended without the response: its replica died mid-call.
                Ok(exchange) if exchange.status.is_success() && exchange.response().is_none() => {
                    Some("no_response".to_owned())
                }
                Ok(_) => None,
            };
            match transient {
                Some(kind) if attempt < self.config.retries => {
                    attempt += 1;
                    self.stats.retried(format!("request retried after {kind}"));
                    if let Some((key, _)) = &watched {
                        // It may have been applied (and notify) before it failed.
                        self.ledger.uncertain(key);
                    }
                    tokio::time::sleep(Duration::from_millis(50 << attempt.min(4))).await;
                }
                _ => break outcome,
            }
        };
        let succeeded = matches!(&outcome, Ok(exchange) if exchange.status.is_success()
            && exchange.response().is_some_and(|r| r.get("error").is_none()
                && r.pointer("/result/isError") != Some(&json!(true))));
        if let Some((key, ticket)) = &watched {
            if succeeded {
                let value = arguments["value"].as_str().unwrap_or_default();
                self.ledger.acked(key, *ticket, value);
            } else {
                self.ledger.failed(key, *ticket);
            }
        }
        if succeeded && attempt > 0 {
            self.stats.request_recovered();
        }
        match outcome {
            Ok(exchange) => {
                if !exchange.status.is_success() {
                    self.stats
                        .error(format!("http_{}", exchange.status.as_u16()));
                } else if let Some(code) =
                    exchange.response().and_then(|r| r.pointer("/error/code"))
                {
                    self.stats.error(format!("jsonrpc_{code}"));
                } else if exchange.response().is_none() {
                    self.stats.error("no_response");
                } else if exchange
                    .response()
                    .and_then(|r| r.pointer("/result/isError"))
                    == Some(&json!(true))
                {
                    self.stats.error(format!("tool_error_{tool}"));
                } else {
                    self.stats.ok(tool, intended.elapsed());
                }
            }
            Err(error) => self
                .stats
                .error(format!("transport: {}", short(&error.to_string()))),
        }
    }
}

fn short(text: &str) -> String {
    text.chars().take(60).collect()
}

/// Opens the notification stream of `uri` (legacy: the session's GET stream, resumed after
/// `last_event_id`; modern: a `subscriptions/listen` request).
async fn open_stream(
    era: Era,
    client: &McpClient,
    uri: &str,
    last_event_id: Option<&str>,
) -> Result<EventStream, String> {
    let stream = match era {
        Era::Legacy => client
            .open_get(last_event_id)
            .await
            .map_err(|e| e.to_string())?,
        Era::Modern => {
            client
                .open_request(
                    "subscriptions/listen",
                    json!({"notifications": {"resourceSubscriptions": [uri]}}),
                )
                .await
                .map_err(|e| e.to_string())?
                .1
        }
    };
    if !stream.status.is_success() {
        return Err(format!("subscription stream answered {}", stream.status));
    }
    Ok(stream)
}

/// How long a listener keeps trying to reopen a notification stream that ended.
const RESUME_PATIENCE: Duration = Duration::from_secs(30);

/// Opens the subscription of worker `index` and reads its notifications until `stop`. A stream
/// that ends early (its replica died or drained) is reopened the way a client should: legacy
/// streams resume after the last event id received, so nothing is lost; modern listens are
/// requested again (what was sent in between is reported lost).
async fn listen(
    config: Arc<RunConfig>,
    client: &McpClient,
    index: usize,
    stats: Arc<Stats>,
    ledger: Arc<Ledger>,
    stop: tokio_util_stop::Stop,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let key = subscription_key(index);
    let uri = format!("kv://{key}");
    let era = config.era_of(index);
    if era == Era::Legacy {
        let exchange = client
            .request("resources/subscribe", json!({"uri": uri}))
            .await
            .map_err(|e| e.to_string())?;
        exchange.result().map_err(|e| e.to_string())?;
    }
    let client = match &config.notify_url {
        Some(url) => client.fork_at(url),
        None => client.fork(),
    };
    let mut stream = open_stream(era, &client, &uri, None).await?;
    Ok(tokio::spawn(async move {
        let mut last_event_id: Option<String> = None;
        loop {
            let event = tokio::select! {
                () = stop.wait() => return,
                event = stream.next_event() => event,
            };
            let Some(event) = event else {
                stats.stream_failed("notification stream ended");
                if era == Era::Modern {
                    // No resumption in this era: what the ended listen had not delivered, and
                    // what is written until the new one is acknowledged, is missed by design.
                    stats.notifications_missed(&ledger.listen_ended(&key));
                }
                match reopen(era, &client, &uri, last_event_id.as_deref(), &stop, &stats).await {
                    Ok(Some(reopened)) => {
                        stats.stream_reopened();
                        stream = reopened;
                        continue;
                    }
                    Ok(None) => return,
                    Err(error) => {
                        stats.error(format!("notification stream lost: {}", short(&error)));
                        return;
                    }
                }
            };
            if event.id.is_some() {
                last_event_id = event.id;
            }
            let Some(message) = event.message else {
                continue;
            };
            match message.get("method").and_then(Value::as_str) {
                Some("notifications/subscriptions/acknowledged") => {
                    ledger.listen_acknowledged(&key);
                }
                Some("notifications/resources/updated") => match ledger.received(&key) {
                    Received::Delivered { window, latency } => {
                        stats.notification_delivered(window, latency);
                    }
                    Received::Uncounted => {}
                    Received::Slack => stats.notification_slack(),
                    Received::Duplicate => stats.notification_duplicated(),
                },
                _ => {}
            }
        }
    }))
}

/// Reopens an ended notification stream with backoff; `Ok(None)` when the run stopped meanwhile.
async fn reopen(
    era: Era,
    client: &McpClient,
    uri: &str,
    last_event_id: Option<&str>,
    stop: &Stop,
    stats: &Stats,
) -> Result<Option<EventStream>, String> {
    let deadline = Instant::now() + RESUME_PATIENCE;
    let mut delay = Duration::from_millis(50);
    loop {
        if stop.fired() {
            return Ok(None);
        }
        match open_stream(era, client, uri, last_event_id).await {
            Ok(stream) => return Ok(Some(stream)),
            Err(error) if Instant::now() + delay > deadline => return Err(error),
            Err(error) => {
                stats.stream_failed(&format!(
                    "notification stream reopen refused: {}",
                    short(&error)
                ));
            }
        }
        tokio::select! {
            () = stop.wait() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// A tiny stop signal shared by every task of a run.
mod tokio_util_stop {
    use std::sync::Arc;

    use tokio::sync::watch;

    #[derive(Clone)]
    pub struct Stop(Arc<watch::Sender<bool>>, watch::Receiver<bool>);

    impl Stop {
        pub fn new() -> Self {
            let (tx, rx) = watch::channel(false);
            Self(Arc::new(tx), rx)
        }
        pub fn fire(&self) {
            let _ = self.0.send(true);
        }
        pub fn fired(&self) -> bool {
            *self.1.borrow()
        }
        pub async fn wait(&self) {
            let mut rx = self.1.clone();
            let _ = rx.wait_for(|fired| *fired).await;
        }
    }
}

use tokio_util_stop::Stop;

/// Prepares the server (preloaded keys), opens the sessions, runs, and returns the statistics.
pub async fn run(config: RunConfig, progress: bool) -> Result<(Arc<Stats>, Vec<String>), String> {
    let config = Arc::new(config);
    let stats = Arc::new(Stats::new());
    let ledger = Arc::new(Ledger::default());
    // Workers stop at the end of the run; listeners once the last notifications had their chance.
    let stop = Stop::new();
    let listeners_stop = Stop::new();

    preload(&config).await?;

    let clients = open_sessions(&config).await?;

    let mut listeners = Vec::new();
    if config.subscribe {
        for (index, client) in &clients {
            listeners.push(
                listen(
                    config.clone(),
                    client,
                    *index,
                    stats.clone(),
                    ledger.clone(),
                    listeners_stop.clone(),
                )
                .await?,
            );
        }
    }

    let weights: Vec<u32> = config.mix.iter().map(|m| m.weight).collect();
    let mut workers = JoinSet::new();
    let started = Instant::now();
    for (index, client) in clients {
        let worker = Worker {
            index,
            config: config.clone(),
            client,
            stats: stats.clone(),
            ledger: ledger.clone(),
            weights: weights.clone(),
            writes: std::sync::atomic::AtomicU64::new(0),
        };
        let stop = stop.clone();
        // With its index: workers end in any order, and the index says the client's era.
        workers.spawn(async move { (index, worker.drive(started, stop).await) });
    }

    let mut events = measure(&config, &stats, progress).await;
    stop.fire();
    let mut closing = Vec::new();
    while let Some(result) = workers.join_next().await {
        if let Ok(client) = result {
            closing.push(client);
        }
    }
    if config.subscribe {
        // Notifications still in flight (a stream being resumed) get their chance.
        let deadline = Instant::now() + NOTIFICATION_GRACE;
        while ledger.waiting() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stats.notifications_lost(&ledger.lost());
        stats.notification_slack_unspent(ledger.unspent_slack());
        check_writes(&config, &ledger, &stats, &mut events).await;
    }
    listeners_stop.fire();
    for listener in listeners {
        listener.abort();
    }
    let mut deletes = JoinSet::new();
    for (index, client) in closing {
        if config.era_of(index) == Era::Legacy {
            deletes.spawn(async move { client.delete().await });
        }
    }
    while deletes.join_next().await.is_some() {}
    Ok((stats, events))
}

/// How long the end of a run waits for notifications still in flight.
const NOTIFICATION_GRACE: Duration = Duration::from_secs(10);

/// Reads back every subscribed key: it must hold the value of its last acknowledged write.
async fn check_writes(
    config: &RunConfig,
    ledger: &Ledger,
    stats: &Stats,
    events: &mut Vec<String>,
) {
    let mut reader =
        McpClient::new(&config.url, config.era_of(0)).with_bearer(config.token.as_deref());
    if config.era_of(0) == Era::Legacy && reader.initialize().await.is_err() {
        events.push("the written values could not be checked: no session".to_owned());
        return;
    }
    let expected = ledger.expected_values();
    let mut checked = 0;
    for (key, value) in &expected {
        match reader.call_tool("kv_get", json!({"key": key})).await {
            Ok(result) => {
                let held = result.pointer("/content/0/text").and_then(Value::as_str);
                if held != Some(value.as_str()) {
                    stats.write_lost(format!("{key}: acknowledged {value:?}, holds {held:?}"));
                }
                checked += 1;
            }
            Err(error) => events.push(format!("reading {key} back failed: {error}")),
        }
    }
    events.push(format!(
        "writes checked: {checked} keys hold their last acknowledged value or not ({} keys skipped: their last write failed)",
        config.sessions.saturating_sub(expected.len())
    ));
    if config.era_of(0) == Era::Legacy {
        let _ = reader.delete().await;
    }
}

/// Preloads the keys `kv_get` reads (through a session of its own in the legacy era).
async fn preload(config: &RunConfig) -> Result<(), String> {
    let era = config.era_of(0);
    let mut setup = McpClient::new(&config.url, era).with_bearer(config.token.as_deref());
    if era == Era::Legacy {
        setup
            .initialize()
            .await
            .map_err(|e| format!("initialize: {e}"))?;
    }
    if config.mix.iter().any(|m| m.tool == "kv_get") {
        for n in 0..PRELOADED_KEYS {
            setup
                .call_tool(
                    "kv_set",
                    json!({"key": format!("lt-{n}"), "value": format!("value {n}")}),
                )
                .await
                .map_err(|e| format!("preloading keys: {e}"))?;
        }
    }
    if era == Era::Legacy {
        let _ = setup.delete().await;
    }
    Ok(())
}

/// Opens every client (a legacy session each, in parallel, at most 32 at a time), in index order.
async fn open_sessions(config: &Arc<RunConfig>) -> Result<Vec<(usize, McpClient)>, String> {
    let mut opened = JoinSet::new();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(32));
    for index in 0..config.sessions {
        let config = config.clone();
        let semaphore = semaphore.clone();
        opened.spawn(async move {
            let _permit = semaphore.acquire().await;
            let era = config.era_of(index);
            let mut client = McpClient::new(&config.url, era).with_bearer(config.token.as_deref());
            if era == Era::Legacy {
                client
                    .initialize()
                    .await
                    .map_err(|e| format!("initialize: {e}"))?;
            }
            Ok::<_, String>((index, client))
        });
    }
    let mut clients = Vec::with_capacity(config.sessions);
    while let Some(result) = opened.join_next().await {
        clients.push(result.map_err(|e| e.to_string())??);
    }
    clients.sort_by_key(|(index, _)| *index);
    Ok(clients)
}

/// Warm-up, then the measured run with its chaos schedule and a progress line; returns what
/// happened (faults injected and healed, hooks that failed).
async fn measure(config: &RunConfig, stats: &Stats, progress: bool) -> Vec<String> {
    tokio::time::sleep(config.warmup).await;
    stats.begin();
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(config.duration.as_secs().max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len}s {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut events = Vec::new();
    // The next fault to inject, and the heal the last one still waits for.
    let mut faults = config.schedule.faults.iter().peekable();
    let mut heal: Option<(Duration, &str)> = None;
    let mut last = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let elapsed = stats.elapsed();
        if let Some((when, command)) = heal
            && elapsed >= when
        {
            heal = None;
            hook(stats, &mut events, "heal", command).await;
            stats.fault_ended();
        }
        if heal.is_none()
            && let Some(fault) = faults.next_if(|f| elapsed >= f.at)
        {
            stats.fault_started(&fault.label());
            hook(
                stats,
                &mut events,
                &format!("fault {:?}", fault.label()),
                &fault.run,
            )
            .await;
            match &fault.heal {
                Some(command) => heal = Some((fault.at + fault.heal_after, command)),
                None => stats.fault_ended(),
            }
        }
        if let Some(bar) = &bar {
            let (ok, errors) = stats.counts();
            let rate = (ok - last.0) as f64 * 10.0;
            last = (ok, errors);
            bar.set_position(elapsed.as_secs());
            bar.set_message(format!("{rate:>8.0} ok/s  {errors} errors"));
        }
        if elapsed >= config.duration && heal.is_none() {
            break;
        }
    }
    stats.end();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    events
}

/// Runs a schedule's command and notes it (and its failure) in the events.
async fn hook(stats: &Stats, events: &mut Vec<String>, what: &str, command: &str) {
    let started = stats.elapsed();
    let outcome = crate::chaos::run_hook(command).await;
    let took = stats.elapsed() - started;
    events.push(format!(
        "{:>6.1}s {what}: {command} ({:.1} s){}",
        started.as_secs_f64(),
        took.as_secs_f64(),
        outcome
            .err()
            .map_or(String::new(), |e| format!(" FAILED: {e}"))
    ));
}
