//! One load worker: a hand-rolled edge-triggered epoll loop on one thread
//! driving many non-blocking keep-alive connections.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hdrhistogram::Histogram;

use crate::gen::{EventGen, Mix};
use crate::resp::{parse_counts, parse_response};

/// CLOCK_MONOTONIC in nanoseconds.
#[inline]
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[inline]
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counters shown by the live progress line (all responses, warm-up included).
#[derive(Default)]
pub struct Progress {
    pub requests: AtomicU64,
    pub events: AtomicU64,
    pub errors: AtomicU64,
}

pub struct WorkerCfg {
    pub addr: SocketAddr,
    pub host: String,
    /// 0: single-event mode; otherwise events per NDJSON request.
    pub batch: usize,
    pub connections: usize,
    pub pipeline: usize,
    /// Requests per second for this worker; 0 = closed loop.
    pub rate: f64,
    pub start_ns: u64,
    pub warm_end_ns: u64,
    pub end_ns: u64,
    /// After `end_ns`: how long to wait for the responses still outstanding (nothing new is
    /// sent). They count only in the whole-run totals.
    pub drain_ns: u64,
    pub mix: Mix,
    pub seed: u64,
    pub stream: u64,
    /// Pooled generation with this many template events (0: every event fresh).
    pub pool: usize,
}

/// What one worker measured inside the measurement window.
pub struct Stats {
    pub hist: Histogram<u64>,
    pub requests: u64,
    pub events: u64,
    pub status: Vec<u64>,
    pub conn_errors: u64,
    pub protocol_errors: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Requests due (open loop) but never sent before the end: the backlog.
    pub backlog_at_end: u64,
    /// Whole run (warm-up, window and drain): requests written, responses read, and the
    /// 202 body counters summed over all of them.
    pub total: Totals,
}

/// Counters over the whole run, to reconcile with the server's own counters.
#[derive(Default, Clone, Copy, Debug, serde::Serialize)]
pub struct Totals {
    pub requests_sent: u64,
    pub events_sent: u64,
    pub responses: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Requests dropped with their connection before an answer (reset, close).
    pub lost: u64,
    /// Requests still unanswered when the drain time was over.
    pub unanswered: u64,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            // ns, 1 ns .. 100 s, 3 significant digits.
            hist: Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram"),
            requests: 0,
            events: 0,
            status: vec![0; 600],
            conn_errors: 0,
            protocol_errors: 0,
            accepted: 0,
            duplicates: 0,
            rejected: 0,
            backlog_at_end: 0,
            total: Totals::default(),
        }
    }

    pub fn merge(&mut self, o: &Stats) {
        self.hist.add(&o.hist).expect("same bounds");
        self.requests += o.requests;
        self.events += o.events;
        for (a, b) in self.status.iter_mut().zip(&o.status) {
            *a += b;
        }
        self.conn_errors += o.conn_errors;
        self.protocol_errors += o.protocol_errors;
        self.accepted += o.accepted;
        self.duplicates += o.duplicates;
        self.rejected += o.rejected;
        self.backlog_at_end += o.backlog_at_end;
        let (t, u) = (&mut self.total, &o.total);
        t.requests_sent += u.requests_sent;
        t.events_sent += u.events_sent;
        t.responses += u.responses;
        t.accepted += u.accepted;
        t.duplicates += u.duplicates;
        t.rejected += u.rejected;
        t.lost += u.lost;
        t.unanswered += u.unanswered;
    }
}

/// Builds request bytes (head + generated body) straight into a connection's
/// write buffer: the body is written after a Content-Length placeholder sized like
/// the previous body's length, which is then filled in (shifted in the rare case
/// the digit count changed).
pub struct ReqBuilder {
    gen: EventGen,
    head: Vec<u8>,
    batch: usize,
    len_digits: usize,
    itoa: itoa::Buffer,
}

impl ReqBuilder {
    pub fn new(host: &str, batch: usize, gen: EventGen) -> Self {
        let (path, ctype) = if batch == 0 {
            ("/v1/click", "application/json")
        } else {
            ("/v1/clicks", "application/x-ndjson")
        };
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nContent-Length: "
        )
        .into_bytes();
        ReqBuilder {
            gen,
            head,
            batch,
            len_digits: 3,
            itoa: itoa::Buffer::new(),
        }
    }

    /// Appends one request to `out`; returns the number of events in it.
    pub fn build(&mut self, out: &mut Vec<u8>) -> u32 {
        let now = wall_ms();
        out.extend_from_slice(&self.head);
        let len_at = out.len();
        out.resize(len_at + self.len_digits, b'0');
        out.extend_from_slice(b"\r\n\r\n");
        let body_at = out.len();
        let n = if self.batch == 0 {
            self.gen.write_event(out, now);
            1
        } else {
            for _ in 0..self.batch {
                self.gen.write_event(out, now);
                out.push(b'\n');
            }
            self.batch as u32
        };
        let text = self.itoa.format(out.len() - body_at).as_bytes();
        if text.len() == self.len_digits {
            out[len_at..len_at + text.len()].copy_from_slice(text);
        } else {
            out.splice(len_at..len_at + self.len_digits, text.iter().copied());
            self.len_digits = text.len();
        }
        n
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Not connected; retry at the given time.
    Idle(u64),
    Connecting,
    Open,
}

struct Conn {
    fd: i32,
    state: State,
    gen: u64,
    wbuf: Vec<u8>,
    wpos: usize,
    rbuf: Vec<u8>,
    rstart: usize,
    rlen: usize,
    /// (intended send time ns, events) of requests awaiting a response, in order.
    inflight: VecDeque<(u64, u32)>,
    dirty: bool,
}

const TIMER_TOKEN: u64 = u64::MAX;
const RECONNECT_BACKOFF_NS: u64 = 10_000_000;
const READ_CHUNK: usize = 64 * 1024;

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and suitably aligned.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

struct Worker {
    cfg: WorkerCfg,
    epfd: i32,
    timerfd: i32,
    conns: Vec<Conn>,
    builder: ReqBuilder,
    stats: Stats,
    progress: Arc<Progress>,
    /// Progress counters not yet published.
    p_req: u64,
    p_ev: u64,
    p_err: u64,
    /// Open loop: free pipeline slots (conn, conn generation), FIFO.
    free: VecDeque<(usize, u64)>,
    next_k: u64,
    interval_ns: f64,
    dirty: Vec<usize>,
    sa: (libc::sockaddr_storage, libc::socklen_t),
}

pub fn run_worker(cfg: WorkerCfg, progress: Arc<Progress>) -> io::Result<Stats> {
    // SAFETY: plain syscalls; fds are owned by the worker and closed below.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut gen = EventGen::new(cfg.mix.clone(), cfg.seed, cfg.stream);
    if cfg.pool > 0 {
        gen.use_pool(cfg.pool);
    }
    let builder = ReqBuilder::new(&cfg.host, cfg.batch, gen);
    let conns = (0..cfg.connections)
        .map(|_| Conn {
            fd: -1,
            state: State::Idle(0),
            gen: 0,
            wbuf: Vec::with_capacity(if cfg.batch == 0 {
                4096
            } else {
                cfg.batch * 450
            }),
            wpos: 0,
            rbuf: vec![0; READ_CHUNK],
            rstart: 0,
            rlen: 0,
            inflight: VecDeque::with_capacity(cfg.pipeline),
            dirty: false,
        })
        .collect();
    let interval_ns = if cfg.rate > 0.0 { 1e9 / cfg.rate } else { 0.0 };
    let sa = sockaddr(&cfg.addr);
    let mut w = Worker {
        cfg,
        epfd,
        timerfd: -1,
        conns,
        builder,
        stats: Stats::new(),
        progress,
        p_req: 0,
        p_ev: 0,
        p_err: 0,
        free: VecDeque::new(),
        next_k: 0,
        interval_ns,
        dirty: Vec::new(),
        sa,
    };
    let r = w.run();
    for c in &mut w.conns {
        if c.fd >= 0 {
            // SAFETY: fd owned by this connection.
            unsafe { libc::close(c.fd) };
            c.fd = -1;
        }
    }
    // SAFETY: fds owned by the worker.
    unsafe {
        if w.timerfd >= 0 {
            libc::close(w.timerfd);
        }
        libc::close(w.epfd);
    }
    r.map(|_| w.stats)
}

impl Worker {
    fn open_loop(&self) -> bool {
        self.interval_ns > 0.0
    }

    fn run(&mut self) -> io::Result<()> {
        if self.open_loop() {
            self.start_timer()?;
        }
        let now = mono_ns();
        for i in 0..self.conns.len() {
            self.connect(i, now);
        }
        let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let drain_end = self.cfg.end_ns + self.cfg.drain_ns;
        loop {
            let now = mono_ns();
            let draining = now >= self.cfg.end_ns;
            if draining && (now >= drain_end || self.conns.iter().all(|c| c.inflight.is_empty())) {
                break;
            }
            // Reconnect what is due; find the next wake-up.
            let mut wake = if draining {
                drain_end.min(now + 50_000_000)
            } else {
                self.cfg.end_ns.min(now + 50_000_000)
            };
            for i in 0..self.conns.len() {
                if draining {
                    break;
                }
                if let State::Idle(at) = self.conns[i].state {
                    if at <= now {
                        self.connect(i, now);
                    }
                    if let State::Idle(at) = self.conns[i].state {
                        wake = wake.min(at);
                    }
                }
            }
            if self.open_loop() {
                self.dispatch(now);
            }
            self.flush_dirty();
            self.publish();
            let timeout_ms = (wake.saturating_sub(now)).div_ceil(1_000_000) as i32;
            // SAFETY: events buffer valid for its length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epfd,
                    events.as_mut_ptr(),
                    events.len() as i32,
                    timeout_ms,
                )
            };
            if n < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                return Err(io::Error::last_os_error());
            }
            for ev in &events[..n as usize] {
                let (flags, token) = (ev.events, ev.u64);
                if token == TIMER_TOKEN {
                    let mut buf = [0u8; 8];
                    // SAFETY: reading 8 bytes into an 8-byte buffer.
                    unsafe { libc::read(self.timerfd, buf.as_mut_ptr().cast(), 8) };
                    continue;
                }
                self.on_event(token as usize, flags);
            }
        }
        self.stats.total.unanswered = self.conns.iter().map(|c| c.inflight.len() as u64).sum();
        // Requests that were due but never sent: the server could not keep up.
        if self.open_loop() {
            let due = ((self.cfg.end_ns - self.cfg.start_ns) as f64 / self.interval_ns) as u64;
            self.stats.backlog_at_end = due.saturating_sub(self.next_k);
        }
        self.publish();
        Ok(())
    }

    fn start_timer(&mut self) -> io::Result<()> {
        // SAFETY: plain syscalls with valid arguments.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.timerfd = fd;
        // Wake at the request interval, but not more often than every 20 µs: sends
        // within one tick go out together (latency still counts from intended times).
        let period = (self.interval_ns as u64).max(20_000);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: (period / 1_000_000_000) as _,
                tv_nsec: (period % 1_000_000_000) as _,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: 1_000,
            },
        };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: TIMER_TOKEN,
        };
        // SAFETY: valid fd and structs.
        unsafe {
            if libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) < 0
                || libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn publish(&mut self) {
        let p = &self.progress;
        if self.p_req > 0 {
            p.requests.fetch_add(self.p_req, Ordering::Relaxed);
            p.events.fetch_add(self.p_ev, Ordering::Relaxed);
            self.p_req = 0;
            self.p_ev = 0;
        }
        if self.p_err > 0 {
            p.errors.fetch_add(self.p_err, Ordering::Relaxed);
            self.p_err = 0;
        }
    }

    fn in_window(&self, now: u64) -> bool {
        now >= self.cfg.warm_end_ns && now <= self.cfg.end_ns
    }

    fn conn_error(&mut self, now: u64) {
        self.p_err += 1;
        if self.in_window(now) {
            self.stats.conn_errors += 1;
        }
    }

    fn connect(&mut self, i: usize, now: u64) {
        // SAFETY: plain syscalls; the fd is stored in the connection and closed by it.
        unsafe {
            let family = if self.cfg.addr.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            let fd = libc::socket(
                family,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                self.conns[i].state = State::Idle(now + RECONNECT_BACKOFF_NS);
                self.conn_error(now);
                return;
            }
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            let rc = libc::connect(
                fd,
                &self.sa.0 as *const _ as *const libc::sockaddr,
                self.sa.1,
            );
            if rc < 0 && errno() != libc::EINPROGRESS {
                libc::close(fd);
                self.conns[i].state = State::Idle(now + RECONNECT_BACKOFF_NS);
                self.conn_error(now);
                return;
            }
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET | libc::EPOLLRDHUP) as u32,
                u64: i as u64,
            };
            if libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) < 0 {
                libc::close(fd);
                self.conns[i].state = State::Idle(now + RECONNECT_BACKOFF_NS);
                self.conn_error(now);
                return;
            }
            let c = &mut self.conns[i];
            c.fd = fd;
            c.state = State::Connecting;
            if rc == 0 {
                self.on_open(i);
            }
        }
    }

    fn on_open(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.state = State::Open;
        if self.interval_ns > 0.0 {
            for _ in 0..self.cfg.pipeline {
                self.free.push_back((i, c.gen));
            }
        } else {
            self.fill(i);
        }
    }

    /// Drops the connection; `error` counts it as a connection error.
    fn close(&mut self, i: usize, error: bool, now: u64) {
        let c = &mut self.conns[i];
        if c.fd >= 0 {
            // SAFETY: fd owned by this connection (close also removes it from epoll).
            unsafe { libc::close(c.fd) };
        }
        c.fd = -1;
        c.gen += 1;
        c.wbuf.clear();
        c.wpos = 0;
        c.rstart = 0;
        c.rlen = 0;
        self.stats.total.lost += c.inflight.len() as u64;
        c.inflight.clear();
        c.state = if error {
            State::Idle(now + RECONNECT_BACKOFF_NS)
        } else {
            State::Idle(now)
        };
        if error {
            self.conn_error(now);
        }
    }

    fn on_event(&mut self, i: usize, flags: u32) {
        let now = mono_ns();
        match self.conns[i].state {
            State::Idle(_) => {}
            State::Connecting => {
                let mut err: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: valid fd and out-pointers.
                let rc = unsafe {
                    libc::getsockopt(
                        self.conns[i].fd,
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        &mut err as *mut _ as *mut libc::c_void,
                        &mut len,
                    )
                };
                if rc < 0 || err != 0 || flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                    self.close(i, true, now);
                } else if flags & libc::EPOLLOUT as u32 != 0 {
                    self.on_open(i);
                    self.flush(i, now);
                }
            }
            State::Open => {
                if flags
                    & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLRDHUP) as u32
                    != 0
                {
                    self.read(i);
                }
                if flags & libc::EPOLLOUT as u32 != 0 && self.conns[i].state == State::Open {
                    self.flush(i, mono_ns());
                }
            }
        }
    }

    /// Reads until drained, handling every complete response.
    fn read(&mut self, i: usize) {
        loop {
            let c = &mut self.conns[i];
            if c.rstart == c.rlen {
                c.rstart = 0;
                c.rlen = 0;
            }
            if c.rbuf.len() - c.rlen < 4096 {
                if c.rstart > 0 {
                    c.rbuf.copy_within(c.rstart..c.rlen, 0);
                    c.rlen -= c.rstart;
                    c.rstart = 0;
                }
                if c.rbuf.len() - c.rlen < 4096 {
                    let n = c.rbuf.len() * 2;
                    c.rbuf.resize(n, 0);
                }
            }
            let spare = c.rbuf.len() - c.rlen;
            // SAFETY: writing at most `spare` bytes into the buffer's tail.
            let n = unsafe { libc::read(c.fd, c.rbuf.as_mut_ptr().add(c.rlen).cast(), spare) };
            let now = mono_ns();
            if n > 0 {
                c.rlen += n as usize;
                if !self.handle_responses(i, now) {
                    return;
                }
                if (n as usize) < spare {
                    break;
                }
            } else if n == 0 {
                // EOF: an error if requests were outstanding.
                let lost = !self.conns[i].inflight.is_empty();
                self.close(i, lost, now);
                return;
            } else {
                let e = errno();
                if e == libc::EAGAIN || e == libc::EINTR {
                    if e == libc::EINTR {
                        continue;
                    }
                    break;
                }
                self.close(i, true, now);
                return;
            }
        }
        if self.open_loop() {
            // dispatch() in the main loop will use the freed slots.
        } else {
            self.fill(i);
            self.flush(i, mono_ns());
        }
    }

    /// Consumes complete responses; false if the connection was closed.
    fn handle_responses(&mut self, i: usize, now: u64) -> bool {
        let in_window = self.in_window(now);
        loop {
            let c = &mut self.conns[i];
            let buf = &c.rbuf[c.rstart..c.rlen];
            let r = match parse_response(buf) {
                Ok(Some(r)) => r,
                Ok(None) => return true,
                Err(_) => {
                    if in_window {
                        self.stats.protocol_errors += 1;
                    }
                    self.close(i, true, now);
                    return false;
                }
            };
            let Some((intended, events)) = c.inflight.pop_front() else {
                // A response nobody asked for.
                if in_window {
                    self.stats.protocol_errors += 1;
                }
                self.close(i, true, now);
                return false;
            };
            self.p_req += 1;
            self.p_ev += events as u64;
            if !(200..300).contains(&r.status) {
                self.p_err += 1;
            }
            let counts = if r.status == 202 {
                parse_counts(&buf[r.body.clone()])
            } else {
                Default::default()
            };
            let t = &mut self.stats.total;
            t.responses += 1;
            t.accepted += counts.accepted;
            t.duplicates += counts.duplicates;
            t.rejected += counts.rejected;
            if in_window {
                let s = &mut self.stats;
                s.requests += 1;
                s.events += events as u64;
                s.status[(r.status as usize).min(599)] += 1;
                s.hist
                    .saturating_record(now.saturating_sub(intended).max(1));
                s.accepted += counts.accepted;
                s.duplicates += counts.duplicates;
                s.rejected += counts.rejected;
            }
            c.rstart += r.len;
            if self.interval_ns > 0.0 {
                self.free.push_back((i, c.gen));
            }
            if r.close {
                self.close(i, false, now);
                return false;
            }
        }
    }

    /// Closed loop: keep `pipeline` requests in flight on connection `i`.
    fn fill(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.state != State::Open {
            return;
        }
        let before = c.inflight.len();
        while c.inflight.len() < self.cfg.pipeline {
            if mono_ns() >= self.cfg.end_ns {
                break;
            }
            let ev = self.builder.build(&mut c.wbuf);
            c.inflight.push_back((0, ev));
            self.stats.total.requests_sent += 1;
            self.stats.total.events_sent += ev as u64;
        }
        // Latency counts from the send (the caller flushes right away), not from
        // before generating the body.
        let t = mono_ns();
        for r in c.inflight.iter_mut().skip(before) {
            r.0 = t;
        }
    }

    /// Open loop: hand every request that is due to a free connection slot.
    fn dispatch(&mut self, now: u64) {
        loop {
            let t = self.cfg.start_ns + (self.next_k as f64 * self.interval_ns) as u64;
            if t > now || t >= self.cfg.end_ns {
                return;
            }
            let i = loop {
                match self.free.pop_front() {
                    None => return, // backlog: requests wait, their latency grows
                    Some((i, g)) => {
                        let c = &self.conns[i];
                        if c.gen == g && c.state == State::Open {
                            break i;
                        }
                    }
                }
            };
            let c = &mut self.conns[i];
            let ev = self.builder.build(&mut c.wbuf);
            c.inflight.push_back((t, ev));
            self.stats.total.requests_sent += 1;
            self.stats.total.events_sent += ev as u64;
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(i);
            }
            self.next_k += 1;
        }
    }

    fn flush_dirty(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let now = mono_ns();
        let dirty = std::mem::take(&mut self.dirty);
        for &i in &dirty {
            self.conns[i].dirty = false;
            if self.conns[i].state == State::Open {
                self.flush(i, now);
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
    }

    /// Writes as much pending output as the socket takes; the rest waits for EPOLLOUT.
    fn flush(&mut self, i: usize, now: u64) {
        let c = &mut self.conns[i];
        while c.wpos < c.wbuf.len() {
            let pending = &c.wbuf[c.wpos..];
            // SAFETY: valid fd and buffer.
            let n = unsafe {
                libc::send(
                    c.fd,
                    pending.as_ptr().cast(),
                    pending.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                c.wpos += n as usize;
            } else {
                let e = errno();
                if e == libc::EINTR {
                    continue;
                }
                if e == libc::EAGAIN {
                    return;
                }
                self.close(i, true, now);
                return;
            }
        }
        c.wbuf.clear();
        c.wpos = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix() -> Mix {
        Mix {
            campaigns: 10,
            zipf: 1.1,
            users: 10,
            dup_share: 0.0,
            invalid_share: 0.0,
            bot_share: 0.0,
            burst_ips: 0,
            burst_share: 0.5,
            late_share: 0.0,
        }
    }

    /// Splits a stream of requests and checks each one's Content-Length.
    fn check_requests(buf: &[u8], expect: usize, path: &str) {
        let mut rest = buf;
        let mut n = 0;
        while !rest.is_empty() {
            let end = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let head = std::str::from_utf8(&rest[..end]).unwrap();
            assert!(
                head.starts_with(&format!("POST {path} HTTP/1.1\r\n")),
                "{head}"
            );
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let body = &rest[end..end + len];
            for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                serde_json::from_slice::<serde_json::Value>(line).unwrap();
            }
            rest = &rest[end + len..];
            n += 1;
        }
        assert_eq!(n, expect);
    }

    #[test]
    fn requests_have_exact_lengths() {
        // Single events (about 400 bytes: the 3-digit guess holds, then changes).
        let mut b = ReqBuilder::new("127.0.0.1:1", 0, EventGen::new(mix(), 1, 1));
        let mut out = Vec::new();
        for _ in 0..50 {
            assert_eq!(b.build(&mut out), 1);
        }
        check_requests(&out, 50, "/v1/click");
        // Batches of several sizes: the digit count changes between them.
        for batch in [1usize, 2, 30, 300, 3] {
            let mut b = ReqBuilder::new("h", batch, EventGen::new(mix(), 2, 2));
            let mut out = Vec::new();
            for _ in 0..5 {
                assert_eq!(b.build(&mut out), batch as u32);
            }
            check_requests(&out, 5, "/v1/clicks");
        }
    }
}
