//! Messages on the cluster bus that need no stored state: list changes, forwarded client responses,
//! probes, cancellations.
//!
//! The operations of this concern: what [`Backend`] offers, the Redis implementation with its
//! Lua scripts, and the in-memory twin, side by side.

use fred::interfaces::PubsubInterface;

use super::{Backend, BackendResult, memory::MemoryBackend, redis::RedisBackend};
use crate::{
    bus::{BusMessage, ListKind},
    ids::ReplicaTag,
    telemetry::attr,
};

impl Backend {
    /// Broadcasts that a list changed (for `subscriptions/listen` streams).
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn list_changed(&self, list: ListKind) -> BackendResult<()> {
        delegate!(self, "list_changed", list_changed(list))
    }

    /// Sends a client's JSON-RPC response to the replica `target` that is waiting for it; `false`
    /// when no replica of that tag listens any more (it died or stopped: the request the
    /// response answers was abandoned with it).
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn publish_forward(
        &self,
        target: &ReplicaTag,
        session: &str,
        payload: &str,
    ) -> BackendResult<bool> {
        delegate!(
            self,
            "publish_forward",
            publish_forward(target, session, payload)
        )
    }

    /// Publishes a round-trip probe ([`Bus::probe`]) on this replica's own channel; its return is
    /// measured in `shoal_bus_roundtrip_seconds`.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn publish_probe(&self, probe: &str) -> BackendResult<()> {
        delegate!(self, "publish_probe", publish_probe(probe))
    }

    /// Broadcasts a client's `notifications/cancelled` to the other replicas.
    ///
    /// # Errors
    /// Fails when Redis is unreachable.
    pub async fn publish_cancel(&self, session: &str, payload: &str) -> BackendResult<()> {
        delegate!(self, "publish_cancel", publish_cancel(session, payload))
    }
}

impl RedisBackend {
    pub(super) async fn list_changed(&self, list: ListKind) -> BackendResult<()> {
        let _: i64 = self
            .client()
            .publish(
                self.inner.keys.resource_channel(),
                BusMessage::ListChanged(list).encode(),
            )
            .await?;
        Ok(())
    }

    pub(super) async fn publish_forward(
        &self,
        target: &ReplicaTag,
        session: &str,
        payload: &str,
    ) -> BackendResult<bool> {
        let receivers: i64 = self
            .bus_publisher()
            .publish(
                self.inner.keys.replica_channel(target.as_str()),
                BusMessage::Forward {
                    session,
                    trace: crate::telemetry::current_traceparent().as_deref(),
                    payload,
                }
                .encode(),
            )
            .await?;
        Ok(receivers > 0)
    }

    pub(super) async fn publish_probe(&self, probe: &str) -> BackendResult<()> {
        let receivers: i64 = self
            .bus_publisher()
            .publish(
                self.inner.keys.replica_channel(self.inner.origin.as_str()),
                probe,
            )
            .await?;
        if receivers == 0 {
            // Not even this replica heard it where it was published: on a Redis Cluster, the
            // prefix's slot moved (a planned failover, a migration) and the bus subscription is
            // still on the node that had it.
            self.bus_misplaced();
        }
        Ok(())
    }

    pub(super) async fn publish_cancel(&self, session: &str, payload: &str) -> BackendResult<()> {
        let _: i64 = self
            .client()
            .publish(
                self.inner.keys.control_channel(),
                BusMessage::Cancel {
                    origin: self.inner.origin.as_str(),
                    session,
                    trace: crate::telemetry::current_traceparent().as_deref(),
                    payload,
                }
                .encode(),
            )
            .await?;
        Ok(())
    }
}

impl MemoryBackend {
    pub(super) fn list_changed(&self, list: ListKind) {
        self.publish(
            &self.inner.bus.keys().resource_channel(),
            &BusMessage::ListChanged(list).encode(),
        );
    }

    pub(super) fn publish_forward(
        &self,
        target: &ReplicaTag,
        session: &str,
        payload: &str,
    ) -> bool {
        // One process: a tag other than ours names a replica (an earlier run) nobody hears.
        if target.as_str() != self.inner.bus.tag().as_str() {
            return false;
        }
        self.publish(
            &self.inner.bus.keys().replica_channel(target.as_str()),
            &BusMessage::Forward {
                session,
                trace: crate::telemetry::current_traceparent().as_deref(),
                payload,
            }
            .encode(),
        );
        true
    }

    pub(super) fn publish_probe(&self, probe: &str) {
        self.publish(
            &self
                .inner
                .bus
                .keys()
                .replica_channel(self.inner.bus.tag().as_str()),
            probe,
        );
    }

    pub(super) fn publish_cancel(&self, session: &str, payload: &str) {
        // One replica: nothing else can run the request.
        let _ = (session, payload);
    }
}
