//! Archive bench (bench/archive.sh): generates a day of raw records in memory first (not
//! timed), then hands them out — as the local log would, as borrowed slices — to the real
//! archiver writing into a directory, and reports the archiver's rows/s and Parquet bytes
//! per event. Billing of that directory is then timed by `clickgate billing` itself
//! (bench/ARCHIVE.md).
//!
//! `cg-archive-bench <archive dir> <events> [<day YYYY-MM-DD>]`

use std::borrow::Cow;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::time::Instant;

use clickgate_controlplane::archive::{
    ArchiveConfig, ArchiveLocation, Archiver, Date, RecordSource, DAY_MS,
};
use clickgate_core::hash::mix64;
use clickgate_core::{Click, Device, EventId};
use clickgate_proto::record::{self, Flags};

const STREAMS: u64 = 2;

/// `events` records split over two streams; record `i` is a pure function of `i`, so a
/// run is reproducible. 2% are late copies of an earlier event with another cost (a
/// publisher retry with an altered field).
struct Gen {
    day_start: u64,
    buf: Vec<u8>,
}

impl Gen {
    fn record(&mut self, i: u64) {
        let h = mix64(i);
        let (id_src, cost) = if h.is_multiple_of(50) && i > 1000 {
            (i - 1 - (h >> 20) % 1000, 777)
        } else {
            (i, 100_000 + (h >> 8) % 900_000)
        };
        let hid = mix64(id_src ^ 0x5eed);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&hid.to_le_bytes());
        id[8..].copy_from_slice(&mix64(hid).to_le_bytes());
        let ts = self.day_start + mix64(id_src) % DAY_MS;
        let campaign = 1 + (hid >> 7) % 1000;
        let ip = (h >> 24) % 200_000;
        let user = format!("u-{}", (h >> 13) % 1_000_000);
        let click = Click {
            event_id: EventId(id),
            ts_ms: ts,
            campaign_id: campaign,
            ad_id: campaign * 10 + h % 7,
            publisher_id: 1 + (h >> 3) % 500,
            advertiser_id: 1 + campaign % 100,
            user_id: Cow::Borrowed(&user),
            ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + ip as u32)),
            user_agent: Cow::Borrowed("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)"),
            country: *b"US",
            device: Device::Mobile,
            cost_micros: cost,
        };
        self.buf.clear();
        record::encode(&click, Flags::default(), ts + 50, &[], &mut self.buf).expect("encodes");
    }
}

/// The generated records of each stream, back to back, with their (offset, length).
struct GenSource {
    bytes: Vec<Vec<u8>>,
    rows: Vec<Vec<(u32, u32)>>,
    next: [u64; STREAMS as usize],
}

impl GenSource {
    fn generate(day_start: u64, events: u64) -> GenSource {
        let mut g = Gen {
            day_start,
            buf: Vec::new(),
        };
        let mut bytes = vec![Vec::new(); STREAMS as usize];
        let mut rows = vec![Vec::new(); STREAMS as usize];
        for i in 0..events {
            let k = (i % STREAMS) as usize;
            g.record(i);
            rows[k].push((bytes[k].len() as u32, g.buf.len() as u32));
            bytes[k].extend_from_slice(&g.buf);
        }
        GenSource {
            bytes,
            rows,
            next: [0; STREAMS as usize],
        }
    }
}

impl RecordSource for GenSource {
    fn streams(&mut self) -> io::Result<Vec<String>> {
        Ok((0..STREAMS).map(|k| format!("core-{k}")).collect())
    }
    fn committed(&mut self, _: &str) -> io::Result<u64> {
        Ok(0)
    }
    fn seek(&mut self, _: &str, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn next(&mut self, stream: &str) -> io::Result<Option<(u64, u64, &[u8])>> {
        let k: usize = stream[5..].parse().expect("core-k");
        let pos = self.next[k];
        let Some(&(off, len)) = self.rows[k].get(pos as usize) else {
            return Ok(None);
        };
        self.next[k] = pos + 1;
        let b = &self.bytes[k][off as usize..(off + len) as usize];
        Ok(Some((pos, pos + 1, b)))
    }
    fn commit(&mut self, _: &str, _: u64) -> io::Result<()> {
        Ok(())
    }
}

/// CPU time (user + system) of the calling thread, from /proc (clock ticks of 10 ms).
fn thread_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the command (which may hold spaces): state is field 3; utime and
    // stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        anyhow::bail!("usage: cg-archive-bench <archive dir> <events> [<day YYYY-MM-DD>]");
    }
    let dir = std::path::PathBuf::from(&args[1]);
    let events: u64 = args[2].parse()?;
    let day = Date::parse(args.get(3).map_or("2026-11-27", String::as_str))
        .map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&dir)?;
    let state = dir.join(".bench-state");
    let src = GenSource::generate(day.start_ms(), events);
    let cfg = ArchiveConfig {
        location: ArchiveLocation::Dir(dir.clone()),
        ..ArchiveConfig::default()
    };
    let mut a = Archiver::new(cfg, &state, src)?;
    let stats = a.stats();
    let t = Instant::now();
    let cpu0 = thread_cpu_secs();
    a.poll(true)?;
    let cpu = thread_cpu_secs() - cpu0;
    let secs = t.elapsed().as_secs_f64();
    let rows = stats.rows.load(Ordering::Relaxed);
    let bytes = stats.file_bytes.load(Ordering::Relaxed);
    println!(
        "archive: {rows} rows in {secs:.2} s = {:.0} rows/s; archiver thread CPU {cpu:.2} s = {:.0} rows per CPU-second; {} files, {bytes} bytes = {:.1} bytes/event",
        rows as f64 / secs,
        rows as f64 / cpu.max(0.01),
        stats.files.load(Ordering::Relaxed),
        bytes as f64 / rows.max(1) as f64
    );
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}
