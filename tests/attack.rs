//! Hostile clients of the ingest port, against the real binary (one core, so every
//! per-core bound is the box's): heads that announce large bodies, a core's budget for
//! bodies in flight, heads and bodies trickled a byte at a time, connection floods from
//! one address and pipelined request floods. After each, the process is up and an honest
//! client still gets its 202.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{closed_by_server, event, metric_sum, uuid, Clickgate, Conn};

fn rss_bytes(cg: &Clickgate) -> u64 {
    let pid = cg.child.as_ref().expect("running").id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// An honest client, on a new connection, gets 202 for a new click.
fn honest_click_accepted(cg: &Clickgate, n: u64) {
    let mut c = Conn::new(cg.ingest);
    let r = c.request("POST", "/v1/click", &event(&uuid(n), 7, |_| {}));
    assert_eq!(r.status, 202, "honest client refused: {}", r.body);
}

fn body_head(len: usize) -> Vec<u8> {
    format!(
        "POST /v1/clicks HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-ndjson\r\nContent-Length: {len}\r\n\r\n"
    )
    .into_bytes()
}

/// 200 connections each announce an 8 MB body and send 1 KB of it: the process grows by
/// what arrived (plus each connection's first read buffer), not by what was announced.
#[test]
fn announced_bodies_cost_memory_only_as_they_arrive() {
    let cg = Clickgate::dataplane(&["--cores", "1", "--connections-per-address-max", "1000"]);
    honest_click_accepted(&cg, 1);
    let before = rss_bytes(&cg);
    let mut held = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(cg.ingest).unwrap();
        s.write_all(&body_head(8_000_000)).unwrap();
        s.write_all(&[b'x'; 1024]).unwrap();
        held.push(s);
    }
    // Let the core read every head and its first KB.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = cg.metrics();
        if metric_sum(&text, "clickgate_ingest_connections_open") >= 200.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the 200 connections never opened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let grown = rss_bytes(&cg).saturating_sub(before);
    // 200 × (16 KiB read buffer + output and scratch) is ~4 MiB; announced: 1.6 GB.
    assert!(
        grown < 64 << 20,
        "200 announced 8 MB bodies grew the process by {} MiB",
        grown >> 20
    );
    honest_click_accepted(&cg, 2);
}

/// With a 1 MiB budget for bodies in flight, a second large body being received while a
/// first holds most of the budget is answered 503 and closed; the gauge never passes the
/// budget; small requests (within their first read buffer) are never refused; once the
/// first body is done, the budget is free again.
#[test]
fn the_core_budget_for_bodies_in_flight_answers_503() {
    let budget = 1usize << 20;
    let cg = Clickgate::dataplane(&[
        "--cores",
        "1",
        "--inflight-body-bytes-max",
        &budget.to_string(),
        "--rate-limit-events-per-sec",
        "100000",
    ]);
    let len = 900_000;
    let mut a = TcpStream::connect(cg.ingest).unwrap();
    a.write_all(&body_head(len)).unwrap();
    a.write_all(&vec![b'x'; 700_000]).unwrap();
    // Wait until the core holds A's 700 KB.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let inflight = metric_sum(&cg.metrics(), "clickgate_ingest_inflight_body_bytes");
        if inflight >= 600_000.0 {
            break;
        }
        assert!(Instant::now() < deadline, "A's body never buffered");
        std::thread::sleep(Duration::from_millis(20));
    }
    // B: the same, in 16 KB pieces, until the server refuses it.
    let mut b = TcpStream::connect(cg.ingest).unwrap();
    b.write_all(&body_head(len)).unwrap();
    let mut sent = 0;
    let mut refused = false;
    while sent < 700_000 {
        if b.write_all(&[b'y'; 16 << 10]).is_err() {
            refused = true;
            break;
        }
        sent += 16 << 10;
        if closed_by_server(&mut b) {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "B's body was buffered past the budget ({sent} bytes)"
    );
    let text = cg.metrics();
    let why = text
        .lines()
        .find(|l| l.starts_with("clickgate_ingest_unavailable_total{reason=\"body_budget\"}"))
        .expect("body_budget reason");
    assert!(why.ends_with(" 1"), "{why}");
    assert!(metric_sum(&text, "clickgate_ingest_inflight_body_bytes") <= budget as f64);
    // Small requests are not held back by the full budget.
    honest_click_accepted(&cg, 1);
    // A finishes: answered (its body is not valid NDJSON: 400), and the budget is back.
    a.write_all(&vec![b'x'; len - 700_000]).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 12];
    a.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 400");
    let mut c = Conn::new(cg.ingest);
    let lines: String = (0..2000)
        .map(|i| event(&uuid(100 + i), 7, |_| {}) + "\n")
        .collect();
    assert!(lines.len() > 16 << 10);
    let r = c.request("POST", "/v1/clicks", &lines);
    assert_eq!(r.status, 202, "{}", r.body);
}

/// A request head trickled one byte every 50 ms (20 s in all) is cut at the header
/// deadline; a body trickled the same way at the body deadline.
#[test]
fn trickled_heads_and_bodies_are_cut_at_their_deadlines() {
    let cg = Clickgate::dataplane(&[
        "--cores",
        "1",
        "--header-timeout-ms",
        "1000",
        "--body-timeout-ms",
        "1000",
    ]);
    let trickle = |prefix: &[u8], slow: &[u8]| -> (bool, usize) {
        let mut s = TcpStream::connect(cg.ingest).unwrap();
        s.write_all(prefix).unwrap();
        for (i, b) in slow.iter().enumerate() {
            if s.write_all(&[*b]).is_err() || closed_by_server(&mut s) {
                return (true, i);
            }
        }
        (false, slow.len())
    };
    let head = format!(
        "POST /v1/click HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\nContent-Length: 2\r\n\r\n",
        "a".repeat(360)
    );
    let (cut, sent) = trickle(b"", head.as_bytes());
    assert!(cut, "the whole trickled head was read ({sent} bytes)");
    let body = "x".repeat(400);
    let head = format!(
        "POST /v1/click HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (cut, sent) = trickle(head.as_bytes(), body.as_bytes());
    assert!(cut, "the whole trickled body was read ({sent} bytes)");
    let text = cg.metrics();
    let timeouts = |phase: &str| {
        let prefix = format!("clickgate_ingest_request_timeouts_total{{phase=\"{phase}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(timeouts("header"), 1.0, "{text}");
    assert_eq!(timeouts("body"), 1.0, "{text}");
    honest_click_accepted(&cg, 1);
}

/// One address holds at most `connections_per_address_max` connections per core: the next
/// is answered 503 naming the reason and closed; a trusted network is exempt.
#[test]
fn one_address_gets_at_most_its_ingest_connections() {
    let cg = Clickgate::dataplane(&["--cores", "1", "--connections-per-address-max", "4"]);
    let mut held: Vec<Conn> = (0..4).map(|_| Conn::new(cg.ingest)).collect();
    for c in &mut held {
        assert_eq!(c.request("GET", "/healthz", "").status, 200);
    }
    let mut fifth = Conn::new(cg.ingest);
    let r = fifth.try_read_response().expect("a 503 before the close");
    assert_eq!(r.status, 503);
    assert!(
        r.body.contains("too many connections from this address"),
        "{}",
        r.body
    );
    assert!(fifth.is_closed());
    // One given back: a new one is served again (the server sees the close first).
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Conn::new(cg.ingest);
        c.send_raw(&Conn::request_bytes("GET", "/healthz", ""));
        if c.try_read_response().is_some_and(|r| r.status == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "never served again");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(cg);

    let cg = Clickgate::dataplane(&[
        "--cores",
        "1",
        "--connections-per-address-max",
        "4",
        "--trusted-cidrs",
        "127.0.0.0/8",
    ]);
    let mut held: Vec<Conn> = (0..8).map(|_| Conn::new(cg.ingest)).collect();
    for c in &mut held {
        assert_eq!(c.request("GET", "/healthz", "").status, 200);
    }
}

/// 50,000 pipelined requests written without reading a response: every one is answered,
/// in order, and the process's output buffers stay bounded (the core stops framing
/// requests while its responses wait to be written).
#[test]
fn a_pipelined_flood_is_answered_with_bounded_memory() {
    let cg = Clickgate::dataplane(&["--cores", "1"]);
    honest_click_accepted(&cg, 1);
    let before = rss_bytes(&cg);
    let n = 50_000usize;
    let s = TcpStream::connect(cg.ingest).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let one = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
        let mut chunk = Vec::with_capacity(one.len() * 1000);
        for _ in 0..1000 {
            chunk.extend_from_slice(one);
        }
        for _ in 0..n / 1000 {
            w.write_all(&chunk).unwrap();
        }
    });
    let mut r = s;
    r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut seen = 0usize;
    let mut tail = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let needle = b"HTTP/1.1 200";
    while seen < n {
        let k = r.read(&mut buf).expect("responses");
        assert!(k > 0, "closed after {seen} responses");
        tail.extend_from_slice(&buf[..k]);
        let mut last = 0;
        let mut i = 0;
        while i + needle.len() <= tail.len() {
            if &tail[i..i + needle.len()] == needle {
                seen += 1;
                i += needle.len();
                last = i;
            } else {
                i += 1;
            }
        }
        tail.drain(..last.max(tail.len().saturating_sub(needle.len())));
    }
    writer.join().unwrap();
    assert_eq!(seen, n);
    let grown = rss_bytes(&cg).saturating_sub(before);
    assert!(grown < 32 << 20, "grew by {} MiB", grown >> 20);
    honest_click_accepted(&cg, 2);
}

/// The header deadline is per request: a client that keeps a pipeline going for three
/// times the deadline, every write completing one request and starting the next, is
/// never cut, and every request is answered.
#[test]
fn a_steady_pipelined_client_outlives_the_header_deadline() {
    let cg = Clickgate::dataplane(&["--cores", "1", "--header-timeout-ms", "1000"]);
    let mut s = TcpStream::connect(cg.ingest).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /hea").unwrap();
    let started = Instant::now();
    let mut sent = 0usize;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(b"lthz HTTP/1.1\r\nHost: t\r\n\r\nGET /hea")
            .expect("the server cut a client that keeps completing requests");
        sent += 1;
        let n = s.read(&mut buf).expect("a response");
        assert!(n > 0, "closed after {sent} requests");
        text.extend_from_slice(&buf[..n]);
    }
    s.write_all(b"lthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    sent += 1;
    let _ = s.read_to_end(&mut text);
    let answered = String::from_utf8_lossy(&text)
        .matches("HTTP/1.1 200")
        .count();
    assert_eq!(answered, sent);
}
