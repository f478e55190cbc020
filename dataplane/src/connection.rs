//! One task per connection: reads, frames the (pipelined) requests of each read, answers
//! them through [`crate::routes`] into one output buffer, waits for durability
//! (`ack = disk`) or the Kafka acknowledgement (`ack = kafka`) once per read, and writes
//! the responses with one write. Connection buffers are pooled per core.

use std::cell::Cell;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::config::AckMode;
use crate::http::{self, Frame, ReadBuf, Reject, Route, READ_BUF_BYTES_INITIAL};
use crate::metrics::Unavailable;
use crate::pipeline::Scratch;
use crate::response::{self, ContentType, Extra, Status};
use crate::routes;
use crate::shard::{mono_ms, wall_ms, Shard};

/// Open connections, so shutdown and the idle sweep can reach them.
#[derive(Default)]
pub(crate) struct ConnTable {
    pub(crate) entries: Vec<Option<ConnEntry>>,
    free: Vec<usize>,
    pub(crate) len: usize,
}

pub(crate) struct ConnEntry {
    pub(crate) fd: RawFd,
    /// Monotonic ms (`mono_ms`) of the connection's last read or write.
    pub(crate) active_ms: Cell<u64>,
    /// Monotonic ms by which the request being received must be whole; 0 between
    /// requests (then `idle_timeout_ms` applies).
    pub(crate) deadline_ms: Cell<u64>,
    /// The deadline is the body's (the head is in).
    pub(crate) in_body: Cell<bool>,
}

impl ConnTable {
    pub(crate) fn insert(&mut self, fd: RawFd, now_ms: u64) -> usize {
        self.len += 1;
        let e = Some(ConnEntry {
            fd,
            active_ms: Cell::new(now_ms),
            deadline_ms: Cell::new(0),
            in_body: Cell::new(false),
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

    pub(crate) fn touch(&self, i: usize, now_ms: u64) {
        if let Some(e) = &self.entries[i] {
            e.active_ms.set(now_ms);
        }
    }

    /// Sets the deadline of the request being received (`0`: none in progress).
    fn set_deadline(&self, i: usize, deadline_ms: u64, in_body: bool) {
        if let Some(e) = &self.entries[i] {
            e.deadline_ms.set(deadline_ms);
            e.in_body.set(in_body);
        }
    }

    pub(crate) fn remove(&mut self, i: usize) {
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
    /// Bytes of `rb` beyond `READ_BUF_BYTES_INITIAL` taken from the core's in-flight
    /// body budget.
    charged: usize,
}

impl ConnBufs {
    pub(crate) fn new(cap: usize) -> ConnBufs {
        ConnBufs {
            rb: ReadBuf::new(cap),
            out: Vec::with_capacity(4096),
            body: Vec::with_capacity(1024),
            scratch: Scratch::default(),
            charged: 0,
        }
    }

    /// Ready for a new connection.
    pub(crate) fn reset(&mut self, cap: usize) {
        self.rb.reset(cap);
        self.out.clear();
        if self.out.capacity() > OUT_BYTES_KEEP {
            self.out = Vec::with_capacity(4096);
        }
        self.charged = 0;
        self.scratch.trim();
    }
}

/// Per-read bookkeeping of the responses that wait for the log to be durable.
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) max_lsn: u64,
    /// Offset in `out` of the first 202 that waits for durability.
    pub(crate) first_202_at: Option<usize>,
    /// Responses written from `first_202_at` on.
    responses_since: usize,
    /// 202s answered in this batch (for the latency histogram).
    accepted_202: u64,
}

/// Responses a connection buffers before writing them (pipelined requests past it wait
/// in the read buffer for the next round): a flood of pipelined requests costs bounded
/// output memory. One response may take it past this (`/metrics`), not two.
const OUT_BYTES_MAX: usize = 64 << 10;
/// A connection's output buffer larger than this is given back after its write.
const OUT_BYTES_KEEP: usize = 2 * OUT_BYTES_MAX;

/// Serves one connection until it closes. One task per connection, none per request.
/// `counted`: the accept loop counted it against its address (given back here).
pub(crate) async fn serve_connection(
    shard: Rc<Shard>,
    stream: TcpStream,
    peer: Option<IpAddr>,
    exempt: bool,
    counted: bool,
) {
    let fd = stream.as_raw_fd();
    let slot = shard.conns.borrow_mut().insert(fd, mono_ms());
    shard.m().connection_opened();
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
    shard.release_body_bytes(bufs.charged);
    bufs.charged = 0;
    shard.put_bufs(bufs);
    shard.conns.borrow_mut().remove(slot);
    if let (true, Some(ip)) = (counted, peer) {
        shard.release_address(ip);
    }
    shard.m().connection_closed();
}

/// Answers a connection over `connections_per_core_max` or `connections_per_address_max`
/// with 503 and closes it.
pub(crate) async fn refuse_connection(shard: Rc<Shard>, mut stream: TcpStream, why: Unavailable) {
    let mut body = Vec::with_capacity(64);
    let mut out = Vec::with_capacity(256);
    write_unavailable(&shard, &mut out, &mut body, why);
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
        charged,
    } = bufs;
    // Total size of the request being received, once its head is parsed.
    let mut want = 0usize;
    let mut continue_sent = false;
    // Complete requests wait in `rb` because `out` is full: answer them before reading.
    let mut pending = false;
    // What the connection's deadline is set for: no request, a head, a body.
    let mut phase = Phase::Idle;
    loop {
        if !pending {
            // A read that must grow the buffer takes the growth from the core's budget
            // first; a core at its budget refuses rather than grows.
            let extra = rb
                .next_capacity(want)
                .saturating_sub(READ_BUF_BYTES_INITIAL);
            if extra > *charged {
                if !shard.reserve_body_bytes(extra - *charged) {
                    write_unavailable(shard, out, body, Unavailable::BodyBudget);
                    stream.write_all(out).await?;
                    out.clear();
                    let _ = stream.close().await;
                    return Ok(());
                }
                *charged = extra;
            }
            let n = stream.read(rb.spare(want)).await?;
            if n == 0 {
                return Ok(());
            }
            rb.filled(n);
            shard.m().bytes_in(n as u64);
        }
        pending = false;
        // One clock read of each kind per read, not per request: pipelined requests
        // share their receive time.
        let now_ms = wall_ms();
        let received = Instant::now();
        let mono = mono_ms();
        shard.conns.borrow().touch(slot, mono);
        let mut close = false;
        batch.max_lsn = 0;
        batch.first_202_at = None;
        batch.responses_since = 0;
        batch.accepted_202 = 0;
        // Requests answered in this round: the one a deadline was set for is done.
        let mut served = 0usize;
        // Answer every complete request in the buffer, in order.
        loop {
            if out.len() >= OUT_BYTES_MAX {
                pending = true;
                break;
            }
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
            let status = routes::handle(
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
            );
            if status == Status::Accepted {
                batch.accepted_202 += 1;
            }
            rb.consume(head.total_len());
            served += 1;
            if !keep_alive {
                close = true;
                break;
            }
        }
        // The buffer may have shrunk back: give its growth back to the budget.
        let extra = rb.capacity().saturating_sub(READ_BUF_BYTES_INITIAL);
        if extra < *charged {
            shard.release_body_bytes(*charged - extra);
            *charged = extra;
        }
        // Deadlines: set when a head or a body starts arriving, never pushed back by
        // the bytes that follow; a request that completes ends its deadline, so the next
        // one (pipelined, its start already read) gets its own.
        let now_phase = if rb.is_empty() || pending {
            Phase::Idle
        } else if want > 0 {
            Phase::Body
        } else {
            Phase::Head
        };
        if now_phase != phase || (served > 0 && now_phase != Phase::Idle) {
            let deadline = match now_phase {
                Phase::Idle => 0,
                Phase::Head => mono + shard.cfg.header_timeout_ms,
                Phase::Body => mono + shard.cfg.body_timeout_ms,
            };
            shard
                .conns
                .borrow()
                .set_deadline(slot, deadline, now_phase == Phase::Body);
            phase = now_phase;
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
            if out.capacity() > OUT_BYTES_KEEP {
                *out = Vec::with_capacity(4096);
            }
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
    pub(crate) fn count_response(&mut self) {
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

/// What a connection's deadline currently guards.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Head,
    Body,
}

/// A 503 that closes the connection, for a reason of the core's own.
fn write_unavailable(shard: &Shard, out: &mut Vec<u8>, body: &mut Vec<u8>, why: Unavailable) {
    shard.m().unavailable(why);
    body.clear();
    response::body_error(body, why.message());
    let extra = Extra {
        retry_after_secs: Some(shard.cfg.retry_after_secs),
        allow: None,
        close: true,
    };
    response::write_response(out, Status::Unavailable, ContentType::Json, extra, body);
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
