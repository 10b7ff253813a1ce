//! Identifiers: replica tags and event ids.
//!
//! An [`EventId`] is the id Redis assigns to an entry of a session's event log (`<ms>-<seq>`), so ids
//! are ordered and valid on every replica. What clients see is a [`ClientEventId`]: the event id
//! prefixed with the session id it belongs to, so a `Last-Event-ID` from one session can never
//! replay another session's events.

use std::{fmt, str::FromStr};

/// A short random tag naming one replica process for its lifetime (12 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaTag(String);

impl ReplicaTag {
    /// A fresh random tag.
    pub fn generate() -> Self {
        let value: u64 = rand::random::<u64>() & 0xffff_ffff_ffff;
        Self(format!("{value:012x}"))
    }

    /// Parses a tag received from the wire.
    pub fn parse(value: &str) -> Option<Self> {
        (value.len() == 12 && value.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Self(value.to_ascii_lowercase()))
    }

    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplicaTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `value` is a session id exactly as sessions are created (rmcp's: a UUID in its
/// lowercase hyphenated form). Anything else is refused on every path before it reaches storage,
/// the bus or telemetry, so no field of a message can spill into another.
pub fn is_session_id(value: &str) -> bool {
    value.len() == 36
        && uuid::Uuid::try_parse(value).is_ok_and(|id| {
            let mut buffer = uuid::Uuid::encode_buffer();
            id.hyphenated().encode_lower(&mut buffer) == value
        })
}

/// The id of one event in a session's event log: `<milliseconds>-<sequence>`, as Redis Streams
/// assign them. Ordered; `0-0` precedes every real event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventId {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl EventId {
    /// The id before every event.
    pub const ZERO: EventId = EventId { ms: 0, seq: 0 };
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// An event id that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed event id")]
pub struct EventIdError;

impl FromStr for EventId {
    type Err = EventIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.split_once('-').ok_or(EventIdError)?;
        Ok(Self {
            ms: ms.parse().map_err(|_| EventIdError)?,
            seq: seq.parse().map_err(|_| EventIdError)?,
        })
    }
}

/// The event id as a client sees it in SSE `id:` fields and sends back in `Last-Event-ID`:
/// `<session id>.<event id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEventId {
    /// The session the event belongs to.
    pub session: String,
    /// The event within that session's log.
    pub event: EventId,
}

impl ClientEventId {
    /// Formats the id of `event` in `session`.
    pub fn format(session: &str, event: EventId) -> String {
        format!("{session}.{event}")
    }

    /// Parses a `Last-Event-ID` value of the session event log.
    pub fn parse(value: &str) -> Option<Self> {
        let (session, event) = value.rsplit_once('.')?;
        if !is_session_id(session) {
            return None;
        }
        Some(Self {
            session: session.to_owned(),
            event: event.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_order_and_round_trip() {
        let a: EventId = "1700000000000-0".parse().expect("parse");
        let b: EventId = "1700000000000-1".parse().expect("parse");
        let c: EventId = "1700000000001-0".parse().expect("parse");
        assert!(EventId::ZERO < a && a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-1");
        assert!("17".parse::<EventId>().is_err());
        assert!("a-1".parse::<EventId>().is_err());
    }

    #[test]
    fn client_ids_name_their_session() {
        let sid = "0b5c5b3e-2f9a-4f53-9d0f-1c1f7d9c8e11";
        let text = ClientEventId::format(sid, EventId { ms: 5, seq: 2 });
        assert_eq!(text, format!("{sid}.5-2"));
        let parsed = ClientEventId::parse(&text).expect("parse");
        assert_eq!(parsed.session, sid);
        assert_eq!(parsed.event, EventId { ms: 5, seq: 2 });
        assert!(ClientEventId::parse("0").is_none());
        assert!(ClientEventId::parse(".5-2").is_none());
        assert!(ClientEventId::parse("abc.5").is_none());
    }

    #[test]
    fn session_ids_are_accepted_only_as_generated() {
        let sid = uuid::Uuid::new_v4().to_string();
        assert!(is_session_id(&sid));
        for bad in [
            format!("{sid} junk"),
            format!("{sid}\n"),
            sid.to_uppercase(),
            sid.replace('-', ""),
            format!("{{{sid}}}"),
            format!("urn:uuid:{sid}"),
            String::new(),
            "del x".to_owned(),
        ] {
            assert!(!is_session_id(&bad), "{bad:?}");
        }
        assert!(ClientEventId::parse(&format!("{sid} x.5-2")).is_none());
    }

    #[test]
    fn replica_tags_parse_only_their_shape() {
        let tag = ReplicaTag::generate();
        assert_eq!(ReplicaTag::parse(tag.as_str()), Some(tag));
        assert!(ReplicaTag::parse("xyz").is_none());
        assert!(ReplicaTag::parse("0123456789ag").is_none());
    }
}
