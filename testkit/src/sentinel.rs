//! A real Redis Sentinel set on free loopback ports: one primary, one replica and three sentinels
//! (quorum 2), started from the Debian `redis-server` binary (`--sentinel` mode for the sentinels).
//! Failures are detected after 1 s (`down-after-milliseconds`), so a killed primary is replaced
//! within a few seconds.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::{Child, Command};

use crate::topology::{
    READY_TIMEOUT, REDIS_TEST_PASSWORD, REDIS_USER, RedisServer, TopologyError, TopologyResult,
    free_port, spawn_listening,
};

/// The name the sentinels monitor the primary under (`sentinelServiceName`).
pub const SERVICE: &str = "shoal";

/// `redis-cli -p <port> <args>`: its standard output, trimmed.
///
/// # Errors
/// When redis-cli cannot run.
pub async fn redis_cli(port: u16, args: &[&str]) -> TopologyResult<String> {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| TopologyError::Spawn {
            what: "redis-cli (install the redis-tools package)".into(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Waits until the replica of the primary on `port` has everything the primary had written when
/// this was called: the primary's offset is read once, then the replica's own offset
/// (`slave_repl_offset` in its `INFO replication`) polled until it reaches it. (The primary's view
/// of its replica is the replica's last acknowledgment, sent once a second: under steady writes it
/// may never equal the primary's moving offset.)
///
/// # Errors
/// When it does not catch up in time.
pub async fn wait_replica_caught_up(port: u16) -> TopologyResult<()> {
    let field = |info: &str, name: &str| -> Option<u64> {
        info.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().parse().ok())
    };
    let primary = redis_cli(port, &["INFO", "replication"]).await?;
    let wrote = field(&primary, "master_repl_offset:")
        .ok_or_else(|| TopologyError::Broken(format!("no replication offset: {primary}")))?;
    let replica = primary
        .lines()
        .find_map(|line| line.strip_prefix("slave0:"))
        .and_then(|line| line.split(',').find_map(|f| f.strip_prefix("port=")))
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| TopologyError::Broken(format!("the primary has no replica: {primary}")))?;
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        let info = redis_cli(replica, &["INFO", "replication"]).await?;
        let read = field(&info, "slave_repl_offset:");
        if read.is_some_and(|read| read >= wrote) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TopologyError::Broken(format!(
                "the replica did not catch up: primary at {wrote}, replica at {read:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One sentinel process.
#[derive(Debug)]
struct Sentinel {
    child: Option<Child>,
    port: u16,
}

impl Sentinel {
    async fn start(dir: &Path, n: usize, primary: u16) -> TopologyResult<Self> {
        let port = free_port();
        let dir = dir.join(format!("sentinel-{n}"));
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("sentinel.log");
        // Sentinel rewrites its file (the replicas and sentinels it learns): one writable file each.
        let config = dir.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
                 sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {SERVICE} 1000\n\
                 sentinel failover-timeout {SERVICE} 5000\n\
                 sentinel parallel-syncs {SERVICE} 1\n",
                dir = dir.display(),
                log = log.display(),
            ),
        )?;
        let mut command = Command::new("redis-server");
        command.arg(&config).arg("--sentinel");
        let child = spawn_listening(
            command,
            "redis-server --sentinel",
            "redis-server",
            port,
            &log,
        )
        .await?;
        Ok(Self {
            child: Some(child),
            port,
        })
    }
}

/// A running Sentinel set; everything stops when it is dropped.
#[derive(Debug)]
pub struct SentinelSet {
    /// The data nodes: the first started as the primary, the second as its replica. Which one is
    /// the primary now is [`SentinelSet::primary`].
    pub servers: Vec<RedisServer>,
    sentinels: Vec<Sentinel>,
    primary: usize,
    dir: PathBuf,
}

impl SentinelSet {
    /// Starts the set with its files under `dir`, the replicas' ACL user limited to `prefix` on
    /// both data nodes (ACLs are not replicated), and waits until the sentinels could fail over.
    ///
    /// # Errors
    /// When a process cannot start or the set does not become ready.
    pub async fn start(dir: &Path, prefix: &str) -> TopologyResult<Self> {
        let dir = dir.join("sentinel");
        let primary = RedisServer::start_in(dir.join("redis-1"), prefix, false, Vec::new()).await?;
        let replica = RedisServer::start_in(
            dir.join("redis-2"),
            prefix,
            false,
            vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary.port().to_string(),
            ],
        )
        .await?;
        let mut sentinels = Vec::new();
        for n in 1..=3 {
            sentinels.push(Sentinel::start(&dir, n, primary.port()).await?);
        }
        let set = Self {
            servers: vec![primary, replica],
            sentinels,
            primary: 0,
            dir,
        };
        set.wait_ready().await?;
        Ok(set)
    }

    /// Waits until the replica is in sync and every sentinel knows the others (each can reach the
    /// quorum and the majority a failover needs).
    async fn wait_ready(&self) -> TopologyResult<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT * 2;
        loop {
            let mut ready = self.replica_in_sync().await?;
            for sentinel in &self.sentinels {
                let quorum = redis_cli(sentinel.port, &["SENTINEL", "CKQUORUM", SERVICE]).await?;
                let others = redis_cli(sentinel.port, &["SENTINEL", "SENTINELS", SERVICE]).await?;
                ready &= quorum.starts_with("OK") && others.matches("name").count() == 2;
            }
            if ready {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TopologyError::NotReady(
                    "the Sentinel set".into(),
                    self.dir.join("sentinel-1").join("sentinel.log"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the node that is not the primary replicates from it with its link up.
    async fn replica_in_sync(&self) -> TopologyResult<bool> {
        let replica = &self.servers[1 - self.primary];
        let info = redis_cli(replica.port(), &["INFO", "replication"]).await?;
        Ok(info.contains("role:slave") && info.contains("master_link_status:up"))
    }

    /// Waits until the replica has everything the primary wrote so far (their replication
    /// offsets meet), so a failover now loses nothing.
    ///
    /// # Errors
    /// When it does not catch up in time.
    pub async fn wait_replicated(&self) -> TopologyResult<()> {
        wait_replica_caught_up(self.primary().port()).await
    }

    /// The URL replicas connect with: the three sentinels, the service name, and the restricted
    /// ACL user of the data nodes (the sentinels themselves ask for no password).
    pub fn url(&self) -> String {
        let mut ports = self.sentinels.iter().map(|s| s.port);
        let first = ports.next().unwrap_or_default();
        let nodes: Vec<String> = ports.map(|port| format!("node=127.0.0.1:{port}")).collect();
        format!(
            "redis-sentinel://{REDIS_USER}:{REDIS_TEST_PASSWORD}@127.0.0.1:{first}?{}&sentinelServiceName={SERVICE}",
            nodes.join("&")
        )
    }

    /// The data node that is the primary now (as far as this set knows: after
    /// [`SentinelSet::kill_primary_and_wait_failover`], the promoted one).
    pub fn primary(&self) -> &RedisServer {
        &self.servers[self.primary]
    }

    /// Kills the primary (SIGKILL) and waits until the sentinels have promoted the replica and it
    /// answers as a primary; returns how long that took.
    ///
    /// # Errors
    /// When no failover completes in time.
    pub async fn kill_primary_and_wait_failover(&mut self) -> TopologyResult<Duration> {
        let killed_at = tokio::time::Instant::now();
        let old = self.primary;
        self.servers[old].kill().await;
        let new = 1 - old;
        let new_port = self.servers[new].port().to_string();
        let deadline = killed_at + READY_TIMEOUT * 2;
        loop {
            let mut promoted = redis_cli(self.servers[new].port(), &["ROLE"])
                .await?
                .starts_with("master");
            for sentinel in &self.sentinels {
                let addr = redis_cli(
                    sentinel.port,
                    &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE],
                )
                .await?;
                promoted &= addr.lines().nth(1) == Some(new_port.as_str());
            }
            if promoted {
                self.primary = new;
                return Ok(killed_at.elapsed());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TopologyError::NotReady(
                    "a Sentinel failover".into(),
                    self.dir.join("sentinel-1").join("sentinel.log"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for sentinel in &mut self.sentinels {
            if let Some(child) = &mut sentinel.child {
                let _ = child.start_kill();
            }
        }
    }
}
