//! Hostile input, generated: whatever a client (or a corrupted message) sends to the parsers that
//! stand between it and shared state, they never panic, and they accept only what they should.
//! Runs in CI with a bounded number of cases per property (proptest's default, 256).

use proptest::prelude::*;
use serde_json::{Value, json};
use shoal_shared::{
    bus::{Bus, BusMessage, SessionEvent},
    cache::{canonical_json, entry_id},
    ids::{ClientEventId, EventId, ReplicaTag, is_session_id},
    keys::Keys,
    metrics::Metrics,
};

fn session_id() -> impl Strategy<Value = String> {
    any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).hyphenated().to_string())
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    /// A session id is accepted only as generated: a lowercase hyphenated UUID, nothing around it.
    #[test]
    fn session_ids_accept_only_their_generated_form(text in ".{0,48}", id in session_id(), suffix in ".{1,8}") {
        if is_session_id(&text) {
            let parsed = uuid::Uuid::try_parse(&text).expect("a UUID");
            prop_assert_eq!(parsed.hyphenated().to_string(), text);
        }
        prop_assert!(is_session_id(&id));
        let (before, after) = (format!("{id}{suffix}"), format!("{suffix}{id}"));
        prop_assert!(!is_session_id(&before));
        prop_assert!(!is_session_id(&after));
        prop_assert!(!is_session_id(&id.to_uppercase()) || id == id.to_uppercase());
    }

    /// `Last-Event-ID`: never a panic; what parses names a real session id and round-trips.
    #[test]
    fn last_event_ids_parse_only_session_scoped_ids(text in ".{0,80}", id in session_id(), ms in any::<u64>(), seq in any::<u64>()) {
        if let Some(parsed) = ClientEventId::parse(&text) {
            prop_assert!(is_session_id(&parsed.session));
        }
        let event = EventId { ms, seq };
        let formatted = ClientEventId::format(&id, event);
        let parsed = ClientEventId::parse(&formatted).expect("parses");
        prop_assert_eq!(parsed.session, id);
        prop_assert_eq!(parsed.event, event);
    }

    /// The bus codec: any bytes on any of the replica's channels are dispatched or dropped as
    /// malformed, never a panic.
    #[test]
    fn bus_messages_of_any_shape_never_panic(payload in prop::collection::vec(any::<u8>(), 0..200), text in ".{0,120}", which in 0_usize..5) {
        let tag = ReplicaTag::generate();
        let keys = Keys::new("t");
        let (bus, _control) = Bus::new(keys.clone(), tag.clone(), Metrics::new());
        let channels = [
            keys.replica_channel(tag.as_str()),
            keys.control_channel(),
            keys.resource_channel(),
            keys.cache_channel(),
            "elsewhere".to_owned(),
        ];
        let _feed = bus.register_feed("0b5c5b3e-2f9a-4f53-9d0f-1c1f7d9c8e11");
        bus.dispatch(&channels[which], &payload);
        bus.dispatch(&channels[which], text.as_bytes());
        for head in ["2:ev,", "3:fwd,", "3:end,", "3:png,", "3:del,", "6:cancel,", "1:u,", "1:l,", "1:f,"] {
            bus.dispatch(&channels[which], format!("{head}{text}").as_bytes());
            let mut framed = head.as_bytes().to_vec();
            framed.extend_from_slice(&payload);
            bus.dispatch(&channels[which], &framed);
        }
    }

    /// The bus frame codec: whatever the fields hold (spaces, newlines, commas, digits and colons
    /// that look like frame syntax, any Unicode), a frame decodes to exactly the message encoded,
    /// and no prefix or extension of a frame decodes to anything.
    #[test]
    fn bus_frames_keep_every_field_whole(session in ".{0,40}", payload in ".{0,200}", trace in ".{0,60}", id in any::<(u64, u64)>(), prev in any::<(u64, u64)>(), stream in any::<u64>(), cut in any::<prop::sample::Index>()) {
        let trace = Some(trace.as_str()).filter(|t| !t.is_empty());
        let messages = [
            BusMessage::Event(SessionEvent {
                session: &session,
                stream,
                id: EventId { ms: id.0, seq: id.1 },
                prev: EventId { ms: prev.0, seq: prev.1 },
                payload: &payload,
            }),
            BusMessage::Cancel { origin: &session, session: &payload, trace, payload: &payload },
            BusMessage::Forward { session: &session, trace, payload: &payload },
            BusMessage::ResourceUpdated { uri: &payload, trace },
            BusMessage::SessionDeleted { session: &session },
        ];
        for message in messages {
            let frame = message.encode();
            prop_assert_eq!(BusMessage::decode(frame.as_bytes()), Ok(message.clone()));
            let cut = cut.index(frame.len());
            prop_assert!(BusMessage::decode(&frame.as_bytes()[..cut]).is_err());
            let mut longer = frame.clone().into_bytes();
            longer.extend_from_slice(b"1:x,");
            prop_assert!(BusMessage::decode(&longer).is_err());
        }
    }

    /// Cache keys: the same arguments in any key order are one entry; different partitions never
    /// share one.
    #[test]
    fn cache_keys_are_canonical_and_partitioned(value in json_value(), tool in "[a-z_]{1,12}", a in "[a-z0-9-]{1,12}", b in "[a-z0-9-]{1,12}") {
        let reordered: Value = serde_json::from_str(&canonical_json(&value)).expect("canonical JSON parses");
        prop_assert_eq!(entry_id(&tool, &value, &a), entry_id(&tool, &reordered, &a));
        if a != b {
            prop_assert_ne!(entry_id(&tool, &value, &a), entry_id(&tool, &value, &b));
        }
        let wrapped = json!({"x": value.clone(), "y": 1});
        let flipped = json!({"y": 1, "x": value});
        prop_assert_eq!(entry_id(&tool, &wrapped, &a), entry_id(&tool, &flipped, &a));
    }
}
