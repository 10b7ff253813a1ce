//! A real Redis Cluster on free loopback ports: three primaries and three replicas by default,
//! created with `redis-cli --cluster create` from the Debian `redis-server` binary. Nodes are
//! declared failed after 1 s (`cluster-node-timeout`), so a killed primary's replica takes over
//! within a few seconds; `cluster-require-full-coverage no` keeps the other shards serving
//! meanwhile.

use std::{path::Path, time::Duration};

use crate::{
    sentinel::redis_cli,
    topology::{
        READY_TIMEOUT, REDIS_TEST_PASSWORD, REDIS_USER, RedisServer, TopologyError, TopologyResult,
    },
};

/// A running Redis Cluster; every node stops when it is dropped.
#[derive(Debug)]
pub struct RedisCluster {
    /// Every node, primaries first as created (roles change with failovers).
    pub nodes: Vec<RedisServer>,
    /// The port of the primary serving the slot of the key prefix (where the replicas' bus
    /// subscription lives), as of the start.
    pub prefix_primary: u16,
}

impl RedisCluster {
    /// Starts `primaries` primaries (at least 3, what `redis-cli --cluster create` accepts) with
    /// one replica each, their files under `dir`, the replicas' ACL user limited to `prefix` on
    /// every node (ACLs are per node), and waits until every node sees the cluster whole.
    ///
    /// # Errors
    /// When a node cannot start or the cluster does not form.
    pub async fn start(dir: &Path, prefix: &str, primaries: usize) -> TopologyResult<Self> {
        let dir = dir.join("redis-cluster");
        let mut nodes = Vec::with_capacity(primaries * 2);
        for n in 1..=primaries * 2 {
            // The cluster bus port would be the client port + 10000: reserved by nothing, and past
            // 65535 for a client port above 55535.
            let [port, bus_port] = crate::topology::free_ports::<2>();
            let bus_port = bus_port.to_string();
            let extra = [
                "--cluster-port",
                bus_port.as_str(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                "--cluster-require-full-coverage",
                "no",
            ];
            nodes.push(
                RedisServer::start_on(
                    port,
                    dir.join(format!("node-{n}")),
                    prefix,
                    false,
                    extra.iter().map(|s| (*s).to_owned()).collect(),
                )
                .await?,
            );
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addresses.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        let created = redis_cli(nodes[0].port(), &create).await?;
        if !created.contains("All 16384 slots covered") {
            return Err(TopologyError::Broken(format!(
                "redis-cli --cluster create: {created}"
            )));
        }
        let mut cluster = Self {
            nodes,
            prefix_primary: 0,
        };
        cluster.wait_whole().await?;
        let slot = redis_cli(cluster.nodes[0].port(), &["CLUSTER", "KEYSLOT", prefix])
            .await?
            .parse::<u16>()
            .map_err(|e| TopologyError::Broken(format!("CLUSTER KEYSLOT: {e}")))?;
        cluster.prefix_primary = cluster.primary_of(slot).await?.port();
        Ok(cluster)
    }

    /// Waits until every node reports the cluster `ok` with every slot served, and every replica
    /// replicates with its link up.
    async fn wait_whole(&self) -> TopologyResult<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let mut whole = true;
            for node in &self.nodes {
                let info = redis_cli(node.port(), &["CLUSTER", "INFO"]).await?;
                whole &=
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384");
                let replication = redis_cli(node.port(), &["INFO", "replication"]).await?;
                whole &= replication.contains("role:master")
                    || replication.contains("master_link_status:up");
            }
            if whole {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TopologyError::Broken(
                    "the Redis Cluster did not become whole".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The URL replicas connect with: every node as a seed, and the restricted ACL user.
    pub fn url(&self) -> String {
        let mut ports = self.nodes.iter().map(RedisServer::port);
        let first = ports.next().unwrap_or_default();
        let seeds: Vec<String> = ports.map(|port| format!("node=127.0.0.1:{port}")).collect();
        format!(
            "redis-cluster://{REDIS_USER}:{REDIS_TEST_PASSWORD}@127.0.0.1:{first}?{}",
            seeds.join("&")
        )
    }

    /// Waits until the replica of the prefix's primary has everything the primary wrote so far
    /// (the primary's `INFO replication` shows its replica at its own offset).
    ///
    /// # Errors
    /// When it does not catch up in time.
    pub async fn wait_replicated(&self) -> TopologyResult<()> {
        crate::sentinel::wait_replica_caught_up(self.prefix_primary).await
    }

    /// Kills (SIGKILL) the primary serving the key prefix's slot and waits until its replica has
    /// taken over: it answers as the slot's primary and the cluster is `ok` again. Returns how
    /// long that took.
    ///
    /// # Errors
    /// When no failover completes in time.
    pub async fn kill_prefix_primary_and_wait_failover(
        &mut self,
        prefix: &str,
    ) -> TopologyResult<Duration> {
        let killed_at = tokio::time::Instant::now();
        let old = self.prefix_primary;
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port() == old) {
            node.kill().await;
        }
        let survivor = self
            .nodes
            .iter()
            .map(RedisServer::port)
            .find(|port| *port != old)
            .unwrap_or_default();
        let slot = redis_cli(survivor, &["CLUSTER", "KEYSLOT", prefix])
            .await?
            .parse::<u16>()
            .map_err(|e| TopologyError::Broken(format!("CLUSTER KEYSLOT: {e}")))?;
        let deadline = killed_at + READY_TIMEOUT;
        loop {
            if let Ok(node) = self.primary_of_among_live(slot, old).await {
                let info = redis_cli(node, &["CLUSTER", "INFO"]).await?;
                if info.contains("cluster_state:ok") {
                    self.prefix_primary = node;
                    return Ok(killed_at.elapsed());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TopologyError::Broken(format!(
                    "no replica took over slot {slot} from 127.0.0.1:{old}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A planned failover of the primary serving the prefix's slot: its replica takes the slot
    /// over with `CLUSTER FAILOVER` (the old primary becomes its replica, and nobody's connection
    /// breaks). Returns once the replica is the slot's primary and the cluster is `ok`.
    ///
    /// # Errors
    /// When the primary has no replica or the failover does not complete in time.
    pub async fn planned_failover_of_prefix_primary(&mut self, prefix: &str) -> TopologyResult<()> {
        let old = self.prefix_primary;
        let old_id = redis_cli(old, &["CLUSTER", "MYID"]).await?;
        let nodes = redis_cli(old, &["CLUSTER", "NODES"]).await?;
        let replica = nodes
            .lines()
            .find(|line| line.contains("slave") && line.contains(old_id.as_str()))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|address| address.split('@').next())
            .and_then(|address| address.rsplit(':').next())
            .and_then(|port| port.parse::<u16>().ok())
            .ok_or_else(|| TopologyError::Broken(format!("no replica of 127.0.0.1:{old}")))?;
        let answer = redis_cli(replica, &["CLUSTER", "FAILOVER"]).await?;
        if answer != "OK" {
            return Err(TopologyError::Broken(format!("CLUSTER FAILOVER: {answer}")));
        }
        let slot = redis_cli(replica, &["CLUSTER", "KEYSLOT", prefix])
            .await?
            .parse::<u16>()
            .map_err(|e| TopologyError::Broken(format!("CLUSTER KEYSLOT: {e}")))?;
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if self.primary_of_among_live(slot, old).await.ok() == Some(replica) {
                let info = redis_cli(replica, &["CLUSTER", "INFO"]).await?;
                if info.contains("cluster_state:ok") {
                    self.prefix_primary = replica;
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TopologyError::Broken(format!(
                    "127.0.0.1:{replica} did not take slot {slot} over"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The port of the live node (not `dead`) that says it is the primary of `slot`.
    async fn primary_of_among_live(&self, slot: u16, dead: u16) -> TopologyResult<u16> {
        for node in self.nodes.iter().filter(|n| n.port() != dead) {
            let nodes = redis_cli(node.port(), &["CLUSTER", "NODES"]).await?;
            let mine = nodes
                .lines()
                .find(|line| line.contains("myself"))
                .unwrap_or_default();
            if mine.contains("master") && serves(mine, slot) {
                return Ok(node.port());
            }
        }
        Err(TopologyError::Broken(format!(
            "no live primary of slot {slot}"
        )))
    }

    /// The ports of the nodes that are primaries now.
    ///
    /// # Errors
    /// When a node does not answer.
    pub async fn primary_ports(&self) -> TopologyResult<Vec<u16>> {
        let mut ports = Vec::new();
        for node in &self.nodes {
            if let Ok(replication) = redis_cli(node.port(), &["INFO", "replication"]).await
                && replication.contains("role:master")
            {
                ports.push(node.port());
            }
        }
        Ok(ports)
    }

    /// The node that serves `slot` as primary now.
    ///
    /// # Errors
    /// When no node claims it.
    pub async fn primary_of(&self, slot: u16) -> TopologyResult<&RedisServer> {
        for node in &self.nodes {
            let myself = redis_cli(node.port(), &["CLUSTER", "MYID"]).await?;
            let shards = redis_cli(node.port(), &["CLUSTER", "NODES"]).await?;
            let mine = shards
                .lines()
                .find(|line| line.starts_with(myself.as_str()))
                .unwrap_or_default();
            if mine.contains("master") && serves(mine, slot) {
                return Ok(node);
            }
        }
        Err(TopologyError::Broken(format!(
            "no primary serves slot {slot}"
        )))
    }
}

/// Whether a `CLUSTER NODES` line lists `slot` among its ranges (`0-5460`, `5461`…).
fn serves(line: &str, slot: u16) -> bool {
    line.split_whitespace().skip(8).any(|range| {
        let mut bounds = range.split('-').map(|b| b.parse::<u16>().ok());
        match (bounds.next().flatten(), bounds.next().flatten()) {
            (Some(low), Some(high)) => (low..=high).contains(&slot),
            (Some(only), None) => only == slot,
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_ranges_are_read_from_cluster_nodes_lines() {
        let line = "07c3 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460 9000";
        assert!(serves(line, 0) && serves(line, 5460) && serves(line, 9000));
        assert!(!serves(line, 5461) && !serves(line, 8999));
    }

    #[tokio::test]
    async fn a_six_node_cluster_forms_and_names_the_primary_of_each_slot() {
        let dir = tempfile::tempdir().expect("dir");
        let cluster = RedisCluster::start(dir.path(), "t", 3)
            .await
            .expect("the cluster forms");
        assert_eq!(cluster.nodes.len(), 6);
        let mut primaries = std::collections::HashSet::new();
        for slot in [0, 8000, 16383] {
            primaries.insert(cluster.primary_of(slot).await.expect("a primary").port());
        }
        assert_eq!(primaries.len(), 3, "three slots far apart, three shards");
        assert!(cluster.url().starts_with("redis-cluster://shoal:"));
    }
}
