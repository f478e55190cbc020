//! The Redis side's settings.

use clickgate_core::window::Window;

/// The Redis side's settings, every bound with its unit last.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// One URL (single node) or several (a Redis Cluster's seed nodes); `rediss://` for
    /// TLS.
    pub urls: Vec<String>,
    /// The certificate authority (PEM) that `rediss://` servers are checked against;
    /// `None`: the system's trust store.
    pub tls_ca: Option<Vec<u8>>,
    /// Put in front of every key (tests, or several deployments on one Redis).
    pub key_prefix: String,
    pub flush_interval_ms: u64,
    /// Inner Redis commands per pipeline (round trip), at least 100.
    pub pipeline_commands_max: usize,
    /// Frames one flush round takes from the outbox, at most.
    pub flush_frames_max: usize,
    /// Bytes of frames one flush round takes from the outbox, at most (one frame more if
    /// a single frame is larger).
    pub flush_bytes_max: usize,
    /// A round's merged sketch for one key with at most this many non-zero registers is
    /// written as `PFADD` of one element per register (Redis touches only those
    /// registers); a larger one as one `PFMERGE` of the whole sketch. Chosen by
    /// measurement (bench/REDIS.md).
    pub pfadd_registers_max: usize,
    pub ttl_5m_secs: u64,
    pub ttl_1h_secs: u64,
    pub ttl_1d_secs: u64,
    /// Outbox bytes on disk, at most.
    pub spill_bytes_max: u64,
    pub retry_backoff_min_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// Bound on a connect and on each pipeline / query.
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            urls: Vec::new(),
            tls_ca: None,
            key_prefix: String::new(),
            flush_interval_ms: 500,
            pipeline_commands_max: 4000,
            flush_frames_max: 256,
            flush_bytes_max: 32 << 20,
            pfadd_registers_max: 2048,
            ttl_5m_secs: 24 * 3600,
            ttl_1h_secs: 7 * 24 * 3600,
            ttl_1d_secs: 90 * 24 * 3600,
            spill_bytes_max: 1 << 30,
            retry_backoff_min_ms: 100,
            retry_backoff_max_ms: 10_000,
            timeout_ms: 5_000,
        }
    }
}

impl RedisConfig {
    /// Checks every bound; the error names the setting as configured (`redis_*`).
    pub fn validate(&self) -> Result<(), String> {
        for u in &self.urls {
            if !(u.starts_with("redis://")
                || u.starts_with("rediss://")
                || u.starts_with("unix://"))
            {
                return Err(format!(
                    "redis_url: {u:?} is not a redis:// or rediss:// URL"
                ));
            }
        }
        let tls = self
            .urls
            .iter()
            .filter(|u| u.starts_with("rediss://"))
            .count();
        if tls != 0 && tls != self.urls.len() {
            return Err(
                "redis_url: mixes rediss:// and plain URLs; a cluster is all TLS or none".into(),
            );
        }
        if self.tls_ca.is_some() && tls == 0 {
            return Err("redis_tls_ca is set but no redis_url is rediss://".into());
        }
        let range = |name: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                return Err(format!("{name} must be in {lo}..={hi}, got {v}"));
            }
            Ok(())
        };
        range("redis_flush_interval_ms", self.flush_interval_ms, 1, 1000)?;
        range(
            "redis_pipeline_commands_max",
            self.pipeline_commands_max as u64,
            100,
            100_000,
        )?;
        range(
            "redis_ttl_5m_secs",
            self.ttl_5m_secs,
            24 * 3600,
            u64::MAX / 1000,
        )?;
        range("redis_ttl_1h_secs", self.ttl_1h_secs, 1, u64::MAX / 1000)?;
        range("redis_ttl_1d_secs", self.ttl_1d_secs, 1, u64::MAX / 1000)?;
        range(
            "redis_spill_bytes_max",
            self.spill_bytes_max,
            1 << 20,
            u64::MAX,
        )?;
        range(
            "redis_retry_backoff_min_ms",
            self.retry_backoff_min_ms,
            1,
            self.retry_backoff_max_ms,
        )?;
        range(
            "redis_retry_backoff_max_ms",
            self.retry_backoff_max_ms,
            1,
            3_600_000,
        )?;
        range("redis_timeout_ms", self.timeout_ms, 1, 600_000)?;
        Ok(())
    }

    /// `redis_url` as configured: one URL or a comma-separated list.
    pub fn parse_urls(s: &str) -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect()
    }

    pub(crate) fn ttl_ms(&self, w: Window) -> u64 {
        match w {
            Window::M5 => self.ttl_5m_secs,
            Window::H1 => self.ttl_1h_secs,
            Window::D1 => self.ttl_1d_secs,
        }
        .saturating_mul(1000)
    }

    /// When a bucket's keys expire: its end plus the window's TTL (as the embedded store
    /// counts retention from the bucket's end).
    pub fn expire_at_ms(&self, w: Window, start: u64) -> u64 {
        start
            .saturating_add(w.len_ms())
            .saturating_add(self.ttl_ms(w))
    }

    /// When the marks of a flush written at `now_ms` expire: after every key it can touch.
    pub(crate) fn marks_expire_at_ms(&self, now_ms: u64) -> u64 {
        now_ms
            .saturating_add(self.ttl_ms(Window::D1))
            .saturating_add(Window::D1.len_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            RedisConfig::parse_urls(" redis://a:1 , redis://b:2,"),
            ["redis://a:1", "redis://b:2"]
        );
        assert!(RedisConfig::parse_urls("").is_empty());
    }

    #[test]
    fn the_defaults_are_valid_and_bounds_name_their_setting() {
        let ok = RedisConfig {
            urls: vec!["redis://127.0.0.1:6379".into()],
            ..RedisConfig::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let e = RedisConfig {
            flush_interval_ms: 1001,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("redis_flush_interval_ms"), "{e}");
        let e = RedisConfig {
            urls: vec!["http://x".into()],
            ..ok
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("redis_url"), "{e}");
    }
}
