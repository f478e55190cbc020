//! What an external sink of the local log (the Kafka forwarder) tells the cores.
//!
//! The forwarder runs outside the executors (its own threads, see `clickgate-kafka`); the
//! cores only read these atomics: per core, the LSN up to which the broker has
//! acknowledged the log (for `ack = kafka`), and whether the broker is reachable (for
//! `/readyz`). Written by one forwarder thread per core, read by that core: no lock.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Cores a [`SinkStatus`] has slots for; a larger box is refused at start.
pub const SINK_CORES_MAX: usize = 256;

/// Why the sink is not ready, as `/readyz` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SinkState {
    Ready = 0,
    /// No broker answered within the forwarder's timeout.
    Unreachable = 1,
    /// Deliveries fail (the error is logged and counted by the forwarder).
    Failing = 2,
}

impl SinkState {
    pub fn reason(self) -> Option<&'static str> {
        match self {
            SinkState::Ready => None,
            SinkState::Unreachable => Some("kafka broker unreachable"),
            SinkState::Failing => Some("kafka deliveries failing"),
        }
    }
}

#[derive(Debug)]
pub struct SinkStatus {
    /// Per core: every record before this LSN is acknowledged by the sink.
    acked_lsn: Box<[AtomicU64]>,
    state: AtomicU8,
    /// Records the broker acknowledged.
    pub delivered_records: AtomicU64,
    /// Deliveries that failed (each logged; the record is produced again).
    pub delivery_failures: AtomicU64,
    /// Records found already in the topic after a restart, not produced again.
    pub recovered_records: AtomicU64,
    /// Log records that did not decode (produced without a key).
    pub undecodable_records: AtomicU64,
}

impl Default for SinkStatus {
    fn default() -> Self {
        SinkStatus {
            acked_lsn: (0..SINK_CORES_MAX).map(|_| AtomicU64::new(0)).collect(),
            state: AtomicU8::new(SinkState::Ready as u8),
            delivered_records: AtomicU64::new(0),
            delivery_failures: AtomicU64::new(0),
            recovered_records: AtomicU64::new(0),
            undecodable_records: AtomicU64::new(0),
        }
    }
}

impl SinkStatus {
    /// The LSN below which core `k`'s records are acknowledged.
    pub fn acked_lsn(&self, core: usize) -> u64 {
        self.acked_lsn[core].load(Ordering::Acquire)
    }

    /// Called by the forwarder of core `k` only; never moves back.
    pub fn set_acked_lsn(&self, core: usize, lsn: u64) {
        self.acked_lsn[core].fetch_max(lsn, Ordering::AcqRel);
    }

    pub fn state(&self) -> SinkState {
        match self.state.load(Ordering::Acquire) {
            0 => SinkState::Ready,
            1 => SinkState::Unreachable,
            _ => SinkState::Failing,
        }
    }

    pub fn set_state(&self, s: SinkState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// The Kafka metrics, in the Prometheus text format of the dataplane's `/metrics`.
    pub fn render(&self, cores: usize, out: &mut String) {
        use std::fmt::Write;
        let counters = [
            (
                "clickgate_kafka_delivered_records_total",
                "Records the Kafka broker acknowledged (acks=all).",
                &self.delivered_records,
            ),
            (
                "clickgate_kafka_delivery_failures_total",
                "Kafka deliveries that failed; each is logged and produced again.",
                &self.delivery_failures,
            ),
            (
                "clickgate_kafka_recovered_records_total",
                "Records found already in the topic after a restart and not produced again.",
                &self.recovered_records,
            ),
            (
                "clickgate_kafka_undecodable_records_total",
                "Local log records that did not decode (produced without a key).",
                &self.undecodable_records,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let name = "clickgate_kafka_acked_lsn";
        let _ = writeln!(out, "# HELP {name} Local log position below which the Kafka broker acknowledged every record, per core.\n# TYPE {name} gauge");
        for k in 0..cores.min(SINK_CORES_MAX) {
            let _ = writeln!(out, "{name}{{core=\"{k}\"}} {}", self.acked_lsn(k));
        }
        let name = "clickgate_kafka_up";
        let up = u8::from(self.state() == SinkState::Ready);
        let _ = writeln!(out, "# HELP {name} 1 when the Kafka broker is reachable and deliveries succeed.\n# TYPE {name} gauge\n{name} {up}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_lsn_never_moves_back() {
        let s = SinkStatus::default();
        s.set_acked_lsn(3, 100);
        s.set_acked_lsn(3, 50);
        assert_eq!((s.acked_lsn(3), s.acked_lsn(0)), (100, 0));
        s.set_state(SinkState::Unreachable);
        assert_eq!(s.state().reason(), Some("kafka broker unreachable"));
    }
}
