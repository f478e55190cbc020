//! `clickgate archive --from-kafka`: a Kafka-fed archiver. It consumes `raw_clicks` as a
//! member of a consumer group (archivers scale by partitions, independently of the edge
//! boxes) and writes the archive (`--archive-url`, a directory or `s3://`) with the same
//! archiver as a box: files named `<topic>-p<partition>-<from offset>-<to offset>`,
//! offsets committed only after the range's files are durable. Glue only; the logic is
//! `clickgate_controlplane::archive` and `clickgate_kafka::consumer`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clickgate_controlplane::archive::{Archiver, RecordSource};
use clickgate_kafka::consumer::{ConsumerConfig, PartitionConsumer};

use crate::config::Settings;

#[derive(clap::Args, Debug)]
pub struct ArchiveArgs {
    /// Consume raw_clicks from Kafka (--kafka-brokers) as a member of --group
    #[arg(long)]
    pub from_kafka: bool,
    /// Consumer group id: every archiver writing one archive joins the same group
    #[arg(long, default_value = "clickgate-archive")]
    pub group: String,
}

/// The consumer as the archiver's record source: streams are the assigned partitions.
struct KafkaSource(PartitionConsumer);

fn io_err(e: anyhow::Error) -> io::Error {
    io::Error::other(format!("{e:#}"))
}

impl RecordSource for KafkaSource {
    fn streams(&mut self) -> io::Result<Vec<String>> {
        let c = &mut self.0;
        let parts = c.assigned().map_err(io_err)?;
        Ok(parts.into_iter().map(|p| c.stream_name(p)).collect())
    }

    fn committed(&mut self, stream: &str) -> io::Result<u64> {
        let p = self.0.partition_of(stream).map_err(io_err)?;
        Ok(self.0.committed(p).map_err(io_err)? as u64)
    }

    fn seek(&mut self, stream: &str, pos: u64) -> io::Result<()> {
        let p = self.0.partition_of(stream).map_err(io_err)?;
        self.0.seek(p, pos as i64).map_err(io_err)
    }

    fn next(&mut self, stream: &str) -> io::Result<Option<(u64, u64, &[u8])>> {
        let p = self.0.partition_of(stream).map_err(io_err)?;
        if !self.0.has_next(p) {
            self.0.fill(Duration::ZERO).map_err(io_err)?;
        }
        Ok(self.0.next(p).map(|(o, v)| (o as u64, o as u64 + 1, v)))
    }

    fn commit(&mut self, stream: &str, pos: u64) -> io::Result<()> {
        let p = self.0.partition_of(stream).map_err(io_err)?;
        self.0.commit(p, pos as i64).map_err(io_err)
    }

    fn revoked(&mut self) -> Vec<String> {
        let c = &mut self.0;
        c.take_revoked()
            .into_iter()
            .map(|p| c.stream_name(p))
            .collect()
    }
}

/// Runs until SIGTERM/SIGINT, then writes and commits what it read. Exit 0 clean stop,
/// 1 failure (2, bad settings, is decided before).
pub fn run(args: &ArchiveArgs, settings: &Settings) -> anyhow::Result<()> {
    if !args.from_kafka {
        bail!("clickgate archive needs --from-kafka (a box archives its own log in `run` / `controlplane`)");
    }
    let Some(kafka) = settings.kafka()? else {
        bail!("clickgate archive --from-kafka needs --kafka-brokers (CLICKGATE_KAFKA_BROKERS)");
    };
    let cfg = settings.archive()?;
    let data_dir = settings.data_dir();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let consumer = PartitionConsumer::subscribe(ConsumerConfig::new(kafka, &args.group))?;
    let poll = Duration::from_millis(cfg.poll_ms);
    let mut a = Archiver::new(cfg, &data_dir, KafkaSource(consumer))?;
    let stats = a.stats();
    tracing::info!(group = %args.group, "archiving raw_clicks");
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = a.poll(false) {
            tracing::error!(error = %format!("{e:#}"), "archive poll failed; retrying");
            std::thread::sleep(poll * 10);
            continue;
        }
        // Wait for more records (or group events) up to one poll interval.
        a.source_mut().0.fill(poll)?;
    }
    tracing::info!("stopping: writing and committing what was read");
    let r = a.poll(true).or_else(|_| a.poll(true));
    let rows = stats.rows.load(Ordering::Relaxed);
    let files = stats.files.load(Ordering::Relaxed);
    a.into_source().0.close();
    r?;
    tracing::info!(rows, files, "stopped cleanly");
    Ok(())
}
