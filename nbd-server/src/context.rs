//! What every connection of one server shares: the export table (changeable while the server
//! runs), the bounds, the events hook, the shared byte and connection budgets, and the stop
//! signal.
//!
//! Must never hold the export table's lock across an `.await` or while calling a backend, and
//! never let a new connection reach an export after `remove_export` returned.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use nbd::ErrorCode;
use thiserror::Error;
use tokio::sync::{watch, Semaphore};

use crate::backend::Export;

/// Bounds on per-connection and per-server resources. Every queue and buffer a client can make
/// grow is bounded by one of these; every field must be positive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest option data the server reads during the handshake, in bytes.
    pub option_bytes_max: u32,
    /// Largest oversize option data that is read and thrown away (the option is answered
    /// `ERR_TOO_BIG` and the handshake goes on); beyond it the connection is closed.
    pub option_discard_bytes_max: u32,
    /// Options a client may send before the server hangs up.
    pub options_per_connection_max: u32,
    /// Largest write payload that is read and thrown away after refusing its request (so the
    /// connection survives); beyond it the connection is closed after the error reply.
    pub write_discard_bytes_max: u32,
    /// Requests in flight on one connection; the server stops reading until one completes.
    pub requests_per_connection_max: u32,
    /// Read and write data buffered across all connections, in bytes. At least the largest
    /// export's maximum block size (`add_export` checks it).
    pub inflight_bytes_max: u64,
    /// Open connections across all listeners; more are accepted and closed at once.
    pub connections_max: u32,
    /// Time a client has to finish the handshake, in milliseconds.
    pub handshake_timeout_ms: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            option_bytes_max: 16 << 10,
            option_discard_bytes_max: 1 << 20,
            options_per_connection_max: 256,
            write_discard_bytes_max: 64 << 20,
            requests_per_connection_max: 64,
            inflight_bytes_max: 256 << 20,
            connections_max: 256,
            handshake_timeout_ms: 30_000,
        }
    }
}

/// What the server reports as it runs (for metrics). Every method defaults to nothing; they
/// are called on the connection's task, so they must be quick and must not block.
pub trait ServerEvents: Send + Sync + fmt::Debug + 'static {
    /// A connection was accepted within `connections_max`.
    fn connection_opened(&self) {}
    /// A connection counted by `connection_opened` ended.
    fn connection_closed(&self) {}
    /// A request on export `export` was answered with `error` by `nbd::judge`, without
    /// reaching the backend.
    fn rejected(&self, export: &str, error: ErrorCode) {
        let _ = (export, error);
    }
}

/// Events nobody listens to.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEvents;

impl ServerEvents for NoEvents {}

/// Why an export was not added.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddExportError {
    /// An export of that name is already served.
    #[error("export {name:?} already exists")]
    Exists {
        /// The name.
        name: String,
    },
    /// The export breaks a rule of the protocol or of the server's limits.
    #[error("export {name:?}: {reason}")]
    Invalid {
        /// The name.
        name: String,
        /// The rule broken.
        reason: &'static str,
    },
}

/// An export in the table, with the signal that tells its connections it was removed.
#[derive(Debug)]
struct Entry {
    export: Arc<Export>,
    /// Flipped to `true` by `remove_export`; every connection in transmission on the export
    /// holds a receiver, so the sender knows when the last one has closed.
    removed: watch::Sender<bool>,
}

/// An export taken out of the table by [`ServerContext::remove_export`]. Its connections
/// finish the requests they have in flight and close; [`RemovedExport::closed`] completes
/// once the last one has.
#[derive(Debug)]
pub struct RemovedExport {
    /// The export (its backend stays alive while a closing connection still uses it).
    pub export: Arc<Export>,
    removed: watch::Sender<bool>,
}

impl RemovedExport {
    /// Completes once no connection uses the export any more: after it, the backend is not
    /// called again by this server.
    pub async fn closed(&self) {
        self.removed.closed().await;
    }
}

/// What every connection of one server shares.
///
/// Exports can be added and removed while the server runs. A new connection sees the table as
/// it is when it names an export. Removing an export closes its connections: each stops
/// reading requests, finishes those in flight, and closes (as at shutdown), so a deleted
/// recovery view is not read after its connections are gone ([`RemovedExport::closed`]).
#[derive(Debug)]
pub struct ServerContext {
    exports: RwLock<BTreeMap<String, Entry>>,
    limits: ServerLimits,
    events: Arc<dyn ServerEvents>,
    /// Read and write data buffered across all connections, in bytes of permits.
    pub(crate) inflight_bytes: Arc<Semaphore>,
    /// Open connections, in permits.
    pub(crate) connections: Arc<Semaphore>,
    /// Becomes `true` when the server stops.
    shutdown: watch::Receiver<bool>,
}

impl ServerContext {
    /// A context with no export; `shutdown` flips to `true` when the server stops.
    pub fn new(
        limits: ServerLimits,
        events: Arc<dyn ServerEvents>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let inflight = usize::try_from(limits.inflight_bytes_max)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        let connections = usize::try_from(limits.connections_max)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            exports: RwLock::new(BTreeMap::new()),
            inflight_bytes: Arc::new(Semaphore::new(inflight)),
            connections: Arc::new(Semaphore::new(connections)),
            limits,
            events,
            shutdown,
        }
    }

    /// Serves `export` to connections that name it from now on.
    pub fn add_export(&self, export: Export) -> Result<Arc<Export>, AddExportError> {
        let invalid = |reason| AddExportError::Invalid {
            name: export.name.clone(),
            reason,
        };
        if export.name.is_empty() {
            return Err(invalid("the empty name is reserved for the default export"));
        }
        if !protocol_string(&export.name) {
            return Err(invalid("a name is at most 4096 bytes without NUL"));
        }
        if !protocol_string(&export.description) {
            return Err(invalid("a description is at most 4096 bytes without NUL"));
        }
        export.block_sizes.validate().map_err(invalid)?;
        if u64::from(export.block_sizes.max_bytes) > self.limits.inflight_bytes_max {
            // A request larger than the whole byte budget would wait for it forever.
            return Err(invalid(
                "the maximum block size exceeds the server's inflight_bytes_max",
            ));
        }
        let mut exports = self.write_exports();
        if exports.contains_key(&export.name) {
            return Err(AddExportError::Exists { name: export.name });
        }
        let export = Arc::new(export);
        let (removed, _) = watch::channel(false);
        exports.insert(
            export.name.clone(),
            Entry {
                export: Arc::clone(&export),
                removed,
            },
        );
        Ok(export)
    }

    /// Stops serving export `name`: new connections no longer find it, and its open
    /// connections finish the requests in flight and close. `None` if there is no such export.
    pub fn remove_export(&self, name: &str) -> Option<RemovedExport> {
        let entry = self.write_exports().remove(name)?;
        // `send_replace` works with no receiver too (no connection on the export).
        entry.removed.send_replace(true);
        Some(RemovedExport {
            export: entry.export,
            removed: entry.removed,
        })
    }

    /// The export named `name`, if served.
    pub fn export(&self, name: &str) -> Option<Arc<Export>> {
        self.read_exports()
            .get(name)
            .map(|entry| Arc::clone(&entry.export))
    }

    /// The exports served now, by name.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.read_exports()
            .values()
            .map(|entry| Arc::clone(&entry.export))
            .collect()
    }

    /// The bounds.
    pub fn limits(&self) -> &ServerLimits {
        &self.limits
    }

    /// The stop signal (flips to `true` when the server stops).
    pub fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Waits until every connection has closed (after shutdown was signalled).
    pub async fn drained(&self) {
        // Every connection holds one permit; all of them free means none is open.
        let _all = self
            .connections
            .acquire_many(self.limits.connections_max)
            .await;
    }

    pub(crate) fn events(&self) -> &dyn ServerEvents {
        &*self.events
    }

    /// The export `name` names, with its removal signal; the empty name is the default
    /// export when exactly one is served.
    pub(crate) fn lookup(&self, name: &str) -> Option<(Arc<Export>, watch::Receiver<bool>)> {
        let exports = self.read_exports();
        let entry = if name.is_empty() && exports.len() == 1 {
            exports.values().next()
        } else {
            exports.get(name)
        }?;
        Some((Arc::clone(&entry.export), entry.removed.subscribe()))
    }

    // A panic while the lock is held cannot leave the map half-changed (each critical
    // section is one `BTreeMap` call or a read), so a poisoned lock still guards a valid map.
    fn read_exports(&self) -> RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.exports.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_exports(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.exports.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The protocol's rule for strings: at most 4096 bytes, no NUL.
fn protocol_string(s: &str) -> bool {
    s.len() <= nbd::STRING_BYTES_MAX && !s.contains('\0')
}
