//! One `Shard` per core: that core's own state (log, connections, buffers, rule
//! snapshot, pre-aggregates) and a handle on the box-wide state every core shares in place
//! ([`BoxState`]: the dedup bloom, the per-IP counters, the per-address buckets).
//!
//! The per-request path sends no message to another core and waits for none: dedup,
//! the rate limit and the fraud gate read and write the shared tables directly
//! (see [`crate::pipeline`]). Connections live in [`crate::connection`], request
//! handling in [`crate::routes`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use clickgate_core::agg::Aggregator;

use crate::config::DataplaneConfig;
use crate::connection::{ConnBufs, ConnTable};
use crate::deps::{CidrSet, CoreLog};
use crate::http::Limits;
use crate::metrics::CoreMetrics;
use crate::pipeline::BoxState;
use crate::rules::CoreRules;

/// Connection buffers kept per core for reuse by new connections, at most.
const CONN_BUFS_POOL_MAX: usize = 1024;

/// Milliseconds on a monotonic clock since the process started: connection idle times
/// and request deadlines, which a step of the wall clock must neither fire early nor
/// postpone.
pub(crate) fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

pub(crate) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything one core owns, and the box-wide state it shares.
pub(crate) struct Shard {
    /// Executor index: names the log directory and the metrics block.
    pub k: usize,
    pub cfg: Arc<DataplaneConfig>,
    pub metrics: Arc<[CoreMetrics]>,
    pub log: CoreLog,
    /// Dedup bloom, per-IP minute counters and per-address buckets of the whole box.
    pub shared: Arc<BoxState>,
    /// Replaced whole when the runtime settings change; read when a connection opens.
    pub trusted: RefCell<Rc<CidrSet>>,
    /// The fraud gate: rule snapshot and hot-swap poller state.
    pub rules: CoreRules,
    pub(crate) conns: RefCell<ConnTable>,
    /// Open connections per client address on this core (exempt addresses not counted);
    /// an entry goes when its count reaches 0, so the map holds at most one entry per
    /// open connection.
    addr_conns: RefCell<HashMap<IpAddr, u32>>,
    /// Read-buffer bytes this core's connections hold beyond `READ_BUF_BYTES_INITIAL`
    /// each, bounded by `inflight_body_bytes_max`.
    inflight_body_bytes: Cell<usize>,
    pool: RefCell<Vec<ConnBufs>>,
    pub stopping: Cell<bool>,
    /// This core's pre-aggregates since the last delta; the shipper drains it.
    pub agg: Rc<RefCell<Aggregator>>,
    pub(crate) limits: Limits,
}

impl Shard {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        k: usize,
        cfg: Arc<DataplaneConfig>,
        metrics: Arc<[CoreMetrics]>,
        log: CoreLog,
        shared: Arc<BoxState>,
        trusted: CidrSet,
        rules: CoreRules,
        agg: Rc<RefCell<Aggregator>>,
    ) -> Shard {
        let limits = Limits {
            header_bytes_max: cfg.header_bytes_max,
            body_bytes_max: cfg.body_bytes_max,
        };
        Shard {
            k,
            cfg,
            metrics,
            log,
            shared,
            trusted: RefCell::new(Rc::new(trusted)),
            rules,
            conns: RefCell::new(ConnTable::default()),
            addr_conns: RefCell::new(HashMap::new()),
            inflight_body_bytes: Cell::new(0),
            pool: RefCell::new(Vec::new()),
            stopping: Cell::new(false),
            agg,
            limits,
        }
    }

    pub fn m(&self) -> &CoreMetrics {
        &self.metrics[self.k]
    }

    pub fn connections(&self) -> usize {
        self.conns.borrow().len
    }

    /// Half-closes every connection (`how` = `libc::SHUT_RD` to let in-flight requests
    /// finish, `libc::SHUT_RDWR` to end them).
    pub fn shutdown_connections(&self, how: libc::c_int) {
        for c in self.conns.borrow().entries.iter().flatten() {
            // SAFETY: the fd belongs to a live connection registered in the table.
            unsafe { libc::shutdown(c.fd, how) };
        }
    }

    /// Closes connections with no traffic for `idle_timeout_ms`, or whose request head or
    /// body is past its deadline, `now_ms` on [`mono_ms`]'s clock. One sweep per second
    /// instead of a timer armed on every read.
    pub fn close_idle_connections(&self, now_ms: u64) {
        let idle_ms = self.cfg.idle_timeout_ms;
        for c in self.conns.borrow().entries.iter().flatten() {
            let deadline = c.deadline_ms.get();
            let late = deadline != 0 && now_ms > deadline;
            if late {
                self.m().request_timeout(c.in_body.get());
                c.deadline_ms.set(0);
            }
            if late || now_ms.saturating_sub(c.active_ms.get()) > idle_ms {
                // SAFETY: as above; the task sees end-of-stream and ends.
                unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
            }
        }
    }

    /// Counts a new connection from `ip` unless the address already holds
    /// `connections_per_address_max` on this core (then `false`, nothing counted).
    pub(crate) fn admit_address(&self, ip: IpAddr) -> bool {
        let mut map = self.addr_conns.borrow_mut();
        let n = map.entry(ip).or_insert(0);
        if *n as usize >= self.cfg.connections_per_address_max {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back a connection counted by [`Shard::admit_address`].
    pub(crate) fn release_address(&self, ip: IpAddr) {
        let mut map = self.addr_conns.borrow_mut();
        if let Some(n) = map.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }

    /// Takes `bytes` more of the core's in-flight body budget, or refuses (`false`).
    pub(crate) fn reserve_body_bytes(&self, bytes: usize) -> bool {
        let now = self.inflight_body_bytes.get();
        if now + bytes > self.cfg.inflight_body_bytes_max {
            return false;
        }
        self.inflight_body_bytes.set(now + bytes);
        true
    }

    pub(crate) fn release_body_bytes(&self, bytes: usize) {
        let now = self.inflight_body_bytes.get();
        self.inflight_body_bytes.set(now.saturating_sub(bytes));
    }

    /// Refreshes this core's gauges in its metrics block. The box-wide tables are
    /// reported by core 0 only, so sums over cores stay right.
    pub fn refresh_gauges(&self) {
        self.m()
            .set_inflight_body_bytes(self.inflight_body_bytes.get() as u64);
        let st = self.log.stats();
        self.m().set_log(self.log.pending_bytes() as u64, &st);
        // Never borrowed across an await; `try_` all the same (a gauge can wait a tick).
        if let Ok(a) = self.agg.try_borrow() {
            self.m().set_agg(a.len() as u64, a.overflow_total());
        }
        if self.k == 0 {
            let s = &self.shared;
            self.m().set_ratelimit_tracked(s.limiter.tracked() as u64);
            self.m()
                .set_ip_rate(s.ip_rate.tracked() as u64, s.ip_rate.evictions());
        }
    }

    pub(crate) fn take_bufs(&self) -> ConnBufs {
        let cap = self.limits.header_bytes_max + self.limits.body_bytes_max;
        match self.pool.borrow_mut().pop() {
            Some(mut b) => {
                b.reset(cap);
                b
            }
            None => ConnBufs::new(cap),
        }
    }

    pub(crate) fn put_bufs(&self, b: ConnBufs) {
        let mut pool = self.pool.borrow_mut();
        if pool.len() < CONN_BUFS_POOL_MAX {
            pool.push(b);
        }
    }
}
