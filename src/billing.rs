//! `clickgate billing --day YYYY-MM-DD`: flags to
//! [`clickgate_controlplane::billing::BillingConfig`]; the work is in that module.

use std::path::PathBuf;

use clickgate_controlplane::archive::{ArchiveLocation, Date};
use clickgate_controlplane::billing::{self, BillingConfig, BillingError};

use crate::config::Settings;

#[derive(clap::Args, Debug, Clone)]
pub struct BillingArgs {
    /// UTC day to bill, YYYY-MM-DD
    #[arg(long)]
    pub day: String,

    /// Directory for invoices.csv, adjustments.csv, reconciliation.csv (and engines.csv)
    /// [default: .]
    #[arg(long, default_value = ".")]
    pub out: PathBuf,

    /// Fraud rules file (the `clickgate rules` format) [default: the box's <data dir>/rules/current.json]
    #[arg(long)]
    pub rules: Option<PathBuf>,

    /// Enable batch-only checks (an IP clicking more than --ip-campaigns-max campaigns in
    /// the day); every click they remove is listed in adjustments.csv
    #[arg(long)]
    pub batch_checks: bool,

    /// Batch check: distinct campaigns one IP may click in a day before its clicks are removed
    #[arg(long, default_value_t = 20)]
    pub ip_campaigns_max: u32,

    /// Hours of the neighbouring days read for exact dedup of copies with altered ts (0..=48)
    #[arg(long, default_value_t = 1)]
    pub margin_hours: u32,

    /// Peak memory, at most, in MiB: the day is billed in memory when it fits (about
    /// 164 B per row read), else in sorted runs spilled next to --out
    #[arg(long, default_value_t = 1024)]
    pub memory_mib: u64,

    /// Decoding and sorting threads [default: the number of cores]
    #[arg(long)]
    pub threads: Option<usize>,

    /// Records per sorted run: forces spilling runs to disk whatever the archive's size
    /// (diagnostics; by default the plan follows --memory-mib)
    #[arg(long)]
    pub run_rows: Option<usize>,

    /// Another engine's invoices.csv (e.g. the Spark job's) to compare with: every
    /// invoice row of either side with the difference, in engines.csv
    #[arg(long)]
    pub compare_invoices: Option<PathBuf>,

    /// Never draw the progress line (it is drawn only when stderr is a terminal anyway)
    #[arg(long)]
    pub no_progress: bool,

    /// XGBoost JSON model (binary:logistic or reg:logistic over billing's feature vector,
    /// docs/model.md): every click the rules keep is scored; a click scoring at least
    /// --model-threshold is removed and listed in adjustments.csv
    #[arg(long)]
    pub model: Option<PathBuf>,

    /// With --model: the score (0..=1) from which a click is removed
    #[arg(long, default_value_t = billing::MODEL_THRESHOLD_DEFAULT)]
    pub model_threshold: f64,

    /// With --model: write every scored click's feature vector and score to this CSV
    /// (diagnostics)
    #[arg(long, hide = true)]
    pub dump_features: Option<PathBuf>,

    /// Keep the per-IP history across days: clicks and removed clicks per day within
    /// --ip-history-days, first seen; written to ip_history.csv next to the invoices
    /// and read back the next day with --ip-history-from (model features, reputation)
    #[arg(long)]
    pub ip_history: bool,

    /// The previous day's ip_history.csv (with --ip-history; without it the history
    /// starts empty)
    #[arg(long)]
    pub ip_history_from: Option<PathBuf>,

    /// Days the IP history covers (1..=366)
    #[arg(long, default_value_t = billing::history::DAYS_DEFAULT)]
    pub ip_history_days: u32,

    /// IPs the history keeps at most (those with the most removed clicks, then the most
    /// clicks); about 200 B + 16 B per day each in memory
    #[arg(long, default_value_t = billing::history::IPS_MAX_DEFAULT)]
    pub ip_history_ips_max: usize,

    /// Reputation rule (needs --ip-history): an IP that had more than this share
    /// (0..1) of its clicks removed over the history's previous days has its billable
    /// clicks removed, each listed in adjustments.csv
    #[arg(long)]
    pub reputation_share: Option<f64>,

    /// With --reputation-share: clicks over the previous days an IP needs before the
    /// rule judges it
    #[arg(long, default_value_t = billing::history::REPUTATION_MIN_CLICKS_DEFAULT)]
    pub reputation_min_clicks: u64,
}

/// Runs billing; the summary line goes to stdout. Returns the exit code.
pub fn run(args: &BillingArgs, settings: &Settings) -> u8 {
    match bill(args, settings) {
        Ok(summary) => {
            println!("billing {}: {summary}", args.day);
            0
        }
        Err(e) => {
            eprintln!("clickgate billing: {e}");
            e.exit_code()
        }
    }
}

fn bill(
    args: &BillingArgs,
    settings: &Settings,
) -> Result<clickgate_controlplane::billing::Summary, BillingError> {
    let day = Date::parse(&args.day).map_err(|e| BillingError::BadInput(format!("--day: {e}")))?;
    let data_dir = settings.data_dir();
    let loc = ArchiveLocation::parse(settings.archive_url.as_deref(), &data_dir)
        .map_err(|e| BillingError::BadInput(format!("--archive-url: {e}")))?;
    // An archive in S3 is billed from a local copy of the day's partitions.
    let staged = match &loc {
        ArchiveLocation::S3 { .. } => Some(billing::fetch::stage(
            &loc,
            day,
            args.margin_hours.min(billing::MARGIN_HOURS_MAX),
            &args.out,
        )?),
        ArchiveLocation::Dir(_) => None,
    };
    let archive_dir = staged.as_ref().map_or(loc.dir(), |s| s.dir()).to_path_buf();
    let mut cfg = BillingConfig::new(day, archive_dir, data_dir, args.out.clone());
    cfg.rules_file = args.rules.clone();
    cfg.batch_checks = args.batch_checks;
    cfg.ip_campaigns_max = args.ip_campaigns_max;
    cfg.margin_hours = args.margin_hours;
    cfg.memory_bytes = args.memory_mib.saturating_mul(1 << 20);
    if let Some(t) = args.threads {
        cfg.threads = t;
    }
    cfg.compare_invoices = args.compare_invoices.clone();
    cfg.run_rows = args.run_rows;
    cfg.progress &= !args.no_progress;
    cfg.model = args.model.clone();
    cfg.model_threshold = args.model_threshold;
    cfg.dump_features = args.dump_features.clone();
    cfg.ip_history = args.ip_history;
    cfg.history = billing::history::HistoryConfig {
        from: args.ip_history_from.clone(),
        days: args.ip_history_days,
        ips_max: args.ip_history_ips_max,
    };
    cfg.reputation = args
        .reputation_share
        .map(|share| billing::history::Reputation {
            share,
            min_clicks: args.reputation_min_clicks,
        });
    let summary = billing::run(&cfg);
    drop(staged);
    summary
}
