//! The control plane: the REST API ([`api`]) with its token ([`token`]), the `/metrics`
//! listener ([`metrics`]), and the `cdp` command-line client ([`cli`], [`client`],
//! [`demo`], [`format`]). The only crate that speaks HTTP and JSON.
//!
//! Must never depend on the agent or the appliance crates: they hand it what to serve, by
//! implementing [`api::Control`] and filling its DTOs. The `cdp` CLI runs the agent and
//! appliance binaries only as child processes (`cdp demo`).

// Tests may unwrap: a panic there is a failed test. `cargo clippy --all-targets` also lints
// the library without `cfg(test)`.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod cli;
pub mod client;
pub mod demo;
pub mod format;
pub mod metrics;
pub mod token;
