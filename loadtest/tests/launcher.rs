//! `shoal-cluster`, the local topology launcher behind `scripts/cluster.sh`: it announces a cluster
//! only when its balancer is the one answering, and otherwise exits non-zero with the reason.

use std::{net::TcpListener, path::PathBuf, process::Stdio, time::Duration};

fn bin(name: &str) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_shoal-cluster")).with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first",
        bin.display()
    );
    bin
}

#[tokio::test]
async fn a_taken_balancer_port_is_a_clear_failure_not_an_announced_cluster() {
    // Something else (here: this test) listens on the port the balancer is asked for.
    let taken = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let port = taken.local_addr().expect("its address").port();
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin("shoal-cluster"))
            .args(["--replicas", "1", "--port", &port.to_string()])
            .arg("--server-bin")
            .arg(bin("shoal-server"))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("shoal-cluster exits by itself when it cannot start")
    .expect("shoal-cluster runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "exit status {:?}; stdout: {stdout}",
        output.status
    );
    assert!(
        !stdout.contains("cluster is up"),
        "announced a cluster it does not have: {stdout}"
    );
    assert!(
        stderr.contains(&format!("127.0.0.1:{port} is already in use")),
        "the error names the port and the reason: {stderr}"
    );
    drop(taken);
}
