//! Packaging and operator conventions, against the real binary: the systemd unit passes
//! `systemd-analyze verify` (env `CLICKGATE_TEST_SYSTEMD_ANALYZE`), `--help` is grouped by
//! plane and each subcommand lists only the settings it reads, `--log-format json` writes
//! one JSON object per log line, and the repository's text points nowhere outside it.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn output(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("CLICKGATE_CONFIG")
        .output()
        .expect("run clickgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `systemd-analyze verify` on `unit` (a copy whose ExecStart names the built
/// binary: verify checks that the command exists); returns (success, stderr).
fn verify(unit_text: &str, dir: &Path) -> (bool, String) {
    let tool = std::env::var("CLICKGATE_TEST_SYSTEMD_ANALYZE").unwrap_or_else(|_| {
        panic!("CLICKGATE_TEST_SYSTEMD_ANALYZE is not set: run the tests with scripts/test.sh (scripts/services.sh installs systemd-analyze and sets it)")
    });
    let path = dir.join("clickgate.service");
    std::fs::write(&path, unit_text).unwrap();
    let out = Command::new(&tool)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_systemd_unit_verifies_cleanly() {
    let text = std::fs::read_to_string(root().join("deploy/systemd/clickgate.service")).unwrap();
    for needed in [
        "LimitMEMLOCK=infinity",
        "LimitNOFILE=",
        "CPUAffinity=",
        "SystemCallFilter=@system-service io_uring_setup io_uring_enter io_uring_register",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "KillSignal=SIGTERM",
        "--config /etc/clickgate/clickgate.toml",
    ] {
        assert!(text.contains(needed), "the unit lacks {needed}");
    }
    let exec = "ExecStart=/usr/local/bin/clickgate ";
    assert!(text.contains(exec));
    let local = text.replace(exec, &format!("ExecStart={BIN} "));
    let tmp = tempfile::tempdir().unwrap();
    // systemd-analyze exits 0 on unknown keys and bad values and only warns: any output
    // is a failure.
    let (ok, stderr) = verify(&local, tmp.path());
    assert!(
        ok && stderr.trim().is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
    // And it does notice a broken unit (the check above can fail).
    let broken = local.replace("LimitNOFILE=1048576", "LimitNOFILE=lots");
    let (_, stderr) = verify(&broken, tmp.path());
    assert!(
        stderr.contains("LimitNOFILE") || stderr.contains("lots"),
        "{stderr}"
    );
}

#[test]
fn help_is_grouped_by_plane() {
    let (code, text, _) = output(&["--help"]);
    assert_eq!(code, 0);
    for heading in [
        "Common:",
        "Dataplane (ingest):",
        "Dataplane: Kafka:",
        "Controlplane: query API and dashboard:",
        "Controlplane: control API:",
        "Controlplane: counter store:",
        "Controlplane: Redis:",
        "Controlplane: archive:",
    ] {
        assert!(
            text.contains(heading),
            "--help lacks the heading {heading}:\n{text}"
        );
    }
}

#[test]
fn each_subcommand_lists_its_own_settings() {
    let cases: [(&str, &[&str], &[&str]); 5] = [
        (
            "billing",
            &["--day", "--data-dir", "--archive-url", "--rules"],
            &["--ingest-addr", "--kafka-brokers", "--redis-url", "--cores"],
        ),
        (
            "dataplane",
            &["--ingest-addr", "--cores", "--kafka-brokers", "--data-dir"],
            &["--query-addr", "--redis-url", "--archive-roll-bytes"],
        ),
        (
            "controlplane",
            &[
                "--query-addr",
                "--redis-url",
                "--archive-url",
                "--control-token",
            ],
            &["--ingest-addr", "--cores", "--kafka-linger-ms"],
        ),
        (
            "rules",
            &["--url", "--token"],
            &["--data-dir", "--ingest-addr", "--config"],
        ),
        (
            "run",
            &["--ingest-addr", "--query-addr", "--redis-url"],
            &[],
        ),
    ];
    for (sub, has, lacks) in cases {
        let (code, text, _) = output(&[sub, "--help"]);
        assert_eq!(code, 0, "{sub} --help");
        for flag in has {
            assert!(text.contains(flag), "`{sub} --help` lacks {flag}:\n{text}");
        }
        for flag in lacks {
            assert!(
                !text.contains(&format!("{flag} ")),
                "`{sub} --help` lists {flag}:\n{text}"
            );
        }
    }
    // `clickgate help billing` is the same page.
    let (_, via_help, _) = output(&["help", "billing"]);
    assert!(!via_help.contains("--ingest-addr "), "{via_help}");
    // Hidden settings are still accepted: a shared config or environment works everywhere.
    let (code, _, stderr) = output(&["billing", "--ingest-addr", "127.0.0.1:1", "--day", "x"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--day"), "{stderr}");
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "controlplane",
            "--data-dir",
            tmp.path().to_str().unwrap(),
            "--query-addr",
            "127.0.0.1:0",
            "--control-addr",
            "127.0.0.1:0",
        ])
        .env_remove("CLICKGATE_CONFIG")
        .env("CLICKGATE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn clickgate");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.contains("listening")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("no `listening` log line within 60 s: {lines:?}");
            }
        }
    }
    // The stop is not what this test is about (and a SIGTERM this early can beat the
    // signal handler): kill it and read what it wrote.
    child.kill().unwrap();
    child.wait().unwrap();
    lines.extend(rx.try_iter());
    assert!(lines.len() >= 2, "{lines:?}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"));
        assert!(v["timestamp"].is_string(), "{l}");
        assert!(v["level"].is_string(), "{l}");
        assert!(v["message"].is_string(), "{l}");
    }
    let listening = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["message"].as_str().unwrap().contains("listening"))
        .unwrap();
    assert!(listening["query_addr"].is_string(), "{listening}");
}

/// Files a newcomer reads: none may send them outside the repository or cite the
/// project's internal issue numbers.
#[test]
fn the_docs_point_only_inside_the_repository() {
    let mut files = vec![root().join("README.md"), root().join("ARCHITECTURE.md")];
    for dir in ["docs", "deploy", "tuning"] {
        collect(&root().join(dir), &mut files);
    }
    for e in std::fs::read_dir(root().join("bench")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    assert!(files.len() > 10, "{files:?}");
    let mut bad = Vec::new();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            let l = line.to_ascii_lowercase();
            if l.contains("shared/")
                || l.contains("issue #")
                || l.contains("contract §")
                || l.contains("design.md")
            {
                bad.push(format!("{}:{}: {line}", f.display(), i + 1));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "references outside the repository:\n{}",
        bad.join("\n")
    );
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect(&p, out);
        } else {
            out.push(p);
        }
    }
}
