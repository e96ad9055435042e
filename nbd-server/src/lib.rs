//! The NBD server over tokio, shared by the capture agent (`cdp-agent`'s protected disks) and
//! the appliance (recovery views: point-in-time disks read through history). It runs the
//! fixed-newstyle handshake and the transmission phase with many requests in flight per
//! connection, and hands every validated request to the export's [`ExportBackend`].
//!
//! Map: [`backend`] (what an export serves: the [`ExportBackend`] trait, [`Export`], the
//! advertised flags), [`context`] (what every connection shares: [`ServerContext`] with the
//! run-time export table, [`ServerLimits`], the [`ServerEvents`] hook), [`connection`] (one
//! connection: handshake, transmission, replies), [`listen`] (accept loops for TCP and Unix
//! sockets).
//!
//! All parsing and the accept/reject rules come from the `nbd` crate, so every server built
//! here answers the same requests the same way. Must never: let a request `nbd::judge` did not
//! accept reach a backend, buffer more than [`ServerLimits`] allows, panic on anything a client
//! sends, or send a client a backend's error text (clients get the NBD error code only). It
//! knows nothing of journals, disks or metrics registries: those belong to its users.

// Tests may unwrap: a panic there is a failed test. `cargo clippy --all-targets` also lints
// the library without `cfg(test)`.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod backend;
pub mod connection;
pub mod context;
pub mod listen;

pub use backend::{
    BackendError, BackendFuture, Export, ExportBackend, READ_ONLY_EXPORT_FLAGS,
    WRITABLE_EXPORT_FLAGS,
};
pub use connection::{spawn_connection, End};
pub use context::{
    AddExportError, NoEvents, RemovedExport, ServerContext, ServerEvents, ServerLimits,
};
pub use listen::{serve_tcp, serve_unix};
