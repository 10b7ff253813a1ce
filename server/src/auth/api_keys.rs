//! Static API keys (`SHOAL_AUTH=api-keys`): a TOML file of key hashes, each mapped to a principal
//! and its scopes, re-read when it changes and on SIGHUP.
//!
//! ```toml
//! [[key]]
//! principal = "reporting"
//! scopes = ["postgres", "kv:write"]
//! sha256 = "…64 hex digits: the SHA-256 of the key…"
//! quota = { requests_per_sec = 20, concurrent_calls = 4 }   # optional, see crate::quota
//! ```
//!
//! Only hashes are held in memory: a presented key is hashed and looked up, so neither the file
//! nor a memory dump reveals a usable key. Keys are random strings of at least 128 bits
//! (`openssl rand -hex 32`), so an unsalted SHA-256 cannot be reversed by guessing.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{AuthRefusal, Principal};
use crate::{principal::Overrides, quota::Policy};

/// How often the file's modification time and size are checked for a change.
const POLL_EVERY: Duration = Duration::from_secs(2);

/// The loaded keys, swapped whole on reload.
#[derive(Debug)]
pub struct ApiKeys {
    path: PathBuf,
    keys: Arc<RwLock<Arc<KeySet>>>,
    /// What the file looked like when it was loaded (modification time, length).
    loaded: Option<Stamp>,
    /// Decides each key's quota limits.
    policy: Arc<Policy>,
}

/// Principals by the SHA-256 of their keys.
type KeySet = HashMap<[u8; 32], Principal>;

/// A file's modification time and length: what the watcher compares.
type Stamp = (SystemTime, u64);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    principal: String,
    #[serde(default)]
    scopes: Vec<String>,
    sha256: String,
    #[serde(default)]
    quota: Option<Overrides>,
}

/// The keys file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// It cannot be read.
    #[error("cannot read the API keys file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid.
    #[error("invalid API keys file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (never a key or hash).
        message: String,
    },
}

impl ApiKeys {
    /// Reads the keys of `path`.
    ///
    /// # Errors
    /// Fails when the file cannot be read or is not valid.
    pub fn load(path: PathBuf, policy: Arc<Policy>) -> Result<Self, KeysError> {
        let loaded = stamp(&path);
        let set = read(&path, &policy)?;
        tracing::info!(keys = set.len(), path = %path.display(), "API keys loaded");
        Ok(Self {
            path,
            keys: Arc::new(RwLock::new(Arc::new(set))),
            loaded,
            policy,
        })
    }

    /// The principal of `key`.
    ///
    /// # Errors
    /// `unknown_api_key` when no loaded key has its hash.
    pub fn authenticate(&self, key: &str) -> Result<Principal, AuthRefusal> {
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        keys.get(&hash)
            .cloned()
            .ok_or(AuthRefusal::new("unknown_api_key", "unknown API key"))
    }

    /// Re-reads the file when it changes (checked every [`POLL_EVERY`]) and on SIGHUP, until
    /// `stop` fires. A file that cannot be read or parsed leaves the keys in force, logged, and is
    /// not read again until it changes.
    pub(crate) fn watch(&self, background: &crate::background::Background) {
        let stop = background.stop.clone();
        let path = self.path.clone();
        let keys = self.keys.clone();
        let policy = self.policy.clone();
        let mut seen = self.loaded;
        background.spawn(async move {
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(POLL_EVERY);
            loop {
                let forced = tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => false,
                    Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                let current = stamp(&path);
                if !forced && current == seen {
                    continue;
                }
                seen = current;
                match read(&path, &policy) {
                    Ok(set) => {
                        tracing::info!(keys = set.len(), forced, "API keys reloaded");
                        *keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                    }
                    Err(error) => {
                        tracing::error!(%error, "API keys not reloaded; the previous keys stay");
                    }
                }
            }
        });
    }
}

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

fn read(path: &std::path::Path, policy: &Policy) -> Result<KeySet, KeysError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, policy).map_err(|message| KeysError::Invalid {
        path: path.to_owned(),
        message,
    })
}

fn parse(text: &str, policy: &Policy) -> Result<KeySet, String> {
    // toml's errors quote the offending line, which may hold a hash: only its position is kept.
    let file: KeyFile = toml::from_str(text).map_err(|error| match error.span() {
        Some(span) => format!(
            "not valid TOML (at byte {}): {}",
            span.start,
            error.message()
        ),
        None => format!("not valid TOML: {}", error.message()),
    })?;
    let mut by_hash = HashMap::new();
    for (index, entry) in file.key.into_iter().enumerate() {
        let n = index + 1;
        let principal = entry.principal.trim();
        if principal.is_empty() || principal.len() > 128 {
            return Err(format!("key {n}: principal must be 1 to 128 characters"));
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(entry.sha256.trim(), &mut hash)
            .map_err(|_| format!("key {n}: sha256 must be 64 hex digits"))?;
        if entry
            .scopes
            .iter()
            .any(|s| s.is_empty() || s.contains(char::is_whitespace))
        {
            return Err(format!("key {n}: scopes must be non-empty words"));
        }
        let limits = policy.limits(&entry.scopes, None, entry.quota.as_ref());
        let principal = Principal::new("api-key", principal, entry.scopes).with_limits(limits);
        if by_hash.insert(hash, principal).is_some() {
            return Err(format!("key {n}: the same key is listed twice"));
        }
    }
    Ok(by_hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    #[test]
    fn keys_map_to_principals_by_hash() {
        let text = format!(
            "[[key]]\nprincipal = \"alice\"\nscopes = [\"kv\"]\nsha256 = \"{}\"\n\n\
             [[key]]\nprincipal = \"alice\"\nscopes = [\"kv\"]\nsha256 = \"{}\"\n",
            sha("one"),
            sha("two")
        );
        let keys = parse(&text, &Policy::default()).expect("valid");
        let one: [u8; 32] = Sha256::digest(b"one").into();
        let two: [u8; 32] = Sha256::digest(b"two").into();
        assert_eq!(keys[&one].name.as_ref(), "alice");
        // Two keys of one principal (a rotation) are the same principal.
        assert_eq!(keys[&one].id, keys[&two].id);
        assert_eq!(&*keys[&one].scopes, ["kv".to_owned()]);
    }

    #[test]
    fn bad_files_are_refused_without_quoting_hashes() {
        let hash = sha("k");
        let cases = [
            format!("[[key]]\nprincipal = \"\"\nsha256 = \"{hash}\"\n"),
            "[[key]]\nprincipal = \"a\"\nsha256 = \"abc\"\n".to_owned(),
            format!("[[key]]\nprincipal = \"a\"\nsha256 = \"{hash}\"\nextra = 1\n"),
            format!(
                "[[key]]\nprincipal = \"a\"\nsha256 = \"{hash}\"\n[[key]]\nprincipal = \"b\"\nsha256 = \"{hash}\"\n"
            ),
            format!("[[key]]\nprincipal = \"a\"\nscopes = [\"a b\"]\nsha256 = \"{hash}\"\n"),
            format!("[[key]]\nprincipal = \"a\"\nsha256 = \"{hash}\n"),
        ];
        for case in cases {
            let error = parse(&case, &Policy::default()).expect_err(&case);
            assert!(!error.contains(&hash), "{error}");
        }
    }
}
