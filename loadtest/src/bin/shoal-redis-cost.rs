//! `shoal-redis-cost`: what each kind of MCP operation costs Redis (commands, bytes, Redis CPU) and
//! the replica (CPU), measured on a real topology it starts itself: two replicas on one Redis, with
//! PostgreSQL for the cached tool. Each operation runs `--n` times in a row; the figures are the
//! deltas of Redis's `INFO` (commandstats, stats, cpu) and of the replicas' CPU counters, less what
//! the replicas do when idle (watchdog, janitor, probes) over the same time, per operation. The
//! input of docs/capacity.md.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use serde_json::{Value, json};
use shoal_testkit::{
    client::{EventStream, McpClient},
    sentinel::redis_cli,
    topology::{Topology, TopologyOptions},
};

#[derive(Debug, Parser)]
#[command(name = "shoal-redis-cost", version)]
struct Args {
    /// Operations per kind (session-level kinds run a tenth as many, at least 50).
    #[arg(long, default_value_t = 2000)]
    n: usize,
    /// Subscribers of the key written in the notification measurement.
    #[arg(long, default_value_t = 10)]
    subscribers: usize,
    /// The shoal-server binary (default: next to this binary).
    #[arg(long)]
    server_bin: Option<std::path::PathBuf>,
}

/// Redis's and the replicas' counters at one moment.
#[derive(Debug, Clone, Default)]
struct Counters {
    /// Calls per command (lower case), INFO and CLIENT excepted (this tool's own).
    commands: std::collections::BTreeMap<String, f64>,
    net_in: f64,
    net_out: f64,
    redis_cpu: f64,
    replica_cpu: f64,
    at: Option<Instant>,
}

impl Counters {
    async fn read(topology: &Topology) -> anyhow::Result<Self> {
        let port = topology.redis_port();
        let mut counters = Counters {
            at: Some(Instant::now()),
            ..Default::default()
        };
        for line in redis_cli(port, &["INFO", "commandstats"]).await?.lines() {
            let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            if name == "info" || name.starts_with("client") {
                continue;
            }
            let calls = field(rest, ',', "calls=").unwrap_or(0.0);
            counters.commands.insert(name.to_owned(), calls);
        }
        let stats = redis_cli(port, &["INFO", "all"]).await?;
        counters.net_in = field(&stats, '\n', "total_net_input_bytes:").unwrap_or(0.0);
        counters.net_out = field(&stats, '\n', "total_net_output_bytes:").unwrap_or(0.0);
        counters.redis_cpu = field(&stats, '\n', "used_cpu_sys:").unwrap_or(0.0)
            + field(&stats, '\n', "used_cpu_user:").unwrap_or(0.0);
        // The replicas' own CPU time, from the kernel (clock ticks: 10 ms on most kernels, so
        // runs of many operations are what make the per-operation figure exact).
        let ticks = procfs::ticks_per_second().max(1) as f64;
        for pid in topology.replicas.iter().filter_map(|r| r.pid()) {
            let stat = procfs::process::Process::new(i32::try_from(pid)?)?.stat()?;
            counters.replica_cpu += (stat.utime + stat.stime) as f64 / ticks;
        }
        Ok(counters)
    }

    /// `self - before`, per second of the interval.
    fn rate_since(&self, before: &Counters) -> Counters {
        let seconds = match (self.at, before.at) {
            (Some(now), Some(then)) => now.duration_since(then).as_secs_f64().max(1e-3),
            _ => 1.0,
        };
        self.minus(before).scaled(1.0 / seconds)
    }

    fn minus(&self, other: &Counters) -> Counters {
        let mut commands = self.commands.clone();
        for (name, calls) in &other.commands {
            *commands.entry(name.clone()).or_default() -= calls;
        }
        commands.retain(|_, calls| calls.abs() > 1e-9);
        Counters {
            commands,
            net_in: self.net_in - other.net_in,
            net_out: self.net_out - other.net_out,
            redis_cpu: self.redis_cpu - other.redis_cpu,
            replica_cpu: self.replica_cpu - other.replica_cpu,
            at: None,
        }
    }

    fn scaled(&self, by: f64) -> Counters {
        Counters {
            commands: self
                .commands
                .iter()
                .map(|(name, calls)| (name.clone(), calls * by))
                .collect(),
            net_in: self.net_in * by,
            net_out: self.net_out * by,
            redis_cpu: self.redis_cpu * by,
            replica_cpu: self.replica_cpu * by,
            at: None,
        }
    }
}

/// The number after `name` in `text`, up to `separator`.
fn field(text: &str, separator: char, name: &str) -> Option<f64> {
    let start = text.find(name)? + name.len();
    text[start..]
        .split([separator, '\r'])
        .next()?
        .trim()
        .parse()
        .ok()
}

/// One measured kind: its name, how many ran, and what they cost per operation.
struct Measured {
    kind: String,
    ops: usize,
    per_op: Counters,
}

/// Runs `ops` operations with `run` and returns their cost per operation, idle cost removed.
async fn measure<F>(
    topology: &Topology,
    idle: &Counters,
    kind: &str,
    ops: usize,
    run: F,
) -> anyhow::Result<Measured>
where
    F: AsyncFnOnce() -> anyhow::Result<()>,
{
    let before = Counters::read(topology).await?;
    run().await.with_context(|| kind.to_owned())?;
    let after = Counters::read(topology).await?;
    let elapsed = after
        .at
        .zip(before.at)
        .map_or(0.0, |(a, b)| a.duration_since(b).as_secs_f64());
    let cost = after.minus(&before).minus(&idle.scaled(elapsed));
    Ok(Measured {
        kind: kind.to_owned(),
        ops,
        per_op: cost.scaled(1.0 / ops as f64),
    })
}

async fn echo(client: &McpClient) -> anyhow::Result<()> {
    call(client, "echo", json!({"text": "x"})).await
}

async fn call(client: &McpClient, tool: &str, arguments: Value) -> anyhow::Result<()> {
    let exchange = client
        .request("tools/call", json!({"name": tool, "arguments": arguments}))
        .await?;
    let result = exchange
        .result()
        .map_err(|e| anyhow::anyhow!("{tool}: {e}"))?;
    anyhow::ensure!(
        result.get("isError") != Some(&json!(true)),
        "{tool} failed: {result}"
    );
    Ok(())
}

async fn open(url: &str) -> anyhow::Result<McpClient> {
    let mut client = McpClient::legacy(url);
    client.initialize().await?;
    Ok(client)
}

/// Subscribers of `uri`, each with a GET stream drained in the background.
async fn subscribers(url: &str, uri: &str, n: usize) -> anyhow::Result<Vec<McpClient>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let client = open(url).await?;
        client
            .request("resources/subscribe", json!({"uri": uri}))
            .await?
            .result()
            .map_err(|e| anyhow::anyhow!("subscribe: {e}"))?;
        let stream = client.open_get(None).await?;
        tokio::spawn(drain(stream));
        clients.push(client);
    }
    Ok(clients)
}

async fn drain(mut stream: EventStream) {
    while stream.next_event().await.is_some() {}
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server_bin = match args.server_bin.clone() {
        Some(bin) => bin,
        None => std::env::current_exe()?.with_file_name("shoal-server"),
    };
    let mut options = TopologyOptions::cluster(server_bin, 2);
    options.balancer = false;
    options.postgres = true;
    let topology = Topology::start(options).await.context("the topology")?;
    let idle = {
        let before = Counters::read(&topology).await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        Counters::read(&topology).await?.rate_since(&before)
    };
    let results = run_all(&topology, &idle, &args).await?;
    print(&results, &idle);
    Ok(())
}

async fn run_all(
    topology: &Topology,
    idle: &Counters,
    args: &Args,
) -> anyhow::Result<Vec<Measured>> {
    let (one, two) = (
        topology.replicas[0].mcp_url(),
        topology.replicas[1].mcp_url(),
    );
    let (n, few) = (args.n, (args.n / 10).max(50));
    let client = open(&one).await?;
    let mut results = Vec::new();
    results.push(
        measure(
            topology,
            idle,
            "session open (initialize + initialized)",
            few,
            async || {
                for _ in 0..few {
                    open(&one).await?;
                }
                Ok(())
            },
        )
        .await?,
    );
    results.push(
        measure(
            topology,
            idle,
            "tool call on a session (echo)",
            n,
            async || {
                for _ in 0..n {
                    echo(&client).await?;
                }
                Ok(())
            },
        )
        .await?,
    );
    let opened: Vec<McpClient> = {
        let mut opened = Vec::with_capacity(few);
        for _ in 0..few {
            opened.push(open(&one).await?);
        }
        opened
    };
    results.push(
        measure(
            topology,
            idle,
            "session restore: first call on another replica",
            few,
            async || {
                for client in &opened {
                    echo(&client.fork_at(&two)).await?;
                }
                Ok(())
            },
        )
        .await?,
    );
    results.extend(kv_costs(topology, idle, &client, &two, args).await?);
    results.extend(cache_and_resume(topology, idle, &client, &one, few).await?);
    Ok(results)
}

/// `kv_set` without and with subscribers, `kv_get`.
async fn kv_costs(
    topology: &Topology,
    idle: &Counters,
    client: &McpClient,
    two: &str,
    args: &Args,
) -> anyhow::Result<Vec<Measured>> {
    let n = args.n;
    let mut results = Vec::new();
    results.push(
        measure(topology, idle, "kv_set, no subscriber", n, async || {
            for i in 0..n {
                call(
                    client,
                    "kv_set",
                    json!({"key": format!("k{}", i % 50), "value": "v"}),
                )
                .await?;
            }
            Ok(())
        })
        .await?,
    );
    results.push(
        measure(topology, idle, "kv_get", n, async || {
            for i in 0..n {
                call(client, "kv_get", json!({"key": format!("k{}", i % 50)})).await?;
            }
            Ok(())
        })
        .await?,
    );
    let _subscribed = subscribers(two, "kv://followed", args.subscribers).await?;
    let label = format!(
        "kv_set, {} subscribers (GET streams on the other replica)",
        args.subscribers
    );
    results.push(
        measure(topology, idle, &label, n, async || {
            for _ in 0..n {
                call(client, "kv_set", json!({"key": "followed", "value": "v"})).await?;
            }
            Ok(())
        })
        .await?,
    );
    Ok(results)
}

async fn cache_and_resume(
    topology: &Topology,
    idle: &Counters,
    client: &McpClient,
    url: &str,
    few: usize,
) -> anyhow::Result<Vec<Measured>> {
    let query = |n: usize| json!({"sql": "SELECT $1::int AS n", "params": [n]});
    call(client, "pg_query", query(0)).await?;
    let hit = measure(
        topology,
        idle,
        "cached tool, hit (pg_query)",
        few * 10,
        async || {
            for _ in 0..few * 10 {
                call(client, "pg_query", query(0)).await?;
            }
            Ok(())
        },
    )
    .await?;
    let miss = measure(
        topology,
        idle,
        "cached tool, miss (pg_query, new arguments)",
        few,
        async || {
            for n in 1..=few {
                call(client, "pg_query", query(n)).await?;
            }
            Ok(())
        },
    )
    .await?;
    let follower = open(url).await?;
    follower
        .request("resources/subscribe", json!({"uri": "kv://resume"}))
        .await?
        .result()
        .map_err(|e| anyhow::anyhow!("subscribe: {e}"))?;
    let mut stream = follower.open_get(None).await?;
    call(client, "kv_set", json!({"key": "resume", "value": "v"})).await?;
    let last = loop {
        let event = stream.next_event().await.context("the update")?;
        if event.message.is_some() && event.id.is_some() {
            break event.id.unwrap_or_default();
        }
    };
    drop(stream);
    let resume = measure(
        topology,
        idle,
        "GET stream resume (Last-Event-ID)",
        few,
        async || {
            for _ in 0..few {
                drop(follower.open_get(Some(&last)).await?);
            }
            Ok(())
        },
    )
    .await?;
    Ok(vec![hit, miss, resume])
}

fn print(results: &[Measured], idle: &Counters) {
    println!(
        "idle (2 replicas): {:.1} commands/s, {:.1} ms Redis CPU/s",
        total(idle),
        idle.redis_cpu * 1e3
    );
    println!(
        "| operation | n | Redis commands | of which | bytes in | bytes out | Redis CPU µs | replica CPU µs |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|");
    for m in results {
        let mut top: Vec<(&String, &f64)> = m
            .per_op
            .commands
            .iter()
            .filter(|(_, c)| **c >= 0.05)
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(a.1));
        let top: Vec<String> = top
            .iter()
            .take(4)
            .map(|(name, c)| format!("{name} {c:.2}"))
            .collect();
        println!(
            "| {} | {} | {:.2} | {} | {:.0} | {:.0} | {:.1} | {:.1} |",
            m.kind,
            m.ops,
            total(&m.per_op),
            top.join(", "),
            m.per_op.net_in,
            m.per_op.net_out,
            m.per_op.redis_cpu * 1e6,
            m.per_op.replica_cpu * 1e6
        );
    }
}

fn total(counters: &Counters) -> f64 {
    counters.commands.values().sum()
}
