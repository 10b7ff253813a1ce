//! The backend's contract: every operation behaves the same on Redis and in memory. Each test body
//! runs on both implementations ([`on_both`]): in memory, against a real Redis, and against a real
//! 6-node Redis Cluster, where every script must touch the keys of one slot only (Redis refuses
//! one that does not) and the keys spread over the shards.

use std::{collections::BTreeMap, future::Future, time::Duration};

use secrecy::SecretString;
use shoal_shared::{
    backend::{
        Backend, BackendConfig, CacheEntry, FeedClaim, FeedHold, FeedStart, KvSetOutcome,
        QuotaCheck, QuotaKind, ResourceChange, SubscribeOutcome,
    },
    bus::{self, Bus, ControlMessage, ListKind, ListenEvent},
    ids::{EventId, ReplicaTag},
    keys::Keys,
    metrics::Metrics,
};
use shoal_testkit::{redis_cluster::RedisCluster, topology::RedisServer};
use tokio::sync::mpsc;

const PREFIX: &str = "contract";
/// Keys the caller names in full (a replica builds them with `Keys`): inside the prefix, which is
/// all the replicas' Redis user may touch.
const LEASE: &str = "contract:lease";
const MAP: &str = "contract:map";

fn config() -> BackendConfig {
    BackendConfig {
        session_ttl: Duration::from_secs(60),
        event_log_max_len: 3,
        event_retention: Duration::from_secs(600),
        max_subscriptions_per_session: 2,
        max_subscribers_per_uri: 100,
        kv_max_keys: 2,
        redis_timeout: Duration::from_secs(5),
        redis_pool_size: 2,
    }
}

/// One implementation under test, with its bus and the bus's control channel.
struct Subject {
    /// The Redis URL (`None`: in memory).
    url: Option<String>,
    backend: Backend,
    bus: Bus,
    control: mpsc::Receiver<ControlMessage>,
}

async fn subject(redis_url: Option<String>) -> Subject {
    let metrics = Metrics::new();
    let (bus, control) = Bus::new(Keys::new(PREFIX), ReplicaTag::generate(), metrics.clone());
    let url = redis_url.clone();
    let backend = Backend::connect(
        redis_url.map(SecretString::from).as_ref(),
        config(),
        bus.clone(),
        metrics,
        Default::default(),
    )
    .await
    .expect("backend");
    Subject {
        url,
        backend,
        bus,
        control,
    }
}

/// Runs `body` on the in-memory backend, then on a fresh Redis, then on a fresh Redis Cluster.
async fn on_both<F, Fut>(body: F)
where
    F: Fn(Subject) -> Fut,
    Fut: Future<Output = ()>,
{
    body(subject(None).await).await;
    on_redis(body).await;
}

/// Runs `body` on a fresh Redis, then on a fresh Redis Cluster (3 primaries, 3 replicas).
async fn on_redis<F, Fut>(body: F)
where
    F: Fn(Subject) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path(), PREFIX).await.expect("redis");
    let one = subject(Some(redis.url())).await;
    assert_eq!(one.backend.kind(), "redis");
    body(one).await;
    drop(redis);
    let cluster = RedisCluster::start(dir.path(), PREFIX, 3)
        .await
        .expect("redis cluster");
    let sharded = subject(Some(cluster.url())).await;
    body(sharded).await;
}

/// Waits until this replica's bus hears its own probe back: its subscription is in place.
async fn bus_ready(subject: &Subject) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let sent = std::time::Instant::now();
            subject
                .backend
                .publish_probe(&subject.bus.probe())
                .await
                .expect("probe");
            tokio::time::sleep(Duration::from_millis(20)).await;
            // A probe came back after this one was sent.
            if subject.bus.since_last_roundtrip() < sent.elapsed() {
                return;
            }
        }
    })
    .await
    .expect("the bus hears its probe within 10 s");
}

#[tokio::test]
async fn sessions_are_created_read_changed_and_deleted() {
    on_both(|mut s| async move {
        let b = &s.backend;
        b.session_create("s1", "{\"init\":1}", "alice")
            .await
            .expect("create");
        assert_eq!(
            b.session_owner("s1").await.expect("owner").as_deref(),
            Some("alice")
        );
        assert!(b.session_touch("s1").await.expect("touch"));
        assert!(!b.session_touch("nope").await.expect("touch"));
        assert_eq!(
            b.session_load("s1").await.expect("load").as_deref(),
            Some("{\"init\":1}")
        );
        assert!(
            b.session_set_field("s1", "level", "debug")
                .await
                .expect("set")
        );
        assert!(
            !b.session_set_field("nope", "level", "debug")
                .await
                .expect("set")
        );
        assert_eq!(
            b.session_get_field("s1", "level")
                .await
                .expect("get")
                .as_deref(),
            Some("debug")
        );
        bus_ready(&s).await;
        assert!(s.backend.session_delete("s1").await.expect("delete"));
        assert!(!s.backend.session_delete("s1").await.expect("delete"));
        assert_eq!(s.backend.session_load("s1").await.expect("load"), None);
        let told = tokio::time::timeout(Duration::from_secs(10), s.control.recv())
            .await
            .expect("a deletion within 10 s");
        assert_eq!(
            told,
            Some(ControlMessage::SessionDeleted {
                session: "s1".into()
            })
        );
    })
    .await;
}

#[tokio::test]
async fn events_reach_the_feed_holder_and_are_bounded() {
    on_both(|s| async move {
        let b = &s.backend;
        b.session_create("s1", "{}", "p").await.expect("create");
        bus_ready(&s).await;
        let mut feed = s.bus.register_feed("s1").expect("feed");
        let holder = bus::feed_holder(s.bus.tag(), feed.stream());
        let claim = FeedClaim {
            session: "s1",
            holder: &holder,
        };
        let start = b
            .feed_open(claim, None, 10)
            .await
            .expect("open")
            .expect("live");
        assert_eq!(
            start,
            FeedStart {
                from: EventId::ZERO,
                events: Vec::new()
            }
        );
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(
                b.event_append("s1", &format!("{{\"n\":{n}}}"))
                    .await
                    .expect("append")
                    .expect("live"),
            );
        }
        for id in &ids {
            let event = tokio::time::timeout(Duration::from_secs(10), feed.events.recv())
                .await
                .expect("an event within 10 s")
                .expect("event");
            assert_eq!(event.id, *id);
        }
        // The last three at least are kept, and nothing but the newest events: Redis trims in whole
        // blocks (`MAXLEN ~`), memory exactly.
        let kept = b.events_after("s1", EventId::ZERO, 10).await.expect("read");
        let kept_ids = kept.iter().map(|e| e.id).collect::<Vec<_>>();
        assert!(
            kept_ids.len() >= 3 && ids.ends_with(&kept_ids),
            "kept {kept_ids:?} of {ids:?}"
        );
        let kept = &kept[kept.len() - 3..];
        assert_eq!(&*kept[0].payload, "{\"n\":2}");
        let resumed = b
            .feed_open(claim, Some(ids[3]), 10)
            .await
            .expect("open")
            .expect("live");
        assert_eq!(
            resumed.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![ids[4]]
        );
        // A checkpoint records where the stream stopped; a fresh stream starts there.
        // Another stream's claim is not recorded over this one's, and tells it that it was replaced.
        let other = FeedClaim {
            session: "s1",
            holder: "another-replica:7",
        };
        assert_eq!(
            b.feed_checkpoint(other, ids[0], false)
                .await
                .expect("checkpoint"),
            FeedHold::Superseded
        );
        assert_eq!(
            b.feed_checkpoint(claim, ids[3], true)
                .await
                .expect("checkpoint"),
            FeedHold::Held
        );
        let fresh = b
            .feed_open(claim, None, 10)
            .await
            .expect("open")
            .expect("live");
        assert_eq!(fresh.from, ids[3]);
        assert_eq!(
            fresh.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![ids[4]]
        );
        assert!(
            b.event_append("gone", "{}")
                .await
                .expect("append")
                .is_none()
        );
        assert!(
            b.feed_open(
                FeedClaim {
                    session: "gone",
                    holder: &holder
                },
                None,
                10
            )
            .await
            .expect("open")
            .is_none()
        );
        assert_eq!(
            b.feed_checkpoint(
                FeedClaim {
                    session: "gone",
                    holder: &holder
                },
                EventId::ZERO,
                false
            )
            .await
            .expect("checkpoint"),
            FeedHold::Gone
        );
    })
    .await;
}

#[tokio::test]
async fn subscriptions_fan_out_and_are_bounded() {
    on_both(|s| async move {
        let b = &s.backend;
        b.session_create("a", "{}", "p").await.expect("create");
        b.session_create("b", "{}", "p").await.expect("create");
        bus_ready(&s).await;
        let mut listener = s
            .bus
            .register_listener(["kv://x".to_owned()], [])
            .expect("listener");
        for (session, uri, outcome) in [
            ("a", "kv://x", SubscribeOutcome::Subscribed),
            ("b", "kv://x", SubscribeOutcome::Subscribed),
            ("a", "kv://y", SubscribeOutcome::Subscribed),
            ("a", "kv://z", SubscribeOutcome::TooMany),
            ("nope", "kv://x", SubscribeOutcome::SessionGone),
        ] {
            assert_eq!(
                b.subscribe(session, uri).await.expect("sub"),
                outcome,
                "{session} {uri}"
            );
        }
        assert_eq!(b.resource_updated("kv://x", "{}").await.expect("update"), 2);
        let heard = tokio::time::timeout(Duration::from_secs(10), listener.events.recv())
            .await
            .expect("a listen event within 10 s")
            .expect("event");
        assert!(
            matches!(&heard, ListenEvent::ResourceUpdated { uri, .. } if uri == "kv://x"),
            "{heard:?}"
        );
        assert_eq!(
            b.events_after("b", EventId::ZERO, 10)
                .await
                .expect("read")
                .len(),
            1,
            "the update is in the subscriber's log"
        );
        b.unsubscribe("b", "kv://x").await.expect("unsub");
        assert_eq!(b.resource_updated("kv://x", "{}").await.expect("update"), 1);
        assert!(b.session_delete("a").await.expect("delete"));
        assert_eq!(b.resource_updated("kv://x", "{}").await.expect("update"), 0);
    })
    .await;
}

#[tokio::test]
async fn bus_messages_reach_the_replica_they_are_for() {
    on_both(|mut s| async move {
        bus_ready(&s).await;
        let b = &s.backend;
        let mut listener = s
            .bus
            .register_listener([], [ListKind::Tools])
            .expect("listener");
        b.list_changed(ListKind::Tools).await.expect("list changed");
        let heard = tokio::time::timeout(Duration::from_secs(10), listener.events.recv())
            .await
            .expect("a list change within 10 s");
        assert_eq!(heard, Some(ListenEvent::ListChanged(ListKind::Tools)));

        // A replica is not told of its own cancellation (it cancels locally): the next control
        // message is the forward sent after it.
        b.publish_cancel("s1", "{\"c\":1}").await.expect("cancel");
        assert!(
            b.publish_forward(s.bus.tag(), "s1", "{\"id\":1}")
                .await
                .expect("forward"),
            "a replica listens on its own channel"
        );
        let forwarded = tokio::time::timeout(Duration::from_secs(10), s.control.recv())
            .await
            .expect("a forward within 10 s");
        assert!(
            matches!(&forwarded, Some(ControlMessage::Forward { session, payload, .. }) if session == "s1" && payload == "{\"id\":1}"),
            "{forwarded:?}"
        );
    })
    .await;
}

/// The change a write to `key` makes (the payload names the key, to tell the writes apart).
fn change(key: &str) -> (String, String) {
    (format!("kv://{key}"), format!("{{\"updated\":\"{key}\"}}"))
}

async fn set(b: &Backend, key: &str, value: &str) -> KvSetOutcome {
    let (uri, payload) = change(key);
    let change = ResourceChange {
        uri: &uri,
        legacy_payload: &payload,
    };
    b.kv_set(key, value, change).await.expect("set")
}

async fn delete(b: &Backend, key: &str) -> bool {
    let (uri, payload) = change(key);
    let change = ResourceChange {
        uri: &uri,
        legacy_payload: &payload,
    };
    b.kv_delete(key, change).await.expect("delete")
}

#[tokio::test]
async fn kv_is_bounded_and_listed_in_order() {
    on_both(|s| async move {
        let b = &s.backend;
        assert_eq!(set(b, "b", "1").await, KvSetOutcome::Created);
        assert_eq!(set(b, "a", "2").await, KvSetOutcome::Created);
        assert_eq!(set(b, "a", "3").await, KvSetOutcome::Updated);
        assert_eq!(set(b, "c", "4").await, KvSetOutcome::Full);
        assert_eq!(b.kv_list(None, 10).await.expect("list"), vec!["a", "b"]);
        assert_eq!(b.kv_list(None, 1).await.expect("list"), vec!["a"]);
        assert_eq!(b.kv_list(Some("a"), 10).await.expect("list"), vec!["b"]);
        assert_eq!(b.kv_get("a").await.expect("get").as_deref(), Some("3"));
        assert!(delete(b, "a").await);
        assert!(!delete(b, "a").await);
        assert_eq!(b.kv_get("a").await.expect("get"), None);
        assert_eq!(set(b, "c", "4").await, KvSetOutcome::Created);
    })
    .await;
}

#[tokio::test]
async fn kv_writes_tell_their_subscribers_in_the_same_step() {
    on_both(|s| async move {
        let b = &s.backend;
        b.session_create("reader", "{}", "p").await.expect("create");
        assert_eq!(
            b.subscribe("reader", "kv://a").await.expect("sub"),
            SubscribeOutcome::Subscribed
        );
        bus_ready(&s).await;
        let mut listener = s
            .bus
            .register_listener(["kv://a".to_owned()], [ListKind::Resources])
            .expect("listener");
        let payloads = |events: Vec<shoal_shared::backend::LoggedEvent>| -> Vec<String> {
            events.iter().map(|e| e.payload.to_string()).collect()
        };
        // A new key: its subscriber's log, the listeners of the URI and of the resource list.
        assert_eq!(set(b, "a", "1").await, KvSetOutcome::Created);
        let told = b
            .events_after("reader", EventId::ZERO, 10)
            .await
            .expect("read");
        assert_eq!(payloads(told), vec![change("a").1]);
        let mut heard = Vec::new();
        for _ in 0..2 {
            heard.push(
                tokio::time::timeout(Duration::from_secs(10), listener.events.recv())
                    .await
                    .expect("a listen event within 10 s")
                    .expect("event"),
            );
        }
        assert!(
            heard
                .iter()
                .any(|e| matches!(e, ListenEvent::ResourceUpdated { uri, .. } if uri == "kv://a"))
                && heard.contains(&ListenEvent::ListChanged(ListKind::Resources)),
            "{heard:?}"
        );
        // An update and a delete are told; a write refused (full) and a delete of nothing are not.
        assert_eq!(set(b, "a", "2").await, KvSetOutcome::Updated);
        assert_eq!(set(b, "b", "x").await, KvSetOutcome::Created);
        assert_eq!(set(b, "c", "x").await, KvSetOutcome::Full);
        assert!(delete(b, "a").await);
        assert!(!delete(b, "a").await);
        let told = b
            .events_after("reader", EventId::ZERO, 10)
            .await
            .expect("read");
        assert_eq!(
            told.len(),
            3,
            "created, updated, deleted: {:?}",
            payloads(told)
        );
    })
    .await;
}

#[tokio::test]
async fn the_cache_fills_once_and_is_invalidated_by_tag() {
    on_both(|s| async move {
        let b = &s.backend;
        let ttl = Duration::from_secs(60);
        assert_eq!(b.cache_get("e1").await.expect("get"), None);
        assert!(b.cache_lock("e1", "me", ttl).await.expect("lock"));
        assert!(!b.cache_lock("e1", "other", ttl).await.expect("lock"));
        let tags = ["t1".to_owned()];
        b.cache_release(
            "e1",
            "me",
            Some(CacheEntry {
                value: "result",
                ttl,
                tags: &tags,
            }),
        )
        .await
        .expect("release");
        assert_eq!(
            b.cache_get("e1").await.expect("get").as_deref(),
            Some("result")
        );
        assert!(
            b.cache_lock("e1", "other", ttl).await.expect("lock"),
            "the lock was released"
        );
        b.cache_release("e1", "other", None).await.expect("release");
        assert_eq!(
            b.cache_invalidate(&["t2".to_owned()])
                .await
                .expect("invalidate"),
            0
        );
        assert_eq!(b.cache_invalidate(&tags).await.expect("invalidate"), 1);
        assert_eq!(b.cache_get("e1").await.expect("get"), None);
    })
    .await;
}

#[tokio::test]
async fn replicas_agree_on_secrets_leases_and_maps() {
    on_both(|s| async move {
        let b = &s.backend;
        assert_eq!(
            b.shared_secret("k", "first").await.expect("secret"),
            "first"
        );
        assert_eq!(
            b.shared_secret("k", "second").await.expect("secret"),
            "first"
        );
        let ttl = Duration::from_secs(60);
        assert!(b.lease(LEASE, "a", ttl).await.expect("lease"));
        assert!(!b.lease(LEASE, "b", ttl).await.expect("lease"));
        assert!(
            b.lease(LEASE, "a", ttl).await.expect("lease"),
            "the holder renews"
        );
        assert!(b.map_get_all(MAP).await.expect("map").is_empty());
        let first = BTreeMap::from([
            ("x".to_owned(), "1".to_owned()),
            ("y".to_owned(), "2".to_owned()),
        ]);
        b.map_replace(MAP, &first).await.expect("replace");
        assert_eq!(b.map_get_all(MAP).await.expect("map"), first);
        let second = BTreeMap::from([("z".to_owned(), "3".to_owned())]);
        b.map_replace(MAP, &second).await.expect("replace");
        assert_eq!(b.map_get_all(MAP).await.expect("map"), second);
        b.map_replace(MAP, &BTreeMap::new()).await.expect("replace");
        assert!(b.map_get_all(MAP).await.expect("map").is_empty());
    })
    .await;
}

#[tokio::test]
async fn quotas_admit_together_or_not_at_all() {
    on_both(|s| async move {
        let b = &s.backend;
        let lease = Duration::from_secs(60);
        let rate = [QuotaCheck {
            kind: QuotaKind::Rate,
            subject: "p",
            limit: 2,
            burst: 3,
        }];
        for _ in 0..3 {
            assert_eq!(b.quota_admit(&rate, "", lease).await.expect("admit"), None);
        }
        let refused = b
            .quota_admit(&rate, "", lease)
            .await
            .expect("admit")
            .expect("over the burst");
        assert_eq!(refused.index, 0);
        let retry = refused.retry_after.expect("a rate says when");
        assert!(
            retry <= Duration::from_millis(500) && retry > Duration::ZERO,
            "{retry:?}"
        );

        // A cap refuses nothing it cannot also record.
        let calls = |subject| QuotaCheck {
            kind: QuotaKind::Calls,
            subject,
            limit: 1,
            burst: 0,
        };
        let both = [calls("p"), calls("cluster")];
        assert_eq!(
            b.quota_admit(&both, "c1", lease).await.expect("admit"),
            None
        );
        let refused = b
            .quota_admit(&[calls("q"), calls("cluster")], "c2", lease)
            .await
            .expect("admit")
            .expect("the cluster cap");
        assert_eq!((refused.index, refused.retry_after), (1, None));
        // "q" was not recorded by the refused call: it admits alone.
        assert_eq!(
            b.quota_admit(&[calls("q")], "c3", lease)
                .await
                .expect("admit"),
            None
        );
        b.quota_renew((QuotaKind::Calls, "cluster"), &["c1".to_owned()], lease)
            .await
            .expect("renew");
        b.quota_release(&[
            (QuotaKind::Calls, "p", "c1"),
            (QuotaKind::Calls, "cluster", "c1"),
        ])
        .await
        .expect("release");
        assert_eq!(
            b.quota_admit(&[calls("r"), calls("cluster")], "c4", lease)
                .await
                .expect("admit"),
            None
        );

        // Sessions: a reservation bound to a live session keeps holding the slot.
        let sessions = [QuotaCheck {
            kind: QuotaKind::Sessions,
            subject: "p",
            limit: 1,
            burst: 0,
        }];
        assert_eq!(
            b.quota_admit(&sessions, "r1", lease).await.expect("admit"),
            None
        );
        b.session_create("s1", "{}", "p").await.expect("create");
        b.quota_bind_session(&["p"], "r1", "s1")
            .await
            .expect("bind");
        let refused = b
            .quota_admit(&sessions, "r2", lease)
            .await
            .expect("admit")
            .expect("the session holds the slot");
        assert_eq!(refused.index, 0);
        assert!(
            b.janitor_pass(&ReplicaTag::generate(), Duration::from_secs(10))
                .await
                .is_ok()
        );
    })
    .await;
}

/// A change whose fanout a replica left unfinished (it died between the change's first step and
/// the appends, or Redis failed one) is finished by the janitor: each subscriber gets it once,
/// also one that had it already, and a change still young (a fanout in progress) is left alone.
#[tokio::test]
async fn the_janitor_finishes_a_fanout_a_dead_replica_left() {
    use fred::interfaces::SortedSetsInterface as _;
    use fred::interfaces::{ClientLike as _, HashesInterface as _, KeysInterface as _};
    on_redis(|s| async move {
        let b = &s.backend;
        let keys = Keys::new(PREFIX);
        let uri = "kv://left";
        for session in ["a1", "a2"] {
            b.session_create(session, "{}", "p").await.expect("create");
            assert_eq!(
                b.subscribe(session, uri).await.expect("subscribe"),
                SubscribeOutcome::Subscribed
            );
        }
        // What a replica that died after the change's first step leaves: the change pending in the
        // resource's slot; "a1" had got it already (its seen set says so), "a2" not.
        let url = s.url.clone().expect("on Redis");
        let raw = fred::prelude::Builder::from_config(
            fred::prelude::Config::from_url(&url).expect("url"),
        )
        .build()
        .expect("client");
        raw.init().await.expect("connect");
        let now: i64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        let _: i64 = raw
            .hset(
                keys.pending_changes(uri),
                [
                    ("old", format!("{}:left-behind", now - 60)),
                    ("young", format!("{now}:in-progress")),
                ],
            )
            .await
            .expect("HSET");
        let _: i64 = raw
            .zadd(keys.seen("a1"), None, None, false, false, (1.0, "old"))
            .await
            .expect("ZADD");

        b.janitor_pass(&ReplicaTag::generate(), Duration::from_secs(60))
            .await
            .expect("janitor");
        let payloads = |session: &'static str| async move {
            b.events_after(session, EventId::ZERO, 100)
                .await
                .expect("events")
                .into_iter()
                .map(|event| event.payload.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(payloads("a1").await, Vec::<String>::new(), "a1 had it");
        assert_eq!(payloads("a2").await, ["left-behind"]);
        let pending: std::collections::HashMap<String, String> = raw
            .hgetall(keys.pending_changes(uri))
            .await
            .expect("HGETALL");
        assert_eq!(
            pending.keys().collect::<Vec<_>>(),
            ["young"],
            "the finished change is no longer pending; the young one is left to its replica"
        );

        // A second pass (the lease taken again) changes nothing.
        let _: i64 = raw.del(keys.janitor_lease()).await.expect("DEL");
        b.janitor_pass(&ReplicaTag::generate(), Duration::from_secs(60))
            .await
            .expect("janitor");
        assert_eq!(payloads("a2").await, ["left-behind"], "not twice");
        let _ = raw.quit().await;
    })
    .await;
}

/// A planned failover of the prefix's slot (`CLUSTER FAILOVER`, or a slot migration) breaks no
/// connection, so the bus subscription stays on the demoted node, which still receives every
/// message (a cluster relays `PUBLISH`) while a publish counted on the slot's new primary reaches
/// nobody (a forwarded response would be answered 410). Once the replica's commands meet the new
/// layout, its probe finds nobody listening and the subscription follows the slot.
#[tokio::test]
async fn the_bus_subscription_follows_a_planned_failover_of_its_slot() {
    use shoal_testkit::sentinel::redis_cli;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = RedisCluster::start(dir.path(), PREFIX, 3)
        .await
        .expect("redis cluster");
    let s = subject(Some(cluster.url())).await;
    bus_ready(&s).await;
    let me = s.bus.tag().clone();
    let channel = Keys::new(PREFIX).replica_channel(me.as_str());
    let listening = |port: u16| {
        let channel = channel.clone();
        async move {
            let reply = redis_cli(port, &["PUBSUB", "NUMSUB", &channel])
                .await
                .expect("PUBSUB NUMSUB");
            reply.lines().nth(1).unwrap_or_default().trim().to_owned()
        }
    };
    let old = cluster.prefix_primary;
    assert_eq!(
        listening(old).await,
        "1",
        "subscribed on the prefix's primary"
    );
    assert!(
        s.backend
            .publish_forward(&me, "s", "{}")
            .await
            .expect("forward")
    );

    cluster
        .planned_failover_of_prefix_primary(PREFIX)
        .await
        .expect("planned failover");
    let new = cluster.prefix_primary;
    assert_ne!(new, old);
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            // Keyed commands over many slots: those of the moved shard are answered MOVED, and
            // fred learns the new layout.
            for n in 0..32 {
                let _ = s.backend.session_load(&format!("probe{n}")).await;
            }
            let _ = s.backend.publish_probe(&s.bus.probe()).await;
            if listening(new).await == "1" && listening(old).await == "0" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the bus subscription moved to the slot's new primary within 20 s");
    assert!(
        s.backend
            .publish_forward(&me, "s", "{}")
            .await
            .expect("forward"),
        "a publish counted on the new primary reaches this replica"
    );
}
