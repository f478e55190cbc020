//! Shared pieces of clickgate's micro-benches and their tests (the load generator binary
//! keeps its own modules in `main.rs`).

pub mod corpus;
pub mod pipeline;
