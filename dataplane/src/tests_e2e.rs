//! End-to-end checks of `Dataplane` over real sockets (the black-box suite is in the
//! workspace's tests/).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::{AckMode, Dataplane, DataplaneConfig};

fn config(dir: &std::path::Path, cores: usize) -> DataplaneConfig {
    let cpus = {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (0..cores).map(|i| i % n).collect()
    };
    DataplaneConfig {
        ingest_addr: "127.0.0.1:0".parse().unwrap(),
        cores: cpus,
        data_dir: dir.to_path_buf(),
        ack: AckMode::Disk,
        log_buffer_bytes_max: 4 << 20,
        log_segment_bytes: 8 << 20,
        dedup_peak_events_per_sec: 10_000,
        dedup_window_secs: 60,
        drain_timeout_ms: 2_000,
        ..DataplaneConfig::default()
    }
}

fn now_ms() -> u64 {
    crate::shard::wall_ms()
}

pub(crate) fn event(i: u64) -> String {
    format!(
        r#"{{"event_id":"{:08x}-0000-4000-8000-{:012x}","ts":{},"campaign_id":12345,"ad_id":678,"publisher_id":42,"advertiser_id":7,"user_id":"u-{i}","ip":"203.0.113.7","user_agent":"Mozilla/5.0","country":"US","device":"mobile","cost_micros":500000}}"#,
        i >> 16,
        i,
        now_ms()
    )
}

fn post(path: &str, body: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

/// Reads `n` responses from `s`; returns (status, headers, body) each.
fn read_responses(s: &mut TcpStream, n: usize) -> Vec<(u16, String, String)> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 65536];
    while out.len() < n {
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some(end) = text.find("\r\n\r\n") else {
                break;
            };
            let head = &text[..end];
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() < end + 4 + len {
                break;
            }
            let status: u16 = head[9..12].parse().unwrap();
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
            out.push((status, head.to_string(), body));
            buf.drain(..end + 4 + len);
            if out.len() == n {
                return out;
            }
        }
        let k = match s.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r.expect("read"),
        };
        assert!(
            k > 0,
            "connection closed after {} responses: {:?}",
            out.len(),
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..k]);
    }
    out
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn two_cores_accept_dedup_and_answer_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let dp = Dataplane::start(config(dir.path(), 2)).unwrap();
    let addr = dp.local_addr();
    assert_ne!(addr.port(), 0);

    let mut s = connect(addr);
    s.write_all(post("/v1/click", &event(1)).as_bytes())
        .unwrap();
    let r = read_responses(&mut s, 1);
    assert_eq!(r[0].0, 202, "{r:?}");
    assert_eq!(r[0].2, r#"{"accepted":1,"duplicates":0,"rejected":[]}"#);
    assert!(r[0].1.contains("Content-Type: application/json"));

    // Pipelined: a retry of the same event, a batch whose ids spread over both cores'
    // shards (with a within-batch duplicate and a bad line), a 404 and a health check.
    let mut batch = String::new();
    for i in 100..200 {
        batch.push_str(&event(i));
        batch.push('\n');
    }
    batch.push_str(&event(150));
    batch.push_str("\n\n{\"event_id\":\"nope\"}\n");
    let mut wire = post("/v1/click", &event(1));
    wire.push_str(&post("/v1/clicks", &batch));
    wire.push_str("GET /nope HTTP/1.1\r\n\r\n");
    wire.push_str("GET /healthz HTTP/1.1\r\n\r\n");
    wire.push_str("GET /v1/click HTTP/1.1\r\n\r\n");
    s.write_all(wire.as_bytes()).unwrap();
    let r = read_responses(&mut s, 5);
    assert_eq!(
        (r[0].0, r[0].2.as_str()),
        (202, r#"{"accepted":0,"duplicates":1,"rejected":[]}"#)
    );
    assert_eq!(r[1].0, 202, "{r:?}");
    assert!(
        r[1].2.starts_with(
            r#"{"accepted":100,"duplicates":1,"rejected":[{"line":102,"error":"event_id: "#
        ),
        "{}",
        r[1].2
    );
    assert_eq!((r[2].0, r[2].2.as_str()), (404, r#"{"error":"not found"}"#));
    assert_eq!((r[3].0, r[3].2.as_str()), (200, r#"{"status":"ok"}"#));
    assert_eq!(r[4].0, 405);
    assert!(r[4].1.contains("Allow: POST"));

    // The same ids from a second connection (any core) are duplicates.
    let mut t = connect(addr);
    t.write_all(post("/v1/clicks", &batch).as_bytes()).unwrap();
    let r = read_responses(&mut t, 1);
    assert!(
        r[0].2.starts_with(r#"{"accepted":0,"duplicates":101,"#),
        "{}",
        r[0].2
    );

    // Single invalid event, and a batch with nothing valid.
    t.write_all(post("/v1/click", r#"{"event_id":"x"}"#).as_bytes())
        .unwrap();
    t.write_all(post("/v1/clicks", "{\n\n").as_bytes()).unwrap();
    t.write_all(b"GET /readyz HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n")
        .unwrap();
    let r = read_responses(&mut t, 4);
    assert_eq!(r[0].0, 400);
    assert!(r[0].2.contains(r#""field":"event_id""#), "{}", r[0].2);
    assert_eq!(r[1].0, 400);
    assert_eq!((r[2].0, r[2].2.as_str()), (200, r#"{"status":"ready"}"#));
    assert_eq!(r[3].0, 200);
    assert!(r[3].1.contains("text/plain; version=0.0.4"));
    assert!(
        r[3].2
            .contains("clickgate_ingest_events_accepted_total 101\n"),
        "{}",
        r[3].2
    );
    assert!(
        r[3].2
            .contains("clickgate_ingest_events_duplicate_total 103\n"),
        "{}",
        r[3].2
    );

    // Framing errors answer and close.
    let mut u = connect(addr);
    u.write_all(b"POST /v1/click HTTP/1.1\r\n\r\n").unwrap();
    let r = read_responses(&mut u, 1);
    assert_eq!(
        (r[0].0, r[0].2.as_str()),
        (411, r#"{"error":"length required"}"#)
    );
    let mut rest = Vec::new();
    assert_eq!(u.read_to_end(&mut rest).unwrap(), 0);

    dp.shutdown().unwrap();
    // Every log was flushed: both core directories exist and hold data.
    for k in 0..2 {
        let d = dir.path().join("log").join(format!("core-{k}"));
        assert!(d.is_dir(), "{d:?}");
    }
}

#[test]
fn rate_limit_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1);
    cfg.ack = AckMode::Memory;
    cfg.rate_limit_events_per_sec = 5;
    cfg.batch_events_max = 10;
    cfg.body_bytes_max = 64 << 10;
    let dp = Dataplane::start(cfg).unwrap();
    let mut s = connect(dp.local_addr());
    let mut batch = String::new();
    for i in 0..11 {
        batch.push_str(&event(1000 + i));
        batch.push('\n');
    }
    s.write_all(post("/v1/clicks", &batch).as_bytes()).unwrap();
    let r = read_responses(&mut s, 1);
    assert_eq!(
        (r[0].0, r[0].2.as_str()),
        (
            413,
            r#"{"error":"too many events: at most 10 per request"}"#
        )
    );
    let mut wire = String::new();
    for i in 0..8 {
        wire.push_str(&post("/v1/click", &event(2000 + i)));
    }
    s.write_all(wire.as_bytes()).unwrap();
    let r = read_responses(&mut s, 8);
    let limited: Vec<_> = r.iter().filter(|x| x.0 == 429).collect();
    assert!(!limited.is_empty(), "{r:?}");
    assert_eq!(limited[0].2, r#"{"error":"rate limited"}"#);
    assert!(limited[0].1.contains("Retry-After: "));

    // Body over body_bytes_max: 413 and close, without reading the body.
    s.write_all(b"POST /v1/clicks HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n")
        .unwrap();
    let r = read_responses(&mut s, 1);
    assert_eq!(r[0].0, 413);
    dp.shutdown().unwrap();
}

#[test]
fn idle_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1);
    cfg.idle_timeout_ms = 300;
    let dp = Dataplane::start(cfg).unwrap();
    let mut s = connect(dp.local_addr());
    s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_responses(&mut s, 1)[0].0, 200);
    let t0 = std::time::Instant::now();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    dp.shutdown().unwrap();
}

#[test]
fn kafka_ack_is_refused_and_port_in_use_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1);
    cfg.ack = AckMode::Kafka;
    let e = Dataplane::start(cfg).err().unwrap();
    assert!(e.to_string().contains("kafka"), "{e}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(dir.path(), 1);
    cfg.ingest_addr = taken.local_addr().unwrap();
    let e = Dataplane::start(cfg).err().unwrap();
    assert!(e.to_string().contains("cannot listen"), "{e}");
}

/// Serves on CG_BENCH_ADDR (default 127.0.0.1:8088) for CG_BENCH_SECS seconds with
/// CG_BENCH_CORES cores and CG_BENCH_ACK (memory|disk), for load tools such as wrk:
/// `cargo test --release -p clickgate-dataplane bench_serve -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_serve() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), env("CG_BENCH_CORES", "1").parse().unwrap());
    cfg.ingest_addr = env("CG_BENCH_ADDR", "127.0.0.1:8088").parse().unwrap();
    cfg.ack = env("CG_BENCH_ACK", "memory").parse().unwrap();
    cfg.trusted_cidrs = vec!["127.0.0.0/8".into()];
    cfg.log_buffer_bytes_max = 64 << 20;
    cfg.log_segment_bytes = 256 << 20;
    cfg.dedup_peak_events_per_sec = 1_000_000;
    let dp = Dataplane::start(cfg).unwrap();
    eprintln!("serving on {}", dp.local_addr());
    std::thread::sleep(Duration::from_secs(
        env("CG_BENCH_SECS", "30").parse().unwrap(),
    ));
    let m = dp.render_metrics();
    for l in m
        .lines()
        .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
    {
        eprintln!("{l}");
    }
    dp.shutdown().unwrap();
}
