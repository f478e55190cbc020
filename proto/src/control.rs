//! The control API's gRPC code (docs/api.md), generated at build time from
//! `proto/clickgate/control/v1/control.proto` (feature `grpc`).

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("clickgate.control.v1");
