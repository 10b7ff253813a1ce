//! The replica's background tasks (pollers, the watchdog, quota renewals, session pumps, the bus
//! subscriber, GET-stream feeds and their final checkpoints, PostgreSQL connection resets):
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

    /// Runs `task` on `runtime`, tracked (for code that may run outside the runtime, as a drop).
    pub fn spawn_on(
        &self,
        task: impl Future<Output = ()> + Send + 'static,
        runtime: &tokio::runtime::Handle,
    ) {
        self.tasks.spawn_on(task, runtime);
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

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn finish_waits_for_work_a_task_does_after_the_stop() {
        let background = Background::default();
        let flushed = Arc::new(AtomicBool::new(false));
        let (stop, done) = (background.stop.clone(), flushed.clone());
        background.spawn(async move {
            stop.cancelled().await;
            // The last flush after the stop (as the quota loop's releases): finish waits for it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            done.store(true, Ordering::SeqCst);
        });
        background.finish().await;
        assert!(flushed.load(Ordering::SeqCst));
        assert!(background.tasks.is_empty());
    }
}
