//! The one wire format of the cluster bus: every message any replica or Lua script publishes, and
//! the only parser of what a replica receives.
//!
//! A frame is a sequence of netstrings (`<byte length>:<bytes>,`): the first names the kind, the
//! rest are the kind's fields in a fixed order. Lengths, not separators, delimit the fields, so no
//! value (a session id from a header, a URI, a JSON payload with spaces and newlines) can spill
//! into another field or forge a second message; the trailing comma and the check that the frame
//! ends exactly after the last field catch truncation. The Lua scripts in
//! [`crate::backend::scripts`] build the frames they publish with the same rule (their `ns`
//! helper); a test against a real Redis pins those frames to [`BusMessage::encode`].
//!
//! Optional fields (a trace context) are the empty string when absent.

use std::fmt::Write as _;

use crate::ids::EventId;

use super::ListKind;

/// Longest frame accepted: a session event carries at most one JSON-RPC message, which the
/// replicas bound well below this.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// One bus message. Fields borrow from the frame they were decoded from (or from the caller when
/// encoding), so dispatch copies only what a consumer keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusMessage<'a> {
    /// A session event, sent to the replica holding the session's GET stream.
    Event(SessionEvent<'a>),
    /// A client's response to a request the receiving replica sent.
    Forward {
        /// The session.
        session: &'a str,
        /// W3C `traceparent` of the forwarding span.
        trace: Option<&'a str>,
        /// The JSON-RPC response.
        payload: &'a str,
    },
    /// A newer GET stream of the session opened: the receiving replica ends its stream `stream`.
    FeedEnd {
        /// The session.
        session: &'a str,
        /// The replaced stream.
        stream: u64,
    },
    /// A bus round-trip probe, sent by a replica to itself `sent_nanos` after its bus's epoch.
    Probe {
        /// Send time.
        sent_nanos: u64,
    },
    /// A session was deleted (control channel).
    SessionDeleted {
        /// The session.
        session: &'a str,
    },
    /// A client cancelled a request (control channel); replicas other than `origin` deliver it.
    Cancel {
        /// The replica that broadcast it.
        origin: &'a str,
        /// The session.
        session: &'a str,
        /// W3C `traceparent` of the broadcasting span.
        trace: Option<&'a str>,
        /// The `notifications/cancelled` message.
        payload: &'a str,
    },
    /// A resource changed (resource channel), for `subscriptions/listen` streams.
    ResourceUpdated {
        /// The resource, in canonical form.
        uri: &'a str,
        /// W3C `traceparent` of the span that raised it.
        trace: Option<&'a str>,
    },
    /// A list changed (resource channel).
    ListChanged(ListKind),
    /// A cache entry was filled (cache channel): waiters for it look again.
    CacheFilled {
        /// The entry.
        id: &'a str,
    },
}

/// A session event on its way to the replica holding the session's GET stream (its stream
/// `stream`). `prev` is the id of the event before it in the session's log (zero when none), so
/// the feed sees when a live event arrives without its predecessor and re-reads the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionEvent<'a> {
    /// The session.
    pub session: &'a str,
    /// The holding stream on the receiving replica.
    pub stream: u64,
    /// The event's id in the session's log.
    pub id: EventId,
    /// The id of the event before it in the log.
    pub prev: EventId,
    /// The JSON-RPC message.
    pub payload: &'a str,
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed bus frame: {0}")]
pub struct FrameError(pub &'static str);

impl<'a> BusMessage<'a> {
    /// The frame's kind tag.
    pub fn kind(&self) -> &'static str {
        match self {
            BusMessage::Event(_) => "ev",
            BusMessage::Forward { .. } => "fwd",
            BusMessage::FeedEnd { .. } => "end",
            BusMessage::Probe { .. } => "png",
            BusMessage::SessionDeleted { .. } => "del",
            BusMessage::Cancel { .. } => "cancel",
            BusMessage::ResourceUpdated { .. } => "u",
            BusMessage::ListChanged(_) => "l",
            BusMessage::CacheFilled { .. } => "f",
        }
    }

    /// The frame of this message.
    pub fn encode(&self) -> String {
        let mut frame = Frame::new(self.kind());
        match self {
            BusMessage::Event(event) => frame
                .str(event.session)
                .display(&event.stream)
                .display(&event.id)
                .display(&event.prev)
                .str(event.payload),
            BusMessage::Forward {
                session,
                trace,
                payload,
            } => frame.str(session).str(trace.unwrap_or("")).str(payload),
            BusMessage::FeedEnd { session, stream } => frame.str(session).display(stream),
            BusMessage::Probe { sent_nanos } => frame.display(sent_nanos),
            BusMessage::SessionDeleted { session } => frame.str(session),
            BusMessage::Cancel {
                origin,
                session,
                trace,
                payload,
            } => frame
                .str(origin)
                .str(session)
                .str(trace.unwrap_or(""))
                .str(payload),
            BusMessage::ResourceUpdated { uri, trace } => frame.str(uri).str(trace.unwrap_or("")),
            BusMessage::ListChanged(list) => frame.str(list.code()),
            BusMessage::CacheFilled { id } => frame.str(id),
        };
        frame.0
    }

    /// Parses one frame.
    ///
    /// # Errors
    /// When the frame is not one [`BusMessage::encode`] produces.
    pub fn decode(frame: &'a [u8]) -> Result<Self, FrameError> {
        if frame.len() > MAX_FRAME_BYTES {
            return Err(FrameError("frame too large"));
        }
        let text = std::str::from_utf8(frame).map_err(|_| FrameError("not UTF-8"))?;
        let mut fields = Fields { rest: text };
        let message = match fields.next()? {
            "ev" => BusMessage::Event(SessionEvent {
                session: fields.next()?,
                stream: fields.number()?,
                id: fields.event_id()?,
                prev: fields.event_id()?,
                payload: fields.next()?,
            }),
            "fwd" => BusMessage::Forward {
                session: fields.next()?,
                trace: fields.optional()?,
                payload: fields.next()?,
            },
            "end" => BusMessage::FeedEnd {
                session: fields.next()?,
                stream: fields.number()?,
            },
            "png" => BusMessage::Probe {
                sent_nanos: fields.number()?,
            },
            "del" => BusMessage::SessionDeleted {
                session: fields.next()?,
            },
            "cancel" => BusMessage::Cancel {
                origin: fields.next()?,
                session: fields.next()?,
                trace: fields.optional()?,
                payload: fields.next()?,
            },
            "u" => BusMessage::ResourceUpdated {
                uri: fields.next()?,
                trace: fields.optional()?,
            },
            "l" => BusMessage::ListChanged(
                ListKind::parse(fields.next()?).ok_or(FrameError("unknown list"))?,
            ),
            "f" => BusMessage::CacheFilled { id: fields.next()? },
            _ => return Err(FrameError("unknown kind")),
        };
        if fields.rest.is_empty() {
            Ok(message)
        } else {
            Err(FrameError("trailing bytes"))
        }
    }
}

/// A frame under construction.
struct Frame(String);

impl Frame {
    fn new(kind: &str) -> Self {
        let mut frame = Frame(String::with_capacity(64));
        frame.str(kind);
        frame
    }

    fn str(&mut self, value: &str) -> &mut Self {
        // Writing into a String cannot fail.
        let _ = write!(self.0, "{}:{value},", value.len());
        self
    }

    fn display(&mut self, value: &impl std::fmt::Display) -> &mut Self {
        self.str(&value.to_string())
    }
}

/// The fields of a frame being decoded.
struct Fields<'a> {
    rest: &'a str,
}

impl<'a> Fields<'a> {
    fn next(&mut self) -> Result<&'a str, FrameError> {
        let colon = self
            .rest
            .bytes()
            .take(21)
            .position(|b| b == b':')
            .ok_or(FrameError("missing field length"))?;
        let digits = &self.rest[..colon];
        if digits.is_empty()
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || (digits.len() > 1 && digits.starts_with('0'))
        {
            return Err(FrameError("bad field length"));
        }
        let len: usize = digits.parse().map_err(|_| FrameError("bad field length"))?;
        let start = colon + 1;
        let end = start
            .checked_add(len)
            .ok_or(FrameError("bad field length"))?;
        let value = self
            .rest
            .get(start..end)
            .ok_or(FrameError("truncated field"))?;
        let after = &self.rest[end..];
        self.rest = after
            .strip_prefix(',')
            .ok_or(FrameError("missing field terminator"))?;
        Ok(value)
    }

    fn optional(&mut self) -> Result<Option<&'a str>, FrameError> {
        Ok(Some(self.next()?).filter(|value| !value.is_empty()))
    }

    fn number(&mut self) -> Result<u64, FrameError> {
        let value = self.next()?;
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FrameError("bad number"));
        }
        value.parse().map_err(|_| FrameError("bad number"))
    }

    fn event_id(&mut self) -> Result<EventId, FrameError> {
        self.next()?.parse().map_err(|_| FrameError("bad event id"))
    }
}

/// The Lua side of the codec: `ns(value)` is one field, so a script builds a frame as
/// `ns('ev') .. ns(sid) .. ...`. Prepended to every script that publishes.
pub const LUA_NETSTRING: &str = r"
local function ns(value)
  value = tostring(value)
  return #value .. ':' .. value .. ','
end
";

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn every_kind() -> Vec<BusMessage<'static>> {
        vec![
            BusMessage::Event(SessionEvent {
                session: "s",
                stream: 7,
                id: EventId { ms: 12, seq: 3 },
                prev: EventId { ms: 12, seq: 2 },
                payload: "{\"a\": \"b c\"}\nx,9:y",
            }),
            BusMessage::Forward {
                session: "s",
                trace: Some(TRACE),
                payload: "{}",
            },
            BusMessage::Forward {
                session: "s",
                trace: None,
                payload: "",
            },
            BusMessage::FeedEnd {
                session: "s",
                stream: 1,
            },
            BusMessage::Probe { sent_nanos: 42 },
            BusMessage::SessionDeleted { session: "s" },
            BusMessage::Cancel {
                origin: "r1",
                session: "s",
                trace: None,
                payload: "{}",
            },
            BusMessage::ResourceUpdated {
                uri: "kv://a b\nc",
                trace: Some(TRACE),
            },
            BusMessage::ListChanged(ListKind::Prompts),
            BusMessage::CacheFilled { id: "é" },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for message in every_kind() {
            let frame = message.encode();
            assert_eq!(BusMessage::decode(frame.as_bytes()), Ok(message));
        }
    }

    #[test]
    fn frames_are_netstrings() {
        assert_eq!(
            BusMessage::SessionDeleted { session: "ab" }.encode(),
            "3:del,2:ab,"
        );
        assert_eq!(
            BusMessage::CacheFilled { id: "é" }.encode(),
            "1:f,2:é,",
            "lengths count bytes"
        );
    }

    #[test]
    fn a_field_cannot_spill_into_another() {
        // The attack of the security review: a session id carrying a second word ended another
        // session's stream when messages were split on spaces.
        let frame = BusMessage::SessionDeleted {
            session: "victim junk",
        }
        .encode();
        assert_eq!(
            BusMessage::decode(frame.as_bytes()),
            Ok(BusMessage::SessionDeleted {
                session: "victim junk"
            })
        );
        // A value that looks like a frame stays a value.
        let inner = BusMessage::SessionDeleted { session: "v" }.encode();
        let frame = BusMessage::CacheFilled { id: &inner }.encode();
        assert_eq!(
            BusMessage::decode(frame.as_bytes()),
            Ok(BusMessage::CacheFilled { id: &inner })
        );
    }

    #[test]
    fn malformed_frames_are_refused() {
        for frame in [
            "",
            "3:del,",
            "3:del,2:ab",
            "3:del,3:ab,",
            "3:del,2:ab,x",
            "3:del,2:ab,2:cd,",
            "3:del,02:ab,",
            "3:del,-2:ab,",
            "3:del,99999999999999999999999:ab,",
            "3:png,1:x,",
            "2:ev,1:s,1:1,3:1-0,3:bad,0:,",
            "1:l,5:other,",
            "4:what,",
            "3:del;2:ab,",
            "3:del,1:\u{e9},",
        ] {
            assert!(
                BusMessage::decode(frame.as_bytes()).is_err(),
                "accepted {frame:?}"
            );
        }
        assert!(BusMessage::decode(&[0xff, 0xfe]).is_err());
    }
}
