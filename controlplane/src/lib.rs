//! clickgate-controlplane: merges the dataplane cores' aggregate deltas into the embedded
//! counter store and serves the query API (docs/api.md).
//!
//! ```text
//! dataplane core k ──DeltaFrame (rkyv, Unix socket)──▶ ingest: validate, queue
//!                  ◀──Ack once durable───────────────── writer thread: apply once per
//!                                                       delta id, WAL group commit,
//!                                                       evict, snapshot
//! query API (axum) ──read lock──▶ store (in memory)
//! ```
//!
//! - [`store`]: buckets per window, idempotent merge, retention, top-N.
//! - [`durable`]: WAL + snapshot; why not a rebuild from the raw log.
//! - [`ingest`]: the socket server and the writer.
//! - [`query`]: request validation and routes.
//! - [`control`]: the gRPC control API (fraud rules, runtime settings) on `control_addr`.
//!
//! Freshness: a dataplane core ships at least every second and the query reads the store
//! the writer just updated, so a click is visible about one flush interval plus one
//! fdatasync after its 202.

pub mod archive;
pub mod auth;
pub mod billing;
pub mod control;
pub mod dashboard;
pub mod durable;
pub mod ingest;
pub mod metrics;
pub mod query;
pub mod read;
#[path = "redis/mod.rs"]
pub mod redis_store;
pub use redis_store::{hll as redis_hll, outbox as redis_outbox};
pub mod refill;
pub mod serve;
pub mod stage_lag;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::ingest::{Job, WriterConfig};
use crate::metrics::Metrics;
use crate::query::{ApiState, QueryLimits};
use crate::store::{Retention, Store};

pub use crate::store::{BucketOut, TopAd};

/// The controlplane's settings, every bound with its unit last.
#[derive(Clone, Debug)]
pub struct ControlplaneConfig {
    /// The store lives in `<data_dir>/store/`.
    pub data_dir: PathBuf,
    pub query_addr: SocketAddr,
    /// The gRPC control API (docs/api.md).
    pub control_addr: SocketAddr,
    /// Bearer token of the control API; `None`: every control call is refused.
    pub control_token: Option<String>,
    /// Accept the control token over plaintext on a non-loopback `control_addr`.
    pub control_insecure: bool,
    /// (certificate chain, private key) PEM files: the control API speaks TLS only.
    pub control_tls: Option<(PathBuf, PathBuf)>,
    /// Failed control-token attempts per client address per minute before the address is
    /// refused for the rest of the minute.
    pub control_auth_failures_per_minute_max: u32,
    /// Control calls in progress on one connection, at most (further ones wait).
    pub control_requests_concurrent_max: usize,
    /// A control call must be answered within this long (else `DEADLINE_EXCEEDED`).
    pub control_request_timeout_ms: u64,
    /// Connection caps and deadlines of the query API's server.
    pub query_serve: serve::ServeLimits,
    /// The Unix socket dataplane cores ship deltas to; `None`: `<data_dir>/control.sock`.
    pub control_socket: Option<PathBuf>,
    pub retention_5m_secs: u64,
    pub retention_1h_secs: u64,
    pub retention_1d_secs: u64,
    /// Cells (window × bucket × campaign × dimension) the store holds at most.
    pub store_cells_max: usize,
    /// A snapshot is written at least this often while deltas arrive…
    pub snapshot_interval_secs: u64,
    /// …or as soon as the WAL is this large.
    pub snapshot_wal_bytes: u64,
    /// Frames made durable by one fdatasync, at most.
    pub group_commit_frames_max: usize,
    /// Frames waiting for the writer, at most (beyond: connections wait).
    pub writer_queue_frames_max: usize,
    pub frame_bytes_max: u32,
    pub control_connections_max: usize,
    /// Buckets one metrics query may span.
    pub query_buckets_max: u64,
    /// Largest `n` of `/v1/top`.
    pub top_n_max: usize,
    /// API keys and tenant isolation of the query API and dashboard ([`auth`]).
    pub auth: auth::AuthConfig,
    /// The Parquet archiver of the local log.
    pub archive: archive::ArchiveConfig,
    /// The Redis real-time store; `None`: the embedded store answers queries.
    pub redis: Option<redis_store::RedisConfig>,
}

impl Default for ControlplaneConfig {
    fn default() -> Self {
        ControlplaneConfig {
            data_dir: PathBuf::from("./clickgate-data"),
            query_addr: "127.0.0.1:8081".parse().expect("literal"),
            control_addr: "127.0.0.1:50051".parse().expect("literal"),
            control_token: None,
            control_insecure: false,
            control_tls: None,
            control_auth_failures_per_minute_max: 10,
            control_requests_concurrent_max: 64,
            control_request_timeout_ms: 10_000,
            query_serve: serve::ServeLimits::default(),
            control_socket: None,
            retention_5m_secs: 24 * 3600,
            retention_1h_secs: 7 * 24 * 3600,
            retention_1d_secs: 90 * 24 * 3600,
            store_cells_max: 4_000_000,
            snapshot_interval_secs: 60,
            snapshot_wal_bytes: 64 << 20,
            group_commit_frames_max: 256,
            writer_queue_frames_max: 4096,
            frame_bytes_max: clickgate_proto::frames::FRAME_BYTES_MAX,
            control_connections_max: 1024,
            query_buckets_max: 10_000,
            top_n_max: 1_000,
            auth: auth::AuthConfig::default(),
            archive: archive::ArchiveConfig::default(),
            redis: None,
        }
    }
}

impl ControlplaneConfig {
    /// Checks every bound and the bind rules (query auth, control token); the error names
    /// the setting. The binary calls it before starting anything (a bad setting is exit 2).
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::auth::check_bind(self.query_addr, &self.auth).map_err(anyhow::Error::msg)?;
        check_control_bind(self)?;
        control_tls_config(self)?;
        self.query_serve.validate().map_err(anyhow::Error::msg)?;
        let in_range = |name: &str, v: u64, hi: u64| {
            if (1..=hi).contains(&v) {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{name} must be 1..={hi}, got {v}"))
            }
        };
        in_range(
            "control_auth_failures_per_minute_max",
            self.control_auth_failures_per_minute_max.into(),
            1_000_000,
        )?;
        in_range(
            "control_requests_concurrent_max",
            self.control_requests_concurrent_max as u64,
            100_000,
        )?;
        in_range(
            "control_request_timeout_ms",
            self.control_request_timeout_ms,
            3_600_000,
        )?;
        // 5m buckets are answerable for at least 24 h.
        if self.retention_5m_secs < 24 * 3600 {
            bail!("retention_5m_secs must be at least 86400 (5m buckets are answerable for 24 h)");
        }
        if self.store_cells_max == 0 {
            bail!("store_cells_max must be greater than 0");
        }
        self.archive.validate().map_err(anyhow::Error::msg)?;
        if let Some(r) = &self.redis {
            r.validate().map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    pub fn control_socket_path(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("control.sock"))
    }

    pub fn retention(&self) -> Retention {
        Retention {
            m5_ms: self.retention_5m_secs.saturating_mul(1000),
            h1_ms: self.retention_1h_secs.saturating_mul(1000),
            d1_ms: self.retention_1d_secs.saturating_mul(1000),
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A running controlplane (inside a tokio runtime).
pub struct Controlplane {
    query_addr: SocketAddr,
    control_addr: SocketAddr,
    control_socket: PathBuf,
    stop: watch::Sender<bool>,
    jobs: mpsc::Sender<Job>,
    tasks: Vec<JoinHandle<()>>,
    writer: std::thread::JoinHandle<()>,
    store: Arc<RwLock<Store>>,
    archiver: archive::ArchiverHandle,
    /// The Redis flusher's stop signal and task: stopped after the writer's last commit.
    redis_flusher: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    /// Stops the thread counting the log consumers' lag (`stage_lag`).
    lag_stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Controlplane {
    /// Recovers the store (snapshot + WAL), then listens on the control socket and the
    /// query address.
    pub async fn start(cfg: ControlplaneConfig) -> anyhow::Result<Controlplane> {
        let socket = cfg.control_socket_path();
        prepare_socket_path(&socket).await?;
        let store_dir = cfg.data_dir.join("store");
        let retention = cfg.retention();
        let cells_max = cfg.store_cells_max;
        let (store, durable, rec) = tokio::task::spawn_blocking(move || {
            let mut store = Store::new(retention, cells_max);
            let (durable, rec) = durable::Durable::open(&store_dir, &mut store, now_ms())?;
            anyhow::Ok((store, durable, rec))
        })
        .await??;
        tracing::info!(
            snapshot_chunks = rec.snapshot_chunks,
            wal_frames = rec.wal_frames,
            wal_torn_bytes = rec.wal_torn_bytes,
            cells = store.cells(),
            "counter store recovered"
        );
        let store = Arc::new(RwLock::new(store));
        let metrics = Arc::new(Metrics::default());
        metrics
            .wal_bytes
            .store(durable.wal_bytes(), std::sync::atomic::Ordering::Relaxed);

        let listener = tokio::net::UnixListener::bind(&socket)
            .with_context(|| format!("binding control socket {}", socket.display()))?;
        auth::check_bind(cfg.query_addr, &cfg.auth).map_err(anyhow::Error::msg)?;
        let tcp = tokio::net::TcpListener::bind(cfg.query_addr)
            .await
            .with_context(|| format!("binding query address {}", cfg.query_addr))?;
        let query_addr = tcp.local_addr()?;
        let control_tcp = tokio::net::TcpListener::bind(cfg.control_addr)
            .await
            .with_context(|| format!("binding control API address {}", cfg.control_addr))?;
        let control_addr = control_tcp.local_addr()?;

        let (jobs, jobs_rx) = mpsc::channel(cfg.writer_queue_frames_max.max(1));
        let (redis_writer, redis_side) = match &cfg.redis {
            Some(rc) => {
                let (outbox, w) =
                    redis_outbox::Outbox::open(&cfg.data_dir.join("redis"), rc.spill_bytes_max)?;
                let stats = Arc::new(redis_store::RedisStats::default());
                let side = Arc::new(redis_store::RedisSide {
                    query: redis_store::RedisQuery::new(rc, stats.clone()),
                    outbox,
                    stats,
                    owners: Arc::default(),
                });
                (Some(w), Some(side))
            }
            None => (None, None),
        };
        let wcfg = WriterConfig {
            redis_outbox: redis_writer,
            group_commit_frames_max: cfg.group_commit_frames_max.max(1),
            snapshot_interval: Duration::from_secs(cfg.snapshot_interval_secs),
            snapshot_wal_bytes: cfg.snapshot_wal_bytes,
            log_root: cfg.data_dir.join("log"),
        };
        let (st, mt) = (store.clone(), metrics.clone());
        let writer = std::thread::Builder::new()
            .name("cg-store-writer".into())
            .spawn(move || ingest::writer_loop(jobs_rx, st, durable, wcfg, mt))?;

        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(ingest::accept_loop(
            listener,
            socket.clone(),
            jobs.clone(),
            metrics.clone(),
            cfg.frame_bytes_max,
            cfg.control_connections_max,
            stop_rx.clone(),
        )));
        let tick_jobs = jobs.clone();
        let mut tick_stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = every.tick() => { let _ = tick_jobs.try_send(Job::Tick); }
                    _ = tick_stop.changed() => return,
                }
            }
        }));
        let limits = QueryLimits {
            buckets_max: cfg.query_buckets_max,
            top_n_max: cfg.top_n_max,
            ..QueryLimits::default()
        };
        let control =
            control::ControlService::open(cfg.data_dir.clone(), metrics.clone(), store.clone())?;
        if cfg.control_token.as_deref().is_none_or(str::is_empty) {
            tracing::warn!("no control token configured: the control API refuses every call (set CLICKGATE_CONTROL_TOKEN)");
        }
        check_control_bind(&cfg)?;
        let control_tls = control_tls_config(&cfg)?;
        let limiter = Arc::new(auth::FailureLimiter::new(
            cfg.control_auth_failures_per_minute_max,
            cfg.auth.failures_addresses_max,
        ));
        let grpc = control.into_server(cfg.control_token.clone(), limiter);
        let mut grpc_stop = stop_rx.clone();
        let control_concurrent = cfg.control_requests_concurrent_max.max(1);
        let control_timeout = Duration::from_millis(cfg.control_request_timeout_ms.max(1));
        tasks.push(tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(control_tcp);
            let mut builder = tonic::transport::Server::builder();
            if let Some(tls) = control_tls {
                builder = match builder.tls_config(tls) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "control API TLS set-up failed");
                        return;
                    }
                };
            }
            let serve = builder
                .concurrency_limit_per_connection(control_concurrent)
                .timeout(control_timeout)
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .add_service(grpc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = grpc_stop.changed().await;
                });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "control API server failed");
            }
        }));
        let redis_flusher = match (&cfg.redis, &redis_side) {
            (Some(rc), Some(side)) => {
                let applier = Arc::new(redis_store::Applier::new(rc.clone(), side.stats.clone()));
                let (tx, rx) = watch::channel(false);
                let task = tokio::spawn(redis_store::flusher(applier, side.outbox.clone(), rx));
                Some((tx, task))
            }
            _ => None,
        };
        if let (Some(rc), Some(side)) = (&cfg.redis, &redis_side) {
            // The owners hash lives as long as the longest-lived counter key.
            let ttl_ms = rc
                .ttl_ms(clickgate_core::window::Window::D1)
                .saturating_add(crate::archive::DAY_MS);
            tasks.push(tokio::spawn(redis_store::owners::sync_task(
                side.clone(),
                store.clone(),
                side.owners.clone(),
                ttl_ms,
                stop_rx.clone(),
            )));
        }
        let reader: Arc<dyn read::CounterRead> = match &redis_side {
            Some(side) => Arc::new(read::RedisRead::new(side.clone(), store.clone())),
            None => Arc::new(read::EmbeddedRead::new(store.clone())),
        };
        let lag_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lags =
            stage_lag::StageLags::spawn(&cfg.data_dir, Duration::from_secs(1), lag_stop.clone())?;
        metrics
            .stage_lags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(lags.gauges);
        let dashboard = dashboard::router(dashboard::DashState {
            store: store.clone(),
            metrics: metrics.clone(),
            limits,
            reader: reader.clone(),
            keys_required: !cfg.auth.keys.is_empty(),
        });
        let tenants = Arc::new(auth::Auth::new(
            cfg.auth.clone(),
            reader.clone(),
            metrics.clone(),
        ));
        let serve_metrics = metrics.clone();
        let app = query::router(ApiState {
            store: store.clone(),
            metrics,
            limits,
            reader,
            redis: redis_side,
        });
        let request_timeout = Duration::from_millis(cfg.query_serve.request_timeout_ms.max(1));
        let app =
            app.merge(dashboard)
                .layer(auth::layer(tenants))
                .layer(axum::middleware::from_fn(move |req, next| {
                    serve::request_deadline(request_timeout, req, next)
                }));
        tasks.push(tokio::spawn(serve::serve(
            tcp,
            app,
            cfg.query_serve,
            serve_metrics,
            stop_rx,
        )));
        let archiver = archive::ArchiverHandle::spawn(
            cfg.archive.clone(),
            &cfg.data_dir,
            archive::LocalLogSource::for_location(&cfg.data_dir, &cfg.archive.location)?,
        )?;
        tracing::info!(query_addr = %query_addr, control_addr = %control_addr, control_socket = %socket.display(), "controlplane listening");
        Ok(Controlplane {
            query_addr,
            control_addr,
            control_socket: socket,
            stop,
            jobs,
            tasks,
            writer,
            store,
            archiver,
            redis_flusher,
            lag_stop,
        })
    }

    pub fn query_addr(&self) -> SocketAddr {
        self.query_addr
    }

    /// The bound control API (gRPC) address (the real port when the configured one was 0).
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    pub fn control_socket(&self) -> &Path {
        &self.control_socket
    }

    /// The highest log LSN applied from a dataplane box's core.
    pub fn applied_lsn(&self, box_id: u64, core: u32) -> Option<u64> {
        self.store
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .applied_lsn(box_id, core)
    }

    /// Stops listening, lets connections ack what they read, commits the WAL, writes a
    /// final snapshot.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.lag_stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let (tx, rx) = oneshot::channel();
        let flushed = if self.jobs.send(Job::Shutdown(tx)).await.is_ok() {
            rx.await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("store writer gone")))
        } else {
            Err(anyhow::anyhow!("store writer gone"))
        };
        drop(self.jobs);
        let writer = self.writer;
        tokio::task::spawn_blocking(move || writer.join())
            .await?
            .map_err(|_| anyhow::anyhow!("store writer panicked"))?;
        let _ = std::fs::remove_file(&self.control_socket);
        // The writer's last frames are in the outbox now: one last flush, bounded (what
        // Redis does not take stays in the outbox for the next start).
        if let Some((stop, task)) = self.redis_flusher {
            let _ = stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        // Contract §0: the open Parquet files are written on a clean stop.
        let archived = tokio::task::spawn_blocking(move || self.archiver.shutdown()).await?;
        flushed.and(archived)
    }
}

/// Removes a stale socket file; refuses if another controlplane answers on it.
async fn prepare_socket_path(socket: &Path) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            bail!("another controlplane is listening on {}", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    Ok(())
}

/// Refuses a control token that is too short to resist guessing, or that would cross the
/// network in clear: a token on a non-loopback `control_addr` needs `control_insecure`.
pub fn check_control_bind(cfg: &ControlplaneConfig) -> anyhow::Result<()> {
    let Some(token) = cfg.control_token.as_deref().filter(|t| !t.is_empty()) else {
        return Ok(());
    };
    if token.len() < control::TOKEN_BYTES_MIN {
        anyhow::bail!(
            "control_token has {} bytes: a control token has at least {} (shorter ones are guessable)",
            token.len(),
            control::TOKEN_BYTES_MIN
        );
    }
    if !cfg.control_addr.ip().is_loopback() && !cfg.control_insecure && cfg.control_tls.is_none() {
        anyhow::bail!(
            "refusing to accept the control token in clear text on {}: give the control API a \
             certificate (--control-tls-cert and --control-tls-key), bind control_addr to a \
             loopback address, or pass --control-insecure to send the token over this network \
             anyway",
            cfg.control_addr
        );
    }
    Ok(())
}

/// The control API's TLS identity from `control_tls`, read and checked at start: a file
/// that is missing, unreadable or not PEM of the right kind is an error naming it.
pub fn control_tls_config(
    cfg: &ControlplaneConfig,
) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let Some((cert, key)) = &cfg.control_tls else {
        return Ok(None);
    };
    let read = |path: &Path, what: &str, marker: &str| -> anyhow::Result<Vec<u8>> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("control_tls_{what} {}: cannot read", path.display()))?;
        let text = String::from_utf8_lossy(&bytes);
        if !text.contains("-----BEGIN ") || !text.contains(marker) {
            anyhow::bail!(
                "control_tls_{what} {}: not a PEM file holding a {}",
                path.display(),
                if what == "cert" {
                    "certificate"
                } else {
                    "private key"
                }
            );
        }
        Ok(bytes)
    };
    let cert = read(cert, "cert", "CERTIFICATE-----")?;
    let key = read(key, "key", "PRIVATE KEY-----")?;
    let identity = tonic::transport::Identity::from_pem(cert, key);
    Ok(Some(
        tonic::transport::ServerTlsConfig::new().identity(identity),
    ))
}
