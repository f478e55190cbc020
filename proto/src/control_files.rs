//! The files through which the controlplane hands rules and runtime settings to the
//! dataplane: `<data_dir>/rules/current.json` (the rule set, docs/api.md's file format
//! plus a `version`) and `<data_dir>/rules/runtime.json` ([`RuntimeOverrides`]).
//!
//! The controlplane writes them with [`write_atomic`] (temp file, fsync, rename, fsync
//! of the directory), so a reader sees the old file or the new one, never a torn one,
//! and what was acknowledged to an operator survives a crash. Each dataplane core polls
//! them (a `stat` a few times a second) and swaps in a new version: distribution needs
//! no connection between the planes, keeps working while the controlplane is down, and
//! the same files carry the rules across restarts of either plane.

use std::path::{Path, PathBuf};

use clickgate_core::fraud::{RuleError, RuleSet};

pub const RULES_DIR: &str = "rules";
pub const RULES_FILE: &str = "current.json";
pub const RUNTIME_FILE: &str = "runtime.json";

pub fn rules_path(data_dir: &Path) -> PathBuf {
    data_dir.join(RULES_DIR).join(RULES_FILE)
}

pub fn runtime_path(data_dir: &Path) -> PathBuf {
    data_dir.join(RULES_DIR).join(RUNTIME_FILE)
}

/// Runtime settings set through the control API; each present field overrides the
/// process setting of the same name.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeOverrides {
    #[serde(default)]
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_events_per_sec: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_cidrs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_window_secs: Option<u64>,
}

impl RuntimeOverrides {
    /// The settings the dataplane applies without a restart.
    pub const HOT: [&'static str; 2] = ["rate_limit_events_per_sec", "trusted_cidrs"];
    /// The settings that take effect at the dataplane's next start.
    pub const RESTART: [&'static str; 1] = ["dedup_window_secs"];

    pub fn parse(text: &str) -> Result<RuntimeOverrides, String> {
        let o: RuntimeOverrides = serde_json::from_str(text).map_err(|e| e.to_string())?;
        o.validate()?;
        Ok(o)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.rate_limit_events_per_sec == Some(0) {
            return Err("rate_limit_events_per_sec must be greater than 0".into());
        }
        if self.dedup_window_secs == Some(0) {
            return Err("dedup_window_secs must be greater than 0".into());
        }
        if let Some(c) = &self.trusted_cidrs {
            clickgate_core::cidr::CidrSet::parse_list(c)
                .map_err(|e| format!("trusted_cidrs: {e}"))?;
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("overrides serialise") + "\n"
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Rules { path: PathBuf, source: RuleError },
    #[error("{path}: {reason}")]
    Runtime { path: PathBuf, reason: String },
}

/// Reads the rule set; `Ok(None)` when no rule was ever applied (no file).
pub fn read_rules(data_dir: &Path) -> Result<Option<RuleSet>, LoadError> {
    let path = rules_path(data_dir);
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    RuleSet::parse(&text)
        .map(Some)
        .map_err(|source| LoadError::Rules { path, source })
}

/// Reads the runtime overrides; `Ok(None)` when none were ever set.
pub fn read_runtime(data_dir: &Path) -> Result<Option<RuntimeOverrides>, LoadError> {
    let path = runtime_path(data_dir);
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    RuntimeOverrides::parse(&text)
        .map(Some)
        .map_err(|reason| LoadError::Runtime { path, reason })
}

fn read_optional(path: &Path) -> Result<Option<String>, LoadError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LoadError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The one atomic-write helper, re-exported here for the callers of this module.
pub use crate::fsutil::write_atomic;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_rules(dir.path()).unwrap().is_none());
        let set =
            RuleSet::parse(r#"{"version":3,"rules":[{"id":"b","kind":"honeypot","ad_ids":[9]}]}"#)
                .unwrap();
        write_atomic(&rules_path(dir.path()), set.to_json().as_bytes()).unwrap();
        assert_eq!(read_rules(dir.path()).unwrap(), Some(set));
        std::fs::write(rules_path(dir.path()), "{").unwrap();
        let e = read_rules(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("current.json") && e.contains("not valid JSON"),
            "{e}"
        );
    }

    #[test]
    fn runtime_overrides_validate() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_runtime(dir.path()).unwrap().is_none());
        let o = RuntimeOverrides {
            version: 2,
            rate_limit_events_per_sec: Some(50),
            trusted_cidrs: Some(vec!["10.0.0.0/8".into()]),
            dedup_window_secs: None,
        };
        write_atomic(&runtime_path(dir.path()), o.to_json().as_bytes()).unwrap();
        assert_eq!(read_runtime(dir.path()).unwrap(), Some(o));
        assert!(RuntimeOverrides::parse(r#"{"rate_limit_events_per_sec":0}"#).is_err());
        assert!(RuntimeOverrides::parse(r#"{"trusted_cidrs":["x"]}"#).is_err());
        assert!(RuntimeOverrides::parse(r#"{"nope":1}"#).is_err());
    }
}
