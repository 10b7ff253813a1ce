//! `subscriptions/listen` (2026-07-28): one stream per request, fed by the bus's table of local
//! listeners.
//!
//! rmcp sends the acknowledgment before it calls [`rmcp::ServerHandler::listen`], and a client may write
//! as soon as it reads the acknowledgment: a listener registered inside `listen` would miss what is
//! published in between. rmcp calls [`rmcp::ServerHandler::accepted_subscription_filter`] just before it
//! acknowledges, on the handler it made for this one request, so the listener is registered there
//! (for the filter rmcp is about to acknowledge, computed as rmcp does) and `listen` takes it from
//! the handler.

use std::sync::Mutex;

use rmcp::{ErrorData as McpError, model::SubscriptionFilter, service::SubscriptionContext};
use shoal_shared::bus::{ListKind, ListenEvent, ListenerRegistration};

use crate::mcp::{error::Failure, handler::ShoalHandler, trace};

/// At most this many listeners wait on one handler for their `listen` call. A 2026-07-28 handler
/// serves one request, so one is the usual count; past the bound, `listen` registers late.
const MAX_EARLY_LISTENERS: usize = 4;

/// What one listener receives: the resource URIs and the list kinds of its accepted filter.
#[derive(Debug, PartialEq, Eq)]
struct Interest {
    uris: Vec<String>,
    lists: Vec<ListKind>,
}

impl Interest {
    fn of(filter: &SubscriptionFilter) -> Self {
        let mut lists = Vec::new();
        if filter.tools_list_changed == Some(true) {
            lists.push(ListKind::Tools);
        }
        if filter.prompts_list_changed == Some(true) {
            lists.push(ListKind::Prompts);
        }
        if filter.resources_list_changed == Some(true) {
            lists.push(ListKind::Resources);
        }
        Self {
            uris: filter.resource_subscriptions.clone().unwrap_or_default(),
            lists,
        }
    }
}

/// Listeners registered before their acknowledgment, waiting for `listen` to take them. Dropped
/// unused (the request failed between the two), they unregister. Held by the handler itself, not
/// shared: an empty one costs no allocation on the per-request handler.
#[derive(Default)]
pub(crate) struct EarlyListeners(Mutex<Vec<(Interest, ListenerRegistration)>>);

impl EarlyListeners {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Interest, ListenerRegistration)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The listener registered for `interest`, if one waits.
    fn take(&self, interest: &Interest) -> Option<ListenerRegistration> {
        let mut waiting = self.lock();
        let index = waiting.iter().position(|(wanted, _)| wanted == interest)?;
        Some(waiting.swap_remove(index).1)
    }
}

impl ShoalHandler {
    /// Registers the listener of a `subscriptions/listen` about to be acknowledged with what rmcp
    /// computes from `requested` and this handler's `candidate` filter. A listen that `listen`
    /// will refuse (the stream limit) registers nothing.
    pub(crate) fn register_early(
        &self,
        requested: &SubscriptionFilter,
        candidate: &SubscriptionFilter,
    ) {
        let advertised = requested.supported_by(&self.tools.info.capabilities);
        let accepted = requested.intersection(candidate).intersection(&advertised);
        if self.refusal().is_some() {
            return;
        }
        let mut waiting = self.early_listeners.lock();
        if waiting.len() >= MAX_EARLY_LISTENERS {
            return;
        }
        let interest = Interest::of(&accepted);
        if let Some(registration) = self
            .state
            .bus
            .register_listener(interest.uris.clone(), interest.lists.clone())
        {
            waiting.push((interest, registration));
        }
    }

    /// Why a listen is refused here, if it is: this replica holds its stream limit. Its URIs
    /// were checked by the HTTP layer before rmcp acknowledged it (`HttpService::check_listen`).
    fn refusal(&self) -> Option<McpError> {
        self.state
            .streams
            .is_full()
            .then(|| Failure::TooManyStreams.into())
    }

    /// Serves one `subscriptions/listen` stream until the client goes away or the replica shuts its
    /// streams down (then the SDK sends the final result, so the client knows to reconnect).
    pub(crate) async fn run_listener(&self, context: &SubscriptionContext) -> Result<(), McpError> {
        let accepted = context.accepted();
        if let Some(refusal) = self.refusal() {
            return Err(refusal);
        }
        // Every URI was checked (known, subscribable, an existing table) by the HTTP layer before
        // rmcp acknowledged the listen (`HttpService::check_listen`).
        let interest = Interest::of(accepted);
        let registration = match self.early_listeners.take(&interest) {
            Some(registration) => Some(registration),
            None => self
                .state
                .bus
                .register_listener(interest.uris, interest.lists),
        };
        let Some(mut registration) = registration else {
            return Ok(()); // shutting down: end at once, the client reconnects elsewhere
        };
        let _slot = self.state.streams.open("listen");
        let shutdown = self.state.bus.stream_token();
        let sink = context.sink();
        loop {
            tokio::select! {
                () = context.cancelled() => return Ok(()),
                () = shutdown.cancelled() => return Ok(()),
                event = registration.events.recv() => {
                    let Some(event) = event else { return Ok(()) };
                    let sent = match event {
                        ListenEvent::ResourceUpdated { uri, trace: parent } => {
                            let span = trace::delivery_span(
                                "notifications/resources/updated",
                                "notifications/resources/updated",
                                None,
                                Some(&uri),
                                parent.as_deref(),
                            );
                            span.wrap(sink.notify_resource_updated(uri)).await
                        }
                        ListenEvent::ListChanged(ListKind::Tools) => sink.notify_tool_list_changed().await,
                        ListenEvent::ListChanged(ListKind::Prompts) => sink.notify_prompt_list_changed().await,
                        ListenEvent::ListChanged(ListKind::Resources) => sink.notify_resource_list_changed().await,
                    };
                    if let Err(error) = sent {
                        tracing::debug!(%error, "listen stream closed");
                        return Ok(());
                    }
                }
            }
        }
    }
}
