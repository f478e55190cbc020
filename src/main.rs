//! The `clickgate` binary: parses settings, wires the planes, maps errors to exit codes.
//! Logic lives in the library crates.

mod archive;
mod billing;
mod config;
mod kafka;
mod replay;
mod rules;
mod tune;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use clickgate_controlplane::Controlplane;
use clickgate_dataplane::Dataplane;

use config::{LogFormat, Settings};

/// clickgate: ad-click ingest appliance. Settings come from flags, then `CLICKGATE_*`
/// environment variables, then the TOML file given with --config, then defaults.
#[derive(Parser, Debug)]
#[command(name = "clickgate", version, about, long_about = None)]
struct Cli {
    /// TOML settings file (keys as the long flags, with `_`)
    #[arg(long, env = "CLICKGATE_CONFIG", global = true)]
    config: Option<PathBuf>,

    #[command(flatten)]
    settings: Settings,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Both planes in one process on this box, with embedded defaults (local log, in-process store)
    Run,
    /// The dataplane alone: HTTP ingest on every configured core
    Dataplane,
    /// The controlplane alone: delta merge, counter store, query API, control API
    Controlplane,
    /// Fraud rules through the control API (exit 0 ok, 1 server error, 2 bad file or
    /// argument, 3 token refused, 4 endpoint unreachable)
    Rules(rules::RulesArgs),
    /// Host tuning: `tune check` reports which host settings differ from tuning/README.md
    /// (exit 0 all match, 1 a hard requirement fails, 3 recommendations differ);
    /// `tune apply --yes` writes the recommended sysctls
    Tune(tune::TuneArgs),
    /// Bill one UTC day from the Parquet archive: exact dedup, fraud rules, invoices.csv
    /// and reconciliation.csv (exit 0 ok, 1 runtime failure, 2 bad argument)
    Billing(billing::BillingArgs),
    /// Replay raw records (Kafka topic, or the local log without Kafka) of a range through
    /// the stream's dedup and aggregation into the running controlplane's store
    /// (exit 0 ok, 1 failure, 2 bad argument)
    Replay(replay::ReplayArgs),
    /// A Kafka-fed archiver: `archive --from-kafka` consumes raw_clicks as a consumer
    /// group member and writes the archive (--archive-url) until SIGTERM (exit 0 clean
    /// stop, 1 failure, 2 bad settings)
    Archive(archive::ArchiveArgs),
}

/// Exit codes: 0 clean stop, 1 runtime failure, 2 bad settings.
fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let matches = command_for(&argv).get_matches_from(&argv);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // A client: the planes' settings need not be valid here.
    if matches!(cli.command, Command::Rules(_) | Command::Tune(_)) {
        init_tracing(cli.settings.log_format.unwrap_or_default());
    }
    if let Command::Rules(args) = &cli.command {
        return match rules::run(args) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("clickgate rules: {e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    if let Command::Tune(args) = &cli.command {
        let (out, code) = tune::run(args);
        println!("{out}");
        return ExitCode::from(code);
    }
    let settings = match load_settings(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("clickgate: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_tracing(settings.log_format.unwrap_or_default());
    raise_nofile();
    if let Command::Billing(args) = &cli.command {
        return ExitCode::from(billing::run(args, &settings));
    }
    if let Command::Archive(args) = &cli.command {
        return match archive::run(args, &settings) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("clickgate archive: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    if let Command::Replay(args) = &cli.command {
        return match replay::run(args, &settings) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("clickgate replay: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let result = match cli.command {
        Command::Run => run_both(&settings),
        Command::Dataplane => run_dataplane(&settings),
        Command::Controlplane => run_controlplane(&settings),
        Command::Rules(_)
        | Command::Billing(_)
        | Command::Tune(_)
        | Command::Replay(_)
        | Command::Archive(_) => {
            unreachable!("handled above")
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clickgate: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The command line, with each subcommand's `--help` listing only the settings that
/// subcommand reads ([`config::shown_in`]); every setting is still accepted everywhere.
fn command_for(argv: &[std::ffi::OsString]) -> clap::Command {
    let cmd = Cli::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    let mut words = argv
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .filter(|a| names.iter().any(|n| n == a) || *a == "help");
    let sub = match words.next() {
        Some("help") => words.next(),
        other => other,
    };
    let Some(sub) = sub.map(str::to_string) else {
        return cmd;
    };
    cmd.mut_args(|a| {
        // Settings carry a heading; `--config` does not and is read by the planes only.
        let shown = match a.get_help_heading() {
            Some(h) => config::shown_in(&sub, a.get_id().as_str(), Some(h)),
            None => !matches!(sub.as_str(), "rules" | "tune"),
        };
        if shown {
            a
        } else {
            a.hide(true)
        }
    })
}

/// Raises the soft open-files limit to the hard one: the default soft limit (often 1024)
/// is below what a loaded box holds open (connections, log segments, archive files), and
/// an EMFILE there turns into refused connections and 503s. The hard limit is the
/// operator's (the systemd unit sets it); going past it needs privileges we do not ask
/// for. The limits are logged either way.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-files limit");
        return;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            tracing::warn!(
                soft = before,
                hard = lim.rlim_max,
                error = %std::io::Error::last_os_error(),
                "cannot raise the open-files limit"
            );
            return;
        }
    }
    tracing::info!(
        soft_before = before,
        soft = lim.rlim_cur,
        hard = lim.rlim_max,
        "open-files limit"
    );
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLICKGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

fn load_settings(cli: &Cli) -> anyhow::Result<Settings> {
    let file = match &cli.config {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    let settings = cli.settings.clone().over(file);
    settings.check_supported()?;
    // Validate everything up front, so a bad value is a settings error (exit 2).
    settings.dataplane()?;
    settings.controlplane()?;
    settings.kafka()?;
    Ok(settings)
}

fn run_dataplane(settings: &Settings) -> anyhow::Result<()> {
    let (dp, fwd) = start_dataplane(settings)?;
    on_signal(dp.shutdown_handle())?;
    let dp_result = dp.join();
    kafka::stop(fwd, settings.dataplane()?.drain_timeout_ms);
    dp_result?;
    tracing::info!("stopped cleanly");
    Ok(())
}

fn run_controlplane(settings: &Settings) -> anyhow::Result<()> {
    let rt = control_runtime()?;
    let cp = start_controlplane(&rt, settings)?;
    rt.block_on(wait_for_signal())?;
    tracing::info!("stopping: flushing the counter store");
    rt.block_on(cp.shutdown())?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Both planes in one process: the controlplane on its own small tokio runtime, the
/// dataplane on its pinned glommio executors, talking over the Unix socket exactly as
/// two processes would. Stop order: the dataplane drains and ships its last deltas
/// first, then the controlplane commits them.
fn run_both(settings: &Settings) -> anyhow::Result<()> {
    let rt = control_runtime()?;
    let cp = start_controlplane(&rt, settings)?;
    let (dp, fwd) = match start_dataplane(settings) {
        Ok(started) => started,
        Err(e) => {
            let _ = rt.block_on(cp.shutdown());
            return Err(e);
        }
    };
    on_signal(dp.shutdown_handle())?;
    let dp_result = dp.join();
    kafka::stop(fwd, settings.dataplane()?.drain_timeout_ms);
    let cp_result = rt.block_on(cp.shutdown());
    dp_result?;
    cp_result?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// The dataplane, and the Kafka forwarder of its logs when `kafka_brokers` is set.
fn start_dataplane(
    settings: &Settings,
) -> anyhow::Result<(Dataplane, Option<clickgate_kafka::forwarder::Forwarder>)> {
    let mut cfg = settings.dataplane()?;
    let kafka_cfg = settings.kafka()?;
    let status = match &kafka_cfg {
        Some(k) => Some(kafka::prepare(&mut cfg, k)?),
        None => None,
    };
    let data_dir = cfg.data_dir.clone();
    let dp = Dataplane::start(cfg.clone())?;
    let fwd = match (kafka_cfg, status) {
        (Some(k), Some(status)) => match kafka::start(&dp, k, &cfg, status) {
            Ok(f) => Some(f),
            Err(e) => {
                let _ = dp.join();
                return Err(e);
            }
        },
        _ => None,
    };
    write_addr_file(&data_dir, "ingest.addr", &dp.local_addr().to_string())?;
    tracing::info!(addr = %dp.local_addr(), "ingest listening");
    Ok((dp, fwd))
}

fn control_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cg-control")
        .enable_all()
        .build()
        .context("cannot start the controlplane runtime")
}

fn start_controlplane(
    rt: &tokio::runtime::Runtime,
    settings: &Settings,
) -> anyhow::Result<Controlplane> {
    let cfg = settings.controlplane()?;
    let data_dir = cfg.data_dir.clone();
    let cp = rt.block_on(Controlplane::start(cfg))?;
    write_addr_file(&data_dir, "query.addr", &cp.query_addr().to_string())?;
    write_addr_file(&data_dir, "control.addr", &cp.control_addr().to_string())?;
    tracing::info!(addr = %cp.query_addr(), control_addr = %cp.control_addr(), "query and control APIs listening");
    Ok(cp)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Starts a thread that triggers the dataplane's drain on the first SIGTERM or SIGINT.
fn on_signal(handle: clickgate_dataplane::ShutdownHandle) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, "stopping: draining and flushing");
                handle.trigger();
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Writes `<data_dir>/run/<name>` atomically, so scripts and tests find the bound
/// address when they asked for port 0.
fn write_addr_file(data_dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let path = data_dir.join("run").join(name);
    clickgate_proto::fsutil::write_atomic(&path, text.as_bytes())
        .with_context(|| format!("cannot publish the address file {}", path.display()))
}
