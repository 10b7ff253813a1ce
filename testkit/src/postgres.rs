//! A throwaway PostgreSQL server: `initdb` into a temporary directory, `postgres` on a free
//! loopback port, trust authentication, no durability (it is a test database). The owner is the
//! superuser `shoal` (for setting up data); the least-privilege roles replicas connect as
//! (`shoal_reader`, `shoal_writer`) come from `deploy/postgres/roles.sql`, as in docker compose.
//!
//! PostgreSQL refuses to run as root; when the tests run as root (CI), the server runs as the
//! `postgres` user that Debian's package creates, through `setpriv`.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::{Child, Command};

use super::topology::{TopologyError, TopologyResult, free_port};

/// Where the PostgreSQL server binaries are.
fn bin_dir() -> Option<PathBuf> {
    if let Ok(path) = which("initdb") {
        return path.parent().map(Path::to_path_buf);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.exists())
        })
        .ok_or(())
}

fn as_postgres_user(program: &Path, root: bool) -> Command {
    if root {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// A running PostgreSQL server.
#[derive(Debug)]
pub struct PostgresServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    root: bool,
}

impl PostgresServer {
    /// Initializes a cluster in `dir/postgres` and starts it on a free port.
    ///
    /// # Errors
    /// When the binaries are missing (install `postgresql`) or the server does not come up.
    pub async fn start(dir: &Path) -> TopologyResult<Self> {
        let bin = bin_dir().ok_or_else(|| TopologyError::Spawn {
            what: "initdb (install the postgresql package)".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "initdb not found"),
        })?;
        let root = nix::unistd::geteuid().is_root();
        let base = dir.join("postgres");
        let data = base.join("data");
        std::fs::create_dir_all(&base)?;
        if root {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&base)
                .status()?;
            if !status.success() {
                return Err(TopologyError::NotReady(
                    "chown of the PostgreSQL directory".into(),
                    base,
                ));
            }
            // The temporary directory itself must be traversable by the postgres user.
            let _ = std::process::Command::new("chmod")
                .arg("o+x")
                .arg(dir)
                .status();
        }
        let log = base.join("postgres.log");
        initdb(&bin, &data, &log, root).await?;
        let port = free_port();
        let mut server = Self {
            child: None,
            port,
            dir: base,
            bin,
            root,
        };
        server.spawn().await?;
        let roles = std::fs::read_to_string(
            super::topology::repo_root().join("deploy/postgres/roles.sql"),
        )?;
        server.client().await?.batch_execute(&roles).await?;
        Ok(server)
    }

    /// The owner's connection URL (superuser `shoal`, database `postgres`): for setting up data,
    /// never for replicas.
    pub fn url(&self) -> String {
        format!("postgres://shoal@127.0.0.1:{}/postgres", self.port)
    }

    /// The URL replicas read with (`shoal_reader`, `SHOAL_DATABASE_URL`).
    pub fn reader_url(&self) -> String {
        format!("postgres://shoal_reader@127.0.0.1:{}/postgres", self.port)
    }

    /// The URL `pg_execute` writes with (`shoal_writer`, `SHOAL_DATABASE_WRITE_URL`).
    pub fn writer_url(&self) -> String {
        format!("postgres://shoal_writer@127.0.0.1:{}/postgres", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its directory (data and log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server (fast shutdown: connections are closed) and waits for it to exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGINT);
            }
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        }
    }

    /// Starts the server again on the same port and data (after [`PostgresServer::stop`]).
    ///
    /// # Errors
    /// When it does not come up.
    pub async fn start_again(&mut self) -> TopologyResult<()> {
        self.stop().await;
        self.spawn().await
    }

    /// Starts the postmaster on the data directory and waits until it answers a query.
    async fn spawn(&mut self) -> TopologyResult<()> {
        let log = self.dir.join("postgres.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        if self.root {
            let _ = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&log)
                .status();
        }
        let mut child = as_postgres_user(&self.bin.join("postgres"), self.root)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-k",
            ])
            .arg(&self.dir)
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "max_connections=100", "-c", "shared_buffers=32MB"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| TopologyError::Spawn {
                what: "postgres".into(),
                source,
            })?;
        // Ready when it accepts a query, not merely a TCP connection.
        wait_ready(&self.url(), &mut child, &log).await?;
        self.child = Some(child);
        Ok(())
    }

    /// A direct client, for setting up data and for changes "by other writers".
    ///
    /// # Errors
    /// When the server cannot be reached.
    pub async fn client(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }
}

/// Creates the database cluster in `data` (user `shoal`, trust authentication, no fsync).
async fn initdb(bin: &Path, data: &Path, log: &Path, root: bool) -> TopologyResult<()> {
    let output = as_postgres_user(&bin.join("initdb"), root)
        .args(["-D"])
        .arg(data)
        .args([
            "-U",
            "shoal",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        ])
        .output()
        .await
        .map_err(|source| TopologyError::Spawn {
            what: "initdb".into(),
            source,
        })?;
    if !output.status.success() {
        std::fs::write(log, &output.stderr)?;
        return Err(TopologyError::NotReady("initdb".into(), log.to_owned()));
    }
    Ok(())
}

/// Waits until the server at `url` answers a query (not merely accepts a connection), or fails
/// when it exits or 30 s pass.
async fn wait_ready(url: &str, child: &mut Child, log: &Path) -> TopologyResult<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            if client.simple_query("SELECT 1").await.is_ok() {
                break;
            }
        }
        if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            return Err(TopologyError::NotReady("postgres".into(), log.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // Immediate shutdown: the postmaster takes its backends down with it.
        if let Some(child) = &self.child
            && let Some(pid) = child.id()
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGQUIT);
        }
    }
}
