//! The fraud gate's per-core state: the rule snapshot every request is judged with and
//! the poller that swaps in new rules and runtime settings (the per-IP minute counter is
//! the box's, in [`crate::pipeline::BoxState`]).
//!
//! Distribution is through the data directory (see `clickgate_proto::control_files`):
//! every `RULES_POLL_MS` each core `stat`s `<data_dir>/rules/current.json` and
//! `runtime.json`; when a file changed (inode, size or mtime) it is read, parsed and
//! compiled on glommio's blocking thread (a 10k-CIDR set takes milliseconds to compile:
//! never on the core itself), and the core swaps its `Rc<ActiveRules>`. Nothing is
//! locked on the per-event path for the rules: each core holds its own compiled copy. A request takes the snapshot once, at its start, and is
//! judged whole by it; a push therefore applies to every request that starts after the
//! core's next poll, within `RULES_POLL_MS` plus the compile time (≪ 1 s).
//!
//! A file that fails to load (it should not: the controlplane validates and writes it
//! atomically) leaves the previous set in force, is logged, and counted in
//! `clickgate_fraud_rules_reload_failures_total`; it is retried once it changes again.

use std::cell::{Cell, RefCell};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use clickgate_core::cidr::CidrSet;
use clickgate_core::fraud::{CompiledRules, UaCache, FIRED_MAX, RULE_ID_BYTES_MAX};
use clickgate_proto::control_files::{self, RuntimeOverrides};
use clickgate_proto::record::{RULES_PER_RECORD_MAX, RULE_ID_BYTES_MAX as RECORD_RULE_ID_MAX};

use crate::metrics::CoreMetrics;

/// How often each core looks for a new rule set or runtime settings.
pub const RULES_POLL_MS: u64 = 200;
const _: () = assert!(RULES_POLL_MS < 1000, "a push must apply within 1 s");
// What a decision carries always fits the raw record.
const _: () = assert!(FIRED_MAX <= RULES_PER_RECORD_MAX);
const _: () = assert!(RULE_ID_BYTES_MAX <= RECORD_RULE_ID_MAX);

/// A compiled rule set and, per rule, this core's metric label slot.
pub struct ActiveRules {
    pub rules: CompiledRules,
    pub slots: Vec<u16>,
    /// This core's user-agent facts under these rules (the gate's text scans, once per
    /// distinct user agent; [`UaCache::memory_bytes`] per core).
    pub ua_cache: RefCell<UaCache>,
}

impl ActiveRules {
    /// Labels the rules in `m` and notes the set as loaded there.
    pub fn new(rules: CompiledRules, m: &CoreMetrics) -> ActiveRules {
        let slots = rules.rule_ids().iter().map(|id| m.fraud_slot(id)).collect();
        m.rules_loaded(rules.version(), rules.len() as u64);
        ActiveRules {
            rules,
            slots,
            ua_cache: RefCell::new(UaCache::new()),
        }
    }
}

/// What identifies one version of a file on disk: a rename gives a new inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let md = std::fs::metadata(path).ok()?;
    Some(Stamp {
        ino: md.ino(),
        len: md.len(),
        mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
    })
}

/// The hot-applicable runtime settings a core has in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HotSettings {
    pub rate_limit_events_per_sec: u32,
    pub trusted_cidrs: Vec<String>,
}

/// One core's fraud-gate state.
pub(crate) struct CoreRules {
    data_dir: PathBuf,
    active: RefCell<Rc<ActiveRules>>,
    rules_seen: Cell<Option<Stamp>>,
    runtime_seen: Cell<Option<Stamp>>,
    runtime_version: Cell<u64>,
}

impl CoreRules {
    /// Loads the rule set on disk (synchronously: start-up only). A missing file is the
    /// empty set; an unreadable one is logged, counted, and also the empty set, so that
    /// ingest starts whatever the state of the rules.
    pub fn load(data_dir: &Path, m: &CoreMetrics) -> CoreRules {
        let path = control_files::rules_path(data_dir);
        let seen = stamp(&path);
        let rules = match load_rules(data_dir) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "fraud rules not loaded at start; judging with no rules");
                m.rules_reload_failed();
                CompiledRules::empty()
            }
        };
        CoreRules {
            data_dir: data_dir.to_path_buf(),
            active: RefCell::new(Rc::new(ActiveRules::new(rules, m))),
            rules_seen: Cell::new(seen),
            runtime_seen: Cell::new(stamp(&control_files::runtime_path(data_dir))),
            runtime_version: Cell::new(0),
        }
    }

    /// The snapshot a request is judged with, whole.
    #[inline]
    pub fn snapshot(&self) -> Rc<ActiveRules> {
        self.active.borrow().clone()
    }

    pub fn set_runtime_version(&self, v: u64) {
        self.runtime_version.set(v);
    }

    /// Swaps in the rule set on disk if it changed since the last look.
    pub async fn poll_rules(&self, core: usize, m: &CoreMetrics) {
        let path = control_files::rules_path(&self.data_dir);
        let now = stamp(&path);
        if now == self.rules_seen.get() {
            return;
        }
        self.rules_seen.set(now);
        let dir = self.data_dir.clone();
        let loaded = glommio::executor()
            .spawn_blocking(move || load_rules(&dir))
            .await;
        match loaded {
            Ok(rules) => {
                let old = self.snapshot().rules.version();
                if rules.version() == old && now.is_some() {
                    return;
                }
                tracing::info!(
                    core,
                    version = rules.version(),
                    previous = old,
                    rules = rules.len(),
                    "fraud rules swapped in"
                );
                *self.active.borrow_mut() = Rc::new(ActiveRules::new(rules, m));
            }
            Err(e) => {
                m.rules_reload_failed();
                tracing::error!(core, error = %e, "fraud rules not reloaded; the previous set stays in force");
            }
        }
    }

    /// Reads the runtime overrides if they changed; `Some` with the new ones.
    pub fn poll_runtime(&self, core: usize, m: &CoreMetrics) -> Option<RuntimeOverrides> {
        let path = control_files::runtime_path(&self.data_dir);
        let now = stamp(&path);
        if now == self.runtime_seen.get() {
            return None;
        }
        self.runtime_seen.set(now);
        match control_files::read_runtime(&self.data_dir) {
            Ok(o) => {
                let o = o.unwrap_or_default();
                if o.version == self.runtime_version.get() {
                    return None;
                }
                self.runtime_version.set(o.version);
                m.set_runtime_config_version(o.version);
                tracing::info!(core, version = o.version, "runtime settings changed");
                Some(o)
            }
            Err(e) => {
                m.rules_reload_failed();
                tracing::error!(core, error = %e, "runtime settings not reloaded; the previous ones stay in force");
                None
            }
        }
    }
}

fn load_rules(data_dir: &Path) -> Result<CompiledRules, String> {
    match control_files::read_rules(data_dir) {
        Ok(None) => Ok(CompiledRules::empty()),
        Ok(Some(set)) => set.compile().map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The hot settings given the process settings and the overrides.
pub(crate) fn hot_settings(
    rate_limit_events_per_sec: u32,
    trusted_cidrs: &[String],
    o: &RuntimeOverrides,
) -> HotSettings {
    HotSettings {
        rate_limit_events_per_sec: o
            .rate_limit_events_per_sec
            .unwrap_or(rate_limit_events_per_sec),
        trusted_cidrs: o
            .trusted_cidrs
            .clone()
            .unwrap_or_else(|| trusted_cidrs.to_vec()),
    }
}

/// Parses trusted CIDRs already validated by the controlplane; None (logged) if not.
pub(crate) fn trusted_set(cidrs: &[String]) -> Option<CidrSet> {
    match CidrSet::parse_list(cidrs) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "trusted CIDRs override refused");
            None
        }
    }
}

/// The poll period as a Duration.
pub(crate) fn poll_interval() -> Duration {
    Duration::from_millis(RULES_POLL_MS)
}
