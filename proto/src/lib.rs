//! clickgate-proto: the formats that cross a process or a disk.
//!
//! - [`record`]: the raw record (validated event + what the dataplane decided), the unit
//!   of the local log, Kafka `raw_clicks` and the archive.

pub mod record;

pub use record::{Flags, RawRecord, RecordError};
