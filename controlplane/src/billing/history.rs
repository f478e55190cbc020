//! The per-IP history billing keeps across days (`--ip-history`): for each IP, the days
//! it clicked on within a window of `days` days, with its deduplicated clicks and the
//! ones billing removed on each, and the day it was first seen. Billing of day D reads
//! the history written by the previous run (`--ip-history-from`, days before D only),
//! uses it as model features and in the reputation rule, then writes the history of D
//! (`ip_history.csv`, next to the invoices).
//!
//! File: `ip,first_seen,day,clicks,fraud_clicks`, one line per (IP, day with a click),
//! sorted by IP (IPv4 before IPv6, each in address order) then day; `first_seen` is the
//! same on every line of one IP. An IP is kept while it has a click within the window;
//! at most `ips_max` IPs are kept: those with the most removed clicks in the window, then
//! the most clicks, then the lowest address. The file is read in one pass with the same
//! rule applied as it goes, so memory stays bounded by `ips_max` whatever the file holds.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use clickgate_core::fraud::features::IpPast;

use crate::archive::Date;

/// The file billing writes next to the invoices.
pub const FILE_NAME: &str = "ip_history.csv";
/// Its header line.
pub const HEADER: &str = "ip,first_seen,day,clicks,fraud_clicks";
/// `--ip-history-days` when not given.
pub const DAYS_DEFAULT: u32 = 7;
/// Largest `--ip-history-days`.
pub const DAYS_MAX: u32 = 366;
/// `--ip-history-ips-max` when not given.
pub const IPS_MAX_DEFAULT: usize = 1_000_000;
/// Largest `--ip-history-ips-max`.
pub const IPS_MAX_MAX: usize = 100_000_000;
/// Longest line accepted in a history file.
const LINE_MAX: usize = 256;
/// Planned memory per IP held: key, first seen and its days' vector (56 B) and the
/// allocator's header of that vector.
pub const IP_BYTES: u64 = 72;
/// Planned memory per IP of a history read, for its lookup table (56 B entries, the
/// table at most 7/8 full and a power of two in size).
pub const INDEX_BYTES: u64 = 128;
/// Planned memory per (IP, day) held: 12 B and the vectors' rounding.
pub const DAY_BYTES: u64 = 16;

/// An IP as billing keys it: IPv4 and IPv6 apart (an IPv4-mapped address is IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpKey {
    pub v6: bool,
    pub hi: u64,
    pub lo: u64,
}

impl IpKey {
    /// The key of `ip`: billing's one keying of an address ([`super::ip_parts`]).
    pub fn of(ip: IpAddr) -> IpKey {
        let (v6, v) = super::ip_parts(ip);
        IpKey {
            v6,
            hi: (v >> 64) as u64,
            lo: v as u64,
        }
    }

    pub fn ip(&self) -> IpAddr {
        let v = u128::from(self.hi) << 64 | u128::from(self.lo);
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(v))
        } else {
            IpAddr::V4(Ipv4Addr::from((v >> 96) as u32))
        }
    }
}

/// One day of an IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DayCount {
    /// Day number (days since 1970-01-01).
    pub day: u32,
    pub clicks: u32,
    pub fraud: u32,
}

/// An IP's history: first seen, and its days in the window, in day order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpHist {
    pub first_seen: u32,
    pub days: Vec<DayCount>,
}

impl IpHist {
    /// (removed clicks, clicks) over its days: the keeping order's measure.
    fn weight(&self) -> (u64, u64) {
        self.days.iter().fold((0, 0), |(f, c), d| {
            (f + u64::from(d.fraud), c + u64::from(d.clicks))
        })
    }
}

/// The settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryConfig {
    /// The previous run's `ip_history.csv` (`None`: no history yet).
    pub from: Option<PathBuf>,
    /// Days in the window, 1..=[`DAYS_MAX`].
    pub days: u32,
    /// IPs kept, 1..=[`IPS_MAX_MAX`].
    pub ips_max: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            from: None,
            days: DAYS_DEFAULT,
            ips_max: IPS_MAX_DEFAULT,
        }
    }
}

/// The reputation rule: an IP whose removed clicks over the history's days before this
/// one are more than `share` of at least `min_clicks` clicks has every click of the day
/// that is still billable removed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reputation {
    /// 0..1.
    pub share: f64,
    /// At least 1.
    pub min_clicks: u64,
}

/// `--reputation-min-clicks` when not given.
pub const REPUTATION_MIN_CLICKS_DEFAULT: u64 = 20;

impl Reputation {
    pub fn fires(&self, p: &IpPast) -> bool {
        p.clicks >= self.min_clicks && p.fraud as f64 > self.share * p.clicks as f64
    }
}

/// IPs held at most while a history is read or made with `ips_max`: pruned back to
/// `ips_max` when this many are held.
pub fn prune_at(ips_max: usize) -> usize {
    ips_max + ips_max / 4 + 1
}

/// The history read for one day: each IP's days in the window before that day.
#[derive(Debug, Default)]
pub struct History {
    /// Day number of the day billed.
    day: u32,
    /// Sorted by key.
    ips: Vec<(IpKey, IpHist)>,
    /// Each IP's summary and position in `ips`, looked up per click (a binary search
    /// of `ips` missed the cache a dozen times per click).
    index: HashMap<IpKey, (IpPast, u32), clickgate_core::hash::IdBuildHasher>,
    /// Lines held (in the window).
    pub lines: u64,
    /// IPs left out by `ips_max` while reading.
    pub dropped: u64,
}

/// The outcome of writing the next history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub ips: u64,
    /// IPs with a click in the window not kept (over `ips_max`).
    pub dropped: u64,
}

fn day_number(d: Date) -> u32 {
    d.to_days().clamp(0, i64::from(u32::MAX)) as u32
}

/// Keeps the `max` heaviest of `v` ([`IpHist::weight`] descending, then key): the
/// history's keeping order. Returns how many were dropped.
fn keep_heaviest(v: &mut Vec<(IpKey, IpHist)>, max: usize) -> u64 {
    if v.len() <= max {
        return 0;
    }
    let dropped = (v.len() - max) as u64;
    let order = |a: &(IpKey, IpHist), b: &(IpKey, IpHist)| {
        let (wa, wb) = (a.1.weight(), b.1.weight());
        wb.cmp(&wa).then(a.0.cmp(&b.0))
    };
    v.select_nth_unstable_by(max - 1, order);
    v.truncate(max);
    dropped
}

impl History {
    /// An empty history (the first day).
    pub fn empty(day: Date) -> History {
        History {
            day: day_number(day),
            ..History::default()
        }
    }

    /// Reads `cfg.from` for billing `day`: lines of days before `day` and within the
    /// window only, at most `cfg.ips_max` IPs. Errors name the file and the line.
    pub fn load(cfg: &HistoryConfig, day: Date) -> Result<History, String> {
        let mut h = History::empty(day);
        let Some(path) = &cfg.from else {
            return Ok(h);
        };
        let name = path.display();
        let f = fs::File::open(path).map_err(|e| format!("{name}: {e}"))?;
        let first = h.day.saturating_sub(cfg.days);
        let mut r = BufReader::new(f);
        let mut line = Vec::new();
        let mut no = 0u64;
        // The IPs kept so far, and the one being read (its lines are consecutive).
        let mut kept: Vec<(IpKey, IpHist)> = Vec::new();
        let mut cur: Option<(IpKey, IpHist)> = None;
        let mut last_day = 0u32;
        // Returns the IPs dropped.
        let push = |kept: &mut Vec<(IpKey, IpHist)>, e: (IpKey, IpHist)| -> u64 {
            if e.1.days.is_empty() {
                return 0;
            }
            kept.push(e);
            // Pruned at 5/4 of the bound: the same IPs as pruning once at the end, the
            // keeping order being a total order of each IP's own lines.
            if kept.len() >= prune_at(cfg.ips_max) {
                keep_heaviest(kept, cfg.ips_max)
            } else {
                0
            }
        };
        loop {
            line.clear();
            let n = (&mut r)
                .take(LINE_MAX as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(|e| format!("{name}: {e}"))?;
            if n == 0 {
                break;
            }
            no += 1;
            let bad = |m: &str| format!("{name}: line {no}: {m}");
            if line.len() > LINE_MAX {
                return Err(bad(&format!("longer than {LINE_MAX} bytes")));
            }
            let text = std::str::from_utf8(&line)
                .map_err(|_| bad("not UTF-8"))?
                .trim_end_matches(['\n', '\r']);
            if no == 1 {
                if text != HEADER {
                    return Err(bad(&format!(
                        "not an IP history file (the header must be `{HEADER}`)"
                    )));
                }
                continue;
            }
            let f: Vec<&str> = text.split(',').collect();
            if f.len() != 5 {
                return Err(bad(&format!("{} fields, 5 expected ({HEADER})", f.len())));
            }
            let ip: IpAddr = f[0]
                .parse()
                .map_err(|_| bad(&format!("{:?} is not an IP address", f[0])))?;
            let date = |i: usize| {
                Date::parse(f[i])
                    .map(day_number)
                    .map_err(|e| bad(&format!("{}: {e}", ["", "first_seen", "day"][i])))
            };
            let (first_seen, d) = (date(1)?, date(2)?);
            let num = |i: usize| {
                f[i].parse::<u32>().map_err(|_| {
                    bad(&format!(
                        "{}: {:?} is not a count",
                        ["", "", "", "clicks", "fraud_clicks"][i],
                        f[i]
                    ))
                })
            };
            let (clicks, fraud) = (num(3)?, num(4)?);
            if clicks == 0 || fraud > clicks {
                return Err(bad(
                    "clicks must be at least 1 and fraud_clicks at most clicks",
                ));
            }
            if first_seen > d {
                return Err(bad("first_seen is after day"));
            }
            if d >= h.day {
                return Err(bad(&format!(
                    "day {} is not before the day billed ({}): the history must be an \
                     earlier day's",
                    f[2],
                    Date::from_days(i64::from(h.day))
                )));
            }
            let key = IpKey::of(ip);
            match &cur {
                Some((k, e)) if *k == key => {
                    if e.first_seen != first_seen {
                        return Err(bad("first_seen differs from the IP's previous line"));
                    }
                    if last_day >= d {
                        return Err(bad("days of one IP out of order or repeated"));
                    }
                }
                Some((k, _)) if *k > key => {
                    return Err(bad(
                        "IPs out of order (the file is sorted by IP, IPv4 first)",
                    ));
                }
                _ => {
                    if let Some(e) = cur.take() {
                        h.dropped += push(&mut kept, e);
                    }
                    cur = Some((
                        key,
                        IpHist {
                            first_seen,
                            days: Vec::new(),
                        },
                    ));
                }
            }
            last_day = d;
            if d >= first {
                let (_, e) = cur.as_mut().expect("set above");
                e.days.push(DayCount {
                    day: d,
                    clicks,
                    fraud,
                });
            }
        }
        if no == 0 {
            return Err(format!("{name}: empty (not even the header)"));
        }
        if let Some(e) = cur.take() {
            h.dropped += push(&mut kept, e);
        }
        h.dropped += keep_heaviest(&mut kept, cfg.ips_max);
        kept.sort_unstable_by_key(|(k, _)| *k);
        h.lines = kept.iter().map(|(_, e)| e.days.len() as u64).sum();
        h.index.reserve(kept.len());
        for (i, (k, e)) in kept.iter().enumerate() {
            let (fraud, clicks) = e.weight();
            let past = IpPast {
                days: e.days.len() as u32,
                clicks,
                fraud,
                age_days: h.day - e.first_seen,
            };
            h.index.insert(*k, (past, i as u32));
        }
        h.ips = kept;
        Ok(h)
    }

    /// IPs held.
    pub fn len(&self) -> usize {
        self.ips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }

    /// Planned memory of what was read.
    pub fn bytes(&self) -> u64 {
        self.ips.len() as u64 * (IP_BYTES + INDEX_BYTES) + self.lines * DAY_BYTES
    }

    /// The IP before the day billed.
    #[inline]
    pub fn past(&self, key: &IpKey) -> IpPast {
        self.index.get(key).map_or_else(IpPast::default, |e| e.0)
    }

    /// The history after the day billed: the days of the window ending with it, with
    /// the day's counts (`today` gives each IP's `(key, clicks, removed)` once, in any
    /// order, then `None`), at most `ips_max` IPs, sorted by IP; and how many IPs were
    /// left out. Holds at most [`prune_at`]`(ips_max)` IPs besides the history read.
    pub fn next(
        mut self,
        mut today: impl FnMut() -> std::io::Result<Option<(IpKey, u32, u32)>>,
        days: u32,
        ips_max: usize,
    ) -> std::io::Result<(Vec<(IpKey, IpHist)>, u64)> {
        let day = self.day;
        let first = day.saturating_sub(days - 1);
        let mut used = vec![false; self.ips.len()];
        let mut out: Vec<(IpKey, IpHist)> = Vec::new();
        let mut dropped = 0u64;
        let mut push = |out: &mut Vec<(IpKey, IpHist)>, e: (IpKey, IpHist)| {
            if !e.1.days.is_empty() {
                out.push(e);
                if out.len() >= prune_at(ips_max) {
                    dropped += keep_heaviest(out, ips_max);
                }
            }
        };
        while let Some((key, clicks, fraud)) = today()? {
            let mut e = match self.index.get(&key).map(|e| e.1 as usize) {
                Some(i) => {
                    used[i] = true;
                    std::mem::replace(
                        &mut self.ips[i].1,
                        IpHist {
                            first_seen: 0,
                            days: Vec::new(),
                        },
                    )
                }
                None => IpHist {
                    first_seen: day,
                    days: Vec::new(),
                },
            };
            e.days.retain(|d| d.day >= first);
            e.days.push(DayCount { day, clicks, fraud });
            push(&mut out, (key, e));
        }
        drop(self.index);
        for (i, (key, mut e)) in self.ips.into_iter().enumerate() {
            if !used[i] {
                e.days.retain(|d| d.day >= first);
                push(&mut out, (key, e));
            }
        }
        dropped += keep_heaviest(&mut out, ips_max);
        out.sort_unstable_by_key(|(k, _)| *k);
        Ok((out, dropped))
    }
}

/// Writes a history as [`FILE_NAME`]'s text.
pub fn write(w: &mut impl Write, ips: &[(IpKey, IpHist)]) -> std::io::Result<()> {
    writeln!(w, "{HEADER}")?;
    // Few distinct days: each one's text made once.
    let mut dates: HashMap<u32, String> = HashMap::new();
    let mut date = |d: u32| -> String {
        dates
            .entry(d)
            .or_insert_with(|| Date::from_days(i64::from(d)).to_string())
            .clone()
    };
    for (k, e) in ips {
        let ip = k.ip();
        let first = date(e.first_seen);
        for d in &e.days {
            writeln!(w, "{ip},{first},{},{},{}", date(d.day), d.clicks, d.fraud)?;
        }
    }
    Ok(())
}

/// Path of the history next to the invoices in `out`.
pub fn path_in(out: &Path) -> PathBuf {
    out.join(FILE_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> Date {
        Date::parse(s).unwrap()
    }

    fn load_text(text: &str, d: &str, days: u32, ips_max: usize) -> Result<History, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE_NAME);
        fs::write(&p, text).unwrap();
        History::load(
            &HistoryConfig {
                from: Some(p),
                days,
                ips_max,
            },
            day(d),
        )
    }

    fn text_of(ips: &[(IpKey, IpHist)]) -> String {
        let mut v = Vec::new();
        write(&mut v, ips).unwrap();
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn a_history_reads_back_what_was_written_and_gives_the_window_before_the_day() {
        let text = "ip,first_seen,day,clicks,fraud_clicks\n\
                    10.0.0.1,2026-11-20,2026-11-20,5,1\n\
                    10.0.0.1,2026-11-20,2026-11-26,4,3\n\
                    ::ffff:10.0.0.1,2026-11-26,2026-11-26,2,2\n\
                    2001:db8::1,2026-11-24,2026-11-24,7,0\n";
        let h = load_text(text, "2026-11-27", 7, 100).unwrap();
        assert_eq!(h.len(), 3);
        let v4 = IpKey::of("10.0.0.1".parse().unwrap());
        assert_eq!(
            h.past(&v4),
            IpPast {
                days: 2,
                clicks: 9,
                fraud: 4,
                age_days: 7
            }
        );
        // The IPv4-mapped address is another IP.
        let mapped = IpKey::of("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(h.past(&mapped).clicks, 2);
        assert_eq!(
            h.past(&IpKey::of("10.9.9.9".parse().unwrap())),
            IpPast::default()
        );
        // A 3-day window before 2026-11-27 starts on 2026-11-24: the 20th is out.
        let h3 = load_text(text, "2026-11-27", 3, 100).unwrap();
        assert_eq!(h3.past(&v4).clicks, 4);
        assert_eq!(h3.past(&v4).age_days, 7, "first seen stays");

        // The next day: today's counts added, the window moved, sorted, first seen kept.
        let today = vec![(IpKey::of("10.0.0.2".parse().unwrap()), 3, 0), (v4, 1, 1)];
        let mut it = today.into_iter();
        let (next, dropped) = h.next(|| Ok(it.next()), 7, 100).unwrap();
        assert_eq!(dropped, 0);
        assert_eq!(
            text_of(&next),
            "ip,first_seen,day,clicks,fraud_clicks\n\
             10.0.0.1,2026-11-20,2026-11-26,4,3\n\
             10.0.0.1,2026-11-20,2026-11-27,1,1\n\
             10.0.0.2,2026-11-27,2026-11-27,3,0\n\
             ::ffff:10.0.0.1,2026-11-26,2026-11-26,2,2\n\
             2001:db8::1,2026-11-24,2026-11-24,7,0\n"
        );
        // Read back the day after: the same history.
        let again = load_text(&text_of(&next), "2026-11-28", 7, 100).unwrap();
        assert_eq!(again.ips, next);
    }

    #[test]
    fn the_bound_keeps_the_ips_with_the_most_removed_clicks_then_clicks_then_address() {
        let mut text = String::from(HEADER);
        text.push('\n');
        // 10.0.0.k: k clicks, k % 3 removed.
        for k in 1..=60u32 {
            text.push_str(&format!("10.0.0.{k},2026-11-26,2026-11-26,{k},{}\n", k % 3));
        }
        let h = load_text(&text, "2026-11-27", 7, 10).unwrap();
        assert_eq!(h.len(), 10);
        assert_eq!(h.dropped, 50);
        let mut want: Vec<u32> = (1..=60).collect();
        want.sort_by_key(|k| (std::cmp::Reverse(k % 3), std::cmp::Reverse(*k)));
        want.truncate(10);
        want.sort_unstable();
        let got: Vec<u32> = h
            .ips
            .iter()
            .map(|(k, _)| match k.ip() {
                IpAddr::V4(a) => u32::from(a.octets()[3]),
                IpAddr::V6(_) => unreachable!(),
            })
            .collect();
        assert_eq!(got, want);
        // The same IPs whatever the pruning point (a bound of 10 prunes many times; one
        // of 60 never does, then the next day's bound of 10 keeps the same ones).
        let all = load_text(&text, "2026-11-27", 7, 60).unwrap();
        let (next, dropped) = all.next(|| Ok(None), 7, 10).unwrap();
        assert_eq!(dropped, 50);
        assert_eq!(next, h.ips);
    }

    #[test]
    fn bad_history_files_are_refused_naming_the_line() {
        let h = HEADER;
        let cases = [
            ("", "empty"),
            ("ip,day\n", "line 1: not an IP history file"),
            (
                &format!("{h}\n1.2.3.4,2026-11-26,2026-11-26,3\n") as &str,
                "line 2: 4 fields",
            ),
            (
                &format!("{h}\nhost,2026-11-26,2026-11-26,3,0\n"),
                "line 2: \"host\" is not an IP",
            ),
            (
                &format!("{h}\n1.2.3.4,2026-11-26,2026-11-27,3,0\n"),
                "line 2: day 2026-11-27 is not before the day billed",
            ),
            (
                &format!("{h}\n1.2.3.4,2026-11-26,2026-11-25,3,0\n"),
                "first_seen is after day",
            ),
            (
                &format!("{h}\n1.2.3.4,2026-11-25,2026-11-26,3,4\n"),
                "fraud_clicks at most clicks",
            ),
            (
                &format!("{h}\n1.2.3.4,2026-11-25,2026-11-26,-3,0\n"),
                "clicks: \"-3\" is not a count",
            ),
            (
                &format!("{h}\n1.2.3.4,2026-11-25,2026-13-26,3,0\n"),
                "day: \"2026-13-26\"",
            ),
            (
                &format!(
                    "{h}\n1.2.3.5,2026-11-25,2026-11-25,3,0\n1.2.3.4,2026-11-25,2026-11-25,3,0\n"
                ),
                "line 3: IPs out of order",
            ),
            (
                &format!(
                    "{h}\n1.2.3.4,2026-11-25,2026-11-26,3,0\n1.2.3.4,2026-11-25,2026-11-26,3,0\n"
                ),
                "line 3: days of one IP out of order",
            ),
            (
                &format!(
                    "{h}\n1.2.3.4,2026-11-25,2026-11-25,3,0\n1.2.3.4,2026-11-24,2026-11-26,3,0\n"
                ),
                "first_seen differs",
            ),
            (
                &format!("{h}\n1.2.3.4,{}\n", "x".repeat(300)),
                "longer than 256 bytes",
            ),
        ];
        for (text, want) in cases {
            let e = load_text(text, "2026-11-27", 7, 100).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains(FILE_NAME), "{e}");
        }
    }

    #[test]
    fn the_reputation_rule_needs_enough_clicks_and_a_share_above_the_threshold() {
        let r = Reputation {
            share: 0.5,
            min_clicks: 4,
        };
        let p = |clicks, fraud| IpPast {
            days: 1,
            clicks,
            fraud,
            age_days: 1,
        };
        assert!(!r.fires(&p(3, 3)), "too few clicks");
        assert!(!r.fires(&p(4, 2)), "exactly the share is not above it");
        assert!(r.fires(&p(4, 3)));
        assert!(!r.fires(&IpPast::default()));
    }
}
