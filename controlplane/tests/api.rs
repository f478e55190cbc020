//! The query API end to end: an in-process controlplane fed hand-made delta frames over
//! its Unix socket, queried over HTTP, restarted on the same data directory.

use std::borrow::Cow;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use clickgate_controlplane::{Controlplane, ControlplaneConfig};
use clickgate_core::agg::{AggConfig, Aggregator};
use clickgate_core::window::Window;
use clickgate_core::{Click, Device, EventId};
use clickgate_proto::frames::{access_ack, encode_delta, frame_len, frames_from_delta, Ack};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[allow(clippy::too_many_arguments)]
fn click(
    campaign: u64,
    ts: u64,
    ad: u64,
    publisher: u64,
    country: &[u8; 2],
    device: Device,
    user: &str,
    cost: u64,
) -> Click<'static> {
    Click {
        event_id: EventId::default(),
        ts_ms: ts,
        campaign_id: campaign,
        ad_id: ad,
        publisher_id: publisher,
        advertiser_id: 7,
        user_id: Cow::Owned(user.to_string()),
        ip: "203.0.113.7".parse().unwrap(),
        user_agent: Cow::Borrowed(""),
        country: *country,
        device,
        cost_micros: cost,
    }
}

fn config(dir: &Path) -> ControlplaneConfig {
    ControlplaneConfig {
        data_dir: dir.to_path_buf(),
        query_addr: "127.0.0.1:0".parse().unwrap(),
        // Tests run in parallel: never the fixed default port.
        control_addr: "127.0.0.1:0".parse().unwrap(),
        ..ControlplaneConfig::default()
    }
}

async fn ship(socket: &Path, frames: &[Vec<u8>]) -> Vec<Ack> {
    let mut s = UnixStream::connect(socket).await.unwrap();
    for f in frames {
        s.write_all(f).await.unwrap();
    }
    let mut acks = Vec::new();
    for _ in frames {
        let mut p = [0u8; 4];
        s.read_exact(&mut p).await.unwrap();
        let mut body = vec![0u8; frame_len(p, 1 << 20).unwrap()];
        s.read_exact(&mut body).await.unwrap();
        acks.push(access_ack(&clickgate_proto::frames::aligned(&body)).unwrap());
    }
    acks
}

fn encode(agg: &mut Aggregator, core: u32, delta_id: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames_from_delta(11, 22, core, delta_id, &agg.drain_delta()) {
        encode_delta(&f, &mut out).unwrap();
    }
    out
}

async fn get(cp: &Controlplane, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(cp.query_addr()).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn get_json(cp: &Controlplane, path: &str) -> (u16, Value) {
    let (status, body) = get(cp, path).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
    )
}

/// (start, clicks, unique_users, cost_micros, fraud_clicks) of each bucket.
fn buckets(v: &Value) -> Vec<(u64, u64, u64, u64, u64)> {
    v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let f = |k: &str| b[k].as_u64().unwrap();
            (
                f("start"),
                f("clicks"),
                f("unique_users"),
                f("cost_micros"),
                f("fraud_clicks"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_in_numbers_out_and_back_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = Controlplane::start(config(tmp.path())).await.unwrap();
    let socket = cp.control_socket().to_path_buf();

    // Two 5m buckets an hour ago, in the same hour unless that hour boundary intervenes:
    // expectations are computed from the window math, not assumed.
    let now = now_ms();
    let b0 = Window::M5.bucket_start(now - 3_600_000);
    let b1 = b0 + 300_000;
    let mut core0 = Aggregator::new(AggConfig::default());
    let mut core1 = Aggregator::new(AggConfig::default());
    // Campaign 1: 3 billable in b0 (2 users), 1 fraud in b0, 2 billable in b1 on core 1.
    core0.add(
        &click(1, b0 + 1, 10, 5, b"US", Device::Mobile, "u1", 100),
        true,
        false,
    );
    core0.add(
        &click(1, b0 + 2, 10, 5, b"US", Device::Desktop, "u1", 100),
        true,
        false,
    );
    core0.add(
        &click(1, b0 + 3, 11, 6, b"FR", Device::Mobile, "u2", 300),
        true,
        false,
    );
    core0.add(
        &click(1, b0 + 4, 11, 6, b"FR", Device::Mobile, "bot", 300),
        false,
        true,
    );
    core0.add(
        &click(1, b0 + 5, 11, 6, b"FR", Device::Mobile, "dup", 300),
        false,
        false,
    );
    core1.add(
        &click(1, b1 + 9, 10, 5, b"US", Device::Mobile, "u3", 50),
        true,
        false,
    );
    core1.add(
        &click(1, b1 + 10, 12, 5, b"DE", Device::Tablet, "u1", 50),
        true,
        false,
    );
    // Campaign 2: one ad with 4 clicks in b0.
    for i in 0..4 {
        core1.add(
            &click(2, b0 + i, 20, 5, b"US", Device::Ctv, &format!("v{i}"), 1),
            true,
            false,
        );
    }
    let f0 = encode(&mut core0, 0, 1);
    let f1 = encode(&mut core1, 1, 1);
    let acks = ship(&socket, &[f0.clone(), f1.clone()]).await;
    assert_eq!(
        acks,
        vec![
            Ack {
                core: 0,
                delta_id: 1
            },
            Ack {
                core: 1,
                delta_id: 1
            }
        ]
    );
    // A resend (reconnect after a lost ack) is acked and not counted again.
    assert_eq!(
        ship(&socket, std::slice::from_ref(&f0)).await,
        vec![Ack {
            core: 0,
            delta_id: 1
        }]
    );

    let q = |extra: &str| {
        format!(
            "/v1/campaigns/1/metrics?window=5m&from={}&to={}{extra}",
            b0,
            b1 + 300_000
        )
    };
    let (st, v) = get_json(&cp, &q("")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["campaign_id"], 1);
    assert_eq!(v["window"], "5m");
    assert_eq!(buckets(&v), vec![(b0, 3, 2, 500, 1), (b1, 2, 2, 100, 0)]);
    // [from, to) on bucket starts: a `to` at b1 excludes b1.
    let (_, v) = get_json(
        &cp,
        &format!("/v1/campaigns/1/metrics?window=5m&from={b0}&to={b1}"),
    )
    .await;
    assert_eq!(buckets(&v), vec![(b0, 3, 2, 500, 1)]);
    // Filters.
    let (_, v) = get_json(&cp, &q("&country=FR")).await;
    assert_eq!(buckets(&v), vec![(b0, 1, 1, 300, 1)]);
    let (_, v) = get_json(&cp, &q("&device=mobile")).await;
    assert_eq!(buckets(&v), vec![(b0, 2, 2, 400, 1), (b1, 1, 1, 50, 0)]);
    let (_, v) = get_json(&cp, &q("&ad_id=10")).await;
    assert_eq!(buckets(&v), vec![(b0, 2, 1, 200, 0), (b1, 1, 1, 50, 0)]);
    let (_, v) = get_json(&cp, &q("&publisher_id=6")).await;
    assert_eq!(buckets(&v), vec![(b0, 1, 1, 300, 1)]);
    let (_, v) = get_json(&cp, &q("&country=JP")).await;
    assert_eq!(buckets(&v), vec![]);
    // Coarser windows are rolled up from the 5m entries.
    let h0 = Window::H1.bucket_start(b0);
    let (_, v) = get_json(
        &cp,
        &format!("/v1/campaigns/1/metrics?window=1h&from={h0}&to={}", b1 + 1),
    )
    .await;
    let want_h = if Window::H1.bucket_start(b1) == h0 {
        vec![(h0, 5, 3, 600, 1)]
    } else {
        vec![(h0, 3, 2, 500, 1), (b1, 2, 2, 100, 0)]
    };
    assert_eq!(buckets(&v), want_h);
    // Default range (last 24 h) includes both.
    let (_, v) = get_json(&cp, "/v1/campaigns/1/metrics?window=5m").await;
    assert_eq!(buckets(&v).len(), 2);
    // RFC 3339 bounds.
    let (st, _) = get_json(&cp, "/v1/campaigns/1/metrics?window=1d&from=2025-11-27T00:00:00Z&to=2025-11-28T00:00:00%2B01:00").await;
    assert_eq!(st, 200);

    // Top ads of b0: campaign 2's ad 20 (4), then campaign 1's ad 10 (2), ad 11 (1).
    let (st, v) = get_json(&cp, &format!("/v1/top?window=5m&n=2&at={}", b0 + 299_999)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["window"], "5m");
    assert_eq!(v["start"], b0);
    let ads: Vec<(u64, u64, u64)> = v["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["ad_id"].as_u64().unwrap(),
                a["campaign_id"].as_u64().unwrap(),
                a["clicks"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ads, vec![(20, 2, 4), (10, 1, 2)]);

    // Errors are 400 with a field.
    for (path, field) in [
        ("/v1/campaigns/abc/metrics?window=5m", "campaign_id"),
        ("/v1/campaigns/1/metrics?window=2m", "window"),
        ("/v1/campaigns/1/metrics", "window"),
        ("/v1/campaigns/1/metrics?window=5m&from=9&to=1", "from"),
        ("/v1/campaigns/1/metrics?window=5m&from=0", "to"),
        ("/v1/campaigns/1/metrics?window=5m&country=us", "country"),
        (
            "/v1/campaigns/1/metrics?window=5m&country=US&ad_id=1",
            "ad_id",
        ),
        ("/v1/top?window=5m&n=0", "n"),
    ] {
        let (st, v) = get_json(&cp, path).await;
        assert_eq!((st, v["field"].as_str()), (400, Some(field)), "{path}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let (st, v) = get_json(&cp, "/nope").await;
    assert_eq!((st, v["error"].as_str()), (404, Some("not found")));
    let (st, v) = get_json(&cp, "/healthz").await;
    assert_eq!((st, v["status"].as_str()), (200, Some("ok")));
    let (st, text) = get(&cp, "/metrics").await;
    assert_eq!(st, 200);
    for line in [
        "clickgate_delta_frames_applied_total 2",
        "clickgate_delta_frames_duplicate_total 1",
        "clickgate_late_dropped_total{window=\"5m\"} 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert_eq!(cp.applied_lsn(11, 0), Some(0));

    // Restart on the same directory: the snapshot written at shutdown brings it all back.
    cp.shutdown().await.unwrap();
    assert!(!socket.exists());
    let cp = Controlplane::start(config(tmp.path())).await.unwrap();
    let (_, v) = get_json(&cp, &q("")).await;
    assert_eq!(buckets(&v), vec![(b0, 3, 2, 500, 1), (b1, 2, 2, 100, 0)]);
    // Resends after the restart are still recognised.
    assert_eq!(
        ship(&socket, &[f1]).await,
        vec![Ack {
            core: 1,
            delta_id: 1
        }]
    );
    let (_, v) = get_json(&cp, &q("")).await;
    assert_eq!(buckets(&v), vec![(b0, 3, 2, 500, 1), (b1, 2, 2, 100, 0)]);
    cp.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_socket_closes_that_connection_only() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = Controlplane::start(config(tmp.path())).await.unwrap();
    let socket = cp.control_socket().to_path_buf();
    let mut bad = UnixStream::connect(&socket).await.unwrap();
    bad.write_all(&[8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        bad.read(&mut buf).await.unwrap(),
        0,
        "closed without an ack"
    );
    let mut huge = UnixStream::connect(&socket).await.unwrap();
    huge.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    assert_eq!(huge.read(&mut buf).await.unwrap(), 0);

    let mut agg = Aggregator::new(AggConfig::default());
    agg.add(
        &click(3, now_ms() - 1000, 1, 1, b"US", Device::Other, "u", 9),
        true,
        false,
    );
    assert_eq!(
        ship(&socket, &[encode(&mut agg, 0, 5)]).await,
        vec![Ack {
            core: 0,
            delta_id: 5
        }]
    );
    let (_, text) = get(&cp, "/metrics").await;
    assert!(
        text.contains("clickgate_delta_frames_rejected_total 2"),
        "{text}"
    );
    // A second controlplane on the same socket is refused.
    let other = Controlplane::start(ControlplaneConfig {
        data_dir: tmp.path().join("other"),
        control_socket: Some(socket.clone()),
        ..config(tmp.path())
    })
    .await;
    assert!(other
        .err()
        .unwrap()
        .to_string()
        .contains("another controlplane"));
    cp.shutdown().await.unwrap();
}
