//! `shoal-cluster`: starts a local shoal topology from real processes (Redis, N replicas, an nginx
//! round-robin balancer) for people without Docker, scripts and benchmarks. Stops everything on
//! Ctrl-C / SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use shoal_testkit::{
    postgres::PostgresServer,
    topology::{Topology, TopologyOptions, repo_root},
};

/// Start a local shoal cluster: Redis, replicas and an nginx balancer on loopback ports.
#[derive(Debug, Parser)]
#[command(name = "shoal-cluster", version)]
struct Args {
    /// Number of replicas.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// One replica on in-memory backends: no Redis, no balancer.
    #[arg(long)]
    embedded: bool,
    /// Do not start the balancer (clients talk to replicas directly).
    #[arg(long)]
    no_balancer: bool,
    /// Also start PostgreSQL with the demo schema (deploy/postgres/demo.sql) for the postgres
    /// toolset.
    #[arg(long)]
    postgres: bool,
    /// The SQL loaded into PostgreSQL with --postgres (default: deploy/postgres/demo.sql).
    #[arg(long)]
    schema: Option<PathBuf>,
    /// Port of the balancer (a free port when unset).
    #[arg(long)]
    port: Option<u16>,
    /// The shoal-server binary (default: next to this binary).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Extra environment for every replica, KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Write the endpoints as JSON to this file once everything is ready.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Keep the working directory (logs) after stopping.
    #[arg(long)]
    keep_logs: bool,
    /// Serve the fault-control endpoint on this loopback port (`POST /replicas/r2/kill`,
    /// `/redis/restart`, `/redis/partition/r2`, `/postgres/stop`…; see docs/loadtest.md), for
    /// the load generator's chaos schedules.
    #[arg(long)]
    control_port: Option<u16>,
    /// Every replica reaches Redis through a fault proxy, so that `/redis/partition/{replica}`
    /// can cut one replica off.
    #[arg(long)]
    redis_proxies: bool,
    /// Redis keeps an append-only file (`appendfsync everysec`, as in compose), so its data
    /// survives `/redis/restart`.
    #[arg(long)]
    redis_aof: bool,
    /// Run Redis as a Sentinel set (a primary, a replica, three sentinels) instead of one server;
    /// `/redis/primary-kill` then fails the primary over.
    #[arg(long, conflicts_with_all = ["redis_proxies", "redis_aof"])]
    redis_sentinel: bool,
    /// Run Redis as a Redis Cluster (3 primaries, 3 replicas; the keys spread over the shards)
    /// instead of one server; `/redis/primary-kill` then fails over the primary of the prefix's
    /// slot.
    #[arg(long, conflicts_with_all = ["redis_proxies", "redis_aof", "redis_sentinel"])]
    redis_cluster: bool,
    /// With --redis-cluster: the key prefix a hash tag, so every key lands in one slot (one shard
    /// does all the work; to measure what spreading the keys buys, `scripts/shard-scaling.sh`).
    #[arg(long, requires = "redis_cluster")]
    redis_one_slot: bool,
}

fn parse_env(value: &str) -> Result<(String, String), String> {
    value
        .split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {value:?}"))
}

fn default_server_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    Ok(exe.with_file_name("shoal-server"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server_bin = match args.server_bin {
        Some(bin) => bin,
        None => default_server_bin()?,
    };
    anyhow::ensure!(
        server_bin.exists(),
        "{} not found: build it first (cargo build --release -p shoal-server) or pass --server-bin",
        server_bin.display()
    );
    let mut options = TopologyOptions::cluster(
        server_bin,
        if args.embedded {
            1
        } else {
            args.replicas.max(1)
        },
    );
    options.redis = !args.embedded;
    options.balancer = !args.embedded && !args.no_balancer;
    options.balancer_port = args.port;
    options.postgres = args.postgres;
    options.keep_dir = args.keep_logs;
    options.env = args.env;
    options.redis_aof = args.redis_aof;
    if args.redis_sentinel {
        options.redis_kind = shoal_testkit::topology::RedisKind::Sentinel;
    }
    if args.redis_cluster {
        options.redis_kind = shoal_testkit::topology::RedisKind::Cluster;
        options.redis_one_slot = args.redis_one_slot;
    }
    if args.redis_proxies {
        options.redis_proxied = (0..options.replicas).collect();
    }
    let topology = Topology::start(options)
        .await
        .context("starting the topology")?;

    if let Some(postgres) = &topology.postgres {
        load_schema(postgres, args.schema.clone()).await?;
    }

    let topology = std::sync::Arc::new(tokio::sync::Mutex::new(topology));
    let control = match args.control_port {
        Some(port) => Some(
            shoal_testkit::control::serve(topology.clone(), port)
                .await
                .context("binding the control port")?,
        ),
        None => None,
    };
    let redis_primaries = {
        let topology = topology.lock().await;
        if topology.redis.is_some()
            || topology.sentinel.is_some()
            || topology.redis_cluster.is_some()
        {
            topology.redis_primary_ports().await
        } else {
            Vec::new()
        }
    };
    announce(
        &*topology.lock().await,
        &redis_primaries,
        args.ready_file.as_deref(),
        control.as_ref().map(|(addr, _)| *addr),
    )?;

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    println!("stopping");
    if let Some((_, task)) = control {
        task.abort();
        let _ = task.await;
    }
    drop(topology);
    Ok(())
}

/// Loads the demo schema (or `schema`) into the topology's PostgreSQL.
async fn load_schema(postgres: &PostgresServer, schema: Option<PathBuf>) -> anyhow::Result<()> {
    let path = schema.unwrap_or_else(|| repo_root().join("deploy/postgres/demo.sql"));
    let sql =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    postgres
        .client()
        .await
        .context("connecting to PostgreSQL")?
        .batch_execute(&sql)
        .await
        .with_context(|| format!("loading {}", path.display()))?;
    println!(
        "  postgres:     {} (schema {})",
        postgres.url(),
        path.display()
    );
    Ok(())
}

/// Prints the endpoints, and writes them as JSON to `ready_file` when asked.
fn announce(
    topology: &Topology,
    redis_primaries: &[u16],
    ready_file: Option<&std::path::Path>,
    control: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    println!("shoal cluster is up (logs in {})", topology.dir().display());
    println!("  MCP endpoint: {}", topology.mcp_url());
    if let Some(redis) = &topology.redis {
        println!(
            "  redis:        {} (replicas connect as user shoal, limited to key prefix {})",
            redis.admin_url(),
            topology.prefix
        );
    }
    for replica in &topology.replicas {
        println!(
            "  replica {}:   {} (metrics: {}/metrics)",
            replica.name,
            replica.mcp_url(),
            replica.base_url()
        );
    }
    if let Some(addr) = control {
        println!("  fault control: http://{addr} (POST /replicas/r2/kill, /redis/restart, …)");
    }
    println!("Press Ctrl-C to stop.");
    if let Some(path) = ready_file {
        let ready = serde_json::json!({
            "mcp_url": topology.mcp_url(),
            "redis_url": topology.redis.as_ref().map(|r| r.url()),
            "redis_admin_url": topology.redis.as_ref().map(|r| r.admin_url()),
            "database_url": topology.postgres.as_ref().map(|p| p.url()),
            "prefix": topology.prefix,
            "redis_primary_ports": redis_primaries,
            "replicas": topology.replicas.iter().map(|r| serde_json::json!({
                "name": r.name, "mcp_url": r.mcp_url(), "base_url": r.base_url(), "log": r.log(), "pid": r.pid(),
            })).collect::<Vec<_>>(),
            "dir": topology.dir(),
            "control_url": control.map(|addr| format!("http://{addr}")),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&ready)?)
            .context("writing the ready file")?;
    }
    Ok(())
}
