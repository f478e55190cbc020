//! `clickgate billing --day D` (contract §7): the archive's exact replay into invoices.
//!
//! ```text
//! archive hours [D - margin, D + 1 day + margin)
//!   ─pass 1─▶ spill by hash(event_id) into P files          (P = ⌈rows / partition_rows_max⌉)
//!   ─pass 2─▶ per file: sort by (event_id, recv_ts, source, lsn), keep the first copy;
//!             winners with ts in D ─▶ spill by hash(ip) into P files
//!   ─pass 3─▶ per file: group by ip; per UTC minute count; CompiledRules::evaluate_static
//!             with that count + every ip_rate rule over it (contract §6, exact);
//!             optional batch-only checks; the rest is billable
//!   ─▶ invoices.csv, adjustments.csv (batch checks on), reconciliation.csv
//! ```
//!
//! Memory holds one spill partition at a time: about `partition_rows_max` × 360 B
//! (measured: the spilled record, its decoded form and the sort key), plus `P` × 16 KiB
//! of write buffers. For a day of 43 B events with `partition_rows_max` = 4 M: P ≈ 10 750
//! files, ≈ 1.4 GiB per partition and ≈ 170 MiB of buffers (and `ulimit -n` above P);
//! disk holds two copies of the day's records (docs/ARCHIVE.md).
//!
//! Exactness and determinism: dedup keeps the earliest received copy, ties broken by
//! (source, lsn), which are unique; the neighbouring `margin_hours` are read so a copy
//! whose `ts` was altered across the day boundary still competes. Every output is sorted
//! or produced in a fixed order (partitions ascending, then ip, ts, event_id), written to
//! a temporary name and renamed: two runs on the same archive give the same bytes.

pub mod read;
pub mod spill;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{BufWriter, IsTerminal, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clickgate_core::agg::Dim;
use clickgate_core::fraud::{CompiledRules, RuleSet};
use clickgate_core::hash::{bytes_hash, event_hash};
use clickgate_core::window::Window;

use crate::archive::{partition_files, partition_path, Date, DAY_MS};
use crate::durable::Durable;
use crate::store::Store;
use crate::ControlplaneConfig;

const HOUR_MS: u64 = 3_600_000;
const MINUTE_MS: u64 = 60_000;
/// Largest `margin_hours`.
pub const MARGIN_HOURS_MAX: u32 = 48;

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
    /// Rows per spill partition, at most (the memory bound).
    pub partition_rows_max: u64,
    /// Draw a progress line on stderr.
    pub progress: bool,
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
            partition_rows_max: 2_000_000,
            progress: std::io::stderr().is_terminal(),
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
    pub partitions: u64,
    /// The real-time counters were found and compared.
    pub reconciled: bool,
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
        )
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

/// Bills one day. See the module docs.
pub fn run(cfg: &BillingConfig) -> Result<Summary, BillingError> {
    if cfg.margin_hours > MARGIN_HOURS_MAX {
        return Err(BillingError::BadInput(format!(
            "--margin-hours must be at most {MARGIN_HOURS_MAX}, got {}",
            cfg.margin_hours
        )));
    }
    if cfg.partition_rows_max == 0 {
        return Err(BillingError::BadInput(
            "--partition-rows-max must be greater than 0".into(),
        ));
    }
    if !cfg.archive_dir.is_dir() {
        return Err(BillingError::BadInput(format!(
            "--archive-url: {} is not a directory",
            cfg.archive_dir.display()
        )));
    }
    let rules = load_rules(cfg)?;
    fs::create_dir_all(&cfg.out_dir)
        .map_err(|e| BillingError::BadInput(format!("--out {}: {e}", cfg.out_dir.display())))?;
    let day_start = cfg.day.start_ms();
    let day_end = day_start + DAY_MS;
    let margin = u64::from(cfg.margin_hours) * HOUR_MS;
    let mut files = Vec::new();
    let mut hour = day_start.saturating_sub(margin);
    while hour < day_end + margin {
        let dir = cfg.archive_dir.join(partition_path(hour));
        if dir.is_dir() {
            files.extend(
                partition_files(&dir).with_context(|| format!("listing {}", dir.display()))?,
            );
        }
        hour += HOUR_MS;
    }
    let mut sum = Summary {
        files: files.len() as u64,
        ..Summary::default()
    };
    let mut total = 0u64;
    for f in &files {
        total += read::file_rows(f)?;
    }
    let partitions = total.div_ceil(cfg.partition_rows_max).max(1) as usize;
    sum.partitions = partitions as u64;
    let spill_dir = cfg.out_dir.join(".billing-spill");
    if spill_dir.exists() {
        fs::remove_dir_all(&spill_dir)?;
    }
    fs::create_dir_all(&spill_dir)?;
    let result = bill(cfg, &rules, &files, total, partitions, &spill_dir, &mut sum);
    let _ = fs::remove_dir_all(&spill_dir);
    result?;
    Ok(sum)
}

fn bill(
    cfg: &BillingConfig,
    rules: &CompiledRules,
    files: &[PathBuf],
    total: u64,
    partitions: usize,
    spill_dir: &Path,
    sum: &mut Summary,
) -> Result<(), BillingError> {
    let day_start = cfg.day.start_ms();
    let in_day = |ts: u64| ts >= day_start && ts < day_start + DAY_MS;
    let mut progress = Progress::new(cfg.progress, cfg.day);

    // Pass 1: every row to its event-id partition.
    let mut by_id = spill::Spill::create(spill_dir, "id", partitions)?;
    for f in files {
        read::for_each_row(f, |rec, source, lsn| {
            sum.rows_read += 1;
            if in_day(rec.click.ts_ms) {
                sum.rows_in_day += 1;
            }
            progress.tick("read", sum.rows_read, total);
            by_id.push(event_hash(&rec.click.event_id), rec, source, lsn)
        })?;
    }
    let id_files = by_id.finish()?;

    // Pass 2: exact dedup per partition; the day's winners to their ip partition.
    let mut by_ip = spill::Spill::create(spill_dir, "ip", partitions)?;
    for (p, path) in id_files.iter().enumerate() {
        progress.tick("dedup", p as u64, partitions as u64);
        let buf = spill::load(path)?;
        let mut es = spill::entries(&buf)?;
        es.sort_unstable_by(|a, b| {
            (a.rec.click.event_id.0, a.rec.recv_ms, a.source, a.lsn).cmp(&(
                b.rec.click.event_id.0,
                b.rec.recv_ms,
                b.source,
                b.lsn,
            ))
        });
        let mut i = 0;
        while i < es.len() {
            let id = es[i].rec.click.event_id;
            let mut j = i + 1;
            while j < es.len() && es[j].rec.click.event_id == id {
                if in_day(es[j].rec.click.ts_ms) {
                    sum.duplicates += 1;
                }
                j += 1;
            }
            let w = &es[i];
            if in_day(w.rec.click.ts_ms) {
                by_ip.push(ip_hash(w.rec.click.ip), &w.rec, w.source, w.lsn)?;
            }
            i = j;
        }
    }
    let ip_files = by_ip.finish()?;
    sum.events = 0;

    // Pass 3: per ip, the exact per-minute rate rule and the rest of the rules.
    let mut invoices: BTreeMap<(u64, u64), CampaignTotals> = BTreeMap::new();
    let mut campaigns: BTreeMap<u64, CampaignTotals> = BTreeMap::new();
    let adj_path = cfg.out_dir.join("adjustments.csv");
    let adj_tmp = cfg.out_dir.join(".adjustments.csv.tmp");
    let mut adj = if cfg.batch_checks {
        let mut w = BufWriter::new(fs::File::create(&adj_tmp)?);
        writeln!(
            w,
            "event_id,advertiser_id,campaign_id,ad_id,ts,ip,cost_micros,check,reason"
        )?;
        Some(w)
    } else {
        None
    };
    let ip_rate = rules.ip_rate_rules();
    for (p, path) in ip_files.iter().enumerate() {
        progress.tick("rules", p as u64, partitions as u64);
        let buf = spill::load(path)?;
        let mut es = spill::entries(&buf)?;
        sum.events += es.len() as u64;
        es.sort_unstable_by(|a, b| {
            (
                ip_key(a.rec.click.ip),
                a.rec.click.ts_ms,
                a.rec.click.event_id.0,
            )
                .cmp(&(
                    ip_key(b.rec.click.ip),
                    b.rec.click.ts_ms,
                    b.rec.click.event_id.0,
                ))
        });
        let mut i = 0;
        while i < es.len() {
            let ip = es[i].rec.click.ip;
            let mut j = i;
            while j < es.len() && es[j].rec.click.ip == ip {
                j += 1;
            }
            let group = &es[i..j];
            let mut camps: Vec<u64> = group.iter().map(|e| e.rec.click.campaign_id).collect();
            camps.sort_unstable();
            camps.dedup();
            let many_campaigns =
                cfg.batch_checks && camps.len() as u64 > u64::from(cfg.ip_campaigns_max);
            // Clicks of the group are sorted by ts: one minute is a contiguous run.
            let mut k = 0;
            while k < group.len() {
                let minute = group[k].rec.click.ts_ms / MINUTE_MS;
                let mut m = k;
                while m < group.len() && group[m].rec.click.ts_ms / MINUTE_MS == minute {
                    m += 1;
                }
                let count = (m - k) as u32;
                let rate_fired = ip_rate.iter().any(|&(_, max)| count > max);
                for e in &group[k..m] {
                    let c = &e.rec.click;
                    campaigns.entry(c.campaign_id).or_default();
                    let fraud = rate_fired || rules.evaluate_static(c, count).fraud();
                    if fraud {
                        sum.fraud += 1;
                        continue;
                    }
                    if many_campaigns {
                        sum.adjusted += 1;
                        if let Some(w) = adj.as_mut() {
                            let mut id = [0u8; 36];
                            c.event_id.write_text(&mut id);
                            writeln!(
                                w,
                                "{},{},{},{},{},{},{},ip_many_campaigns,ip clicked {} campaigns in the day (max {})",
                                std::str::from_utf8(&id).expect("ascii"),
                                c.advertiser_id,
                                c.campaign_id,
                                c.ad_id,
                                c.ts_ms,
                                c.ip,
                                c.cost_micros,
                                camps.len(),
                                cfg.ip_campaigns_max
                            )?;
                        }
                        continue;
                    }
                    let t = invoices
                        .entry((c.advertiser_id, c.campaign_id))
                        .or_default();
                    t.clicks += 1;
                    t.cost_micros += c.cost_micros;
                    let t = campaigns.entry(c.campaign_id).or_default();
                    t.clicks += 1;
                    t.cost_micros += c.cost_micros;
                    sum.billable += 1;
                    sum.cost_micros += c.cost_micros;
                }
                k = m;
            }
            i = j;
        }
    }
    progress.done();
    if let Some(w) = adj {
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&adj_tmp, &adj_path)?;
    }

    let mut out = String::from("advertiser_id,campaign_id,clicks,cost_micros\n");
    for ((adv, camp), t) in &invoices {
        out.push_str(&format!("{adv},{camp},{},{}\n", t.clicks, t.cost_micros));
    }
    sum.invoice_rows = invoices.len() as u64;
    write_atomic(&cfg.out_dir.join("invoices.csv"), out.as_bytes())?;

    let realtime = load_realtime(&cfg.data_dir)?;
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

fn ip_key(ip: IpAddr) -> [u8; 17] {
    let mut k = [0u8; 17];
    match ip {
        IpAddr::V4(a) => {
            k[0] = 4;
            k[1..5].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            k[0] = 6;
            k[1..].copy_from_slice(&a.octets());
        }
    }
    k
}

fn ip_hash(ip: IpAddr) -> u64 {
    bytes_hash(&ip_key(ip))
}

/// The box's counter store, read without writing (`None`: there is none).
fn load_realtime(data_dir: &Path) -> anyhow::Result<Option<Store>> {
    let d = ControlplaneConfig::default();
    let mut store = Store::new(d.retention(), usize::MAX);
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
