//! The per-core delta shipper: every `flush_interval_ms` it drains the core's
//! [`Aggregator`] and sends the delta to the controlplane's Unix socket as rkyv
//! [`DeltaFrame`]s, keeping every frame until its ack says it is durable there.
//!
//! One glommio task per core, on that core's executor: it shares the aggregator with the
//! per-event path through an `Rc<RefCell<_>>` (same thread, never borrowed across an
//! await), so the event path never waits on the controlplane.
//!
//! ## Never losing counts, bounded
//! - A drained delta becomes a *pending* entry. Its delta ids are assigned when it is
//!   first sent; from then on it is immutable and resent as is after a reconnect (the
//!   controlplane skips ids it already applied, so a resend after a lost ack is harmless).
//! - At most `unacked_frames_max` pending entries. When full, the next drain is **merged**
//!   into the newest pending entry if that one was never sent (merging sent frames could
//!   count an applied one twice), as long as it stays under `pending_entries_max` keys.
//!   Otherwise the drain is **deferred**: the aggregator keeps counting in place, bounded by
//!   its own `keys_max`, past which new keys are refused and counted in
//!   `clickgate_agg_overflow_total` (those events are still in the raw log and billed).
//! - Each delta id is used once per `(box_id, instance_id, core)`; a new process takes a
//!   new `instance_id`, so ids may restart.
//!
//! ## Connection
//! Connect (bounded by `io_timeout_ms`), send what the connection has not carried yet,
//! then read acks until every sent frame is acked, each read bounded by `io_timeout_ms`.
//! Any error or timeout drops the connection; reconnects back off from
//! `reconnect_backoff_min_ms`, doubling up to `reconnect_backoff_max_ms`.
//!
//! ## Shutdown
//! [`ShipperHandle::flush_and_stop`] drains once more and tries for up to
//! `stop_timeout_ms` to get everything acked; what is still unacked then is reported
//! (lost to the real-time view only: the events are in the log).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clickgate_core::agg::{Aggregator, Delta};
use clickgate_proto::frames::{
    access_ack, aligned, encode_delta, frame_len, frames_from_delta, FRAME_ENTRIES_MAX,
};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::UnixStream;
use glommio::Task;

use crate::config::{DataplaneConfig, AGG_FLUSH_INTERVAL_MS_MAX};

/// Largest ack frame a shipper reads.
const ACK_BYTES_MAX: u32 = 4096;

#[derive(Clone, Debug)]
pub struct ShipConfig {
    /// The controlplane's socket (`<data_dir>/control.sock` by default).
    pub socket_path: PathBuf,
    /// Stable id of this box.
    pub box_id: u64,
    /// Id of this process run; [`ShipConfig::fresh_instance_id`] by default.
    pub instance_id: u64,
    /// The core's log LSN when this run opened its log (see `DeltaFrame::start_lsn`).
    pub start_lsn: u64,
    /// ≤ [`AGG_FLUSH_INTERVAL_MS_MAX`] (the freshness promise is ≤ 1 s).
    pub flush_interval_ms: u64,
    pub unacked_frames_max: usize,
    /// Keys a never-sent pending delta may grow to by merging.
    pub pending_entries_max: usize,
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// Bound on a connect, a send, and each ack read.
    pub io_timeout_ms: u64,
    /// How long `flush_and_stop` tries to get the last deltas acked.
    pub stop_timeout_ms: u64,
}

impl ShipConfig {
    /// The defaults; the interval and the unacked bound are [`DataplaneConfig`]'s.
    pub fn new(socket_path: PathBuf) -> ShipConfig {
        let d = DataplaneConfig::default();
        ShipConfig {
            socket_path,
            box_id: 0,
            instance_id: Self::fresh_instance_id(),
            start_lsn: 0,
            flush_interval_ms: d.agg_flush_interval_ms,
            unacked_frames_max: d.ship_unacked_frames_max,
            pending_entries_max: 200_000,
            reconnect_backoff_min_ms: 50,
            reconnect_backoff_max_ms: 2_000,
            io_timeout_ms: 5_000,
            stop_timeout_ms: 5_000,
        }
    }

    /// A process-unique id: wall-clock ns mixed with the pid.
    pub fn fresh_instance_id() -> u64 {
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        clickgate_core::hash::mix64(ns ^ (std::process::id() as u64) << 32)
    }
}

/// What the shipper has done so far (for `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShipStats {
    pub frames_sent: u64,
    pub frames_acked: u64,
    /// Drains merged into a pending delta because the queue was full.
    pub drains_merged: u64,
    /// Drains skipped because the queue was full (the aggregator kept counting).
    pub drains_deferred: u64,
    pub connects: u64,
    pub connect_failures: u64,
    pub pending: u64,
    pub connected: bool,
}

/// What was left when the shipper stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShipReport {
    pub unacked_deltas: u64,
    pub unacked_entries: u64,
}

#[derive(Default)]
struct Counters {
    frames_sent: Cell<u64>,
    frames_acked: Cell<u64>,
    drains_merged: Cell<u64>,
    drains_deferred: Cell<u64>,
    connects: Cell<u64>,
    connect_failures: Cell<u64>,
    pending: Cell<u64>,
    connected: Cell<bool>,
}

fn bump(c: &Cell<u64>, by: u64) {
    c.set(c.get() + by);
}

pub struct ShipperHandle {
    stop: LocalSender<()>,
    task: Task<ShipReport>,
    stats: Rc<Counters>,
}

impl ShipperHandle {
    pub fn stats(&self) -> ShipStats {
        let s = &self.stats;
        ShipStats {
            frames_sent: s.frames_sent.get(),
            frames_acked: s.frames_acked.get(),
            drains_merged: s.drains_merged.get(),
            drains_deferred: s.drains_deferred.get(),
            connects: s.connects.get(),
            connect_failures: s.connect_failures.get(),
            pending: s.pending.get(),
            connected: s.connected.get(),
        }
    }

    /// Drains the aggregator one last time, ships and waits for acks (bounded by
    /// `stop_timeout_ms`), then ends the task.
    pub async fn flush_and_stop(self) -> ShipReport {
        let _ = self.stop.try_send(());
        self.task.await
    }
}

/// Starts core `core`'s shipper on the current glommio executor.
pub fn spawn_shipper(core: usize, agg: Rc<RefCell<Aggregator>>, cfg: ShipConfig) -> ShipperHandle {
    assert!(
        cfg.flush_interval_ms > 0 && cfg.flush_interval_ms <= AGG_FLUSH_INTERVAL_MS_MAX,
        "flush_interval_ms"
    );
    assert!(cfg.unacked_frames_max > 0, "unacked_frames_max");
    let (stop, stop_rx) = local_channel::new_bounded(1);
    let stats = Rc::new(Counters::default());
    let mut shipper = Shipper {
        core: core as u32,
        agg,
        backoff_ms: cfg.reconnect_backoff_min_ms,
        cfg,
        queue: VecDeque::new(),
        next_delta_id: 1,
        shipped_lsn: 0,
        conn: None,
        next_connect: Instant::now(),
        stats: stats.clone(),
    };
    let task = glommio::spawn_local(async move {
        let interval = Duration::from_millis(shipper.cfg.flush_interval_ms);
        loop {
            // A stop message, or the handle's sender dropped: either way, stop.
            let stopping = futures_lite::future::or(
                async {
                    let _ = stop_rx.recv().await;
                    true
                },
                async {
                    glommio::timer::sleep(interval).await;
                    false
                },
            )
            .await;
            if stopping {
                return shipper.finish().await;
            }
            shipper.drain(false);
            shipper.exchange().await;
        }
    });
    ShipperHandle { stop, task, stats }
}

struct Pending {
    /// Ids of its frames once first sent: `first..=last`.
    ids: Option<(u64, u64)>,
    delta: Delta,
    /// Encoded frames (with length prefixes), once ids are assigned.
    wire: Vec<u8>,
    frames: u64,
    /// Sent on the current connection.
    on_conn: bool,
}

/// One core's shipper state; lives inside its task.
pub struct Shipper {
    core: u32,
    agg: Rc<RefCell<Aggregator>>,
    cfg: ShipConfig,
    queue: VecDeque<Pending>,
    next_delta_id: u64,
    /// Log LSN of the newest delta queued.
    shipped_lsn: u64,
    conn: Option<UnixStream>,
    next_connect: Instant,
    backoff_ms: u64,
    stats: Rc<Counters>,
}

async fn bounded<T>(ms: u64, f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    futures_lite::future::or(f, async {
        glommio::timer::sleep(Duration::from_millis(ms)).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
    })
    .await
}

impl Shipper {
    /// Moves the aggregator's counts into the queue (or merges, or defers: see the
    /// module docs). `force`: at shutdown, queue even past the bound.
    fn drain(&mut self, force: bool) {
        let full = self.queue.len() >= self.cfg.unacked_frames_max;
        let agg_len = self.agg.borrow().len();
        let mergeable = self.queue.back().is_some_and(|p| {
            p.ids.is_none() && p.delta.entries.len() + agg_len <= self.cfg.pending_entries_max
        });
        if full && !mergeable && !force {
            bump(&self.stats.drains_deferred, 1);
            return;
        }
        let delta = self.agg.borrow_mut().drain_delta();
        if delta.is_empty() && delta.log_lsn <= self.shipped_lsn {
            self.agg.borrow_mut().recycle(delta);
            return;
        }
        self.shipped_lsn = self.shipped_lsn.max(delta.log_lsn);
        if full && mergeable {
            let back = self.queue.back_mut().expect("mergeable implies non-empty");
            back.delta.merge(delta);
            bump(&self.stats.drains_merged, 1);
        } else {
            self.queue.push_back(Pending {
                ids: None,
                delta,
                wire: Vec::new(),
                frames: 0,
                on_conn: false,
            });
        }
        self.stats.pending.set(self.queue.len() as u64);
    }

    fn assign_ids(&mut self, i: usize) {
        let p = &mut self.queue[i];
        if p.ids.is_some() {
            return;
        }
        let mut frames = frames_from_delta(
            self.cfg.box_id,
            self.cfg.instance_id,
            self.core,
            self.next_delta_id,
            &p.delta,
        );
        for f in &mut frames {
            f.start_lsn = self.cfg.start_lsn;
        }
        for f in &frames {
            // Frames built from a drained delta always encode: entries are bounded by
            // FRAME_ENTRIES_MAX, which fits FRAME_BYTES_MAX (checked at compile time).
            encode_delta(f, &mut p.wire).expect("delta frame encodes");
        }
        let n = frames.len() as u64;
        debug_assert!(p.delta.entries.len() <= FRAME_ENTRIES_MAX * n as usize);
        p.ids = Some((self.next_delta_id, self.next_delta_id + n - 1));
        p.frames = n;
        self.next_delta_id += n;
    }

    async fn connect(&mut self) -> bool {
        if self.conn.is_some() {
            return true;
        }
        if Instant::now() < self.next_connect {
            return false;
        }
        let path = self.cfg.socket_path.clone();
        let r = bounded(self.cfg.io_timeout_ms, async {
            UnixStream::connect(&path)
                .await
                .map_err(|e| io::Error::other(e.to_string()))
        })
        .await;
        match r {
            Ok(s) => {
                self.conn = Some(s);
                self.backoff_ms = self.cfg.reconnect_backoff_min_ms;
                bump(&self.stats.connects, 1);
                self.stats.connected.set(true);
                for p in &mut self.queue {
                    p.on_conn = false;
                }
                tracing::debug!(core = self.core, socket = %path.display(), "shipper connected");
                true
            }
            Err(e) => {
                bump(&self.stats.connect_failures, 1);
                if self.stats.connect_failures.get() % 20 == 1 {
                    tracing::warn!(core = self.core, socket = %path.display(), error = %e, "controlplane unreachable; keeping deltas");
                }
                self.disconnect();
                false
            }
        }
    }

    fn disconnect(&mut self) {
        self.conn = None;
        self.stats.connected.set(false);
        self.next_connect = Instant::now() + Duration::from_millis(self.backoff_ms);
        self.backoff_ms = (self.backoff_ms * 2).clamp(1, self.cfg.reconnect_backoff_max_ms.max(1));
    }

    /// Sends what the connection has not carried, then reads acks until all are in.
    async fn exchange(&mut self) {
        if self.queue.is_empty() || !self.connect().await {
            return;
        }
        if let Err(e) = self.send_and_await_acks().await {
            tracing::info!(core = self.core, error = %e, "controlplane connection lost; will resend unacked deltas");
            self.disconnect();
        }
        self.stats.pending.set(self.queue.len() as u64);
    }

    async fn send_and_await_acks(&mut self) -> io::Result<()> {
        let timeout = self.cfg.io_timeout_ms;
        for i in 0..self.queue.len() {
            if self.queue[i].on_conn {
                continue;
            }
            self.assign_ids(i);
            let conn = self.conn.as_mut().expect("connected");
            let p = &mut self.queue[i];
            bounded(timeout, conn.write_all(&p.wire)).await?;
            p.on_conn = true;
            bump(&self.stats.frames_sent, p.frames);
        }
        bounded(timeout, self.conn.as_mut().expect("connected").flush()).await?;
        let mut body = Vec::with_capacity(64);
        while self.queue.front().is_some_and(|p| p.on_conn) {
            let conn = self.conn.as_mut().expect("connected");
            let mut prefix = [0u8; 4];
            bounded(timeout, conn.read_exact(&mut prefix)).await?;
            let len = frame_len(prefix, ACK_BYTES_MAX)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            body.resize(len, 0);
            bounded(timeout, conn.read_exact(&mut body)).await?;
            let ack = access_ack(&aligned(&body))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if ack.core != self.core {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("ack for core {}", ack.core),
                ));
            }
            bump(&self.stats.frames_acked, 1);
            while let Some(p) = self.queue.front() {
                match p.ids {
                    Some((_, last)) if last <= ack.delta_id => {
                        let p = self.queue.pop_front().expect("front");
                        self.agg.borrow_mut().recycle(p.delta);
                    }
                    _ => break,
                }
            }
        }
        Ok(())
    }

    async fn finish(mut self) -> ShipReport {
        self.drain(true);
        let deadline = Instant::now() + Duration::from_millis(self.cfg.stop_timeout_ms);
        self.cfg.io_timeout_ms = self.cfg.io_timeout_ms.min(self.cfg.stop_timeout_ms.max(1));
        while !self.queue.is_empty() && Instant::now() < deadline {
            self.exchange().await;
            if !self.queue.is_empty() {
                let wait = self
                    .next_connect
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50));
                glommio::timer::sleep(wait.max(Duration::from_millis(1))).await;
            }
        }
        let report = ShipReport {
            unacked_deltas: self.queue.len() as u64,
            unacked_entries: self
                .queue
                .iter()
                .map(|p| p.delta.entries.len() as u64)
                .sum(),
        };
        if report.unacked_deltas > 0 {
            tracing::warn!(
                core = self.core,
                ?report,
                "shipper stopped with unacked deltas (the events are in the log)"
            );
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickgate_core::agg::AggConfig;
    use clickgate_core::{Click, Device, EventId};
    use clickgate_proto::frames::{access_delta, encode_ack, Ack};
    use glommio::{LocalExecutorBuilder, Placement};
    use std::borrow::Cow;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    fn click(ts: u64, user: &str) -> Click<'static> {
        Click {
            event_id: EventId::default(),
            ts_ms: ts,
            campaign_id: 1,
            ad_id: 2,
            publisher_id: 3,
            advertiser_id: 4,
            user_id: Cow::Owned(user.to_string()),
            ip: "203.0.113.7".parse().unwrap(),
            user_agent: Cow::Borrowed(""),
            country: *b"US",
            device: Device::Mobile,
            cost_micros: 10,
        }
    }

    /// A stand-in controlplane: applies each frame once per delta id (like the store),
    /// sums `all`-dimension clicks, acks; drops the first connection after one frame
    /// without acking it, to force a resend.
    fn fake_controlplane(path: PathBuf, clicks: Arc<Mutex<(u64, u64, u64)>>) {
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let mut last_applied = 0u64;
            for (n, stream) in listener.incoming().enumerate() {
                let mut s = stream.unwrap();
                loop {
                    let mut p = [0u8; 4];
                    if s.read_exact(&mut p).is_err() {
                        break;
                    }
                    let mut body = vec![0u8; u32::from_le_bytes(p) as usize];
                    s.read_exact(&mut body).unwrap();
                    let body = aligned(&body);
                    let f = access_delta(&body).unwrap();
                    let id = f.delta_id.to_native();
                    let mut c = clicks.lock().unwrap();
                    if id > last_applied {
                        last_applied = id;
                        c.0 += f
                            .entries
                            .iter()
                            .filter(|e| e.dim_kind == 0)
                            .map(|e| e.clicks.to_native())
                            .sum::<u64>();
                        c.2 = c.2.max(f.log_lsn.to_native());
                    } else {
                        c.1 += 1; // duplicates seen
                    }
                    drop(c);
                    if n == 0 {
                        break; // lose the ack: the shipper must resend
                    }
                    let mut out = Vec::new();
                    encode_ack(
                        &Ack {
                            core: f.core.to_native(),
                            delta_id: id,
                        },
                        &mut out,
                    )
                    .unwrap();
                    s.write_all(&out).unwrap();
                }
            }
        });
    }

    fn run<F: std::future::Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(512 << 10)
            .spawn(f)
            .expect("executor")
            .join()
            .expect("test task");
    }

    #[test]
    fn ships_resends_after_a_lost_ack_and_flushes_on_stop() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("control.sock");
        let seen = Arc::new(Mutex::new((0u64, 0u64, 0u64)));
        fake_controlplane(path.clone(), seen.clone());
        let stats = Arc::new(Mutex::new(ShipStats::default()));
        let stats2 = stats.clone();
        run(move || async move {
            let agg = Rc::new(RefCell::new(Aggregator::new(AggConfig::default())));
            let mut cfg = ShipConfig::new(path);
            cfg.flush_interval_ms = 20;
            cfg.reconnect_backoff_min_ms = 5;
            cfg.io_timeout_ms = 500;
            let h = spawn_shipper(0, agg.clone(), cfg);
            for round in 0..10u64 {
                for i in 0..100u64 {
                    agg.borrow_mut().add(
                        &click(1_764_201_600_000 + i, &format!("u{i}")),
                        true,
                        false,
                    );
                }
                agg.borrow_mut().note_log_lsn(round + 1);
                glommio::timer::sleep(Duration::from_millis(15)).await;
            }
            let report = h.stats();
            assert!(report.frames_sent >= 1);
            let st = h.stats();
            let left = h.flush_and_stop().await;
            assert_eq!(left, ShipReport::default());
            *stats2.lock().unwrap() = st;
        });
        let (clicks, dups, lsn) = *seen.lock().unwrap();
        assert_eq!(clicks, 1000, "every click counted exactly once");
        assert!(dups >= 1, "the frame whose ack was lost was resent");
        assert_eq!(lsn, 10);
        assert!(stats.lock().unwrap().connects >= 2);
    }

    #[test]
    fn keeps_counts_while_the_controlplane_is_away() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("control.sock");
        let path2 = path.clone();
        let seen = Arc::new(Mutex::new((0u64, 0u64, 0u64)));
        let seen2 = seen.clone();
        run(move || async move {
            let agg = Rc::new(RefCell::new(Aggregator::new(AggConfig::default())));
            let mut cfg = ShipConfig::new(path2.clone());
            cfg.flush_interval_ms = 10;
            cfg.unacked_frames_max = 2;
            cfg.pending_entries_max = 5; // one interval's keys: merging stops fast, then drains defer
            cfg.reconnect_backoff_min_ms = 5;
            cfg.reconnect_backoff_max_ms = 20;
            let h = spawn_shipper(3, agg.clone(), cfg);
            for i in 0..20u64 {
                agg.borrow_mut()
                    .add(&click(1_764_201_600_000 + i * 300_000, "u"), true, false);
                glommio::timer::sleep(Duration::from_millis(6)).await;
            }
            let st = h.stats();
            assert!(!st.connected && st.connect_failures > 0);
            assert!(st.pending <= 2);
            assert!(st.drains_deferred > 0, "{st:?}");
            // The controlplane comes up: everything arrives.
            fake_controlplane(path2, seen2);
            glommio::timer::sleep(Duration::from_millis(200)).await;
            let left = h.flush_and_stop().await;
            assert_eq!(left, ShipReport::default());
        });
        assert_eq!(seen.lock().unwrap().0, 20);
    }
}
