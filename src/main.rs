//! The `clickgate` binary: parses settings, wires the planes, maps errors to exit codes.
//! Logic lives in the library crates.

mod config;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use clickgate_dataplane::Dataplane;

use config::Settings;

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
}

/// Exit codes: 0 clean stop, 1 runtime failure, 2 bad settings.
fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let settings = match load_settings(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("clickgate: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run | Command::Dataplane => run_dataplane(&settings),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clickgate: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLICKGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
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
    Ok(settings)
}

fn run_dataplane(settings: &Settings) -> anyhow::Result<()> {
    let cfg = settings.dataplane()?;
    let data_dir = cfg.data_dir.clone();
    let dp = Dataplane::start(cfg)?;
    write_addr_file(&data_dir, "ingest.addr", &dp.local_addr().to_string())?;
    tracing::info!(addr = %dp.local_addr(), "ingest listening");
    let handle = dp.shutdown_handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signals = match signal_hook::iterator::Signals::new([
                signal_hook::consts::SIGTERM,
                signal_hook::consts::SIGINT,
            ]) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install signal handlers");
                    return;
                }
            };
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, "stopping: draining and flushing");
                handle.trigger();
            }
        })
        .context("cannot start the signal thread")?;
    dp.join()?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Writes `<data_dir>/run/<name>` atomically, so scripts and tests find the bound
/// address when they asked for port 0.
fn write_addr_file(data_dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let dir = data_dir.join("run");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).context("cannot publish the address file")?;
    Ok(())
}
