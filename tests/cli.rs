//! CLI black-box tests: help, settings precedence, clear errors for bad settings.

mod common;

use std::process::Command;

use common::BIN;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("CLICKGATE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run clickgate");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn help_lists_every_contract_setting() {
    let (code, text) = run(&["--help"], &[]);
    assert_eq!(code, 0, "{text}");
    for flag in [
        "--data-dir",
        "--ingest-addr",
        "--query-addr",
        "--control-addr",
        "--cores",
        "--kafka-brokers",
        "--redis-url",
        "--archive-url",
        "--ack",
        "--trusted-cidrs",
        "--control-token",
        "--config",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
    for env in [
        "CLICKGATE_DATA_DIR",
        "CLICKGATE_INGEST_ADDR",
        "CLICKGATE_ACK",
        "CLICKGATE_CORES",
    ] {
        assert!(text.contains(env), "--help lacks {env}");
    }
}

#[test]
fn bad_settings_exit_2_with_the_name_of_the_setting() {
    let (code, text) = run(&["dataplane", "--ack", "sometimes"], &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("sometimes"), "{text}");

    let (code, text) = run(&["dataplane", "--batch-events-max", "0"], &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("batch_events_max"), "{text}");

    let (code, text) = run(&["dataplane", "--cores", "999"], &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("cores"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "no_such_knob = 1\n").unwrap();
    let (code, text) = run(&["dataplane", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no_such_knob"), "{text}");
}

/// flag > env > file: the env value beats the file, the flag beats the env.
#[test]
fn flag_beats_env_beats_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "batch_events_max = 0\n").unwrap();
    // The file's invalid 0 is masked by the env's valid value...
    let (code, text) = run(
        &[
            "dataplane",
            "--config",
            file.to_str().unwrap(),
            "--cores",
            "999",
        ],
        &[("CLICKGATE_BATCH_EVENTS_MAX", "5")],
    );
    // ...so the error that stops start-up is the flag's, not the file's.
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("cores") && !text.contains("batch_events_max"),
        "{text}"
    );
    // And the flag beats the env: an invalid flag value is reported even with a valid env.
    let (code, text) = run(
        &["dataplane", "--batch-events-max", "0"],
        &[("CLICKGATE_BATCH_EVENTS_MAX", "5")],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("batch_events_max"), "{text}");
}

/// A relative `--data-dir` (the default `./clickgate-data` is one) is taken against the
/// working directory: the log's directories open through io_uring, which refuses
/// relative paths, so the binary makes it absolute first.
#[test]
fn a_relative_data_dir_works() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(common::BIN)
        .current_dir(tmp.path())
        .args([
            "dataplane",
            "--data-dir",
            "rel-data",
            "--ingest-addr",
            "127.0.0.1:0",
            "--cores",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn clickgate");
    let addr = tmp.path().join("rel-data/run/ingest.addr");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !addr.exists() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).ok();
            panic!("clickgate exited with {status} instead of starting:\n{err}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ingest.addr within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(status.success(), "clean stop: {status}");
    assert!(tmp.path().join("rel-data/log/core-0").is_dir());
}
