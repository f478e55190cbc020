//! Key names (`{…}` is the Redis Cluster hash tag, so one campaign's keys share a slot).

use clickgate_core::agg::Dim;
use clickgate_core::window::Window;
use clickgate_core::Device;

/// The `dim` part of a key.
pub fn dim_text(d: Dim) -> String {
    match d {
        Dim::All => "all".into(),
        Dim::Country(c) => format!("country={}", String::from_utf8_lossy(&c)),
        Dim::Device(d) => format!("device={}", device_text(d)),
        Dim::Ad(a) => format!("ad={a}"),
        Dim::Publisher(p) => format!("publisher={p}"),
    }
}

fn device_text(d: Device) -> &'static str {
    match d {
        Device::Mobile => "mobile",
        Device::Desktop => "desktop",
        Device::Tablet => "tablet",
        Device::Ctv => "ctv",
        Device::Other => "other",
    }
}

/// Key names, with the configured prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn counter(&self, c: u64, w: Window, start: u64, d: Dim) -> String {
        format!(
            "{}counter:{{{c}}}:{}:{start}:{}",
            self.prefix,
            w.as_str(),
            dim_text(d)
        )
    }
    pub fn users(&self, c: u64, w: Window, start: u64, d: Dim) -> String {
        format!(
            "{}users:{{{c}}}:{}:{start}:{}",
            self.prefix,
            w.as_str(),
            dim_text(d)
        )
    }
    pub fn top(&self, w: Window, start: u64) -> String {
        format!("{}top:{{{}:{start}}}", self.prefix, w.as_str())
    }
    pub(crate) fn marks(&self, tag: &str) -> String {
        format!("{}applied:{{{tag}}}", self.prefix)
    }
    pub(crate) fn scratch(&self, tag: &str) -> String {
        format!("{}scratch:{{{tag}}}", self.prefix)
    }
}
