//! Delta frames in: the Unix socket server and the store writer.
//!
//! Each dataplane core holds one connection and sends length-prefixed [`DeltaFrame`]
//! archives; for each it gets an [`Ack`] once the frame is durable. A connection is
//! pipelined (up to `INFLIGHT_PER_CONNECTION_MAX` frames between read and ack), and acks
//! come back in frame order.
//!
//! One writer thread owns the WAL and is the only one to change the store: it takes a
//! frame, plus whatever else is queued (up to `group_commit_frames_max`), applies each
//! new one to the store (a resend is acked without being applied or logged), appends
//! them to the WAL, fdatasyncs once and then answers them all. Once a second it also
//! evicts old buckets and, when due, writes a snapshot. A WAL write error stops the
//! writer for good (frames are then refused, `/healthz` answers 503): the store in memory
//! would otherwise run ahead of what a restart can rebuild.
//!
//! [`DeltaFrame`]: clickgate_proto::frames::DeltaFrame

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clickgate_proto::frames::{access_delta, encode_ack, frame_len, Ack};
use clickgate_proto::fsutil::is_transient;
use rkyv::util::AlignedVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::durable::Durable;
use crate::metrics::Metrics;
use crate::store::Store;

/// Frames read from one connection and not yet acked, at most.
pub const INFLIGHT_PER_CONNECTION_MAX: usize = 256;

pub(crate) enum Job {
    Frame {
        body: AlignedVec,
        reply: oneshot::Sender<Result<Ack, String>>,
        /// When the frame was read off the socket (for the apply lag).
        received: Instant,
    },
    Tick,
    Shutdown(oneshot::Sender<anyhow::Result<()>>),
}

pub(crate) struct WriterConfig {
    pub group_commit_frames_max: usize,
    pub snapshot_interval: Duration,
    pub snapshot_wal_bytes: u64,
    /// The dataplane's local log (`<data_dir>/log`), read to refill crashed runs' counts.
    pub log_root: PathBuf,
    /// With Redis configured: applied frames go here too, committed before the WAL
    /// (see `redis_outbox` for why that order).
    pub redis_outbox: Option<crate::redis_outbox::OutboxWriter>,
}

/// Applies the refill of `f`'s gap, if any; failures are logged and counted, never fatal
/// (billing covers what the real-time counters miss).
fn refill_before(
    s: &mut Store,
    f: &clickgate_proto::frames::ArchivedDeltaFrame,
    log_root: &std::path::Path,
    durable: &mut Durable,
    mut outbox: Option<&mut crate::redis_outbox::OutboxWriter>,
    now: u64,
    metrics: &Metrics,
) {
    match crate::refill::refill_frames(s, f, log_root) {
        Ok(None) => {}
        Ok(Some(bodies)) => {
            for body in bodies {
                let applied = access_delta(&body)
                    .map_err(|e| e.to_string())
                    .and_then(|r| s.apply_frame(r, now).map_err(|e| e.to_string()));
                match applied {
                    Ok(crate::store::Applied::Applied) => {
                        durable.append(&body);
                        if let Some(o) = outbox.as_deref_mut() {
                            o.append(&body);
                        }
                    }
                    Ok(crate::store::Applied::Duplicate) => {}
                    Err(e) => tracing::error!(error = %e, "refill frame refused"),
                }
            }
            metrics.inc(&metrics.refills);
        }
        Err(e) => {
            tracing::warn!(core = f.core.to_native(), error = %format!("{e:#}"), "cannot refill a crashed run's counts from the log");
            metrics.inc(&metrics.refill_failures);
        }
    }
}

pub(crate) fn writer_loop(
    mut rx: mpsc::Receiver<Job>,
    store: Arc<RwLock<Store>>,
    mut durable: Durable,
    mut cfg: WriterConfig,
    metrics: Arc<Metrics>,
) {
    let mut last_snapshot = Instant::now();
    let mut failed = false;
    // A transient WAL error is being retried (every loop turn: frames and ticks).
    let mut stalled = false;
    let mut batch: Vec<Job> = Vec::with_capacity(cfg.group_commit_frames_max);
    let mut replies: Vec<(oneshot::Sender<Result<Ack, String>>, Ack)> = Vec::new();
    while let Some(job) = rx.blocking_recv() {
        batch.push(job);
        while batch.len() < cfg.group_commit_frames_max {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let now = crate::now_ms();
        let mut oldest: Option<Instant> = None;
        let mut tick = false;
        let mut shutdown = None;
        {
            let mut s = store.write().unwrap_or_else(|e| e.into_inner());
            for job in batch.drain(..) {
                match job {
                    Job::Frame { reply, .. } if failed => {
                        let _ = reply.send(Err("store writer failed".into()));
                    }
                    // Stalled: the frames of the failed commit wait in the WAL buffer; new
                    // ones are refused (not applied) until it is written.
                    Job::Frame { reply, .. } if stalled => {
                        let _ = reply.send(Err("store WAL not writable (retrying)".into()));
                    }
                    Job::Frame {
                        body,
                        reply,
                        received,
                    } => {
                        oldest = Some(oldest.map_or(received, |o: Instant| o.min(received)));
                        // The first frame of a dataplane run may reveal counts its
                        // crashed predecessor never shipped: refill them first.
                        if let Ok(f) = access_delta(&body) {
                            refill_before(
                                &mut s,
                                f,
                                &cfg.log_root,
                                &mut durable,
                                cfg.redis_outbox.as_mut(),
                                now,
                                &metrics,
                            );
                        }
                        let applied =
                            access_delta(&body)
                                .map_err(|e| e.to_string())
                                .and_then(|f| {
                                    let ack = Ack {
                                        core: f.core.to_native(),
                                        delta_id: f.delta_id.to_native(),
                                    };
                                    let t = Instant::now();
                                    let r = s.apply_frame(f, now);
                                    metrics.store_apply_ns.fetch_add(
                                        t.elapsed().as_nanos() as u64,
                                        Ordering::Relaxed,
                                    );
                                    if matches!(r, Ok(crate::store::Applied::Applied)) {
                                        metrics
                                            .store_applied_entries
                                            .fetch_add(f.entries.len() as u64, Ordering::Relaxed);
                                    }
                                    r.map(|a| (a, ack)).map_err(|e| e.to_string())
                                });
                        match applied {
                            Ok((crate::store::Applied::Applied, ack)) => {
                                durable.append(&body);
                                if let Some(o) = cfg.redis_outbox.as_mut() {
                                    o.append(&body);
                                }
                                replies.push((reply, ack));
                            }
                            Ok((crate::store::Applied::Duplicate, ack)) => {
                                replies.push((reply, ack))
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    Job::Tick => tick = true,
                    Job::Shutdown(r) => shutdown = Some(r),
                }
            }
            if tick || shutdown.is_some() {
                s.evict(now);
            }
        }
        if let Some(o) = cfg.redis_outbox.as_mut() {
            o.commit(); // before the WAL: see redis_outbox
        }
        // Answers of this round wait for their frames to be durable; a transient error
        // answers them with an error too (the dataplane resends; a resent frame already
        // applied is a duplicate, acknowledged once the WAL holds it).
        let mut round_stalled = false;
        if !failed && durable.has_pending() {
            match durable.commit() {
                Ok(()) => {
                    metrics.inc(&metrics.wal_commits);
                    if stalled {
                        tracing::warn!("store WAL writable again");
                        stalled = false;
                        metrics.set_writer_stalled(false);
                    }
                }
                Err(e) if is_transient(&e) => {
                    if !stalled {
                        tracing::error!(error = %e, "store WAL write failed; refusing deltas and retrying until it succeeds");
                    }
                    stalled = true;
                    round_stalled = true;
                    metrics.set_writer_stalled(true);
                }
                Err(e) => {
                    tracing::error!(error = %e, "store WAL write failed; refusing deltas until restart");
                    failed = true;
                    metrics.set_writer_failed();
                }
            }
        }
        if let Some(o) = oldest {
            metrics
                .store_apply_lag_us
                .store(o.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        for (reply, ack) in replies.drain(..) {
            let _ = reply.send(if failed {
                Err("store writer failed".into())
            } else if round_stalled {
                Err("store WAL not writable (retrying)".into())
            } else {
                Ok(ack)
            });
        }
        metrics
            .wal_bytes
            .store(durable.wal_bytes(), Ordering::Relaxed);
        let due = last_snapshot.elapsed() >= cfg.snapshot_interval
            || durable.wal_bytes() >= cfg.snapshot_wal_bytes;
        if !failed && !stalled && (shutdown.is_some() || (tick && due && durable.wal_bytes() > 0)) {
            let s = store.read().unwrap_or_else(|e| e.into_inner());
            match durable.snapshot(&s) {
                Ok(bytes) => {
                    metrics.inc(&metrics.snapshots);
                    metrics.snapshot_bytes.store(bytes, Ordering::Relaxed);
                    metrics.wal_bytes.store(0, Ordering::Relaxed);
                    tracing::debug!(bytes, cells = s.cells(), "store snapshot written");
                }
                Err(e) => {
                    metrics.inc(&metrics.snapshot_failures);
                    tracing::warn!(error = %e, "store snapshot failed; the WAL keeps growing until one succeeds");
                }
            }
            last_snapshot = Instant::now();
        }
        if let Some(r) = shutdown {
            let _ = r.send(if failed {
                Err(anyhow::anyhow!("store writer had failed"))
            } else {
                Ok(())
            });
            return;
        }
    }
}

pub(crate) async fn accept_loop(
    listener: UnixListener,
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    frame_bytes_max: u32,
    connections_max: usize,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, socket = %path.display(), "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        if metrics.connections_open.load(Ordering::Relaxed) >= connections_max as u64 {
            tracing::warn!(
                connections_max,
                "control socket: too many connections, closing a new one"
            );
            continue;
        }
        metrics.inc(&metrics.connections_total);
        metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        let (jobs, metrics, stop) = (jobs.clone(), metrics.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(e) =
                serve_connection(stream, jobs, metrics.clone(), frame_bytes_max, stop).await
            {
                tracing::info!(error = %e, "control socket connection closed");
            }
            metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn serve_connection(
    stream: UnixStream,
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    frame_bytes_max: u32,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (mut rd, mut wr) = stream.into_split();
    let (pending_tx, mut pending_rx) =
        mpsc::channel::<oneshot::Receiver<Result<Ack, String>>>(INFLIGHT_PER_CONNECTION_MAX);
    let metrics_w = metrics.clone();
    // Acks go back in frame order, each once its frame is durable.
    let acker = tokio::spawn(async move {
        let mut out = Vec::with_capacity(64);
        while let Some(rx) = pending_rx.recv().await {
            let ack = match rx.await {
                Ok(Ok(ack)) => ack,
                Ok(Err(e)) => anyhow::bail!("delta refused: {e}"),
                Err(_) => anyhow::bail!("store writer gone"),
            };
            out.clear();
            encode_ack(&ack, &mut out)?;
            wr.write_all(&out).await?;
            metrics_w.inc(&metrics_w.acks_sent);
        }
        Ok(())
    });
    let reader = async {
        loop {
            let mut prefix = [0u8; 4];
            tokio::select! {
                r = rd.read_exact(&mut prefix) => match r {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e.into()),
                },
                _ = stop.changed() => return Ok(()),
            }
            let len = match frame_len(prefix, frame_bytes_max) {
                Ok(l) => l,
                Err(e) => {
                    metrics.inc(&metrics.frames_rejected);
                    anyhow::bail!("bad frame: {e}");
                }
            };
            let mut body = AlignedVec::<16>::with_capacity(len);
            body.resize(len, 0);
            rd.read_exact(&mut body).await?;
            metrics.inc(&metrics.frames_received);
            if let Err(e) = access_delta(&body) {
                metrics.inc(&metrics.frames_rejected);
                anyhow::bail!("bad frame: {e}");
            }
            let (tx, rx) = oneshot::channel();
            if pending_tx.send(rx).await.is_err() {
                anyhow::bail!("ack writer stopped");
            }
            if jobs
                .send(Job::Frame {
                    body,
                    reply: tx,
                    received: Instant::now(),
                })
                .await
                .is_err()
            {
                anyhow::bail!("store writer gone");
            }
        }
    };
    let r: anyhow::Result<()> = reader.await;
    drop(pending_tx);
    // Let in-flight frames get their acks before closing.
    let acked = acker.await.map_err(|e| anyhow::anyhow!("ack task: {e}"))?;
    r.and(acked)
}
