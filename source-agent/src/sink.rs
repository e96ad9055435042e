//! Where the `journal` filter sends records: a small trait over the job's journal (one
//! sequencer for every disk of the agent), with the real journal behind it in production and
//! an in-memory double with fault injection in tests.
//!
//! Every method may block on file I/O: callers on the async runtime use `spawn_blocking`.
//! A sink never reorders: `append` returns dense, increasing seqs in call order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use thiserror::Error;

pub use journal::{DiskId, RecordKind, Seq, Timestamp};

/// One record to append: a write, trim or write-zeroes of one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkEntry<'a> {
    /// The disk written.
    pub disk: DiskId,
    /// `Write`, `Trim` or `WriteZeroes`.
    pub kind: RecordKind,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (for `Write`, the payload length).
    pub length: u32,
    /// The data of a `Write`; empty otherwise.
    pub payload: &'a [u8],
    /// The client asked for forced unit access.
    pub fua: bool,
    /// When the agent received the request.
    pub timestamp: Timestamp,
}

/// Why the journal refused or failed an operation; the request fails with `EIO`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SinkError {
    /// The journal reported an error (its message, which names segment and seq).
    #[error("journal: {0}")]
    Journal(String),
}

/// The job's journal as the agent uses it.
pub trait RecordSink: Send + Sync + std::fmt::Debug + 'static {
    /// Appends a record (it reaches the OS before this returns) and returns its seq.
    fn append(&self, entry: &SinkEntry<'_>) -> Result<Seq, SinkError>;
    /// Blocks until every record up to `seq` is durable; returns the durable seq.
    fn wait_durable(&self, seq: Seq) -> Result<Seq, SinkError>;
    /// Makes every appended record durable; returns the durable seq.
    fn sync(&self) -> Result<Seq, SinkError>;
    /// The last seq appended (`Seq(0)` when none).
    fn head_seq(&self) -> Seq;
    /// The last seq known durable.
    fn durable_seq(&self) -> Seq;
}

/// A record kept by [`MemSink`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemRecord {
    /// Its seq.
    pub seq: Seq,
    /// The disk.
    pub disk: DiskId,
    /// The kind.
    pub kind: RecordKind,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
    /// Payload (writes only).
    pub payload: Vec<u8>,
    /// FUA was asked for.
    pub fua: bool,
}

/// Which [`MemSink`] operation fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkFault {
    /// `append` fails (nothing is recorded).
    Append,
    /// `wait_durable` and `sync` fail.
    Sync,
}

/// An in-memory journal for tests.
#[derive(Debug, Default)]
pub struct MemSink {
    /// Invariant: seqs are 1, 2, 3, ... in order.
    records: Mutex<Vec<MemRecord>>,
    durable: AtomicU64,
    fault: Mutex<Option<SinkFault>>,
}

impl MemSink {
    /// An empty journal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `fault` happen on every later call of that kind (`None` clears it).
    pub fn inject(&self, fault: Option<SinkFault>) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
    }

    /// A copy of every record appended.
    pub fn records(&self) -> Vec<MemRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fails(&self, kind: SinkFault) -> Result<(), SinkError> {
        if *self.fault.lock().unwrap_or_else(|p| p.into_inner()) == Some(kind) {
            return Err(SinkError::Journal(format!("injected {kind:?} fault")));
        }
        Ok(())
    }
}

impl RecordSink for MemSink {
    fn append(&self, entry: &SinkEntry<'_>) -> Result<Seq, SinkError> {
        self.fails(SinkFault::Append)?;
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let seq = Seq(records.len() as u64 + 1);
        records.push(MemRecord {
            seq,
            disk: entry.disk,
            kind: entry.kind,
            offset: entry.offset,
            length: entry.length,
            payload: entry.payload.to_vec(),
            fua: entry.fua,
        });
        Ok(seq)
    }

    fn wait_durable(&self, seq: Seq) -> Result<Seq, SinkError> {
        self.fails(SinkFault::Sync)?;
        let head = self.head_seq();
        assert!(seq <= head, "waiting for seq {seq} beyond head {head}");
        self.durable.fetch_max(head.0, Ordering::SeqCst);
        Ok(self.durable_seq())
    }

    fn sync(&self) -> Result<Seq, SinkError> {
        self.wait_durable(self.head_seq())
    }

    fn head_seq(&self) -> Seq {
        Seq(self.records.lock().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }

    fn durable_seq(&self) -> Seq {
        Seq(self.durable.load(Ordering::SeqCst))
    }
}
