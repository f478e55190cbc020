//! The per-event stages, one synchronous pass on the core that received the request:
//! parse + validate → dedup (the box-wide bloom) → fraud gate (rule snapshot + the
//! box-wide per-IP minute counter) → raw record encode + frame crc into the core's log
//! buffer → pre-aggregation.
//!
//! [`ingest`] is the only implementation: the connection code calls it for every
//! `POST /v1/click(s)`, and the criterion benches and the zero-allocation test call it
//! with an in-memory log ([`MemLog`]). Nothing in it awaits: room in the log is checked
//! for the whole request first, so once an id is in the bloom its record is appended
//! before anything else runs on the core.

use std::cell::RefCell;

use clickgate_core::agg::Aggregator;
use clickgate_core::bloom::{BloomView, SharedBloom};
use clickgate_core::fraud::{Decision, IpRate, FIRED_MAX};
use clickgate_core::hash::event_hash;
use clickgate_core::parse::parse_click;
use clickgate_core::ratelimit::RateLimiter;
use clickgate_core::{Click, EventError};
use clickgate_proto::record::{encode_into, encoded_len};
use clickgate_proto::segment::{put_frame_header, FRAME_HEADER_BYTES};
use clickgate_proto::Flags;

use crate::http;
use crate::log::{CoreLog, LogFull};
use crate::metrics::{CoreMetrics, Unavailable};
pub use crate::rules::ActiveRules;

/// State shared by every core of the box, read and written in place (atomics and per-set
/// spin locks): no message to another core on the per-request path.
pub struct BoxState {
    /// Dedup over the window for the whole box.
    pub bloom: SharedBloom,
    /// Clicks per (ip, minute) for the `ip_rate` rule and the model's feature.
    pub ip_rate: IpRate,
    /// Per-address token buckets (429).
    pub limiter: RateLimiter,
}

/// Where accepted events are appended: the core's [`CoreLog`], or [`MemLog`] in benches.
pub trait EventLog {
    /// Ok when `bytes` of framed records can be appended now, in one go.
    fn room_for(&self, bytes: usize) -> Result<(), Unavailable>;
    /// Appends one record of `len` payload bytes written by `fill`; its end LSN.
    fn append_with(&self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<u64, LogFull>;
}

impl EventLog for CoreLog {
    #[inline]
    fn room_for(&self, bytes: usize) -> Result<(), Unavailable> {
        if self.failed() {
            return Err(Unavailable::LogError);
        }
        if !self.can_append(bytes) {
            return Err(Unavailable::LogFull);
        }
        Ok(())
    }

    #[inline]
    fn append_with(&self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<u64, LogFull> {
        CoreLog::append_with(self, len, fill)
    }
}

/// An in-memory ring of framed records (what `CoreLog::append_with` does before the
/// group commit writes it): for benches and tests of the stages without a disk.
pub struct MemLog {
    inner: RefCell<(Vec<u8>, usize, u64)>,
}

impl MemLog {
    pub fn new(bytes: usize) -> MemLog {
        MemLog {
            inner: RefCell::new((vec![0; bytes], 0, 0)),
        }
    }
}

impl EventLog for MemLog {
    fn room_for(&self, _bytes: usize) -> Result<(), Unavailable> {
        Ok(())
    }

    fn append_with(&self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<u64, LogFull> {
        let mut g = self.inner.borrow_mut();
        let (buf, at, lsn) = &mut *g;
        let frame = FRAME_HEADER_BYTES + len;
        if frame > buf.len() {
            return Err(LogFull);
        }
        if *at + frame > buf.len() {
            *at = 0;
        }
        let (head, payload) = buf[*at..*at + frame].split_at_mut(FRAME_HEADER_BYTES);
        fill(payload);
        put_frame_header(head, payload);
        *at += frame;
        *lsn += frame as u64;
        Ok(*lsn)
    }
}

/// Per-connection scratch, reused across requests: never reallocates once warm.
#[derive(Default)]
pub struct Scratch {
    /// Storage for the request's parsed clicks, relent with each request's lifetime.
    clicks: Vec<Click<'static>>,
    /// Lines refused in the request (line, why); for a single event, its error.
    pub rejected: Vec<(u32, EventError)>,
}

/// Parsed clicks a pooled [`Scratch`] keeps room for; a batch client's larger vectors are
/// given back when its connection ends.
const SCRATCH_CLICKS_KEEP: usize = 256;

impl Scratch {
    /// Back to a small footprint, for reuse by another connection.
    pub fn trim(&mut self) {
        if self.clicks.capacity() > SCRATCH_CLICKS_KEEP {
            self.clicks = Vec::new();
        }
        if self.rejected.capacity() > SCRATCH_CLICKS_KEEP {
            self.rejected = Vec::new();
        }
    }
}

/// What a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every valid event is logged (duplicates flagged) and aggregated; the lines refused
    /// are in `Scratch::rejected`.
    Accepted {
        accepted: u64,
        duplicates: u64,
        fraud: u64,
        /// The log position just past the last record (what `ack = disk` waits for).
        max_lsn: u64,
    },
    /// Nothing valid: the error is `Scratch::rejected[0]`, or none for an empty batch.
    Invalid,
}

/// Everything the stages touch for one request.
pub struct Stages<'a, L: EventLog> {
    pub shared: &'a BoxState,
    pub rules: &'a ActiveRules,
    pub agg: &'a mut Aggregator,
    pub log: &'a L,
    pub metrics: &'a CoreMetrics,
    pub ts_skew_ms: u64,
}

/// Reuses an emptied vector's allocation for clicks borrowing from another buffer.
/// In-place collection keeps the allocation because the layouts are identical.
fn relend<'b>(mut v: Vec<Click<'_>>) -> Vec<Click<'b>> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("vector is empty"))
        .collect()
}

/// Every stage for one request body: one event (`single`, `POST /v1/click`) or NDJSON
/// (`POST /v1/clicks`, already counted against the line bound and the rate limit).
/// A 503 (`Err`) leaves no trace: it is decided before any id enters the bloom.
pub fn ingest<L: EventLog>(
    st: &mut Stages<'_, L>,
    single: bool,
    body: &[u8],
    now_ms: u64,
    s: &mut Scratch,
) -> Result<Outcome, Unavailable> {
    s.rejected.clear();
    let mut clicks: Vec<Click<'_>> = relend(std::mem::take(&mut s.clicks));
    if single {
        match parse_click(body, now_ms, st.ts_skew_ms) {
            Ok(c) => clicks.push(c),
            Err(e) => {
                st.metrics.rejected(e.field);
                s.rejected.push((0, e));
            }
        }
    } else {
        for (line, text) in http::ndjson_lines(body) {
            match parse_click(text, now_ms, st.ts_skew_ms) {
                Ok(c) => clicks.push(c),
                Err(e) => {
                    st.metrics.rejected(e.field);
                    s.rejected.push((line, e));
                }
            }
        }
    }
    let r = if clicks.is_empty() {
        Ok(Outcome::Invalid)
    } else {
        events(st, &clicks, now_ms)
    };
    s.clicks = relend(clicks);
    r
}

/// Dedup, judge, log and aggregate the valid events of one request.
fn events<L: EventLog>(
    st: &mut Stages<'_, L>,
    clicks: &[Click<'_>],
    now_ms: u64,
) -> Result<Outcome, Unavailable> {
    // Room for every record first, at the most rule ids a record of this set carries:
    // nothing else runs on this core until the last append, so the room stays there.
    let rule_bytes = st.rules.rules.fired_bytes_max();
    let need: usize = clicks
        .iter()
        .map(|c| FRAME_HEADER_BYTES + encoded_len(c, &[]) + rule_bytes)
        .sum();
    st.log.room_for(need)?;
    let view = st.shared.bloom.view(now_ms);
    let (mut accepted, mut duplicates, mut fraud, mut max_lsn) = (0u64, 0u64, 0u64, 0u64);
    for c in clicks {
        let (flags, lsn) = event(st, &view, c, now_ms)?;
        max_lsn = lsn;
        if flags.duplicate() {
            duplicates += 1;
        } else {
            accepted += 1;
            fraud += u64::from(flags.fraud());
        }
    }
    st.metrics.accepted(accepted);
    st.metrics.duplicates(duplicates);
    Ok(Outcome::Accepted {
        accepted,
        duplicates,
        fraud,
        max_lsn,
    })
}

/// One valid event: dedup → fraud gate → encode + append → aggregation hook.
#[inline]
fn event<L: EventLog>(
    st: &mut Stages<'_, L>,
    view: &BloomView,
    c: &Click<'_>,
    now_ms: u64,
) -> Result<(Flags, u64), Unavailable> {
    let dup = st
        .shared
        .bloom
        .check_and_insert(view, event_hash(&c.event_id));
    let (flags, decision) = if dup {
        (Flags::default().with_duplicate(true), Decision::default())
    } else {
        let d = judge(st, c);
        (Flags::default().with_fraud(d.fraud()), d)
    };
    let rules = &st.rules.rules;
    let mut ids = [""; FIRED_MAX];
    for (j, &r) in decision.fired().iter().enumerate() {
        ids[j] = rules.rule_id(r);
    }
    let ids = &ids[..decision.fired().len()];
    let len = encoded_len(c, ids);
    let lsn = st
        .log
        .append_with(len, |buf| {
            encode_into(c, flags, now_ms, ids, buf)
                .expect("rule ids within the record's bounds always encode")
        })
        // Unreachable after `room_for` (nothing ran in between); a 503 all the same.
        .map_err(|_| Unavailable::LogError)?;
    // The aggregation hook: every logged event, with the log position just past it, so
    // each delta says up to where in the log it counts.
    if !flags.duplicate() {
        st.agg.add(c, !flags.fraud(), flags.fraud());
    }
    st.agg.note_log_lsn(lsn);
    Ok((flags, lsn))
}

/// The fraud gate for one new (non-duplicate) event. The per-IP minute counter counts
/// only new events: a publisher's retry must stay harmless, so a duplicate neither
/// counts toward nor is judged by the rate rule; billing, which dedups exactly, counts
/// the same way.
#[inline]
fn judge<L: EventLog>(st: &Stages<'_, L>, c: &Click<'_>) -> Decision {
    let rules = &st.rules.rules;
    if rules.is_empty() {
        return Decision::default();
    }
    let ip_clicks = if rules.needs_ip_rate() {
        st.shared.ip_rate.hit(c.ip, c.ts_ms)
    } else {
        0
    };
    let d = rules.evaluate_cached(c, ip_clicks, &mut st.rules.ua_cache.borrow_mut());
    if d.fraud() {
        st.metrics.fraud_event();
        for &r in d.fired() {
            st.metrics.fraud_rule(st.rules.slots[r as usize]);
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relend_keeps_the_allocation() {
        let mut v: Vec<Click<'static>> = Vec::with_capacity(100);
        let p = v.as_ptr() as usize;
        v.clear();
        let body = String::from("x");
        let w: Vec<Click<'_>> = relend(v);
        assert_eq!(w.as_ptr() as usize, p);
        assert!(w.capacity() >= 100);
        drop(body);
        let back: Vec<Click<'static>> = relend(w);
        assert!(back.capacity() >= 100);
    }
}
