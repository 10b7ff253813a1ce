//! Network faults on demand: a TCP proxy, in-process, that sits between a replica and a server
//! (Redis, PostgreSQL) and that a test switches between passing traffic, blackholing it (a cut
//! link: nothing arrives, nothing is closed, as when a cable or a firewall drops packets), cutting
//! one direction, adding latency, or dropping every connection.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
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
    /// Open connections by the generation they were born in.
    open: Arc<OpenConnections>,
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
        let open = Arc::new(OpenConnections::default());
        let counted = open.clone();
        let accept = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mode = modes.subscribe();
                let mut generation = generations.subscribe();
                let born = *generation.borrow_and_update();
                let guard = counted.opened(born);
                connections.spawn(async move {
                    let _guard = guard;
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
            open,
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

    /// Closes every open connection and returns once each is closed: what either side had sent
    /// and the proxy held back is gone with them.
    pub async fn close_connections(&self) {
        let mut current = 0;
        self.generation.send_modify(|n| {
            *n += 1;
            current = *n;
        });
        loop {
            let closed = self.open.closed.notified();
            if self.open.older_than(current) == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// The proxy's open connections by generation, and a signal when one closes.
#[derive(Debug, Default)]
struct OpenConnections {
    by_generation: Mutex<BTreeMap<u64, usize>>,
    closed: Notify,
}

impl OpenConnections {
    fn opened(self: &Arc<Self>, generation: u64) -> OpenGuard {
        *self
            .by_generation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(generation)
            .or_default() += 1;
        OpenGuard {
            open: self.clone(),
            generation,
        }
    }

    fn older_than(&self, generation: u64) -> usize {
        self.by_generation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .range(..generation)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Counts one connection as open until dropped.
struct OpenGuard {
    open: Arc<OpenConnections>,
    generation: u64,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut by_generation = self
            .open
            .by_generation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_generation.get_mut(&self.generation) {
            *n -= 1;
            if *n == 0 {
                by_generation.remove(&self.generation);
            }
        }
        drop(by_generation);
        self.open.closed.notify_waiters();
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
