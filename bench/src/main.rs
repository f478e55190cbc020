//! clickgate-bench: HTTP/1.1 load generator for the clickgate ingest API.
//!
//! Few threads, each a hand-rolled epoll loop over many keep-alive connections;
//! request bytes are written by hand into reused buffers and responses are parsed
//! only as far as status line, Content-Length and the 202 body counters.

mod fresh;
mod gen;
mod net;
mod report;
mod resp;
mod soak;

use std::io::IsTerminal;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use crate::gen::Mix;
use crate::net::{mono_ns, Progress, Stats, WorkerCfg};
use crate::report::{Config, Freshness, Machine, Report};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Mode {
    /// `POST /v1/click`, one JSON event per request.
    Single,
    /// `POST /v1/clicks`, NDJSON with --batch-size events per request.
    Batch,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 10s, 500ms, 2m)"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("not a number: {s:?}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a share in 0..=1"))
    }
}

/// Load generator for clickgate's HTTP ingest API (docs/api.md).
#[derive(Parser, Debug)]
#[command(name = "clickgate-bench", version)]
struct Args {
    /// Target, http://host:port (the path is chosen by --mode).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, value_enum, default_value = "single")]
    mode: Mode,
    /// Events per request in batch mode.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Keep-alive connections (spread over the threads).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Measured time (after the warm-up), e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before measuring starts.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// 0: closed loop as fast as possible; N: open loop at N requests/s in total,
    /// latency measured from each request's intended send time.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Load threads (each one epoll loop).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Distinct campaign ids (1..=N), Zipf-distributed popularity.
    #[arg(long, default_value_t = 1000)]
    campaigns: u64,
    /// Zipf exponent of campaign popularity.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Distinct user ids.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Share of events re-sending an earlier event_id.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    dup_share: f64,
    /// Share of events with a broken field.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    invalid_share: f64,
    /// Share of events whose user agent contains "bot".
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    bot_share: f64,
    /// Number of "burst" IPs (in 198.18.0.0/15) that send --burst-share of the events.
    #[arg(long, default_value_t = 0)]
    burst_ips: u64,
    /// Share of events sent from the burst IPs (when --burst-ips > 0).
    #[arg(long, default_value_t = 0.5, value_parser = parse_share)]
    burst_share: f64,
    /// Share of events with a timestamp up to an hour in the past.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    late_share: f64,
    /// Seed of the traffic mix (event ids are unique per run whatever the seed).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pooled generation: pre-generate N events per thread and send copies of random ones
    /// with a fresh event_id (or a --dup-share duplicate) and the current ts patched in.
    /// About 4x cheaper per event than generating each one (0: generate every event),
    /// at the cost of only N variants of the other fields.
    #[arg(long, default_value_t = 0)]
    pool: usize,
    /// After the measured window, wait this long for the responses still outstanding
    /// (nothing new is sent); they count only in the whole-run totals.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    drain: Duration,
    /// Freshness probe: the query API (e.g. http://127.0.0.1:8081). While the load runs,
    /// a single event with a campaign id of its own is posted every --freshness-interval
    /// and the query API polled every 5 ms until it shows it. Off when not given.
    #[arg(long)]
    freshness_url: Option<String>,
    /// Time between freshness probes.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    freshness_interval: Duration,
    /// A probe not visible this long after its 202 counts as a timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    freshness_timeout: Duration,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a latency percentile plot (SVG) to this file.
    #[arg(long)]
    latency_svg: Option<PathBuf>,
    /// A name for this run in the reports (e.g. "nginx" or "clickgate").
    #[arg(long)]
    label: Option<String>,
    /// No live progress line.
    #[arg(long, short)]
    quiet: bool,
    /// Soak mode: `/metrics` URLs to sample once a second (the dataplane's ingest URL and
    /// the controlplane's query URL, comma-separated), during the load and after it until
    /// every stage caught up; see bench/soak.sh.
    #[arg(long, value_delimiter = ',')]
    soak_metrics: Vec<String>,
    /// Soak mode: processes whose RSS and per-thread CPU are reported, `label=pid`
    /// (comma-separated); this load tool is always reported as `load`.
    #[arg(long, value_delimiter = ',')]
    soak_pids: Vec<String>,
    /// Soak mode: after the load, wait at most this long for every stage to catch up.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    soak_catchup: Duration,
    /// Soak mode: write the report (samples, per-stage summary, totals) as JSON here.
    #[arg(long)]
    soak_json: Option<PathBuf>,
    /// Soak mode: write the Markdown table here.
    #[arg(long)]
    soak_table: Option<PathBuf>,
    /// Soak mode: write the SVG plot of lag over time here.
    #[arg(long)]
    soak_svg: Option<PathBuf>,
}

/// host:port from `http://host:port[/...]`.
fn parse_url(url: &str) -> Result<(String, SocketAddr)> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("https://") {
        bail!("https is not supported: {url}");
    } else if url.contains("://") {
        bail!("unsupported scheme in {url}");
    } else {
        url
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        bail!("no host in {url:?}");
    }
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_string()
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {authority}"))?
        .collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .with_context(|| format!("{authority} resolves to no address"))?;
    Ok((authority.to_string(), addr))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clickgate-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<ExitCode> {
    if args.connections == 0 || args.pipeline == 0 || args.threads == 0 {
        bail!("--connections, --pipeline and --threads must be at least 1");
    }
    if args.mode == Mode::Batch && args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.duration.is_zero() {
        bail!("--duration must be positive");
    }
    if args.rate < 0.0 || !args.rate.is_finite() {
        bail!("--rate must be >= 0");
    }
    if args.freshness_interval.is_zero() || args.freshness_timeout.is_zero() {
        bail!("--freshness-interval and --freshness-timeout must be positive");
    }
    let threads = args.threads.min(args.connections);
    let (host, addr) = parse_url(&args.url)?;
    let query = args.freshness_url.as_deref().map(parse_url).transpose()?;

    // Fail fast and clearly if nothing listens there.
    if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        eprintln!(
            "clickgate-bench: error: target {} ({addr}) is unreachable: {e}",
            args.url
        );
        return Ok(ExitCode::from(1));
    }

    let mix = Mix {
        campaigns: args.campaigns.max(1),
        zipf: args.zipf,
        users: args.users.max(1),
        dup_share: args.dup_share,
        invalid_share: args.invalid_share,
        bot_share: args.bot_share,
        burst_ips: args.burst_ips,
        burst_share: args.burst_share,
        late_share: args.late_share,
    };
    // Run nonce: event ids differ between runs even with the same seed, so repeated
    // runs against one server are not all duplicates.
    let nonce = gen::mix64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ ((std::process::id() as u64) << 32),
    );
    let batch = if args.mode == Mode::Batch {
        args.batch_size
    } else {
        0
    };
    let start_ns = mono_ns() + 20_000_000;
    let warm_end_ns = start_ns + args.warmup.as_nanos() as u64;
    let end_ns = warm_end_ns + args.duration.as_nanos() as u64;
    let progress = Arc::new(Progress::default());

    let mut handles = Vec::new();
    for t in 0..threads {
        let conns = args.connections / threads + usize::from(t < args.connections % threads);
        let cfg = WorkerCfg {
            addr,
            host: host.clone(),
            batch,
            connections: conns,
            pipeline: args.pipeline,
            rate: args.rate * conns as f64 / args.connections as f64,
            start_ns,
            warm_end_ns,
            end_ns,
            drain_ns: args.drain.as_nanos() as u64,
            mix: mix.clone(),
            seed: args.seed.wrapping_add(t as u64),
            stream: nonce ^ gen::mix64(t as u64 + 1),
            pool: args.pool,
        };
        let p = progress.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn(move || {
                    // Let every worker build its state before the clock starts.
                    let wait = start_ns.saturating_sub(mono_ns());
                    std::thread::sleep(Duration::from_nanos(wait));
                    net::run_worker(cfg, p)
                })?,
        );
    }

    let probe = match &query {
        Some((query_host, query_addr)) => {
            if let Err(e) = TcpStream::connect_timeout(query_addr, Duration::from_secs(3)) {
                eprintln!(
                    "clickgate-bench: error: freshness target {} ({query_addr}) is unreachable: {e}",
                    args.freshness_url.as_deref().unwrap_or_default()
                );
                return Ok(ExitCode::from(1));
            }
            let cfg = fresh::FreshCfg {
                ingest: addr,
                ingest_host: host.clone(),
                query: *query_addr,
                query_host: query_host.clone(),
                interval_ns: args.freshness_interval.as_nanos() as u64,
                timeout_ns: args.freshness_timeout.as_nanos() as u64,
                start_ns,
                warm_end_ns,
                end_ns,
                // Per run, so earlier runs' probes against the same server never match.
                run_base: (nonce % 1_000_000) * 1_000_000,
            };
            Some(
                std::thread::Builder::new()
                    .name("freshness".into())
                    .spawn(move || {
                        let wait = start_ns.saturating_sub(mono_ns());
                        std::thread::sleep(Duration::from_nanos(wait));
                        fresh::run_probe(cfg)
                    })?,
            )
        }
        None => None,
    };

    let soak = if args.soak_metrics.is_empty() {
        None
    } else {
        let endpoints = args
            .soak_metrics
            .iter()
            .map(|u| parse_url(u))
            .collect::<Result<Vec<_>>>()?;
        let mut pids = vec![("load".to_string(), std::process::id())];
        for p in &args.soak_pids {
            let (label, pid) = p
                .split_once('=')
                .with_context(|| format!("--soak-pids: {p:?} is not label=pid"))?;
            let pid: u32 = pid
                .parse()
                .with_context(|| format!("--soak-pids: bad pid in {p:?}"))?;
            pids.push((label.to_string(), pid));
        }
        let cfg = soak::SoakCfg {
            endpoints,
            pids,
            start_ns,
            load_end_ns: end_ns + args.drain.as_nanos() as u64,
            catchup_max: args.soak_catchup,
            interval: Duration::from_secs(1),
            quiet: args.quiet,
        };
        Some(
            std::thread::Builder::new()
                .name("soak".into())
                .spawn(move || soak::run(cfg))?,
        )
    };
    let live = !args.quiet && soak.is_none() && std::io::stderr().is_terminal();
    let mut last = (0u64, 0u64, 0u64);
    let mut last_t = start_ns;
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(if live { 1000 } else { 100 }));
        if live {
            let now = mono_ns();
            let cur = (
                progress.requests.load(Ordering::Relaxed),
                progress.events.load(Ordering::Relaxed),
                progress.errors.load(Ordering::Relaxed),
            );
            let dt = (now.saturating_sub(last_t)) as f64 / 1e9;
            if dt > 0.0 && now > start_ns && now <= end_ns {
                let phase = if now < warm_end_ns {
                    "warm-up"
                } else {
                    "measure"
                };
                eprintln!(
                    "[{:>5.1}s {phase}] {:>10.0} req/s {:>12.0} events/s  errors {}",
                    (now - start_ns) as f64 / 1e9,
                    (cur.0 - last.0) as f64 / dt,
                    (cur.1 - last.1) as f64 / dt,
                    cur.2 - last.2
                );
            }
            last = cur;
            last_t = now;
        }
    }
    let mut total = Stats::new();
    for h in handles {
        let s = h
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?
            .context("load thread failed")?;
        total.merge(&s);
    }
    let freshness = match probe {
        Some(h) => {
            let f = h
                .join()
                .map_err(|_| anyhow::anyhow!("the freshness thread panicked"))?;
            Some(Freshness::from_stats(
                args.freshness_url.clone().unwrap_or_default(),
                args.freshness_interval,
                args.freshness_timeout,
                &f,
            ))
        }
        None => None,
    };

    let secs = args.duration.as_secs_f64();
    let status = total
        .status
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(code, &n)| (code.to_string(), n))
        .collect();
    let report = Report {
        tool: "clickgate-bench",
        label: args.label.clone(),
        config: Config {
            url: args.url.clone(),
            path: if batch == 0 {
                "/v1/click"
            } else {
                "/v1/clicks"
            }
            .to_string(),
            mode: if batch == 0 { "single" } else { "batch" }.to_string(),
            batch_size: batch.max(1),
            connections: args.connections,
            pipeline: args.pipeline,
            threads,
            rate: args.rate,
            duration_s: secs,
            warmup_s: args.warmup.as_secs_f64(),
            campaigns: mix.campaigns,
            zipf: mix.zipf,
            users: mix.users,
            dup_share: mix.dup_share,
            invalid_share: mix.invalid_share,
            bot_share: mix.bot_share,
            burst_ips: mix.burst_ips,
            burst_share: mix.burst_share,
            late_share: mix.late_share,
            seed: args.seed,
            pool: args.pool,
        },
        machine: Machine::detect(),
        duration_s: secs,
        requests: total.requests,
        events: total.events,
        req_per_s: total.requests as f64 / secs,
        events_per_s: total.events as f64 / secs,
        status,
        connection_errors: total.conn_errors,
        protocol_errors: total.protocol_errors,
        backlog_at_end: total.backlog_at_end,
        accepted: total.accepted,
        duplicates: total.duplicates,
        rejected: total.rejected,
        latency_us: report::latency(&total.hist),
        latency_distribution: report::distribution(&total.hist),
        whole_run: total.total,
        freshness,
    };
    print!("{}", report.text());
    if let Some(p) = &args.json {
        let mut s = serde_json::to_string(&report)?;
        s.push('\n');
        std::fs::write(p, s).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.latency_svg {
        std::fs::write(p, report.svg()).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(h) = soak {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("the soak thread panicked"))?;
        let table = r.table();
        println!("\n{table}");
        if let Some(p) = &args.soak_json {
            let mut s = serde_json::to_string(&r)?;
            s.push('\n');
            std::fs::write(p, s).with_context(|| format!("writing {}", p.display()))?;
        }
        if let Some(p) = &args.soak_table {
            std::fs::write(p, &table).with_context(|| format!("writing {}", p.display()))?;
        }
        if let Some(p) = &args.soak_svg {
            let title = format!(
                "{} — lag per stage, {:.0} events/s offered for {:.0} s",
                args.label.as_deref().unwrap_or("clickgate soak"),
                args.rate * batch.max(1) as f64,
                secs
            );
            std::fs::write(p, r.svg(&title)).with_context(|| format!("writing {}", p.display()))?;
        }
    }
    if total.requests == 0 {
        eprintln!(
            "clickgate-bench: error: no response received in the measurement window \
             ({} connection errors, {} protocol errors)",
            total.conn_errors, total.protocol_errors
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn urls() {
        let (h, a) = parse_url("http://127.0.0.1:8080").unwrap();
        assert_eq!((h.as_str(), a.port()), ("127.0.0.1:8080", 8080));
        let (h, a) = parse_url("127.0.0.1:9000/v1/click").unwrap();
        assert_eq!((h.as_str(), a.port()), ("127.0.0.1:9000", 9000));
        let (_, a) = parse_url("http://[::1]:8081").unwrap();
        assert!(a.is_ipv6());
        assert!(parse_url("https://x:1").is_err());
    }
}
