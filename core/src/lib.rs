//! clickgate-core: the logic shared by the stream path (dataplane), the controlplane and
//! billing. This crate does no I/O and owns no runtime: every function here is a pure
//! transformation of its inputs, so the same input gives the same answer on every path.

pub mod agg;
pub mod bloom;
pub mod cidr;
pub mod civil;
pub mod event;
pub mod fraud;
pub mod gbt;
pub mod hash;
pub mod hll;
pub mod parse;
pub mod ratelimit;
pub mod window;

pub use event::{Click, Device, EventError, EventId};
