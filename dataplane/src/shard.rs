//! One `Shard` per core: it owns all of that core's state (log, bloom shard, rate
//! limiter, connections, buffers) and serves its connections, one task per connection.
//!
//! The per-event path takes no lock and touches no other core's memory: cross-core
//! dedup lookups are messages over the bounded channels built at start-up
//! (see [`crate::dedup`]).

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clickgate_core::agg::Aggregator;
use clickgate_core::fraud::{Decision, FIRED_MAX};
use clickgate_core::hash::{event_hash, shard_for};
use clickgate_core::{Click, EventError};
use clickgate_proto::record::{encode_into, encoded_len};
use clickgate_proto::segment::FRAME_HEADER_BYTES;
use clickgate_proto::Flags;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::channel_mesh::Senders;
use glommio::net::TcpStream;

use crate::config::{AckMode, DataplaneConfig};
use crate::dedup::{LookupReq, Wait, Waiters};
use crate::deps::{CidrSet, CoreLog, RateLimiter, RotatingBloom};
use crate::http::{self, Frame, Head, Limits, Method, ReadBuf, Reject, Route};
use crate::metrics::{CoreMetrics, Unavailable};
use crate::response::{self, ContentType, Extra, Status};
use crate::rules::{ActiveRules, CoreRules};

/// Connection buffers kept per core for reuse by new connections, at most.
const CONN_BUFS_POOL_MAX: usize = 1024;
/// How long an append waits for the log to drain below its bound before answering 503
/// (only reached if the space reserved before dedup was not enough).
const LOG_FULL_WAIT_MS: u64 = 1_000;

pub(crate) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything one core owns.
pub(crate) struct Shard {
    /// Executor index: names the log directory and the metrics block.
    pub k: usize,
    /// This core's index in the dedup mesh: the owner index of `shard_for`.
    pub shard_id: usize,
    pub ncores: usize,
    pub cfg: Arc<DataplaneConfig>,
    pub metrics: Arc<[CoreMetrics]>,
    pub log: CoreLog,
    pub bloom: RefCell<RotatingBloom>,
    pub limiter: RefCell<RateLimiter>,
    /// Replaced whole when the runtime settings change; read when a connection opens.
    pub trusted: RefCell<Rc<CidrSet>>,
    /// The fraud gate: rule snapshot, per-IP minute counter, hot-swap poller state.
    pub rules: CoreRules,
    /// Request side of the dedup mesh (None with a single core).
    pub lookups: Option<Senders<LookupReq>>,
    pub waiters: RefCell<Waiters>,
    /// Log bytes promised to requests between their dedup and their appends.
    reserved_log_bytes: Cell<usize>,
    conns: RefCell<ConnTable>,
    pool: RefCell<Vec<ConnBufs>>,
    pub stopping: Cell<bool>,
    /// Events handed to the aggregation hook (see `on_accepted`).
    pub aggregated: Cell<u64>,
    /// This core's pre-aggregates since the last delta; the shipper drains it.
    pub agg: Rc<RefCell<Aggregator>>,
    limits: Limits,
}

impl Shard {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        k: usize,
        shard_id: usize,
        ncores: usize,
        cfg: Arc<DataplaneConfig>,
        metrics: Arc<[CoreMetrics]>,
        log: CoreLog,
        bloom: RotatingBloom,
        limiter: RateLimiter,
        trusted: CidrSet,
        rules: CoreRules,
        lookups: Option<Senders<LookupReq>>,
        agg: Rc<RefCell<Aggregator>>,
    ) -> Shard {
        let limits = Limits {
            header_bytes_max: cfg.header_bytes_max,
            body_bytes_max: cfg.body_bytes_max,
        };
        Shard {
            k,
            shard_id,
            ncores,
            cfg,
            metrics,
            log,
            bloom: RefCell::new(bloom),
            limiter: RefCell::new(limiter),
            trusted: RefCell::new(Rc::new(trusted)),
            rules,
            lookups,
            waiters: RefCell::new(Waiters::default()),
            reserved_log_bytes: Cell::new(0),
            conns: RefCell::new(ConnTable::default()),
            pool: RefCell::new(Vec::new()),
            stopping: Cell::new(false),
            aggregated: Cell::new(0),
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

    /// Closes connections with no traffic for `idle_timeout_ms`. One sweep per second
    /// instead of a timer armed on every read.
    pub fn close_idle_connections(&self, now_ms: u64) {
        let idle_ms = self.cfg.idle_timeout_ms;
        for c in self.conns.borrow().entries.iter().flatten() {
            if now_ms.saturating_sub(c.active_ms.get()) > idle_ms {
                // SAFETY: as above; the task sees end-of-stream and ends.
                unsafe { libc::shutdown(c.fd, libc::SHUT_RDWR) };
            }
        }
    }

    /// Refreshes this core's gauges in its metrics block.
    pub fn refresh_gauges(&self) {
        let st = self.log.stats();
        self.m().set_log(
            self.log.pending_bytes() as u64,
            st.appended_bytes,
            st.durable_lsn,
        );
        self.m()
            .set_ratelimit_tracked(self.limiter.borrow().tracked() as u64);
        let rate = self.rules.ip_rate.borrow();
        self.m()
            .set_ip_rate(rate.tracked() as u64, rate.evictions());
    }

    /// The aggregation hook: the single call site for every event written to the log
    /// (duplicates included; `flags` says which), with the log position just past it, so
    /// each delta says up to where in the log it counts.
    #[inline]
    fn on_accepted(&self, click: &Click<'_>, flags: Flags, lsn: u64) {
        let mut agg = self.agg.borrow_mut();
        if !flags.duplicate() {
            agg.add(click, !flags.fraud(), flags.fraud());
            self.aggregated.set(self.aggregated.get() + 1);
        }
        agg.note_log_lsn(lsn);
    }

    fn take_bufs(&self) -> ConnBufs {
        let cap = self.limits.header_bytes_max + self.limits.body_bytes_max;
        match self.pool.borrow_mut().pop() {
            Some(mut b) => {
                b.rb.reset(cap);
                b.out.clear();
                b
            }
            None => ConnBufs::new(cap, self.ncores),
        }
    }

    fn put_bufs(&self, b: ConnBufs) {
        let mut pool = self.pool.borrow_mut();
        if pool.len() < CONN_BUFS_POOL_MAX {
            pool.push(b);
        }
    }
}

/// Open connections, so shutdown and the idle sweep can reach them.
#[derive(Default)]
struct ConnTable {
    entries: Vec<Option<ConnEntry>>,
    free: Vec<usize>,
    len: usize,
}

struct ConnEntry {
    fd: RawFd,
    /// Wall-clock ms of the connection's last read or write.
    active_ms: Cell<u64>,
}

impl ConnTable {
    fn insert(&mut self, fd: RawFd, now_ms: u64) -> usize {
        self.len += 1;
        let e = Some(ConnEntry {
            fd,
            active_ms: Cell::new(now_ms),
        });
        match self.free.pop() {
            Some(i) => {
                self.entries[i] = e;
                i
            }
            None => {
                self.entries.push(e);
                self.entries.len() - 1
            }
        }
    }

    fn touch(&self, i: usize, now_ms: u64) {
        if let Some(e) = &self.entries[i] {
            e.active_ms.set(now_ms);
        }
    }

    fn remove(&mut self, i: usize) {
        if self.entries[i].take().is_some() {
            self.len -= 1;
            self.free.push(i);
        }
    }
}

/// A connection's buffers and per-request scratch, reused across requests and, through
/// the core's pool, across connections.
pub(crate) struct ConnBufs {
    rb: ReadBuf,
    /// Responses of one read's worth of (pipelined) requests, written with one write.
    out: Vec<u8>,
    /// A response body being built.
    body: Vec<u8>,
    scratch: Scratch,
}

impl ConnBufs {
    fn new(cap: usize, ncores: usize) -> ConnBufs {
        ConnBufs {
            rb: ReadBuf::new(cap),
            out: Vec::with_capacity(4096),
            body: Vec::with_capacity(1024),
            scratch: Scratch::new(ncores),
        }
    }
}

struct Scratch {
    /// Storage for the request's parsed clicks; relent with the request's lifetime by
    /// `relend` (same layout, emptied first), so it never reallocates once warm.
    clicks: Vec<Click<'static>>,
    rejected: Vec<(u32, EventError)>,
    hashes: Vec<u64>,
    dup: Vec<bool>,
    /// Per owner core: positions (in `clicks`) of the hashes it owns.
    owned: Vec<Vec<u32>>,
    /// (owner, waiter slot) of the lookups sent for this request.
    sent: Vec<(usize, u32)>,
}

impl Scratch {
    fn new(ncores: usize) -> Scratch {
        Scratch {
            clicks: Vec::new(),
            rejected: Vec::new(),
            hashes: Vec::new(),
            dup: Vec::new(),
            owned: (0..ncores).map(|_| Vec::new()).collect(),
            sent: Vec::new(),
        }
    }
}

/// Reuses an emptied vector's allocation for clicks borrowing from another buffer.
/// In-place collection keeps the allocation because the layouts are identical.
fn relend<'b>(mut v: Vec<Click<'_>>) -> Vec<Click<'b>> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("vector is empty"))
        .collect()
}

/// Per-read bookkeeping of the responses that wait for the log to be durable.
#[derive(Default)]
struct Batch {
    max_lsn: u64,
    /// Offset in `out` of the first 202 that waits for durability.
    first_202_at: Option<usize>,
    /// Responses written from `first_202_at` on.
    responses_since: usize,
    /// 202s answered in this batch (for the latency histogram).
    accepted_202: u64,
}

enum IngestError {
    RateLimited(u64),
    Unavailable(Unavailable),
}

/// Serves one connection until it closes. One task per connection, none per request.
pub(crate) async fn serve_connection(shard: Rc<Shard>, stream: TcpStream) {
    let fd = stream.as_raw_fd();
    let slot = shard.conns.borrow_mut().insert(fd, wall_ms());
    shard.m().connection_opened();
    let peer = stream.peer_addr().ok().map(|a| a.ip());
    let exempt = peer.is_some_and(|ip| shard.trusted.borrow().contains(ip));
    let _ = stream.set_nodelay(true);
    let mut bufs = shard.take_bufs();
    let mut stream = stream;
    let mut batch = Batch::default();
    if let Err(e) = connection_loop(
        &shard,
        &mut stream,
        &mut bufs,
        &mut batch,
        slot,
        peer,
        exempt,
    )
    .await
    {
        tracing::debug!(core = shard.k, error = %e, "connection ended");
    }
    shard.put_bufs(bufs);
    shard.conns.borrow_mut().remove(slot);
    shard.m().connection_closed();
}

/// Answers a connection over `connections_per_core_max` with 503 and closes it.
pub(crate) async fn refuse_connection(shard: Rc<Shard>, mut stream: TcpStream) {
    let why = Unavailable::Connections;
    shard.m().unavailable(why);
    let mut body = Vec::with_capacity(48);
    response::body_error(&mut body, why.message());
    let mut out = Vec::with_capacity(192);
    let extra = Extra {
        retry_after_secs: Some(shard.cfg.retry_after_secs),
        allow: None,
        close: true,
    };
    response::write_response(
        &mut out,
        Status::Unavailable,
        ContentType::Json,
        extra,
        &body,
    );
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
}

async fn connection_loop(
    shard: &Shard,
    stream: &mut TcpStream,
    bufs: &mut ConnBufs,
    batch: &mut Batch,
    slot: usize,
    peer: Option<IpAddr>,
    exempt: bool,
) -> std::io::Result<()> {
    let ConnBufs {
        rb,
        out,
        body,
        scratch,
    } = bufs;
    // Total size of the request being received, once its head is parsed.
    let mut want = 0usize;
    let mut continue_sent = false;
    loop {
        let n = stream.read(rb.spare(want)).await?;
        if n == 0 {
            return Ok(());
        }
        rb.filled(n);
        shard.m().bytes_in(n as u64);
        // One clock read of each kind per read, not per request: pipelined requests
        // share their receive time.
        let now_ms = wall_ms();
        let received = Instant::now();
        shard.conns.borrow().touch(slot, now_ms);
        let mut close = false;
        batch.max_lsn = 0;
        batch.first_202_at = None;
        batch.responses_since = 0;
        batch.accepted_202 = 0;
        // Answer every complete request in the buffer, in order.
        loop {
            let head = match http::parse_head(rb.data(), &shard.limits) {
                Frame::Partial => {
                    want = 0;
                    break;
                }
                Frame::Head(h) if rb.len() < h.total_len() => {
                    want = h.total_len();
                    if h.expect_continue && !continue_sent {
                        out.extend_from_slice(response::CONTINUE);
                        continue_sent = true;
                    }
                    break;
                }
                Frame::Head(h) => h,
                Frame::Reject(r) => {
                    write_reject(shard, out, body, r);
                    batch.count_response();
                    close = true;
                    break;
                }
            };
            want = 0;
            continue_sent = false;
            let keep_alive = head.keep_alive && !shard.stopping.get();
            let req = &rb.data()[..head.total_len()];
            let status = handle(
                shard,
                &head,
                req,
                out,
                body,
                scratch,
                batch,
                peer,
                exempt,
                now_ms,
                !keep_alive,
            )
            .await;
            if status == Status::Accepted {
                batch.accepted_202 += 1;
            }
            rb.consume(head.total_len());
            if !keep_alive {
                close = true;
                break;
            }
        }
        if batch.max_lsn > 0 && shard.cfg.ack == AckMode::Disk {
            if let Err(e) = shard.log.durable(batch.max_lsn).await {
                tracing::error!(core = shard.k, error = %e, "log sync failed; answering 503");
                rewrite_as_unavailable(shard, out, body, batch);
                close = true;
            }
        }
        if batch.max_lsn > 0
            && shard.cfg.ack == AckMode::Kafka
            && !kafka_acked(shard, batch.max_lsn).await
        {
            tracing::warn!(
                core = shard.k,
                lsn = batch.max_lsn,
                "kafka did not acknowledge in time; answering 503"
            );
            rewrite_as_unavailable(shard, out, body, batch);
            close = true;
        }
        if batch.accepted_202 > 0 {
            let us = received.elapsed().as_micros() as u64;
            shard.m().latency_202(us, batch.accepted_202);
        }
        if !out.is_empty() {
            stream.write_all(out).await?;
            out.clear();
        }
        if close {
            let _ = stream.close().await;
            return Ok(());
        }
    }
}

/// `ack = kafka`: waits until the forwarder reports every record before `lsn` acknowledged
/// by the broker (acks=all), polling its per-core atomic on a glommio timer. False after
/// `kafka_ack_timeout_ms` (the records stay in the log and are delivered later).
async fn kafka_acked(shard: &Shard, lsn: u64) -> bool {
    let Some(sink) = shard.cfg.sink.as_deref() else {
        return false;
    };
    let poll = std::time::Duration::from_micros(shard.cfg.kafka_ack_poll_us.max(1));
    let deadline =
        Instant::now() + std::time::Duration::from_millis(shard.cfg.kafka_ack_timeout_ms);
    while sink.acked_lsn(shard.k) < lsn {
        if Instant::now() >= deadline || shard.log.failed() {
            return false;
        }
        glommio::timer::sleep(poll).await;
    }
    true
}

impl Batch {
    fn count_response(&mut self) {
        if self.first_202_at.is_some() {
            self.responses_since += 1;
        }
    }
}

/// The log could not be made durable: every response from the first waiting 202 on
/// becomes a 503 (the client retries; a retried event is then a logged duplicate).
fn rewrite_as_unavailable(shard: &Shard, out: &mut Vec<u8>, body: &mut Vec<u8>, batch: &mut Batch) {
    let Some(at) = batch.first_202_at else { return };
    out.truncate(at);
    let why = Unavailable::LogError;
    for i in 0..batch.responses_since {
        shard.m().unavailable(why);
        body.clear();
        response::body_error(body, why.message());
        let extra = Extra {
            retry_after_secs: Some(shard.cfg.retry_after_secs),
            allow: None,
            close: i + 1 == batch.responses_since,
        };
        response::write_response(out, Status::Unavailable, ContentType::Json, extra, body);
    }
    batch.accepted_202 = 0;
}

fn write_reject(shard: &Shard, out: &mut Vec<u8>, body: &mut Vec<u8>, r: Reject) {
    body.clear();
    let status = match r {
        Reject::BadRequest(msg) => {
            response::body_error(body, msg);
            Status::BadRequest
        }
        Reject::HeadersTooLarge => {
            response::body_error(body, "request headers too large");
            Status::HeadersTooLarge
        }
        Reject::LengthRequired(msg) => {
            response::body_error(body, msg);
            Status::LengthRequired
        }
        Reject::PayloadTooLarge => {
            response::body_error(body, "request body too large");
            Status::PayloadTooLarge
        }
    };
    shard.m().request(Route::NotFound, status);
    let extra = Extra {
        close: true,
        ..Extra::default()
    };
    response::write_response(out, status, ContentType::Json, extra, body);
}

/// Answers one complete request; returns the status written.
#[allow(clippy::too_many_arguments)]
async fn handle(
    shard: &Shard,
    head: &Head,
    req: &[u8],
    out: &mut Vec<u8>,
    body: &mut Vec<u8>,
    scratch: &mut Scratch,
    batch: &mut Batch,
    peer: Option<IpAddr>,
    exempt: bool,
    now_ms: u64,
    close: bool,
) -> Status {
    body.clear();
    let req_body = &req[head.head_len..];
    let mut extra = Extra {
        close,
        ..Extra::default()
    };
    let mut ct = ContentType::Json;
    let status = match (head.route, head.method) {
        (Route::NotFound, _) => {
            response::body_error(body, "not found");
            Status::NotFound
        }
        (route, method) if route.allowed() != Some(method) => {
            response::body_error(body, "method not allowed");
            extra.allow = Some(if route.allowed() == Some(Method::Post) {
                "POST"
            } else {
                "GET"
            });
            Status::MethodNotAllowed
        }
        (Route::Healthz, _) => {
            body.extend_from_slice(br#"{"status":"ok"}"#);
            Status::Ok
        }
        (Route::Readyz, _) => match not_ready(shard) {
            None => {
                body.extend_from_slice(br#"{"status":"ready"}"#);
                Status::Ok
            }
            Some(why) => {
                response::body_error(body, why);
                extra.retry_after_secs = Some(shard.cfg.retry_after_secs);
                Status::Unavailable
            }
        },
        (Route::Metrics, _) => {
            shard.refresh_gauges();
            let mut text = String::with_capacity(8192);
            crate::metrics::render(&shard.metrics, &mut text);
            if let Some(sink) = shard.cfg.sink.as_deref() {
                sink.render(shard.metrics.len(), &mut text);
            }
            body.extend_from_slice(text.as_bytes());
            ct = ContentType::PromText;
            Status::Ok
        }
        (Route::Click, _) | (Route::Clicks, _) => {
            let r = ingest(
                shard, head.route, req_body, body, scratch, batch, peer, exempt, now_ms,
            )
            .await;
            match r {
                Ok(status) => status,
                Err(IngestError::RateLimited(retry_ms)) => {
                    shard.m().rate_limited();
                    response::body_error(body, "rate limited");
                    extra.retry_after_secs = Some(retry_ms.div_ceil(1000).max(1) as u32);
                    Status::TooManyRequests
                }
                Err(IngestError::Unavailable(why)) => {
                    shard.m().unavailable(why);
                    response::body_error(body, why.message());
                    extra.retry_after_secs = Some(shard.cfg.retry_after_secs);
                    Status::Unavailable
                }
            }
        }
    };
    if status == Status::Accepted
        && matches!(shard.cfg.ack, AckMode::Disk | AckMode::Kafka)
        && batch.first_202_at.is_none()
    {
        batch.first_202_at = Some(out.len());
    }
    batch.count_response();
    shard.m().request(head.route, status);
    response::write_response(out, status, ct, extra, body);
    status
}

fn not_ready(shard: &Shard) -> Option<&'static str> {
    if shard.stopping.get() {
        return Some("shutting down");
    }
    if shard.log.pending_bytes() >= shard.cfg.log_buffer_bytes_max {
        return Some("log buffer full");
    }
    if shard.log.failed() {
        return Some("log not writable");
    }
    if let Some(sink) = shard.cfg.sink.as_deref() {
        return sink.state().reason();
    }
    None
}

/// `POST /v1/click` and `POST /v1/clicks`: writes the 202/400/413 body, or returns the
/// 429/503 for the caller to write.
#[allow(clippy::too_many_arguments)]
async fn ingest(
    shard: &Shard,
    route: Route,
    req_body: &[u8],
    body: &mut Vec<u8>,
    scratch: &mut Scratch,
    batch: &mut Batch,
    peer: Option<IpAddr>,
    exempt: bool,
    now_ms: u64,
) -> Result<Status, IngestError> {
    let cfg = &shard.cfg;
    // Count before parsing: the line bound and the rate limit cost no parse work.
    let events = match route {
        Route::Click => 1,
        _ => http::ndjson_count(req_body, cfg.batch_events_max),
    };
    if events > cfg.batch_events_max {
        let mut num = itoa::Buffer::new();
        body.extend_from_slice(b"{\"error\":\"too many events: at most ");
        body.extend_from_slice(num.format(cfg.batch_events_max).as_bytes());
        body.extend_from_slice(b" per request\"}");
        return Ok(Status::PayloadTooLarge);
    }
    // The limiter is per core: an address whose connections spread over n cores can
    // reach n x the limit. Accepted trade-off: no cross-core traffic per request.
    if let (Some(ip), false) = (peer, exempt) {
        if events > 0 {
            shard
                .limiter
                .borrow_mut()
                .try_take(ip, events as u32, now_ms)
                .map_err(IngestError::RateLimited)?;
        }
    }
    let mut clicks: Vec<Click<'_>> = relend(std::mem::take(&mut scratch.clicks));
    scratch.rejected.clear();
    match route {
        Route::Click => {
            match clickgate_core::parse::parse_click(req_body, now_ms, cfg.ts_skew_ms) {
                Ok(c) => clicks.push(c),
                Err(e) => {
                    shard.m().rejected(e.field);
                    response::body_invalid(body, &e);
                    scratch.clicks = relend(clicks);
                    return Ok(Status::BadRequest);
                }
            }
        }
        _ => {
            for (line, text) in http::ndjson_lines(req_body) {
                match clickgate_core::parse::parse_click(text, now_ms, cfg.ts_skew_ms) {
                    Ok(c) => clicks.push(c),
                    Err(e) => {
                        shard.m().rejected(e.field);
                        scratch.rejected.push((line, e));
                    }
                }
            }
            if clicks.is_empty() {
                match scratch.rejected.first() {
                    Some((_, e)) => response::body_invalid(body, e),
                    None => response::body_invalid(body, &EventError::syntax("no events in body")),
                }
                scratch.clicks = relend(clicks);
                return Ok(Status::BadRequest);
            }
        }
    }
    let r = ingest_events(shard, &clicks, scratch, batch, now_ms).await;
    scratch.clicks = relend(clicks);
    let (accepted, duplicates) = r.map_err(IngestError::Unavailable)?;
    response::body_accepted(body, accepted, duplicates, &scratch.rejected);
    scratch.rejected.clear();
    Ok(Status::Accepted)
}

/// Releases reserved log bytes on every exit path.
struct Reservation<'a> {
    cell: &'a Cell<usize>,
    bytes: usize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.cell.set(self.cell.get() - self.bytes);
    }
}

/// Dedup, log and hand to aggregation every valid event of one request.
/// Returns (accepted, duplicates). A 503 (`Err`) leaves no trace: it is decided before
/// any bloom shard is touched.
async fn ingest_events(
    shard: &Shard,
    clicks: &[Click<'_>],
    s: &mut Scratch,
    batch: &mut Batch,
    now_ms: u64,
) -> Result<(u64, u64), Unavailable> {
    // 0. The rule snapshot this request is judged with, whole, even if a new set is
    //    swapped in while it waits for dedup verdicts.
    let active = shard.rules.snapshot();

    // 1. Reserve log space first: once an id is in a bloom shard, a retry of it would be
    //    a duplicate, so the event must then reach the log. Rules are evaluated only
    //    after dedup (step 6), so each event reserves room for the most rule ids a record
    //    of this set can carry: the 503 is still decided before any bloom is touched.
    if shard.log.failed() {
        return Err(Unavailable::LogError);
    }
    let rule_bytes = active.rules.fired_bytes_max();
    let need: usize = clicks
        .iter()
        .map(|c| FRAME_HEADER_BYTES + encoded_len(c, &[]) + rule_bytes)
        .sum();
    let reserved = shard.reserved_log_bytes.get();
    if shard.log.pending_bytes() + reserved + need > shard.cfg.log_buffer_bytes_max {
        return Err(Unavailable::LogFull);
    }
    shard.reserved_log_bytes.set(reserved + need);
    let _reservation = Reservation {
        cell: &shard.reserved_log_bytes,
        bytes: need,
    };

    // 2. Hash and find owners.
    s.hashes.clear();
    s.dup.clear();
    s.dup.resize(clicks.len(), false);
    for v in s.owned.iter_mut() {
        v.clear();
    }
    for (i, c) in clicks.iter().enumerate() {
        let h = event_hash(&c.event_id);
        s.hashes.push(h);
        s.owned[shard_for(h, shard.ncores)].push(i as u32);
    }

    // 3. One message per other owner. Only the first send may fail (full channel → 503,
    //    nothing inserted anywhere yet); later ones wait for room, which the owner's
    //    lookup task frees without waiting on anything.
    s.sent.clear();
    if let Some(senders) = &shard.lookups {
        for owner in 0..shard.ncores {
            if owner == shard.shard_id || s.owned[owner].is_empty() {
                continue;
            }
            let (slot, msg) = {
                let mut w = shard.waiters.borrow_mut();
                let mut hashes = w.take_vec();
                hashes.extend(s.owned[owner].iter().map(|&i| s.hashes[i as usize]));
                let slot = w.register();
                (slot, LookupReq { slot, hashes })
            };
            let sent = if s.sent.is_empty() {
                senders.try_send_to(owner, msg).is_ok()
            } else {
                senders.send_to(owner, msg).await.is_ok()
            };
            if !sent {
                shard.waiters.borrow_mut().abandon_unsent(slot);
                if s.sent.is_empty() {
                    return Err(Unavailable::XcoreFull);
                }
                // The owner is gone (only at shutdown): its events cannot be checked.
                for &(_, slot) in s.sent.iter() {
                    shard.waiters.borrow_mut().abandon(slot);
                }
                return Err(Unavailable::Stopping);
            }
            shard.m().remote_lookups(s.owned[owner].len() as u64);
            s.sent.push((owner, slot));
        }
    }

    // 4. Our own shard, locally.
    {
        let mut bloom = shard.bloom.borrow_mut();
        for &i in s.owned[shard.shard_id].iter() {
            s.dup[i as usize] = bloom.check_and_insert(s.hashes[i as usize], now_ms);
        }
    }

    // 5. The other owners' verdicts.
    for &(owner, slot) in s.sent.iter() {
        let verdicts = Wait {
            waiters: &shard.waiters,
            slot,
            done: false,
        }
        .await;
        for (j, &i) in s.owned[owner].iter().enumerate() {
            s.dup[i as usize] = verdicts[j] != 0;
        }
        shard.waiters.borrow_mut().recycle(verdicts);
    }

    // 6. Judge every new event (fraud gate), log every event (duplicates flagged, with
    //    no verdict), then the aggregation hook.
    let (mut accepted, mut duplicates) = (0u64, 0u64);
    for (i, c) in clicks.iter().enumerate() {
        let (flags, decision) = if s.dup[i] {
            (Flags::default().with_duplicate(true), Decision::default())
        } else {
            let d = judge(shard, &active, c);
            (Flags::default().with_fraud(d.fraud()), d)
        };
        let mut ids = [""; FIRED_MAX];
        for (j, &r) in decision.fired().iter().enumerate() {
            ids[j] = active.rules.rule_id(r);
        }
        let ids = &ids[..decision.fired().len()];
        let lsn = append(shard, c, flags, now_ms, ids).await?;
        batch.max_lsn = batch.max_lsn.max(lsn);
        shard.on_accepted(c, flags, lsn);
        if s.dup[i] {
            duplicates += 1;
        } else {
            accepted += 1;
        }
    }
    shard.m().accepted(accepted);
    shard.m().duplicates(duplicates);
    Ok((accepted, duplicates))
}

/// The fraud gate for one new (non-duplicate) event. The per-IP minute counter counts
/// only new events: a publisher's retry must stay harmless (contract §2), so a
/// duplicate neither counts toward nor is judged by the rate rule; billing, which
/// dedups exactly, counts the same way (contract §6).
#[inline]
fn judge(shard: &Shard, active: &ActiveRules, c: &Click<'_>) -> Decision {
    let rules = &active.rules;
    if rules.is_empty() {
        return Decision::default();
    }
    let ip_clicks = if rules.needs_ip_rate() {
        shard.rules.ip_rate.borrow_mut().hit(c.ip, c.ts_ms)
    } else {
        0
    };
    let d = rules.evaluate(c, ip_clicks);
    if d.fraud() {
        let m = shard.m();
        m.fraud_event();
        for &r in d.fired() {
            m.fraud_rule(active.slots[r as usize]);
        }
    }
    d
}

async fn append(
    shard: &Shard,
    c: &Click<'_>,
    flags: Flags,
    recv_ms: u64,
    rules: &[&str],
) -> Result<u64, Unavailable> {
    let len = encoded_len(c, rules);
    let deadline = Instant::now() + Duration::from_millis(LOG_FULL_WAIT_MS);
    loop {
        let r = shard.log.append_with(len, |buf| {
            encode_into(c, flags, recv_ms, rules, buf)
                .expect("rule ids within the record's bounds always encode")
        });
        match r {
            Ok(lsn) => return Ok(lsn),
            Err(_) if shard.log.failed() => return Err(Unavailable::LogError),
            Err(_full) if Instant::now() < deadline => {
                glommio::timer::sleep(Duration::from_millis(1)).await
            }
            Err(_full) => {
                tracing::error!(
                    core = shard.k,
                    "log stayed full after its space was reserved"
                );
                return Err(Unavailable::LogFull);
            }
        }
    }
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
