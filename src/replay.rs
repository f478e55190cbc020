//! `clickgate replay`: raw records of a range back into the counter store.
//! Glue only; the logic is `clickgate_kafka::replay`.

use clickgate_kafka::replay::{self, Position, ReplayConfig};

use crate::config::Settings;

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// Start: a Kafka offset (local log: an LSN), ms since the epoch, or an RFC 3339 time
    #[arg(long)]
    pub from: Position,
    /// End, exclusive, in the same forms [default: the end when the replay starts]
    #[arg(long)]
    pub to: Option<Position>,
    /// Consumer group id; its committed offsets record what was replayed
    #[arg(long, default_value = "clickgate-replay")]
    pub group: String,
    /// Distinct event ids kept for exact dedup, at most (~48 bytes each)
    #[arg(long, default_value_t = 10_000_000)]
    pub dedup_events_max: usize,
}

/// Exit code: 0 done, 1 failure.
pub fn run(args: &ReplayArgs, settings: &Settings) -> anyhow::Result<()> {
    let cp = settings.controlplane()?;
    let cfg = ReplayConfig {
        from: args.from,
        to: args.to,
        group: args.group.clone(),
        kafka: settings.kafka()?,
        data_dir: settings.data_dir(),
        control_socket: cp.control_socket_path(),
        dedup_events_max: args.dedup_events_max,
        keys_max: settings.agg_keys_max.unwrap_or(100_000),
    };
    let s = replay::run(&cfg)?;
    println!(
        "{{\"records\":{},\"duplicates\":{},\"frames\":{}}}",
        s.records, s.duplicates, s.frames
    );
    Ok(())
}
