//! Freshness probe: while the load runs, one thread posts a single event with a campaign
//! id of its own every `interval`, and once it is answered 202 polls the query API until
//! a bucket of that campaign shows it (docs/api.md: accepted-to-queryable).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::net::mono_ns;
use crate::resp::{parse_counts, parse_response};

/// Campaign ids of probes start here (far above any load campaign id).
pub const PROBE_CAMPAIGN_BASE: u64 = 9_000_000_000;
/// How often a pending probe's campaign is queried.
const POLL_NS: u64 = 5_000_000;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct FreshCfg {
    pub ingest: SocketAddr,
    pub ingest_host: String,
    pub query: SocketAddr,
    pub query_host: String,
    pub interval_ns: u64,
    pub timeout_ns: u64,
    pub start_ns: u64,
    pub warm_end_ns: u64,
    pub end_ns: u64,
    /// Per-run: probe campaign ids are `PROBE_CAMPAIGN_BASE + run_base + n`, so probes of
    /// earlier runs against the same server are never mistaken for this run's.
    pub run_base: u64,
}

pub struct FreshStats {
    /// Accepted-to-visible latency (ns) of the probes answered 202 in the measured window.
    pub hist: Histogram<u64>,
    /// Probes answered 202 in the measured window that never became visible in time.
    pub timeouts: u64,
    /// Probe posts sent over the whole run (warm-up included).
    pub posted: u64,
    /// Probe events the server counted as accepted (202 bodies, whole run): the share of
    /// the server's own accepted counter that comes from the probe.
    pub events_accepted: u64,
    /// Probe posts not answered 202 with the event accepted (any status, I/O error).
    pub post_errors: u64,
    /// Metric queries that failed (non-200, I/O error, unparsable body).
    pub query_errors: u64,
}

/// A blocking keep-alive HTTP/1.1 connection that reconnects when needed.
struct Client {
    addr: SocketAddr,
    host: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Client {
    fn new(addr: SocketAddr, host: String) -> Self {
        Client {
            addr,
            host,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// One request; returns (status, body). Any I/O or parse error drops the connection.
    fn request(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        let r = self.try_request(method, path, body);
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    fn try_request(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            self.stream = Some(s);
            self.buf.clear();
        }
        let s = self.stream.as_mut().expect("connected");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if method == "POST" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        s.write_all(&bytes)?;
        loop {
            match parse_response(&self.buf) {
                Ok(Some(r)) => {
                    let out = (r.status, self.buf[r.body.clone()].to_vec());
                    self.buf.drain(..r.len);
                    if r.close {
                        self.stream = None;
                    }
                    return Ok(out);
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The probe event: valid, browser user agent, a documentation-range address.
pub fn probe_event(campaign: u64, n: u64, run: u64, ts: u64) -> String {
    format!(
        concat!(
            r#"{{"event_id":"{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}","ts":{},"campaign_id":{},"#,
            r#""ad_id":{},"publisher_id":1,"advertiser_id":1,"user_id":"probe-{}","#,
            r#""ip":"192.0.2.{}","user_agent":"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0","#,
            r#""country":"US","device":"desktop","cost_micros":1}}"#
        ),
        (run >> 32) as u32,
        (run >> 16) as u16,
        run as u16 & 0xfff,
        (n >> 48) as u16 & 0xfff,
        n & 0xffff_ffff_ffff,
        ts,
        campaign,
        1 + n % 1000,
        n,
        1 + n % 250,
    )
}

/// True when some bucket of a metrics answer shows at least one click.
pub fn shows_click(body: &[u8]) -> Option<bool> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let buckets = v.get("buckets")?.as_array()?;
    Some(
        buckets
            .iter()
            .any(|b| b.get("clicks").and_then(|c| c.as_u64()).unwrap_or(0) >= 1),
    )
}

struct Pending {
    campaign: u64,
    ts: u64,
    acked_ns: u64,
    counted: bool,
    next_poll_ns: u64,
}

pub fn run_probe(cfg: FreshCfg) -> FreshStats {
    let mut st = FreshStats {
        hist: Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram"),
        timeouts: 0,
        posted: 0,
        events_accepted: 0,
        post_errors: 0,
        query_errors: 0,
    };
    let mut ingest = Client::new(cfg.ingest, cfg.ingest_host.clone());
    let mut query = Client::new(cfg.query, cfg.query_host.clone());
    let mut pending: Vec<Pending> = Vec::new();
    let mut next_post = cfg.start_ns;
    let mut n = 0u64;
    let run = crate::gen::mix64(cfg.run_base ^ 0x5eed);
    loop {
        let now = mono_ns();
        if now >= next_post && now < cfg.end_ns {
            // Keep the schedule; after a slow post, skip the missed ticks.
            next_post = (next_post + cfg.interval_ns).max(now + cfg.interval_ns / 2);
            let campaign = PROBE_CAMPAIGN_BASE + cfg.run_base + n;
            let ts = wall_ms();
            let body = probe_event(campaign, n, run, ts);
            n += 1;
            st.posted += 1;
            match ingest.request("POST", "/v1/click", body.as_bytes()) {
                Ok((202, b)) if parse_counts(&b).accepted == 1 => {
                    st.events_accepted += 1;
                    let acked = mono_ns();
                    pending.push(Pending {
                        campaign,
                        ts,
                        acked_ns: acked,
                        counted: acked >= cfg.warm_end_ns && acked <= cfg.end_ns,
                        next_poll_ns: acked,
                    });
                }
                _ => st.post_errors += 1,
            }
        }
        let now = mono_ns();
        let mut i = 0;
        while i < pending.len() {
            let p = &mut pending[i];
            if now >= p.next_poll_ns {
                let path = format!(
                    "/v1/campaigns/{}/metrics?window=5m&from={}&to={}",
                    p.campaign,
                    p.ts.saturating_sub(300_000),
                    p.ts + 300_000
                );
                let seen = match query.request("GET", &path, b"") {
                    Ok((200, b)) => shows_click(&b).unwrap_or_else(|| {
                        st.query_errors += 1;
                        false
                    }),
                    Ok(_) | Err(_) => {
                        st.query_errors += 1;
                        false
                    }
                };
                let t = mono_ns();
                let p = &mut pending[i];
                if seen {
                    if p.counted {
                        st.hist
                            .saturating_record(t.saturating_sub(p.acked_ns).max(1));
                    }
                    pending.swap_remove(i);
                    continue;
                }
                if t.saturating_sub(p.acked_ns) >= cfg.timeout_ns {
                    if p.counted {
                        st.timeouts += 1;
                    }
                    pending.swap_remove(i);
                    continue;
                }
                p.next_poll_ns = t + POLL_NS;
            }
            i += 1;
        }
        let now = mono_ns();
        if now >= cfg.end_ns && pending.is_empty() {
            break;
        }
        let mut wake = pending
            .iter()
            .map(|p| p.next_poll_ns)
            .min()
            .unwrap_or(u64::MAX);
        if now < cfg.end_ns {
            wake = wake.min(next_post).min(cfg.end_ns);
        }
        if wake > now {
            std::thread::sleep(Duration::from_nanos((wake - now).min(50_000_000)));
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_event_is_valid_json() {
        let s = probe_event(
            PROBE_CAMPAIGN_BASE + 7,
            7,
            0x1234_5678_9abc_def0,
            1_764_201_600_000,
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["campaign_id"], PROBE_CAMPAIGN_BASE + 7);
        assert_eq!(v["event_id"].as_str().unwrap().len(), 36);
        assert_eq!(v["ts"], 1_764_201_600_000u64);
    }

    #[test]
    fn click_detection() {
        assert_eq!(
            shows_click(br#"{"campaign_id":1,"window":"5m","buckets":[]}"#),
            Some(false)
        );
        assert_eq!(
            shows_click(br#"{"buckets":[{"start":1,"clicks":0},{"start":2,"clicks":1}]}"#),
            Some(true)
        );
        assert_eq!(shows_click(b"not json"), None);
    }
}
