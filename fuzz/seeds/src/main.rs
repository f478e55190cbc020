//! Writes the seed corpus of every fuzz target (see fuzz/Cargo.toml) into the directory
//! given (default `fuzz/corpus`): `<dir>/<target>/<name>`. Deterministic, so rerunning it
//! rewrites the same files.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use clickgate_core::agg::{Counters, Dim, Key};
use clickgate_core::hll::Hll;
use clickgate_core::window::Window;
use clickgate_core::{Click, Device, EventId};
use clickgate_proto::frames::{
    encode_ack, encode_delta, encode_store_chunk, Ack, AppliedMark, CampaignOwner, DeltaEntry,
    DeltaFrame, StoreChunk, FRAMES_VERSION,
};
use clickgate_proto::segment::{encode_frame, SegmentHeader, HEADER_BYTES};
use clickgate_proto::{raw_pb, record, Flags};

struct Out(PathBuf);

impl Out {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.0.join(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    }
}

const SAMPLE: &str = r#"{"event_id":"6f1c2f4e-8a3b-4c1d-9e2f-0a1b2c3d4e5f","ts":1764201600123,"campaign_id":12345,"ad_id":678,"publisher_id":42,"advertiser_id":7,"user_id":"u-88121","ip":"203.0.113.7","user_agent":"Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)","country":"US","device":"mobile","cost_micros":500000}"#;

fn click(n: u8, v6: bool) -> Click<'static> {
    Click {
        event_id: EventId([n; 16]),
        ts_ms: 1_764_201_600_123,
        campaign_id: 12345 + n as u64,
        ad_id: 678,
        publisher_id: 42,
        advertiser_id: 7,
        user_id: Cow::Owned(format!("u-{n}")),
        ip: if v6 {
            "2001:db8::7".parse().unwrap()
        } else {
            "203.0.113.7".parse().unwrap()
        },
        user_agent: Cow::Borrowed("Mozilla/5.0"),
        country: *b"US",
        device: Device::Mobile,
        cost_micros: 500_000,
    }
}

fn delta(delta_id: u64, users: bool) -> DeltaFrame {
    let mut hll = Hll::new();
    if users {
        for h in 1..20u64 {
            hll.insert_hash(h.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
    }
    let bucket = Window::M5.bucket_start(1_764_201_600_123);
    let entries = [Dim::All, Dim::Country(*b"US"), Dim::Ad(678)]
        .into_iter()
        .map(|dim| {
            let key = Key {
                campaign_id: 12345,
                window: Window::M5,
                bucket_start: bucket,
                dim,
            };
            let c = Counters {
                clicks: 2,
                cost_micros: 1_000_000,
                fraud_clicks: 1,
            };
            DeltaEntry::from_parts(&key, &c, &hll)
        })
        .collect();
    DeltaFrame {
        version: FRAMES_VERSION,
        box_id: 1,
        instance_id: 2,
        core: 0,
        delta_id,
        log_lsn: 100 * delta_id,
        start_lsn: 0,
        entries,
        owners: vec![CampaignOwner {
            campaign_id: 12345,
            advertiser_id: 7,
        }],
    }
}

fn chunk() -> StoreChunk {
    StoreChunk {
        version: FRAMES_VERSION,
        applied: vec![AppliedMark {
            box_id: 1,
            instance_id: 2,
            core: 0,
            delta_id: 1,
            log_lsn: 100,
            seen_ms: 1_764_201_600_000,
        }],
        entries: delta(1, true).entries,
        owners: delta(1, false).owners,
    }
}

/// A frame archive without its `u32` length prefix.
fn body(framed: Vec<u8>) -> Vec<u8> {
    framed[4..].to_vec()
}

fn delta_body(id: u64, users: bool) -> Vec<u8> {
    let mut v = Vec::new();
    encode_delta(&delta(id, users), &mut v).unwrap();
    body(v)
}

fn chunk_body() -> Vec<u8> {
    let mut v = Vec::new();
    encode_store_chunk(&chunk(), &mut v).unwrap();
    body(v)
}

/// `u16` length + body records (the store_wal and redis_outbox input format).
fn records(bodies: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bodies {
        out.extend_from_slice(&(b.len() as u16).to_le_bytes());
        out.extend_from_slice(b);
    }
    out
}

fn http(out: &Out) {
    let t = "http_framing";
    let req = |method: &str, path: &str, headers: &str, body: &str| {
        let cl = if body.is_empty() && method == "GET" {
            String::new()
        } else {
            format!("Content-Length: {}\r\n", body.len())
        };
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{cl}{headers}\r\n{body}")
    };
    let single = req("POST", "/v1/click", "", SAMPLE);
    out.put(t, "click", format!("\x00{single}").as_bytes());
    let batch = format!("{SAMPLE}\n\n{SAMPLE}\r\n");
    let pipelined = format!(
        "{single}{}{}",
        req("GET", "/healthz", "", ""),
        req("POST", "/v1/clicks", "Expect: 100-continue\r\n", &batch)
    );
    out.put(t, "pipelined", format!("\x00{pipelined}").as_bytes());
    // The same, read in pieces of 1, 7 and 300 bytes.
    let mut cut = vec![3u8, 1, 0, 7, 0, 44, 1];
    cut.extend_from_slice(pipelined.as_bytes());
    out.put(t, "pipelined_cut", &cut);
    out.put(
        t,
        "http10_keepalive",
        b"\x00GET /metrics?x=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /readyz HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    out.put(
        t,
        "chunked",
        b"\x00POST /v1/clicks HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    out.put(
        t,
        "conflicting_length",
        b"\x00POST /v1/click HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    );
    out.put(
        t,
        "too_long_body",
        b"\x00POST /v1/clicks HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
    );
    let mut big = b"\x00GET / HTTP/1.1\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 600));
    big.extend_from_slice(b"\r\n\r\n");
    out.put(t, "head_too_large", &big);
    out.put(t, "garbage", b"\x00GARBAGE\r\n\r\n");
}

fn clicks(out: &Out) {
    let t = "click_json";
    out.put(t, "valid", SAMPLE.as_bytes());
    out.put(
        t,
        "ipv6_escapes",
        SAMPLE
            .replace("203.0.113.7", "2001:db8::1")
            .replace("u-88121", "u-\\u00e9\\n")
            .replace("\"US\"", "\"DE\"")
            .replace("mobile", "ctv")
            .as_bytes(),
    );
    out.put(
        t,
        "batch",
        format!(
            "{SAMPLE}\n\n  \r\n{}\n{{\"event_id\":1}}\r\n",
            SAMPLE.replace("12345", "9")
        )
        .as_bytes(),
    );
    out.put(
        t,
        "future_ts",
        SAMPLE.replace("1764201600123", "9764201600123").as_bytes(),
    );
    out.put(
        t,
        "missing_field",
        SAMPLE.replace("\"ad_id\":678,", "").as_bytes(),
    );
    out.put(
        t,
        "unknown_field",
        SAMPLE
            .replace("{", "{\"extra\":[1,{\"a\":null}],")
            .as_bytes(),
    );
    out.put(t, "truncated", &SAMPLE.as_bytes()[..SAMPLE.len() / 2]);
    out.put(t, "ip_only", b"010.0.0.1");
}

fn raw(out: &Out) {
    let t = "raw_record";
    let mut r = Vec::new();
    record::encode(
        &click(1, false),
        Flags(Flags::DUPLICATE),
        1_764_201_600_200,
        &[],
        &mut r,
    )
    .unwrap();
    out.put(t, "record_v4", &r);
    let mut r6 = Vec::new();
    record::encode(
        &click(2, true),
        Flags(Flags::FRAUD),
        1_764_201_600_200,
        &["ip_rate", "bad_ua"],
        &mut r6,
    )
    .unwrap();
    out.put(t, "record_v6_rules", &r6);
    let mut pb = Vec::new();
    raw_pb::from_log_record(&r6, &mut pb).unwrap();
    out.put(t, "protobuf", &pb);
    let mut pb1 = Vec::new();
    raw_pb::from_log_record(&r, &mut pb1).unwrap();
    out.put(t, "protobuf_v4", &pb1);
    out.put(t, "truncated", &r6[..r6.len() - 3]);
    // Strings one past their bounds (the decoder refuses them: the encoders would not
    // write them back).
    let uid_at = 2 + 8 + 16 + 6 * 8 + 1 + 4 + 2 + 1;
    let mut long_uid = r[..uid_at].to_vec();
    long_uid.push(65);
    long_uid.extend(std::iter::repeat_n(b'u', 65));
    long_uid.extend_from_slice(&r[uid_at + 1 + r[uid_at] as usize..]);
    out.put(t, "record_long_user_id", &long_uid);
    let mut long_rule = r6[..r6.len() - 7].to_vec();
    long_rule.push(65);
    long_rule.extend(std::iter::repeat_n(b'r', 65));
    out.put(t, "record_long_rule", &long_rule);
}

fn segments(out: &Out) {
    let t = "segment_reader";
    let payloads: [&[u8]; 3] = [b"first record", b"2", &[7u8; 40]];
    // Framed mode: ctl bit 0, five edit bytes, then u8-length payloads.
    let framed = |ctl: u8, edits: [u8; 5]| {
        let mut v = vec![ctl];
        v.extend_from_slice(&edits);
        for p in payloads {
            v.push(p.len() as u8);
            v.extend_from_slice(p);
        }
        v
    };
    out.put(t, "framed", &framed(1, [0; 5]));
    out.put(t, "framed_sealed", &framed(1 | 8 | 16, [0; 5]));
    out.put(t, "framed_gap", &framed(1 | 8, [0; 5]));
    // Cut 4096 + 30 bytes in: inside the second frame.
    out.put(t, "framed_cut", &framed(1 | 2, [0x10, 0x1e, 0, 0, 0]));
    // One byte of the first frame's payload overwritten, then sealed: corruption.
    out.put(
        t,
        "framed_flip_sealed",
        &framed(1 | 4 | 8 | 16, [0, 0, 0x10, 0x0a, b'X']),
    );
    // Raw mode: a whole file, header included.
    let mut seg = vec![0u8; HEADER_BYTES as usize];
    SegmentHeader {
        core: 0,
        base_lsn: 0,
        created_ms: 1,
    }
    .encode(&mut seg);
    for p in payloads {
        encode_frame(p, &mut seg);
    }
    seg.extend_from_slice(&[0u8; 64]);
    let mut raw = vec![0u8];
    raw.extend_from_slice(&seg);
    out.put(t, "raw_file", &raw);
    let mut bad_magic = raw.clone();
    bad_magic[1] = b'X';
    out.put(t, "raw_bad_magic", &bad_magic);
    let mut huge_len = raw[..1 + HEADER_BYTES as usize].to_vec();
    huge_len.extend_from_slice(&u32::MAX.to_le_bytes());
    huge_len.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    out.put(t, "raw_huge_len", &huge_len);
}

fn frames(out: &Out) {
    let t = "delta_frames";
    let mut d = Vec::new();
    encode_delta(&delta(1, true), &mut d).unwrap();
    out.put(t, "delta", &d);
    let mut e = Vec::new();
    encode_delta(&delta(2, false), &mut e).unwrap();
    let mut a = Vec::new();
    encode_ack(
        &Ack {
            core: 0,
            delta_id: 2,
        },
        &mut a,
    )
    .unwrap();
    out.put(t, "ack", &a);
    let mut c = Vec::new();
    encode_store_chunk(&chunk(), &mut c).unwrap();
    out.put(t, "store_chunk", &c);
    let mut stream = d.clone();
    stream.extend_from_slice(&a);
    stream.extend_from_slice(&e);
    stream.extend_from_slice(&c);
    out.put(t, "stream", &stream);
    out.put(t, "too_long", &[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]);
    out.put(t, "truncated", &d[..d.len() - 5]);
}

fn store(out: &Out) {
    let t = "store_wal";
    let (d1, d2, d3) = (
        delta_body(1, true),
        delta_body(2, false),
        delta_body(3, true),
    );
    let mut v = vec![0u8];
    v.extend(records(&[&d1, &d2]));
    out.put(t, "wal", &v);
    let mut torn = v.clone();
    torn.extend_from_slice(&[0xff, 0x7f, 1, 2, 3]);
    out.put(t, "wal_torn", &torn);
    let mut s = vec![1u8];
    s.extend(records(&[&chunk_body(), &d1, &d3]));
    out.put(t, "snapshot_and_wal", &s);
    let mut dup = vec![0u8];
    dup.extend(records(&[&d2, &d2, &d1]));
    out.put(t, "duplicates", &dup);
}

fn outbox(out: &Out) {
    let t = "redis_outbox";
    let (d1, d2) = (delta_body(1, false), delta_body(2, false));
    // The newer segment starts at the record whose length has bit 15 set.
    let newer = |b: &[u8]| {
        let mut v = ((b.len() as u16) | 0x8000).to_le_bytes().to_vec();
        v.extend_from_slice(b);
        v
    };
    let mut v = vec![0u8];
    v.extend(records(&[&d1, b"x"]));
    v.extend(newer(&d2));
    out.put(t, "two_segments", &v);
    let mut c = vec![1u8, 0, 8];
    c.extend(records(&[b"abc", b"", b"defgh"]));
    c.extend(newer(b"newer"));
    out.put(t, "cursor", &c);
    let mut torn = vec![0u8];
    torn.extend(records(&[b"abc"]));
    torn.extend_from_slice(&[0xff, 0x7f, 9, 9]);
    out.put(t, "torn_newest", &torn);
    // A corrupt record in the older segment that claims 4 GiB.
    let mut big = vec![0u8];
    big.extend(records(&[b"ok"]));
    let mut raw = u32::MAX.to_le_bytes().to_vec();
    raw.extend_from_slice(&[0; 4]);
    big.extend_from_slice(&(raw.len() as u16 + 1).to_le_bytes());
    big.extend_from_slice(&raw);
    out.put(t, "corrupt_older", &big);
}

fn queries(out: &Out) {
    let t = "query_api";
    let q = |ctl: u8, target: &str| {
        let mut v = vec![ctl];
        v.extend_from_slice(target.as_bytes());
        v
    };
    out.put(t, "metrics", &q(0, "/v1/campaigns/123/metrics?window=5m"));
    out.put(
        t,
        "metrics_range",
        &q(0, "/v1/campaigns/124/metrics?window=1h&from=2025-11-27T00:00:00Z&to=1764205200000&country=US"),
    );
    out.put(
        t,
        "percent_id",
        &q(1 | 4, "/v1/campaigns/%31%32%33/metrics?window=5m&ad_id=40"),
    );
    out.put(
        t,
        "plus_id",
        &q(1 | 4, "/v1/campaigns/+124/metrics?window=1d"),
    );
    out.put(
        t,
        "zero_id",
        &q(1 | 2, "/v1/campaigns/0123/metrics?window=5m&device=mobile"),
    );
    out.put(t, "top", &q(0, "/v1/top?window=5m&n=3"));
    out.put(
        t,
        "top_advertiser",
        &q(1 | 4, "/v1/top?window=1h&at=2025-11-27T00:59:59.5%2B01:00"),
    );
    out.put(
        t,
        "bad_query",
        &q(0, "/v1/campaigns/5/metrics?window=5m&from=10&to=5&&=x&%ZZ"),
    );
    out.put(t, "no_key", &q(1, "/v1/campaigns/5/metrics?window=5m"));
    out.put(t, "wrong_key", &q(1 | 6, "/metrics"));
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("fuzz/corpus"), PathBuf::from);
    let out = Out(dir);
    http(&out);
    clicks(&out);
    raw(&out);
    segments(&out);
    frames(&out);
    store(&out);
    outbox(&out);
    queries(&out);
    eprintln!("seeds written under {}", Path::new(&out.0).display());
}
