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
use crate::http::{self, Frame, ReadBuf, Reject, Route};
use crate::metrics::Unavailable;
use crate::pipeline::Scratch;
use crate::response::{self, ContentType, Extra, Status};
use crate::routes;
use crate::shard::{wall_ms, Shard};

/// Open connections, so shutdown and the idle sweep can reach them.
#[derive(Default)]
pub(crate) struct ConnTable {
    pub(crate) entries: Vec<Option<ConnEntry>>,
    free: Vec<usize>,
    pub(crate) len: usize,
}

pub(crate) struct ConnEntry {
    pub(crate) fd: RawFd,
    /// Wall-clock ms of the connection's last read or write.
    pub(crate) active_ms: Cell<u64>,
}

impl ConnTable {
    pub(crate) fn insert(&mut self, fd: RawFd, now_ms: u64) -> usize {
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

    pub(crate) fn touch(&self, i: usize, now_ms: u64) {
        if let Some(e) = &self.entries[i] {
            e.active_ms.set(now_ms);
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
}

impl ConnBufs {
    pub(crate) fn new(cap: usize) -> ConnBufs {
        ConnBufs {
            rb: ReadBuf::new(cap),
            out: Vec::with_capacity(4096),
            body: Vec::with_capacity(1024),
            scratch: Scratch::default(),
        }
    }

    /// Ready for a new connection.
    pub(crate) fn reset(&mut self, cap: usize) {
        self.rb.reset(cap);
        self.out.clear();
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
