//! The `shoal-server` command, here in the library so that the binary (`main.rs`) is a call and
//! an allocator: everything generic the command instantiates (the runtime, the serving stack) is
//! compiled with the library, and a change to the binary rebuilds in a second.

use anyhow::Context as _;

use crate::{
    App,
    config::{Command, Config},
    ids::ReplicaTag,
};

/// The `shoal-server` command: reads the configuration (flags and `SHOAL_*`), then either runs
/// the container healthcheck or serves until SIGTERM/SIGINT, on a multi-threaded Tokio runtime.
///
/// # Errors
/// A configuration that does not validate, a listen address that cannot be bound, a replica that
/// cannot be built (see [`App::build`]).
pub fn main() -> anyhow::Result<()> {
    let config = Config::load()?;
    if let Some(Command::Healthcheck) = config.command {
        std::process::exit(match healthcheck(config.http.listen) {
            Ok(()) => 0,
            Err(error) => {
                eprintln!("unhealthy: {error:#}");
                1
            }
        });
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?
        .block_on(serve(config))
}

/// Telemetry, bind, build, run, flush.
async fn serve(config: Config) -> anyhow::Result<()> {
    // The replica's identity for its lifetime: bus address, `x-shoal-replica`, `service.instance.id`.
    let replica = ReplicaTag::generate();
    let _telemetry = shoal_shared::telemetry::init(
        config.telemetry.log_format,
        replica.as_str(),
        config.replica_name().as_deref(),
    );
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("binding {}", config.http.listen))?;
    let app = App::build(config, replica).await?;
    app.run(listener, Box::pin(shutdown_signal())).await
}

/// `shoal-server healthcheck`: one GET /readyz over plain TCP with a short timeout, so a container
/// image needs no curl or shell.
fn healthcheck(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut stream = std::net::TcpStream::connect_timeout(&addr, TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = [0_u8; 64];
    let mut read = 0;
    while read < head.len() {
        match stream.read(&mut head[read..])? {
            0 => break,
            n => read += n,
        }
        if head[..read].contains(&b'\n') {
            break;
        }
    }
    let status_line = String::from_utf8_lossy(&head[..read]);
    let status_line = status_line.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status_line.split_whitespace().nth(1) == Some("200"),
        "GET /readyz on {addr} answered {status_line:?}"
    );
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
