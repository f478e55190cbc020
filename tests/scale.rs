//! Many boxes, one system, against real services: the S3 archive on an S3-protocol server
//! (moto, `CLICKGATE_TEST_S3` = its endpoint; `CLICKGATE_TEST_MOTO` = its binary for a
//! private server): exactly once through a crash, an outage and kill -9, and every bad
//! setting named. Archives are read back by pyarrow (`CLICKGATE_TEST_PYTHON`).
//! `scripts/test.sh` sets every variable. (The Kafka-fed archivers and the protobuf
//! `raw_clicks` values get their end-to-end tests here once they pass.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use clickgate_controlplane::archive::store::S3;
use clickgate_controlplane::archive::{hour_start, ArchiveReader};
use common::*;
use serde_json::json;

const HOUR_MS: u64 = 3_600_000;
const BIN: &str = env!("CARGO_BIN_EXE_clickgate");

fn var(name: &str, what: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{name} is not set: run the tests with scripts/test.sh ({what})"),
    }
}

fn s3_endpoint() -> String {
    var("CLICKGATE_TEST_S3", "it starts moto's S3 server")
}

fn python() -> String {
    var(
        "CLICKGATE_TEST_PYTHON",
        "it installs pyarrow, protobuf and grpcio-tools into a venv",
    )
}

/// The S3 client of the test process talks to the shared server with test credentials
/// (the variables the archive's S3 client reads; every test sets the same values).
fn test_env() {
    static ONCE: Once = Once::new();
    let ep = s3_endpoint();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ENDPOINT_URL", &ep);
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_REGION", "us-east-1");
    });
}

fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

fn unique(name: &str) -> String {
    format!(
        "cg-{name}-{}-{}",
        std::process::id(),
        now_ms() % 1_000_000_000
    )
}

/// `PUT /<bucket>` (moto accepts an unsigned request).
fn create_bucket(endpoint: &str, bucket: &str) {
    let addr = endpoint.strip_prefix("http://").expect("http endpoint");
    let mut s = TcpStream::connect(addr).expect("connect to the S3 server");
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "create bucket: {out}");
}

/// A TCP proxy the test can cut: "the S3 server is down" as the archiver sees it
/// (connections reset, new ones refused) without touching the shared server.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let upstream = upstream.to_string();
        let (u, st, cs) = (up.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((c, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                if !u.load(Ordering::Relaxed) {
                    drop(c);
                    continue;
                }
                c.set_nonblocking(false).unwrap();
                let Ok(s) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let mut g = cs.lock().unwrap();
                g.push(c.try_clone().unwrap());
                g.push(s.try_clone().unwrap());
                for (mut from, mut to) in [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            addr,
            up,
            conns,
            stop,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn down(&self) {
        self.up.store(false, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.down();
    }
}

/// Sends `n` events with ids `base..base+n`, ts spread over the last three hours.
fn send(cg: &Clickgate, base: u64, n: u64, sent: &mut BTreeMap<String, u64>) {
    let now = now_ms();
    let ids: Vec<u64> = (base..base + n).collect();
    for chunk in ids.chunks(100) {
        let mut lines = Vec::new();
        for &i in chunk {
            let id = uuid(i);
            let ts = now - (i % 3) * HOUR_MS - (i % 1000);
            lines.push(event(&id, 100 + i % 7, |v| v["ts"] = json!(ts)));
            sent.insert(id, ts);
        }
        let r = cg.request("POST", "/v1/clicks", &lines.join("\n"));
        assert_eq!(r.status, 202, "{}", r.body);
    }
}

const READER: &str = r#"
import json, os, sys
import pyarrow.parquet as pq
root = sys.argv[1]
out = {"rows": [], "files": 0}
for dp, dn, fn in os.walk(root):
    for f in sorted(fn):
        t = pq.ParquetFile(os.path.join(dp, f)).read()
        out["files"] += 1
        for r in t.select(["event_id", "source", "lsn"]).to_pylist():
            r["file"] = os.path.relpath(os.path.join(dp, f), root)
            out["rows"].append(r)
print(json.dumps(out))
"#;

/// Downloads every archive file of `s3` into `dst` (same layout), checking on the way
/// that only whole archive files and range intents are visible, then reads them with
/// pyarrow.
fn read_s3_archive(s3: &S3, dst: &Path) -> serde_json::Value {
    let _ = std::fs::remove_dir_all(dst);
    std::fs::create_dir_all(dst).unwrap();
    for (key, _) in s3.list_all().unwrap() {
        if key.starts_with("_intents/") {
            continue;
        }
        let name = key.rsplit('/').next().unwrap();
        assert!(
            clickgate_controlplane::archive::parse_file_name(name).is_some(),
            "a visible object that is not an archive file: {key}"
        );
        let bytes = s3.get(&key).unwrap().expect("listed object");
        let p = dst.join(&key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let out = Command::new(python())
        .arg("-c")
        .arg(READER)
        .arg(dst)
        .stderr(Stdio::inherit())
        .output()
        .expect("run the pyarrow reader");
    assert!(out.status.success(), "pyarrow reader failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every sent event exactly once, and every (source, position) once.
fn check_exactly_once(a: &serde_json::Value, sent: &BTreeMap<String, u64>) {
    let mut ids = BTreeMap::new();
    let mut positions = BTreeSet::new();
    for r in a["rows"].as_array().unwrap() {
        let id = r["event_id"].as_str().unwrap().to_string();
        let file = r["file"].as_str().unwrap().to_string();
        if let Some(f) = ids.insert(id.clone(), file.clone()) {
            panic!("{id} archived twice: {f} and {file}");
        }
        assert!(
            positions.insert((r["source"].to_string(), r["lsn"].as_u64().unwrap())),
            "{r} archived twice"
        );
    }
    let want: BTreeSet<&String> = sent.keys().collect();
    let got: BTreeSet<&String> = ids.keys().collect();
    let missing: Vec<_> = want.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&want).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, unknown {extra:?} ({} sent, {} archived)",
        want.len(),
        got.len()
    );
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_s3(dir: &Path, url: &str, endpoint: &str, failpoint: Option<&str>) -> Clickgate {
    let env = s3_env(endpoint);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if let Some(f) = failpoint {
        env.push(("CLICKGATE_ARCHIVE_FAILPOINT", f));
    }
    Clickgate::spawn_env(
        "run",
        dir,
        &[
            "--trusted-cidrs",
            "127.0.0.0/8",
            "--archive-url",
            url,
            "--archive-roll-secs",
            "1",
            "--archive-poll-ms",
            "50",
            "--archive-roll-bytes",
            "16384",
        ],
        &env,
    )
}

#[test]
fn s3_archive_is_exactly_once_through_a_crash_an_outage_and_kill9() {
    test_env();
    let endpoint = s3_endpoint();
    let bucket = unique("s3x1");
    create_bucket(&endpoint, &bucket);
    let url = format!("s3://{bucket}/clicks");
    let s3 = S3::connect(&bucket, "clicks").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("box");
    let proxy = Proxy::start(endpoint.strip_prefix("http://").unwrap());
    let mut sent = BTreeMap::new();

    // 1. A crash right after the 2nd file of a range is uploaded, before the commit.
    let mut cg = spawn_s3(&dir, &url, &proxy.endpoint(), Some("after_file:2"));
    send(&cg, 1, 300, &mut sent);
    assert!(!cg.wait().success(), "the failpoint aborts the process");
    let before: Vec<String> = s3.list_all().unwrap().into_iter().map(|o| o.0).collect();
    assert_eq!(
        before.iter().filter(|k| k.ends_with(".parquet")).count(),
        2,
        "{before:?}"
    );

    // 2. Restarted: the range is redone under the same names. Then the server goes
    //    down mid-traffic (uploads fail and are retried), and the box is killed -9
    //    during the outage.
    let mut cg = spawn_s3(&dir, &url, &proxy.endpoint(), None);
    send(&cg, 1000, 300, &mut sent);
    wait_for("the redone range and new ones uploaded", 60, || {
        let keys: Vec<String> = s3.list_all().unwrap().into_iter().map(|o| o.0).collect();
        before.iter().all(|k| keys.contains(k)) && keys.len() > before.len() + 3
    });
    proxy.down();
    send(&cg, 2000, 300, &mut sent);
    std::thread::sleep(Duration::from_secs(3));
    // No partial object is visible during the outage (read_s3_archive checks names;
    // pyarrow reads every object whole).
    read_s3_archive(&s3, &tmp.path().join("mid"));
    cg.kill9();

    // 3. The server is back; the box restarts, catches up, more events, clean stop.
    proxy.restore();
    let mut cg = spawn_s3(&dir, &url, &proxy.endpoint(), None);
    send(&cg, 3000, 300, &mut sent);
    assert!(cg.sigterm_and_wait().success());
    let a = read_s3_archive(&s3, &tmp.path().join("final"));
    check_exactly_once(&a, &sent);

    // Billing's entry point reads the same files by hour.
    let reader = ArchiveReader::open(Some(&url), &dir).unwrap();
    let now = now_ms();
    let mut rows = 0;
    for h in 0..4 {
        for f in reader.hour_files(hour_start(now) - h * HOUR_MS).unwrap() {
            rows += reader.file_rows(&f).unwrap();
        }
    }
    assert_eq!(rows as usize, sent.len());
}

fn start_fails(env: &[(&str, String)], remove: &[&str], url: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Command::new(BIN);
    c.args(["run", "--data-dir"])
        .arg(tmp.path())
        .args([
            "--ingest-addr",
            "127.0.0.1:0",
            "--query-addr",
            "127.0.0.1:0",
            "--control-addr",
            "127.0.0.1:0",
            "--cores",
            "1",
            "--archive-url",
            url,
        ])
        .env_remove("CLICKGATE_CONFIG")
        .stdin(Stdio::null());
    for k in [
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        if !remove.contains(k) {
            c.env(k, v);
        }
    }
    let out = c.output().expect("run clickgate");
    assert!(!out.status.success(), "start must fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn s3_settings_errors_name_the_setting() {
    let endpoint = s3_endpoint();
    let bucket = unique("s3err");
    create_bucket(&endpoint, &bucket);
    let url = format!("s3://{bucket}/p");
    let env = s3_env(&endpoint);

    let e = start_fails(&env, &["AWS_ACCESS_KEY_ID"], &url);
    assert!(e.contains("AWS_ACCESS_KEY_ID"), "{e}");

    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut down = env.clone();
    down[0].1 = format!("http://{closed}");
    let e = start_fails(&down, &[], &url);
    assert!(e.contains("AWS_ENDPOINT_URL"), "{e}");

    // A server that checks credentials refuses ours: a private moto with
    // authentication on from the first request.
    let moto = var("CLICKGATE_TEST_MOTO", "it installs moto's server");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _m = Moto(
        Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto"),
    );
    wait_for("the private moto server listening", 60, || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let mut auth = env.clone();
    auth[0].1 = format!("http://127.0.0.1:{port}");
    let e = start_fails(&auth, &[], &url);
    assert!(
        e.contains("refused the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"),
        "{e}"
    );

    let e = start_fails(&env, &[], "s3://Not_A_Bucket/p");
    assert!(e.contains("archive_url"), "{e}");
}
