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

#[derive(Debug)]
struct Inner {
    start: Instant,
    per_op: BTreeMap<String, Histogram<u64>>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    recoveries: BTreeMap<String, u64>,
    notification_latency: Histogram<u64>,
    notifications_expected: u64,
    notifications_delivered: u64,
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
                notifications_expected: 0,
                notifications_delivered: 0,
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
        *inner.errors.entry(kind.into()).or_default() += 1;
        Self::second(&mut inner, at).errors += 1;
    }

    /// A failure the client recovered from (a retried request, a resumed stream), by kind. Not an
    /// error: the operation went on to succeed or fail on its own account.
    pub fn recovered(&self, kind: impl Into<String>) {
        if self.is_recording() {
            *self.lock().recoveries.entry(kind.into()).or_default() += 1;
        }
    }

    /// A write whose notification some subscriber should receive.
    pub fn notification_expected(&self) {
        if self.is_recording() {
            self.lock().notifications_expected += 1;
        }
    }

    /// A notification arrived `latency` after its write was sent. Counted even after
    /// [`Stats::end`], so notifications still in flight at the end are not reported lost.
    pub fn notification_delivered(&self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, 60_000_000);
        let mut inner = self.lock();
        inner.notifications_delivered += 1;
        let _ = inner.notification_latency.record(micros);
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
                expected: inner.notifications_expected,
                delivered: inner.notifications_delivered,
                lost: inner
                    .notifications_expected
                    .saturating_sub(inner.notifications_delivered),
                latency: (inner.notifications_delivered > 0)
                    .then(|| summarize(&inner.notification_latency)),
            },
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
    /// Expected but never received.
    pub lost: u64,
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
        if self.notifications.expected > 0 {
            out.push_str(&format!(
                "\nnotifications: {} expected, {} delivered, {} lost\n",
                self.notifications.expected, self.notifications.delivered, self.notifications.lost
            ));
        }
        out
    }
}
