//! `shoal-loadtest`: a load generator for any MCP server over Streamable HTTP.
//!
//! `run` drives many concurrent sessions with a tool mix (closed or open loop, either protocol era,
//! optional subscriptions and chaos) and prints a latency table per tool; `--json` and `--plot`
//! write the full report and an SVG of throughput and latency over time. `idle-sessions` opens
//! sessions and leaves them idle (for memory measurements). See `docs/benchmarks.md`.

mod chaos;
mod ledger;
mod plot;
mod run;
mod soak;
mod stats;

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use shoal_testkit::client::{Era, McpClient};
use tokio::task::JoinSet;

use crate::{
    chaos::{Fault, Schedule},
    run::{MixEntry, Pacing, RunConfig, parse_mix},
};

/// Load generator for MCP servers (Streamable HTTP).
#[derive(Debug, Parser)]
#[command(name = "shoal-loadtest", version)]
struct Cli {
    /// Bearer token sent with every request: an API key or an OAuth access token (for servers
    /// with authentication on, as shoal's compose cluster is).
    #[arg(
        long,
        global = true,
        env = "SHOAL_LOADTEST_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EraArg {
    /// 2025-11-25: sessions, GET streams, resources/subscribe.
    Legacy,
    /// 2026-07-28: stateless requests, subscriptions/listen.
    Modern,
    /// Both: even-numbered sessions legacy, odd-numbered 2026-07-28.
    Both,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Scenario {
    /// The article's baseline: 150 sessions, a realistic mix (reads, writes, a slow tool), think
    /// time between calls, subscriptions measuring notification delivery.
    Baseline,
    /// Maximum throughput: closed loop without think time.
    Max,
    /// Open loop at a constant arrival rate (--rate).
    Open,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process")]
enum Command {
    /// Drive a server with a scenario.
    Run(RunArgs),
    /// Plot a soak's samples (scripts/soak.sh) and check that they stayed flat.
    PlotSoak {
        /// The samples: `minute,series,value` lines.
        #[arg(long)]
        csv: PathBuf,
        /// Where to write the SVG.
        #[arg(long)]
        svg: PathBuf,
        /// Tolerated ratio of a series' mean over the last quarter to its mean over the second
        /// quarter (the first is the warm-up; exit status 1 beyond it).
        #[arg(long, default_value_t = 1.25)]
        max_growth: f64,
    },
    /// Open sessions (legacy initialize) and leave them idle; prints how long it took.
    IdleSessions {
        /// MCP endpoint.
        #[arg(long, default_value = "http://127.0.0.1:8080/mcp")]
        url: String,
        /// Sessions to open.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Sessions opened in parallel.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

/// The options of `run`.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// MCP endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8080/mcp")]
    url: String,
    /// Where subscriptions open their notification streams (default: --url). Point --url at one
    /// replica and this at another to measure cross-replica delivery.
    #[arg(long)]
    notify_url: Option<String>,
    /// Scenario preset (options below override it).
    #[arg(long, value_enum, default_value_t = Scenario::Baseline)]
    scenario: Scenario,
    /// Protocol era.
    #[arg(long, value_enum, default_value_t = EraArg::Legacy)]
    era: EraArg,
    /// Concurrent sessions (150 for the baseline, 32 otherwise).
    #[arg(long)]
    sessions: Option<usize>,
    /// Measured duration (e.g. 30s, 2m).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    duration: Duration,
    /// Unmeasured warm-up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Requests per second for the open loop.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Think time between calls in the closed loop (baseline: 100ms, max: 0).
    #[arg(long, value_parser = humantime::parse_duration)]
    think: Option<Duration>,
    /// Tool mix, tool=weight,… (baseline: kv_get=40,echo=30,kv_set=20,sleep=10; others: echo=1).
    #[arg(long)]
    mix: Option<String>,
    /// Subscribe every session to a resource another session writes (kv_set), and measure
    /// notification delivery (baseline: on).
    #[arg(long)]
    subscribe: Option<bool>,
    /// Milliseconds the slow tool (`sleep`) takes.
    #[arg(long, default_value_t = 200)]
    slow_ms: u64,
    /// Rounds of the CPU-bound tool (`hash`), each call with new data.
    #[arg(long, default_value_t = 1_000_000)]
    hash_rounds: u64,
    /// The statement `pg_query` runs.
    #[arg(
        long,
        default_value = "SELECT count(*) AS deployments FROM deployments"
    )]
    pg_sql: String,
    /// A chaos schedule (TOML, `[[fault]]` tables with `name`, `at`, `run`, `heal`, `heal_after`):
    /// faults injected during the measured run; the report shows what each did to the clients.
    #[arg(long, conflicts_with = "chaos_cmd")]
    chaos: Option<PathBuf>,
    /// Shell command run at --chaos-at (e.g. kill a replica): a one-fault schedule.
    #[arg(long, requires = "chaos_at")]
    chaos_cmd: Option<String>,
    /// When to run --chaos-cmd, from the start of measurement.
    #[arg(long, value_parser = humantime::parse_duration)]
    chaos_at: Option<Duration>,
    /// Shell command that repairs what --chaos-cmd broke.
    #[arg(long, requires = "chaos_cmd")]
    restart_cmd: Option<String>,
    /// How long after --chaos-at to run --restart-cmd.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    restart_after: Duration,
    /// Times a request that failed in transport, with 502/503/504 or with a response stream
    /// that ended early is sent again (a replica died under it), as a resilient client would.
    /// Retries are reported as recoveries.
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// Write the full report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG plot of throughput and latency over time here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Fraction of failed requests tolerated before exiting non-zero (0: any failure fails).
    #[arg(long, default_value_t = 0.0)]
    max_error_rate: f64,
    /// Lost (or duplicated) notifications tolerated before exiting non-zero.
    #[arg(long, default_value_t = 0)]
    max_lost: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => args.run(cli.token).await,
        Command::PlotSoak {
            csv,
            svg,
            max_growth,
        } => soak::plot(&csv, &svg, max_growth),
        Command::IdleSessions {
            url,
            count,
            concurrency,
        } => idle_sessions(url, cli.token, count, concurrency).await,
    };
    match result {
        Ok(code) => code,
        Err(error) => fail(&error),
    }
}

impl RunArgs {
    /// Runs the scenario these options describe.
    async fn run(self, token: Option<String>) -> Result<ExitCode, String> {
        let Self {
            url,
            notify_url,
            scenario,
            era,
            sessions,
            duration,
            warmup,
            rate,
            think,
            mix,
            subscribe,
            slow_ms,
            hash_rounds,
            pg_sql,
            chaos,
            chaos_cmd,
            chaos_at,
            restart_cmd,
            restart_after,
            retries,
            json,
            plot,
            max_error_rate,
            max_lost,
            quiet,
        } = self;
        let baseline = matches!(scenario, Scenario::Baseline);
        let mix = resolve_mix(mix, baseline)?;
        let (era, mixed_eras) = match era {
            EraArg::Legacy => (Era::Legacy, false),
            EraArg::Modern => (Era::Modern, false),
            EraArg::Both => (Era::Legacy, true),
        };
        let schedule = schedule(
            chaos.as_deref(),
            chaos_cmd,
            chaos_at,
            restart_cmd,
            restart_after,
        )?;
        let pacing = match scenario {
            Scenario::Open => Pacing::Open { rate },
            Scenario::Baseline => Pacing::Closed {
                think: think.unwrap_or(Duration::from_millis(100)),
            },
            Scenario::Max => Pacing::Closed {
                think: think.unwrap_or(Duration::ZERO),
            },
        };
        let config = RunConfig {
            url,
            token,
            notify_url,
            era,
            mixed_eras,
            sessions: sessions.unwrap_or(if baseline { 150 } else { 32 }).max(1),
            duration,
            warmup,
            pacing,
            mix,
            subscribe: subscribe.unwrap_or(baseline),
            slow_ms,
            hash_rounds,
            pg_sql,
            schedule,
            retries,
        };
        run_scenario(config, json, plot, max_error_rate, max_lost, quiet).await
    }
}

/// The tool mix asked for, or the scenario's default (the baseline's, or echo only).
fn resolve_mix(mix: Option<String>, baseline: bool) -> Result<Vec<MixEntry>, String> {
    let mix = mix.unwrap_or_else(|| {
        if baseline {
            "kv_get=40,echo=30,kv_set=20,sleep=10"
        } else {
            "echo=1"
        }
        .to_owned()
    });
    match parse_mix(&mix) {
        Ok(mix) if !mix.is_empty() => Ok(mix),
        Ok(_) => Err("the tool mix is empty".to_owned()),
        Err(error) => Err(error),
    }
}

/// The chaos schedule: a file's, plus the one fault given on the command line.
fn schedule(
    file: Option<&std::path::Path>,
    run: Option<String>,
    at: Option<Duration>,
    heal: Option<String>,
    heal_after: Duration,
) -> Result<Schedule, String> {
    let mut schedule = match file {
        Some(path) => Schedule::load(path)?,
        None => Schedule::default(),
    };
    if let (Some(run), Some(at)) = (run, at) {
        schedule.push(Fault {
            name: None,
            at,
            run,
            heal,
            heal_after,
        });
    }
    Ok(schedule)
}

fn fail(message: &str) -> ExitCode {
    eprintln!("shoal-loadtest: {message}");
    ExitCode::from(2)
}

async fn run_scenario(
    config: RunConfig,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
    max_error_rate: f64,
    max_lost: u64,
    quiet: bool,
) -> Result<ExitCode, String> {
    let description = serde_json::json!({
        "url": config.url,
        "era": if config.mixed_eras { "Both".to_owned() } else { format!("{:?}", config.era) },
        "sessions": config.sessions,
        "duration_secs": config.duration.as_secs_f64(),
        "warmup_secs": config.warmup.as_secs_f64(),
        "pacing": format!("{:?}", config.pacing),
        "mix": config.mix.iter().map(|m| format!("{}={}", m.tool, m.weight)).collect::<Vec<_>>(),
        "subscribe": config.subscribe,
        "chaos": config.schedule.faults.iter().map(|f| serde_json::json!({
            "name": f.label(), "at_secs": f.at.as_secs_f64(), "run": f.run, "heal": f.heal,
            "heal_after_secs": f.heal.as_ref().map(|_| f.heal_after.as_secs_f64()),
        })).collect::<Vec<_>>(),
        "retries": config.retries,
        "notify_url": config.notify_url,
    });
    let title = format!(
        "{} sessions, {}",
        config.sessions,
        if config.mixed_eras {
            "both eras".to_owned()
        } else {
            format!("{:?}", config.era)
        }
    );
    let duration = config.duration;
    let (stats, events) = run::run(config, !quiet).await?;
    let report = stats.report(duration, description);
    println!("{}", report.table());
    for event in &events {
        println!("{event}");
    }
    if let Some(path) = json {
        let mut value = serde_json::to_value(&report).map_err(|e| e.to_string())?;
        value["events"] = serde_json::json!(events);
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&value).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if let Some(path) = plot
        && let Err(error) = plot::draw(&report, &title, &path)
    {
        eprintln!("plot not written: {error}");
    }
    let error_rate = report.errors as f64 / report.requests.max(1) as f64;
    let hooks_failed = events.iter().filter(|e| e.contains(" FAILED: ")).count();
    let n = &report.notifications;
    if error_rate > max_error_rate
        || n.lost > max_lost
        || n.duplicated > max_lost
        || !report.lost_writes.is_empty()
        || hooks_failed > 0
        || report.ok == 0
    {
        eprintln!(
            "FAILED: error rate {error_rate:.4} (max {max_error_rate}), {} notifications lost and {} duplicated (max {max_lost}), {} writes lost, {hooks_failed} chaos commands failed",
            n.lost,
            n.duplicated,
            report.lost_writes.len()
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

async fn idle_sessions(
    url: String,
    token: Option<String>,
    count: usize,
    concurrency: usize,
) -> Result<ExitCode, String> {
    let start = std::time::Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for _ in 0..count {
        let url = url.clone();
        let token = token.clone();
        let semaphore = semaphore.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire().await;
            let mut client = McpClient::legacy(url).with_bearer(token.as_deref());
            client.initialize().await.map(|_| ())
        });
    }
    let mut failed = 0;
    while let Some(result) = tasks.join_next().await {
        if !matches!(result, Ok(Ok(()))) {
            failed += 1;
        }
    }
    println!(
        "opened {} sessions in {:.1} s ({failed} failed)",
        count - failed,
        start.elapsed().as_secs_f64()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
