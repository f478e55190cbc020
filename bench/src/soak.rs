//! Soak mode: while the load runs (and after it, until every stage caught up), scrape
//! both planes' `/metrics` and `/proc` once a second and report per stage: Kafka
//! forwarder lag, archive lag, Redis flush lag, store apply lag, the ingest rate, RSS and
//! CPU per thread group; at the end a table, a JSON report and an SVG plot of the lags.
//!
//! A stage keeps up when its lag stays bounded at the rate; it has caught up when its
//! lag is back to zero after the load stopped (records: 0; Redis: 0 s; store: its last
//! group applied within a second of receipt).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::Serialize;

use crate::net::mono_ns;

/// The stages and the metric each is read from.
pub const STAGES: [(&str, &str, &str); 4] = [
    ("kafka", "clickgate_kafka_delivery_lag_records", "records"),
    ("archive", "clickgate_archive_lag_records", "records"),
    ("redis", "clickgate_redis_flush_lag_seconds", "s"),
    ("store", "clickgate_store_apply_lag_seconds", "s"),
];

pub struct SoakCfg {
    /// `/metrics` endpoints: the dataplane (ingest port) and the controlplane (query port).
    pub endpoints: Vec<(String, SocketAddr)>,
    /// Processes whose RSS and threads' CPU are reported: (label, pid).
    pub pids: Vec<(String, u32)>,
    pub start_ns: u64,
    /// When the load (and its drain) ends.
    pub load_end_ns: u64,
    /// How long to wait after the load for every stage to catch up, at most.
    pub catchup_max: Duration,
    pub interval: Duration,
    pub quiet: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_s: f64,
    pub load: bool,
    /// Events accepted per second over the last interval (dataplane counter).
    pub accepted_per_s: f64,
    /// Per stage (as [`STAGES`]); `None` when the metric is not exported.
    pub lags: Vec<Option<f64>>,
    /// Resident memory per process (bytes).
    pub rss: BTreeMap<String, u64>,
    /// CPU per `process/thread group` over the last interval (cores).
    pub cpu: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StageSummary {
    pub stage: &'static str,
    pub unit: &'static str,
    /// Highest lag seen while the load ran.
    pub max_under_load: Option<f64>,
    /// Lag at the end of the load.
    pub at_load_end: Option<f64>,
    /// Seconds after the load ended until the lag was back to zero (`None`: never
    /// within the catch-up time, or not exported).
    pub caught_up_after_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub samples: Vec<Sample>,
    pub stages: Vec<StageSummary>,
    /// Highest RSS per process (bytes).
    pub rss_max: BTreeMap<String, u64>,
    /// Mean CPU per thread group while the load ran (cores).
    pub cpu_under_load: BTreeMap<String, f64>,
    /// Summed counters at the end: name → value (accepted, delivered, ...).
    pub totals: BTreeMap<String, f64>,
}

/// `GET /metrics` → metric name → sum over its label sets.
fn scrape(host: &str, addr: SocketAddr) -> std::io::Result<BTreeMap<String, f64>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1);
    Ok(parse_metrics(body))
}

pub fn parse_metrics(body: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for line in body.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *m.entry(name.to_string()).or_insert(0.0) += v;
        }
    }
    m
}

/// A thread's group: its name without a trailing core / worker number.
fn group_of(comm: &str) -> String {
    let t = comm.trim_end_matches(|c: char| c.is_ascii_digit());
    let t = t.trim_end_matches(['-', '_', ' ', '#', ':']);
    if t.is_empty() {
        comm.to_string()
    } else {
        t.to_string()
    }
}

/// (RSS bytes, CPU ticks per thread group) of a process.
fn proc_stats(pid: u32) -> Option<(u64, BTreeMap<String, u64>)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let mut ticks = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // Fields after the name: state is 3rd overall, utime the 14th, stime the 15th.
        let (Some(u), Some(s)) = (f.get(11), f.get(12)) else {
            continue;
        };
        let n = u.parse::<u64>().unwrap_or(0) + s.parse::<u64>().unwrap_or(0);
        *ticks.entry(group_of(comm)).or_insert(0) += n;
    }
    Some((rss, ticks))
}

fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Samples until the load ended and every stage caught up (or `catchup_max` passed).
pub fn run(cfg: SoakCfg) -> SoakReport {
    let hz = ticks_per_s();
    let mut samples: Vec<Sample> = Vec::new();
    let mut last_ticks: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_accepted: Option<f64> = None;
    let mut last_ns = cfg.start_ns;
    let mut totals;
    let interval_ns = cfg.interval.as_nanos() as u64;
    let mut next = cfg.start_ns;
    let deadline = cfg.load_end_ns + cfg.catchup_max.as_nanos() as u64;
    if !cfg.quiet {
        eprintln!(
            "{:>7} {:>5} {:>11} {:>12} {:>13} {:>9} {:>9} {:>9}",
            "t (s)",
            "load",
            "accepted/s",
            "kafka (rec)",
            "archive (rec)",
            "redis (s)",
            "store (s)",
            "RSS (MB)"
        );
    }
    loop {
        let now = mono_ns();
        if now < next {
            std::thread::sleep(Duration::from_nanos(next - now));
        }
        next += interval_ns;
        let now = mono_ns();
        let mut m = BTreeMap::new();
        for (host, addr) in &cfg.endpoints {
            if let Ok(x) = scrape(host, *addr) {
                for (k, v) in x {
                    *m.entry(k).or_insert(0.0) += v;
                }
            }
        }
        let dt = (now.saturating_sub(last_ns)) as f64 / 1e9;
        last_ns = now;
        let accepted = m.get("clickgate_ingest_events_accepted_total").copied();
        let accepted_per_s = match (accepted, last_accepted) {
            (Some(a), Some(b)) if dt > 0.0 => (a - b) / dt,
            _ => 0.0,
        };
        if accepted.is_some() {
            last_accepted = accepted;
        }
        let mut rss = BTreeMap::new();
        let mut cpu = BTreeMap::new();
        for (label, pid) in &cfg.pids {
            if let Some((r, ticks)) = proc_stats(*pid) {
                rss.insert(label.clone(), r);
                for (g, t) in ticks {
                    let key = format!("{label}/{g}");
                    if let Some(&prev) = last_ticks.get(&key) {
                        if dt > 0.0 {
                            cpu.insert(key.clone(), t.saturating_sub(prev) as f64 / hz / dt);
                        }
                    }
                    last_ticks.insert(key, t);
                }
            }
        }
        let lags: Vec<Option<f64>> = STAGES.iter().map(|s| m.get(s.1).copied()).collect();
        let load = now <= cfg.load_end_ns;
        let s = Sample {
            t_s: (now.saturating_sub(cfg.start_ns)) as f64 / 1e9,
            load,
            accepted_per_s,
            lags,
            rss,
            cpu,
        };
        if !cfg.quiet {
            let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
            eprintln!(
                "{:>7.1} {:>5} {:>11.0} {:>12} {:>13} {:>9} {:>9} {:>9.0}",
                s.t_s,
                if load { "on" } else { "off" },
                s.accepted_per_s,
                f(s.lags[0]),
                f(s.lags[1]),
                f(s.lags[2]),
                f(s.lags[3]),
                s.rss.values().sum::<u64>() as f64 / 1e6
            );
        }
        let caught_up = !load && s.lags.iter().enumerate().all(|(i, l)| caught(i, *l));
        samples.push(s);
        totals = m;
        if (caught_up && now > cfg.load_end_ns) || now >= deadline {
            break;
        }
    }
    summarize(samples, totals)
}

/// Whether stage `i`'s lag counts as caught up.
fn caught(i: usize, lag: Option<f64>) -> bool {
    match lag {
        None => true,
        Some(v) if STAGES[i].0 == "store" => v < 1.0,
        Some(v) => v <= 0.0,
    }
}

fn summarize(samples: Vec<Sample>, totals: BTreeMap<String, f64>) -> SoakReport {
    let load_end = samples
        .iter()
        .filter(|s| s.load)
        .map(|s| s.t_s)
        .fold(0.0, f64::max);
    let stages = STAGES
        .iter()
        .enumerate()
        .map(|(i, &(stage, _, unit))| {
            let under: Vec<f64> = samples
                .iter()
                .filter(|s| s.load)
                .filter_map(|s| s.lags[i])
                .collect();
            let after: Vec<&Sample> = samples.iter().filter(|s| !s.load).collect();
            // First sample after the load from which the lag stays caught up.
            let mut caught_at = None;
            for s in after.iter().rev() {
                if caught(i, s.lags[i]) {
                    caught_at = Some(s.t_s - load_end);
                } else {
                    break;
                }
            }
            StageSummary {
                stage,
                unit,
                max_under_load: under.iter().copied().reduce(f64::max),
                at_load_end: samples.iter().rfind(|s| s.load).and_then(|s| s.lags[i]),
                caught_up_after_s: if samples.iter().any(|s| s.lags[i].is_some()) {
                    caught_at
                } else {
                    None
                },
            }
        })
        .collect();
    let mut rss_max = BTreeMap::new();
    let mut cpu_sum: BTreeMap<String, (f64, u32)> = BTreeMap::new();
    for s in &samples {
        for (k, &v) in &s.rss {
            let e = rss_max.entry(k.clone()).or_insert(0);
            *e = (*e).max(v);
        }
        if s.load {
            for (k, &v) in &s.cpu {
                let e = cpu_sum.entry(k.clone()).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
    }
    let cpu_under_load = cpu_sum
        .into_iter()
        .map(|(k, (s, n))| (k, s / n.max(1) as f64))
        .filter(|(_, v)| *v >= 0.005)
        .collect();
    SoakReport {
        samples,
        stages,
        rss_max,
        cpu_under_load,
        totals,
    }
}

impl SoakReport {
    /// Markdown: the per-stage summary, memory, CPU, then one row per sample.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let f = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.2}"));
        let _ = writeln!(
            s,
            "| stage | unit | max lag under load | lag at load end | caught up after load (s) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for st in &self.stages {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                st.stage,
                st.unit,
                f(st.max_under_load),
                f(st.at_load_end),
                st.caught_up_after_s
                    .map_or("not within the catch-up time".to_string(), |x| format!(
                        "{x:.1}"
                    ))
            );
        }
        let _ = writeln!(s, "\n| process | RSS max (MiB) |\n|---|---|");
        for (k, v) in &self.rss_max {
            let _ = writeln!(s, "| {k} | {:.0} |", *v as f64 / (1 << 20) as f64);
        }
        let _ = writeln!(s, "\n| thread group | CPU under load (cores) |\n|---|---|");
        let mut cpu: Vec<_> = self.cpu_under_load.iter().collect();
        cpu.sort_by(|a, b| b.1.total_cmp(a.1));
        for (k, v) in cpu {
            let _ = writeln!(s, "| {k} | {v:.3} |");
        }
        let _ = writeln!(
            s,
            "\n| t (s) | load | accepted/s | kafka lag (records) | archive lag (records) | redis lag (s) | store apply lag (s) | RSS, all processes (MiB) |\n|---|---|---|---|---|---|---|---|"
        );
        for x in &self.samples {
            let _ = writeln!(
                s,
                "| {:.0} | {} | {:.0} | {} | {} | {} | {} | {:.0} |",
                x.t_s,
                if x.load { "on" } else { "off" },
                x.accepted_per_s,
                f(x.lags[0]),
                f(x.lags[1]),
                f(x.lags[2]),
                f(x.lags[3]),
                x.rss.values().sum::<u64>() as f64 / (1 << 20) as f64
            );
        }
        s
    }

    /// Lag over time: records (Kafka, archive) on the left axis, seconds (Redis, store)
    /// on the right, the end of the load marked.
    pub fn svg(&self, title: &str) -> String {
        let (w, h) = (900.0, 420.0);
        let (l, r, t, b) = (80.0, 80.0, 50.0, 60.0);
        let (pw, ph) = (w - l - r, h - t - b);
        let tmax = self.samples.last().map_or(1.0, |s| s.t_s).max(1.0);
        let max_of = |i: usize| {
            self.samples
                .iter()
                .filter_map(|s| s.lags[i])
                .fold(0.0f64, f64::max)
        };
        let rec_max = nice(max_of(0).max(max_of(1)).max(1.0));
        let sec_max = nice(max_of(2).max(max_of(3)).max(1.0));
        let x = |ts: f64| l + pw * ts / tmax;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="14">{}</text>"#,
            w / 2.0,
            xml(title)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
        );
        for k in 0..=4 {
            let f = k as f64 / 4.0;
            let y = t + ph * (1.0 - f);
            let _ = writeln!(
                s,
                r##"<line x1="{l}" x2="{}" y1="{y}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{:.0}</text><text x="{}" y="{}">{:.1}</text>"##,
                l + pw,
                l - 6.0,
                y + 4.0,
                rec_max * f,
                l + pw + 6.0,
                y + 4.0,
                sec_max * f
            );
        }
        for k in 0..=5 {
            let ts = tmax * k as f64 / 5.0;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{ts:.0} s</text>"#,
                x(ts),
                t + ph + 18.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="20" y="{}" transform="rotate(-90 20 {})" text-anchor="middle">lag (records)</text><text x="{}" y="{}" transform="rotate(90 {} {})" text-anchor="middle">lag (s)</text>"#,
            t + ph / 2.0,
            t + ph / 2.0,
            w - 20.0,
            t + ph / 2.0,
            w - 20.0,
            t + ph / 2.0
        );
        if let Some(end) = self.samples.iter().rfind(|s| s.load) {
            let _ = writeln!(
                s,
                r##"<line x1="{0}" x2="{0}" y1="{t}" y2="{1}" stroke="#999" stroke-dasharray="4 3"/><text x="{0}" y="{2}" text-anchor="middle" fill="#666">load stops</text>"##,
                x(end.t_s),
                t + ph,
                t - 6.0
            );
        }
        let colors = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd"];
        for (i, &(stage, _, unit)) in STAGES.iter().enumerate() {
            let max = if unit == "records" { rec_max } else { sec_max };
            let pts: Vec<String> = self
                .samples
                .iter()
                .filter_map(|s| {
                    s.lags[i].map(|v| format!("{:.1},{:.1}", x(s.t_s), t + ph * (1.0 - v / max)))
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                colors[i],
                pts.join(" ")
            );
            let _ = writeln!(
                s,
                r#"<rect x="{}" y="{}" width="12" height="3" fill="{}"/><text x="{}" y="{}">{stage} ({unit})</text>"#,
                l + 10.0 + 150.0 * i as f64,
                h - 22.0,
                colors[i],
                l + 26.0 + 150.0 * i as f64,
                h - 17.0
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * p {
            return m * p;
        }
    }
    10.0 * p
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_labels_and_threads_grouped() {
        let m = parse_metrics(
            "# HELP x y\nclickgate_kafka_acked_lsn{core=\"0\"} 10\nclickgate_kafka_acked_lsn{core=\"1\"} 5\nclickgate_redis_flush_lag_seconds 0.5\n",
        );
        assert_eq!(m["clickgate_kafka_acked_lsn"], 15.0);
        assert_eq!(m["clickgate_redis_flush_lag_seconds"], 0.5);
        assert_eq!(group_of("cg-kafka-1"), "cg-kafka");
        assert_eq!(group_of("load-12"), "load");
        assert_eq!(group_of("tokio-runtime-w"), "tokio-runtime-w");
    }

    #[test]
    fn a_stage_caught_up_when_its_lag_stays_zero_after_the_load() {
        let sample = |t: f64, load: bool, k: f64| Sample {
            t_s: t,
            load,
            accepted_per_s: 0.0,
            lags: vec![Some(k), None, Some(0.0), Some(0.1)],
            rss: BTreeMap::new(),
            cpu: BTreeMap::new(),
        };
        let r = summarize(
            vec![
                sample(1.0, true, 50.0),
                sample(2.0, true, 80.0),
                sample(3.0, false, 10.0),
                sample(4.0, false, 0.0),
                sample(5.0, false, 0.0),
            ],
            BTreeMap::new(),
        );
        assert_eq!(r.stages[0].max_under_load, Some(80.0));
        assert_eq!(r.stages[0].caught_up_after_s, Some(2.0));
        assert_eq!(r.stages[1].caught_up_after_s, None);
        assert!(r.svg("t").contains("<polyline"));
        assert!(r
            .table()
            .contains("| kafka | records | 80.00 | 80.00 | 2.0 |"));
    }
}
