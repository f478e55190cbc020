//! clickgate-dataplane: thread-per-core io_uring ingest on glommio.

pub mod config;
mod connection;
mod deps;
pub mod http;
pub mod log;
pub mod metrics;
pub mod pipeline;
pub mod response;
mod routes;
mod rules;
mod server;
mod shard;
pub mod ship;
#[cfg(test)]
mod tests_e2e;

/// The sink status lives in `clickgate-proto` (the Kafka forwarder writes it); re-exported
/// under its old path.
pub use clickgate_proto::sink;
pub use config::{AckMode, DataplaneConfig};
pub use server::{Dataplane, ShutdownHandle};
