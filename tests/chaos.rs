//! Failing disks, against the real binary: the data directory on a small file system the
//! test mounts (tmpfs; the test needs root and fails loudly without it). Filled to the
//! last byte, ingest answers 503 and `/readyz` is not ready; once space returns the box
//! takes clicks again without a restart, and every click it acknowledged is in its log.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clickgate_proto::record;
use clickgate_proto::segment::{core_dirs, LogReader};
use common::{closed_by_server, event, uuid, Clickgate, Response};

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted on drop.
struct SmallFs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl SmallFs {
    fn mount(mib: u64) -> SmallFs {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill it and needs root (CAP_SYS_ADMIN): mount said {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs {
            dir,
            _parent: parent,
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 << 10];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // The last partial pages too, a byte at a time is too slow: 4 KiB then 1 byte.
    for size in [4096usize, 512, 1] {
        while f.write(&chunk[..size]).map(|n| n > 0).unwrap_or(false) {
            written += size as u64;
        }
    }
    let _ = f.sync_all();
    written
}

fn batch(cg: &Clickgate, first: u64, n: u64) -> (Response, Vec<String>) {
    let ids: Vec<String> = (first..first + n).map(uuid).collect();
    let body: String = ids.iter().map(|id| event(id, 5, |_| {}) + "\n").collect();
    (cg.request("POST", "/v1/clicks", &body), ids)
}

fn logged(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for (_core, d) in core_dirs(&dir.join("log")).expect("log dirs") {
        let mut reader = LogReader::open(&d, 0).expect("open log");
        while let Some((_lsn, bytes)) = reader.next().expect("read log") {
            out.push(
                record::decode(bytes)
                    .expect("record")
                    .click
                    .event_id
                    .to_string(),
            );
        }
    }
    out
}

#[test]
fn a_full_disk_answers_503_and_recovers_without_restart() {
    let fs = SmallFs::mount(24);
    let data = fs.dir.join("data");
    let mut cg = Clickgate::spawn(
        "dataplane",
        &data,
        &[
            "--cores",
            "1",
            "--ack",
            "disk",
            "--log-segment-bytes",
            "1048576",
            "--rate-limit-events-per-sec",
            "10000000",
        ],
    );
    let mut acked: Vec<String> = Vec::new();
    let mut next = 1u64;
    // Some clicks on a disk with room.
    for _ in 0..3 {
        let (r, ids) = batch(&cg, next, 200);
        next += 200;
        assert_eq!(r.status, 202, "{}", r.body);
        acked.extend(ids);
    }
    let junk = fs.dir.join("junk");
    let filled = fill(&junk);
    assert!(filled > 0);
    // Full: within a few segments' worth the log must stall; every 202 before is kept.
    let mut refused = None;
    for _ in 0..400 {
        let (r, ids) = batch(&cg, next, 200);
        next += 200;
        match r.status {
            202 => acked.extend(ids),
            503 => {
                refused = Some(r);
                break;
            }
            s => panic!("unexpected {s}: {}", r.body),
        }
    }
    let refused = refused.expect("a full disk never answered 503");
    assert!(refused.body.contains("log"), "{}", refused.body);
    let (r, _) = batch(&cg, next, 10);
    next += 10;
    assert_eq!(r.status, 503, "still full: {}", r.body);
    let ready = cg.request("GET", "/readyz", "");
    assert_eq!(ready.status, 503, "{}", ready.body);

    // Space returns: the box takes clicks again by itself.
    std::fs::remove_file(&junk).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (r, ids) = batch(&cg, next, 50);
        next += 50;
        if r.status == 202 {
            acked.extend(ids);
            break;
        }
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(
            Instant::now() < deadline,
            "never recovered after space returned"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cg.request("GET", "/readyz", "").status, 200);
    for _ in 0..3 {
        let (r, ids) = batch(&cg, next, 200);
        next += 200;
        assert_eq!(r.status, 202, "{}", r.body);
        acked.extend(ids);
    }
    assert!(cg.sigterm_and_wait().success());

    let logged: HashSet<String> = logged(&data).into_iter().collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !logged.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged clicks are not in the log (first: {:?})",
        lost.len(),
        acked.len(),
        lost.first()
    );
}

/// Clicks of campaigns 1..=`campaigns` in the 1d windows around now, as the query API
/// answers them.
fn queried_clicks(cp: &Clickgate, campaigns: u64) -> u64 {
    let to = common::now_ms() + 600_000;
    let from = to - 3 * 86_400_000;
    (1..=campaigns)
        .map(|c| {
            let r = cp.query(&format!(
                "/v1/campaigns/{c}/metrics?window=1d&from={from}&to={to}"
            ));
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["buckets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["clicks"].as_u64().unwrap())
                .sum::<u64>()
        })
        .sum()
}

/// The controlplane's store on a full file system: its WAL stalls (`/readyz` 503, deltas
/// refused and kept by the dataplane), and once space returns it takes them again by
/// itself; the counts it answers are exact.
#[test]
fn a_full_disk_under_the_store_stalls_its_wal_and_recovers_exactly() {
    let fs = SmallFs::mount(16);
    let cp_dir = fs.dir.join("cp");
    let dp_dir = tempfile::tempdir().unwrap();
    let socket = cp_dir.join("control.sock");
    let socket_arg = socket.display().to_string();
    let cp = Clickgate::spawn("controlplane", &cp_dir, &[]);
    let dp = Clickgate::spawn(
        "dataplane",
        dp_dir.path(),
        &[
            "--cores",
            "1",
            "--control-socket",
            &socket_arg,
            "--rate-limit-events-per-sec",
            "10000000",
        ],
    );
    let campaigns = 400u64;
    let next = std::cell::Cell::new(1u64);
    // Every batch is acknowledged: the dataplane's log is on another disk.
    let send = |n: u64| {
        let first = next.get();
        let body: String = (first..first + n)
            .map(|i| event(&uuid(i), 1 + i % campaigns, |_| {}) + "\n")
            .collect();
        next.set(first + n);
        let r = dp.request("POST", "/v1/clicks", &body);
        assert_eq!(r.status, 202, "{}", r.body);
    };
    let acked = || next.get() - 1;
    send(400);
    let deadline = Instant::now() + Duration::from_secs(30);
    while queried_clicks(&cp, campaigns) != acked() {
        assert!(Instant::now() < deadline, "the store never caught up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let junk = fs.dir.join("junk");
    fill(&junk);
    // Deltas of 400 campaigns each (tens of KB): the WAL cannot take one.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        send(400);
        let r = cp.query("/readyz");
        if r.status == 503 {
            assert!(r.body.contains("store WAL"), "{}", r.body);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store never stalled on a full disk"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    send(400);
    std::fs::remove_file(&junk).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while queried_clicks(&cp, campaigns) != acked() || cp.query("/readyz").status != 200 {
        assert!(
            Instant::now() < deadline,
            "the store never recovered: {} of {} clicks",
            queried_clicks(&cp, campaigns),
            acked()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A wall clock stepped forward four minutes, back two hours and forward to the true time
/// under a running dataplane (the process's wall clock only, through libfaketime:
/// `CLICKGATE_TEST_FAKETIME_LIB`): clicks keep being taken, copies of clicks taken before
/// the steps are still caught as duplicates after them (the dedup window never moves
/// back), and a request head trickled across the backward step is still cut at its
/// deadline (deadlines run on the monotonic clock). Every click is in the log.
#[test]
fn a_wall_clock_step_changes_neither_dedup_nor_deadlines() {
    let lib = std::env::var("CLICKGATE_TEST_FAKETIME_LIB").unwrap_or_else(|_| {
        panic!("CLICKGATE_TEST_FAKETIME_LIB is not set: run the tests with scripts/test.sh (it installs libfaketime)")
    });
    let tmp = tempfile::tempdir().unwrap();
    let clock = tmp.path().join("clock");
    std::fs::write(&clock, "+0\n").unwrap();
    let clock_s = clock.display().to_string();
    let data = tmp.path().join("data");
    let mut cg = Clickgate::spawn_env(
        "dataplane",
        &data,
        &[
            "--cores",
            "1",
            "--header-timeout-ms",
            "1000",
            "--rate-limit-events-per-sec",
            "10000000",
        ],
        &[
            ("LD_PRELOAD", lib.as_str()),
            ("FAKETIME_TIMESTAMP_FILE", clock_s.as_str()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let post = |ids: &[String]| -> serde_json::Value {
        let body: String = ids.iter().map(|id| event(id, 5, |_| {}) + "\n").collect();
        let r = cg.request("POST", "/v1/clicks", &body);
        assert_eq!(r.status, 202, "{}", r.body);
        r.json()
    };
    let ids = |first: u64| -> Vec<String> { (first..first + 100).map(uuid).collect() };
    let (ids_a, ids_b, ids_c) = (ids(1), ids(1_000), ids(2_000));
    let a = post(&ids_a);
    assert_eq!(a["accepted"], 100, "{a}");
    // Forward by less than the dedup window (600 s).
    std::fs::write(&clock, "+4m\n").unwrap();
    let b = post(&ids_b);
    assert_eq!(
        (b["accepted"].as_u64(), b["duplicates"].as_u64()),
        (Some(100), Some(0)),
        "{b}"
    );
    // A head trickled while the clock steps back two hours (no clicks are sent then: with
    // a clock two hours behind, every honest click would be from the future).
    let mut s = std::net::TcpStream::connect(cg.ingest).unwrap();
    let head = format!(
        "POST /v1/click HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\nContent-Length: 2\r\n\r\n",
        "a".repeat(360)
    );
    let mut cut = false;
    for (i, byte) in head.bytes().enumerate() {
        if i == 3 {
            std::fs::write(&clock, "-2h\n").unwrap();
        }
        if s.write_all(&[byte]).is_err() || closed_by_server(&mut s) {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "a head trickled across a backward clock step was never cut"
    );
    std::fs::write(&clock, "+0\n").unwrap();
    // Copies of clicks taken before both steps are still duplicates; new ones are taken.
    let again = post(&ids_a);
    assert_eq!(
        (again["accepted"].as_u64(), again["duplicates"].as_u64()),
        (Some(0), Some(100)),
        "{again}"
    );
    let c = post(&ids_c);
    assert_eq!(c["accepted"], 100, "{c}");
    assert!(cg.sigterm_and_wait().success());
    let logged = logged(&data);
    for id in ids_a.iter().chain(&ids_b).chain(&ids_c) {
        assert!(logged.contains(id), "click {id} not in the log");
    }
}
