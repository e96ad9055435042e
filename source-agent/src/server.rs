//! The agent's side of the `nbd-server` crate: a disk's filter chain is what an export serves
//! ([`DiskChain`] implements [`ExportBackend`]), the agent's metrics hear the server's events
//! ([`AgentMetrics`] implements [`ServerEvents`]); `config::Limits::server_limits` gives the
//! server its bounds.
//!
//! Must never hold protocol logic (handshake, validation, replies live in `nbd-server` and
//! `nbd`), and never hand a client an error's text: the server sends the NBD code only.

use nbd::{ErrorCode, Operation};

pub use nbd_server::{
    serve_tcp, serve_unix, spawn_connection, BackendError, BackendFuture, End, Export,
    ExportBackend, ServerContext, ServerEvents, ServerLimits, WRITABLE_EXPORT_FLAGS,
};

use crate::chain::DiskChain;
use crate::metrics::AgentMetrics;

impl ExportBackend for DiskChain {
    fn size_bytes(&self) -> u64 {
        DiskChain::size_bytes(self)
    }

    fn execute(&self, op: Operation, payload: Vec<u8>) -> BackendFuture<'_> {
        Box::pin(async move {
            DiskChain::execute(self, op, payload)
                .await
                .map_err(|e| BackendError::new(e.nbd_error(), e.to_string()))
        })
    }
}

impl ServerEvents for AgentMetrics {
    fn connection_opened(&self) {
        self.connections().inc();
    }

    fn connection_closed(&self) {
        self.connections().dec();
    }

    fn rejected(&self, export: &str, error: ErrorCode) {
        // The inherent method: export names are disk names (`cdp_nbd_rejected_requests`).
        AgentMetrics::rejected(self, export, error);
    }
}
