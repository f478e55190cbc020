//! One core's local log under load: appends/s and MB/s with group commit, and fdatasync
//! latency. `cargo run --release -p clickgate-dataplane --example log_append [dir] [secs]`
//! (default: a temporary directory, 3 s per case).
//!
//! Cases: `disk-1` (one record in flight: every record waits for its own fdatasync, so
//! this is the disk's write+fsync latency), `disk-N` (N tasks each append then await
//! `durable`, as N connections with ack=disk do), `memory` (append without waiting, as
//! ack=memory does; backs off on `LogFull`).

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clickgate_dataplane::log::{CoreLog, LogConfig};
use glommio::{LocalExecutorBuilder, Placement};

const RECORD_BYTES: usize = 250;

fn main() {
    let mut args = std::env::args().skip(1);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_owned());
    let secs: u64 = args.next().map(|s| s.parse().expect("secs")).unwrap_or(3);
    LocalExecutorBuilder::new(Placement::Fixed(0))
        .io_memory(1 << 20)
        .spawn(move || async move {
            for (k, case) in ["disk-1", "disk-64", "disk-1024", "memory"].iter().enumerate() {
                let dir = root.join(format!("core-{k}"));
                let log = CoreLog::open(dir, k, LogConfig::from_dataplane(&Default::default()))
                    .await
                    .expect("open");
                let deadline = Instant::now() + Duration::from_secs(secs);
                let t0 = Instant::now();
                match case.strip_prefix("disk-") {
                    Some(n) => disk(&log, n.parse().unwrap(), deadline).await,
                    None => memory(&log, deadline).await,
                }
                log.close().await.expect("close");
                let el = t0.elapsed().as_secs_f64();
                let s = log.stats();
                println!(
                    "{case:>10}: {:>9.0} appends/s {:>7.1} MB/s  {:>6} commits ({:.1} records/commit)  write mean {:>6.1} us  fdatasync mean {:>6.1} us",
                    s.appended_records as f64 / el,
                    s.appended_bytes as f64 / el / 1e6,
                    s.commits,
                    s.appended_records as f64 / s.commits.max(1) as f64,
                    s.write_nanos_sum as f64 / s.commits.max(1) as f64 / 1e3,
                    s.fsync_nanos_sum as f64 / s.fsync_count.max(1) as f64 / 1e3,
                );
            }
        })
        .expect("executor")
        .join()
        .expect("run");
}

async fn disk(log: &CoreLog, tasks: usize, deadline: Instant) {
    let stop = Rc::new(Cell::new(false));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (log, stop) = (log.clone(), stop.clone());
        handles.push(glommio::spawn_local(async move {
            while !stop.get() {
                match log.append_with(RECORD_BYTES, |b| b.fill(0x5a)) {
                    Ok(lsn) => log.durable(lsn).await.expect("durable"),
                    Err(_) => glommio::timer::sleep(Duration::from_micros(100)).await,
                }
                if Instant::now() >= deadline {
                    stop.set(true);
                }
            }
        }));
    }
    for h in handles {
        h.await;
    }
}

async fn memory(log: &CoreLog, deadline: Instant) {
    let mut last = 0;
    while Instant::now() < deadline {
        for _ in 0..1024 {
            match log.append_with(RECORD_BYTES, |b| b.fill(0x5a)) {
                Ok(lsn) => last = lsn,
                Err(_) => {
                    log.durable(last).await.expect("durable");
                    break;
                }
            }
        }
        glommio::yield_if_needed().await;
    }
}
