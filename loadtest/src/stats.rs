//! Measurements: per-operation HDR histograms, errors by kind, notification accounting, and a
//! per-second timeline for the plot.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, 1 µs .. 60 s, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug, Default)]
struct Second {
    ok: u64,
    errors: u64,
    latency: Option<Histogram<u64>>,
}

/// One stretch of the run: before the first fault, then from each fault's injection to the next's.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Window {
    /// The fault (or `steady` before the first one).
    pub name: String,
    /// When it was injected, seconds from the start of measurement.
    pub at_secs: f64,
    /// When the fault ended: its heal command finished, or its command did when there is none.
    pub ended_secs: Option<f64>,
    /// Requests that succeeded.
    pub ok: u64,
    /// Requests that failed (after their retries).
    pub failed: u64,
    /// Attempts sent again after a transient failure.
    pub retried: u64,
    /// Requests that succeeded after at least one retry.
    pub recovered: u64,
    /// Notification streams that ended early and were reopened.
    pub streams_reopened: u64,
    /// Counted writes sent in this window whose notification arrived.
    pub notifications_delivered: u64,
    /// Acknowledged writes sent in this window whose notification never arrived.
    pub notifications_lost: u64,
    /// Notifications received twice.
    pub notifications_duplicated: u64,
    /// Writes a 2026-07-28 listen missed while it was being requested again (no resumption in
    /// that era).
    pub notifications_missed_relistening: u64,
    /// First and last failure the clients saw (a request that failed or was retried, a stream
    /// that ended or could not be reopened), seconds from the start.
    pub disturbed: Option<(f64, f64)>,
    /// What the last disturbance was (`error http_503`, `request retried after …`, `notification
    /// stream ended`, `notification stream reopen refused: …`).
    pub last_disturbance: Option<String>,
    /// From the end of the fault to the last failure it caused (0 when there was none after): how
    /// long the service went on failing, not when each client's backoff let it notice.
    pub time_to_recover_secs: Option<f64>,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    per_op: BTreeMap<String, Histogram<u64>>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    recoveries: BTreeMap<String, u64>,
    notification_latency: Histogram<u64>,
    notifications_delivered: u64,
    notifications_lost: u64,
    notifications_duplicated: u64,
    notifications_missed: u64,
    notifications_slack: u64,
    notifications_slack_unspent: u64,
    lost_writes: Vec<String>,
    windows: Vec<Window>,
    timeline: Vec<Second>,
}

/// Everything a run measures. Shared by all workers; nothing is recorded before [`Stats::begin`]
/// (the warm-up).
#[derive(Debug)]
pub struct Stats {
    recording: AtomicBool,
    inner: Mutex<Inner>,
}

impl Stats {
    /// Empty statistics, not recording yet.
    pub fn new() -> Self {
        Self {
            recording: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                start: Instant::now(),
                per_op: BTreeMap::new(),
                ok: 0,
                errors: BTreeMap::new(),
                recoveries: BTreeMap::new(),
                notification_latency: histogram(),
                notifications_delivered: 0,
                notifications_lost: 0,
                notifications_duplicated: 0,
                notifications_missed: 0,
                notifications_slack: 0,
                notifications_slack_unspent: 0,
                lost_writes: Vec::new(),
                windows: vec![Window {
                    name: "steady".to_owned(),
                    ..Window::default()
                }],
                timeline: Vec::new(),
            }),
        }
    }

    /// Starts recording; the timeline starts now.
    pub fn begin(&self) {
        self.lock().start = Instant::now();
        self.recording.store(true, Ordering::SeqCst);
    }

    /// Stops recording (what completes later is not counted).
    pub fn end(&self) {
        self.recording.store(false, Ordering::SeqCst);
    }

    /// Whether measurements are being recorded (warm-up is over, the run is not).
    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    /// Seconds since recording began.
    pub fn elapsed(&self) -> Duration {
        self.lock().start.elapsed()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn second(inner: &mut Inner, at: Duration) -> &mut Second {
        let index = at.as_secs() as usize;
        if inner.timeline.len() <= index {
            inner.timeline.resize_with(index + 1, Second::default);
        }
        &mut inner.timeline[index]
    }

    /// A successful operation `op` that took `latency`.
    pub fn ok(&self, op: &str, latency: Duration) {
        if !self.is_recording() {
            return;
        }
        let micros = (latency.as_micros() as u64).clamp(1, 60_000_000);
        let mut inner = self.lock();
        let at = inner.start.elapsed();
        inner.ok += 1;
        Self::window(&mut inner).ok += 1;
        let _ = inner
            .per_op
            .entry(op.to_owned())
            .or_insert_with(histogram)
            .record(micros);
        let second = Self::second(&mut inner, at);
        second.ok += 1;
        let _ = second.latency.get_or_insert_with(histogram).record(micros);
    }

    /// A failed operation, by kind (`http_503`, `jsonrpc_-32602`, `tool_error`, `transport`…).
    pub fn error(&self, kind: impl Into<String>) {
        if !self.is_recording() {
            return;
        }
        let mut inner = self.lock();
        let at = inner.start.elapsed();
        let kind = kind.into();
        Self::disturbed(&mut inner, at, format!("error {kind}"));
        *inner.errors.entry(kind).or_default() += 1;
        Self::second(&mut inner, at).errors += 1;
        Self::window(&mut inner).failed += 1;
    }

    /// The current window (the last fault injected, or `steady`).
    fn window(inner: &mut Inner) -> &mut Window {
        inner.windows.last_mut().expect("the steady window")
    }

    /// The index of the current window, while recording.
    pub fn current_window(&self) -> Option<usize> {
        self.is_recording()
            .then(|| self.lock().windows.len().saturating_sub(1))
    }

    fn disturbed(inner: &mut Inner, at: Duration, what: String) {
        let at = at.as_secs_f64();
        let window = Self::window(inner);
        window.disturbed = Some(match window.disturbed {
            Some((first, _)) => (first, at),
            None => (at, at),
        });
        window.last_disturbance = Some(what);
    }

    /// An attempt that failed transiently and is sent again, by kind. Not an error: the request
    /// goes on to succeed or fail on its own account.
    pub fn retried(&self, kind: impl Into<String>) {
        if self.is_recording() {
            let mut inner = self.lock();
            let at = inner.start.elapsed();
            let kind = kind.into();
            Self::disturbed(&mut inner, at, kind.clone());
            *inner.recoveries.entry(kind).or_default() += 1;
            Self::window(&mut inner).retried += 1;
        }
    }

    /// A request that succeeded after at least one retry.
    pub fn request_recovered(&self) {
        if self.is_recording() {
            Self::window(&mut self.lock()).recovered += 1;
        }
    }

    /// A notification stream ended early, or an attempt to reopen it failed (`what`): a
    /// disturbance at the moment the client saw it. Its reopening, later, is not one: the client's
    /// own backoff decides when that happens (up to a second after the service is back), so
    /// counting it would measure the client, not the service.
    pub fn stream_failed(&self, what: &str) {
        if self.is_recording() {
            let mut inner = self.lock();
            let at = inner.start.elapsed();
            Self::disturbed(&mut inner, at, what.to_owned());
        }
    }

    /// A notification stream that ended early was reopened.
    pub fn stream_reopened(&self) {
        if self.is_recording() {
            let mut inner = self.lock();
            *inner
                .recoveries
                .entry("notification stream reopened".to_owned())
                .or_default() += 1;
            Self::window(&mut inner).streams_reopened += 1;
        }
    }

    /// A fault is injected now: a new window begins.
    pub fn fault_started(&self, name: &str) {
        let mut inner = self.lock();
        let at = inner.start.elapsed().as_secs_f64();
        inner.windows.push(Window {
            name: name.to_owned(),
            at_secs: at,
            ..Window::default()
        });
    }

    /// The current fault ended now (its command or its heal finished).
    pub fn fault_ended(&self) {
        let mut inner = self.lock();
        let at = inner.start.elapsed().as_secs_f64();
        Self::window(&mut inner).ended_secs = Some(at);
    }

    /// A notification arrived for a counted write sent in `window`, `latency` after it. Counted
    /// even after [`Stats::end`], so notifications still in flight at the end are not lost.
    pub fn notification_delivered(&self, window: usize, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, 60_000_000);
        let mut inner = self.lock();
        inner.notifications_delivered += 1;
        let _ = inner.notification_latency.record(micros);
        if let Some(w) = inner.windows.get_mut(window) {
            w.notifications_delivered += 1;
        }
    }

    /// A notification no write accounts for.
    pub fn notification_duplicated(&self) {
        if self.is_recording() {
            let mut inner = self.lock();
            inner.notifications_duplicated += 1;
            Self::window(&mut inner).notifications_duplicated += 1;
        }
    }

    /// A notification that spent slack (see [`crate::ledger`]).
    pub fn notification_slack(&self) {
        self.lock().notifications_slack += 1;
    }

    /// Counted writes a 2026-07-28 listen missed while it was requested again, by window.
    pub fn notifications_missed(&self, windows: &[usize]) {
        self.count_in_windows(
            windows,
            |inner| &mut inner.notifications_missed,
            |w| &mut w.notifications_missed_relistening,
        );
    }

    /// Acknowledged counted writes never notified, by window (at the end of the run).
    pub fn notifications_lost(&self, windows: &[usize]) {
        self.count_in_windows(
            windows,
            |inner| &mut inner.notifications_lost,
            |w| &mut w.notifications_lost,
        );
    }

    /// Counts one for each of `windows`: in the run's `total` and in that window's `field`.
    fn count_in_windows(
        &self,
        windows: &[usize],
        total: fn(&mut Inner) -> &mut u64,
        field: fn(&mut Window) -> &mut u64,
    ) {
        let mut inner = self.lock();
        for &window in windows {
            *total(&mut inner) += 1;
            if let Some(w) = inner.windows.get_mut(window) {
                *field(w) += 1;
            }
        }
    }

    /// Slack left at the end: writes that may have notified and did not (retried attempts that
    /// were not applied, writes a re-established listen missed).
    pub fn notification_slack_unspent(&self, slack: u64) {
        self.lock().notifications_slack_unspent = slack;
    }

    /// A key that does not hold the value of its last acknowledged write.
    pub fn write_lost(&self, what: String) {
        self.lock().lost_writes.push(what);
    }

    /// Successful operations and errors so far.
    pub fn counts(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.ok, inner.errors.values().sum())
    }

    /// The final report over `measured` (the run without warm-up).
    pub fn report(&self, measured: Duration, config: serde_json::Value) -> Report {
        let inner = self.lock();
        let summarize = |h: &Histogram<u64>| Summary {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: h.value_at_quantile(0.50) as f64 / 1000.0,
            p90_ms: h.value_at_quantile(0.90) as f64 / 1000.0,
            p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
            p999_ms: h.value_at_quantile(0.999) as f64 / 1000.0,
            max_ms: h.max() as f64 / 1000.0,
        };
        let mut all = histogram();
        for h in inner.per_op.values() {
            let _ = all.add(h);
        }
        let errors: u64 = inner.errors.values().sum();
        let secs = measured.as_secs_f64().max(f64::EPSILON);
        Report {
            config,
            duration_secs: measured.as_secs_f64(),
            requests: inner.ok + errors,
            ok: inner.ok,
            errors,
            throughput_per_sec: inner.ok as f64 / secs,
            overall: summarize(&all),
            operations: inner
                .per_op
                .iter()
                .map(|(k, h)| (k.clone(), summarize(h)))
                .collect(),
            errors_by_kind: inner.errors.clone(),
            recovered_by_kind: inner.recoveries.clone(),
            notifications: Notifications {
                expected: inner.notifications_delivered + inner.notifications_lost,
                delivered: inner.notifications_delivered,
                lost: inner.notifications_lost,
                duplicated: inner.notifications_duplicated,
                missed_relistening: inner.notifications_missed,
                slack_spent: inner.notifications_slack,
                slack_unspent: inner.notifications_slack_unspent,
                latency: (inner.notifications_delivered > 0)
                    .then(|| summarize(&inner.notification_latency)),
            },
            lost_writes: inner.lost_writes.clone(),
            faults: inner
                .windows
                .iter()
                .map(|w| {
                    let mut w = w.clone();
                    w.time_to_recover_secs = w
                        .ended_secs
                        .map(|ended| w.disturbed.map_or(0.0, |(_, last)| (last - ended).max(0.0)));
                    w
                })
                .collect(),
            timeline: inner
                .timeline
                .iter()
                .enumerate()
                .map(|(second, s)| TimelinePoint {
                    second: second as u64,
                    ok: s.ok,
                    errors: s.errors,
                    p50_ms: s
                        .latency
                        .as_ref()
                        .map(|h| h.value_at_quantile(0.5) as f64 / 1000.0),
                    p99_ms: s
                        .latency
                        .as_ref()
                        .map(|h| h.value_at_quantile(0.99) as f64 / 1000.0),
                })
                .collect(),
        }
    }
}

/// Latency summary of one operation.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Mean, ms.
    pub mean_ms: f64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
}

/// Notification accounting.
#[derive(Debug, Clone, Serialize)]
pub struct Notifications {
    /// Writes that should have notified a subscriber.
    pub expected: u64,
    /// Notifications received.
    pub delivered: u64,
    /// Acknowledged but never received.
    pub lost: u64,
    /// Received with no write to account for them.
    pub duplicated: u64,
    /// Missed by 2026-07-28 listens while they were requested again (no resumption in that era).
    pub missed_relistening: u64,
    /// Notifications of retried writes or of writes sent while a listen was re-established
    /// (see the ledger): neither expected nor duplicates.
    pub slack_spent: u64,
    /// Such writes that did not notify (not applied, or missed while re-listening).
    pub slack_unspent: u64,
    /// From sending the write to receiving the notification.
    pub latency: Option<Summary>,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct TimelinePoint {
    /// Seconds since the start (warm-up included).
    pub second: u64,
    /// Successful operations in this second.
    pub ok: u64,
    /// Failed operations in this second.
    pub errors: u64,
    /// Median latency, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, ms.
    pub p99_ms: Option<f64>,
}

/// The JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was run.
    pub config: serde_json::Value,
    /// Measured seconds (without warm-up).
    pub duration_secs: f64,
    /// Operations attempted.
    pub requests: u64,
    /// Operations that succeeded.
    pub ok: u64,
    /// Operations that failed.
    pub errors: u64,
    /// Successful operations per second.
    pub throughput_per_sec: f64,
    /// Latency over every operation.
    pub overall: Summary,
    /// Latency per operation.
    pub operations: BTreeMap<String, Summary>,
    /// Failures by kind.
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Failures the clients recovered from (retried requests, resumed streams), by kind.
    pub recovered_by_kind: BTreeMap<String, u64>,
    /// Notification delivery.
    pub notifications: Notifications,
    /// Keys that did not hold the value of their last acknowledged write at the end.
    pub lost_writes: Vec<String>,
    /// Per fault (and `steady` before the first): what the clients saw.
    pub faults: Vec<Window>,
    /// Per-second throughput and latency.
    pub timeline: Vec<TimelinePoint>,
}

impl Report {
    /// The human-readable summary table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{} requests in {:.1} s: {:.0} ok/s, {} errors\n\n",
            self.requests, self.duration_secs, self.throughput_per_sec, self.errors
        ));
        out.push_str(&format!(
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "operation", "count", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        ));
        let mut rows: Vec<(&str, &Summary)> = self
            .operations
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        rows.push(("(all)", &self.overall));
        if let Some(latency) = &self.notifications.latency {
            rows.push(("notification delivery", latency));
        }
        for (name, s) in rows {
            out.push_str(&format!(
                "{:<28} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n",
                name, s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
            ));
        }
        if !self.errors_by_kind.is_empty() {
            out.push_str("\nerrors:\n");
            for (kind, count) in &self.errors_by_kind {
                out.push_str(&format!("  {kind:<40} {count}\n"));
            }
        }
        if !self.recovered_by_kind.is_empty() {
            out.push_str("\nrecovered by the clients (not errors):\n");
            for (kind, count) in &self.recovered_by_kind {
                out.push_str(&format!("  {kind:<40} {count}\n"));
            }
        }
        let n = &self.notifications;
        if n.expected > 0 {
            out.push_str(&format!(
                "\nnotifications: {} expected, {} delivered, {} lost, {} duplicated; {} missed while a listen was requested again; {} of retried writes\n",
                n.expected, n.delivered, n.lost, n.duplicated, n.missed_relistening, n.slack_spent
            ));
        }
        if !self.lost_writes.is_empty() {
            out.push_str(&format!("\nLOST WRITES: {:?}\n", self.lost_writes));
        }
        if self.faults.len() > 1 {
            out.push_str(&self.fault_table());
        }
        out
    }

    /// The table of fault windows, with each one's last disturbance.
    fn fault_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "\n{:<26} {:>6} {:>6} {:>7} {:>6} {:>7} {:>8} {:>8} {:>9} {:>5} {:>5} {:>7} {:>9}\n",
            "fault",
            "at s",
            "end s",
            "ok",
            "failed",
            "retried",
            "recovered",
            "reopened",
            "delivered",
            "lost",
            "dupl",
            "missed",
            "recover s"
        ));
        for w in &self.faults {
            out.push_str(&format!(
                "{:<26} {:>6.1} {:>6} {:>7} {:>6} {:>7} {:>8} {:>8} {:>9} {:>5} {:>5} {:>7} {:>9}\n",
                w.name.chars().take(26).collect::<String>(),
                w.at_secs,
                w.ended_secs.map_or("-".to_owned(), |s| format!("{s:.1}")),
                w.ok,
                w.failed,
                w.retried,
                w.recovered,
                w.streams_reopened,
                w.notifications_delivered,
                w.notifications_lost,
                w.notifications_duplicated,
                w.notifications_missed_relistening,
                w.time_to_recover_secs.map_or("-".to_owned(), |s| format!("{s:.1}")),
            ));
        }
        for w in &self.faults {
            if let (Some((_, last)), Some(what)) = (w.disturbed, &w.last_disturbance) {
                out.push_str(&format!(
                    "last disturbance of \"{}\": {what} at {last:.2} s\n",
                    w.name
                ));
            }
        }
        out
    }
}
