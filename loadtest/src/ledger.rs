//! Notification and write accounting for subscribed runs.
//!
//! Every session writes (`kv_set`) one key another session is subscribed to, one write at a time,
//! so each key has one writer and one reader and its notifications arrive in write order. A
//! notification names only the resource, so the ledger counts per key: each write sent joins the
//! key's queue; each notification received takes the oldest one (its delivery latency measured
//! from that write). What is left at the end, acknowledged, was lost.
//!
//! Some writes may or may not notify, and must be neither lost nor duplicates when they do:
//!
//! - an attempt that failed without a clear answer (transport error, 502/504, a response stream
//!   that ended early, a 503 from a Redis that was frozen and will run the command later) may
//!   have been applied, and its retry applies it again;
//! - a 2026-07-28 listen that ended and is requested again has no resumption: what was in flight
//!   when it ended, and what is written until the new listen is acknowledged, is missed by the
//!   protocol's design (counted apart from losses).
//!
//! Each adds one to the key's *slack*: a notification that finds the queue empty spends slack
//! before it counts as a duplicate. (Counting per key cannot tell which write a notification
//! belongs to: a loss hidden by slack on the same key is possible, bounded by the slack spent,
//! which the report shows.)
//!
//! Writes are also checked for loss at the end: each key must hold the value of its last
//! acknowledged write (unless a later write failed without a clear answer).

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

/// One write waiting for its notification.
#[derive(Debug)]
struct Write {
    id: u64,
    sent: Instant,
    /// The report window it was sent in, when it is counted (sent while recording).
    window: Option<usize>,
    acked: bool,
}

#[derive(Debug, Default)]
struct Key {
    queue: VecDeque<Write>,
    slack: u64,
    /// A 2026-07-28 listen ended and its replacement is not acknowledged yet.
    relistening: bool,
    /// The value of the last acknowledged write, and whether a later write's outcome is unknown.
    last_acked: Option<String>,
    uncertain_after: bool,
}

/// What happened to a notification the ledger was given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Received {
    /// It matched a counted write, sent in `window`, `latency` ago.
    Delivered {
        /// The window the write was sent in.
        window: usize,
        /// From sending the write to receiving its notification.
        latency: Duration,
    },
    /// It matched a write sent before recording began.
    Uncounted,
    /// It matched nothing but the slack of retried or unacknowledged-listen writes.
    Slack,
    /// It matched nothing: the server sent it twice.
    Duplicate,
}

/// The per-key accounting of one run.
#[derive(Debug, Default)]
pub struct Ledger {
    keys: Mutex<HashMap<String, Key>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Ledger {
    fn with<R>(&self, key: &str, f: impl FnOnce(&mut Key) -> R) -> R {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        f(keys.entry(key.to_owned()).or_default())
    }

    /// A write to `key` is about to be sent; `window` when it is counted. Returns its ticket, or
    /// `None` when the key's listen is being re-established (the write may be missed by design:
    /// it only adds slack).
    pub fn sent(&self, key: &str, window: Option<usize>) -> Option<u64> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.with(key, |k| {
            if k.relistening {
                k.slack += 1;
                return None;
            }
            k.queue.push_back(Write {
                id,
                sent: Instant::now(),
                window,
                acked: false,
            });
            Some(id)
        })
    }

    /// An attempt of a write to `key` failed without a clear answer (it may have been applied and
    /// notify): one more notification is not a duplicate.
    pub fn uncertain(&self, key: &str) {
        self.with(key, |k| {
            k.slack += 1;
            k.uncertain_after = true;
        });
    }

    /// The write `ticket` to `key` was acknowledged with `value`.
    pub fn acked(&self, key: &str, ticket: Option<u64>, value: &str) {
        self.with(key, |k| {
            if let Some(write) = k.queue.iter_mut().find(|w| Some(w.id) == ticket) {
                write.acked = true;
            }
            k.last_acked = Some(value.to_owned());
            k.uncertain_after = false;
        });
    }

    /// The write `ticket` to `key` failed for good: it leaves the queue (it may still notify, as
    /// slack).
    pub fn failed(&self, key: &str, ticket: Option<u64>) {
        self.with(key, |k| {
            if let Some(at) = k.queue.iter().position(|w| Some(w.id) == ticket) {
                k.queue.remove(at);
                k.slack += 1;
            }
            k.uncertain_after = true;
        });
    }

    /// A notification for `key` arrived.
    pub fn received(&self, key: &str) -> Received {
        self.with(key, |k| match k.queue.pop_front() {
            Some(Write {
                window: Some(window),
                sent,
                ..
            }) => Received::Delivered {
                window,
                latency: sent.elapsed(),
            },
            Some(_) => Received::Uncounted,
            None if k.slack > 0 => {
                k.slack -= 1;
                Received::Slack
            }
            None => Received::Duplicate,
        })
    }

    /// The 2026-07-28 listen of `key` ended: what it had not delivered yet is missed (it may
    /// still arrive on the new listen, as slack). Returns the counted writes missed, by window.
    pub fn listen_ended(&self, key: &str) -> Vec<usize> {
        self.with(key, |k| {
            k.relistening = true;
            let missed: Vec<Write> = k.queue.drain(..).collect();
            k.slack += missed.len() as u64;
            missed.into_iter().filter_map(|w| w.window).collect()
        })
    }

    /// The new listen of `key` was acknowledged: writes from now on are expected again.
    pub fn listen_acknowledged(&self, key: &str) {
        self.with(key, |k| k.relistening = false);
    }

    /// Acknowledged counted writes still waiting for their notification.
    pub fn waiting(&self) -> usize {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.values()
            .flat_map(|k| &k.queue)
            .filter(|w| w.acked && w.window.is_some())
            .count()
    }

    /// The lost notifications: acknowledged counted writes never notified, by window.
    pub fn lost(&self) -> Vec<usize> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.values()
            .flat_map(|k| &k.queue)
            .filter(|w| w.acked)
            .filter_map(|w| w.window)
            .collect()
    }

    /// Slack left unspent (writes that may have notified and did not), over every key.
    pub fn unspent_slack(&self) -> u64 {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.values().map(|k| k.slack).sum()
    }

    /// The keys whose last acknowledged value must be what the server holds now.
    pub fn expected_values(&self) -> Vec<(String, String)> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.iter()
            .filter(|(_, k)| !k.uncertain_after)
            .filter_map(|(key, k)| k.last_acked.clone().map(|value| (key.clone(), value)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_match_writes_in_order_and_the_rest_is_lost() {
        let ledger = Ledger::default();
        let first = ledger.sent("k", Some(0));
        let second = ledger.sent("k", Some(1));
        ledger.acked("k", first, "a");
        ledger.acked("k", second, "b");
        assert!(matches!(
            ledger.received("k"),
            Received::Delivered { window: 0, .. }
        ));
        assert_eq!(ledger.waiting(), 1);
        assert_eq!(ledger.lost(), vec![1]);
        assert_eq!(ledger.expected_values(), vec![("k".into(), "b".into())]);
        assert!(matches!(
            ledger.received("k"),
            Received::Delivered { window: 1, .. }
        ));
        assert_eq!(ledger.received("k"), Received::Duplicate);
        assert!(ledger.lost().is_empty());
    }

    #[test]
    fn a_retried_write_may_notify_twice_without_a_duplicate() {
        let ledger = Ledger::default();
        let ticket = ledger.sent("k", Some(0));
        ledger.uncertain("k");
        ledger.acked("k", ticket, "a");
        assert!(matches!(ledger.received("k"), Received::Delivered { .. }));
        assert_eq!(ledger.received("k"), Received::Slack);
        assert_eq!(ledger.received("k"), Received::Duplicate);
    }

    #[test]
    fn a_failed_write_leaves_the_queue_and_makes_the_last_value_uncertain() {
        let ledger = Ledger::default();
        let ok = ledger.sent("k", Some(0));
        ledger.acked("k", ok, "a");
        let failed = ledger.sent("k", Some(0));
        ledger.failed("k", failed);
        assert!(ledger.expected_values().is_empty());
        assert!(matches!(ledger.received("k"), Received::Delivered { .. }));
        assert!(ledger.lost().is_empty());
        assert_eq!(ledger.unspent_slack(), 1);
    }

    #[test]
    fn a_listen_that_ends_misses_what_it_had_not_delivered() {
        let ledger = Ledger::default();
        let pending = ledger.sent("k", Some(2));
        ledger.acked("k", pending, "a");
        assert_eq!(ledger.listen_ended("k"), vec![2]);
        assert_eq!(ledger.sent("k", Some(2)), None, "missed while re-listening");
        ledger.listen_acknowledged("k");
        let after = ledger.sent("k", Some(3));
        ledger.acked("k", after, "c");
        assert!(matches!(
            ledger.received("k"),
            Received::Delivered { window: 3, .. }
        ));
        assert_eq!(ledger.received("k"), Received::Slack);
        assert!(ledger.lost().is_empty());
    }
}
