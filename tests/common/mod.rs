//! Black-box harness: starts the real `clickgate` binary on loopback with its own data
//! directory and ports, and speaks raw HTTP/1.1 to it (so tests control pipelining and
//! malformed requests byte by byte).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const BIN: &str = env!("CARGO_BIN_EXE_clickgate");

/// How long a process may take to come up or go down before the test fails loudly.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The UTC date `(year, month, day)` of `ms` since the epoch: the tests' own calendar
/// math (Howard Hinnant's civil_from_days), written out independently of
/// `clickgate_core::civil`, so a bug there cannot hide behind the same code here.
pub fn civil_date(ms: u64) -> (i64, i64, i64) {
    let z = (ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A process-unique, valid UUID text for test events.
pub fn uuid(n: u64) -> String {
    let salt = (std::process::id() as u64) << 32 | (now_ms() & 0xffff_ffff);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (salt >> 32) as u32,
        (salt >> 16) as u16,
        (salt as u16) & 0xfff,
        (n >> 48) as u16 & 0xfff,
        n & 0xffff_ffff_ffff
    )
}

/// A valid event as JSON; `tweak` edits fields before serialising.
pub fn event(id: &str, campaign: u64, tweak: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v = serde_json::json!({
        "event_id": id,
        "ts": now_ms(),
        "campaign_id": campaign,
        "ad_id": 678,
        "publisher_id": 42,
        "advertiser_id": 7,
        "user_id": "u-88121",
        "ip": "203.0.113.7",
        "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
        "country": "US",
        "device": "mobile",
        "cost_micros": 500000
    });
    tweak(&mut v);
    v.to_string()
}

pub struct Clickgate {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub ingest: SocketAddr,
    /// The query API's address (`run` and `controlplane` only).
    pub query: Option<SocketAddr>,
    /// The control API's (gRPC) address (`run` and `controlplane` only).
    pub control: Option<SocketAddr>,
    pub extra: Vec<String>,
    pub subcommand: String,
}

impl Clickgate {
    /// `clickgate dataplane` on 127.0.0.1:0 with a fresh data dir and 2 cores.
    pub fn dataplane(extra: &[&str]) -> Clickgate {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut cg = Clickgate::spawn("dataplane", &dir, extra);
        cg._tmp = Some(tmp);
        cg
    }

    /// `clickgate run` (both planes) with a fresh data dir.
    pub fn run(extra: &[&str]) -> Clickgate {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut cg = Clickgate::spawn("run", &dir, extra);
        cg._tmp = Some(tmp);
        cg
    }

    pub fn spawn(subcommand: &str, data_dir: &Path, extra: &[&str]) -> Clickgate {
        Clickgate::spawn_env(subcommand, data_dir, extra, &[])
    }

    /// [`Clickgate::spawn`] with extra environment variables (test hooks).
    pub fn spawn_env(
        subcommand: &str,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Clickgate {
        let run_dir = data_dir.join("run");
        let ingest_file = run_dir.join("ingest.addr");
        let query_file = run_dir.join("query.addr");
        let control_file = run_dir.join("control.addr");
        let serves_ingest = subcommand != "controlplane";
        let serves_query = subcommand != "dataplane";
        if serves_ingest {
            let _ = std::fs::remove_file(&ingest_file);
        }
        if serves_query {
            let _ = std::fs::remove_file(&query_file);
            let _ = std::fs::remove_file(&control_file);
        }
        let mut args: Vec<String> = vec![
            subcommand.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--ingest-addr".into(),
            "127.0.0.1:0".into(),
            "--query-addr".into(),
            "127.0.0.1:0".into(),
            "--control-addr".into(),
            "127.0.0.1:0".into(),
            "--cores".into(),
            "2".into(),
            // Small bloom shards: tests run many instances at once.
            "--dedup-peak-events-per-sec".into(),
            "2000".into(),
        ];
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // A flag given in `extra` replaces the default above (clap refuses a flag twice).
        for flag in ["--ingest-addr", "--query-addr", "--control-addr", "--cores"] {
            if extra.iter().any(|e| e == flag) {
                let at = args.iter().position(|a| a == flag).expect("default flag");
                args.drain(at..at + 2);
            }
        }
        args.extend(extra.iter().cloned());
        let child = Command::new(BIN)
            .args(&args)
            .env_remove("CLICKGATE_CONFIG")
            .env(
                "CLICKGATE_LOG",
                std::env::var("CLICKGATE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn clickgate");
        let mut cg = Clickgate {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            _tmp: None,
            ingest: "0.0.0.0:0".parse().unwrap(),
            query: None,
            control: None,
            extra,
            subcommand: subcommand.into(),
        };
        if serves_query {
            cg.query = Some(cg.wait_for_addr(&query_file));
            cg.control = Some(cg.wait_for_addr(&control_file));
        }
        if serves_ingest {
            cg.ingest = cg.wait_for_addr(&ingest_file);
        }
        cg
    }

    fn wait_for_addr(&mut self, file: &Path) -> SocketAddr {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(file) {
                if let Ok(addr) = text.trim().parse() {
                    return addr;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("clickgate exited during start-up: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "clickgate did not start within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn connect(&self) -> Conn {
        Conn::new(self.ingest)
    }

    /// One request on a fresh connection.
    pub fn request(&self, method: &str, path: &str, body: &str) -> Response {
        self.connect().request(method, path, body)
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        // SAFETY: plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    /// Waits for the process to exit, failing the test if it takes too long.
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("clickgate did not exit within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sigterm_and_wait(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait();
    }

    /// Starts the same command again on the same data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        let extra: Vec<&str> = self.extra.iter().map(|s| s.as_str()).collect();
        let mut again = Clickgate::spawn(&self.subcommand, &self.data_dir, &extra);
        self.child = again.child.take();
        self.ingest = again.ingest;
        self.query = again.query;
        self.control = again.control;
    }

    /// `GET` on the query API.
    pub fn query(&self, path_and_query: &str) -> Response {
        Conn::new(self.query.expect("this process serves no query API")).request(
            "GET",
            path_and_query,
            "",
        )
    }

    /// `GET` on the query API with `Authorization: Bearer <key>` (none: no header).
    pub fn query_as(&self, path_and_query: &str, key: Option<&str>) -> Response {
        get_as(
            self.query.expect("this process serves no query API"),
            path_and_query,
            key,
        )
    }

    pub fn metrics(&self) -> String {
        let r = self.request("GET", "/metrics", "");
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    }
}

impl Drop for Clickgate {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The Python with xgboost and numpy the model tests train and predict with
/// (`CLICKGATE_TEST_XGBOOST`); fails loudly when it is not set or cannot import them.
pub fn xgboost_python() -> String {
    let py = std::env::var("CLICKGATE_TEST_XGBOOST").unwrap_or_else(|_| {
        panic!(
            "CLICKGATE_TEST_XGBOOST is not set: the model test needs a Python with xgboost and \
             numpy (scripts/services.sh installs one)"
        )
    });
    let ok = Command::new(&py)
        .args(["-c", "import xgboost, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "CLICKGATE_TEST_XGBOOST={py} cannot import xgboost and numpy"
    );
    py
}

/// What a finished `clickgate` command printed and returned.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// `clickgate billing --data-dir <data_dir> <args>`, run to completion.
pub fn billing(data_dir: &Path, args: &[&str]) -> Out {
    let out = Command::new(BIN)
        .arg("billing")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("CLICKGATE_CONFIG")
        .env_remove("CLICKGATE_ARCHIVE_URL")
        .env("CLICKGATE_LOG", "warn")
        .output()
        .expect("run clickgate billing");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The UTC day of `ms` as `YYYY-MM-DD`.
pub fn date_of(ms: u64) -> String {
    let (y, m, d) = civil_date(ms);
    format!("{y:04}-{m:02}-{d:02}")
}

/// True once the server has closed `s` (a read returns EOF or an error), waiting at most
/// 50 ms; bytes the server sent meanwhile are read and dropped.
pub fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut b = [0u8; 4096];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A self-signed certificate for `localhost` and its private key, written to
/// `dir/cert.pem` and `dir/key.pem` (PEM); returns their paths.
pub fn localhost_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// One request on a fresh connection to `addr`; `None` when the connection fails or
/// closes before a whole response (a killed server, say).
pub fn try_request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<Response> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut c = Conn {
        stream,
        buf: Vec::new(),
    };
    c.stream
        .write_all(&Conn::request_bytes(method, path, body))
        .ok()?;
    c.try_read_response()
}

/// `GET path` on `addr` with `Authorization: Bearer <key>` (none: no header).
pub fn get_as(addr: SocketAddr, path_and_query: &str, key: Option<&str>) -> Response {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let mut c = Conn::new(addr);
    c.send_raw(format!("GET {path_and_query} HTTP/1.1\r\nHost: t\r\n{auth}\r\n").as_bytes());
    c.read_response()
}

/// Sum of every sample of a metric family (all label sets) in Prometheus text.
/// The campaign ids of a `/v1/campaigns` answer (200 asserted), in its order.
pub fn campaign_ids(r: &Response) -> Vec<u64> {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["campaign_id"].as_u64().unwrap())
        .collect()
}

/// The clicks summed over a `/metrics` answer's buckets (200 asserted).
pub fn clicks_of(r: &Response) -> u64 {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["clicks"].as_u64().unwrap())
        .sum()
}

pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// `write_all` that reports failure instead of panicking (for tests that kill the server).
pub trait WriteChecked {
    fn write_all_checked(&mut self, bytes: &[u8]) -> std::io::Result<()>;
}

impl WriteChecked for TcpStream {
    fn write_all_checked(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_all(bytes)
    }
}

pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn request_bytes(method: &str, path: &str, body: &str) -> Vec<u8> {
        let ctype = if path == "/v1/clicks" {
            "application/x-ndjson"
        } else {
            "application/json"
        };
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        if method == "POST" {
            req.push_str(&format!(
                "Content-Type: {ctype}\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        req.into_bytes()
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    pub fn request(&mut self, method: &str, path: &str, body: &str) -> Response {
        self.send_raw(&Conn::request_bytes(method, path, body));
        self.read_response()
    }

    /// Reads exactly one response (status line, headers, Content-Length body).
    pub fn read_response(&mut self) -> Response {
        loop {
            if let Some((resp, used)) = parse_response(&self.buf) {
                self.buf.drain(..used);
                return resp;
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read response");
            assert!(
                n > 0,
                "connection closed before a full response; got {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// One response, or None if the connection failed or closed first.
    pub fn try_read_response(&mut self) -> Option<Response> {
        loop {
            if let Some((resp, used)) = parse_response(&self.buf) {
                self.buf.drain(..used);
                return Some(resp);
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// True when the server closed the connection (EOF) within the read timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }
}

fn parse_response(buf: &[u8]) -> Option<(Response, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).expect("ascii head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().expect("content-length"))
        .expect("every response has Content-Length");
    if buf.len() < end + len {
        return None;
    }
    let body = String::from_utf8(buf[end..end + len].to_vec()).expect("utf8 body");
    Some((
        Response {
            status,
            headers,
            body,
        },
        end + len,
    ))
}

/// Builds `clickgate-bench` (another package of the workspace) with the cargo running this
/// test and returns the binary's path, taken from cargo's own build messages, so it is
/// right whatever the target dir (`CARGO_TARGET_DIR`, `--target-dir`) or profile layout.
pub fn bench_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "build",
            "-p",
            "clickgate-bench",
            "--bin",
            "clickgate-bench",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo} build -p clickgate-bench: {e}"));
    assert!(
        out.status.success(),
        "`{cargo} build -p clickgate-bench` failed ({}); see its output above",
        out.status
    );
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "clickgate-bench")
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo built clickgate-bench but reported no executable for it");
    assert!(exe.is_file(), "{} does not exist", exe.display());
    exe
}
