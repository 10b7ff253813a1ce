//! The cluster-aware session manager: what makes any replica serve any request of a legacy
//! (sessionful) client.
//!
//! It wraps rmcp's [`LocalSessionManager`], which keeps a session's handler and worker in memory on
//! one replica, and changes what must be cluster-wide (see `docs/architecture.md` for the request
//! paths and their Redis round trips):
//!
//! - **Liveness.** A session exists while its Redis record exists. [`has_session`] slides the
//!   record's TTL on every request and drops the local worker of a session deleted or expired
//!   elsewhere; a replica without a worker restores one from the record (rmcp's restore replay).
//! - **The GET stream** is a [`feed`] over the session's event log in Redis, not the local worker's
//!   channel: every server-to-client message not tied to a request (resource updates, list changes,
//!   log messages, unassociated server requests) is appended to the log by whichever replica raises
//!   it, and reaches the client on whichever replica holds its GET stream. `Last-Event-ID` resumes it
//!   on any replica with nothing lost or repeated.
//! - **Responses to server requests** (sampling, elicitation) may reach any replica: the ids of
//!   server requests carry the sending replica's tag, so the receiving replica forwards the client's
//!   response over the bus to the replica waiting for it.
//! - **Cancellation** reaches the replica running the request: `notifications/cancelled` is
//!   delivered locally and broadcast to the others.
//! - **Closing** a worker (idle, shutdown) is local; only DELETE ([`ClusterSessionManager::delete`])
//!   and expiry end a session everywhere.
//! - **Admission**: the replica's session cap ([`ClusterSessionManager::is_full`]), and the stream
//!   slots every GET stream holds while it is open.
//!
//! [`has_session`]: ClusterSessionManager::has_session
//! [`feed`]: shoal_shared::feed

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::mcp::trace::{delivery_span, traced_update};
use crate::{
    mcp::error::{ClusterError, StatusOverride, override_status},
    principal::Principal,
    state::{StreamSlot, StreamSlots},
};
use futures::{Stream, StreamExt};
use rmcp::{
    RoleServer,
    model::{
        ClientJsonRpcMessage, ClientNotification, ClientRequest, GetExtensions, JsonRpcMessage,
        RequestId, ServerJsonRpcMessage, ServerNotification,
    },
    service::{RxJsonRpcMessage, TxJsonRpcMessage},
    transport::{
        Transport, WorkerTransport,
        streamable_http_server::{
            SessionId, SessionManager,
            session::{
                EventStore, RestoreOutcome, ServerSseMessage, SessionRestoreMarker,
                local::{
                    LocalSessionManager, LocalSessionManagerError, LocalSessionWorker, SessionError,
                },
            },
        },
    },
};
use shoal_shared::{
    backend::{Backend, BackendError},
    bus::ControlMessage,
    feed::{self, FeedItem, FeedOptions},
    ids::{ClientEventId, ReplicaTag},
    metrics::Metrics,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Settings of the cluster session manager.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Feeds (GET streams).
    pub feed: FeedOptions,
    /// SSE `retry:` sent with the first event of a fresh GET stream.
    pub sse_retry: Duration,
    /// Maximum session workers held by this replica.
    pub max_local_sessions: usize,
    /// How long after sliding a session's TTL in the shared state this replica trusts its own
    /// worker without sliding it again (zero: every request slides it).
    pub touch_interval: Duration,
    /// The replica's stream slots, shared with the handler.
    pub streams: StreamSlots,
    /// Where the sessions' pumps run, and what stops them (the replica's background tasks:
    /// shutdown stops them and waits for them).
    pub(crate) background: crate::background::Background,
}

/// The session manager mounted in rmcp's `StreamableHttpService`.
pub struct ClusterSessionManager {
    local: LocalSessionManager,
    backend: Backend,
    bus: shoal_shared::bus::Bus,
    metrics: Metrics,
    tag: Arc<ReplicaTag>,
    options: ClusterOptions,
    /// When this replica last slid each of its sessions' TTL (taken before the command was sent).
    /// One entry per local worker: removed with the worker.
    touched: std::sync::Mutex<HashMap<SessionId, Instant>>,
    /// The principal owning each session this replica serves (a session's owner never changes):
    /// filled at `initialize` and at the first request a replica sees of a session; an entry goes
    /// with the local worker, and the map is pruned to the local workers when it reaches
    /// twice `max_local_sessions`.
    owners: std::sync::Mutex<HashMap<SessionId, Arc<str>>>,
}

impl std::fmt::Debug for ClusterSessionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSessionManager")
            .field("replica", &self.tag)
            .finish_non_exhaustive()
    }
}

impl ClusterSessionManager {
    /// A manager whose local workers idle out after `worker_idle`.
    pub fn new(
        backend: Backend,
        bus: shoal_shared::bus::Bus,
        metrics: Metrics,
        worker_idle: Duration,
        options: ClusterOptions,
    ) -> Self {
        let mut local = LocalSessionManager::default();
        local.session_config.keep_alive = Some(worker_idle);
        local.session_config.sse_retry = Some(options.sse_retry);
        // A session that never sends `initialize` after creation frees its slot quickly.
        local.session_config.init_timeout = Some(Duration::from_secs(30));
        let tag = Arc::new(bus.tag().clone());
        Self {
            local,
            backend,
            bus,
            metrics,
            tag,
            options,
            touched: std::sync::Mutex::default(),
            owners: std::sync::Mutex::default(),
        }
    }

    fn touched(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Instant>> {
        self.touched.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<str>>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The principal id owning `session`, from memory or else the shared record; `None` when the
    /// session does not exist (or predates owners).
    ///
    /// # Errors
    /// The shared state is unavailable.
    pub async fn owner(&self, session: &str) -> Result<Option<Arc<str>>, BackendError> {
        if let Some(owner) = self.owners().get(session) {
            return Ok(Some(owner.clone()));
        }
        let Some(owner) = self.backend.session_owner(session).await? else {
            return Ok(None);
        };
        let owner: Arc<str> = Arc::from(owner);
        let limit = self.options.max_local_sessions.saturating_mul(2);
        if self.owners().len() >= limit {
            let local = self.local.sessions.read().await;
            self.owners().retain(|id, _| local.contains_key(id));
        }
        let mut owners = self.owners();
        if owners.len() < limit {
            owners.insert(Arc::from(session), owner.clone());
        }
        Ok(Some(owner))
    }

    /// Number of session workers held by this replica.
    pub async fn local_sessions(&self) -> usize {
        self.local.sessions.read().await.len()
    }

    /// Whether this replica holds a worker for `id`.
    pub async fn has_local_session(&self, id: &str) -> bool {
        self.local.sessions.read().await.contains_key(id)
    }

    /// Drops this replica's worker of a session (it was deleted elsewhere, or by DELETE here).
    pub async fn close_local(&self, id: &str) {
        let id: SessionId = Arc::from(id);
        if let Err(error) = self.close_session(&id).await {
            tracing::debug!(%error, "closing a local session worker failed");
        }
    }

    /// Runs the control messages of the bus until the channel closes: session deletions from
    /// other replicas, and cancellations and client responses forwarded to this replica.
    pub async fn run_control(
        self: Arc<Self>,
        mut control: mpsc::Receiver<ControlMessage>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        while let Some(message) = tokio::select! {
            () = stop.cancelled() => None,
            message = control.recv() => message,
        } {
            match message {
                ControlMessage::SessionDeleted { session } => self.close_local(&session).await,
                ControlMessage::Cancel {
                    session,
                    payload,
                    trace,
                } => {
                    let span = delivery_span(
                        "notifications/cancelled deliver",
                        "notifications/cancelled",
                        Some(&session),
                        None,
                        trace.as_deref(),
                    );
                    span.wrap(self.deliver_forwarded(&session, &payload)).await;
                }
                ControlMessage::Forward {
                    session,
                    payload,
                    trace,
                } => {
                    let span = delivery_span(
                        "response deliver",
                        "response",
                        Some(&session),
                        None,
                        trace.as_deref(),
                    );
                    span.wrap(self.deliver_forwarded(&session, &payload)).await;
                }
            }
        }
    }

    async fn deliver_forwarded(&self, session: &str, payload: &str) {
        let id: SessionId = Arc::from(session);
        if !self.has_local_session(session).await {
            return; // the worker waiting for it is gone (idle, shutdown); nothing to deliver to
        }
        match serde_json::from_str::<ClientJsonRpcMessage>(payload) {
            Ok(message) => {
                if let Err(error) = self.local.accept_message(&id, message).await {
                    tracing::debug!(%error, "delivering a forwarded message failed");
                }
            }
            Err(error) => tracing::warn!(%error, "dropping an unparsable forwarded message"),
        }
    }

    /// Whether this replica holds as many session workers as it may: checked before an
    /// `initialize` reaches rmcp (a clean 503) and again when the session is created (concurrent
    /// initializes may have filled the replica meanwhile).
    pub async fn is_full(&self) -> bool {
        self.local_sessions().await >= self.options.max_local_sessions
    }

    async fn ensure_capacity(&self) -> Result<(), ClusterError> {
        if self.is_full().await {
            return Err(ClusterError::Capacity);
        }
        Ok(())
    }

    /// Ends `session` everywhere (DELETE): deletes its record, which tells every replica over the
    /// bus, closes the local worker, and waits out the TTL slides other replicas made just before,
    /// so the session is gone everywhere once the caller answers. `false` when it did not exist.
    ///
    /// # Errors
    /// The shared state is unavailable (nothing was deleted).
    pub async fn delete(&self, session: &str) -> Result<bool, BackendError> {
        let existed = self.backend.session_delete(session).await?;
        self.close_local(session).await;
        if existed {
            // Replicas that slid the session's TTL just before it was deleted trust that slide
            // for this long (unless the bus told them first).
            tokio::time::sleep(self.options.touch_interval).await;
        }
        Ok(existed)
    }

    fn wrap_transport(&self, inner: WorkerTransport<LocalSessionWorker>) -> ClusterTransport {
        ClusterTransport {
            inner,
            tag: self.tag.clone(),
        }
    }

    /// Copies what the local worker sends on its own "common" channel (notifications and requests
    /// not tied to a client request) into the session's event log, where the GET stream picks it
    /// up on whichever replica holds it.
    async fn start_pump(&self, id: &SessionId) -> Result<(), ClusterError> {
        let stream = self.local.create_standalone_stream(id).await?;
        let backend = self.backend.clone();
        let session = id.to_string();
        let stop = self.options.background.stop.clone();
        self.options.background.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = tokio::select! {
                () = stop.cancelled() => None,
                event = stream.next() => event,
            } {
                let Some(message) = event.message else {
                    continue;
                };
                let payload = match serde_json::to_string(message.as_ref()) {
                    Ok(payload) => payload,
                    Err(error) => {
                        tracing::warn!(%error, "dropping an unserializable server message");
                        continue;
                    }
                };
                match backend.event_append(&session, &payload).await {
                    Ok(Some(_)) => {}
                    Ok(None) => break, // the session is gone
                    Err(error) => {
                        tracing::warn!(error = %error, "server message lost: event log unavailable");
                    }
                }
            }
        });
        Ok(())
    }

    async fn open_feed(
        &self,
        id: &SessionId,
        after: Option<shoal_shared::ids::EventId>,
    ) -> Result<FeedStream, ClusterError> {
        let receiver = feed::open(
            &self.backend,
            &self.bus,
            id,
            after,
            self.options.feed.clone(),
        )
        .await?;
        Ok(FeedStream::new(
            receiver,
            id.to_string(),
            self.options.sse_retry,
            self.options.streams.open("get"),
        ))
    }

    async fn route_response(
        &self,
        id: &SessionId,
        request_id: &RequestId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), ClusterError> {
        match decode_request_id(request_id) {
            Some((tag, _)) if tag != *self.tag => {
                let payload =
                    serde_json::to_string(&message).map_err(|_| ClusterError::BadInitialize)?;
                if !self.backend.publish_forward(&tag, id, &payload).await? {
                    // Reported, not dropped: the client learns its answer went nowhere.
                    // The session's tag, never its id (a bearer credential).
                    tracing::warn!(
                        session = shoal_shared::telemetry::session_tag(id)
                            .as_deref()
                            .unwrap_or("-"),
                        requester = tag.as_str(),
                        "a client's response found no replica waiting for it (the replica that asked is gone)"
                    );
                    self.metrics.forward_undelivered();
                    override_status(StatusOverride::RequesterGone);
                    return Err(ClusterError::RequesterGone);
                }
                self.metrics.forwarded("response");
                Ok(())
            }
            _ => Ok(self.local.accept_message(id, message).await?),
        }
    }
}

impl SessionManager for ClusterSessionManager {
    type Error = ClusterError;
    type Transport = ClusterTransport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        self.ensure_capacity().await?;
        let (id, transport) = self.local.create_session().await?;
        self.metrics.sessions_active_add(1);
        Ok((id, self.wrap_transport(transport)))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        let ClientJsonRpcMessage::Request(request) = &message else {
            return Err(ClusterError::BadInitialize);
        };
        let restoring = request
            .request
            .extensions()
            .get::<SessionRestoreMarker>()
            .is_some();
        if !restoring {
            let ClientRequest::InitializeRequest(initialize) = &request.request else {
                return Err(ClusterError::BadInitialize);
            };
            // Written before the client can learn the session id: if Redis is unavailable the
            // handshake fails instead of handing out a session no other replica knows.
            let params = serde_json::to_string(&initialize.params)
                .map_err(|_| ClusterError::BadInitialize)?;
            let owner = request
                .request
                .extensions()
                .get::<http::request::Parts>()
                .and_then(|parts| parts.extensions.get::<Principal>())
                .map_or_else(
                    || Principal::anonymous().id,
                    |principal| principal.id.clone(),
                );
            self.owners().insert(id.clone(), owner.clone());
            if let Err(error) = self.backend.session_create(id, &params, &owner).await {
                tracing::warn!(%error, "cannot record a new session");
                self.owners().remove(id);
                // Through this manager, so that the worker's count is given back too.
                let _ = self.close_session(id).await;
                return Err(error.into());
            }
        }
        let response = self.local.initialize_session(id, message).await?;
        self.start_pump(id).await?;
        if restoring {
            self.metrics.session_restored();
        } else {
            self.metrics.session_created();
        }
        Ok(response)
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        if !self.local.has_session(id).await? {
            // rmcp then restores the session from the shared record, or answers 404.
            return Ok(false);
        }
        let interval = self.options.touch_interval;
        if !interval.is_zero()
            && self
                .touched()
                .get(id)
                .is_some_and(|at| at.elapsed() < interval)
        {
            // Slid moments ago: the record cannot have expired since, and a DELETE elsewhere
            // answers only after `interval` (plus the bus drops this worker at once).
            return Ok(true);
        }
        let sent = Instant::now();
        if self.backend.session_touch(id).await? {
            if !interval.is_zero() {
                self.touched().insert(id.clone(), sent);
            }
            return Ok(true);
        }
        // Deleted or expired elsewhere: drop the worker so rmcp finds no record and answers 404.
        self.close_session(id).await?;
        Ok(false)
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        // Local only: rmcp also calls this when a worker idles out, which must not end the session
        // for the rest of the cluster. Closes race (a DELETE here closes the worker while the bus
        // brings this replica its own deletion): only the one that takes the worker out of the map
        // counts it, so the gauge never goes below the workers held.
        let handle = self.local.sessions.write().await.remove(id);
        self.touched().remove(id);
        self.owners().remove(id);
        let Some(handle) = handle else {
            return Ok(());
        };
        self.metrics.sessions_active_add(-1);
        match handle.close().await {
            // The worker already exited: nothing left to stop.
            Ok(()) | Err(SessionError::SessionServiceTerminated) => Ok(()),
            Err(error) => Err(LocalSessionManagerError::from(error).into()),
        }
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let stream = self.local.create_stream(id, message).await?;
        let prefix = format!("{id}/{}/", self.tag);
        // Event ids of request streams name the session and this replica: a resume that lands on
        // another replica is recognised as foreign instead of replaying an unrelated stream.
        Ok(stream.map(move |mut event| {
            if let Some(event_id) = event.event_id.take() {
                event.event_id = Some(format!("{prefix}{event_id}"));
            }
            event
        }))
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        match &message {
            ClientJsonRpcMessage::Response(response) => {
                let request_id = response.id.clone();
                self.route_response(id, &request_id, message).await
            }
            ClientJsonRpcMessage::Error(error) if error.id.is_some() => {
                let request_id = error.id.clone().unwrap_or(RequestId::Number(0));
                self.route_response(id, &request_id, message).await
            }
            ClientJsonRpcMessage::Notification(notification)
                if matches!(
                    notification.notification,
                    ClientNotification::CancelledNotification(_)
                ) =>
            {
                // The request may run on any replica holding a worker for the session.
                let payload =
                    serde_json::to_string(&message).map_err(|_| ClusterError::BadInitialize)?;
                self.local.accept_message(id, message).await?;
                self.backend.publish_cancel(id, &payload).await?;
                self.metrics.forwarded("cancel");
                Ok(())
            }
            _ => Ok(self.local.accept_message(id, message).await?),
        }
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.open_feed(id, None).await
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        if let Some(parsed) = ClientEventId::parse(&last_event_id) {
            if parsed.session != id.as_ref() {
                return Err(ClusterError::ForeignEventId);
            }
            return Ok(self.open_feed(id, Some(parsed.event)).await?.left_stream());
        }
        // A request stream of this replica: rmcp keeps those in the worker's memory.
        let own_prefix = format!("{id}/{}/", self.tag);
        let Some(local_id) = last_event_id.strip_prefix(&own_prefix) else {
            return Err(ClusterError::ForeignEventId);
        };
        let stream = self.local.resume(id, local_id.to_owned()).await?;
        Ok(stream
            .map(move |mut event| {
                if let Some(event_id) = event.event_id.take() {
                    event.event_id = Some(format!("{own_prefix}{event_id}"));
                }
                event
            })
            .right_stream())
    }

    async fn restore_session(
        &self,
        id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        self.ensure_capacity().await?;
        match self.local.restore_session(id).await? {
            RestoreOutcome::Restored(transport) => {
                self.metrics.sessions_active_add(1);
                Ok(RestoreOutcome::Restored(self.wrap_transport(transport)))
            }
            RestoreOutcome::AlreadyPresent => Ok(RestoreOutcome::AlreadyPresent),
            _ => Ok(RestoreOutcome::NotSupported),
        }
    }

    fn event_store(&self) -> Option<Arc<dyn EventStore>> {
        // Deliberately none: with an event store rmcp persists every stateless (2026-07-28)
        // response and stops cancelling handlers on disconnect, which would keep
        // `subscriptions/listen` handlers alive after their clients left. Legacy GET streams are
        // resumable through `resume` above instead.
        None
    }
}

/// The GET stream handed to rmcp: feed items as SSE messages. Holds a stream slot while open.
pub struct FeedStream {
    inner: ReceiverStream<FeedItem>,
    session: String,
    retry: Duration,
    _slot: StreamSlot,
}

impl FeedStream {
    fn new(
        receiver: mpsc::Receiver<FeedItem>,
        session: String,
        retry: Duration,
        slot: StreamSlot,
    ) -> Self {
        Self {
            inner: ReceiverStream::new(receiver),
            session,
            retry,
            _slot: slot,
        }
    }
}

impl Stream for FeedStream {
    type Item = ServerSseMessage;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            let item = match self.inner.poll_next_unpin(cx) {
                std::task::Poll::Ready(Some(item)) => item,
                std::task::Poll::Ready(None) => return std::task::Poll::Ready(None),
                std::task::Poll::Pending => return std::task::Poll::Pending,
            };
            match item {
                FeedItem::Start(last) => {
                    let id = ClientEventId::format(&self.session, last);
                    return std::task::Poll::Ready(Some(ServerSseMessage::priming(id, self.retry)));
                }
                FeedItem::Event(event) => {
                    match serde_json::from_str::<ServerJsonRpcMessage>(&event.payload) {
                        Ok(message) => {
                            if shoal_shared::telemetry::tracing_enabled() {
                                trace_feed_delivery(&self.session, &message);
                            }
                            let id = ClientEventId::format(&self.session, event.id);
                            return std::task::Poll::Ready(Some(ServerSseMessage::new(
                                id, message,
                            )));
                        }
                        Err(error) => {
                            tracing::warn!(%error, "skipping an unparsable logged event");
                        }
                    }
                }
            }
        }
    }
}

/// Records the delivery of a logged update to the GET stream held here, as a child of the span
/// that raised it on whichever replica (its `params._meta.traceparent`).
fn trace_feed_delivery(session: &str, message: &ServerJsonRpcMessage) {
    let Some((uri, traceparent)) = traced_update(message) else {
        return;
    };
    // Started and ended at once: the delivery is handing the message to the stream.
    drop(delivery_span(
        "notifications/resources/updated deliver",
        "notifications/resources/updated",
        Some(session),
        Some(uri),
        Some(traceparent),
    ));
}

/// The transport between rmcp's service loop and a local session worker. It tags the ids of
/// server-to-client requests with this replica, and untags them in the client's responses, so a
/// response arriving at any replica can be routed back here.
pub struct ClusterTransport {
    inner: WorkerTransport<LocalSessionWorker>,
    tag: Arc<ReplicaTag>,
}

impl Transport<RoleServer> for ClusterTransport {
    type Error = <WorkerTransport<LocalSessionWorker> as Transport<RoleServer>>::Error;

    fn send(
        &mut self,
        mut item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        match &mut item {
            JsonRpcMessage::Request(request) => {
                request.id = encode_request_id(&self.tag, &request.id)
            }
            JsonRpcMessage::Notification(notification) => {
                if let ServerNotification::CancelledNotification(cancelled) =
                    &mut notification.notification
                    && let Some(request_id) = &cancelled.params.request_id
                {
                    cancelled.params.request_id = Some(encode_request_id(&self.tag, request_id));
                }
            }
            _ => {}
        }
        self.inner.send(item)
    }

    fn receive(&mut self) -> impl Future<Output = Option<RxJsonRpcMessage<RoleServer>>> + Send {
        let tag = self.tag.clone();
        let next = self.inner.receive();
        async move {
            let mut message = next.await?;
            match &mut message {
                JsonRpcMessage::Response(response) => untag(&tag, &mut response.id),
                JsonRpcMessage::Error(error) => {
                    if let Some(id) = &mut error.id {
                        untag(&tag, id);
                    }
                }
                _ => {}
            }
            Some(message)
        }
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}

fn untag(tag: &ReplicaTag, id: &mut RequestId) {
    if let Some((owner, original)) = decode_request_id(id)
        && owner == *tag
    {
        *id = original;
    }
}

/// `<tag>-<n>` for numeric ids, `<tag>-s<text>` for string ids.
fn encode_request_id(tag: &ReplicaTag, id: &RequestId) -> RequestId {
    let encoded = match id {
        RequestId::Number(n) => format!("{tag}-{n}"),
        RequestId::String(s) => format!("{tag}-s{s}"),
    };
    RequestId::String(Arc::from(encoded))
}

fn decode_request_id(id: &RequestId) -> Option<(ReplicaTag, RequestId)> {
    let RequestId::String(text) = id else {
        return None;
    };
    let (tag, rest) = text.split_once('-')?;
    let tag = ReplicaTag::parse(tag)?;
    let original = match rest.strip_prefix('s') {
        Some(text) => RequestId::String(Arc::from(text)),
        None => RequestId::Number(rest.parse().ok()?),
    };
    Some((tag, original))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_round_trip_through_tags() {
        let tag = ReplicaTag::generate();
        for original in [
            RequestId::Number(0),
            RequestId::Number(42),
            RequestId::String(Arc::from("abc-1")),
        ] {
            let encoded = encode_request_id(&tag, &original);
            assert_eq!(decode_request_id(&encoded), Some((tag.clone(), original)));
        }
        assert_eq!(decode_request_id(&RequestId::Number(3)), None);
        assert_eq!(
            decode_request_id(&RequestId::String(Arc::from("client-7"))),
            None
        );
    }

    #[test]
    fn foreign_tags_are_left_alone() {
        let mine = ReplicaTag::generate();
        let other = ReplicaTag::generate();
        let mut id = encode_request_id(&other, &RequestId::Number(5));
        let before = id.clone();
        untag(&mine, &mut id);
        assert_eq!(id, before);
        untag(&other, &mut id);
        assert_eq!(id, RequestId::Number(5));
    }
}
