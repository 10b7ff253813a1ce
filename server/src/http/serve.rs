//! The connection loop: accepts, detects HTTP/1 or h2c, bounds idle and silent peers, and drains
//! on shutdown.

use std::{convert::Infallible, future::Future, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::TcpListener;

use super::HttpService;

/// Accepts connections until `shutdown` resolves, then drains: stops accepting, lets `on_drain`
/// end the long-lived streams, and waits up to `grace` for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    service: HttpService,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    on_drain: impl FnOnce(),
) {
    let graceful = GracefulShutdown::new();
    let header_read_timeout =
        Duration::from_millis(service.state.config.http.header_read_timeout_ms);
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
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // rmcp writes an SSE reply in several small writes: without NODELAY, Nagle's
                    // algorithm holds each reply for the client's delayed ACK (~40 ms).
                    let _ = stream.set_nodelay(true);
                    let service = service.clone();
                    let handler = hyper::service::service_fn(move |request| {
                        let service = service.clone();
                        async move { Ok::<_, Infallible>(service.handle(request).await) }
                    });
                    let builder = builder.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        // Protocol detection (HTTP/1 or h2c) waits for the first bytes without a
                        // limit: a connection that sends nothing is closed after the header read
                        // timeout instead of being held forever.
                        let mut first = [0_u8; 1];
                        match tokio::time::timeout(header_read_timeout, stream.peek(&mut first)).await {
                            Ok(Ok(read)) if read > 0 => {}
                            _ => return,
                        }
                        let connection = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), handler)
                            .into_owned();
                        if let Err(error) = watcher.watch(connection).await {
                            tracing::debug!(%error, "connection ended with an error");
                        }
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
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(
            grace_secs = grace.as_secs(),
            "grace period over; cutting remaining connections"
        ),
    }
}
