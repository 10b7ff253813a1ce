//! A write a replica reported as failed never lands afterwards (CI, chaos run: a `kv_set` that
//! timed out while its replica was cut off from Redis ran when the link healed, 10 s later, and
//! undid nine writes the client had made since through other replicas). The bytes TCP held are
//! delivered when a link heals, and a frozen Redis runs what queued up when it thaws: the write
//! carries a deadline that Redis checks itself.

use std::time::Duration;

use fred::{
    interfaces::ClientLike,
    prelude::{Builder, Config},
    types::InfoKind,
};
use secrecy::SecretString;
use shoal_shared::{
    backend::{Backend, ResourceChange},
    bus::Bus,
    ids::ReplicaTag,
    keys::Keys,
    metrics::Metrics,
};
use shoal_testkit::{
    fault::{Fault, FaultProxy},
    topology::RedisServer,
};

const PREFIX: &str = "stale";
/// What the writes change (nobody follows it here).
const CHANGE: ResourceChange<'static> = ResourceChange {
    uri: "kv://k",
    legacy_payload: "{}",
};

async fn backend(url: String, timeout: Duration) -> Backend {
    let keys = Keys::new(PREFIX);
    let metrics = Metrics::new();
    let (bus, _control) = Bus::new(keys, ReplicaTag::generate(), metrics.clone());
    let config = crate::helpers::backend_config(timeout);
    Backend::connect(
        Some(&SecretString::from(url)),
        config,
        bus,
        metrics,
        Default::default(),
    )
    .await
    .expect("backend")
}

/// How many scripts Redis has run (`EVALSHA` calls, refused ones included).
async fn scripts_run(admin: &fred::clients::Client) -> u64 {
    let info: String = admin
        .info(Some(InfoKind::CommandStats))
        .await
        .expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().expect("a count"))
}

/// Heals the link and waits until Redis has run the script the cut held back.
async fn heal_and_wait_for_the_held_script(proxy: &FaultProxy, admin: &fred::clients::Client) {
    let before = scripts_run(admin).await;
    proxy.set(Fault::Pass);
    tokio::time::timeout(Duration::from_secs(10), async {
        while scripts_run(admin).await == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the held script reaches Redis within 10 s of the heal");
    assert_eq!(
        scripts_run(admin).await,
        before + 1,
        "only the held script ran"
    );
}

#[tokio::test]
async fn a_write_reported_as_failed_never_lands_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path(), PREFIX).await.expect("redis");
    let redis_addr = format!("127.0.0.1:{}", redis.port()).parse().expect("addr");
    let proxy = FaultProxy::start(redis_addr).await.expect("proxy");
    let cut_off = backend(
        redis.url_via(proxy.addr().port()),
        Duration::from_millis(300),
    )
    .await;
    let other = backend(redis.url(), Duration::from_secs(5)).await;
    let admin = Builder::from_config(Config::from_url(&redis.admin_url()).expect("url"))
        .build()
        .expect("client");
    admin.init().await.expect("connect");

    cut_off
        .kv_set("k", "first", CHANGE)
        .await
        .expect("set through the link");

    // A set the cut holds back fails (timeout); a later one through another replica lands.
    proxy.set(Fault::Blackhole);
    cut_off
        .kv_set("k", "stale", CHANGE)
        .await
        .expect_err("no answer through a cut link");
    other
        .kv_set("k", "later", CHANGE)
        .await
        .expect("set elsewhere");
    heal_and_wait_for_the_held_script(&proxy, &admin).await;
    assert_eq!(
        other.kv_get("k").await.expect("get").as_deref(),
        Some("later"),
        "the failed write ran when the link healed and undid the later one"
    );

    // Likewise a delete.
    proxy.set(Fault::Blackhole);
    cut_off
        .kv_delete("k", CHANGE)
        .await
        .expect_err("no answer through a cut link");
    other
        .kv_set("k", "latest", CHANGE)
        .await
        .expect("set elsewhere");
    heal_and_wait_for_the_held_script(&proxy, &admin).await;
    assert_eq!(
        other.kv_get("k").await.expect("get").as_deref(),
        Some("latest"),
        "the failed delete ran when the link healed"
    );

    // The link works again: writes through it land.
    tokio::time::timeout(Duration::from_secs(10), async {
        while cut_off.kv_set("k", "after", CHANGE).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("writes land through the healed link");
    assert_eq!(
        other.kv_get("k").await.expect("get").as_deref(),
        Some("after")
    );

    // A frozen Redis runs what queued up when it thaws: not a write already reported as failed.
    let before = scripts_run(&admin).await;
    redis.freeze();
    let failed = cut_off.kv_set("k", "frozen", CHANGE).await;
    redis.thaw();
    failed.expect_err("no answer from a frozen Redis");
    tokio::time::timeout(Duration::from_secs(10), async {
        while scripts_run(&admin).await == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the queued script runs within 10 s of the thaw");
    assert_eq!(
        other.kv_get("k").await.expect("get").as_deref(),
        Some("after"),
        "the write that failed while Redis was frozen ran when it thawed"
    );
}
