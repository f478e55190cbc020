//! The dataplane's lifecycle: pre-flight checks, one glommio executor pinned per
//! configured CPU, each with its own SO_REUSEPORT listener and log; the box-wide state
//! they share in place (dedup bloom, per-IP counters, per-address buckets); and a
//! drain-then-stop shutdown.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use futures_lite::future;
use glommio::net::TcpListener;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use clickgate_core::agg::{AggConfig, Aggregator};
use clickgate_core::hash::box_secret;
use clickgate_proto::control_files::{self, RuntimeOverrides};

use crate::config::{AckMode, DataplaneConfig};
use crate::connection;
use crate::deps::{CidrSet, CoreLog, IpRate, LogConfig, RateLimiter, SharedBloom};
use crate::metrics::{CoreMetrics, Unavailable};
use crate::pipeline::BoxState;
use crate::rules::{self, CoreRules};
use crate::shard::{mono_ms, wall_ms, Shard};
use crate::ship::{spawn_shipper, ShipConfig};

/// glommio refuses to start with less locked memory than this.
const MEMLOCK_BYTES_MIN: u64 = 512 << 10;
/// How often a core looks at the shutdown flag.
const STOP_POLL_MS: u64 = 20;
/// How often a core refreshes its gauges.
const GAUGE_REFRESH_MS: u64 = 1_000;
/// After the drain timeout, connections are cut; this bounds the wait for their tasks.
const CUT_WAIT_MS: u64 = 1_000;
/// How often core 0 looks whether the next dedup generation needs clearing ahead.
const BLOOM_CLEAR_POLL_MS: u64 = 250;
/// Chunks (`CLEAR_CHUNK_BLOCKS` blocks each) cleared between two yields.
const BLOOM_CLEAR_CHUNKS_PER_STEP: u64 = 4;

/// State shared by every core and the controlling thread: read-mostly, never touched on
/// the per-event path except each core's own metrics block.
pub(crate) struct Shared {
    stop: AtomicBool,
}

/// A running dataplane.
pub struct Dataplane {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    metrics: Arc<[CoreMetrics]>,
    handles: Vec<ExecutorJoinHandle<anyhow::Result<()>>>,
}

/// Starts the same shutdown as [`Dataplane::shutdown`] from another thread (e.g. a signal
/// handler thread); [`Dataplane::join`] returns once it completes.
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl ShutdownHandle {
    pub fn trigger(&self) {
        self.shared.stop.store(true, Ordering::Release);
    }
}

/// What a core reports to `start` once it is up (or why it is not).
enum CoreReport {
    Bound(SocketAddr),
    Ready,
    Failed(String),
}

impl Dataplane {
    /// Checks io_uring and memlock, opens logs, binds listeners on every core, and
    /// returns once all cores accept. Err with a clear message otherwise.
    pub fn start(mut cfg: DataplaneConfig) -> anyhow::Result<Dataplane> {
        cfg.validate().map_err(anyhow::Error::msg)?;
        if cfg.ack == AckMode::Kafka && cfg.sink.is_none() {
            bail!("ack mode `kafka` needs Kafka brokers (--kafka-brokers): use `disk` or `memory` (--ack)");
        }
        preflight()?;
        CidrSet::parse_list(&cfg.trusted_cidrs).map_err(|e| anyhow!("trusted CIDRs: {e}"))?;
        let overrides = runtime_overrides(&mut cfg);
        let cpus = if cfg.cores.is_empty() {
            online_cpus()?
        } else {
            cfg.cores.clone()
        };
        let n = cpus.len();
        check_log_space(&cfg, n);
        if cfg.sink.is_some() && n > crate::sink::SINK_CORES_MAX {
            bail!(
                "{n} cores, but the Kafka sink tracks at most {}: set --cores",
                crate::sink::SINK_CORES_MAX
            );
        }
        let cfg = Arc::new(cfg);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
        });
        let metrics: Arc<[CoreMetrics]> = (0..n).map(|_| CoreMetrics::default()).collect();
        let boxed = Arc::new(box_state(&cfg, &overrides));
        let (memory_bytes, bits_per_event) =
            (boxed.bloom.memory_bytes(), boxed.bloom.bits_per_event());
        metrics[0].set_dedup(memory_bytes, bits_per_event);
        let (tx, rx) = mpsc::channel::<(usize, CoreReport)>();

        let mut dp = Dataplane {
            local_addr: cfg.ingest_addr,
            shared: shared.clone(),
            metrics,
            handles: Vec::new(),
        };
        let spawn = |k: usize, addr: SocketAddr, dp: &mut Dataplane| -> anyhow::Result<()> {
            let (cfg, shared, metrics, tx) =
                (cfg.clone(), shared.clone(), dp.metrics.clone(), tx.clone());
            let overrides = overrides.clone();
            let boxed = boxed.clone();
            let h = LocalExecutorBuilder::new(Placement::Fixed(cpus[k]))
                .name(&format!("clickgate-core-{k}"))
                .io_memory(cfg.io_memory_bytes)
                .ring_depth(cfg.ring_depth)
                .spawn(move || async move {
                    let core = CoreArgs {
                        k,
                        n,
                        addr,
                        cfg,
                        overrides,
                        shared,
                        metrics,
                        boxed,
                        tx,
                    };
                    run_core(core).await
                })
                .map_err(|e| {
                    anyhow!("starting the executor of core {k} on CPU {}: {e}", cpus[k])
                })?;
            dp.handles.push(h);
            Ok(())
        };

        // Core 0 binds first so that port 0 resolves to one port every core then shares.
        spawn(0, cfg.ingest_addr, &mut dp)?;
        match rx.recv() {
            Ok((_, CoreReport::Bound(addr))) => dp.local_addr = addr,
            Ok((_, CoreReport::Failed(e))) => {
                let _ = dp.shutdown();
                bail!(e);
            }
            _ => {
                let r = dp.shutdown();
                bail!("core 0 stopped during start-up: {r:?}");
            }
        }
        for k in 1..n {
            if let Err(e) = spawn(k, dp.local_addr, &mut dp) {
                let _ = dp.shutdown();
                return Err(e);
            }
        }
        let mut ready = 0;
        while ready < n {
            match rx.recv() {
                Ok((k, CoreReport::Bound(_))) => debug_assert!(k > 0),
                Ok((_, CoreReport::Ready)) => ready += 1,
                Ok((_, CoreReport::Failed(e))) => {
                    let _ = dp.shutdown();
                    bail!(e);
                }
                Err(_) => {
                    let r = dp.shutdown();
                    bail!("a core stopped during start-up: {r:?}");
                }
            }
        }
        tracing::info!(
            addr = %dp.local_addr,
            cores = n,
            ack = ?cfg.ack,
            dedup_memory_bytes = memory_bytes,
            dedup_bits_per_event = bits_per_event,
            ip_rate_memory_bytes = boxed.ip_rate.memory_bytes(),
            ratelimit_memory_bytes = boxed.limiter.memory_bytes(),
            "dataplane accepting"
        );
        Ok(dp)
    }

    /// The bound ingest address (the real port when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
        }
    }

    /// Stops accepting, finishes in-flight requests (bounded by drain_timeout_ms),
    /// flushes and fsyncs every log, and joins the executor threads.
    pub fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown_handle().trigger();
        self.join()
    }

    /// Waits until a triggered shutdown completes.
    pub fn join(mut self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        for (k, h) in std::mem::take(&mut self.handles).into_iter().enumerate() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(format!("core {k}: {e:#}")),
                Err(e) => errors.push(format!("core {k}: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(
                "dataplane stopped with errors: {}",
                errors.join("; ")
            ))
        }
    }

    /// A snapshot of the metrics in the Prometheus text format (what `/metrics` serves).
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        crate::metrics::render(&self.metrics, &mut out);
        out
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        if !self.handles.is_empty() {
            self.shared.stop.store(true, Ordering::Release);
            for h in std::mem::take(&mut self.handles) {
                let _ = h.join();
            }
        }
    }
}

struct CoreArgs {
    k: usize,
    n: usize,
    addr: SocketAddr,
    cfg: Arc<DataplaneConfig>,
    /// Runtime settings set through the control API, as read at start.
    overrides: RuntimeOverrides,
    shared: Arc<Shared>,
    metrics: Arc<[CoreMetrics]>,
    boxed: Arc<BoxState>,
    tx: mpsc::Sender<(usize, CoreReport)>,
}

/// The state every core shares, sized for the box. The rate limit starts at its runtime
/// override, if one is set.
fn box_state(cfg: &DataplaneConfig, overrides: &RuntimeOverrides) -> BoxState {
    let items = cfg
        .dedup_peak_events_per_sec
        .saturating_mul(cfg.dedup_window_secs)
        .max(1);
    let hot = rules::hot_settings(cfg.rate_limit_events_per_sec, &cfg.trusted_cidrs, overrides);
    BoxState {
        bloom: SharedBloom::new(
            cfg.dedup_window_secs * 1000,
            cfg.dedup_generations,
            items,
            cfg.dedup_fp_rate,
            wall_ms(),
        ),
        // Tables keyed by clients' values are laid out by a per-process secret.
        ip_rate: IpRate::new(cfg.fraud_ip_rate_addresses_max).keyed(box_secret()),
        limiter: RateLimiter::new(hot.rate_limit_events_per_sec, cfg.rate_limit_addresses_max)
            .keyed(box_secret()),
    }
}

/// Resolves once shutdown was triggered.
async fn stopped(shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS)).await;
    }
}

async fn run_core(a: CoreArgs) -> anyhow::Result<()> {
    let CoreArgs {
        k,
        n,
        addr,
        cfg,
        overrides,
        shared,
        metrics,
        boxed,
        tx,
    } = a;
    let fail = |e: String| {
        let _ = tx.send((k, CoreReport::Failed(e.clone())));
        anyhow!(e)
    };
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => return Err(fail(format!("cannot listen on {addr} (core {k}): {e}"))),
    };
    if k == 0 {
        let bound = listener
            .local_addr()
            .map_err(|e| fail(format!("listener address: {e}")))?;
        let _ = tx.send((k, CoreReport::Bound(bound)));
    }
    let log_dir = cfg.data_dir.join("log").join(format!("core-{k}"));
    let log = CoreLog::open(log_dir.clone(), k, LogConfig::from_dataplane(&cfg))
        .await
        .map_err(|e| {
            fail(format!(
                "cannot open the local log {}: {e}",
                log_dir.display()
            ))
        })?;
    let hot = rules::hot_settings(
        cfg.rate_limit_events_per_sec,
        &cfg.trusted_cidrs,
        &overrides,
    );
    let trusted = match rules::trusted_set(&hot.trusted_cidrs) {
        Some(t) => t,
        None => CidrSet::parse_list(&cfg.trusted_cidrs)
            .map_err(|e| fail(format!("trusted CIDRs: {e}")))?,
    };
    let core_rules = CoreRules::load(&cfg.data_dir, &metrics[k]);
    core_rules.set_runtime_version(overrides.version);
    metrics[k].set_runtime_config_version(overrides.version);
    let start_lsn = log.append_lsn();
    let agg = Rc::new(RefCell::new(Aggregator::new(AggConfig {
        keys_max: cfg.agg_keys_max,
        hash_key: box_secret(),
        ..AggConfig::default()
    })));
    // The first delta then covers up to where this run starts, so it ships even with no
    // traffic: the controlplane learns of the run at once and refills a crashed
    // predecessor's unshipped counts from the log (controlplane::refill).
    agg.borrow_mut().note_log_lsn(start_lsn);
    let shard = Rc::new(Shard::new(
        k,
        cfg.clone(),
        metrics,
        log,
        boxed,
        trusted,
        core_rules,
        agg.clone(),
    ));
    let shipper = spawn_shipper(
        k,
        agg,
        ShipConfig {
            start_lsn,
            ..ship_config(&cfg)
        },
    );

    // Core 0 clears the next dedup generation ahead of its boundary, in small steps.
    let clearer = (k == 0).then(|| glommio::spawn_local(clear_bloom_ahead(shard.clone())).detach());
    let gauges = {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            loop {
                shard.refresh_gauges();
                shard.close_idle_connections(mono_ms());
                glommio::timer::sleep(Duration::from_millis(GAUGE_REFRESH_MS)).await;
            }
        })
        .detach()
    };
    let poller = glommio::spawn_local(poll_control_files(shard.clone(), hot)).detach();
    tracing::info!(core = k, cores = n, "core ready");
    let _ = tx.send((k, CoreReport::Ready));

    accept_loop(&shard, &listener, &shared).await;
    drop(listener);
    drain(&shard).await;
    gauges.cancel();
    poller.cancel();
    if let Some(c) = clearer {
        c.cancel();
    }
    // Every answered event is counted in the aggregator by now: ship the last delta
    // (bounded by the shipper's stop timeout; what stays unacked is in the log).
    let report = shipper.flush_and_stop().await;
    if report.unacked_deltas > 0 {
        tracing::warn!(
            core = k,
            unacked_deltas = report.unacked_deltas,
            unacked_entries = report.unacked_entries,
            "controlplane did not acknowledge the last deltas before stop"
        );
    }
    let closed = shard.log.close().await;
    shard.refresh_gauges();
    tracing::info!(core = k, "core stopped");
    closed.with_context(|| format!("closing the log of core {k}"))
}

/// Reads the runtime settings set through the control API and applies the one that
/// only takes effect at start (the dedup window sizes the blooms). Unreadable: logged,
/// and the process settings stand.
fn runtime_overrides(cfg: &mut DataplaneConfig) -> RuntimeOverrides {
    match control_files::read_runtime(&cfg.data_dir) {
        Ok(Some(o)) => {
            if let Some(w) = o.dedup_window_secs {
                tracing::info!(dedup_window_secs = w, "dedup window set by the control API");
                cfg.dedup_window_secs = w;
            }
            o
        }
        Ok(None) => RuntimeOverrides::default(),
        Err(e) => {
            tracing::error!(error = %e, "runtime settings not loaded; using the process settings");
            RuntimeOverrides::default()
        }
    }
}

/// Every `RULES_POLL_MS`: swap in a new rule set, apply new hot runtime settings.
async fn poll_control_files(shard: Rc<Shard>, mut hot: rules::HotSettings) {
    loop {
        glommio::timer::sleep(rules::poll_interval()).await;
        shard.rules.poll_rules(shard.k, shard.m()).await;
        let Some(o) = shard.rules.poll_runtime(shard.k, shard.m()) else {
            continue;
        };
        let cfg = &shard.cfg;
        let new = rules::hot_settings(cfg.rate_limit_events_per_sec, &cfg.trusted_cidrs, &o);
        if new.rate_limit_events_per_sec != hot.rate_limit_events_per_sec {
            // The box's buckets keep their balance under the new limit (every core sets
            // the same value).
            shard.shared.limiter.set_rate(new.rate_limit_events_per_sec);
            tracing::info!(
                core = shard.k,
                rate_limit_events_per_sec = new.rate_limit_events_per_sec,
                "rate limit changed"
            );
        }
        if new.trusted_cidrs != hot.trusted_cidrs {
            // Applies to connections opened from now on.
            if let Some(t) = rules::trusted_set(&new.trusted_cidrs) {
                *shard.trusted.borrow_mut() = Rc::new(t);
                tracing::info!(core = shard.k, trusted_cidrs = ?new.trusted_cidrs, "trusted networks changed");
            }
        }
        hot = new;
    }
}

fn ship_config(cfg: &DataplaneConfig) -> ShipConfig {
    ShipConfig {
        flush_interval_ms: cfg.agg_flush_interval_ms,
        unacked_frames_max: cfg.ship_unacked_frames_max,
        box_id: cfg.box_id,
        ..ShipConfig::new(cfg.control_socket_path())
    }
}

/// Warns when the log's retention cannot fit on its file system: the disk would fill
/// before retention deletes anything (the log then stalls — 503 and not ready — until
/// space returns; see `crate::log`).
fn check_log_space(cfg: &DataplaneConfig, cores: usize) {
    let dir = cfg.data_dir.join("log");
    let probe = if dir.exists() { &dir } else { &cfg.data_dir };
    let Some((free, total)) = fs_space(probe) else {
        return;
    };
    let on_disk = dir_bytes(&dir);
    let wanted = cfg.log_retention_bytes.saturating_mul(cores as u64);
    if cfg.log_retention_bytes == 0 || wanted > free + on_disk {
        tracing::warn!(
            dir = %dir.display(),
            retention_bytes_per_core = cfg.log_retention_bytes,
            cores,
            free_bytes = free,
            log_bytes = on_disk,
            fs_bytes = total,
            "local log: retention may not fit the free space; when the disk fills, ingest answers 503 and /readyz is not ready until space returns (lower log_retention_bytes or add space)"
        );
    }
}

/// (free bytes for unprivileged users, total bytes) of the file system holding `path`.
fn fs_space(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid NUL-terminated path and a zeroed out-struct for the call to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
}

/// Bytes of the files under `dir` (two levels: the log's core directories).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(cores) = std::fs::read_dir(dir) else {
        return 0;
    };
    cores
        .flatten()
        .filter_map(|c| std::fs::read_dir(c.path()).ok())
        .flat_map(|files| files.flatten())
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum()
}

async fn accept_loop(shard: &Rc<Shard>, listener: &TcpListener, shared: &Shared) {
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            stopped(shared).await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                let peer = stream.peer_addr().ok().map(|a| a.ip());
                let exempt = peer.is_some_and(|ip| shard.trusted.borrow().contains(ip));
                let refuse = if shard.connections() >= shard.cfg.connections_per_core_max {
                    Some(Unavailable::Connections)
                } else {
                    match peer {
                        Some(ip) if !exempt && !shard.admit_address(ip) => {
                            Some(Unavailable::AddressConnections)
                        }
                        _ => None,
                    }
                };
                match refuse {
                    Some(why) => {
                        glommio::spawn_local(connection::refuse_connection(
                            shard.clone(),
                            stream,
                            why,
                        ))
                        .detach();
                    }
                    None => {
                        let counted = peer.is_some() && !exempt;
                        glommio::spawn_local(connection::serve_connection(
                            shard.clone(),
                            stream,
                            peer,
                            exempt,
                            counted,
                        ))
                        .detach();
                    }
                }
            }
            Some(Err(e)) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(core = shard.k, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Lets in-flight requests finish (reads see end-of-stream once their buffered requests
/// are answered), cuts what remains after `drain_timeout_ms`.
async fn drain(shard: &Shard) {
    shard.stopping.set(true);
    shard.shutdown_connections(libc::SHUT_RD);
    let deadline = Instant::now() + Duration::from_millis(shard.cfg.drain_timeout_ms);
    while shard.connections() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    if shard.connections() > 0 {
        tracing::warn!(
            core = shard.k,
            connections = shard.connections(),
            "drain timeout: cutting connections"
        );
        shard.shutdown_connections(libc::SHUT_RDWR);
        let deadline = Instant::now() + Duration::from_millis(CUT_WAIT_MS);
        while shard.connections() > 0 && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Core 0's background task: zeroes the dedup generation the next epoch writes, a few
/// chunks at a time with a yield between, so no boundary costs a pass on the request path.
async fn clear_bloom_ahead(shard: Rc<Shard>) {
    loop {
        while !shard
            .shared
            .bloom
            .clear_ahead_step(wall_ms(), BLOOM_CLEAR_CHUNKS_PER_STEP)
        {
            futures_lite::future::yield_now().await;
        }
        glommio::timer::sleep(Duration::from_millis(BLOOM_CLEAR_POLL_MS)).await;
    }
}

/// Refuses to start where glommio cannot run, naming the fix.
fn preflight() -> anyhow::Result<()> {
    // Kernel version.
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } == 0 {
        // SAFETY: uname NUL-terminates release.
        let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let mut parts = release
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty());
        let major: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let minor: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if (major, minor) < (5, 8) {
            bail!(
                "kernel {release} is too old for the io_uring dataplane: Linux >= 5.8 is required"
            );
        }
    }
    // Locked memory.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into lim.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0
        && lim.rlim_cur != libc::RLIM_INFINITY
        && lim.rlim_cur < MEMLOCK_BYTES_MIN
    {
        bail!(
            "locked-memory limit is {} KiB; io_uring needs at least {} KiB. Raise it with `ulimit -l unlimited` \
             (or a `memlock` line in /etc/security/limits.conf, or `LimitMEMLOCK=infinity` in the systemd unit)",
            lim.rlim_cur / 1024,
            MEMLOCK_BYTES_MIN / 1024
        );
    }
    // io_uring itself.
    let mut params = [0u32; 30]; // struct io_uring_params is 120 bytes
                                 // SAFETY: io_uring_setup reads and writes the 120-byte params block.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        let disabled =
            std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
        let hint = match err.raw_os_error() {
            Some(libc::ENOSYS) => "this kernel has no io_uring (Linux >= 5.8 required)",
            Some(libc::EPERM) | Some(libc::EACCES) => {
                "io_uring is not permitted: set `sysctl kernel.io_uring_disabled=0`, or allow io_uring in the container's seccomp profile"
            }
            Some(libc::ENOMEM) => "not enough locked memory: raise `ulimit -l` (LimitMEMLOCK= in systemd)",
            _ => "io_uring setup failed",
        };
        bail!(
            "io_uring unavailable ({err}; kernel.io_uring_disabled={}): {hint}",
            disabled.trim()
        );
    }
    // SAFETY: fd is the ring we just created.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// The CPUs this process may run on.
fn online_cpus() -> anyhow::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect();
    if cpus.is_empty() {
        bail!("no CPU available to this process");
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preflight_passes_here() {
        preflight().unwrap();
        assert!(!online_cpus().unwrap().is_empty());
    }
}
