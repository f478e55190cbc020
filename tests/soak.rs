//! The soak mode (`clickgate-bench --soak-metrics`, bench/soak.sh), CI-sized: a few
//! seconds of load through `clickgate run --ack disk` with a real Kafka broker
//! (`CLICKGATE_TEST_KAFKA`), real Redis (`CLICKGATE_TEST_REDIS`) and the Parquet archive
//! read back by pyarrow (`CLICKGATE_TEST_PYTHON`). The report must say every stage caught
//! up, and the counts must add up: every accepted event is in the topic, the archive and
//! the store exactly once, and Redis's totals equal the store's. No speed threshold.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clickgate_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use clickgate_kafka::rdkafka::message::Headers;
use clickgate_kafka::rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use common::{bench_binary, metric_sum, now_ms, Clickgate};
use serde_json::Value;

fn env_or_panic(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through scripts/test.sh (it starts the services and sets it)")
    })
}

/// `(cg-core, cg-lsn)` and event id of every record of `topic`.
fn read_topic(brokers: &str, topic: &str) -> Vec<((u64, u64), String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let parts = md.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    let mut open = HashSet::new();
    let mut ends = HashMap::new();
    for p in 0..parts {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        if high > 0 {
            ends.insert(p, high);
            open.insert(p);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "reading {topic} back did not finish"
        );
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            if open.is_empty() {
                break;
            }
            continue;
        };
        let m = m.expect("fetch");
        if m.offset() + 1 >= ends[&m.partition()] {
            open.remove(&m.partition());
        }
        let rec = clickgate_proto::raw_pb::decode(m.payload().expect("value"))
            .expect("a raw_clicks protobuf value");
        let (mut core, mut lsn) = (None, None);
        for h in m.headers().expect("headers").iter() {
            let v = std::str::from_utf8(h.value.unwrap()).unwrap();
            match h.key {
                "cg-core" => core = v.parse().ok(),
                "cg-lsn" => lsn = v.parse().ok(),
                _ => {}
            }
        }
        out.push((
            (core.expect("cg-core"), lsn.expect("cg-lsn")),
            rec.click.event_id.to_string(),
        ));
    }
    out
}

/// Event ids of every row pyarrow reads in the archive directory.
fn archive_event_ids(root: &std::path::Path) -> Vec<String> {
    let py = env_or_panic("CLICKGATE_TEST_PYTHON");
    let script = r#"
import json, os, sys
import pyarrow.parquet as pq
ids = []
for dp, dn, fn in os.walk(sys.argv[1]):
    for f in fn:
        if f.endswith(".parquet"):
            ids += pq.read_table(os.path.join(dp, f), columns=["event_id"]).column(0).to_pylist()
print(json.dumps(ids))
"#;
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .arg(root)
        .stderr(Stdio::inherit())
        .output()
        .expect("run the pyarrow reader");
    assert!(out.status.success(), "pyarrow reader failed");
    serde_json::from_slice(&out.stdout).expect("reader prints JSON")
}

/// Per campaign, the clicks Redis holds in its 1d `all` counters under `prefix`.
fn redis_clicks(url: &str, prefix: &str) -> BTreeMap<u64, u64> {
    let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}counter:*:1d:*:all"))
        .query(&mut con)
        .unwrap();
    let mut out = BTreeMap::new();
    for k in keys {
        let campaign: u64 = k[prefix.len()..]
            .split(['{', '}'])
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("key {k} has no campaign tag"));
        let clicks: Option<u64> = redis::cmd("HGET")
            .arg(&k)
            .arg("clicks")
            .query(&mut con)
            .unwrap();
        *out.entry(campaign).or_insert(0) += clicks.unwrap_or(0);
    }
    out
}

/// Per campaign, the clicks the embedded store holds (the dashboard's breakdown reads
/// the store even when queries read Redis): the sum over devices, 1d window.
fn store_clicks(cg: &Clickgate, campaigns: u64) -> BTreeMap<u64, u64> {
    let to = now_ms() + 600_000;
    let from = to - 3 * 86_400_000;
    let mut out = BTreeMap::new();
    for c in 1..=campaigns {
        let r = cg.query(&format!(
            "/v1/campaigns/{c}/breakdown?window=1d&by=device&from={from}&to={to}&n=10"
        ));
        assert_eq!(r.status, 200, "{}", r.body);
        let n: u64 = r.json()["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["clicks"].as_u64().unwrap())
            .sum();
        if n > 0 {
            out.insert(c, n);
        }
    }
    out
}

#[test]
fn a_short_soak_reaches_every_stage_exactly_once() {
    let brokers = env_or_panic("CLICKGATE_TEST_KAFKA");
    let redis_url = env_or_panic("CLICKGATE_TEST_REDIS");
    env_or_panic("CLICKGATE_TEST_PYTHON");
    let run = format!("{}_{}", std::process::id(), now_ms());
    let topic = format!("soak_{run}");
    let prefix = format!("soak-{run}:");
    let cg = Clickgate::run(&[
        "--ack",
        "disk",
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        &topic,
        "--redis-url",
        &redis_url,
        "--redis-key-prefix",
        &prefix,
        "--redis-flush-interval-ms",
        "100",
        "--archive-roll-secs",
        "1",
        "--trusted-cidrs",
        "127.0.0.0/8",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let soak_json = tmp.path().join("soak.json");
    let load_json = tmp.path().join("load.json");
    let svg = tmp.path().join("soak.svg");
    let campaigns = 20u64;
    let query = cg.query.expect("run serves queries");
    let out = Command::new(bench_binary())
        .args([
            "--url",
            &format!("http://{}", cg.ingest),
            "--mode",
            "batch",
            "--batch-size",
            "50",
            "--connections",
            "4",
            "--rate",
            "100",
            "--duration",
            "4s",
            "--warmup",
            "0s",
            "--campaigns",
            &campaigns.to_string(),
            "--pool",
            "256",
            "--quiet",
            "--soak-metrics",
            &format!("http://{},http://{query}", cg.ingest),
            "--soak-pids",
            &format!("clickgate={}", cg.child.as_ref().unwrap().id()),
            "--soak-catchup",
            "90s",
        ])
        .arg("--soak-json")
        .arg(&soak_json)
        .arg("--soak-svg")
        .arg(&svg)
        .arg("--json")
        .arg(&load_json)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run clickgate-bench");
    assert!(
        out.status.success(),
        "clickgate-bench failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let soak: Value = serde_json::from_slice(&std::fs::read(&soak_json).unwrap()).unwrap();
    let load: Value = serde_json::from_slice(&std::fs::read(&load_json).unwrap()).unwrap();

    // Every stage exported its lag and caught up after the load.
    for st in soak["stages"].as_array().unwrap() {
        assert!(
            st["max_under_load"].is_number(),
            "stage {} exported no lag: {st}",
            st["stage"]
        );
        assert!(
            st["caught_up_after_s"].is_number(),
            "stage {} did not catch up: {st}",
            st["stage"]
        );
    }
    assert!(soak["samples"].as_array().unwrap().len() >= 4);
    assert!(soak["rss_max"]["clickgate"].as_u64().unwrap() > 0);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<polyline"));

    // The counts add up: the server accepted what the tool was told, nothing else.
    let accepted = metric_sum(&cg.metrics(), "clickgate_ingest_events_accepted_total") as u64;
    assert!(accepted >= 1000, "only {accepted} events accepted");
    assert_eq!(
        load["whole_run"]["accepted"].as_u64(),
        Some(accepted),
        "{load}"
    );
    assert_eq!(
        soak["totals"]["clickgate_ingest_events_accepted_total"].as_f64(),
        Some(accepted as f64)
    );

    // Kafka: each accepted event once (by event id and by (core, LSN)).
    let recs = read_topic(&brokers, &topic);
    assert_eq!(recs.len() as u64, accepted, "records in {topic}");
    let ids: HashSet<&String> = recs.iter().map(|r| &r.1).collect();
    assert_eq!(
        ids.len() as u64,
        accepted,
        "distinct event ids in the topic"
    );
    let lsns: HashSet<(u64, u64)> = recs.iter().map(|r| r.0).collect();
    assert_eq!(lsns.len() as u64, accepted);

    // The archive: the same events, once each.
    let archived = archive_event_ids(&cg.data_dir.join("archive"));
    assert_eq!(archived.len() as u64, accepted, "archived rows");
    let archived: HashSet<&String> = archived.iter().collect();
    assert_eq!(archived, ids, "archive and topic hold the same events");

    // The store counted each once; Redis holds exactly the store's totals.
    let store = store_clicks(&cg, campaigns);
    assert_eq!(store.values().sum::<u64>(), accepted, "{store:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let redis = redis_clicks(&redis_url, &prefix);
        if redis == store {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redis {redis:?} != store {store:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
