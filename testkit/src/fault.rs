//! Network faults on demand: a TCP proxy, in-process, that sits between a replica and a server
//! (Redis, PostgreSQL) and that a test switches between passing traffic, blackholing it (a cut
//! link: nothing arrives, nothing is closed, as when a cable or a firewall drops packets), cutting
//! one direction, adding latency, or dropping every connection.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Forward nothing in either direction and close nothing; new connections are accepted and
    /// hang. Like a partition: the peers only learn of it from their own timeouts.
    Blackhole,
    /// Forward client → server only (replies are lost).
    CutReplies,
    /// Forward everything after this delay per chunk.
    Latency(Duration),
}

/// A TCP proxy to one server. Dropping it closes every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Fault>,
    /// Bumped by [`FaultProxy::drop_connections`]: connections of an older generation close.
    generation: watch::Sender<u64>,
    _accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy on a free loopback port forwarding to `target`.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Fault::Pass);
        let (generation, _) = watch::channel(0u64);
        let modes = mode.clone();
        let generations = generation.clone();
        let accept = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mode = modes.subscribe();
                let mut generation = generations.subscribe();
                let born = *generation.borrow_and_update();
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = relay(client, server, mode) => {}
                        () = async {
                            while generation.changed().await.is_ok() {
                                if *generation.borrow() != born {
                                    return;
                                }
                            }
                        } => {}
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            addr,
            mode,
            generation,
            _accept: accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches every connection, open or new, to `fault`.
    pub fn set(&self, fault: Fault) {
        self.mode.send_replace(fault);
    }

    /// Closes every open connection (new ones are accepted).
    pub fn drop_connections(&self) {
        self.generation.send_modify(|n| *n += 1);
    }
}

/// Copies both ways under the proxy's mode until either side closes.
async fn relay(client: TcpStream, server: TcpStream, mode: watch::Receiver<Fault>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = pump(client_read, server_write, mode.clone(), false) => {}
        () = pump(server_read, client_write, mode, true) => {}
    }
}

/// Whether `fault` holds the direction `replies` (server → client when true).
fn holds(fault: Fault, replies: bool) -> bool {
    match fault {
        Fault::Blackhole => true,
        Fault::CutReplies => replies,
        Fault::Pass | Fault::Latency(_) => false,
    }
}

/// Waits until the direction `replies` flows; `false` when the proxy is gone.
async fn flowing(mode: &mut watch::Receiver<Fault>, replies: bool) -> bool {
    while holds(*mode.borrow_and_update(), replies) {
        if mode.changed().await.is_err() {
            return false;
        }
    }
    true
}

/// Copies `from` to `to`; `replies` names the server → client direction. While the direction is
/// held nothing is read, and a chunk read just before is held back (TCP would retransmit it once
/// the link heals: nothing is lost, only late).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Fault>,
    replies: bool,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if !flowing(&mut mode, replies).await {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            // The mode changed while waiting for data: look at it again first.
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !flowing(&mut mode, replies).await {
            return;
        }
        let current = *mode.borrow();
        if let Fault::Latency(delay) = current {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
