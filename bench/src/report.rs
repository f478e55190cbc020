//! The final report: text on stdout, JSON for scripts, an SVG latency plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::fresh::FreshStats;
pub use crate::net::Totals;

#[derive(Serialize, Debug, Clone)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct Config {
    pub url: String,
    pub path: String,
    pub mode: String,
    pub batch_size: usize,
    pub connections: usize,
    pub pipeline: usize,
    pub threads: usize,
    /// Target requests/s (0 = closed loop).
    pub rate: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub campaigns: u64,
    pub zipf: f64,
    pub users: u64,
    pub dup_share: f64,
    pub invalid_share: f64,
    pub bot_share: f64,
    pub burst_ips: u64,
    pub burst_share: f64,
    pub late_share: f64,
    pub seed: u64,
    /// Pooled generation: template events per thread (0: every event generated).
    pub pool: usize,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Serialize, Debug, Clone)]
pub struct Report {
    pub tool: &'static str,
    pub label: Option<String>,
    pub config: Config,
    pub machine: Machine,
    /// Length of the measurement window (warm-up excluded), seconds.
    pub duration_s: f64,
    pub requests: u64,
    pub events: u64,
    pub req_per_s: f64,
    pub events_per_s: f64,
    /// Responses by HTTP status code.
    pub status: BTreeMap<String, u64>,
    pub connection_errors: u64,
    pub protocol_errors: u64,
    /// Open loop only: requests that were due but never sent (server too slow).
    pub backlog_at_end: u64,
    /// Summed from the 202 bodies.
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Response latency in µs (open loop: from each request's intended send time).
    pub latency_us: Latency,
    /// (percentile, µs) points of the latency distribution.
    pub latency_distribution: Vec<(f64, f64)>,
    /// Whole run (warm-up, window, drain), load connections only: to reconcile with the
    /// server's own counters (add `freshness.events_accepted` for the probe's events).
    pub whole_run: Totals,
    /// Accepted-to-queryable latency (`--freshness-url`), measured window only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freshness: Option<Freshness>,
}

#[derive(Serialize, Debug, Clone)]
pub struct Freshness {
    pub query_url: String,
    pub interval_ms: f64,
    pub timeout_ms: f64,
    /// Probes answered 202 in the measured window that became visible.
    pub probes: u64,
    /// Probes answered 202 in the measured window not visible within the timeout.
    pub timeouts: u64,
    /// Time from the probe's 202 to the first query answer showing it, ms.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Whole run: probe events posted and counted accepted by the server.
    pub posted: u64,
    pub events_accepted: u64,
    /// Whole run: probe posts not answered 202 with the event accepted.
    pub post_errors: u64,
    /// Whole run: metric queries that failed (non-200, I/O error, bad body).
    pub query_errors: u64,
}

impl Freshness {
    pub fn from_stats(
        query_url: String,
        interval: std::time::Duration,
        timeout: std::time::Duration,
        f: &FreshStats,
    ) -> Self {
        let l = latency(&f.hist);
        Freshness {
            query_url,
            interval_ms: interval.as_secs_f64() * 1e3,
            timeout_ms: timeout.as_secs_f64() * 1e3,
            probes: f.hist.len(),
            timeouts: f.timeouts,
            p50_ms: l.p50 / 1e3,
            p90_ms: l.p90 / 1e3,
            p99_ms: l.p99 / 1e3,
            max_ms: l.max / 1e3,
            mean_ms: l.mean / 1e3,
            posted: f.posted,
            events_accepted: f.events_accepted,
            post_errors: f.post_errors,
            query_errors: f.query_errors,
        }
    }
}

/// Latency summary in µs from a histogram recorded in ns.
pub fn latency(h: &Histogram<u64>) -> Latency {
    let us = |ns: u64| ns as f64 / 1000.0;
    if h.is_empty() {
        return Latency {
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            p999: 0.0,
            max: 0.0,
            mean: 0.0,
        };
    }
    Latency {
        p50: us(h.value_at_quantile(0.5)),
        p90: us(h.value_at_quantile(0.9)),
        p99: us(h.value_at_quantile(0.99)),
        p999: us(h.value_at_quantile(0.999)),
        max: us(h.max()),
        mean: h.mean() / 1000.0,
    }
}

/// Percentiles on a log scale of 1/(1-q): 0%, ~44%, 68%, 82%, 90% ... 99.999%.
pub fn distribution(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    (0..=20)
        .map(|i| {
            let x = i as f64 * 0.25; // decades of 1/(1-q)
            let q = 1.0 - 10f64.powf(-x);
            let pct = (q * 100.0 * 1000.0).round() / 1000.0;
            (pct, h.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect()
}

fn fmt_int(n: u64) -> String {
    let s = n.to_string();
    let first = match s.len() % 3 {
        0 => 3.min(s.len()),
        r => r,
    };
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    out.push_str(&s[..first]);
    for chunk in s.as_bytes()[first..].chunks(3) {
        out.push(',');
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
    }
    out
}

impl Report {
    pub fn text(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let load = if c.rate > 0.0 {
            format!("open loop at {} req/s", c.rate)
        } else {
            "closed loop".to_string()
        };
        let _ = writeln!(
            s,
            "clickgate-bench {} POST {} ({}), {} connections x pipeline {}, {} thread(s), {}",
            c.url,
            c.path,
            if c.mode == "batch" {
                format!("batch of {}", c.batch_size)
            } else {
                "single".into()
            },
            c.connections,
            c.pipeline,
            c.threads,
            load
        );
        let _ = writeln!(
            s,
            "machine       {} CPUs, {}, Linux {}",
            self.machine.cpus, self.machine.cpu_model, self.machine.kernel
        );
        let _ = writeln!(
            s,
            "duration      {:.2} s measured (after {:.1} s warm-up)",
            self.duration_s, c.warmup_s
        );
        let _ = writeln!(
            s,
            "requests      {:>14}   {:>12.1} req/s",
            fmt_int(self.requests),
            self.req_per_s
        );
        let _ = writeln!(
            s,
            "events        {:>14}   {:>12.1} events/s",
            fmt_int(self.events),
            self.events_per_s
        );
        let codes: Vec<String> = self
            .status
            .iter()
            .map(|(k, v)| format!("{k}: {}", fmt_int(*v)))
            .collect();
        let _ = writeln!(
            s,
            "status        {}",
            if codes.is_empty() {
                "none".to_string()
            } else {
                codes.join(", ")
            }
        );
        let _ = writeln!(
            s,
            "errors        connection {}, protocol {}{}",
            self.connection_errors,
            self.protocol_errors,
            if c.rate > 0.0 {
                format!(", unsent backlog at end {}", self.backlog_at_end)
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "202 bodies    accepted {}, duplicates {}, rejected {}",
            fmt_int(self.accepted),
            fmt_int(self.duplicates),
            fmt_int(self.rejected)
        );
        let l = &self.latency_us;
        let _ = writeln!(
            s,
            "latency (µs)  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        if let Some(f) = &self.freshness {
            let _ = writeln!(
                s,
                "freshness (ms)  p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  ({} probes, {} timeouts{})",
                f.p50_ms,
                f.p90_ms,
                f.p99_ms,
                f.max_ms,
                f.probes,
                f.timeouts,
                if f.post_errors + f.query_errors > 0 {
                    format!(
                        "; {} failed posts, {} failed queries",
                        f.post_errors, f.query_errors
                    )
                } else {
                    String::new()
                }
            );
        }
        let w = &self.whole_run;
        let _ = writeln!(
            s,
            "whole run     {} requests sent, {} answered (accepted {}, duplicates {}, rejected {}), {} lost, {} unanswered after drain",
            fmt_int(w.requests_sent),
            fmt_int(w.responses),
            fmt_int(w.accepted),
            fmt_int(w.duplicates),
            fmt_int(w.rejected),
            w.lost,
            w.unanswered
        );
        s
    }

    /// A percentile-distribution plot (x: percentile on a log scale of 1/(1-q)).
    pub fn svg(&self) -> String {
        let (w, h) = (800.0, 480.0);
        let (left, right, top, bottom) = (80.0, 30.0, 50.0, 60.0);
        let pw = w - left - right;
        let ph = h - top - bottom;
        // Points on a fine grid for a smooth curve.
        let pts = &self.latency_distribution;
        let ymax_raw = pts.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1.0);
        let ymax = nice_ceiling(ymax_raw);
        let xmax = 5.0; // decades: up to 99.999%
        let x_of = |pct: f64| {
            let q = (pct / 100.0).min(0.999_999);
            let x = -(1.0 - q).log10();
            left + pw * (x / xmax).clamp(0.0, 1.0)
        };
        let y_of = |v: f64| top + ph * (1.0 - v / ymax);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let c = &self.config;
        let title = format!(
            "{} {} — {} conns, pipeline {}, {} — {:.0} req/s, p99 {:.0} µs",
            self.label.as_deref().unwrap_or(&c.url),
            c.path,
            c.connections,
            c.pipeline,
            if c.rate > 0.0 {
                format!("open loop {} req/s", c.rate)
            } else {
                "closed loop".into()
            },
            self.req_per_s,
            self.latency_us.p99
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="25" text-anchor="middle" font-size="14">{}</text>"#,
            w / 2.0,
            xml_escape(&title)
        );
        // Grid and axes.
        for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
            .iter()
            .enumerate()
        {
            let x = left + pw * (i as f64 / xmax);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"##,
                top + ph,
                top + ph + 18.0
            );
        }
        for i in 0..=5 {
            let v = ymax * i as f64 / 5.0;
            let y = y_of(v);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + pw,
                left - 6.0,
                y + 4.0,
                fmt_axis(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
            left + pw / 2.0,
            h - 15.0
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">latency (µs)</text>"#,
            top + ph / 2.0,
            top + ph / 2.0
        );
        let poly: Vec<String> = pts
            .iter()
            .map(|&(p, v)| format!("{:.1},{:.1}", x_of(p), y_of(v)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
            poly.join(" ")
        );
        for &(p, v) in pts {
            let _ = writeln!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#1f77b4"><title>p{p}: {v:.1} µs</title></circle>"##,
                x_of(p),
                y_of(v)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn nice_ceiling(v: f64) -> f64 {
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= v {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_axis(v: f64) -> String {
    if v >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ordered() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3).unwrap();
        let mut x = 12345u64;
        for _ in 0..100_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            h.record(1_000 + (x >> 40) % 5_000_000).unwrap();
        }
        h.record(90_000_000).unwrap();
        let l = latency(&h);
        assert!(l.p50 > 0.0);
        assert!(l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max);
        assert!((l.max - 90_000.0).abs() / 90_000.0 < 0.001);
        let d = distribution(&h);
        assert_eq!(d.first().unwrap().0, 0.0);
        assert!(d.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert!(d.last().unwrap().0 > 99.99);
    }

    #[test]
    fn empty_histogram_is_zero() {
        let h = Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3).unwrap();
        assert_eq!(latency(&h).max, 0.0);
        assert!(distribution(&h).is_empty());
    }

    #[test]
    fn formatting_helpers() {
        assert_eq!(fmt_int(0), "0");
        assert_eq!(fmt_int(1234567), "1,234,567");
        assert_eq!(fmt_int(999), "999");
        assert_eq!(nice_ceiling(730.0), 1000.0);
        assert_eq!(nice_ceiling(180.0), 200.0);
        assert_eq!(nice_ceiling(2400.0), 2500.0);
    }
}
