//! clickgate-proto: the formats that cross a process or a disk.
//!
//! - [`record`]: the raw record (validated event + what the dataplane decided), the unit
//!   of the local log and the archive.
//! - [`raw_pb`]: the same record as Protocol Buffers (`proto/clickgate/raw/v1/
//!   raw_click.proto`), the value of Kafka `raw_clicks` that any protobuf runtime reads.
//! - [`framing`]: the length + CRC record framing of every record file (log segments,
//!   store WAL and snapshot, Redis outbox), torn-tail detection.
//! - [`segment`]: the local log's segment files: framing, torn-tail detection, reader.
//! - [`cursor`]: consumer cursors on the local log (Kafka forwarder, archiver), which
//!   log retention respects.
//! - [`frames`]: aggregate delta frames from dataplane cores to the controlplane.
//! - [`control_files`]: the rules and runtime-settings files the controlplane hands the
//!   dataplane through the data directory.
//! - [`fsutil`]: durable atomic file replacement ([`fsutil::write_atomic`]).
//! - [`box_id`]: the box's stable id, persisted in the data directory.
//! - [`sink`]: what the Kafka forwarder (`clickgate-kafka`) tells the dataplane cores
//!   (acknowledged LSNs, broker state); shared so neither crate depends on the other.
//! - `control` (feature `grpc`): the control API's generated gRPC client and server.

pub mod box_id;
#[cfg(feature = "grpc")]
pub mod control;
pub mod control_files;
pub mod cursor;
pub mod frames;
pub mod framing;
pub mod fsutil;
pub mod raw_pb;
pub mod record;
pub mod segment;
pub mod sink;

pub use record::{Flags, RawRecord, RecordError};
