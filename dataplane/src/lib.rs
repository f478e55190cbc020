//! clickgate-dataplane: thread-per-core io_uring ingest on glommio.

pub mod config;
pub mod http;
pub mod log;
pub mod metrics;
pub mod response;
pub mod ship;

pub use config::{AckMode, DataplaneConfig};
