//! The DR appliance (`cdp-receiver`): lands the journals agents ship over QUIC, applies them
//! to replica disks, and reports on its jobs through the REST API and `/metrics`.
//!
//! Map: [`cli`] (what to run, `init`, `pair`), [`appliance`] (assembly, listeners, shutdown),
//! [`landing`] (a replication stream: the driver of `journal::ship::Lander`), [`jobs`] (a
//! job's files: description, landing journal, replicas, history), [`apply`] (landing
//! journal → replicas, in seq order, before-images first), [`history`] (before-images and
//! checkpoints in RocksDB: the only module that imports it), [`status`] (API statuses and
//! metrics).
//!
//! Must never: acknowledge a seq its landing journal has not made durable, apply a record
//! that was not verified, apply seqs out of order, or accept anything from a peer that is not
//! paired (the transport refuses it before any of this code runs).

// Tests may unwrap: a panic there is a failed test.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod appliance;
pub mod apply;
pub mod cli;
pub mod control;
pub mod history;
pub mod jobs;
pub mod landing;
pub mod retention;
pub mod status;
pub mod views;

pub use appliance::{run, Appliance, ApplianceConfig, ApplianceError, Listening};
