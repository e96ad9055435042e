//! The sequenced write journal: cdp's one ordered, self-verifying log of writes.
//!
//! A pure library: no async runtime, no network, no database, and it never reads the clock
//! (timestamps are parameters). It must never return a byte it has not verified.
//!
//! Map:
//! - [`mark`]: the payload of a `Checkpoint` record.
//! - [`types`]: `Seq`, `Generation`, `DiskId`, `JobId`, `Timestamp`, `RecordKind`, `Codec`.
//! - [`record`]: the record format as pure codecs (`encode_record`, `decode_record`,
//!   `verify_stored`), usable on the network as on disk.
//! - [`segment`]: segment names, headers and frames (pure codecs).
//! - [`storage`]: the `Storage` trait and `DirStorage`; [`mem`]: `MemStorage`, the
//!   crash-simulating double.
//! - [`wire`]: the replication protocol's frames as pure codecs; [`ship`]: the sans-IO
//!   `Shipper` (agent) and `Lander` (appliance) state machines that speak it.
//! - [`Journal`] (one thread) and [`SharedJournal`] (many threads, group commit), with
//!   [`Reader`] / [`RawReader`].
//!
//! The on-disk format, the assumptions about the media and the torn-tail rule are in
//! `docs/journal-format.md`.

// Tests may unwrap: a panic there is a failed test. The library itself is linted without
// `cfg(test)` by `cargo clippy --all-targets`, so nothing slips through.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod error;
mod journal;
pub mod mark;
pub mod mem;
mod reader;
pub mod record;
pub mod resync;
pub mod segment;
mod shared;
pub mod ship;
pub mod storage;
pub mod types;
pub mod wire;

pub use error::{
    AppendError, Corruption, CorruptionReason, OpenError, ReadError, SyncError, TrimError,
};
pub use journal::{
    IntoStorage, Journal, JournalConfig, JournalStats, Recovery, TornTail, SEGMENT_BYTES_DEFAULT,
    SEGMENT_BYTES_LIMIT, SEGMENT_BYTES_MIN,
};
pub use mem::{Crash, MemOp, MemStorage};
pub use reader::{RawReader, Reader, READ_WINDOW_BYTES};
pub use record::{
    decode_record, encode_record, verify_stored, DecodeError, EncodeError, Entry, InvalidRecord,
    Record, RecordHeader, RecordRef, StoredRecord, RECORD_PAYLOAD_BYTES_MAX,
};
pub use shared::SharedJournal;
pub use storage::{DirStorage, Storage, StorageFile};
pub use types::{Codec, Compression, DiskId, Flags, Generation, JobId, RecordKind, Seq, Timestamp};
