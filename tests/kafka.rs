//! The Kafka backbone against a REAL broker (tansu, a Kafka-protocol broker):
//! `CLICKGATE_TEST_KAFKA` = host:port of a running one, `CLICKGATE_TEST_TANSU` = its
//! binary for tests that stop and restart a private broker. `scripts/test.sh` sets both.
//! Each test uses its own topic (and group id), so they run in parallel.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clickgate_kafka::murmur2::partition_for;
use clickgate_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use clickgate_kafka::rdkafka::message::Headers;
use clickgate_kafka::rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use common::{event, free_port, now_ms, uuid, Clickgate};

/// Generous bound for the topic to catch up; a test fails loudly past it.
const CATCH_UP: Duration = Duration::from_secs(60);
/// The chaos tests run one at a time: each drives a broker and a box as hard as this
/// machine allows; side by side on a small machine they starved each other's broker
/// until reading a topic back outran its deadline.
fn chaos_one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reading on past the ends a topic had when a read started, at most.
const GRACE: Duration = Duration::from_secs(3);

fn broker() -> String {
    std::env::var("CLICKGATE_TEST_KAFKA").unwrap_or_else(|_| {
        panic!("CLICKGATE_TEST_KAFKA is not set: run the tests with scripts/test.sh (it starts a tansu broker)")
    })
}

fn tansu_bin() -> String {
    std::env::var("CLICKGATE_TEST_TANSU").unwrap_or_else(|_| {
        panic!(
            "CLICKGATE_TEST_TANSU is not set: run the tests with scripts/test.sh (it builds tansu)"
        )
    })
}

fn unique_topic(name: &str) -> String {
    format!("t_{name}_{}_{}", std::process::id(), now_ms())
}

fn kafka_args<'a>(brokers: &'a str, topic: &'a str, ack: &'a str) -> Vec<&'a str> {
    vec![
        "--kafka-brokers",
        brokers,
        "--kafka-topic",
        topic,
        "--kafka-partitions",
        "4",
        "--ack",
        ack,
    ]
}

/// One record of the topic, decoded.
#[derive(Debug, Clone)]
struct Rec {
    partition: i32,
    offset: i64,
    key: Vec<u8>,
    event_id: String,
    campaign: u64,
    duplicate: bool,
    core: u64,
    lsn: u64,
}

/// Every record of `topic` (all partitions, from the beginning to the current end).
fn read_topic(brokers: &str, topic: &str) -> Vec<Rec> {
    read_topic_with(brokers, topic, &[])
}

/// [`read_topic`] with extra client settings (TLS).
fn read_topic_with(brokers: &str, topic: &str, extra: &[(&str, String)]) -> Vec<Rec> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false");
    for (k, v) in extra {
        cfg.set(*k, v);
    }
    let consumer: BaseConsumer = cfg.create().expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let parts = md.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in 0..parts {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        if high > 0 {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + CATCH_UP;
    let mut open: HashSet<i32> = ends.keys().copied().collect();
    // Past the watermarks read at the start, until a poll comes back empty.
    let mut past_ends: Option<Instant> = None;
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
        let mut core = None;
        let mut lsn = None;
        for h in m.headers().expect("headers").iter() {
            let v = std::str::from_utf8(h.value.unwrap()).unwrap();
            match h.key {
                "cg-core" => core = v.parse().ok(),
                "cg-lsn" => lsn = v.parse().ok(),
                _ => {}
            }
        }
        out.push(Rec {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().expect("key").to_vec(),
            event_id: rec.click.event_id.to_string(),
            campaign: rec.click.campaign_id,
            duplicate: rec.flags.duplicate(),
            core: core.expect("cg-core header"),
            lsn: lsn.expect("cg-lsn header"),
        });
        // Past the ends read at the start (the broker's watermark may trail what it
        // acknowledged), for at most GRACE once every partition reached its end: a box
        // still producing never leaves an empty poll.
        if open.is_empty() {
            let at = *past_ends.get_or_insert_with(Instant::now);
            if at.elapsed() > GRACE {
                break;
            }
        }
    }
    out
}

/// Waits until every id in `want` is in the topic, then returns the records.
fn wait_for_all(brokers: &str, topic: &str, want: &HashSet<String>) -> Vec<Rec> {
    wait_for_all_with(brokers, topic, want, &[])
}

fn wait_for_all_with(
    brokers: &str,
    topic: &str,
    want: &HashSet<String>,
    extra: &[(&str, String)],
) -> Vec<Rec> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let recs = read_topic_with(brokers, topic, extra);
        let have: HashSet<&str> = recs.iter().map(|r| r.event_id.as_str()).collect();
        let missing = want.iter().filter(|id| !have.contains(id.as_str())).count();
        if missing == 0 {
            return recs;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} accepted events never reached {topic}",
            want.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends `n` new events (campaigns 1..=13) as NDJSON batches of 50; returns the ids
/// answered 202 (and stops at the first non-202, e.g. a killed process).
fn send_events(cg: &Clickgate, first: u64, n: u64) -> Vec<String> {
    let mut ok = Vec::new();
    let mut i = first;
    while i < first + n {
        let ids: Vec<String> = (i..(i + 50).min(first + n)).map(uuid).collect();
        let body: String = ids
            .iter()
            .enumerate()
            .map(|(j, id)| event(id, 1 + (i + j as u64) % 13, |_| {}) + "\n")
            .collect();
        let mut conn = cg.connect();
        let r = conn.request("POST", "/v1/clicks", &body);
        if r.status != 202 {
            break;
        }
        assert_eq!(r.json()["accepted"], ids.len(), "{}", r.body);
        ok.extend(ids);
        i += 50;
    }
    ok
}

/// Each (core, lsn) once, each event once, key = campaign id text, partition = murmur2.
fn check_exactly_once(recs: &[Rec], partitions: u32) {
    let mut seen = HashSet::new();
    let mut ids = HashSet::new();
    for r in recs {
        assert!(
            seen.insert((r.core, r.lsn)),
            "record core {} lsn {} twice in the topic",
            r.core,
            r.lsn
        );
        if !r.duplicate {
            assert!(
                ids.insert(r.event_id.clone()),
                "event {} twice in the topic",
                r.event_id
            );
        }
        assert_eq!(
            r.key,
            r.campaign.to_string().into_bytes(),
            "key of {}",
            r.event_id
        );
        assert_eq!(
            r.partition as u32,
            partition_for(&r.key, partitions),
            "partition of key {}",
            r.campaign
        );
    }
}

/// Per partition, each core's records in LSN order (the log's order).
fn check_order(recs: &[Rec]) {
    let mut by: BTreeMap<(i32, u64), Vec<(i64, u64)>> = BTreeMap::new();
    for r in recs {
        by.entry((r.partition, r.core))
            .or_default()
            .push((r.offset, r.lsn));
    }
    for ((p, core), mut v) in by {
        v.sort();
        assert!(
            v.windows(2).all(|w| w[0].1 < w[1].1),
            "partition {p}: core {core}'s records out of log order"
        );
    }
}

#[test]
fn every_accepted_event_is_in_the_topic_once_with_its_key_and_partition() {
    let brokers = broker();
    let topic = unique_topic("once");
    let cg = Clickgate::dataplane(&kafka_args(&brokers, &topic, "kafka"));
    let mut ids = send_events(&cg, 0, 500);
    assert_eq!(ids.len(), 500);
    // A retry of accepted events: 202 again, logged with the duplicate flag.
    let retry: String = ids[..10]
        .iter()
        .map(|id| event(id, 5, |_| {}) + "\n")
        .collect();
    let r = cg.request("POST", "/v1/clicks", &retry);
    assert_eq!(
        (r.status, r.json()["duplicates"].as_u64()),
        (202, Some(10)),
        "{}",
        r.body
    );
    // ack=kafka: a 202 means the broker has it, so the topic holds all of them now.
    let recs = read_topic(&brokers, &topic);
    let have: HashSet<&str> = recs
        .iter()
        .filter(|r| !r.duplicate)
        .map(|r| r.event_id.as_str())
        .collect();
    ids.retain(|id| !have.contains(id.as_str()));
    assert!(
        ids.is_empty(),
        "{} events answered 202 (ack=kafka) are not in the topic",
        ids.len()
    );
    assert_eq!(
        recs.len(),
        510,
        "every log record once, duplicates included"
    );
    check_exactly_once(&recs, 4);
    check_order(&recs);
    let ready = cg.request("GET", "/readyz", "");
    assert_eq!(ready.status, 200, "{}", ready.body);
}

#[test]
fn producer_uses_lz4_acks_all_idempotence_and_the_java_partitioner() {
    let cfg = clickgate_kafka::topic::producer_config(&clickgate_kafka::KafkaConfig {
        brokers: "127.0.0.1:1".into(),
        ..Default::default()
    });
    for (k, v) in [
        ("compression.type", "lz4"),
        ("acks", "all"),
        ("enable.idempotence", "true"),
        ("partitioner", "murmur2_random"),
    ] {
        assert_eq!(cfg.get(k), Some(v), "{k}");
    }
}

/// `(magic, attributes)` of every record batch of `partition` from offset 0, read with a
/// hand-written Fetch v4 request: what is on the wire and in the broker, not what the
/// producer was told (a consumer library decompresses and hides the codec).
fn raw_batches(broker: &str, topic: &str, partition: i32) -> Vec<(i8, i16)> {
    use std::io::{Read, Write};
    let mut body = Vec::new();
    body.extend_from_slice(&1i16.to_be_bytes()); // api_key Fetch
    body.extend_from_slice(&4i16.to_be_bytes()); // api_version 4
    body.extend_from_slice(&7i32.to_be_bytes()); // correlation id
    body.extend_from_slice(&4i16.to_be_bytes());
    body.extend_from_slice(b"test"); // client id
    body.extend_from_slice(&(-1i32).to_be_bytes()); // replica id
    body.extend_from_slice(&500i32.to_be_bytes()); // max wait ms
    body.extend_from_slice(&1i32.to_be_bytes()); // min bytes
    body.extend_from_slice(&(16i32 << 20).to_be_bytes()); // max bytes
    body.push(0); // isolation level
    body.extend_from_slice(&1i32.to_be_bytes()); // topics
    body.extend_from_slice(&(topic.len() as i16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&1i32.to_be_bytes()); // partitions
    body.extend_from_slice(&partition.to_be_bytes());
    body.extend_from_slice(&0i64.to_be_bytes()); // fetch offset
    body.extend_from_slice(&(16i32 << 20).to_be_bytes()); // partition max bytes
    let mut conn = std::net::TcpStream::connect(broker).expect("connect to the broker");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(&(body.len() as i32).to_be_bytes()).unwrap();
    conn.write_all(&body).unwrap();
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).expect("fetch response length");
    let mut r = vec![0u8; i32::from_be_bytes(len) as usize];
    conn.read_exact(&mut r).expect("fetch response");
    let mut at = 0usize;
    let mut take = |n: usize| {
        let s = &r[at..at + n];
        at += n;
        s.to_vec()
    };
    let i16_ = |b: Vec<u8>| i16::from_be_bytes(b.try_into().unwrap());
    let i32_ = |b: Vec<u8>| i32::from_be_bytes(b.try_into().unwrap());
    assert_eq!(i32_(take(4)), 7, "correlation id");
    take(4); // throttle time
    assert_eq!(i32_(take(4)), 1, "one topic");
    let name_len = i16_(take(2)) as usize;
    assert_eq!(take(name_len), topic.as_bytes());
    assert_eq!(i32_(take(4)), 1, "one partition");
    assert_eq!(i32_(take(4)), partition);
    assert_eq!(i16_(take(2)), 0, "fetch error code");
    take(16); // high watermark, last stable offset
    let aborted = i32_(take(4));
    if aborted > 0 {
        take(aborted as usize * 16);
    }
    let records_len = i32_(take(4));
    let records = if records_len > 0 {
        take(records_len as usize)
    } else {
        Vec::new()
    };
    let mut batches = Vec::new();
    let mut b = 0usize;
    // baseOffset i64 | batchLength i32 | leaderEpoch i32 | magic i8 | crc u32 | attributes i16
    while b + 23 <= records.len() {
        let batch_len = i32::from_be_bytes(records[b + 8..b + 12].try_into().unwrap()) as usize;
        if b + 12 + batch_len > records.len() {
            break; // a partial batch at the end of the fetch
        }
        let magic = records[b + 16] as i8;
        let attributes = i16::from_be_bytes(records[b + 21..b + 23].try_into().unwrap());
        batches.push((magic, attributes));
        b += 12 + batch_len;
    }
    batches
}

#[test]
fn batches_on_the_wire_are_lz4_compressed() {
    let brokers = broker();
    let topic = unique_topic("lz4");
    let cg = Clickgate::dataplane(&kafka_args(&brokers, &topic, "kafka"));
    let ids = send_events(&cg, 0, 200);
    assert_eq!(ids.len(), 200);
    let leader = brokers.split(',').next().unwrap().to_string();
    let batches: Vec<(i8, i16)> = (0..4)
        .flat_map(|p| raw_batches(&leader, &topic, p))
        .collect();
    assert!(!batches.is_empty(), "the topic holds record batches");
    for (magic, attributes) in &batches {
        assert_eq!(*magic, 2, "record batch format v2");
        assert_eq!(attributes & 0x7, 3, "compression codec bits: 3 = LZ4");
    }
}

#[test]
fn unreachable_broker_is_a_clear_start_error() {
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::BIN)
        .args(["dataplane", "--data-dir"])
        .arg(dir.path())
        .args([
            "--ingest-addr",
            "127.0.0.1:0",
            "--cores",
            "1",
            "--kafka-brokers",
            &addr,
        ])
        .args(["--kafka-start-timeout-ms", "1500"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&addr) && err.contains("answered"), "{err}");
}

/// A private tansu on its own port with sqlite storage, so data survives its restart.
struct Tansu {
    child: Option<Child>,
    port: u16,
    db: String,
    dir: std::path::PathBuf,
}

impl Tansu {
    fn start(dir: &Path) -> Tansu {
        let port = free_port();
        let mut t = Tansu {
            child: None,
            port,
            // tansu resolves the sqlite path against its working directory.
            db: "sqlite://tansu.db".into(),
            dir: dir.to_path_buf(),
        };
        t.restart();
        t
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &self.db])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        let deadline = Instant::now() + CATCH_UP;
        while std::net::TcpStream::connect(self.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}",
                self.addr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_status(cg: &Clickgate, path: &str, want: u16) {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let r = cg.request("GET", path, "");
        if r.status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} stayed {} ({})",
            r.status,
            r.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn broker_down_mid_traffic_then_back_loses_nothing_and_keeps_order() {
    let tdir = tempfile::tempdir().unwrap();
    let mut tansu = Tansu::start(tdir.path());
    let brokers = tansu.addr();
    let topic = unique_topic("outage");
    let cg = Clickgate::dataplane(&kafka_args(&brokers, &topic, "disk"));
    let mut ids = send_events(&cg, 0, 300);
    tansu.stop();
    // ack=disk keeps taking traffic: the records wait in the local log.
    ids.extend(send_events(&cg, 300, 300));
    assert_eq!(ids.len(), 600);
    wait_status(&cg, "/readyz", 503);
    tansu.restart();
    let want: HashSet<String> = ids.into_iter().collect();
    let recs = wait_for_all(&brokers, &topic, &want);
    check_exactly_once(&recs, 4);
    check_order(&recs);
    wait_status(&cg, "/readyz", 200);
}

fn kill9_keeps_every_202(ack: &str) {
    let brokers = broker();
    let topic = unique_topic(&format!("kill9_{ack}"));
    let mut cg = Clickgate::dataplane(&kafka_args(&brokers, &topic, ack));
    let mut ids = send_events(&cg, 0, 400);
    // Kill while the forwarder is likely mid-flight, with no clean stop.
    ids.extend(send_events(&cg, 400, 200));
    cg.kill9();
    cg.restart();
    ids.extend(send_events(&cg, 600, 100));
    let want: HashSet<String> = ids.into_iter().collect();
    assert_eq!(want.len(), 700);
    let recs = wait_for_all(&brokers, &topic, &want);
    check_exactly_once(&recs, 4);
    check_order(&recs);
}

#[test]
fn kill9_with_ack_disk_keeps_every_202_once() {
    kill9_keeps_every_202("disk");
}

#[test]
fn kill9_with_ack_kafka_keeps_every_202_once() {
    kill9_keeps_every_202("kafka");
}

/// Kills the child on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real broker (tansu) reached only through TLS: a TLS endpoint (socat,
/// `CLICKGATE_TEST_SOCAT`) with a certificate for `localhost` in front of it, advertised in
/// the broker's metadata. With `user`, the broker requires a SCRAM-SHA-512 login and knows
/// that (name, password). Returns the processes, `localhost:<tls port>` and the CA file.
fn tls_broker(dir: &Path, user: Option<(&str, &str)>) -> (Vec<Reaped>, String, String) {
    let socat = std::env::var("CLICKGATE_TEST_SOCAT").unwrap_or_else(|_| {
        panic!("CLICKGATE_TEST_SOCAT is not set: run the tests with scripts/test.sh (it installs socat)")
    });
    let (cert, key) = common::localhost_cert(dir);
    // socat takes the certificate and its key in one file.
    let both = dir.join("both.pem");
    let pem = std::fs::read_to_string(&cert).unwrap() + &std::fs::read_to_string(&key).unwrap();
    std::fs::write(&both, pem).unwrap();
    let (plain, tls) = (free_port(), free_port());
    let wait = |port: u16| {
        let deadline = Instant::now() + CATCH_UP;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "port {port} never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let broker = |auth: bool| {
        let mut cmd = Command::new(tansu_bin());
        cmd.args(["broker", "--listener-url"])
            .arg(format!("tcp://127.0.0.1:{plain}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://localhost:{tls}"))
            .args(["--storage-engine", "sqlite://tansu.db"]);
        if auth {
            cmd.arg("--authentication");
        }
        let child = cmd
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tansu");
        wait(plain);
        Reaped(child)
    };
    let mut procs = Vec::new();
    match user {
        None => procs.push(broker(false)),
        Some((name, password)) => {
            // Users are created on an open broker, which then restarts requiring logins.
            let open = broker(false);
            let out = Command::new(tansu_bin())
                .args(["user", "create", "--mechanism", "scram512", "--broker"])
                .arg(format!("tcp://127.0.0.1:{plain}"))
                .args([name, password])
                .output()
                .expect("tansu user create");
            assert!(out.status.success(), "{out:?}");
            drop(open);
            procs.push(broker(true));
        }
    }
    let front = Command::new(socat)
        .arg(format!(
            "OPENSSL-LISTEN:{tls},bind=127.0.0.1,reuseaddr,fork,cert={},verify=0",
            both.display()
        ))
        .arg(format!("TCP:127.0.0.1:{plain}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn socat");
    procs.push(Reaped(front));
    wait(tls);
    (
        procs,
        format!("localhost:{tls}"),
        cert.display().to_string(),
    )
}

/// A `clickgate dataplane` that must fail to start with these extra flags.
fn start_fails(brokers: &str, extra: &[&str]) -> std::process::Output {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(common::BIN)
        .args(["dataplane", "--data-dir"])
        .arg(tmp.path())
        .args(["--ingest-addr", "127.0.0.1:0", "--cores", "1"])
        .args(kafka_args(brokers, &unique_topic("refused"), "kafka"))
        .args(["--kafka-start-timeout-ms", "3000"])
        .args(extra)
        .env_remove("CLICKGATE_CONFIG")
        .env_remove("CLICKGATE_KAFKA_SASL_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "started: {out:?}");
    out
}

/// `kafka_security_protocol = ssl` against a broker behind TLS, with the CA given by
/// `--kafka-ssl-ca`: with `ack = kafka` every 202 is the broker's acknowledgement over
/// TLS; every event is read back over TLS once. Without the CA the box cannot start.
#[test]
fn events_reach_the_topic_over_tls() {
    let tdir = tempfile::tempdir().unwrap();
    let (_procs, brokers, ca) = tls_broker(tdir.path(), None);
    let topic = unique_topic("tls");
    let mut args = kafka_args(&brokers, &topic, "kafka");
    args.extend(["--kafka-security-protocol", "ssl", "--kafka-ssl-ca", &ca]);
    let cg = Clickgate::dataplane(&args);
    let ids = send_events(&cg, 0, 300);
    assert_eq!(ids.len(), 300, "not every batch was acknowledged");
    let want: HashSet<String> = ids.into_iter().collect();
    let client = [
        ("security.protocol", "ssl".to_string()),
        ("ssl.ca.location", ca.clone()),
    ];
    let recs = wait_for_all_with(&brokers, &topic, &want, &client);
    check_exactly_once(&recs, 4);
    // The system's trust store does not know the CA.
    start_fails(&brokers, &["--kafka-security-protocol", "ssl"]);
}

/// `sasl_ssl` with SCRAM-SHA-512 against a broker that requires a login: the right
/// password gets every event in once; a wrong one cannot start.
#[test]
fn events_reach_the_topic_over_tls_with_a_scram_login() {
    let tdir = tempfile::tempdir().unwrap();
    let (user, password) = ("clickgate", "a-long-scram-password");
    let (_procs, brokers, ca) = tls_broker(tdir.path(), Some((user, password)));
    let topic = unique_topic("sasl");
    let mut args = kafka_args(&brokers, &topic, "kafka");
    args.extend([
        "--kafka-security-protocol",
        "sasl_ssl",
        "--kafka-ssl-ca",
        &ca,
        "--kafka-sasl-username",
        user,
        "--kafka-sasl-password",
        password,
    ]);
    let cg = Clickgate::dataplane(&args);
    let ids = send_events(&cg, 0, 300);
    assert_eq!(ids.len(), 300, "not every batch was acknowledged");
    let want: HashSet<String> = ids.into_iter().collect();
    let client = [
        ("security.protocol", "sasl_ssl".to_string()),
        ("ssl.ca.location", ca.clone()),
        ("sasl.mechanism", "SCRAM-SHA-512".to_string()),
        ("sasl.username", user.to_string()),
        ("sasl.password", password.to_string()),
    ];
    let recs = wait_for_all_with(&brokers, &topic, &want, &client);
    check_exactly_once(&recs, 4);
    start_fails(
        &brokers,
        &[
            "--kafka-security-protocol",
            "sasl_ssl",
            "--kafka-ssl-ca",
            &ca,
            "--kafka-sasl-username",
            user,
            "--kafka-sasl-password",
            "not-the-password",
        ],
    );
}

/// Chaos: the broker down long enough for the undelivered log to reach its retention
/// bound. Ingest then answers 503 (the records a consumer still needs are never deleted),
/// `/readyz` is not ready; when the broker returns, the forwarder delivers, retention
/// frees the delivered segments, ingest answers 202 again — and every 202 is in the topic
/// once.
#[test]
fn chaos_broker_down_until_log_retention_is_full_then_recovery() {
    let _one = chaos_one_at_a_time();
    let tdir = tempfile::tempdir().unwrap();
    let mut tansu = Tansu::start(tdir.path());
    let brokers = tansu.addr();
    let topic = unique_topic("retention_full");
    let mut args = kafka_args(&brokers, &topic, "disk");
    args.extend([
        "--cores",
        "1",
        "--log-segment-bytes",
        "1048576",
        "--log-retention-bytes",
        "2097152",
        "--rate-limit-events-per-sec",
        "10000000",
    ]);
    let cg = Clickgate::dataplane(&args);
    let mut ids = send_events(&cg, 0, 200);
    assert_eq!(ids.len(), 200);
    let want: HashSet<String> = ids.iter().cloned().collect();
    wait_for_all(&brokers, &topic, &want);
    tansu.stop();
    // Batches of 50 until the log is at its bound and refuses (send_events stops at the
    // first non-202); 2 MiB of records is about 7,000 events.
    let mut next = 1_000u64;
    loop {
        let got = send_events(&cg, next, 2_000);
        let full = got.len() < 2_000;
        ids.extend(got);
        next += 2_000;
        if full {
            break;
        }
        assert!(next < 100_000, "the log never reached its retention bound");
    }
    let r = cg.request("POST", "/v1/click", &event(&uuid(999_999), 1, |_| {}));
    assert_eq!(r.status, 503, "{}", r.body);
    wait_status(&cg, "/readyz", 503);
    tansu.restart();
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let got = send_events(&cg, next, 50);
        next += 50;
        if !got.is_empty() {
            ids.extend(got);
            break;
        }
        assert!(Instant::now() < deadline, "ingest never took clicks again");
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_status(&cg, "/readyz", 200);
    let want: HashSet<String> = ids.into_iter().collect();
    let recs = wait_for_all(&brokers, &topic, &want);
    check_exactly_once(&recs, 4);
    check_order(&recs);
}

/// Chaos: ten rounds of load from a second thread while the dataplane is killed with
/// SIGKILL at a different moment of each round and restarted on the same data directory.
/// Every event answered 202 in any round reaches the topic, and no event and no log record
/// is there twice.
fn kill9_in_a_loop_under_load(ack: &str) {
    let _one = chaos_one_at_a_time();
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let brokers = broker();
    let topic = unique_topic(&format!("kill9_loop_{ack}"));
    let mut cg = Clickgate::dataplane(&kafka_args(&brokers, &topic, ack));
    let mut acked: HashSet<String> = HashSet::new();
    for round in 0..10u64 {
        let addr = cg.ingest;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let loader = {
            let stop = stop.clone();
            let accepted = accepted.clone();
            std::thread::spawn(move || {
                let mut ok = Vec::new();
                let mut n = round * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    let ids: Vec<String> = (n..n + 20).map(uuid).collect();
                    n += 20;
                    let body: String = ids
                        .iter()
                        .map(|id| event(id, 1 + n % 13, |_| {}) + "\n")
                        .collect();
                    if let Some(r) = common::try_request(addr, "POST", "/v1/clicks", &body) {
                        if r.status == 202 {
                            assert_eq!(r.json()["accepted"], ids.len(), "{}", r.body);
                            ok.extend(ids);
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                ok
            })
        };
        // Killed once traffic flows (the first 202 with ack=kafka waits for the producer's
        // start), at a different moment of each round.
        let deadline = Instant::now() + CATCH_UP;
        while accepted.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "round {round}: no 202 at all");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50 + 37 * round));
        cg.kill9();
        stop.store(true, Ordering::Relaxed);
        let ok = loader.join().expect("loader");
        assert!(
            !ok.is_empty(),
            "round {round}: no event accepted before the kill"
        );
        acked.extend(ok);
        cg.restart();
    }
    acked.extend(send_events(&cg, 50_000_000, 100));
    let recs = wait_for_all(&brokers, &topic, &acked);
    check_exactly_once(&recs, 4);
    check_order(&recs);
}

#[test]
fn chaos_kill9_loop_with_ack_disk_keeps_every_202_once() {
    kill9_in_a_loop_under_load("disk");
}

#[test]
fn chaos_kill9_loop_with_ack_kafka_keeps_every_202_once() {
    kill9_in_a_loop_under_load("kafka");
}

/// The 5m buckets of campaigns 1..=13 over the last hour, as the query API answers them.
fn campaign_buckets(cg: &Clickgate) -> Vec<serde_json::Value> {
    let to = now_ms() + 600_000;
    let from = to - 7_200_000;
    (1..=13)
        .map(|c| {
            let r = cg.query(&format!(
                "/v1/campaigns/{c}/metrics?window=5m&from={from}&to={to}"
            ));
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["buckets"].clone()
        })
        .collect()
}

fn total_clicks(buckets: &[serde_json::Value]) -> u64 {
    buckets
        .iter()
        .flat_map(|b| b.as_array().unwrap().iter())
        .map(|b| b["clicks"].as_u64().unwrap())
        .sum()
}

/// `campaign_buckets` once their clicks add up to `want` (within `CATCH_UP`).
fn buckets_at_total(cg: &Clickgate, want: u64) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let b = campaign_buckets(cg);
        if total_clicks(&b) == want {
            return b;
        }
        assert!(Instant::now() < deadline, "counts never reached {want}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `clickgate replay --from 0` into the controlplane of `data_dir`: (records, duplicates)
/// of its summary; fails the test, with the output, when it does not succeed.
fn replay(data_dir: &Path, args: &[&str]) -> (u64, u64) {
    let out = Command::new(common::BIN)
        .arg("replay")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--from", "0"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    (
        summary["records"].as_u64().unwrap(),
        summary["duplicates"].as_u64().unwrap(),
    )
}

#[test]
fn replay_of_the_topic_gives_the_same_aggregates_as_live() {
    let brokers = broker();
    let topic = unique_topic("replay");
    let live = Clickgate::run(&kafka_args(&brokers, &topic, "kafka"));
    let ids = send_events(&live, 0, 650);
    assert_eq!(ids.len(), 650);
    // Retries: duplicates live (bloom) and in the replay (exact), counted by neither.
    let retry: String = ids[..20]
        .iter()
        .map(|id| event(id, 3, |_| {}) + "\n")
        .collect();
    assert_eq!(live.request("POST", "/v1/clicks", &retry).status, 202);
    let live_buckets = buckets_at_total(&live, 650);
    // A fresh store, filled only by the replay of the topic.
    let fresh = Clickgate::run(&[]);
    let group = format!("{topic}-replay");
    assert_eq!(
        replay(
            &fresh.data_dir,
            &[
                "--kafka-brokers",
                &brokers,
                "--kafka-topic",
                &topic,
                "--group",
                &group
            ]
        ),
        (670, 20)
    );
    assert_eq!(campaign_buckets(&fresh), live_buckets);
}

/// Without a broker the replay reads the local log of every core. Replayed into the
/// running store (which counts it again), every campaign doubles exactly: the retries,
/// sent under another campaign and read on whichever core took them, count for nobody.
#[test]
fn replay_of_the_local_log_counts_each_event_once_more() {
    let cg = Clickgate::run(&[]);
    let mut ids = Vec::new();
    // One connection per batch: the batches land on both cores.
    for k in 0..13 {
        ids.extend(send_events(&cg, k * 50, 50));
    }
    assert_eq!(ids.len(), 650);
    let retry: String = ids
        .iter()
        .step_by(30)
        .map(|id| event(id, 3, |_| {}) + "\n")
        .collect();
    for _ in 0..2 {
        let r = cg.connect().request("POST", "/v1/clicks", &retry);
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(r.json()["accepted"], 0, "{}", r.body);
    }
    let live = buckets_at_total(&cg, 650);
    assert_eq!(replay(&cg.data_dir, &[]), (650 + 44, 44));
    let doubled = buckets_at_total(&cg, 1300);
    let per_campaign = |b: &[serde_json::Value]| -> Vec<u64> {
        b.iter()
            .map(|c| total_clicks(std::slice::from_ref(c)))
            .collect()
    };
    assert_eq!(per_campaign(&live), vec![50; 13]);
    assert_eq!(per_campaign(&doubled), vec![100; 13]);
}
