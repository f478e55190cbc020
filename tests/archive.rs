//! The Parquet archive, black-box: `clickgate run` archives its local log; the files are
//! read back by an independent reader (pyarrow, `CLICKGATE_TEST_PYTHON`), and a crash
//! between "files durable" and "cursor committed", or a `kill -9` at any point, never
//! duplicates or loses a record in the archive.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

const HOUR_MS: u64 = 3_600_000;

/// The pyarrow venv python; panics naming the variable when it is missing.
pub fn python() -> String {
    match std::env::var("CLICKGATE_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => p,
        _ => panic!(
            "CLICKGATE_TEST_PYTHON is not set: run the tests with scripts/test.sh \
             (it installs pyarrow into a venv and exports the variable)"
        ),
    }
}

const READER: &str = r#"
import json, os, sys
import pyarrow as pa, pyarrow.parquet as pq
root = sys.argv[1]
out = {"files": [], "rows": [], "tmp": [], "staged": []}
for dp, dn, fn in os.walk(root):
    # As dataset readers do (pyarrow, Spark, Hive): names starting with . or _ are not
    # data (the archiver's staging directory and range intents).
    if os.path.relpath(dp, root).split(os.sep)[0].startswith((".", "_")):
        if os.path.relpath(dp, root).startswith(".staging"):
            out["staged"] += [os.path.join(dp, f) for f in fn]
        continue
    for f in sorted(fn):
        p = os.path.join(dp, f)
        if not f.endswith(".parquet"):
            out["tmp"].append(os.path.relpath(p, root))
            continue
        pf = pq.ParquetFile(p)
        md = pf.metadata
        codecs = sorted({md.row_group(i).column(j).compression
                         for i in range(md.num_row_groups) for j in range(md.num_columns)})
        t = pf.read()
        out["files"].append({
            "path": os.path.relpath(p, root),
            "codecs": codecs,
            "schema": [[x.name, str(x.type), x.nullable] for x in t.schema],
            "rows": t.num_rows,
        })
        ts = t.column("ts").cast(pa.int64()).to_pylist()
        for i, r in enumerate(t.select(["event_id", "source", "lsn", "duplicate", "fraud", "rules", "campaign_id", "cost_micros", "ip"]).to_pylist()):
            r["ts"] = ts[i]
            r["file"] = os.path.relpath(p, root)
            out["rows"].append(r)
print(json.dumps(out))
"#;

/// Everything pyarrow sees in an archive directory.
pub fn read_archive(root: &Path) -> serde_json::Value {
    let out = Command::new(python())
        .arg("-c")
        .arg(READER)
        .arg(root)
        .stderr(Stdio::inherit())
        .output()
        .expect("run the pyarrow reader");
    assert!(out.status.success(), "pyarrow reader failed");
    serde_json::from_slice(&out.stdout).expect("reader prints JSON")
}

/// `YYYY/MM/DD/HH` partition path of an hour start (the test's own calendar math).
fn partition_of(ms: u64) -> String {
    let (y, m, d) = common::civil_date(ms);
    format!(
        "year={y:04}/month={m:02}/day={d:02}/hour={:02}",
        (ms % 86_400_000) / HOUR_MS
    )
}

/// Sends `n` events with ids `base..base+n`, ts spread over the last three hours (late
/// events land in their own hour's partition), 200 per request.
fn send(cg: &Clickgate, base: u64, n: u64, sent: &mut BTreeMap<String, u64>) {
    let now = now_ms();
    let ids: Vec<u64> = (base..base + n).collect();
    for chunk in ids.chunks(200) {
        let mut lines = Vec::new();
        for &i in chunk {
            let id = uuid(i);
            let ts = now - (i % 3) * HOUR_MS - (i % 1000);
            lines.push(event(&id, 100 + i % 7, |v| {
                v["ts"] = json!(ts);
                v["ip"] = json!(format!("10.{}.{}.{}", i % 5, (i / 256) % 256, i % 256));
            }));
            sent.insert(id, ts);
        }
        let r = cg.request("POST", "/v1/clicks", &lines.join("\n"));
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(r.json()["accepted"], json!(chunk.len()), "{}", r.body);
    }
}

/// Every row once, in the partition of its own event hour; ranges of one source never
/// overlap; no temporary file is visible.
fn check_exactly_once(root: &Path, sent: &BTreeMap<String, u64>) -> serde_json::Value {
    let a = read_archive(root);
    assert_eq!(
        a["tmp"],
        json!([]),
        "no temporary or foreign file is left visible"
    );
    assert_eq!(
        a["staged"],
        json!([]),
        "nothing is left staged after a clean stop"
    );
    let rows = a["rows"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut positions = HashSet::new();
    for r in rows {
        let id = r["event_id"].as_str().unwrap().to_string();
        assert!(ids.insert(id.clone()), "event {id} archived twice");
        let pos = (
            r["source"].as_str().unwrap().to_string(),
            r["lsn"].as_u64().unwrap(),
        );
        assert!(
            positions.insert(pos.clone()),
            "record {pos:?} archived twice"
        );
        let ts = r["ts"].as_u64().unwrap();
        assert_eq!(sent.get(&id), Some(&ts), "{id}: unknown or altered");
        let file = r["file"].as_str().unwrap();
        assert!(
            file.starts_with(&partition_of(ts - ts % HOUR_MS)),
            "{id} with ts {ts} is in {file}"
        );
    }
    let want: BTreeSet<String> = sent.keys().cloned().collect();
    assert_eq!(ids.len(), want.len(), "archived vs sent");
    assert_eq!(ids, want);
    // Ranges per source from the names: the same range may span hours, never overlap.
    let mut ranges: BTreeMap<String, BTreeSet<(u64, u64)>> = BTreeMap::new();
    for f in a["files"].as_array().unwrap() {
        let name = f["path"].as_str().unwrap().rsplit('/').next().unwrap();
        let stem = name.strip_suffix(".parquet").unwrap();
        let mut parts = stem.rsplitn(3, '-');
        let to: u64 = parts.next().unwrap().parse().unwrap();
        let from: u64 = parts.next().unwrap().parse().unwrap();
        let source = parts.next().unwrap().to_string();
        ranges.entry(source).or_default().insert((from, to));
    }
    for (source, rs) in &ranges {
        let v: Vec<_> = rs.iter().collect();
        for w in v.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "{source}: ranges {:?} and {:?} overlap",
                w[0],
                w[1]
            );
        }
    }
    a
}

#[test]
fn parquet_files_read_by_pyarrow_have_the_schema_snappy_and_every_record_once() {
    let mut cg = Clickgate::run(&["--trusted-cidrs", "127.0.0.0/8"]);
    let mut sent = BTreeMap::new();
    send(&cg, 1, 600, &mut sent);
    // A retry: archived as its own record, flagged duplicate by the dataplane.
    let dup = sent.keys().next().unwrap().clone();
    let ts = sent[&dup];
    let r = cg.request(
        "POST",
        "/v1/click",
        &event(&dup, 100, |v| v["ts"] = json!(ts)),
    );
    assert_eq!(r.json()["duplicates"], json!(1), "{}", r.body);
    assert!(cg.sigterm_and_wait().success());

    let a = read_archive(&cg.data_dir.join("archive"));
    let files = a["files"].as_array().unwrap();
    assert!(!files.is_empty());
    let schema = json!([
        ["event_id", "string", false],
        ["ts", "timestamp[ms, tz=UTC]", false],
        ["recv_ts", "timestamp[ms, tz=UTC]", false],
        ["campaign_id", "uint64", false],
        ["ad_id", "uint64", false],
        ["publisher_id", "uint64", false],
        ["advertiser_id", "uint64", false],
        ["user_id", "string", false],
        ["ip", "string", false],
        ["user_agent", "string", false],
        ["country", "string", false],
        ["device", "string", false],
        ["cost_micros", "uint64", false],
        ["duplicate", "bool", false],
        ["fraud", "bool", false],
        ["rules", "list<item: string not null>", false],
        ["source", "string", false],
        ["lsn", "uint64", false],
    ]);
    for f in files {
        assert_eq!(f["schema"], schema, "{}", f["path"]);
        assert_eq!(f["codecs"], json!(["SNAPPY"]), "{}", f["path"]);
    }
    let rows = a["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 601, "600 events + 1 retry record");
    let dups: Vec<_> = rows
        .iter()
        .filter(|r| r["duplicate"] == json!(true))
        .collect();
    assert_eq!(dups.len(), 1);
    assert_eq!(dups[0]["event_id"], json!(dup));
    // Three event hours were sent: three partitions.
    let hours: BTreeSet<String> = files
        .iter()
        .map(|f| {
            f["path"]
                .as_str()
                .unwrap()
                .rsplit_once('/')
                .unwrap()
                .0
                .to_string()
        })
        .collect();
    assert_eq!(hours.len(), 3, "{hours:?}");
}

#[test]
fn a_crash_between_files_and_cursor_and_kill9_never_duplicate_or_lose_a_record() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let extra = ["--trusted-cidrs", "127.0.0.0/8", "--archive-roll-secs", "1"];
    // Run 1: the archiver aborts the process right after the 2nd file of a range that
    // spans three hour partitions (mid-range, cursor not committed). Polls 3 s apart:
    // every record sent is in that one range.
    let mut extra1: Vec<&str> = extra.to_vec();
    extra1.extend(["--archive-poll-ms", "3000"]);
    let mut cg = Clickgate::spawn_env(
        "run",
        dir,
        &extra1,
        &[("CLICKGATE_ARCHIVE_FAILPOINT", "after_file:2")],
    );
    let mut sent = BTreeMap::new();
    send(&cg, 1, 300, &mut sent);
    let status = cg.wait();
    assert!(
        !status.success(),
        "the failpoint aborts the process: {status}"
    );
    let a = read_archive(&dir.join("archive"));
    assert_eq!(
        a["files"].as_array().unwrap().len(),
        2,
        "two of the range's three files were durable at the crash"
    );
    assert!(
        clickgate_proto::cursor::read_cursor(dir, "archive", 0)
            .unwrap()
            .is_none()
            || clickgate_proto::cursor::read_cursor(dir, "archive", 1)
                .unwrap()
                .is_none(),
        "a core's cursor was not committed"
    );

    // Run 2: the interrupted range is redone under the same names; then kill -9 while
    // small ranges are being written.
    let mut extra2: Vec<&str> = extra.to_vec();
    extra2.extend(["--archive-roll-bytes", "4096", "--archive-poll-ms", "20"]);
    let mut cg = Clickgate::spawn("run", dir, &extra2);
    send(&cg, 1000, 600, &mut sent);
    cg.kill9();

    // Run 3: restart, more events, clean stop.
    cg.restart();
    send(&cg, 5000, 300, &mut sent);
    assert!(cg.sigterm_and_wait().success());
    check_exactly_once(&dir.join("archive"), &sent);
}
