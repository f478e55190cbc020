//! Hostile clients of the controlplane's two APIs, against the real binary: a request head
//! trickled a byte at a time is cut off at the header deadline (each byte does not buy
//! more time), one address cannot hold more than its share of query connections, the
//! control token is refused when short or when it would cross the network in clear, and
//! wrong control tokens are throttled per address.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{closed_by_server, localhost_cert, metric_sum, Clickgate, BIN};

#[test]
fn a_trickled_request_head_is_cut_off_at_the_header_deadline() {
    let cg = Clickgate::run(&["--query-header-timeout-ms", "1000"]);
    let mut s = TcpStream::connect(cg.query.unwrap()).unwrap();
    // 400 bytes of head, one every 50 ms: 20 s if every byte refreshed the deadline.
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(360)
    );
    let started = Instant::now();
    let mut sent = 0;
    let mut cut = false;
    for b in head.bytes() {
        if s.write_all(&[b]).is_err() {
            cut = true;
            break;
        }
        sent += 1;
        if closed_by_server(&mut s) {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "the whole trickled head ({sent} bytes over {:?}) was accepted",
        started.elapsed()
    );
    assert!(
        sent < head.len(),
        "cut only after the head was complete ({sent} bytes)"
    );
    // An honest client is still served.
    let r = cg.query("/healthz");
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn one_address_gets_at_most_its_connections() {
    let cg = Clickgate::run(&[
        "--query-connections-per-address-max",
        "4",
        "--query-header-timeout-ms",
        "60000",
    ]);
    let addr = cg.query.unwrap();
    let mut held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Each held connection is served (and stays open: keep-alive).
    for s in &mut held {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 512];
        let n = s.read(&mut b).unwrap();
        assert!(
            String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&b[..n])
        );
    }
    // A fifth from the same address is closed at once, without an answer.
    let mut extra = TcpStream::connect(addr).unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 512];
    let n = extra.read(&mut b).unwrap_or(0);
    assert_eq!(
        n,
        0,
        "a fifth connection was served: {}",
        String::from_utf8_lossy(&b[..n])
    );
    // Once one is given back, a new one is served again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    // (The server frees the slot when it sees the close, so the first tries may still be
    // refused: retry on a raw connection until one is served.)
    let body = loop {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        if text.starts_with("HTTP/1.1 200") {
            break text;
        }
        assert!(Instant::now() < deadline, "never served again");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(metric_sum(&body, "clickgate_query_connections_refused_total") >= 1.0);
}

fn start_refused(extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["controlplane", "--data-dir"])
        .arg(tmp.path())
        .args(["--query-addr", "127.0.0.1:0"])
        .args(extra)
        .env_remove("CLICKGATE_CONTROL_TOKEN")
        .env_remove("CLICKGATE_CONTROL_INSECURE")
        .env_remove("CLICKGATE_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}

#[test]
fn control_tokens_are_refused_when_short_or_in_clear_on_the_network() {
    let e = start_refused(&[
        "--control-addr",
        "127.0.0.1:0",
        "--control-token",
        "short-token",
    ]);
    assert!(e.contains("control_token has 11 bytes"), "{e}");
    let e = start_refused(&[
        "--control-addr",
        "0.0.0.0:0",
        "--control-token",
        "a-long-enough-control-token",
    ]);
    assert!(e.contains("in clear text on 0.0.0.0:0"), "{e}");
    assert!(e.contains("--control-insecure"), "{e}");
    // Explicitly allowed, it starts.
    let cg = Clickgate::run(&[
        "--control-addr",
        "0.0.0.0:0",
        "--control-token",
        "a-long-enough-control-token",
        "--control-insecure",
    ]);
    assert_eq!(cg.query("/healthz").status, 200);
}

#[test]
fn wrong_control_tokens_are_throttled_per_address() {
    const TOKEN: &str = "the-right-control-token";
    let cg = Clickgate::run(&[
        "--control-token",
        TOKEN,
        "--control-auth-failures-per-minute-max",
        "3",
    ]);
    let url = format!("http://{}", cg.control.unwrap());
    let list = |token: &str| {
        let out = Command::new(BIN)
            .args(["rules", "--url", &url, "--token", token, "list"])
            .env_remove("CLICKGATE_CONTROL_TOKEN")
            .env_remove("CLICKGATE_CONTROL_URL")
            .env_remove("CLICKGATE_CONFIG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(list(TOKEN).0, "the right token works");
    // The count is per minute: if a minute turns between two failures it restarts, so at
    // most 2 × 3 failures pass before the refusal.
    let mut wrong = 0;
    loop {
        let (ok, err) = list("a-wrong-control-token");
        assert!(!ok);
        if err.contains("too many failed token attempts") {
            break;
        }
        assert!(err.contains("invalid token"), "{err}");
        wrong += 1;
        assert!(wrong <= 6, "never throttled after {wrong} wrong tokens");
    }
    assert!(wrong >= 3, "throttled after {wrong} wrong tokens");
    // From this address even the right token waits out the minute.
    let (ok, err) = list(TOKEN);
    assert!(
        !ok && err.contains("too many failed token attempts"),
        "{err}"
    );
}

/// The soft open-files limit is raised to the hard one at start: a process started with
/// a soft limit of 64 runs with the hard limit.
#[test]
fn the_open_files_limit_is_raised_at_start() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["controlplane", "--data-dir"])
        .arg(tmp.path())
        .args([
            "--query-addr",
            "127.0.0.1:0",
            "--control-addr",
            "127.0.0.1:0",
        ])
        .env_remove("CLICKGATE_CONTROL_TOKEN")
        .env_remove("CLICKGATE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls (getrlimit/setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            l.rlim_cur = 64.min(l.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let limits = format!("/proc/{}/limits", child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let soft_hard = loop {
        let text = std::fs::read_to_string(&limits).unwrap_or_default();
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .map(|l| {
                l.split_whitespace()
                    .skip(3)
                    .take(2)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            });
        if let Some(v) = line {
            if v.len() == 2 && v[0] != "64" {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "soft limit never raised: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(soft_hard[0], soft_hard[1], "soft = hard");
}

fn rules_list(url: &str, ca: Option<&std::path::Path>, token: &str) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["rules", "--url", url, "--token", token]);
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    cmd.arg("list")
        .env_remove("CLICKGATE_CONTROL_TOKEN")
        .env_remove("CLICKGATE_CONTROL_URL")
        .env_remove("CLICKGATE_CONTROL_CA")
        .output()
        .unwrap()
}

/// With a certificate, the control API speaks TLS only, and a token may be used on a
/// non-loopback address without `--control-insecure`; `clickgate rules` reaches it over
/// https with the CA it trusts, and a plaintext client gets nowhere.
#[test]
fn the_control_api_speaks_tls_with_a_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = localhost_cert(tmp.path());
    let token = "a-long-enough-control-token";
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let cg = Clickgate::run(&[
        "--control-addr",
        "0.0.0.0:0",
        "--control-token",
        token,
        "--control-tls-cert",
        &cert_s,
        "--control-tls-key",
        &key_s,
    ]);
    let port = cg.control.unwrap().port();
    let ok = rules_list(&format!("https://localhost:{port}"), Some(&cert), token);
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("rules"),
        "{ok:?}"
    );
    let plain = rules_list(&format!("http://localhost:{port}"), None, token);
    assert!(!plain.status.success(), "plaintext accepted: {plain:?}");
    // https without a CA to trust is refused by the client before it connects.
    let no_ca = rules_list(&format!("https://localhost:{port}"), None, token);
    assert_eq!(no_ca.status.code(), Some(2), "{no_ca:?}");
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("--ca"));
}

/// Half a TLS identity, or a file that is not one, is refused at start naming it.
#[test]
fn bad_control_tls_files_are_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = localhost_cert(tmp.path());
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let e = start_refused(&["--control-tls-cert", &cert_s]);
    assert!(
        e.contains("control_tls_cert is set without control_tls_key"),
        "{e}"
    );
    let e = start_refused(&["--control-tls-cert", &key_s, "--control-tls-key", &key_s]);
    assert!(e.contains("not a PEM file holding a certificate"), "{e}");
    let missing = tmp.path().join("missing.pem").display().to_string();
    let e = start_refused(&["--control-tls-cert", &cert_s, "--control-tls-key", &missing]);
    assert!(
        e.contains("control_tls_key") && e.contains("cannot read"),
        "{e}"
    );
}
