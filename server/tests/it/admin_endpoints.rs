//! The security review's findings on what is reachable (issue 10, findings 11 and 14): the
//! balancer exposes /mcp alone, /metrics answers only allowed Host names or moves to an admin
//! listener, /readyz says ready or not and nothing more, and an empty Host allow-list does not
//! silently turn the DNS-rebinding check off.

use std::{process::Stdio, time::Duration};

use shoal_testkit::topology::free_port;

use crate::helpers::*;

async fn get(url: &str, host: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(host) = host {
        request = request.header("host", host);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test]
async fn the_balancer_exposes_only_mcp_and_metrics_answer_only_allowed_hosts() {
    let topology = cluster(2).await;
    let balancer = topology.balancer.as_ref().expect("balancer").base_url();
    for path in ["/metrics", "/readyz", "/healthz", "/", "/mcp/../metrics"] {
        let (status, _) = get(&format!("{balancer}{path}"), None).await;
        assert_eq!(status, 404, "{path} through the balancer");
    }
    // /mcp itself works through it.
    let client = legacy_client(&topology.mcp_url()).await;
    call_ok(&client, "echo", serde_json::json!({"text": "hi"})).await;

    let replica = topology.replicas[0].base_url();
    let port = topology.replicas[0].port();
    let (status, body) = get(&format!("{replica}/metrics"), None).await;
    assert_eq!(status, 200);
    assert!(body.contains("shoal_"), "{body}");
    for host in [format!("evil.example:{port}"), "evil.example".to_owned()] {
        let (status, _) = get(&format!("{replica}/metrics"), Some(&host)).await;
        assert_eq!(status, 403, "Host {host}");
    }
    let (status, body) = get(&format!("{replica}/readyz"), None).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
}

#[tokio::test]
async fn metrics_move_to_the_admin_listener() {
    let admin = free_port();
    let options = cluster_options(1).env("SHOAL_ADMIN_LISTEN", format!("127.0.0.1:{admin}"));
    let topology = start(options).await;
    let replica = topology.replicas[0].base_url();
    let (status, _) = get(&format!("{replica}/metrics"), None).await;
    assert_eq!(status, 404, "no metrics on the serving port");
    let (status, _) = get(&format!("{replica}/readyz"), None).await;
    assert_eq!(status, 200, "probes stay on the serving port");
    let admin_url = format!("http://127.0.0.1:{admin}");
    // The admin listener is private: no Host check, no MCP.
    let (status, body) = get(
        &format!("{admin_url}/metrics"),
        Some("prometheus.internal:9464"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("shoal_"), "{body}");
    let (status, _) = get(&format!("{admin_url}/mcp"), None).await;
    assert_eq!(status, 404);
    let (status, body) = get(&format!("{admin_url}/readyz"), None).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
}

/// A replica is ready only once a probe it published on the cluster bus has come back: before
/// that, what other replicas publish to it (a GET stream's end, its events) may not reach it. Here
/// its Redis user may not use the channels of the key prefix it was given: Redis refuses the
/// subscription (fred reports it done all the same) and the probe, though it answers PING. Before,
/// such a replica reported ready for the first 15 s.
#[tokio::test]
async fn a_replica_whose_bus_does_not_deliver_is_not_ready() {
    let admin = free_port();
    let options = cluster_options(1)
        .env("SHOAL_KEY_PREFIX", "not-granted")
        .env("SHOAL_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .without_waiting_for_readiness();
    let _topology = start(options).await;
    let admin_url = format!("http://127.0.0.1:{admin}");
    // It probes every second until a probe comes back: none does (each is refused).
    eventually("two probes refused", WAIT, async || {
        let refused = metric(
            &admin_url,
            "shoal_backend_errors_total{operation=\"publish_probe\"}",
        )
        .await;
        (refused >= 2.0).then_some(())
    })
    .await;
    for _ in 0..3 {
        let (status, body) = get(&format!("{admin_url}/readyz"), None).await;
        assert_eq!(
            (status, body.as_str()),
            (503, "not ready: cluster bus not confirmed yet\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Finding 14: an empty SHOAL_ALLOWED_HOSTS is refused at start instead of accepting any Host.
#[tokio::test]
async fn an_empty_host_allow_list_is_refused_at_start() {
    for value in ["", " , "] {
        let output = tokio::time::timeout(
            WAIT,
            tokio::process::Command::new(server_bin())
                .env("SHOAL_LISTEN", format!("127.0.0.1:{}", free_port()))
                .env("SHOAL_ALLOWED_HOSTS", value)
                .env("SHOAL_TOOLSETS", "kv")
                .env_remove("SHOAL_REDIS_URL")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("exits by itself")
        .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{value:?}: {stderr}");
        assert!(stderr.contains("DNS-rebinding"), "{value:?}: {stderr}");
    }
    // `*` is the explicit way, with a warning.
    let port = free_port();
    let mut child = tokio::process::Command::new(server_bin())
        .env("SHOAL_LISTEN", format!("127.0.0.1:{port}"))
        .env("SHOAL_ALLOWED_HOSTS", "*")
        .env("SHOAL_TOOLSETS", "kv")
        .env("SHOAL_LOG_FORMAT", "text")
        .env_remove("SHOAL_REDIS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("runs");
    let base = format!("http://127.0.0.1:{port}");
    eventually("the replica to listen", WAIT, async || {
        reqwest::get(format!("{base}/healthz"))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let (status, _) = get(&format!("{base}/metrics"), Some("anything.example")).await;
    assert_eq!(status, 200, "any Host, as asked");
    child.start_kill().expect("kill");
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("ends")
        .expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SHOAL_ALLOWED_HOSTS=*"), "warns: {stderr}");
}
