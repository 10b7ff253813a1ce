//! Local cluster topologies from real processes: a Redis server, N shoal replicas and an nginx
//! round-robin balancer, each on a free loopback port, with files in a temporary directory that is
//! removed afterwards. Used by the integration tests, the benchmarks and `shoal-cluster`.
//!
//! The balancer's proxy settings come from `deploy/nginx/mcp-proxy.conf`, the same file the
//! docker-compose balancer includes.

use std::{
    net::TcpListener as StdListener,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::{Child, Command};

/// Errors while starting or controlling processes.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A database set-up step failed.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which process.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A process did not become ready in time.
    #[error("{0} did not become ready in time; see its log in {1}")]
    NotReady(String, PathBuf),
    /// A port asked for is taken by another program.
    #[error(
        "{what}: port 127.0.0.1:{port} is already in use (another shoal cluster, or another program listening there): stop it or choose another port"
    )]
    PortInUse {
        /// What wanted the port.
        what: String,
        /// The port.
        port: u16,
    },
    /// A process started but does not do its job.
    #[error("{0}")]
    Broken(String),
    /// Other I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result of topology operations.
pub type TopologyResult<T> = Result<T, TopologyError>;

/// How long processes get to become ready.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `N` distinct free TCP ports on 127.0.0.1, held together while they are picked (two
/// [`free_port`] calls in a row may return the same port, the first having been released).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<StdListener> = (0..N)
        .map(|_| StdListener::bind("127.0.0.1:0").expect("a free loopback port"))
        .collect();
    std::array::from_fn(|i| {
        listeners[i]
            .local_addr()
            .map(|a| a.port())
            .expect("a bound port")
    })
}

/// Sends `signal` to `child` if there is one and it runs.
fn signal(child: Option<&Child>, signal: Signal) {
    if let Some(pid) = child.and_then(Child::id) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), signal);
    }
}

pub(crate) async fn wait_for_port(
    port: u16,
    child: &mut Child,
    what: &str,
    log: &Path,
) -> TopologyResult<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(TopologyError::NotReady(what.to_owned(), log.to_owned()))
}

/// Starts `command` as a daemon of the topology (no standard streams, killed when dropped) and
/// waits until it listens on `port`; `package` names what to install when it cannot start, `log`
/// where to look when it does not come up.
pub(crate) async fn spawn_listening(
    mut command: Command,
    what: &str,
    package: &str,
    port: u16,
    log: &Path,
) -> TopologyResult<Child> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| TopologyError::Spawn {
            what: format!("{what} (install the {package} package)"),
            source,
        })?;
    wait_for_port(port, &mut child, what, log).await?;
    Ok(child)
}

/// Checks that the nginx answering on `port` is ours and reaches a replica: still running, and a
/// request to `/mcp` through it gets an answer with the `x-shoal-replica` header every replica
/// response carries (a 4xx for this bare GET; what matters is who answered).
async fn probe_balancer(port: u16, child: &mut Child, log: &Path) -> TopologyResult<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TopologyError::Broken(format!("HTTP client: {e}")))?;
    let url = format!("http://127.0.0.1:{port}/mcp");
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(TopologyError::Broken(format!(
                "nginx exited ({status}) right after starting; see {}",
                log.display()
            )));
        }
        match client.get(&url).send().await {
            Ok(response) if response.headers().contains_key("x-shoal-replica") => return Ok(()),
            Ok(response) => last = format!("answered {}", response.status()),
            Err(error) => last = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(TopologyError::Broken(format!(
        "the balancer on 127.0.0.1:{port} does not reach a replica ({last}); see {}",
        log.display()
    )))
}

/// The replica settings shared with docker-compose.yml: `deploy/shoal.env`, as (name, value) pairs.
pub fn shared_replica_env() -> TopologyResult<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repo_root().join("deploy/shoal.env"))?;
    Ok(parse_env_file(&text))
}

/// Parses the `NAME=value` lines of a compose env file; blank lines and `#` comments are skipped.
/// Values are taken literally, as Compose does for unquoted values.
fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

/// The repository root (where `deploy/` lives), found from this crate's manifest directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A redis-server process.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    prefix: String,
    aof: bool,
    /// More `redis-server` arguments (`--replicaof` for a Sentinel set's replica).
    extra: Vec<String>,
}

/// The Redis ACL user replicas connect as, as in docker-compose.yml: its key and channel patterns
/// are the key prefix's, its commands everything but `@dangerous` (KEYS, FLUSHALL, CONFIG, DEBUG,
/// SHUTDOWN, MONITOR, CLIENT KILL…) except `ROLE`, with which fred checks it reached the primary
/// of a Sentinel set. The default user stays unrestricted and password-less here,
/// for the tests' own `redis-cli` (in compose it can only PING, for the healthcheck).
pub const REDIS_USER: &str = "shoal";
/// The commands of [`REDIS_USER`] (the same rules as the compose file's).
pub const REDIS_USER_COMMANDS: &[&str] = &["+@all", "-@dangerous", "+role"];
pub(crate) const REDIS_TEST_PASSWORD: &str = "shoal-test-password";

impl RedisServer {
    /// Starts `redis-server` on a free port with its files in `dir`, with the ACL user replicas
    /// use limited to the keys and channels of `prefix`.
    ///
    /// # Errors
    /// When the binary is missing or the server does not come up.
    pub async fn start(dir: &Path, prefix: &str) -> TopologyResult<Self> {
        Self::start_with(dir, prefix, false).await
    }

    /// [`RedisServer::start`], with the append-only file on when `aof` (`appendfsync everysec`,
    /// as in compose), so data survives a restart.
    ///
    /// # Errors
    /// When the binary is missing or the server does not come up.
    pub async fn start_with(dir: &Path, prefix: &str, aof: bool) -> TopologyResult<Self> {
        Self::start_in(dir.join("redis"), prefix, aof, Vec::new()).await
    }

    /// A server with its files in `dir` itself and `extra` arguments.
    ///
    /// # Errors
    /// When the binary is missing or the server does not come up.
    pub async fn start_in(
        dir: PathBuf,
        prefix: &str,
        aof: bool,
        extra: Vec<String>,
    ) -> TopologyResult<Self> {
        Self::start_on(free_port(), dir, prefix, aof, extra).await
    }

    /// [`RedisServer::start_in`] on `port`.
    ///
    /// # Errors
    /// When the binary is missing or the server does not come up.
    pub async fn start_on(
        port: u16,
        dir: PathBuf,
        prefix: &str,
        aof: bool,
        extra: Vec<String>,
    ) -> TopologyResult<Self> {
        let mut server = Self {
            child: None,
            port,
            dir,
            prefix: prefix.to_owned(),
            aof,
            extra,
        };
        std::fs::create_dir_all(&server.dir)?;
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> TopologyResult<()> {
        let log = self.dir.join("redis.log");
        let mut command = Command::new("redis-server");
        command
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                if self.aof { "yes" } else { "no" },
                "--appendfsync",
                "everysec",
            ])
            .args([
                "--dir",
                &self.dir.to_string_lossy(),
                "--logfile",
                &log.to_string_lossy(),
            ])
            .arg("--user")
            .args([REDIS_USER, "on"])
            .arg(format!(">{REDIS_TEST_PASSWORD}"))
            .arg(format!("~{}:*", self.prefix))
            .arg(format!("&{}:*", self.prefix))
            .args(REDIS_USER_COMMANDS)
            .args(&self.extra);
        let child =
            spawn_listening(command, "redis-server", "redis-server", self.port, &log).await?;
        self.child = Some(child);
        Ok(())
    }

    /// `redis://shoal:<password>@127.0.0.1:<port>`: the restricted user replicas connect as.
    pub fn url(&self) -> String {
        format!(
            "redis://{REDIS_USER}:{REDIS_TEST_PASSWORD}@127.0.0.1:{}",
            self.port
        )
    }

    /// `redis://127.0.0.1:<port>`: the unrestricted default user, for tests and benchmarks that
    /// look inside (INFO, SCAN), never for replicas.
    pub fn admin_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// [`RedisServer::url`] with another port (a [`crate::fault::FaultProxy`] in front of it).
    pub fn url_via(&self, port: u16) -> String {
        format!("redis://{REDIS_USER}:{REDIS_TEST_PASSWORD}@127.0.0.1:{port}")
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered, as when Redis
    /// stalls (a long fork, a slow disk, a paused VM).
    pub fn freeze(&self) {
        signal(self.child.as_ref(), Signal::SIGSTOP);
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.as_ref(), Signal::SIGCONT);
    }

    /// Stops the server as an orchestrator does (SIGTERM: with the append-only file on, Redis
    /// writes it out before it exits), then starts it again on the same port: with
    /// [`TopologyOptions::redis_aof`] its data survives.
    ///
    /// # Errors
    /// When it does not come up.
    pub async fn restart_gracefully(&mut self) -> TopologyResult<()> {
        if let Some(mut child) = self.child.take() {
            signal(Some(&child), Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        self.spawn().await
    }

    /// Starts the server again on the same port (after [`RedisServer::kill`]); without the
    /// append-only file its data is gone.
    ///
    /// # Errors
    /// When it does not come up.
    pub async fn restart(&mut self) -> TopologyResult<()> {
        self.kill().await;
        self.spawn().await
    }
}

/// One shoal replica process.
#[derive(Debug)]
pub struct Replica {
    /// Its name (`SHOAL_REPLICA_NAME`), e.g. `r1`.
    pub name: String,
    /// The id the running process generated for itself (its `x-shoal-replica` header and
    /// `service.instance.id`); a new one after each restart.
    pub id: String,
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl Replica {
    /// Starts `bin` as replica `name` on a free port with `env`, logging to `dir/<name>.log`.
    ///
    /// # Errors
    /// When it does not answer `/healthz` in time.
    pub async fn start(
        bin: &Path,
        name: &str,
        dir: &Path,
        env: &[(String, String)],
    ) -> TopologyResult<Self> {
        let mut replica = Self {
            name: name.to_owned(),
            id: String::new(),
            child: None,
            port: free_port(),
            bin: bin.to_owned(),
            env: env.to_vec(),
            log: dir.join(format!("{name}.log")),
        };
        replica.spawn().await?;
        Ok(replica)
    }

    async fn spawn(&mut self) -> TopologyResult<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = Command::new(&self.bin)
            .env("SHOAL_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("SHOAL_REPLICA_NAME", &self.name)
            .env("SHOAL_LOG_FORMAT", "text")
            .env(
                "RUST_LOG",
                std::env::var("SHOAL_TEST_LOG")
                    .unwrap_or_else(|_| shoal_shared::telemetry::DEFAULT_LOG_FILTER.into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| TopologyError::Spawn {
                what: self.bin.display().to_string(),
                source,
            })?;
        wait_for_port(self.port, &mut child, &self.name, &self.log).await?;
        self.child = Some(child);
        self.id = self.fetch_id().await?;
        Ok(())
    }

    /// Asks the running process for its id (every response carries it).
    async fn fetch_id(&self) -> TopologyResult<String> {
        let response = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map(|client| client.get(format!("{}/healthz", self.base_url())))
            .map_err(|e| TopologyError::Broken(format!("HTTP client: {e}")))?
            .send()
            .await
            .map_err(|e| TopologyError::Broken(format!("{} does not answer: {e}", self.name)))?;
        response
            .headers()
            .get("x-shoal-replica")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| TopologyError::Broken(format!("{} does not say who it is", self.name)))
    }

    /// Waits until the replica answers `/readyz` with 200: a probe it published on the cluster bus
    /// came back and its shared state answers. Until then, what other replicas publish to it may
    /// not reach it.
    ///
    /// # Errors
    /// When it is not ready within [`READY_TIMEOUT`].
    pub async fn wait_ready(&self) -> TopologyResult<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| TopologyError::Broken(format!("HTTP client: {e}")))?;
        let url = format!("{}/readyz", self.base_url());
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(response) = client.get(&url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(TopologyError::NotReady(self.name.clone(), self.log.clone()))
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The MCP endpoint.
    pub fn mcp_url(&self) -> String {
        format!("{}/mcp", self.base_url())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// SIGKILL: the replica dies without any cleanup.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM, then waits up to `timeout` for a graceful exit. Returns the exit status, or `None`
    /// when it had to be killed.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal(Some(&child), Signal::SIGTERM);
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = child.kill().await;
                None
            }
        }
    }

    /// Freezes the replica (SIGSTOP): its connections stay open and nothing is answered.
    pub fn freeze(&self) {
        signal(self.child.as_ref(), Signal::SIGSTOP);
    }

    /// Lets a frozen replica go on (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.as_ref(), Signal::SIGCONT);
    }

    /// Sends SIGTERM without waiting.
    pub fn send_sigterm(&self) {
        signal(self.child.as_ref(), Signal::SIGTERM);
    }

    /// Waits for the process to exit (after [`Replica::send_sigterm`]).
    pub async fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let status = tokio::time::timeout(timeout, child.wait()).await.ok()?.ok();
        self.child = None;
        status
    }

    /// Starts the replica again on the same port with the same environment.
    ///
    /// # Errors
    /// When it does not come up.
    pub async fn restart(&mut self) -> TopologyResult<()> {
        self.kill9().await;
        self.spawn().await
    }
}

/// An nginx round-robin balancer in front of replicas.
#[derive(Debug)]
pub struct Balancer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Balancer {
    /// Starts nginx on `port` (a free one when `None`), balancing over `upstream_ports`.
    ///
    /// # Errors
    /// When nginx is missing or does not come up.
    pub async fn start(
        dir: &Path,
        port: Option<u16>,
        upstream_ports: &[u16],
    ) -> TopologyResult<Self> {
        let dir = dir.join("nginx");
        for sub in ["", "body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let port = match port {
            // A port that something else holds would pass the readiness probe below while nginx
            // itself fails to bind: say so before starting.
            Some(port) => {
                StdListener::bind(("127.0.0.1", port)).map_err(|_| TopologyError::PortInUse {
                    what: "the balancer".into(),
                    port,
                })?;
                port
            }
            None => free_port(),
        };
        // Every replica twice, as deploy/nginx/nginx.conf does it: ejected by a failure, and again
        // as a backup that is never ejected, for when every primary is (see that file).
        let servers: String = upstream_ports
            .iter()
            .map(|p| format!("        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n"))
            .chain(
                upstream_ports
                    .iter()
                    .map(|p| format!("        server 127.0.0.1:{p} backup max_fails=0;\n")),
            )
            .collect();
        let include = repo_root().join("deploy/nginx/mcp-proxy.conf");
        // nginx started as root switches its workers to `nobody` unless told otherwise.
        let user = if nix::unistd::geteuid().is_root() {
            "user root;\n"
        } else {
            ""
        };
        let d = dir.display();
        let config = format!(
            "{user}daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n    access_log off;\n\
             client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\
             upstream shoal {{\n{servers}        keepalive 64;\n        keepalive_timeout 60s;\n    }}\n\
             server {{\n        listen 127.0.0.1:{port};\n\
             location = /mcp {{\n            include {include};\n        }}\n\
             location ^~ /.well-known/oauth-protected-resource {{\n            include {include};\n        }}\n\
             location / {{\n            return 404 \"not found\\n\";\n        }}\n    }}\n}}\n",
            include = include.display(),
        );
        let config_path = dir.join("nginx.conf");
        std::fs::write(&config_path, config)?;
        let log = dir.join("error.log");
        let mut command = Command::new("nginx");
        command.args([
            "-p",
            &dir.to_string_lossy(),
            "-c",
            &config_path.to_string_lossy(),
        ]);
        let mut child = spawn_listening(command, "nginx", "nginx", port, &log).await?;
        probe_balancer(port, &mut child, &log).await?;
        Ok(Self {
            child: Some(child),
            port,
            dir,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The balanced MCP endpoint.
    pub fn mcp_url(&self) -> String {
        format!("{}/mcp", self.base_url())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its working directory (config, error log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        // SIGTERM lets the master take its workers down with it. The child is spawned with
        // kill_on_drop, whose SIGKILL would orphan the workers (still listening) if it landed
        // first: wait for the master to exit (briefly; it takes milliseconds) before that.
        if let Some(child) = &mut self.child {
            signal(Some(child), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Which Redis the replicas share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedisKind {
    /// One `redis-server`.
    #[default]
    Standalone,
    /// A Sentinel set ([`crate::sentinel::SentinelSet`]): a primary, a replica, three sentinels.
    Sentinel,
    /// A Redis Cluster ([`crate::redis_cluster::RedisCluster`]): three primaries, three replicas;
    /// the keys spread over the three shards.
    Cluster,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct TopologyOptions {
    /// The shoal-server binary.
    pub server_bin: PathBuf,
    /// Number of replicas.
    pub replicas: usize,
    /// Start Redis and point the replicas at it (otherwise they run embedded).
    pub redis: bool,
    /// Which Redis, when [`TopologyOptions::redis`].
    pub redis_kind: RedisKind,
    /// Start an nginx balancer in front.
    pub balancer: bool,
    /// Start PostgreSQL and point the replicas at it (`SHOAL_DATABASE_URL`).
    pub postgres: bool,
    /// Extra environment for every replica.
    pub env: Vec<(String, String)>,
    /// Keep the working directory (logs) after the topology is dropped; on by default when the
    /// environment sets `SHOAL_TEST_KEEP` (to read the logs of a failed test).
    pub keep_dir: bool,
    /// Port of the balancer (a free one when `None`).
    pub balancer_port: Option<u16>,
    /// Replicas (by index) that reach Redis through a [`crate::fault::FaultProxy`].
    pub redis_proxied: Vec<usize>,
    /// Redis keeps an append-only file (`appendfsync everysec`, as in compose): its data
    /// survives [`RedisServer::restart_gracefully`].
    pub redis_aof: bool,
    /// The key prefix is a hash tag (`{t…}`): on a Redis Cluster every key lands in one slot, so
    /// one shard does all the work (to compare with the keys spread over every shard).
    pub redis_one_slot: bool,
    /// Start returns once every replica on Redis is ready (on by default); off for a test of a
    /// replica that must not become ready.
    pub wait_ready: bool,
}

impl TopologyOptions {
    /// `replicas` replicas of `server_bin` on Redis behind nginx.
    pub fn cluster(server_bin: impl Into<PathBuf>, replicas: usize) -> Self {
        Self {
            server_bin: server_bin.into(),
            replicas,
            redis: true,
            redis_kind: RedisKind::Standalone,
            redis_one_slot: false,
            balancer: true,
            postgres: false,
            env: Vec::new(),
            keep_dir: std::env::var_os("SHOAL_TEST_KEEP").is_some(),
            balancer_port: None,
            redis_proxied: Vec::new(),
            redis_aof: false,
            wait_ready: true,
        }
    }

    /// Start returns as soon as the replicas listen, ready or not.
    pub fn without_waiting_for_readiness(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    /// Replica `index` (0-based) reaches Redis through a fault proxy
    /// ([`Topology::redis_proxies`]).
    pub fn redis_through_proxy(mut self, index: usize) -> Self {
        self.redis_proxied.push(index);
        self
    }

    /// The replicas share `kind` of Redis.
    pub fn on(mut self, kind: RedisKind) -> Self {
        self.redis_kind = kind;
        self
    }

    /// Adds an environment variable for every replica.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }
}

/// A running topology; everything stops when it is dropped.
#[derive(Debug)]
pub struct Topology {
    /// The balancer, if started.
    pub balancer: Option<Balancer>,
    /// The replicas.
    pub replicas: Vec<Replica>,
    /// Redis, if started as one server.
    pub redis: Option<RedisServer>,
    /// The Sentinel set, if started as one.
    pub sentinel: Option<crate::sentinel::SentinelSet>,
    /// The Redis Cluster, if started as one.
    pub redis_cluster: Option<crate::redis_cluster::RedisCluster>,
    /// PostgreSQL, if started.
    pub postgres: Option<super::postgres::PostgresServer>,
    /// The key prefix shared by the replicas (unique per topology).
    pub prefix: String,
    /// The fault proxies between replicas and Redis, by replica index
    /// ([`TopologyOptions::redis_through_proxy`]).
    pub redis_proxies: std::collections::BTreeMap<usize, crate::fault::FaultProxy>,
    /// Removed when the topology is dropped (`None`: kept).
    dir: Option<PathBuf>,
    path: PathBuf,
}

impl Topology {
    /// Starts Redis, the replicas and the balancer.
    ///
    /// # Errors
    /// When a process cannot start or does not become ready.
    pub async fn start(options: TopologyOptions) -> TopologyResult<Self> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-topology-")
            .tempdir()?;
        let path = dir.path().to_owned();
        match Self::start_in(options, dir, path.clone()).await {
            Ok(topology) => Ok(topology),
            Err(error) => {
                // The error names a log in the directory: keep it to be read.
                eprintln!("topology files kept in {}", path.display());
                Err(error)
            }
        }
    }

    async fn start_in(
        options: TopologyOptions,
        dir: tempfile::TempDir,
        path: PathBuf,
    ) -> TopologyResult<Self> {
        // Until the topology is up, the files stay whatever happens (see `start`).
        let dir = dir.keep();
        let prefix = if options.redis_one_slot {
            format!("{{t{}}}", uuid::Uuid::new_v4().simple())
        } else {
            format!("t{}", uuid::Uuid::new_v4().simple())
        };
        let redis = if options.redis && options.redis_kind == RedisKind::Standalone {
            Some(RedisServer::start_with(&path, &prefix, options.redis_aof).await?)
        } else {
            None
        };
        let sentinel = if options.redis && options.redis_kind == RedisKind::Sentinel {
            Some(crate::sentinel::SentinelSet::start(&path, &prefix).await?)
        } else {
            None
        };
        let redis_cluster = if options.redis && options.redis_kind == RedisKind::Cluster {
            Some(crate::redis_cluster::RedisCluster::start(&path, &prefix, 3).await?)
        } else {
            None
        };
        let postgres = if options.postgres {
            Some(super::postgres::PostgresServer::start(&path).await?)
        } else {
            None
        };
        let mut env = shared_replica_env()?;
        env.extend([
            ("SHOAL_KEY_PREFIX".to_owned(), prefix.clone()),
            (
                "SHOAL_ALLOWED_HOSTS".to_owned(),
                "localhost,127.0.0.1,::1".to_owned(),
            ),
        ]);
        if let Some(redis) = &redis {
            env.push(("SHOAL_REDIS_URL".to_owned(), redis.url()));
        }
        if let Some(sentinel) = &sentinel {
            env.push(("SHOAL_REDIS_URL".to_owned(), sentinel.url()));
        }
        if let Some(cluster) = &redis_cluster {
            env.push(("SHOAL_REDIS_URL".to_owned(), cluster.url()));
        }
        if let Some(postgres) = &postgres {
            env.push(("SHOAL_DATABASE_URL".to_owned(), postgres.reader_url()));
            env.push(("SHOAL_DATABASE_WRITE_URL".to_owned(), postgres.writer_url()));
        }
        env.extend(options.env.iter().cloned());
        let mut replicas = Vec::with_capacity(options.replicas);
        let mut redis_proxies = std::collections::BTreeMap::new();
        for n in 1..=options.replicas {
            let mut own = env.clone();
            if let Some(redis) = &redis
                && options.redis_proxied.contains(&(n - 1))
            {
                let proxy =
                    crate::fault::FaultProxy::start(([127, 0, 0, 1], redis.port()).into()).await?;
                own.push((
                    "SHOAL_REDIS_URL".to_owned(),
                    redis.url_via(proxy.addr().port()),
                ));
                redis_proxies.insert(n - 1, proxy);
            }
            replicas
                .push(Replica::start(&options.server_bin, &format!("r{n}"), &path, &own).await?);
        }
        // A replica serves as soon as it listens, but until its bus subscription is in place
        // nothing published to it arrives (a GET stream's end, its events): tests start once every
        // replica is ready, as a balancer that follows readiness would send them traffic.
        if options.redis && options.wait_ready {
            for replica in &replicas {
                replica.wait_ready().await?;
            }
        }
        let balancer = if options.balancer {
            let ports: Vec<u16> = replicas.iter().map(Replica::port).collect();
            Some(Balancer::start(&path, options.balancer_port, &ports).await?)
        } else {
            None
        };
        let dir = (!options.keep_dir).then_some(dir);
        Ok(Self {
            balancer,
            replicas,
            redis,
            sentinel,
            redis_cluster,
            postgres,
            prefix,
            redis_proxies,
            dir,
            path,
        })
    }

    /// The MCP URL clients use: the balancer's, or the first replica's.
    pub fn mcp_url(&self) -> String {
        match &self.balancer {
            Some(balancer) => balancer.mcp_url(),
            None => self.replicas[0].mcp_url(),
        }
    }

    /// The port of the Redis primary the replicas use now (the one server, or the Sentinel set's
    /// current primary), for looking inside from the tests.
    ///
    /// # Panics
    /// When the topology was started without Redis.
    pub fn redis_port(&self) -> u16 {
        match (&self.redis, &self.sentinel, &self.redis_cluster) {
            (Some(redis), _, _) => redis.port(),
            (None, Some(sentinel), _) => sentinel.primary().port(),
            (None, None, Some(cluster)) => cluster.prefix_primary,
            (None, None, None) => panic!("the topology was started without Redis"),
        }
    }

    /// The ports of every Redis primary now (one, unless this is a Redis Cluster).
    ///
    /// # Panics
    /// When the topology was started without Redis.
    pub async fn redis_primary_ports(&self) -> Vec<u16> {
        match &self.redis_cluster {
            Some(cluster) => cluster.primary_ports().await.unwrap_or_default(),
            None => vec![self.redis_port()],
        }
    }

    /// Waits until the Redis primary's replica has everything written so far (on a Sentinel set
    /// or a Redis Cluster), so that a failover now loses nothing.
    ///
    /// # Errors
    /// When it does not catch up in time, or the topology has no replicated Redis.
    pub async fn wait_redis_replicated(&self) -> TopologyResult<()> {
        match (&self.sentinel, &self.redis_cluster) {
            (Some(sentinel), _) => sentinel.wait_replicated().await,
            (None, Some(cluster)) => cluster.wait_replicated().await,
            (None, None) => Err(TopologyError::Broken("no replicated Redis".into())),
        }
    }

    /// Kills the Redis primary the replicas use (SIGKILL) and waits until its replica has taken
    /// over (a Sentinel set's promotion, or a Redis Cluster's failover of the prefix's slot);
    /// returns how long that took.
    ///
    /// # Errors
    /// When no failover completes in time, or the topology has no replicated Redis.
    pub async fn kill_redis_primary_and_wait_failover(&mut self) -> TopologyResult<Duration> {
        let prefix = self.prefix.clone();
        match (&mut self.sentinel, &mut self.redis_cluster) {
            (Some(sentinel), _) => sentinel.kill_primary_and_wait_failover().await,
            (None, Some(cluster)) => cluster.kill_prefix_primary_and_wait_failover(&prefix).await,
            (None, None) => Err(TopologyError::Broken("no replicated Redis".into())),
        }
    }

    /// The working directory (logs of every process).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// A connection to the topology's PostgreSQL, for set-up and checks from the outside.
    ///
    /// # Panics
    /// When the topology was started without PostgreSQL.
    ///
    /// # Errors
    /// When it cannot connect.
    pub async fn postgres_client(&self) -> TopologyResult<tokio_postgres::Client> {
        let postgres = self
            .postgres
            .as_ref()
            .expect("the topology was started with PostgreSQL");
        Ok(postgres.client().await?)
    }

    /// The replica called `name`, or whose running process has the id `name` (what a response's
    /// `x-shoal-replica` header names).
    pub fn replica(&mut self, name: &str) -> Option<&mut Replica> {
        self.replicas
            .iter_mut()
            .find(|r| r.name == name || r.id == name)
    }

    /// The last `lines` lines of every replica log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for replica in &self.replicas {
            let text = std::fs::read_to_string(replica.log()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            out.push_str(&format!("--- {} ---\n", replica.name));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// Lines of each log a failing test prints.
const FAILURE_LOG_LINES: usize = 40;

/// The last `lines` lines of a log file, each cut to a bounded width (a log line can carry a
/// payload).
fn log_tail(path: &Path, lines: usize) -> String {
    const WIDTH: usize = 400;
    let Ok(text) = std::fs::read_to_string(path) else {
        return format!("(no log at {})\n", path.display());
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|line| match line.char_indices().nth(WIDTH) {
            Some((cut, _)) => format!("{}…\n", &line[..cut]),
            None => format!("{line}\n"),
        })
        .collect()
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test: what its processes said last goes with its report (CI keeps only
            // the test's output), before the files are removed.
            let mut logs: Vec<(String, PathBuf)> = self
                .replicas
                .iter()
                .map(|r| (format!("replica {} ({})", r.name, r.port), r.log.clone()))
                .collect();
            if let Some(balancer) = &self.balancer {
                logs.push(("balancer".into(), balancer.dir.join("error.log")));
            }
            for (what, path) in logs {
                eprintln!(
                    "--- last {FAILURE_LOG_LINES} lines of the {what} log ---\n{}",
                    log_tail(&path, FAILURE_LOG_LINES)
                );
            }
        }
        // Replicas and Redis are killed by kill_on_drop, the balancer by its own Drop: stop
        // them before their files go.
        self.balancer = None;
        self.replicas.clear();
        self.redis = None;
        self.sentinel = None;
        self.redis_cluster = None;
        self.postgres = None;
        self.redis_proxies.clear();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if self.dir.is_none() {
            eprintln!("topology files kept in {}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_lines_become_pairs() {
        let pairs = parse_env_file("# comment\n\nA=1\n B = two words \nC=x=y\nnot a pair\n");
        assert_eq!(
            pairs,
            vec![
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "two words".to_owned()),
                ("C".to_owned(), "x=y".to_owned()),
            ]
        );
    }

    #[test]
    fn the_test_redis_user_is_the_compose_one() {
        let compose =
            std::fs::read_to_string(repo_root().join("docker-compose.yml")).expect("compose file");
        let redis = compose.split("\n  redis:\n").nth(1).expect("redis service");
        let redis = redis.split("\n  postgres:\n").next().expect("its block");
        let rules = format!("      - {REDIS_USER}\n      - \"on\"\n");
        assert!(redis.contains(&rules), "compose declares user {REDIS_USER}");
        for rule in ["\"~shoal:*\"", "\"&shoal:*\""]
            .iter()
            .chain(REDIS_USER_COMMANDS)
        {
            assert!(
                redis.contains(&format!("      - {rule}\n")),
                "compose's {REDIS_USER} has {rule}"
            );
        }
    }

    #[test]
    fn the_shared_env_file_configures_the_toolsets() {
        let env = shared_replica_env().expect("deploy/shoal.env is readable");
        assert!(env.iter().any(|(k, _)| k == "SHOAL_TOOLSETS"), "{env:?}");
    }
}
