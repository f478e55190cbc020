//! `clickgate billing --day D`: the archive's exact replay into invoices.
//!
//! ```text
//! archive hours [D - margin, D + 1 day + margin), footers read once
//!   ─A─▶ parallel decode of (file, row group) units, 7 columns:
//!        KeyRec {event_id, recv_ts, source, lsn, file, row, ts, ip, campaign}
//!        sorted runs by (event_id, recv_ts, source, lsn)
//!   ─B─▶ k-way merge (in memory: one sorted vector cut between event ids, every
//!        thread a chunk): the first copy of each event_id wins; winners with ts in D
//!        ─▶ WinRec {ip, minute, file, row, campaign}, sorted runs by (ip, minute)
//!   ─C─▶ k-way merge (in memory: cut between IPs, every thread a chunk): per ip,
//!        clicks per UTC minute (and distinct campaigns for the batch check)
//!        ─▶ per (file, row) the minute's count (with --model also the IP's day
//!        clicks and distinct campaigns, a second word per row)
//!   ─D─▶ parallel decode of each file's rule columns; every winner of the day:
//!        ip_rate rules on the exact count, CompiledRules::evaluate_static (the
//!        stream's code) with it, the batch check, with --model the model's score
//!        over core::fraud::features::vector; the rest is billable
//!   ─▶ invoices.csv, adjustments.csv (batch checks or model on), reconciliation.csv
//! ```
//!
//! Memory: the day is held in memory as fixed-size records (≈ 164 B per row read, see
//! [`MEM_ROW_BYTES`]) when that fits `memory_bytes`, each pass's records sorted by
//! hash bucket of their group key, then by record ([`runs::group_sort`]: a group's
//! records are together and in order, which is all a pass reads); otherwise every pass writes sorted
//! runs of a size the setting allows to a spill directory and merges them (one 64 KiB
//! read buffer per run). Either way peak memory stays under `memory_bytes`, whatever the
//! archive's size; one IP's deduplicated clicks of the day are held together in pass C
//! (48 B each), the one thing that grows with the input rather than the setting.
//!
//! Exactness and determinism: dedup keeps the earliest received copy, ties broken by
//! (source, lsn), which are unique (then file and row, for a damaged archive holding
//! a file twice); the neighbouring `margin_hours` are read so a copy whose `ts` was
//! altered across the day boundary still competes. Outputs are sorted, or in archive
//! file and row order (adjustments), written to a temporary name and renamed: two runs
//! give the same bytes, whatever the memory setting or thread count.

pub mod fetch;
pub mod history;
pub mod runs;
pub mod scan;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::{BufWriter, IsTerminal, Write};
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, TimestampMillisecondType, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use clickgate_core::agg::Dim;
use clickgate_core::fraud::features::{self, IpDay, IpPast, UaTraits};
use clickgate_core::fraud::{CompiledRules, RuleSet, UaFacts};
use clickgate_core::gbt::{GbtModel, Link};
use clickgate_core::hash::mix64;
use clickgate_core::parse::parse_ip;
use clickgate_core::window::Window;
use clickgate_core::{Click, Device, EventId};

use crate::archive::{partition_files, partition_path, Date, DAY_MS};
use crate::durable::Durable;
use crate::store::Store;
use crate::ControlplaneConfig;
use history::{History, HistoryConfig, IpKey, Reputation};
use runs::{Fixed, Merge, Run, RunSet};
use scan::ArchiveFile;

const HOUR_MS: u64 = 3_600_000;
const MINUTE_MS: u64 = 60_000;
/// The archive hours billing `day` reads: `[day - margin, day + 1 day + margin)`, as the
/// start of each hour in ms.
pub(crate) fn billed_hours(day: Date, margin_hours: u32) -> impl Iterator<Item = u64> {
    let margin = u64::from(margin_hours) * HOUR_MS;
    let start = day.start_ms();
    (start.saturating_sub(margin)..start + DAY_MS + margin).step_by(HOUR_MS as usize)
}

/// Largest `margin_hours`.
pub const MARGIN_HOURS_MAX: u32 = 48;
/// Memory per row read when the whole day is held in memory: two [`KeyRec`]s (the
/// records and the buffer [`runs::group_sort`] scatters them into; later a record and
/// a [`WinRec`], or two `WinRec`s) and the row's count (4 B).
pub const MEM_ROW_BYTES: u64 = (2 * std::mem::size_of::<KeyRec>() + 4) as u64;
/// Memory billing needs besides its records: the binary, per-thread Parquet decoding
/// (one column page and one 8192-row batch per column) and the output maps (measured,
/// bench/BILLING.md).
pub const BASE_BYTES: u64 = 48 << 20;
/// Per decoding thread.
pub const THREAD_BYTES: u64 = 24 << 20;
/// Memory of the real-time counters per byte of their files (snapshot and WAL), the
/// file's bytes read included; only the day's `all` counters are kept: measured 1.05
/// (a 149 MB snapshot: 147 MB), planned at 2.
pub const STORE_BYTES_PER_DISK_BYTE: u64 = 2;
/// Smallest memory setting.
pub const MEMORY_MIN_BYTES: u64 = 128 << 20;
/// An invoice: (advertiser_id, campaign_id) → (clicks, cost_micros).
pub type Invoice = BTreeMap<(u64, u64), (u64, u64)>;
/// Distinct `source` values an archive may hold (clickgate writes one per core).
const SOURCES_MAX: usize = 1 << 16;
/// Bit of a row's count word: its IP clicked too many campaigns (batch check).
const MANY_CAMPAIGNS: u32 = 1 << 31;
/// `--model-threshold` when not given.
pub const MODEL_THRESHOLD_DEFAULT: f64 = 0.5;
/// Largest model file read (`--model`).
pub const MODEL_BYTES_MAX: u64 = 256 << 20;
/// Memory per row read for the model's per-IP day words (in memory and in flight).
const MODEL_ROW_BYTES: u64 = 8;

#[derive(Clone, Debug)]
pub struct BillingConfig {
    pub day: Date,
    /// The archive directory.
    pub archive_dir: PathBuf,
    /// The box's data directory: `rules/current.json` and the counter store (`store/`).
    pub data_dir: PathBuf,
    pub out_dir: PathBuf,
    /// Rules to apply instead of the box's current set.
    pub rules_file: Option<PathBuf>,
    /// Batch-only checks (opt-in): an IP clicking more than `ip_campaigns_max` distinct
    /// campaigns in the day has all its otherwise billable clicks removed.
    pub batch_checks: bool,
    pub ip_campaigns_max: u32,
    /// Hours read on each side of the day for dedup, 0..=48.
    pub margin_hours: u32,
    /// Peak memory, at most, in bytes (at least [`MEMORY_MIN_BYTES`]).
    pub memory_bytes: u64,
    /// Decoding and sorting threads.
    pub threads: usize,
    /// Records per sorted run, forcing the spilled plan (tests, diagnostics); `None`:
    /// planned from `memory_bytes`.
    pub run_rows: Option<usize>,
    /// Another engine's invoices.csv to compare with (written to engines.csv).
    pub compare_invoices: Option<PathBuf>,
    /// Draw a progress line on stderr.
    pub progress: bool,
    /// An XGBoost JSON model (docs/model.md): every click the rules keep is scored and
    /// removed when its score is at least `model_threshold`.
    pub model: Option<PathBuf>,
    /// 0..=1; a click with `score >= model_threshold` is removed.
    pub model_threshold: f64,
    /// Writes every scored click's feature vector and score here (diagnostics, tests).
    pub dump_features: Option<PathBuf>,
    /// Keep the per-IP history across days ([`history`]): read `history.from`, write
    /// `ip_history.csv` next to the invoices.
    pub ip_history: bool,
    pub history: HistoryConfig,
    /// The reputation rule (needs `ip_history`).
    pub reputation: Option<Reputation>,
}

impl BillingConfig {
    pub fn new(day: Date, archive_dir: PathBuf, data_dir: PathBuf, out_dir: PathBuf) -> Self {
        BillingConfig {
            day,
            archive_dir,
            data_dir,
            out_dir,
            rules_file: None,
            batch_checks: false,
            ip_campaigns_max: 20,
            margin_hours: 1,
            memory_bytes: 1 << 30,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            run_rows: None,
            compare_invoices: None,
            progress: std::io::stderr().is_terminal(),
            model: None,
            model_threshold: MODEL_THRESHOLD_DEFAULT,
            dump_features: None,
            ip_history: false,
            history: HistoryConfig::default(),
            reputation: None,
        }
    }
}
/// A failure: bad input (exit 2, names the argument) or a runtime failure (exit 1).
#[derive(Debug)]
pub enum BillingError {
    BadInput(String),
    Failed(anyhow::Error),
}

impl BillingError {
    pub fn exit_code(&self) -> u8 {
        match self {
            BillingError::BadInput(_) => 2,
            BillingError::Failed(_) => 1,
        }
    }
}

impl fmt::Display for BillingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BillingError::BadInput(m) => f.write_str(m),
            BillingError::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<anyhow::Error> for BillingError {
    fn from(e: anyhow::Error) -> Self {
        BillingError::Failed(e)
    }
}

impl From<std::io::Error> for BillingError {
    fn from(e: std::io::Error) -> Self {
        BillingError::Failed(e.into())
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub files: u64,
    /// Rows read, neighbouring hours included.
    pub rows_read: u64,
    /// Rows whose event time is in the day.
    pub rows_in_day: u64,
    /// Copies in the day that lost to an earlier received copy.
    pub duplicates: u64,
    /// Distinct events of the day (after dedup).
    pub events: u64,
    pub fraud: u64,
    pub adjusted: u64,
    pub billable: u64,
    pub cost_micros: u64,
    pub invoice_rows: u64,
    /// Sorted runs written to disk (0: the day fit in memory).
    pub spilled_runs: u64,
    /// Invoice rows that differ from the other engine's (`None`: none given).
    pub engine_diffs: Option<u64>,
    /// The real-time counters were found and compared.
    pub reconciled: bool,
    /// Clicks the model removed (`None`: no model given).
    pub model_removed: Option<u64>,
    /// Clicks the reputation rule removed (`None`: rule off).
    pub reputation_removed: Option<u64>,
    /// The IP history written (`None`: not kept).
    pub history: Option<history::Written>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} files, {} rows read ({} in the day), {} duplicates removed, {} events, \
             {} fraud, {} adjusted, {} billable clicks in {} invoice rows, {} cost_micros{}",
            self.files,
            self.rows_read,
            self.rows_in_day,
            self.duplicates,
            self.events,
            self.fraud,
            self.adjusted,
            self.billable,
            self.invoice_rows,
            self.cost_micros,
            if self.reconciled {
                ""
            } else {
                "; no real-time counters found (reconciliation.csv has empty real-time columns)"
            }
        )?;
        if let Some(n) = self.model_removed {
            write!(f, "; {n} removed by the model (adjustments.csv)")?;
        }
        if let Some(n) = self.reputation_removed {
            write!(f, "; {n} removed by IP reputation (adjustments.csv)")?;
        }
        if let Some(h) = self.history {
            write!(f, "; {} IPs in {}", h.ips, history::FILE_NAME)?;
            if h.dropped > 0 {
                write!(f, " ({} more left out by --ip-history-ips-max)", h.dropped)?;
            }
        }
        if self.spilled_runs > 0 {
            write!(f, "; {} sorted runs spilled", self.spilled_runs)?;
        }
        if let Some(d) = self.engine_diffs {
            write!(
                f,
                "; {d} invoice rows differ from the other engine's (engines.csv)"
            )?;
        }
        Ok(())
    }
}

#[derive(Default, Clone, Copy)]
struct CampaignTotals {
    clicks: u64,
    cost_micros: u64,
}

/// Loads the rule set billing applies: `--rules FILE`, else the box's current one.
pub fn load_rules(cfg: &BillingConfig) -> Result<CompiledRules, BillingError> {
    let set = match &cfg.rules_file {
        Some(path) => {
            let text = fs::read_to_string(path)
                .map_err(|e| BillingError::BadInput(format!("--rules {}: {e}", path.display())))?;
            RuleSet::parse(&text)
                .map_err(|e| BillingError::BadInput(format!("--rules {}: {e}", path.display())))?
        }
        None => match clickgate_proto::control_files::read_rules(&cfg.data_dir) {
            Ok(Some(set)) => set,
            Ok(None) => {
                tracing::warn!(data_dir = %cfg.data_dir.display(), "no rule set on this box: billing applies no fraud rules");
                RuleSet::empty()
            }
            Err(e) => return Err(BillingError::Failed(e.into())),
        },
    };
    CompiledRules::compile(&set).map_err(|e| BillingError::BadInput(format!("rules: {e}")))
}

/// Loads and checks billing's model (`--model`): an XGBoost JSON model of a
/// probability (`binary:logistic`, `reg:logistic`) over the [`features::FEATURES`]
/// features of [`features::vector`], or its first [`features::FEATURES_DAY`] (the
/// ones that need no IP history). Every refusal names the
/// file and the problem (exit 2); it happens before any archive file is read.
pub fn load_model(path: &Path) -> Result<GbtModel, BillingError> {
    let bad = |m: String| BillingError::BadInput(format!("--model {}: {m}", path.display()));
    let len = fs::metadata(path)
        .map_err(|e| bad(format!("cannot read the model file: {e}")))?
        .len();
    if len > MODEL_BYTES_MAX {
        return Err(bad(format!(
            "the model file is {len} bytes, more than the {MODEL_BYTES_MAX} accepted"
        )));
    }
    let text =
        fs::read_to_string(path).map_err(|e| bad(format!("cannot read the model file: {e}")))?;
    let model = GbtModel::from_json(&text).map_err(|e| bad(e.to_string()))?;
    if model.link() != Link::Sigmoid {
        return Err(bad(format!(
            "unsupported objective `{}`: billing needs a probability \
             (binary:logistic or reg:logistic)",
            model.objective()
        )));
    }
    if model.num_feature() != features::FEATURES && model.num_feature() != features::FEATURES_DAY {
        return Err(bad(format!(
            "feature count mismatch: the model has {} features (num_feature), billing's \
             feature vector has {} ({}; docs/model.md), or {} without the IP history ones",
            model.num_feature(),
            features::FEATURES,
            features::FEATURE_NAMES.join(", "),
            features::FEATURES_DAY
        )));
    }
    Ok(model)
}

/// One row read (pass A): what dedup needs, ordered by the dedup key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRec {
    id: u128,
    recv: u64,
    /// Rank of the row's `source` among the archive's sources (their byte order).
    src: u32,
    lsn: u64,
    file: u32,
    row: u32,
    ts: u64,
    ip_v6: bool,
    ip: u128,
    campaign: u64,
}

impl Fixed for KeyRec {
    const BYTES: usize = 16 + 8 + 4 + 8 + 4 + 4 + 8 + 1 + 16 + 8;
    fn group(&self) -> u64 {
        mix64(self.id as u64 ^ mix64((self.id >> 64) as u64))
    }
    fn put(&self, o: &mut [u8]) {
        o[0..16].copy_from_slice(&self.id.to_le_bytes());
        o[16..24].copy_from_slice(&self.recv.to_le_bytes());
        o[24..28].copy_from_slice(&self.src.to_le_bytes());
        o[28..36].copy_from_slice(&self.lsn.to_le_bytes());
        o[36..40].copy_from_slice(&self.file.to_le_bytes());
        o[40..44].copy_from_slice(&self.row.to_le_bytes());
        o[44..52].copy_from_slice(&self.ts.to_le_bytes());
        o[52] = self.ip_v6 as u8;
        o[53..69].copy_from_slice(&self.ip.to_le_bytes());
        o[69..77].copy_from_slice(&self.campaign.to_le_bytes());
    }
    fn get(b: &[u8]) -> KeyRec {
        KeyRec {
            id: u128::from_le_bytes(b[0..16].try_into().expect("16")),
            recv: u64::from_le_bytes(b[16..24].try_into().expect("8")),
            src: u32::from_le_bytes(b[24..28].try_into().expect("4")),
            lsn: u64::from_le_bytes(b[28..36].try_into().expect("8")),
            file: u32::from_le_bytes(b[36..40].try_into().expect("4")),
            row: u32::from_le_bytes(b[40..44].try_into().expect("4")),
            ts: u64::from_le_bytes(b[44..52].try_into().expect("8")),
            ip_v6: b[52] != 0,
            ip: u128::from_le_bytes(b[53..69].try_into().expect("16")),
            campaign: u64::from_le_bytes(b[69..77].try_into().expect("8")),
        }
    }
}

/// One winning copy of the day (pass B), ordered by (ip, minute).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct WinRec {
    ip_v6: bool,
    ip: u128,
    minute: u64,
    file: u32,
    row: u32,
    campaign: u64,
}

impl Fixed for WinRec {
    const BYTES: usize = 1 + 16 + 8 + 4 + 4 + 8;
    fn group(&self) -> u64 {
        mix64(self.ip as u64 ^ mix64((self.ip >> 64) as u64 ^ u64::from(self.ip_v6)))
    }
    fn put(&self, o: &mut [u8]) {
        o[0] = self.ip_v6 as u8;
        o[1..17].copy_from_slice(&self.ip.to_le_bytes());
        o[17..25].copy_from_slice(&self.minute.to_le_bytes());
        o[25..29].copy_from_slice(&self.file.to_le_bytes());
        o[29..33].copy_from_slice(&self.row.to_le_bytes());
        o[33..41].copy_from_slice(&self.campaign.to_le_bytes());
    }
    fn get(b: &[u8]) -> WinRec {
        WinRec {
            ip_v6: b[0] != 0,
            ip: u128::from_le_bytes(b[1..17].try_into().expect("16")),
            minute: u64::from_le_bytes(b[17..25].try_into().expect("8")),
            file: u32::from_le_bytes(b[25..29].try_into().expect("4")),
            row: u32::from_le_bytes(b[29..33].try_into().expect("4")),
            campaign: u64::from_le_bytes(b[33..41].try_into().expect("8")),
        }
    }
}

/// A winner's count word (pass C), ordered by (file, row).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct CountRec {
    file: u32,
    row: u32,
    val: u32,
}

impl Fixed for CountRec {
    const BYTES: usize = 12;
    fn group(&self) -> u64 {
        mix64(u64::from(self.file) << 32 | u64::from(self.row))
    }
    fn put(&self, o: &mut [u8]) {
        o[0..4].copy_from_slice(&self.file.to_le_bytes());
        o[4..8].copy_from_slice(&self.row.to_le_bytes());
        o[8..12].copy_from_slice(&self.val.to_le_bytes());
    }
    fn get(b: &[u8]) -> CountRec {
        CountRec {
            file: u32::from_le_bytes(b[0..4].try_into().expect("4")),
            row: u32::from_le_bytes(b[4..8].try_into().expect("4")),
            val: u32::from_le_bytes(b[8..12].try_into().expect("4")),
        }
    }
}

/// A winner's per-IP day word for the model (pass C, `--model` only): day clicks in
/// the high 32 bits, distinct campaigns in the low; ordered by (file, row).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct ExtRec {
    file: u32,
    row: u32,
    val: u64,
}

impl Fixed for ExtRec {
    const BYTES: usize = 16;
    fn group(&self) -> u64 {
        mix64(u64::from(self.file) << 32 | u64::from(self.row))
    }
    fn put(&self, o: &mut [u8]) {
        o[0..4].copy_from_slice(&self.file.to_le_bytes());
        o[4..8].copy_from_slice(&self.row.to_le_bytes());
        o[8..16].copy_from_slice(&self.val.to_le_bytes());
    }
    fn get(b: &[u8]) -> ExtRec {
        ExtRec {
            file: u32::from_le_bytes(b[0..4].try_into().expect("4")),
            row: u32::from_le_bytes(b[4..8].try_into().expect("4")),
            val: u64::from_le_bytes(b[8..16].try_into().expect("8")),
        }
    }
}

/// A click of the day for the IP history (pass D, `--ip-history` only): its IP and
/// whether billing removed it (the reputation rule aside).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct MarkRec {
    ip: IpKey,
    removed: bool,
}

impl Fixed for MarkRec {
    const BYTES: usize = 18;
    fn group(&self) -> u64 {
        mix64(self.ip.hi ^ self.ip.lo.rotate_left(17) ^ u64::from(self.ip.v6))
    }
    fn put(&self, o: &mut [u8]) {
        o[0] = u8::from(self.ip.v6);
        o[1..9].copy_from_slice(&self.ip.hi.to_le_bytes());
        o[9..17].copy_from_slice(&self.ip.lo.to_le_bytes());
        o[17] = u8::from(self.removed);
    }
    fn get(b: &[u8]) -> MarkRec {
        MarkRec {
            ip: IpKey {
                v6: b[0] != 0,
                hi: u64::from_le_bytes(b[1..9].try_into().expect("8")),
                lo: u64::from_le_bytes(b[9..17].try_into().expect("8")),
            },
            removed: b[17] != 0,
        }
    }
}

/// A record holding one value of one archive row (pass C's outputs).
trait RowWord: Fixed {
    type V: Copy + Default;
    fn file(&self) -> u32;
    fn row(&self) -> u32;
    fn val(&self) -> Self::V;
}

impl RowWord for CountRec {
    type V = u32;
    fn file(&self) -> u32 {
        self.file
    }
    fn row(&self) -> u32 {
        self.row
    }
    fn val(&self) -> u32 {
        self.val
    }
}

impl RowWord for ExtRec {
    type V = u64;
    fn file(&self) -> u32 {
        self.file
    }
    fn row(&self) -> u32 {
        self.row
    }
    fn val(&self) -> u64 {
        self.val
    }
}

/// File `f`'s values (`rows` of them, default where none), taken from a merge in
/// (file, row) order; `carry` holds the first record of the next file between calls.
fn gather<R: RowWord>(
    m: &mut Merge<'_, R>,
    carry: &mut Option<R>,
    f: usize,
    rows: usize,
) -> std::io::Result<Vec<R::V>> {
    let mut v = vec![R::V::default(); rows];
    loop {
        let r = match carry.take() {
            Some(r) => Some(r),
            None => m.pop()?,
        };
        match r {
            Some(r) if r.file() as usize == f => v[r.row() as usize] = r.val(),
            Some(r) => {
                *carry = Some(r);
                break;
            }
            None => break,
        }
    }
    Ok(v)
}

/// The per-IP day word of the model: day clicks (high 32 bits), distinct campaigns.
fn ip_day_word(clicks: usize, campaigns: usize) -> u64 {
    (clicks.min(u32::MAX as usize) as u64) << 32 | campaigns.min(u32::MAX as usize) as u64
}

/// The IP as (is v6, 128-bit value), ordered as its bytes (v4 in the top 32 bits).
fn ip_parts(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(a)) << 96),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

/// Bills one day. See the module docs.
pub fn run(cfg: &BillingConfig) -> Result<Summary, BillingError> {
    if cfg.margin_hours > MARGIN_HOURS_MAX {
        return Err(BillingError::BadInput(format!(
            "--margin-hours must be at most {MARGIN_HOURS_MAX}, got {}",
            cfg.margin_hours
        )));
    }
    if cfg.memory_bytes < MEMORY_MIN_BYTES {
        return Err(BillingError::BadInput(format!(
            "--memory-mib must be at least {}, got {}",
            MEMORY_MIN_BYTES >> 20,
            cfg.memory_bytes >> 20
        )));
    }
    if cfg.threads == 0 || cfg.threads > 256 {
        return Err(BillingError::BadInput(format!(
            "--threads must be between 1 and 256, got {}",
            cfg.threads
        )));
    }
    if !(0.0..=1.0).contains(&cfg.model_threshold) {
        return Err(BillingError::BadInput(format!(
            "--model-threshold must be between 0 and 1, got {}",
            cfg.model_threshold
        )));
    }
    let model = match &cfg.model {
        Some(p) => Some(load_model(p)?),
        None => None,
    };
    if cfg.dump_features.is_some() && model.is_none() {
        return Err(BillingError::BadInput(
            "--dump-features needs --model".into(),
        ));
    }
    let past = history_of(cfg, model.as_ref())?;
    if !cfg.archive_dir.is_dir() {
        return Err(BillingError::BadInput(format!(
            "--archive-url: {} is not a directory",
            cfg.archive_dir.display()
        )));
    }
    let other = match &cfg.compare_invoices {
        Some(p) => Some(read_invoices(p).map_err(|e| {
            BillingError::BadInput(format!("--compare-invoices {}: {e}", p.display()))
        })?),
        None => None,
    };
    let rules = load_rules(cfg)?;
    fs::create_dir_all(&cfg.out_dir)
        .map_err(|e| BillingError::BadInput(format!("--out {}: {e}", cfg.out_dir.display())))?;
    let mut paths = Vec::new();
    for hour in billed_hours(cfg.day, cfg.margin_hours) {
        let dir = cfg.archive_dir.join(partition_path(hour));
        if dir.is_dir() {
            paths.extend(
                partition_files(&dir).with_context(|| format!("listing {}", dir.display()))?,
            );
        }
    }
    if paths.len() > u32::MAX as usize {
        return Err(BillingError::BadInput(format!(
            "{} archive files for one day; at most {}",
            paths.len(),
            u32::MAX
        )));
    }
    let files = scan::parallel(
        cfg.threads,
        paths.len(),
        Vec::new,
        |out: &mut Vec<(usize, ArchiveFile)>, i| {
            out.push((i, ArchiveFile::open(&paths[i])?));
            Ok(())
        },
    )?;
    let mut files: Vec<(usize, ArchiveFile)> = files.into_iter().flatten().collect();
    files.sort_by_key(|(i, _)| *i);
    let files: Vec<ArchiveFile> = files.into_iter().map(|(_, f)| f).collect();

    let spill_dir = cfg.out_dir.join(".billing-spill");
    if spill_dir.exists() {
        fs::remove_dir_all(&spill_dir)?;
    }
    let mut sum = Summary {
        files: files.len() as u64,
        ..Summary::default()
    };
    let result = bill(
        cfg,
        &rules,
        model.as_ref(),
        past,
        &files,
        &spill_dir,
        other.as_ref(),
        &mut sum,
    );
    let _ = fs::remove_dir_all(&spill_dir);
    result?;
    Ok(sum)
}

/// adjustments.csv is written (and event ids decoded for it).
fn adjusting(cfg: &BillingConfig) -> bool {
    cfg.batch_checks || cfg.model.is_some() || cfg.reputation.is_some()
}

/// Checks the history and reputation settings and reads the previous history (before
/// any archive file); `None` when no history is kept.
fn history_of(
    cfg: &BillingConfig,
    model: Option<&GbtModel>,
) -> Result<Option<History>, BillingError> {
    let bad = |m: String| Err(BillingError::BadInput(m));
    let h = &cfg.history;
    if !cfg.ip_history {
        if h.from.is_some() {
            return bad("--ip-history-from needs --ip-history".into());
        }
        if cfg.reputation.is_some() {
            return bad(
                "--reputation-share needs --ip-history (the rule reads the IP history)".into(),
            );
        }
        if model.is_some_and(|m| m.num_feature() == features::FEATURES) {
            return bad(format!(
                "--model: the model reads the IP history features ({} features); give \
                 --ip-history (and --ip-history-from, the previous day's {})",
                features::FEATURES,
                history::FILE_NAME
            ));
        }
        return Ok(None);
    }
    if !(1..=history::DAYS_MAX).contains(&h.days) {
        return bad(format!(
            "--ip-history-days must be between 1 and {}, got {}",
            history::DAYS_MAX,
            h.days
        ));
    }
    if !(1..=history::IPS_MAX_MAX).contains(&h.ips_max) {
        return bad(format!(
            "--ip-history-ips-max must be between 1 and {}, got {}",
            history::IPS_MAX_MAX,
            h.ips_max
        ));
    }
    if let Some(r) = cfg.reputation {
        if !(r.share >= 0.0 && r.share < 1.0) {
            return bad(format!(
                "--reputation-share must be at least 0 and below 1, got {}",
                r.share
            ));
        }
        if r.min_clicks == 0 {
            return bad("--reputation-min-clicks must be at least 1".into());
        }
    }
    History::load(h, cfg.day)
        .map(Some)
        .map_err(|e| BillingError::BadInput(format!("--ip-history-from {e}")))
}

/// How the passes hold their records.
struct Plan {
    /// `None`: everything in memory.
    spill: Option<PathBuf>,
    /// Records of the largest kind ([`KeyRec`]) one pass may buffer, in all.
    run_recs: usize,
}

fn plan(
    cfg: &BillingConfig,
    files: &[ArchiveFile],
    past: Option<&History>,
    spill_dir: &Path,
) -> Result<Plan, BillingError> {
    let rows: u64 = files.iter().map(|f| f.rows).sum();
    let largest_file = files.iter().map(|f| f.rows).max().unwrap_or(0);
    // The model's per-IP day words, beside the count words.
    let model_row = if cfg.model.is_some() {
        MODEL_ROW_BYTES
    } else {
        0
    };
    // The IP history: what was read, held throughout, and the next one made at the
    // end (at most prune_at(ips_max) IPs); each click's mark of pass D is in flight
    // with its file (the marks themselves go where the records were).
    let (history_bytes, mark_row) = match past {
        None => (0, 0),
        Some(p) => {
            let h = &cfg.history;
            let ips = (history::prune_at(h.ips_max) as u64).min(p.len() as u64 + rows);
            let next = ips * (history::IP_BYTES + u64::from(h.days) * history::DAY_BYTES);
            (p.bytes() + next, std::mem::size_of::<MarkRec>() as u64)
        }
    };
    // Count words of the files in flight in pass D (queued, decoding, finished).
    let in_flight = (2 * cfg.threads as u64 + 1) * largest_file * (4 + model_row + mark_row);
    // The real-time counters, read beside the passes.
    let store = STORE_BYTES_PER_DISK_BYTE * store_disk_bytes(&cfg.data_dir);
    let fixed = BASE_BYTES + cfg.threads as u64 * THREAD_BYTES + in_flight + store + history_bytes;
    let Some(budget) = cfg
        .memory_bytes
        .checked_sub(fixed)
        .filter(|b| *b >= 16 << 20)
    else {
        return Err(BillingError::BadInput(format!(
            "--memory-mib {} is too small for this archive: {} MiB go to decoding {} \
             threads, the largest file's {largest_file} rows, the real-time counters \
             ({} MiB) and the IP history ({} MiB)",
            cfg.memory_bytes >> 20,
            fixed >> 20,
            cfg.threads,
            store >> 20,
            history_bytes >> 20
        )));
    };
    if let Some(n) = cfg.run_rows {
        fs::create_dir_all(spill_dir)?;
        return Ok(Plan {
            spill: Some(spill_dir.to_path_buf()),
            run_recs: n.max(1),
        });
    }
    if rows.saturating_mul(MEM_ROW_BYTES + model_row) <= budget {
        return Ok(Plan {
            spill: None,
            run_recs: rows as usize,
        });
    }
    // Spill: 7/8 of the budget for a pass's buffer, 1/8 for the merge's read buffers.
    let run_recs = (budget / 8 * 7 / std::mem::size_of::<KeyRec>() as u64) as usize;
    let runs_max = budget / 8 / runs::RUN_READ_BUFFER_BYTES as u64;
    // Pass A writes the most runs: each thread one per run_recs / threads records.
    let runs = rows.div_ceil((run_recs / cfg.threads).max(1) as u64) + cfg.threads as u64;
    if runs > runs_max {
        return Err(BillingError::BadInput(format!(
            "--memory-mib {}: {rows} rows need {runs} sorted runs, more than the {runs_max} \
             the setting can merge; raise --memory-mib",
            cfg.memory_bytes >> 20
        )));
    }
    fs::create_dir_all(spill_dir)?;
    Ok(Plan {
        spill: Some(spill_dir.to_path_buf()),
        run_recs,
    })
}

/// The distinct `source` values of the archive, in byte order (their rank is the
/// dedup tie-break). Row-group statistics give them for files written by clickgate
/// (one source per file); any other row group is decoded.
fn sources(cfg: &BillingConfig, files: &[ArchiveFile]) -> anyhow::Result<Vec<String>> {
    let found = scan::parallel(
        cfg.threads,
        files.len(),
        std::collections::BTreeSet::new,
        |set: &mut std::collections::BTreeSet<String>, i| {
            let f = &files[i];
            for g in 0..f.groups.len() {
                if let Some(s) = f.single_source(g) {
                    set.insert(s);
                    continue;
                }
                f.read(Some(g), &["source"], |b, _| {
                    let col = b.column(0).as_string::<i32>();
                    let mut last = "";
                    for i in 0..col.len() {
                        let s = col.value(i);
                        if s != last || i == 0 {
                            set.insert(s.to_string());
                            last = s;
                        }
                    }
                    if set.len() > SOURCES_MAX {
                        anyhow::bail!(
                            "{}: more than {SOURCES_MAX} distinct sources in the archive \
                             (clickgate writes one per dataplane core)",
                            f.path.display()
                        );
                    }
                    Ok(())
                })?;
            }
            Ok(())
        },
    )?;
    let mut all = std::collections::BTreeSet::new();
    for s in found {
        all.extend(s);
    }
    Ok(all.into_iter().collect())
}

/// Counters shared by the threads of a pass.
#[derive(Default)]
struct Counters {
    rows_read: AtomicU64,
    rows_in_day: AtomicU64,
}

#[allow(clippy::too_many_arguments)]
fn bill(
    cfg: &BillingConfig,
    rules: &CompiledRules,
    model: Option<&GbtModel>,
    past: Option<History>,
    files: &[ArchiveFile],
    spill_dir: &Path,
    other: Option<&Invoice>,
    sum: &mut Summary,
) -> Result<(), BillingError> {
    let day_start = cfg.day.start_ms();
    let in_day = |ts: u64| ts >= day_start && ts < day_start + DAY_MS;
    let plan = plan(cfg, files, past.as_ref(), spill_dir)?;
    // The real-time counters (for reconciliation.csv) are read beside the passes: a
    // replay of the store's WAL, independent of the archive.
    let data_dir = cfg.data_dir.clone();
    let realtime = std::thread::Builder::new()
        .name("billing-store".into())
        .spawn(move || load_realtime(&data_dir, day_start))?;
    let progress = Mutex::new(Progress::new(cfg.progress, cfg.day));
    let total_rows: u64 = files.iter().map(|f| f.rows).sum();
    let sources = sources(cfg, files)?;
    let units: Vec<(usize, usize)> = files
        .iter()
        .enumerate()
        .flat_map(|(f, af)| (0..af.groups.len()).map(move |g| (f, g)))
        .collect();
    let counters = Counters::default();

    // Pass A: decode the dedup columns of every row into sorted runs.
    let key_cols = [
        "event_id",
        "ts",
        "recv_ts",
        "source",
        "lsn",
        "ip",
        "campaign_id",
    ];
    let decode_keys = |f: usize,
                       g: usize,
                       out: &mut dyn FnMut(KeyRec) -> anyhow::Result<()>|
     -> anyhow::Result<()> {
        let af = &files[f];
        let mut rows = 0u64;
        let mut in_day_rows = 0u64;
        af.read(Some(g), &key_cols, |b, at| {
            let id = b.column(0).as_string::<i32>();
            let ts = b.column(1).as_primitive::<TimestampMillisecondType>();
            let recv = b.column(2).as_primitive::<TimestampMillisecondType>();
            let source = b.column(3).as_string::<i32>();
            let lsn = b.column(4).as_primitive::<UInt64Type>();
            let ip = b.column(5).as_string::<i32>();
            let campaign = b.column(6).as_primitive::<UInt64Type>();
            let (mut last_src, mut last_rank) = ("", 0u32);
            for i in 0..b.num_rows() {
                let bad = |what: &str| {
                    anyhow::anyhow!("{}: row {}: bad {what}", af.path.display(), at + i as u64)
                };
                let eid = EventId::parse(id.value(i)).ok_or_else(|| bad("event_id"))?;
                let s = source.value(i);
                if s != last_src || i == 0 {
                    last_rank = sources
                        .binary_search_by(|x| x.as_str().cmp(s))
                        .map_err(|_| bad("source (not seen by the source scan)"))?
                        as u32;
                    last_src = s;
                }
                let addr = parse_ip(ip.value(i)).ok_or_else(|| bad("ip"))?;
                let (ip_v6, ipv) = ip_parts(addr);
                let t = ts.value(i).max(0) as u64;
                rows += 1;
                in_day_rows += u64::from(in_day(t));
                out(KeyRec {
                    id: u128::from_be_bytes(eid.0),
                    recv: recv.value(i).max(0) as u64,
                    src: last_rank,
                    lsn: lsn.value(i),
                    file: f as u32,
                    row: (at + i as u64) as u32,
                    ts: t,
                    ip_v6,
                    ip: ipv,
                    campaign: campaign.value(i),
                })?;
            }
            Ok(())
        })?;
        counters.rows_read.fetch_add(rows, Ordering::Relaxed);
        counters
            .rows_in_day
            .fetch_add(in_day_rows, Ordering::Relaxed);
        let done = counters.rows_read.load(Ordering::Relaxed);
        progress
            .lock()
            .expect("not poisoned")
            .tick("read", done, total_rows);
        Ok(())
    };
    let (key_mem, key_runs): (Vec<KeyRec>, Vec<Run>) = match &plan.spill {
        None => {
            // One vector of exactly the rows read; each unit fills its own slice (the
            // pages are first touched, and zeroed by the kernel, by the decoding
            // threads, in parallel).
            let mut all: Vec<KeyRec> = Vec::with_capacity(plan.run_recs);
            {
                let mut slots: Vec<Mutex<Option<&mut [MaybeUninit<KeyRec>]>>> = Vec::new();
                let mut rest = &mut all.spare_capacity_mut()[..plan.run_recs];
                for &(f, g) in &units {
                    let (a, b) = rest.split_at_mut(files[f].groups[g] as usize);
                    slots.push(Mutex::new(Some(a)));
                    rest = b;
                }
                scan::parallel(
                    cfg.threads,
                    units.len(),
                    || (),
                    |_, u| {
                        let slot = slots[u].lock().expect("not poisoned").take().expect("once");
                        let mut k = 0;
                        let (f, g) = units[u];
                        decode_keys(f, g, &mut |r| {
                            slot.get_mut(k)
                                .ok_or_else(|| anyhow::anyhow!("too many rows"))?
                                .write(r);
                            k += 1;
                            Ok(())
                        })?;
                        anyhow::ensure!(k == slot.len(), "row group decoded short");
                        Ok(())
                    },
                )?;
            }
            // SAFETY: the units' slices tile the first `run_recs` slots and every unit
            // returned Ok having written each slot of its slice (checked above).
            unsafe { all.set_len(plan.run_recs) };
            runs::group_sort(&mut all, cfg.threads);
            let run = Run::Mem {
                start: 0,
                len: all.len(),
            };
            (all, vec![run])
        }
        Some(dir) => {
            let per = (plan.run_recs / cfg.threads).max(1);
            let worker = AtomicU64::new(0);
            let sets = scan::parallel(
                cfg.threads,
                units.len(),
                || {
                    let w = worker.fetch_add(1, Ordering::Relaxed);
                    RunSet::<KeyRec>::new(per, Some((dir.clone(), format!("key-{w}"))), 1)
                },
                |set, u| {
                    let (f, g) = units[u];
                    decode_keys(f, g, &mut |r| Ok(set.push(r)?))
                },
            )?;
            let mut all = Vec::new();
            for s in sets {
                all.extend(s.finish()?.1);
            }
            (Vec::new(), all)
        }
    };
    sum.rows_read = counters.rows_read.load(Ordering::Relaxed);
    sum.rows_in_day = counters.rows_in_day.load(Ordering::Relaxed);
    sum.spilled_runs += key_runs
        .iter()
        .filter(|r| matches!(r, Run::File { .. }))
        .count() as u64;

    // Pass B: the first copy of each event id wins; the day's winners by (ip, minute).
    let (win_mem, win_runs) = if plan.spill.is_none() {
        // In memory: the sorted keys are cut between event ids and deduplicated on
        // every thread at once.
        let (mut wins, dups) = dedup_in_memory(&key_mem, cfg.threads, &in_day);
        sum.duplicates += dups;
        drop(key_mem);
        runs::group_sort(&mut wins, cfg.threads);
        let len = wins.len();
        (wins, vec![Run::Mem { start: 0, len }])
    } else {
        let win_spill = plan.spill.as_ref().map(|d| (d.clone(), "win".to_string()));
        let win_cap = plan.run_recs * std::mem::size_of::<KeyRec>() / std::mem::size_of::<WinRec>();
        let mut wins = RunSet::<WinRec>::new(win_cap, win_spill, cfg.threads);
        {
            let mut m = Merge::new(&key_mem, &key_runs)?;
            let mut cur: Option<KeyRec> = None;
            let mut n = 0u64;
            let emit = |w: KeyRec, wins: &mut RunSet<WinRec>| -> std::io::Result<()> {
                if in_day(w.ts) {
                    wins.push(WinRec {
                        ip_v6: w.ip_v6,
                        ip: w.ip,
                        minute: w.ts / MINUTE_MS,
                        file: w.file,
                        row: w.row,
                        campaign: w.campaign,
                    })?;
                }
                Ok(())
            };
            while let Some(r) = m.pop()? {
                n += 1;
                if n.is_multiple_of(1 << 20) {
                    progress
                        .lock()
                        .expect("not poisoned")
                        .tick("dedup", n, sum.rows_read);
                }
                match cur {
                    Some(w) if w.id == r.id => {
                        if in_day(r.ts) {
                            sum.duplicates += 1;
                        }
                    }
                    _ => {
                        if let Some(w) = cur.take() {
                            emit(w, &mut wins)?;
                        }
                        cur = Some(r);
                    }
                }
            }
            if let Some(w) = cur {
                emit(w, &mut wins)?;
            }
        }
        drop(key_mem);
        wins.finish()?
    };
    sum.spilled_runs += win_runs
        .iter()
        .filter(|r| matches!(r, Run::File { .. }))
        .count() as u64;

    // Pass C: per ip, the exact count of each minute (and its distinct campaigns).
    enum Counts {
        Direct(Vec<Vec<u32>>, Option<Vec<Vec<u64>>>),
        Runs(RunSet<CountRec>, Option<RunSet<ExtRec>>),
    }
    let many_max = cfg.batch_checks.then_some(cfg.ip_campaigns_max);
    let ip_day = model.is_some();
    let counts = match &plan.spill {
        None => {
            // In memory: cut between IPs, every thread at once, each count word
            // written once.
            let (direct, ext, events) =
                count_in_memory(&win_mem, files, cfg.threads, many_max, ip_day);
            sum.events = events;
            Counts::Direct(direct, ext)
        }
        Some(d) => {
            // With the model, the count and day words share what the counts alone get.
            let share = if ip_day { 4 } else { 2 };
            let bytes = plan.run_recs * std::mem::size_of::<KeyRec>();
            let mut set = RunSet::new(
                bytes / std::mem::size_of::<CountRec>() / share,
                Some((d.clone(), "count".into())),
                cfg.threads,
            );
            let mut ext_set = ip_day.then(|| {
                RunSet::new(
                    bytes / std::mem::size_of::<ExtRec>() / share,
                    Some((d.clone(), "ipday".into())),
                    cfg.threads,
                )
            });
            let mut m = Merge::new(&win_mem, &win_runs)?;
            let mut group: Vec<WinRec> = Vec::new();
            let mut camps: Vec<u64> = Vec::new();
            let mut events = 0u64;
            let mut put = |w: &WinRec, val: u32, ext: u64| {
                if let Some(e) = ext_set.as_mut() {
                    e.push(ExtRec {
                        file: w.file,
                        row: w.row,
                        val: ext,
                    })?;
                }
                set.push(CountRec {
                    file: w.file,
                    row: w.row,
                    val,
                })
            };
            while let Some(w) = m.pop()? {
                events += 1;
                if group
                    .last()
                    .is_some_and(|g| (g.ip_v6, g.ip) != (w.ip_v6, w.ip))
                {
                    count_ip(&group, many_max, ip_day, &mut camps, &mut put)?;
                    group.clear();
                }
                group.push(w);
            }
            count_ip(&group, many_max, ip_day, &mut camps, &mut put)?;
            sum.events = events;
            Counts::Runs(set, ext_set)
        }
    };
    drop(win_mem);

    // Pass D: every winner of the day through the rules, file by file in parallel.
    let (words, direct, direct_ext) = match counts {
        Counts::Direct(v, e) => (Words::default(), Some(v), e),
        Counts::Runs(set, ext_set) => {
            let (count_mem, count_runs) = set.finish()?;
            let (ext_mem, ext_runs) = match ext_set {
                Some(e) => e.finish()?,
                None => (Vec::new(), Vec::new()),
            };
            (
                Words {
                    count_mem,
                    count_runs,
                    ext_mem,
                    ext_runs,
                },
                None,
                None,
            )
        }
    };
    sum.spilled_runs += words
        .count_runs
        .iter()
        .chain(&words.ext_runs)
        .filter(|r| matches!(r, Run::File { .. }))
        .count() as u64;
    let adj_path = cfg.out_dir.join("adjustments.csv");
    let adj_tmp = cfg.out_dir.join(".adjustments.csv.tmp");
    let dump_tmp = cfg.dump_features.as_ref().map(|p| {
        let mut t = p.clone().into_os_string();
        t.push(".tmp");
        PathBuf::from(t)
    });
    let mut dump = match (&dump_tmp, model) {
        (Some(p), Some(m)) => {
            let mut w = BufWriter::new(fs::File::create(p)?);
            let names = &features::FEATURE_NAMES[..m.num_feature()];
            writeln!(w, "event_id,{},score", names.join(","))?;
            Some(w)
        }
        _ => None,
    };
    let mut adj = if adjusting(cfg) {
        let mut w = BufWriter::new(fs::File::create(&adj_tmp)?);
        writeln!(
            w,
            "event_id,advertiser_id,campaign_id,ad_id,ts,ip,cost_micros,check,reason"
        )?;
        Some(w)
    } else {
        None
    };
    // The IP history's marks: one per click of the day, sorted by IP when the day is
    // done (in the records' memory, free by now, or spilled as runs).
    let mut marks = past.as_ref().map(|_| {
        let spill = plan.spill.as_ref().map(|d| (d.clone(), "mark".to_string()));
        let cap = match spill {
            None => sum.events as usize,
            Some(_) => {
                plan.run_recs * std::mem::size_of::<KeyRec>() / 2 / std::mem::size_of::<MarkRec>()
            }
        };
        RunSet::<MarkRec>::new(cap.max(1), spill, cfg.threads)
    });
    let totals = judge(
        cfg,
        rules,
        model,
        past.as_ref(),
        files,
        direct,
        direct_ext,
        &words,
        &progress,
        |out| {
            if let Some(w) = adj.as_mut() {
                w.write_all(&out.adj)?;
            }
            if let Some(w) = dump.as_mut() {
                w.write_all(&out.dump)?;
            }
            if let Some(m) = marks.as_mut() {
                for r in &out.marks {
                    m.push(*r)?;
                }
            }
            Ok(())
        },
    )?;
    progress.lock().expect("not poisoned").done();
    if let (Some(w), Some(tmp), Some(path)) = (dump, &dump_tmp, &cfg.dump_features) {
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(tmp, path)?;
    }
    if let Some(w) = adj {
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&adj_tmp, &adj_path)?;
        clickgate_proto::fsutil::sync_dir(&cfg.out_dir)?;
    }
    sum.fraud = totals.fraud;
    sum.adjusted = totals.adjusted;
    sum.model_removed = model.map(|_| totals.model_removed);
    sum.reputation_removed = cfg.reputation.map(|_| totals.reputation_removed);
    if let (Some(past), Some(marks)) = (past, marks) {
        sum.history = Some(write_history(cfg, past, marks)?);
    }
    let invoices: BTreeMap<(u64, u64), CampaignTotals> = totals.invoices.into_iter().collect();
    let campaigns: BTreeMap<u64, CampaignTotals> = totals.campaigns.into_iter().collect();
    for t in invoices.values() {
        sum.billable += t.clicks;
        sum.cost_micros += t.cost_micros;
    }

    let mut out = String::from("advertiser_id,campaign_id,clicks,cost_micros\n");
    for ((adv, camp), t) in &invoices {
        out.push_str(&format!("{adv},{camp},{},{}\n", t.clicks, t.cost_micros));
    }
    sum.invoice_rows = invoices.len() as u64;
    write_atomic(&cfg.out_dir.join("invoices.csv"), out.as_bytes())?;
    if let Some(other) = other {
        let (text, diffs) = compare_engines(&invoices, other);
        sum.engine_diffs = Some(diffs);
        write_atomic(&cfg.out_dir.join("engines.csv"), text.as_bytes())?;
    }

    let realtime = realtime
        .join()
        .map_err(|_| anyhow::anyhow!("reading the real-time counters panicked"))??;
    sum.reconciled = realtime.is_some();
    let mut out = String::from(
        "campaign_id,invoice_clicks,realtime_clicks,clicks_diff,clicks_diff_pct,\
         invoice_cost_micros,realtime_cost_micros,cost_diff_micros,cost_diff_pct\n",
    );
    for (camp, t) in &campaigns {
        let rt = realtime.as_ref().map(|s| {
            s.series(*camp, Window::D1, Dim::All, day_start, day_start + 1)
                .first()
                .map_or((0, 0), |b| (b.clicks, b.cost_micros))
        });
        let cols = |inv: u64, rt: Option<u64>| match rt {
            None => format!("{inv},,,"),
            Some(r) => format!("{inv},{r},{},{}", r as i128 - inv as i128, pct(inv, r)),
        };
        out.push_str(&format!(
            "{camp},{},{}\n",
            cols(t.clicks, rt.map(|r| r.0)),
            cols(t.cost_micros, rt.map(|r| r.1))
        ));
    }
    write_atomic(&cfg.out_dir.join("reconciliation.csv"), out.as_bytes())?;
    Ok(())
}

/// Adds the day's marks to the history read and writes `ip_history.csv`.
fn write_history(
    cfg: &BillingConfig,
    past: History,
    marks: RunSet<MarkRec>,
) -> Result<history::Written, BillingError> {
    let (mem, runs) = marks.finish()?;
    let mut m = Merge::new(&mem, &runs)?;
    let mut carry: Option<MarkRec> = None;
    // One IP's marks are together in the merge's order.
    let today = || -> std::io::Result<Option<(IpKey, u32, u32)>> {
        let Some(first) = carry.take().map_or_else(|| m.pop(), |r| Ok(Some(r)))? else {
            return Ok(None);
        };
        let (mut clicks, mut removed) = (1u32, u32::from(first.removed));
        while let Some(r) = m.pop()? {
            if r.ip != first.ip {
                carry = Some(r);
                break;
            }
            clicks = clicks.saturating_add(1);
            removed = removed.saturating_add(u32::from(r.removed));
        }
        Ok(Some((first.ip, clicks, removed)))
    };
    let (ips, dropped) = past.next(today, cfg.history.days, cfg.history.ips_max)?;
    let mut text = Vec::new();
    history::write(&mut text, &ips)?;
    write_atomic(&history::path_in(&cfg.out_dir), &text)?;
    Ok(history::Written {
        ips: ips.len() as u64,
        dropped,
    })
}

type IdMap<K, V> = HashMap<K, V, clickgate_core::hash::IdBuildHasher>;

/// Cut points `0 = c0 ≤ c1 ≤ … ≤ n` of `v` into about `parts` chunks, never between
/// two records of one group (`same`).
fn group_cuts<T>(v: &[T], parts: usize, same: impl Fn(&T, &T) -> bool) -> Vec<usize> {
    let n = v.len();
    let mut cuts = vec![0];
    for t in 1..parts.max(1) {
        let mut c = (n * t / parts).max(cuts[cuts.len() - 1]);
        while c > 0 && c < n && same(&v[c - 1], &v[c]) {
            c += 1;
        }
        cuts.push(c);
    }
    cuts.push(n);
    cuts
}

/// Pass B in memory: `keys` sorted by group ([`runs::group_sort`]); the first copy of
/// each event id wins. Returns the winners of the day and the duplicates of the day.
/// Each thread writes its chunk's winners into its own region of one vector (a chunk
/// has at most as many winners as records), then the regions are moved together.
fn dedup_in_memory(
    keys: &[KeyRec],
    threads: usize,
    in_day: &(impl Fn(u64) -> bool + Sync),
) -> (Vec<WinRec>, u64) {
    let cuts = group_cuts(keys, threads, |a, b| a.id == b.id);
    let mut wins: Vec<WinRec> = Vec::with_capacity(keys.len());
    let mut written = Vec::with_capacity(cuts.len() - 1);
    let mut dups = 0u64;
    {
        let mut rest = &mut wins.spare_capacity_mut()[..keys.len()];
        std::thread::scope(|s| {
            let mut handles = Vec::new();
            for t in 0..cuts.len() - 1 {
                let chunk = &keys[cuts[t]..cuts[t + 1]];
                let (region, tail) = std::mem::take(&mut rest).split_at_mut(chunk.len());
                rest = tail;
                handles.push(s.spawn(move || {
                    let (mut k, mut dups) = (0usize, 0u64);
                    let mut i = 0;
                    while i < chunk.len() {
                        let w = chunk[i];
                        let mut j = i + 1;
                        while j < chunk.len() && chunk[j].id == w.id {
                            dups += u64::from(in_day(chunk[j].ts));
                            j += 1;
                        }
                        if in_day(w.ts) {
                            region[k].write(WinRec {
                                ip_v6: w.ip_v6,
                                ip: w.ip,
                                minute: w.ts / MINUTE_MS,
                                file: w.file,
                                row: w.row,
                                campaign: w.campaign,
                            });
                            k += 1;
                        }
                        i = j;
                    }
                    (k, dups)
                }));
            }
            for h in handles {
                let (k, d) = h.join().expect("dedup thread panicked");
                written.push(k);
                dups += d;
            }
        });
    }
    let room = wins.spare_capacity_mut();
    let mut to = 0;
    for (t, &k) in written.iter().enumerate() {
        room.copy_within(cuts[t]..cuts[t] + k, to);
        to += k;
    }
    // SAFETY: chunk t wrote slots cuts[t]..cuts[t] + written[t]; they were moved, in
    // chunk order, to 0..to, so the first `to` slots hold written records.
    unsafe { wins.set_len(to) };
    (wins, dups)
}

/// Pass C for one IP's winners (sorted by minute): each click's count word is its
/// minute's click count, with [`MANY_CAMPAIGNS`] set when `many_max` is given and the
/// IP clicked more distinct campaigns than that. With `ip_day` (the model), each
/// click also gets the IP's day word ([`ip_day_word`]; 0 otherwise).
fn count_ip(
    group: &[WinRec],
    many_max: Option<u32>,
    ip_day: bool,
    camps: &mut Vec<u64>,
    mut put: impl FnMut(&WinRec, u32, u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let distinct = (many_max.is_some() || ip_day).then(|| {
        camps.clear();
        camps.extend(group.iter().map(|w| w.campaign));
        camps.sort_unstable();
        camps.dedup();
        camps.len()
    });
    let many = many_max.is_some_and(|max| distinct.unwrap_or(0) as u64 > u64::from(max));
    let ext = if ip_day {
        ip_day_word(group.len(), distinct.unwrap_or(0))
    } else {
        0
    };
    let mut k = 0;
    while k < group.len() {
        let minute = group[k].minute;
        let mut e = k;
        while e < group.len() && group[e].minute == minute {
            e += 1;
        }
        let val = ((e - k) as u64).min(u64::from(MANY_CAMPAIGNS - 1)) as u32
            | if many { MANY_CAMPAIGNS } else { 0 };
        for w in &group[k..e] {
            put(w, val, ext)?;
        }
        k = e;
    }
    Ok(())
}

/// Pass C in memory: `wins` sorted by group (IP); returns every file's count words,
/// with `ip_day` every file's day words, and the number of winners. Threads take
/// chunks cut between IPs; each row's word is written once, by the thread holding its
/// IP.
#[allow(clippy::type_complexity)]
fn count_in_memory(
    wins: &[WinRec],
    files: &[ArchiveFile],
    threads: usize,
    many_max: Option<u32>,
    ip_day: bool,
) -> (Vec<Vec<u32>>, Option<Vec<Vec<u64>>>, u64) {
    let words: Vec<Vec<AtomicU32>> = files
        .iter()
        .map(|f| (0..f.rows).map(|_| AtomicU32::new(0)).collect())
        .collect();
    let ext: Option<Vec<Vec<AtomicU64>>> = ip_day.then(|| {
        files
            .iter()
            .map(|f| (0..f.rows).map(|_| AtomicU64::new(0)).collect())
            .collect()
    });
    let cuts = group_cuts(wins, threads, |a, b| (a.ip_v6, a.ip) == (b.ip_v6, b.ip));
    std::thread::scope(|s| {
        for t in 0..cuts.len() - 1 {
            let chunk = &wins[cuts[t]..cuts[t + 1]];
            let (words, ext) = (&words, &ext);
            s.spawn(move || {
                let mut camps = Vec::new();
                let mut i = 0;
                while i < chunk.len() {
                    let mut j = i + 1;
                    while j < chunk.len()
                        && (chunk[j].ip_v6, chunk[j].ip) == (chunk[i].ip_v6, chunk[i].ip)
                    {
                        j += 1;
                    }
                    let _ = count_ip(&chunk[i..j], many_max, ip_day, &mut camps, |w, val, e| {
                        words[w.file as usize][w.row as usize].store(val, Ordering::Relaxed);
                        if let Some(ext) = ext {
                            ext[w.file as usize][w.row as usize].store(e, Ordering::Relaxed);
                        }
                        Ok(())
                    });
                    i = j;
                }
            });
        }
    });
    let direct = words
        .into_iter()
        .map(|v| v.into_iter().map(AtomicU32::into_inner).collect())
        .collect();
    let ext = ext.map(|e| {
        e.into_iter()
            .map(|v| v.into_iter().map(AtomicU64::into_inner).collect())
            .collect()
    });
    (direct, ext, wins.len() as u64)
}

/// What pass D adds up.
#[derive(Default)]
struct Totals {
    invoices: IdMap<(u64, u64), CampaignTotals>,
    /// Every campaign with a click of the day (fraud included), with its billed totals.
    campaigns: IdMap<u64, CampaignTotals>,
    fraud: u64,
    adjusted: u64,
    model_removed: u64,
    reputation_removed: u64,
}

/// Pass C's spilled outputs: count words, and the model's day words.
#[derive(Default)]
struct Words {
    count_mem: Vec<CountRec>,
    count_runs: Vec<Run>,
    ext_mem: Vec<ExtRec>,
    ext_runs: Vec<Run>,
}

/// One file's lines for adjustments.csv and the feature dump, and its clicks' marks
/// for the IP history.
#[derive(Default)]
struct FileOut {
    adj: Vec<u8>,
    dump: Vec<u8>,
    marks: Vec<MarkRec>,
}

impl Totals {
    fn merge(&mut self, o: Totals) {
        for (k, v) in o.invoices {
            let t = self.invoices.entry(k).or_default();
            t.clicks += v.clicks;
            t.cost_micros += v.cost_micros;
        }
        for (k, v) in o.campaigns {
            let t = self.campaigns.entry(k).or_default();
            t.clicks += v.clicks;
            t.cost_micros += v.cost_micros;
        }
        self.fraud += o.fraud;
        self.adjusted += o.adjusted;
        self.model_removed += o.model_removed;
        self.reputation_removed += o.reputation_removed;
    }
}

/// Pass D. `direct`: every file's count words (in memory, and `direct_ext` the
/// model's day words); else the count runs (and day runs) of `words`, merged in
/// (file, row) order. `adjustment` receives each file's adjustments.csv lines (and
/// feature dump lines), in file order.
#[allow(clippy::too_many_arguments)]
fn judge(
    cfg: &BillingConfig,
    rules: &CompiledRules,
    model: Option<&GbtModel>,
    past: Option<&History>,
    files: &[ArchiveFile],
    direct: Option<Vec<Vec<u32>>>,
    direct_ext: Option<Vec<Vec<u64>>>,
    words: &Words,
    progress: &Mutex<Progress>,
    mut adjustment: impl FnMut(&FileOut) -> std::io::Result<()>,
) -> Result<Totals, BillingError> {
    let ip_rate = rules.ip_rate_rules();
    // The event's fields but `event_id` (read only for adjustments, last) and
    // `user_id`, which no rule judges (the click carries it empty); the indices below
    // follow this order.
    let mut cols: Vec<&str> = clickgate_core::event::FIELDS
        .into_iter()
        .filter(|f| !matches!(*f, "event_id" | "user_id"))
        .collect();
    debug_assert_eq!(cols[0], "ts");
    debug_assert_eq!(cols[9], "cost_micros");
    let adjusting = adjusting(cfg);
    if adjusting {
        cols.push("event_id");
    }
    let dump = cfg.dump_features.is_some();
    let reputation = cfg.reputation;
    let judge_file = |t: &mut Totals,
                      f: usize,
                      counts: &[u32],
                      ext: &[u64]|
     -> anyhow::Result<FileOut> {
        let af = &files[f];
        let mut out = FileOut::default();
        let mut ua_traits: Vec<Option<UaTraits>> = Vec::new();
        // The user agents arrive dictionary-encoded: their facts are computed once per
        // dictionary entry (the dictionary of a column chunk is shared by its batches).
        let mut ua_dict: Option<ArrayRef> = None;
        let mut ua_facts: Vec<Option<UaFacts>> = Vec::new();
        af.read(None, &cols, |b: &RecordBatch, at| {
            let ts = b.column(0).as_primitive::<TimestampMillisecondType>();
            let u = |i: usize| b.column(i).as_primitive::<UInt64Type>();
            let (campaign, ad, publisher, advertiser, cost) = (u(1), u(2), u(3), u(4), u(9));
            let s = |i: usize| b.column(i).as_string::<i32>();
            let (ip, country, device) = (s(5), s(7), s(8));
            let ua = b.column(6).as_dictionary::<Int32Type>();
            let ua_values = ua.values().as_string::<i32>();
            if !ua_dict
                .as_ref()
                .is_some_and(|d| Arc::ptr_eq(d, ua.values()))
            {
                ua_dict = Some(ua.values().clone());
                ua_facts.clear();
                ua_facts.resize(ua_values.len(), None);
                if model.is_some() {
                    ua_traits.clear();
                    ua_traits.resize(ua_values.len(), None);
                }
            }
            let ua_keys = ua.keys();
            let id = adjusting.then(|| s(10));
            for i in 0..b.num_rows() {
                let row = at as usize + i;
                let val = counts[row];
                if val == 0 {
                    continue;
                }
                let bad =
                    |what: &str| anyhow::anyhow!("{}: row {row}: bad {what}", af.path.display());
                let count = val & !MANY_CAMPAIGNS;
                let k = usize::try_from(ua_keys.value(i))
                    .ok()
                    .filter(|&k| k < ua_values.len() && ua_keys.is_valid(i))
                    .ok_or_else(|| bad("user_agent"))?;
                let user_agent = ua_values.value(k);
                let c = Click {
                    event_id: match &id {
                        Some(col) => EventId::parse(col.value(i)).ok_or_else(|| bad("event_id"))?,
                        None => EventId([0; 16]),
                    },
                    ts_ms: ts.value(i).max(0) as u64,
                    campaign_id: campaign.value(i),
                    ad_id: ad.value(i),
                    publisher_id: publisher.value(i),
                    advertiser_id: advertiser.value(i),
                    user_id: std::borrow::Cow::Borrowed(""),
                    ip: parse_ip(ip.value(i)).ok_or_else(|| bad("ip"))?,
                    user_agent: std::borrow::Cow::Borrowed(user_agent),
                    country: country
                        .value(i)
                        .as_bytes()
                        .try_into()
                        .map_err(|_| bad("country"))?,
                    device: Device::parse(device.value(i)).ok_or_else(|| bad("device"))?,
                    cost_micros: cost.value(i),
                };
                let facts = *ua_facts[k].get_or_insert_with(|| rules.ua_facts(user_agent));
                let camp = t.campaigns.entry(c.campaign_id).or_default();
                let key = past.map(|_| IpKey::of(c.ip));
                let mut mark = |removed: bool| {
                    if let Some(ip) = key {
                        out.marks.push(MarkRec { ip, removed });
                    }
                };
                let rate_fired = ip_rate.iter().any(|&(_, max)| count > max);
                if rate_fired || rules.evaluate_static_with(&c, count, &facts).fraud() {
                    t.fraud += 1;
                    mark(true);
                    continue;
                }
                // The event id's text, made only for a line that is written.
                let id_text = || {
                    let mut b = [0u8; 36];
                    c.event_id.write_text(&mut b);
                    b
                };
                let mut adjust = |check: &str, reason: std::fmt::Arguments<'_>| {
                    let idt = id_text();
                    writeln!(
                        out.adj,
                        "{},{},{},{},{},{},{},{check},{reason}",
                        std::str::from_utf8(&idt).expect("ascii"),
                        c.advertiser_id,
                        c.campaign_id,
                        c.ad_id,
                        c.ts_ms,
                        c.ip,
                        c.cost_micros,
                    )
                };
                if val & MANY_CAMPAIGNS != 0 {
                    t.adjusted += 1;
                    adjust(
                        "ip_many_campaigns",
                        format_args!(
                            "ip clicked more than {} campaigns in the day",
                            cfg.ip_campaigns_max
                        ),
                    )?;
                    mark(true);
                    continue;
                }
                let ip_past = match (past, key) {
                    (Some(h), Some(k)) => h.past(&k),
                    _ => IpPast::default(),
                };
                if let Some(m) = model {
                    let e = ext[row];
                    let ip_day = IpDay {
                        minute_clicks: count,
                        day_clicks: (e >> 32) as u32,
                        day_campaigns: e as u32,
                    };
                    let ua = *ua_traits[k].get_or_insert_with(|| features::ua_traits(user_agent));
                    let x = features::vector(&c, &ua, &ip_day, &ip_past);
                    let x = &x[..m.num_feature()];
                    let score = m.predict(x);
                    if dump {
                        let d = &mut out.dump;
                        d.extend_from_slice(&id_text());
                        for v in x {
                            write!(d, ",{v}")?;
                        }
                        writeln!(d, ",{score}")?;
                    }
                    if f64::from(score) >= cfg.model_threshold {
                        t.model_removed += 1;
                        adjust(
                            "model",
                            format_args!("model score {score} >= {}", cfg.model_threshold),
                        )?;
                        mark(true);
                        continue;
                    }
                }
                mark(false);
                if let Some(r) = reputation {
                    if r.fires(&ip_past) {
                        t.reputation_removed += 1;
                        adjust(
                            "ip_reputation",
                            format_args!(
                                "ip fraud share {}/{} over the previous {} days > {}",
                                ip_past.fraud, ip_past.clicks, cfg.history.days, r.share
                            ),
                        )?;
                        continue;
                    }
                }
                camp.clicks += 1;
                camp.cost_micros += c.cost_micros;
                let inv = t
                    .invoices
                    .entry((c.advertiser_id, c.campaign_id))
                    .or_default();
                inv.clicks += 1;
                inv.cost_micros += c.cost_micros;
            }
            Ok(())
        })?;
        Ok(out)
    };

    // Files go to the workers in order through a bounded queue; results come back
    // tagged with their file and are released in file order.
    let threads = cfg.threads.clamp(1, files.len().max(1));
    type Job = (usize, Vec<u32>, Vec<u64>);
    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(threads);
    let job_rx = Mutex::new(job_rx);
    let (res_tx, res_rx) = mpsc::channel::<(usize, anyhow::Result<FileOut>)>();
    let mut totals = Totals::default();
    std::thread::scope(|s| -> Result<(), BillingError> {
        let mut workers = Vec::new();
        for _ in 0..threads {
            let (job_rx, res_tx, judge_file) = (&job_rx, res_tx.clone(), &judge_file);
            workers.push(s.spawn(move || {
                let mut t = Totals::default();
                loop {
                    let job = job_rx.lock().expect("not poisoned").recv();
                    let Ok((f, counts, ext)) = job else { break };
                    let r = judge_file(&mut t, f, &counts, &ext);
                    if res_tx.send((f, r)).is_err() {
                        break;
                    }
                }
                t
            }));
        }
        drop(res_tx);
        let mut pending: BTreeMap<usize, FileOut> = BTreeMap::new();
        // Files sent, in order: their adjustments are released in this order.
        let mut sent: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
        let mut error: Option<BillingError> = None;
        let take = |r: (usize, anyhow::Result<FileOut>),
                    pending: &mut BTreeMap<usize, FileOut>,
                    error: &mut Option<BillingError>| {
            match r.1 {
                Ok(text) => {
                    pending.insert(r.0, text);
                }
                Err(e) => {
                    error.get_or_insert(BillingError::Failed(e));
                }
            }
        };
        let send_all = (|| -> Result<(), BillingError> {
            let mut merge = if direct.is_none() {
                Some(Merge::new(&words.count_mem, &words.count_runs)?)
            } else {
                None
            };
            let mut ext_merge = if direct.is_none() && model.is_some() {
                Some(Merge::new(&words.ext_mem, &words.ext_runs)?)
            } else {
                None
            };
            let mut carry: Option<CountRec> = None;
            let mut ext_carry: Option<ExtRec> = None;
            let mut direct = direct;
            let mut direct_ext = direct_ext;
            for (f, af) in files.iter().enumerate() {
                let counts = match (&mut direct, &mut merge) {
                    (Some(d), _) => std::mem::take(&mut d[f]),
                    (None, Some(m)) => gather(m, &mut carry, f, af.rows as usize)?,
                    (None, None) => unreachable!("one of the two"),
                };
                let ext = match (&mut direct_ext, &mut ext_merge) {
                    (Some(d), _) => std::mem::take(&mut d[f]),
                    (None, Some(m)) => gather(m, &mut ext_carry, f, af.rows as usize)?,
                    (None, None) => Vec::new(),
                };
                if counts.iter().all(|&v| v == 0) {
                    continue;
                }
                if job_tx.send((f, counts, ext)).is_err() {
                    break;
                }
                sent.push_back(f);
                while let Ok(r) = res_rx.try_recv() {
                    take(r, &mut pending, &mut error);
                }
                while let Some(text) = sent.front().and_then(|f| pending.remove(f)) {
                    adjustment(&text)?;
                    sent.pop_front();
                }
                progress
                    .lock()
                    .expect("not poisoned")
                    .tick("rules", f as u64, files.len() as u64);
                if error.is_some() {
                    break;
                }
            }
            Ok(())
        })();
        drop(job_tx);
        for r in res_rx.iter() {
            take(r, &mut pending, &mut error);
        }
        for w in workers {
            totals.merge(w.join().expect("billing worker panicked"));
        }
        send_all?;
        if let Some(e) = error {
            return Err(e);
        }
        for text in pending.into_values() {
            adjustment(&text)?;
        }
        Ok(())
    })?;
    Ok(totals)
}

/// Reads an invoices.csv (ours or another engine's): `advertiser_id,campaign_id,
/// clicks,cost_micros` rows.
pub fn read_invoices(path: &Path) -> anyhow::Result<Invoice> {
    let text = fs::read_to_string(path)?;
    let mut lines = text.lines();
    let head = lines.next().unwrap_or("");
    if head.trim() != "advertiser_id,campaign_id,clicks,cost_micros" {
        anyhow::bail!("header {head:?} is not advertiser_id,campaign_id,clicks,cost_micros");
    }
    let mut out = BTreeMap::new();
    for (n, l) in lines.enumerate() {
        let f: Vec<&str> = l.trim().split(',').collect();
        let num = |i: usize| -> anyhow::Result<u64> {
            f.get(i).and_then(|s| s.parse().ok()).ok_or_else(|| {
                anyhow::anyhow!("line {}: {l:?} is not four unsigned integers", n + 2)
            })
        };
        if f.len() != 4 {
            anyhow::bail!("line {}: {l:?} does not have four fields", n + 2);
        }
        if out.insert((num(0)?, num(1)?), (num(2)?, num(3)?)).is_some() {
            anyhow::bail!("line {}: advertiser and campaign listed twice", n + 2);
        }
    }
    Ok(out)
}

/// engines.csv: every invoice row of either engine with both figures and the
/// difference (other - ours); returns the text and the rows that differ.
fn compare_engines(ours: &BTreeMap<(u64, u64), CampaignTotals>, other: &Invoice) -> (String, u64) {
    let mut keys: Vec<(u64, u64)> = ours.keys().chain(other.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out = String::from(
        "advertiser_id,campaign_id,clicks,other_clicks,clicks_diff,cost_micros,\
         other_cost_micros,cost_diff_micros,status\n",
    );
    let mut diffs = 0;
    for k in keys {
        let a = ours.get(&k).map_or((0, 0), |t| (t.clicks, t.cost_micros));
        let b = other.get(&k).copied().unwrap_or((0, 0));
        let status = match (ours.contains_key(&k), other.contains_key(&k)) {
            (true, false) => "only_ours",
            (false, true) => "only_other",
            _ if a == b => "same",
            _ => "differs",
        };
        diffs += u64::from(status != "same");
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{status}\n",
            k.0,
            k.1,
            a.0,
            b.0,
            b.0 as i128 - a.0 as i128,
            a.1,
            b.1,
            b.1 as i128 - a.1 as i128
        ));
    }
    (out, diffs)
}

/// (realtime - invoice) / invoice in percent, 4 decimals; empty when the invoice is 0
/// and the counters are not.
fn pct(invoice: u64, realtime: u64) -> String {
    if invoice == 0 {
        return if realtime == 0 {
            "0.0000".into()
        } else {
            String::new()
        };
    }
    let d = realtime as f64 - invoice as f64;
    format!("{:.4}", d * 100.0 / invoice as f64)
}

/// The box's counter store, read without writing (`None`: there is none).
/// Bytes of the real-time counters' files under `data_dir` (0 when there are none).
fn store_disk_bytes(data_dir: &Path) -> u64 {
    ["snapshot", "wal"]
        .iter()
        .filter_map(|f| fs::metadata(data_dir.join("store").join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn load_realtime(data_dir: &Path, day_start: u64) -> anyhow::Result<Option<Store>> {
    let d = ControlplaneConfig::default();
    // Only the day's `all` counters of the 1-day window: reconciliation reads nothing
    // else, and the whole store (every window, the user sketches) takes several times
    // longer to load.
    let mut store = Store::counters_only(d.retention(), Window::D1, day_start, day_start + 1);
    let found = Durable::load_read_only(&data_dir.join("store"), &mut store, crate::now_ms())
        .context("reading the real-time counters")?;
    Ok(found.then_some(store))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    clickgate_proto::control_files::write_atomic(path, bytes)
}

/// A progress line on stderr, redrawn at most every 200 ms, when stderr is a terminal.
struct Progress {
    on: bool,
    day: Date,
    last: Option<Instant>,
}

impl Progress {
    fn new(on: bool, day: Date) -> Progress {
        Progress {
            on,
            day,
            last: None,
        }
    }

    fn tick(&mut self, stage: &str, done: u64, total: u64) {
        if !self.on
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(Instant::now());
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let bar = "#".repeat((pct / 5) as usize);
        eprint!(
            "\rbilling {} {stage:>5} [{bar:<20}] {pct:>3}% {done}/{total}   ",
            self.day
        );
    }

    fn done(&mut self) {
        if self.on {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_cuts_cover_the_slice_and_never_split_a_group() {
        for (n, groups, parts) in [
            (0usize, 1u64, 2usize),
            (1, 1, 3),
            (10, 1, 4),
            (1000, 7, 3),
            (1000, 1000, 8),
        ] {
            let v: Vec<u64> = (0..n as u64)
                .map(|i| i * groups / n.max(1) as u64)
                .collect();
            let cuts = group_cuts(&v, parts, |a, b| a == b);
            assert_eq!(cuts.len(), parts + 1);
            assert_eq!((cuts[0], cuts[parts]), (0, n));
            assert!(cuts.windows(2).all(|w| w[0] <= w[1]), "{cuts:?}");
            for &c in &cuts[1..parts] {
                assert!(
                    c == 0 || c == n || v[c - 1] != v[c],
                    "cut {c} splits a group"
                );
            }
        }
    }

    #[test]
    fn in_memory_dedup_keeps_the_first_copy_whatever_the_thread_count() {
        let day = 0..DAY_MS;
        let in_day = |ts: u64| day.contains(&ts);
        let mut keys: Vec<KeyRec> = (0..5000u32)
            .map(|i| KeyRec {
                id: u128::from(mix64(u64::from(i % 3100))),
                recv: mix64(u64::from(i)) % 1000,
                row: i,
                ts: if i % 11 == 0 {
                    DAY_MS + 5
                } else {
                    u64::from(i) * 1000
                },
                ip: u128::from(i % 97),
                campaign: u64::from(i % 5),
                ..KeyRec::default()
            })
            .collect();
        runs::group_sort(&mut keys, 2);
        let mut want: BTreeMap<u128, KeyRec> = BTreeMap::new();
        for k in &keys {
            let e = want.entry(k.id).or_insert(*k);
            if k < e {
                *e = *k;
            }
        }
        let want_dups = keys.iter().filter(|k| in_day(k.ts)).count() as u64
            - want.values().filter(|k| in_day(k.ts)).count() as u64;
        let mut want_rows: Vec<u32> = want
            .values()
            .filter(|k| in_day(k.ts))
            .map(|k| k.row)
            .collect();
        want_rows.sort_unstable();
        for threads in [1, 2, 3, 8] {
            let (wins, dups) = dedup_in_memory(&keys, threads, &in_day);
            let mut rows: Vec<u32> = wins.iter().map(|w| w.row).collect();
            rows.sort_unstable();
            assert_eq!(rows, want_rows, "threads {threads}");
            assert_eq!(dups, want_dups, "threads {threads}");
        }
    }
}
