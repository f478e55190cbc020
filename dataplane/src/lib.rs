//! clickgate-dataplane: thread-per-core io_uring ingest on glommio.

pub mod config;
pub mod log;
pub mod ship;

pub use config::{AckMode, DataplaneConfig};
