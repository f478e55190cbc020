//! clickgate-dataplane: thread-per-core io_uring ingest on glommio.

pub mod config;

pub use config::{AckMode, DataplaneConfig};
