//! Toolset `time`: the current time and conversions between IANA time zones, from the time zone
//! database bundled in the binary (the same answers on every replica, whatever its image holds).
//!
//! - `now {zone?}`: the current instant in `zone` (default `UTC`).
//! - `convert {time, to, from?}`: `time` in the zone `to`. `time` is an RFC 3339 instant
//!   (`2026-12-07T10:00:00Z`, `2026-12-07T11:00:00+01:00`), or a civil date and time
//!   (`2026-12-07T10:00:00`) read in the zone `from`; a civil time a zone skips (a gap) or has twice
//!   (a fold) is resolved as RFC 9557 says (compatible: later for a gap, earlier for a fold).
//!
//! Both answer `{time, zone, offset, unix_ms}`: `time` as RFC 3339 with the zone's offset.

use jiff::{Timestamp, Zoned, civil::DateTime, tz::TimeZone};
use rmcp::{
    ErrorData as McpError, handler::server::wrapper::Parameters, model::CallToolResult, tool,
    tool_router,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use shoal_shared::cache::Freshness;

use crate::toolbox::{ToolHost, Toolset, failed, policy::Declared};

/// Longest zone name or time text accepted (the longest IANA name is 32 bytes).
const MAX_INPUT: usize = 64;

/// The toolset.
#[derive(Debug)]
pub struct Time;

impl Toolset for Time {
    fn name(&self) -> &'static str {
        "time"
    }

    fn router(&self) -> rmcp::handler::server::router::tool::ToolRouter<ToolHost> {
        ToolHost::time_tools()
    }

    fn policies(&self) -> Vec<(String, Declared)> {
        // Cheap and exact: nothing to gain from the shared cache, and `now` must not be cached.
        vec![
            ("now".into(), Declared::new(Freshness::Realtime)),
            ("convert".into(), Declared::new(Freshness::Realtime)),
        ]
    }
}

/// Arguments of `now`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct NowParams {
    /// IANA time zone, such as `Europe/Paris` or `America/New_York` (default `UTC`).
    #[serde(default)]
    pub zone: Option<String>,
}

/// Arguments of `convert`.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ConvertParams {
    /// An RFC 3339 instant (`2026-12-07T10:00:00Z`), or a civil date and time
    /// (`2026-12-07T10:00:00`) read in the zone `from`.
    pub time: String,
    /// IANA time zone to convert to.
    pub to: String,
    /// IANA time zone a civil `time` is read in (required for one; ignored for an instant).
    #[serde(default)]
    pub from: Option<String>,
}

/// The zone named `name`, or the message the model is told.
fn zone(name: &str) -> Result<TimeZone, String> {
    if name.len() > MAX_INPUT {
        return Err(format!("time zone names are at most {MAX_INPUT} bytes"));
    }
    TimeZone::get(name).map_err(|_| {
        format!("unknown time zone {name:?}: use an IANA name such as Europe/Paris or UTC")
    })
}

/// The instant `time` names: itself when it carries an offset, else read in the zone `from`.
fn instant(time: &str, from: Option<&str>) -> Result<Timestamp, String> {
    if time.len() > MAX_INPUT {
        return Err(format!("time is at most {MAX_INPUT} bytes"));
    }
    if let Ok(instant) = time.parse::<Timestamp>() {
        return Ok(instant);
    }
    let civil = time.parse::<DateTime>().map_err(|_| {
        format!(
            "cannot read {time:?}: give an RFC 3339 instant (2026-12-07T10:00:00Z) or a civil \
             date and time (2026-12-07T10:00:00) with `from`"
        )
    })?;
    let Some(from) = from else {
        return Err(format!(
            "{time:?} has no offset: name the zone it is in with `from`"
        ));
    };
    civil
        .to_zoned(zone(from)?)
        .map(|zoned| zoned.timestamp())
        .map_err(|error| format!("{time:?} does not exist in {from}: {error}"))
}

/// The answer for `zoned`.
fn answer(zoned: &Zoned) -> CallToolResult {
    let offset = zoned.offset();
    CallToolResult::structured(json!({
        "time": zoned.timestamp().display_with_offset(offset).to_string(),
        "zone": zoned.time_zone().iana_name().unwrap_or("UTC"),
        "offset": offset.to_string(),
        "unix_ms": zoned.timestamp().as_millisecond(),
    }))
}

#[tool_router(router = time_tools, vis = "pub(crate)")]
impl ToolHost {
    #[tool(
        description = "The current date and time in an IANA time zone (default UTC): RFC 3339 time, \
                       zone, UTC offset and Unix milliseconds.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn now(
        &self,
        Parameters(params): Parameters<NowParams>,
    ) -> Result<CallToolResult, McpError> {
        let zone = match zone(params.zone.as_deref().unwrap_or("UTC")) {
            Ok(zone) => zone,
            Err(message) => return Ok(failed(message)),
        };
        Ok(answer(&Timestamp::now().to_zoned(zone)))
    }

    #[tool(
        description = "Convert a date and time to another IANA time zone. `time` is an RFC 3339 \
                       instant (2026-12-07T10:00:00Z) or a civil date and time \
                       (2026-12-07T10:00:00) read in the zone `from`. Answers the RFC 3339 time \
                       in `to`, the zone, its UTC offset then and Unix milliseconds.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn convert(
        &self,
        Parameters(params): Parameters<ConvertParams>,
    ) -> Result<CallToolResult, McpError> {
        let converted = instant(&params.time, params.from.as_deref())
            .and_then(|instant| Ok(instant.to_zoned(zone(&params.to)?)));
        Ok(match converted {
            Ok(zoned) => answer(&zoned),
            Err(message) => failed(message),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_and_civil_times_convert_across_zones() {
        let paris = instant("2026-12-07T10:00:00Z", None)
            .expect("instant")
            .to_zoned(zone("Europe/Paris").expect("zone"));
        assert_eq!(paris.to_string(), "2026-12-07T11:00:00+01:00[Europe/Paris]");
        // Summer time: New York is four hours behind UTC.
        let utc = instant("2026-07-01T08:30:00", Some("America/New_York")).expect("civil");
        assert_eq!(utc.to_string(), "2026-07-01T12:30:00Z");
    }

    #[test]
    fn bad_input_is_named() {
        assert!(
            zone("Mars/Olympus")
                .expect_err("refused")
                .contains("unknown time zone")
        );
        assert!(
            zone(&"A".repeat(65))
                .expect_err("refused")
                .contains("at most")
        );
        assert!(
            instant("yesterday", None)
                .expect_err("refused")
                .contains("cannot read")
        );
        assert!(
            instant("2026-12-07T10:00:00", None)
                .expect_err("refused")
                .contains("`from`")
        );
    }
}
