//! The replica's background tasks (pollers, the watchdog, quota renewals, session pumps...):
//! spawned under one tracker and stopped by one token, so shutdown stops every one of them and
//! waits until they have ended before it closes the connections they use.

use std::time::Duration;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The replica's background tasks: spawned under one tracker and stopped by one token, so that
/// shutdown can stop them and wait until every one has ended (quota releases flushed, pollers out
/// of their last round) before it closes the connections they use.
#[derive(Debug, Clone, Default)]
pub struct Background {
    /// The tracked tasks.
    pub tasks: TaskTracker,
    /// Cancelled at shutdown: every task ends at its next await on it.
    pub stop: CancellationToken,
}

/// How long shutdown waits for the background tasks to end (each ends at its next await on the
/// stop token; one inside a Redis command waits at most its timeout).
const BACKGROUND_GRACE: Duration = Duration::from_secs(5);

impl Background {
    /// Runs `task` in the background, tracked.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Stops every task and waits for them, at most [`BACKGROUND_GRACE`].
    pub async fn finish(&self) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(BACKGROUND_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.tasks.len(),
                "background tasks still running after {BACKGROUND_GRACE:?}; stopping anyway"
            );
        }
    }
}
