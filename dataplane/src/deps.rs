//! The per-core building blocks a shard owns, gathered in one place.

pub use crate::log::{CoreLog, LogConfig};
pub use clickgate_core::bloom::SharedBloom;
pub use clickgate_core::cidr::CidrSet;
pub use clickgate_core::fraud::IpRate;
pub use clickgate_core::ratelimit::RateLimiter;
