//! Errors of the journal's operations: one enum per operation ([`OpenError`],
//! [`AppendError`], [`SyncError`], [`ReadError`], [`TrimError`]) and the [`Corruption`]
//! they share, which always names the segment file and the seq.
//!
//! Must never: describe corrupt data as a torn tail, or lose the segment name or the seq of
//! a corruption on the way to the caller.

use std::io;

use crate::record::{EncodeError, InvalidRecord};
use crate::segment::InvalidSegmentHeader;
use crate::types::{Generation, JobId, Seq};

/// Damaged data the journal refuses to return: a record (or the frame or header around it)
/// that fails its checks where a valid one must be. Never silently truncated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("segment {segment}: seq {seq}: {reason}")]
pub struct Corruption {
    /// File name of the segment.
    pub segment: String,
    /// The seq of the record that is damaged or missing (for a damaged segment header, the
    /// segment's first seq).
    pub seq: Seq,
    /// What is wrong.
    pub reason: CorruptionReason,
}

/// What is wrong in a [`Corruption`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptionReason {
    /// The record (or a sync frame before it) fails its checks.
    #[error("{0}")]
    Record(#[from] InvalidRecord),
    /// A valid record with another seq stands where this seq must be.
    #[error("found seq {found} instead")]
    SeqMismatch {
        /// The seq found.
        found: Seq,
    },
    /// A valid record of another generation than its segment.
    #[error("record of generation {found} in a segment of generation {segment}")]
    Generation {
        /// The record's generation.
        found: Generation,
        /// The segment's generation.
        segment: Generation,
    },
    /// The segment ends (its file, or its valid frames) before this seq, which it must hold.
    #[error("segment ends before this seq")]
    Missing,
    /// The segment's header block is damaged or does not match its file name.
    #[error("segment header: {0}")]
    SegmentHeader(#[from] InvalidSegmentHeader),
    /// Segments are out of order (a later first seq with an older generation).
    #[error("segment generation {found} is older than the segment before it ({before})")]
    GenerationOrder {
        /// This segment's generation.
        found: Generation,
        /// The generation of the segment before it.
        before: Generation,
    },
}

/// Why [`Journal::open`](crate::Journal::open) failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The configuration breaks a rule (the message says which).
    #[error("invalid journal config: {reason}")]
    Config {
        /// The rule broken.
        reason: &'static str,
    },
    /// An I/O call failed.
    #[error("i/o error on {name}: {source}")]
    Io {
        /// The file (or directory) concerned.
        name: String,
        /// The error.
        source: io::Error,
    },
    /// A segment is damaged (see [`Corruption`]); nothing was truncated or changed.
    #[error("corrupt journal: {0}")]
    Corrupt(#[from] Corruption),
    /// The directory holds a segment of another job.
    #[error("segment {segment} belongs to job {found}, not to job {expected}")]
    ForeignJob {
        /// File name of the segment.
        segment: String,
        /// Its job.
        found: JobId,
        /// The configured job.
        expected: JobId,
    },
    /// The journal holds a newer generation than the configured one: this side is stale (it
    /// may read, never write, history of a later promotion).
    #[error("journal holds generation {found}, newer than the configured generation {configured}")]
    StaleGeneration {
        /// The newest generation on storage.
        found: Generation,
        /// The configured generation.
        configured: Generation,
    },
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// An earlier I/O or fsync error poisoned the journal; reopen it.
    #[error("journal is poisoned by an earlier error ({cause}); reopen it")]
    Poisoned {
        /// The first error.
        cause: String,
    },
    /// The entry cannot be encoded (nothing was written; the journal stays usable).
    #[error(transparent)]
    InvalidEntry(#[from] EncodeError),
    /// A stored record does not fit this journal (nothing was written; the journal stays
    /// usable).
    #[error("stored record refused: {reason}")]
    Stored {
        /// Why: a bad header, another seq or generation, or a length mismatch.
        reason: String,
    },
    /// An I/O call failed; the journal is now poisoned.
    #[error("i/o error on {name}: {source}")]
    Io {
        /// The file concerned.
        name: String,
        /// The error.
        source: io::Error,
    },
}

/// Why a sync (or a wait for durability) failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// An earlier I/O or fsync error poisoned the journal; reopen it.
    #[error("journal is poisoned by an earlier error ({cause}); reopen it")]
    Poisoned {
        /// The first error.
        cause: String,
    },
    /// The write or fdatasync failed; the journal is now poisoned (an fsync is never retried).
    #[error("i/o error on {name}: {source}")]
    Io {
        /// The file concerned.
        name: String,
        /// The error.
        source: io::Error,
    },
    /// Waited for a seq that was never appended.
    #[error("seq {seq} was never appended (head is {head})")]
    NotAppended {
        /// The seq waited for.
        seq: Seq,
        /// The head when the wait gave up.
        head: Seq,
    },
}

/// Why a reader could not be made or could not continue.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// An earlier I/O or fsync error poisoned the journal; reopen it.
    #[error("journal is poisoned by an earlier error ({cause}); reopen it")]
    Poisoned {
        /// The first error.
        cause: String,
    },
    /// The seq asked for was trimmed (or is `Seq(0)`).
    #[error("seq {from} is trimmed; the oldest stored seq is {first}")]
    Trimmed {
        /// The seq asked for.
        from: Seq,
        /// The oldest seq still stored.
        first: Seq,
    },
    /// The seq asked for is past the head plus one.
    #[error("seq {from} is beyond the head {head}")]
    BeyondHead {
        /// The seq asked for.
        from: Seq,
        /// The head.
        head: Seq,
    },
    /// A record is damaged; it is not returned.
    #[error("corrupt journal: {0}")]
    Corrupt(#[from] Corruption),
    /// An I/O call failed (reading does not poison the journal).
    #[error("i/o error on {name}: {source}")]
    Io {
        /// The segment concerned.
        name: String,
        /// The error.
        source: io::Error,
    },
}

/// Why a trim failed.
#[derive(Debug, thiserror::Error)]
pub enum TrimError {
    /// An earlier I/O or fsync error poisoned the journal; reopen it.
    #[error("journal is poisoned by an earlier error ({cause}); reopen it")]
    Poisoned {
        /// The first error.
        cause: String,
    },
    /// Removing a segment failed; the journal is now poisoned.
    #[error("i/o error on {name}: {source}")]
    Io {
        /// The file concerned.
        name: String,
        /// The error.
        source: io::Error,
    },
}
