//! What an export serves: the [`ExportBackend`] trait a user implements (the agent's filter
//! chain, the appliance's recovery views), the [`Export`] that names it for clients, and the
//! transmission flags an export advertises.
//!
//! Must never carry protocol logic: a backend only sees requests `nbd::judge` accepted, and
//! whatever it answers is checked by the connection before it reaches the wire.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use nbd::{BlockSizes, ErrorCode, ExportParams, Operation, TransmissionFlags};
use thiserror::Error;

/// Transmission flags of a writable export: flush, FUA, trim and write-zeroes are supported,
/// and multi-connection is safe because every connection of an export shares one backend,
/// whose FLUSH and FUA cover the writes answered on any connection (see [`ExportBackend`]).
pub const WRITABLE_EXPORT_FLAGS: TransmissionFlags = TransmissionFlags(
    TransmissionFlags::HAS_FLAGS.0
        | TransmissionFlags::SEND_FLUSH.0
        | TransmissionFlags::SEND_FUA.0
        | TransmissionFlags::SEND_TRIM.0
        | TransmissionFlags::SEND_WRITE_ZEROES.0
        | TransmissionFlags::CAN_MULTI_CONN.0,
);

/// Transmission flags of a read-only export: `READ_ONLY`, and none of the write features
/// (flush, FUA, trim, write-zeroes), so `nbd::judge` answers every write `EPERM` before it
/// can reach the backend. Multi-connection is safe: with no writes, every connection reads
/// the same data.
pub const READ_ONLY_EXPORT_FLAGS: TransmissionFlags = TransmissionFlags(
    TransmissionFlags::HAS_FLAGS.0
        | TransmissionFlags::READ_ONLY.0
        | TransmissionFlags::CAN_MULTI_CONN.0,
);

/// The future of one backend request.
pub type BackendFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Vec<u8>>, BackendError>> + Send + 'a>>;

/// What an export serves: a byte range that requests read and (unless the export is
/// read-only) write.
///
/// **Contract.** `execute` is only called with an operation `nbd::judge` accepted for the
/// export: in range, aligned to the minimum block size, at most the maximum block size for
/// reads and writes, nonzero length, and never a write, trim or write-zeroes on a read-only
/// export. Many calls may run at once (from one or many connections). A `Flush`, and a write
/// with `fua`, must make durable every write already answered on *any* connection of the
/// export: writable exports advertise `NBD_FLAG_CAN_MULTI_CONN`.
pub trait ExportBackend: Send + Sync + fmt::Debug + 'static {
    /// The export's size in bytes, as advertised at the handshake (asked once per handshake
    /// reply; a size that changes under an open connection is not announced to it).
    fn size_bytes(&self) -> u64;

    /// Carries out `op`; returns the data of a read (exactly `length` bytes; anything else
    /// is answered `EIO`) and `None` for every other operation. `payload` is the data of a
    /// `Write`, exactly `length` bytes; it is empty for every other operation.
    fn execute(&self, op: Operation, payload: Vec<u8>) -> BackendFuture<'_>;
}

/// Why a backend could not carry out a request.
///
/// The client receives `code` only. `message` goes to the server's log: it may name files,
/// devices or internal state, which a client must not learn.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct BackendError {
    /// The NBD error the client receives (`OK` is replaced by `EIO`: an error reply needs a
    /// nonzero code).
    pub code: ErrorCode,
    /// What went wrong, for the log only.
    pub message: String,
}

impl BackendError {
    /// An error answered with `code` and logged as `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// One export: what clients see of a backend.
#[derive(Debug)]
pub struct Export {
    /// The name clients select it by (non-empty: the empty name selects the only export,
    /// when there is exactly one).
    pub name: String,
    /// Description for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Advertised block size constraints; `max_bytes` bounds every read and write.
    pub block_sizes: BlockSizes,
    /// What serves the requests.
    pub backend: Arc<dyn ExportBackend>,
    /// Advertise `NBD_FLAG_READ_ONLY`: writes, trims and write-zeroes are answered `EPERM`
    /// and never reach the backend.
    pub read_only: bool,
}

impl Export {
    /// The transmission flags advertised for this export, before `SEND_DF` (which depends
    /// on whether the connection negotiated structured replies).
    pub fn flags(&self) -> TransmissionFlags {
        if self.read_only {
            READ_ONLY_EXPORT_FLAGS
        } else {
            WRITABLE_EXPORT_FLAGS
        }
    }

    /// What a connection negotiated for this export.
    pub(crate) fn params(&self, structured: bool) -> ExportParams {
        let mut flags = self.flags();
        if structured {
            // Every read is answered with one data chunk, so "don't fragment" always holds.
            flags = flags | TransmissionFlags::SEND_DF;
        }
        ExportParams {
            size_bytes: self.backend.size_bytes(),
            block_sizes: self.block_sizes,
            flags,
        }
    }
}
