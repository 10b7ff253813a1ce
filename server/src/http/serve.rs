//! The connection loop: accepts, detects HTTP/1 or h2c, bounds the number of connections and idle
//! or silent peers, and drains on shutdown.

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Body, HttpService};

/// What a connection over `SHOAL_MAX_CONNECTIONS` is told before it is closed. HTTP/1.1, which
/// every client and balancer reads (an h2c client sees a protocol error, then a closed socket).
const AT_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
Content-Type: text/plain\r\nContent-Length: 52\r\nConnection: close\r\n\r\n\
Service Unavailable: this replica has no free connection slot\n";

/// How long writing [`AT_CAPACITY`] may take before the connection is simply dropped.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Accepts connections until `shutdown` resolves, then drains: stops accepting, lets `on_drain`
/// end the long-lived streams, and waits up to `grace` for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    service: HttpService,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    on_drain: impl FnOnce(),
) {
    let header_read_timeout =
        Duration::from_millis(service.state.config.http.header_read_timeout_ms);
    let slots = Arc::new(Semaphore::new(service.state.config.http.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    // h2c: pings find peers that vanished without closing (no FIN), so their streams end.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let connections = TaskTracker::new();
    let draining = CancellationToken::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        service.state.metrics.http_rejection("connections_full");
                        connections.spawn(refuse(stream));
                        continue;
                    };
                    let service = service.clone();
                    let builder = builder.clone();
                    let draining = draining.clone();
                    connections.spawn(async move {
                        connection(stream, service, builder, header_read_timeout, draining).await;
                        drop(slot);
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    on_drain();
    draining.cancel();
    connections.close();
    match tokio::time::timeout(grace, connections.wait()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(
            grace_secs = grace.as_secs(),
            "grace period over; cutting remaining connections"
        ),
    }
}

/// Tells a connection over the limit so, then closes it.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(AT_CAPACITY).await?;
        stream.shutdown().await
    })
    .await;
}

/// Serves one connection until it ends, the replica drains (a graceful shutdown: in-flight
/// requests finish), or it has had no open request for `idle_timeout`. HTTP/1 bounds its idle
/// keep-alive time itself (its header read timeout); an h2c connection is closed with a GOAWAY.
async fn connection(
    stream: TcpStream,
    service: HttpService,
    builder: auto::Builder<TokioExecutor>,
    idle_timeout: Duration,
    draining: CancellationToken,
) {
    // rmcp writes an SSE reply in several small writes: without NODELAY, Nagle's algorithm holds
    // each reply for the client's delayed ACK (~40 ms).
    let _ = stream.set_nodelay(true);
    // Protocol detection (HTTP/1 or h2c) waits for the first bytes without a limit: a connection
    // that sends nothing is closed after the header read timeout instead of being held forever.
    let mut first = [0_u8; 1];
    match tokio::time::timeout(idle_timeout, stream.peek(&mut first)).await {
        Ok(Ok(read)) if read > 0 => {}
        _ => return,
    }
    let open = Arc::new(AtomicUsize::new(0));
    let activity = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let open = open.clone();
        let activity = activity.clone();
        hyper::service::service_fn(move |request| {
            let service = service.clone();
            let guard = OpenRequest::new(&open, &activity);
            async move {
                let response = service.handle(request).await;
                // Open until its body ends (a stream lasts as long as the stream).
                Ok::<_, Infallible>(response.map(|body| guard.hold(body)))
            }
        })
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), handler);
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    // Armed when an idle connection was told to close: an h2 GOAWAY waits for the peer to answer
    // a PING before the connection ends, which a silent peer never does; it is dropped after this.
    let mut told_to_close = false;
    let close_by = tokio::time::sleep(Duration::from_secs(86_400));
    let mut close_by = std::pin::pin!(close_by);
    loop {
        let idle = async {
            loop {
                // Woken by every request that starts or ends after this point (a `Notified`
                // receives `notify_waiters` from its creation on, polled or not).
                let changed = activity.notified();
                if open.load(Ordering::Acquire) == 0 {
                    if tokio::time::timeout(idle_timeout, changed).await.is_err() {
                        return;
                    }
                } else {
                    changed.await;
                }
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = draining.cancelled(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = idle, if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
                told_to_close = true;
                close_by.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
            }
            () = close_by.as_mut(), if told_to_close => {
                tracing::debug!("idle connection did not close after its GOAWAY: dropped");
                return;
            }
        }
    }
}

/// One request counted open on its connection, from its start to the end of its response body.
struct OpenRequest {
    open: Arc<AtomicUsize>,
    activity: Arc<tokio::sync::Notify>,
}

impl OpenRequest {
    fn new(open: &Arc<AtomicUsize>, activity: &Arc<tokio::sync::Notify>) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        activity.notify_waiters();
        Self {
            open: open.clone(),
            activity: activity.clone(),
        }
    }

    /// `body`, keeping this request open until it is dropped.
    fn hold(self, body: Body) -> Body {
        body.map_frame(move |frame: hyper::body::Frame<Bytes>| {
            let _ = &self;
            frame
        })
        .boxed()
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.activity.notify_waiters();
    }
}
