//! The source agent (`cdp-agent`): an NBD server in the VM's I/O path that passes every
//! request through the disk's filter chain (`stats` → `journal`) to the backing disk, so every
//! write is in the job's journal before it is acknowledged.
//!
//! Map: [`config`] and [`cli`] (what to run), [`agent`] (assembly, start-up protocol,
//! shutdown), [`server`] (the disks as exports of the `nbd-server` crate, which owns sockets,
//! handshake and transmission), [`chain`] and [`filter`] (the
//! filter chain), [`backing`] (the backing-disk trait, from the `blockdev` crate), [`sink`] and [`journal_sink`] (the
//! journal), [`ranges`] (write ordering), [`registry`] (stable disk ids), [`metrics`],
//! [`replay`], [`redo`] (the backing disks kept in step with the journal: redo at start,
//! the synced watermark that bounds trimming), [`replicate`] (shipping the journal to the appliance: the driver of
//! `journal::ship::Shipper`; backlog bound, throttle, pause, job state), [`tracker`] (tracking
//! instead of journalling past the bound), [`dirty`] (the crash-safe dirty map), [`resync`]
//! (initial sync and resync by block hashes).
//!
//! Must never acknowledge a write that is neither in the journal nor, while the job is
//! `ahead`, covered by a durable dirty mark, and never let client input
//! panic the process or reach a disk unvalidated.

// Tests may unwrap: a panic there is a failed test. `cargo clippy --all-targets` also lints
// the library without `cfg(test)`.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod agent;
pub mod chain;
pub mod cli;
pub mod config;
pub mod dirty;
pub mod filter;
pub mod journal_sink;
pub mod metrics;
pub mod ranges;
pub mod redo;
pub mod registry;
pub mod replay;
pub mod replicate;
pub mod resync;
pub mod server;
pub mod sink;
pub mod tracker;

/// The backing disks: the `blockdev` crate's devices, shared with the appliance's replicas.
pub mod backing {
    pub use blockdev::{BlockDevice, Fault, FileDevice, MemDevice};
}

pub use agent::{run, Agent, Listening, Overrides, RunError, ServeError, StartError};
pub use config::AgentConfig;
