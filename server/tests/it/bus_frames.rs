//! The frames the Lua scripts publish, pinned to the bus codec (issue 10, finding 7): a real Redis
//! runs the backend's scripts and a raw subscriber records the bytes they publish, which must be
//! exactly what [`BusMessage::encode`] produces for the expected message.

use std::time::Duration;

use fred::{
    interfaces::{ClientLike, EventInterface, PubsubInterface},
    prelude::{Builder, Config},
    types::Message,
};
use secrecy::SecretString;
use shoal_shared::{
    backend::{Backend, FeedClaim},
    bus::{self, Bus, BusMessage, SessionEvent},
    ids::{EventId, ReplicaTag},
    keys::Keys,
    metrics::Metrics,
};
use shoal_testkit::topology::RedisServer;
use tokio::sync::broadcast;

const PREFIX: &str = "pin";

async fn next_frame(messages: &mut broadcast::Receiver<Message>) -> (String, Vec<u8>) {
    let message = tokio::time::timeout(Duration::from_secs(10), messages.recv())
        .await
        .expect("a frame within 10 s")
        .expect("subscriber open");
    let bytes = message.value.as_bytes().expect("binary payload").to_vec();
    (message.channel.to_string(), bytes)
}

#[tokio::test]
async fn lua_scripts_publish_the_frames_of_the_codec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path(), PREFIX).await.expect("redis");
    let keys = Keys::new(PREFIX);
    let tag = ReplicaTag::generate();
    let metrics = Metrics::new();
    // This replica's bus is never fed by the raw subscriber below; the backend's own subscriber
    // feeds it, as in a replica.
    let (bus, _control) = Bus::new(keys.clone(), tag.clone(), metrics.clone());
    let config = crate::helpers::backend_config(Duration::from_secs(5));
    let backend = Backend::connect(
        Some(&SecretString::from(redis.url())),
        config,
        bus.clone(),
        metrics,
        Default::default(),
    )
    .await
    .expect("backend");

    let subscriber = Builder::from_config(Config::from_url(&redis.url()).expect("url"))
        .build_subscriber_client()
        .expect("subscriber");
    subscriber.init().await.expect("connect");
    let mut messages = subscriber.message_rx();
    let replica_channel = keys.replica_channel(tag.as_str());
    let control_channel = keys.control_channel();
    let resource_channel = keys.resource_channel();
    // Returns once Redis confirmed every subscription.
    subscriber
        .subscribe(vec![
            replica_channel.clone(),
            control_channel.clone(),
            resource_channel.clone(),
        ])
        .await
        .expect("subscribe");

    let session = uuid::Uuid::new_v4().to_string();
    backend
        .session_create(&session, "{}", "p")
        .await
        .expect("create");
    let first_holder = bus::feed_holder(&tag, 7);
    backend
        .feed_open(
            FeedClaim {
                session: &session,
                holder: &first_holder,
            },
            None,
            10,
        )
        .await
        .expect("open")
        .expect("live");

    // EVENT_APPEND: a session event for the holder, with its predecessor (none, then the first).
    let payload = "{\"jsonrpc\":\"2.0\",\"method\":\"x\",\"params\":{\"s\":\"a b\\n5:c,\"}}";
    let first = backend
        .event_append(&session, payload)
        .await
        .expect("append")
        .expect("live");
    let second = backend
        .event_append(&session, "é")
        .await
        .expect("append")
        .expect("live");
    for (id, prev, payload) in [(first, EventId::ZERO, payload), (second, first, "é")] {
        let expected = BusMessage::Event(SessionEvent {
            session: &session,
            stream: 7,
            id,
            prev,
            payload,
        });
        let (channel, frame) = next_frame(&mut messages).await;
        assert_eq!(channel, replica_channel);
        assert_eq!(BusMessage::decode(&frame), Ok(expected.clone()));
        assert_eq!(frame, expected.encode().into_bytes());
    }

    // FEED_OPEN: a newer stream tells the holder of the previous one to end it.
    backend
        .feed_open(
            FeedClaim {
                session: &session,
                holder: &bus::feed_holder(&tag, 8),
            },
            None,
            10,
        )
        .await
        .expect("reopen")
        .expect("live");
    let (channel, frame) = next_frame(&mut messages).await;
    assert_eq!(channel, replica_channel);
    assert_eq!(
        frame,
        BusMessage::FeedEnd {
            session: &session,
            stream: 7
        }
        .encode()
        .into_bytes()
    );

    // RESOURCE_UPDATED: the broadcast for listeners (the change's first step, in the resource's
    // slot), then an event for each subscriber's holder (appended in the session's slot).
    backend
        .subscribe(&session, "kv://pinned")
        .await
        .expect("subscribe");
    backend
        .resource_updated("kv://pinned", "{}")
        .await
        .expect("updated");
    let (channel, frame) = next_frame(&mut messages).await;
    assert_eq!(channel, resource_channel);
    assert_eq!(
        frame,
        BusMessage::ResourceUpdated {
            uri: "kv://pinned",
            trace: None
        }
        .encode()
        .into_bytes()
    );
    let (channel, frame) = next_frame(&mut messages).await;
    assert_eq!(channel, replica_channel);
    let (third, prev) = match BusMessage::decode(&frame).expect("a frame") {
        BusMessage::Event(event) => (event.id, event.prev),
        other => panic!("expected an event, got {other:?}"),
    };
    assert_eq!(prev, second);
    assert_eq!(
        frame,
        BusMessage::Event(SessionEvent {
            session: &session,
            stream: 8,
            id: third,
            prev: second,
            payload: "{}",
        })
        .encode()
        .into_bytes()
    );

    // SESSION_DELETE: "deleted" on the control channel, only for a session that existed.
    assert!(backend.session_delete(&session).await.expect("delete"));
    assert!(!backend.session_delete(&session).await.expect("delete"));
    let (channel, frame) = next_frame(&mut messages).await;
    assert_eq!(channel, control_channel);
    assert_eq!(
        frame,
        BusMessage::SessionDeleted { session: &session }
            .encode()
            .into_bytes()
    );
    // Nothing followed the second delete: a probe sent now is the next frame.
    let probe = bus.probe();
    backend.publish_probe(&probe).await.expect("probe");
    let (channel, frame) = next_frame(&mut messages).await;
    assert_eq!((channel, frame), (replica_channel, probe.into_bytes()));

    backend.shutdown().await;
    let _ = subscriber.quit().await;
}
