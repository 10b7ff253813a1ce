//! The chaos schedule: faults injected at given times of the measured run by shell commands, each
//! optionally healed by another command some time later. The commands are whatever breaks the
//! system under test: `kill -9`, `podman kill`, `redis-cli shutdown`, or the control endpoint of
//! `shoal-cluster --control-port` (`curl -X POST …/replicas/r2/kill`).
//!
//! ```toml
//! [[fault]]
//! name = "replica r2 killed"
//! at = "10s"
//! run = "curl -fsS -X POST http://127.0.0.1:7070/replicas/r2/kill"
//! heal_after = "5s"
//! heal = "curl -fsS -X POST http://127.0.0.1:7070/replicas/r2/start"
//! ```

use std::{path::Path, time::Duration};

use serde::Deserialize;

/// One fault of the schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// What the report calls it (default: the command).
    #[serde(default)]
    pub name: Option<String>,
    /// When to inject it, from the start of measurement.
    #[serde(deserialize_with = "duration")]
    pub at: Duration,
    /// The shell command that injects it.
    pub run: String,
    /// The shell command that heals it, if any.
    #[serde(default)]
    pub heal: Option<String>,
    /// How long after the injection to heal it (default 5 s).
    #[serde(default = "default_heal_after", deserialize_with = "duration")]
    pub heal_after: Duration,
}

fn default_heal_after() -> Duration {
    Duration::from_secs(5)
}

fn duration<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(serde::de::Error::custom)
}

impl Fault {
    /// The name the report shows.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.run.clone())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    fault: Vec<Fault>,
}

/// Faults of a run, in injection order.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    /// The faults, sorted by `at`.
    pub faults: Vec<Fault>,
}

impl Schedule {
    /// Reads a TOML schedule (`[[fault]]` tables).
    ///
    /// # Errors
    /// When the file cannot be read or is not a valid schedule.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a TOML schedule.
    ///
    /// # Errors
    /// When it is not a valid schedule (unknown fields, bad durations, overlapping faults).
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut faults = file.fault;
        faults.sort_by_key(|f| f.at);
        for pair in faults.windows(2) {
            let end = pair[0].at
                + pair[0]
                    .heal
                    .as_ref()
                    .map_or(Duration::ZERO, |_| pair[0].heal_after);
            if pair[1].at < end {
                return Err(format!(
                    "{:?} starts before {:?} is healed: faults are injected one after another",
                    pair[1].label(),
                    pair[0].label()
                ));
            }
        }
        Ok(Self { faults })
    }

    /// Adds one fault (the `--chaos-cmd` shorthand).
    pub fn push(&mut self, fault: Fault) {
        self.faults.push(fault);
        self.faults.sort_by_key(|f| f.at);
    }
}

/// Runs a shell command; an error describes how it failed.
pub async fn run_hook(command: &str) -> Result<(), String> {
    match tokio::process::Command::new("sh")
        .args(["-c", command])
        .kill_on_drop(true)
        .output()
        .await
    {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(format!(
            "exited {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(error) => Err(format!("could not run: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_is_read_sorted_and_checked() {
        let schedule = Schedule::parse(
            r#"
            [[fault]]
            at = "20s"
            run = "b"
            [[fault]]
            name = "first"
            at = "5s"
            run = "a"
            heal = "a-heal"
            heal_after = "3s"
            "#,
        )
        .expect("valid");
        assert_eq!(schedule.faults[0].label(), "first");
        assert_eq!(schedule.faults[0].heal_after, Duration::from_secs(3));
        assert_eq!(schedule.faults[1].label(), "b");
        assert!(Schedule::parse("[[fault]]\nat = \"1s\"\nrun = \"x\"\nheal = \"y\"\n[[fault]]\nat = \"2s\"\nrun = \"z\"").is_err());
        assert!(Schedule::parse("[[fault]]\nat = \"soon\"\nrun = \"x\"").is_err());
        assert!(Schedule::parse("[[fault]]\nat = \"1s\"\nrun = \"x\"\nwhen = 1").is_err());
    }
}
