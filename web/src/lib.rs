//! The control plane: REST API, web UI and the `cdp` client. The only crate that speaks HTTP
//! and JSON. Today it serves `/metrics` for the agent ([`metrics`]); the REST API and UI come
//! with the replication issues.
//!
//! Must never depend on the agent or the appliance crates: they hand it what to serve.

// Tests may unwrap: a panic there is a failed test. `cargo clippy --all-targets` also lints
// the library without `cfg(test)`.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod metrics;
