//! Faults over HTTP: a small control endpoint in front of a running [`Topology`], so that a
//! process outside it (the load generator's chaos schedule, a shell) can kill, freeze, partition
//! and restart its parts. `shoal-cluster --control-port` serves it; the chaos tests serve it from
//! the test process. Every route is a `POST` answering `200 ok` once the fault is in place (or
//! healed), or `500` with what went wrong:
//!
//! | route | what it does |
//! |---|---|
//! | `/replicas/{name}/kill` | SIGKILL |
//! | `/replicas/{name}/start` | start a killed replica again (same port and environment) |
//! | `/replicas/{name}/restart` | SIGTERM, wait for the graceful exit, start again, wait until ready |
//! | `/replicas/{name}/freeze`, `/thaw` | SIGSTOP, SIGCONT |
//! | `/replicas/rolling-restart` | `restart` every replica, one at a time |
//! | `/redis/restart` | SIGTERM (with AOF: written out), start again on the same port |
//! | `/redis/kill`, `/redis/start` | SIGKILL; start again |
//! | `/redis/freeze`, `/redis/thaw` | SIGSTOP, SIGCONT |
//! | `/redis/primary-kill` | on a Sentinel set or a Redis Cluster: SIGKILL the primary the replicas use, answer once its replica took over |
//! | `/redis/partition/{name}` | blackhole the replica's link to Redis and drop its connections |
//! | `/redis/latency/{name}/{ms}` | delay everything on the replica's link to Redis |
//! | `/redis/heal/{name}` | the replica's link to Redis passes traffic again |
//! | `/postgres/stop`, `/postgres/start` | stop PostgreSQL; start it again on the same data |
//!
//! Partitions need the replica's Redis link to run through a fault proxy
//! ([`crate::topology::TopologyOptions::redis_through_proxy`]).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Mutex};

use crate::{fault::Fault, topology::Topology};

/// A topology shared between its owner and the control endpoint.
pub type SharedTopology = Arc<Mutex<Topology>>;

/// Serves the control endpoint for `topology` on `127.0.0.1:port` (0: a free port) until the
/// returned task is aborted; returns the address it listens on.
///
/// # Errors
/// When the port cannot be bound.
pub async fn serve(
    topology: SharedTopology,
    port: u16,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let topology = topology.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let topology = topology.clone();
                    async move {
                        let (status, text) = if request.method() == hyper::Method::POST {
                            match act(&topology, request.uri().path()).await {
                                Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
                                Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error + "\n"),
                            }
                        } else {
                            (StatusCode::METHOD_NOT_ALLOWED, "POST only\n".to_owned())
                        };
                        let mut response = Response::new(Full::new(Bytes::from(text)));
                        *response.status_mut() = status;
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((addr, task))
}

/// How long a replica may take to exit after SIGTERM (its drain) before it is killed.
const GRACE: Duration = Duration::from_secs(20);

/// Carries out the fault `path` names.
async fn act(topology: &SharedTopology, path: &str) -> Result<(), String> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut topology = topology.lock().await;
    match parts.as_slice() {
        ["replicas", "rolling-restart"] => {
            let names: Vec<String> = topology.replicas.iter().map(|r| r.name.clone()).collect();
            for name in names {
                restart_replica(&mut topology, &name).await?;
                // As an orchestrator does between pods: let the restarted one take traffic.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(())
        }
        ["replicas", name, action] => {
            if *action == "restart" {
                return restart_replica(&mut topology, name).await;
            }
            let replica = topology
                .replica(name)
                .ok_or_else(|| format!("no replica {name}"))?;
            match *action {
                "kill" => {
                    replica.kill9().await;
                    Ok(())
                }
                "start" => {
                    replica.restart().await.map_err(|e| e.to_string())?;
                    wait_ready(&replica.base_url()).await
                }
                "freeze" => {
                    replica.freeze();
                    Ok(())
                }
                "thaw" => {
                    replica.thaw();
                    Ok(())
                }
                _ => Err(format!("unknown replica action {action}")),
            }
        }
        ["redis", "primary-kill"] => {
            // What asynchronous replication can lose (the last instant's writes) is not what a
            // drill of this is about: the replica is in sync when the primary goes.
            topology
                .wait_redis_replicated()
                .await
                .map_err(|e| e.to_string())?;
            let took = topology
                .kill_redis_primary_and_wait_failover()
                .await
                .map_err(|e| {
                    format!("{e} (needs shoal-cluster --redis-sentinel or --redis-cluster)")
                })?;
            tracing::info!(?took, "the replica took over");
            Ok(())
        }
        ["redis", action] => {
            let redis = topology.redis.as_mut().ok_or("no Redis in this topology")?;
            match *action {
                "restart" => redis.restart_gracefully().await.map_err(|e| e.to_string()),
                "kill" => {
                    redis.kill().await;
                    Ok(())
                }
                "start" => redis.restart().await.map_err(|e| e.to_string()),
                "freeze" => {
                    redis.freeze();
                    Ok(())
                }
                "thaw" => {
                    redis.thaw();
                    Ok(())
                }
                _ => Err(format!("unknown Redis action {action}")),
            }
        }
        ["redis", action, name, rest @ ..] => {
            let index = topology
                .replicas
                .iter()
                .position(|r| r.name == *name)
                .ok_or_else(|| format!("no replica {name}"))?;
            let proxy = topology.redis_proxies.get(&index).ok_or_else(|| {
                format!("{name} does not reach Redis through a fault proxy (shoal-cluster --redis-proxies)")
            })?;
            match (*action, rest) {
                ("partition", []) => {
                    proxy.set(Fault::Blackhole);
                    Ok(())
                }
                ("latency", [ms]) => {
                    let ms: u64 = ms.parse().map_err(|_| format!("bad latency {ms}"))?;
                    proxy.set(Fault::Latency(Duration::from_millis(ms)));
                    Ok(())
                }
                ("heal", []) => {
                    proxy.set(Fault::Pass);
                    Ok(())
                }
                _ => Err(format!("unknown Redis link action {action}")),
            }
        }
        ["postgres", action] => {
            let postgres = topology
                .postgres
                .as_mut()
                .ok_or("no PostgreSQL in this topology")?;
            match *action {
                "stop" => {
                    postgres.stop().await;
                    Ok(())
                }
                "start" => postgres.start_again().await.map_err(|e| e.to_string()),
                _ => Err(format!("unknown PostgreSQL action {action}")),
            }
        }
        _ => Err(format!("unknown route {path}")),
    }
}

/// SIGTERM, the graceful exit, a start on the same port, and readiness.
async fn restart_replica(topology: &mut Topology, name: &str) -> Result<(), String> {
    let replica = topology
        .replica(name)
        .ok_or_else(|| format!("no replica {name}"))?;
    replica.send_sigterm();
    if replica.wait(GRACE).await.is_none() {
        return Err(format!("{name} did not exit within {GRACE:?} of SIGTERM"));
    }
    replica.restart().await.map_err(|e| e.to_string())?;
    wait_ready(&replica.base_url()).await
}

/// Waits until `/readyz` answers 200 (Redis reachable, the bus subscribed).
async fn wait_ready(base_url: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| e.to_string())?;
    loop {
        if client
            .get(format!("{base_url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{base_url} not ready after 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
