//! The connection loop: accepts, detects HTTP/1 or h2c, bounds the number of connections and idle
//! or silent peers, and drains on shutdown.

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
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
    let timeouts = Timeouts {
        header_read: Duration::from_millis(service.state.config.http.header_read_timeout_ms),
        idle: Duration::from_secs(service.state.config.http.idle_timeout_secs),
    };
    let slots = Arc::new(Semaphore::new(service.state.config.http.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own header read timeout runs from the end of the previous request, so it would close
    // idle keep-alive connections after it: the connection loop below times idleness and header
    // reading apart instead.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
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
                        connection(stream, service, builder, timeouts, draining).await;
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

/// How long a connection may take to send a request's headers, and how long it may stay idle.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header_read: Duration,
    idle: Duration,
}

/// Serves one connection until it ends, the replica drains (a graceful shutdown: in-flight
/// requests finish), it has had no open request for the idle timeout, or (HTTP/1) a request it
/// began has not brought its headers within the header read timeout. An h2c connection is closed
/// with a GOAWAY.
async fn connection(
    stream: TcpStream,
    service: HttpService,
    builder: auto::Builder<TokioExecutor>,
    timeouts: Timeouts,
    draining: CancellationToken,
) {
    // rmcp writes an SSE reply in several small writes: without NODELAY, Nagle's algorithm holds
    // each reply for the client's delayed ACK (~40 ms).
    let _ = stream.set_nodelay(true);
    // Protocol detection (HTTP/1 or h2c) waits for the first bytes without a limit: a connection
    // that sends nothing is closed after the header read timeout instead of being held forever.
    // h2c (prior knowledge) begins with its preface, `PRI * HTTP/2.0`; an h2c connection has no
    // request headers to time between its requests (its frames arrive while idle).
    let mut first = [0_u8; 3];
    let h2 = match tokio::time::timeout(timeouts.header_read, stream.peek(&mut first)).await {
        Ok(Ok(read)) if read > 0 => read == 3 && first == *b"PRI",
        _ => return,
    };
    let open = Arc::new(AtomicUsize::new(0));
    let activity = Arc::new(tokio::sync::Notify::new());
    // Set when bytes arrive, cleared when a request starts: bytes that have not (yet) become a
    // request, such as a request's first byte (the peek above) or headers still coming.
    let begun = Arc::new(AtomicBool::new(true));
    let handler = {
        let open = open.clone();
        let activity = activity.clone();
        let begun = begun.clone();
        hyper::service::service_fn(move |request| {
            let service = service.clone();
            begun.store(false, Ordering::Release);
            let guard = OpenRequest::new(&open, &activity);
            async move {
                let response = service.handle(request).await;
                // Open until its body ends (a stream lasts as long as the stream).
                Ok::<_, Infallible>(response.map(|body| guard.hold(body)))
            }
        })
    };
    let io = TokioIo::new(Watched {
        inner: stream,
        begun: begun.clone(),
        open: open.clone(),
    });
    let connection = builder.serve_connection_with_upgrades(io, handler);
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    // Armed when an idle connection was told to close: an h2 GOAWAY waits for the peer to answer
    // a PING before the connection ends, which a silent peer never does; it is dropped after this.
    let mut told_to_close = false;
    let close_by = tokio::time::sleep(Duration::from_secs(86_400));
    let mut close_by = std::pin::pin!(close_by);
    loop {
        // Ends when the connection should close: idle for the idle timeout, or (HTTP/1) bytes of a
        // new request arrived but not the request within the header read timeout. Reads only set
        // a flag (no wake-up per request): an idle connection looks at it every half header read
        // timeout, and closes one whose request has not started for three looks in a row (its
        // first byte came between 1 and 1.5 header read timeouts before).
        let quiet = async {
            let tick = (timeouts.header_read / 2).max(Duration::from_millis(1));
            loop {
                // Woken by every request that starts or ends after this point (a `Notified`
                // receives `notify_waiters` from its creation on, polled or not).
                let changed = activity.notified();
                if open.load(Ordering::Acquire) > 0 {
                    changed.await;
                    continue;
                }
                let mut changed = std::pin::pin!(changed);
                let idle_since = tokio::time::Instant::now();
                let mut looks = 0;
                loop {
                    if tokio::time::timeout(tick, changed.as_mut()).await.is_ok() {
                        break;
                    }
                    if !h2 && begun.load(Ordering::Acquire) {
                        looks += 1;
                        if looks == 3 {
                            return Quiet::SlowHeaders;
                        }
                    } else if idle_since.elapsed() >= timeouts.idle {
                        return Quiet::Idle;
                    }
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
            why = quiet, if !closing => match why {
                Quiet::Idle => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                    told_to_close = true;
                    close_by.as_mut().reset(tokio::time::Instant::now() + timeouts.header_read);
                }
                Quiet::SlowHeaders => {
                    tracing::debug!("request headers not received in time: connection closed");
                    return;
                }
            },
            () = close_by.as_mut(), if told_to_close => {
                tracing::debug!("idle connection did not close after its GOAWAY: dropped");
                return;
            }
        }
    }
}

/// Why a connection with no open request is closed.
enum Quiet {
    /// Nothing for the idle timeout.
    Idle,
    /// A request began but its headers did not arrive within the header read timeout.
    SlowHeaders,
}

/// The connection's socket, noting when bytes arrive while no request is open (a request beginning
/// on an idle kept-alive connection).
struct Watched {
    inner: TcpStream,
    begun: Arc<AtomicBool>,
    /// Requests open: bytes read while one is (its body, or the next request's start read
    /// with it) do not start the header clock.
    open: Arc<AtomicUsize>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before && self.open.load(Ordering::Acquire) == 0 {
            self.begun.store(true, Ordering::Release);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
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
