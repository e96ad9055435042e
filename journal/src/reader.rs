//! Reading segments: the frame [`Scanner`] shared by recovery and readers, and the public
//! [`Reader`] (verified records, payload decompressed) and [`RawReader`] (verified records
//! exactly as stored, for shipping).
//!
//! Memory is bounded whatever the journal's size: one read window of
//! [`READ_WINDOW_BYTES`], plus at most one record buffer and one decompression buffer of
//! [`RECORD_BYTES_MAX`](crate::record::RECORD_BYTES_MAX) each. Must never: return a record
//! whose header checksum, seq, generation or payload blake3 it has not checked, or skip a
//! seq.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use crate::error::{Corruption, CorruptionReason, ReadError};
use crate::record::{
    DecodeError, InvalidRecord, Record, RecordDecoder, RecordHeader, RecordRef, StoredRecord,
};
use crate::segment::{
    decode_frame, Frame, InvalidSegmentHeader, SegmentHeader, SegmentId, FRAME_HEADER_BYTES_MAX,
    SEGMENT_DATA_OFFSET, SEGMENT_HEADER_BYTES, SYNC_ALIGN_BYTES,
};
use crate::storage::{read_full_at, Storage, StorageFile};
use crate::types::Seq;

/// Size of a scanner's read window: records up to this size are read with it, larger ones
/// with one exact read into a record buffer.
pub const READ_WINDOW_BYTES: usize = 1 << 20;

/// Why a segment could not be opened for scanning.
#[derive(Debug)]
pub(crate) enum ScanOpenError {
    Io(io::Error),
    Header(InvalidSegmentHeader),
}

/// One step of a scan.
#[derive(Debug)]
pub(crate) enum Step {
    /// A record whose header checked out, starting at `at`; its bytes are in
    /// `record_bytes()` when the body was asked for. The payload is not verified yet.
    Record { header: RecordHeader, at: u64 },
    /// A sync frame of this segment.
    Sync { durable_seq: Seq },
    /// No valid frame at `offset()`; the scanner did not move.
    Invalid(InvalidRecord),
    /// The file ends exactly at `offset()`.
    End,
}

enum Loc {
    None,
    Window { start: usize, len: usize },
    Big,
}

/// Walks the frames of one segment file in order.
pub(crate) struct Scanner {
    pub(crate) name: String,
    pub(crate) header: SegmentHeader,
    pub(crate) file: Arc<dyn StorageFile>,
    /// Length of the file when the scan began; frames past it are not looked at.
    pub(crate) file_len: u64,
    /// Offset of the next frame.
    offset: u64,
    /// Bytes of the file from `window_start`; never longer than `READ_WINDOW_BYTES`.
    window: Vec<u8>,
    window_start: u64,
    /// Buffer for a record longer than the window; never longer than `RECORD_BYTES_MAX`
    /// because only records whose header passed `check_fields` are read into it.
    big: Vec<u8>,
    last: Loc,
}

impl Scanner {
    /// Opens `id`'s file and checks its header against the name.
    pub(crate) fn open(storage: &dyn Storage, id: &SegmentId) -> Result<Scanner, ScanOpenError> {
        let name = id.file_name();
        let file = storage.open(&name).map_err(ScanOpenError::Io)?;
        let file_len = file.size_bytes().map_err(ScanOpenError::Io)?;
        let mut head = [0u8; SEGMENT_HEADER_BYTES];
        let n = read_full_at(&*file, &mut head, 0).map_err(ScanOpenError::Io)?;
        let header = SegmentId::decode_header(&head[..n]).map_err(ScanOpenError::Header)?;
        if header.id != *id {
            return Err(ScanOpenError::Header(InvalidSegmentHeader::NameMismatch {
                found: header.id,
            }));
        }
        if file_len < SEGMENT_DATA_OFFSET {
            return Err(ScanOpenError::Header(InvalidSegmentHeader::Short {
                bytes: usize::try_from(file_len).unwrap_or(usize::MAX),
            }));
        }
        Ok(Scanner {
            name,
            header,
            file,
            file_len,
            offset: SEGMENT_DATA_OFFSET,
            window: Vec::new(),
            window_start: 0,
            big: Vec::new(),
            last: Loc::None,
        })
    }

    /// Offset of the next frame.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Up to `len` bytes at `at` (fewer only where the file ends). `len` must not exceed
    /// the window.
    fn bytes_at(&mut self, at: u64, len: usize) -> io::Result<&[u8]> {
        let end = at.saturating_add(len as u64);
        let window_end = self.window_start + self.window.len() as u64;
        if at < self.window_start || end > window_end {
            let want = (self.file_len.saturating_sub(at)).min(READ_WINDOW_BYTES as u64) as usize;
            self.window.resize(want, 0);
            let n = read_full_at(&*self.file, &mut self.window, at)?;
            self.window.truncate(n);
            self.window_start = at;
        }
        let start = (at - self.window_start) as usize;
        let stop = (start + len).min(self.window.len());
        Ok(&self.window[start.min(stop)..stop])
    }

    /// The next frame. `want_body`: load the record's bytes (else only its header is read).
    pub(crate) fn step(&mut self, want_body: bool) -> io::Result<Step> {
        self.last = Loc::None;
        loop {
            if self.offset >= self.file_len {
                return Ok(Step::End);
            }
            let at = self.offset;
            let left = self.file_len - at;
            let head_len = left.min(FRAME_HEADER_BYTES_MAX as u64) as usize;
            let head = self.bytes_at(at, head_len)?;
            if head.len() < head_len {
                return Err(short_read());
            }
            // A run of zeros up to the next block boundary is a gap left by recovery (appends
            // resume on a fresh block); skip it. Anywhere else zeros are no frame.
            if !at.is_multiple_of(SYNC_ALIGN_BYTES) && head.len() >= 4 && head[..4] == [0; 4] {
                let gap = (SYNC_ALIGN_BYTES - at % SYNC_ALIGN_BYTES).min(left) as usize;
                let bytes = self.bytes_at(at, gap)?;
                if bytes.len() == gap && bytes.iter().all(|&b| b == 0) {
                    self.offset += gap as u64;
                    continue;
                }
                let reason = InvalidRecord::BadMagic { found: [0; 4] };
                return Ok(Step::Invalid(reason));
            }
            let (frame, frame_bytes) = match decode_frame(head) {
                Ok(decoded) => decoded,
                Err(DecodeError::Incomplete { record_bytes_min }) => {
                    return Ok(Step::Invalid(InvalidRecord::PastEnd {
                        frame_bytes_min: record_bytes_min as u64,
                    }))
                }
                Err(DecodeError::Invalid { reason }) => return Ok(Step::Invalid(reason)),
            };
            let frame_bytes = frame_bytes as u64;
            if frame_bytes > left {
                return Ok(Step::Invalid(InvalidRecord::PastEnd {
                    frame_bytes_min: frame_bytes,
                }));
            }
            return match frame {
                Frame::Sync { durable_seq, nonce } => {
                    if nonce != self.header.nonce {
                        return Ok(Step::Invalid(InvalidRecord::SyncFrameNonce));
                    }
                    self.offset += frame_bytes;
                    Ok(Step::Sync { durable_seq })
                }
                Frame::Record(header) => {
                    if want_body {
                        self.load(at, frame_bytes as usize)?;
                    }
                    self.offset += frame_bytes;
                    Ok(Step::Record { header, at })
                }
            };
        }
    }

    fn load(&mut self, at: u64, len: usize) -> io::Result<()> {
        if len <= READ_WINDOW_BYTES {
            let got = self.bytes_at(at, len)?.len();
            if got < len {
                return Err(short_read());
            }
            self.last = Loc::Window {
                start: (at - self.window_start) as usize,
                len,
            };
        } else {
            self.big.resize(len, 0);
            if read_full_at(&*self.file, &mut self.big, at)? < len {
                return Err(short_read());
            }
            self.last = Loc::Big;
        }
        Ok(())
    }

    /// The bytes of the record last returned with its body (empty otherwise).
    pub(crate) fn record_bytes(&self) -> &[u8] {
        match self.last {
            Loc::None => &[],
            Loc::Window { start, len } => self.window.get(start..start + len).unwrap_or(&[]),
            Loc::Big => &self.big,
        }
    }
}

fn short_read() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "segment file shorter than when the scan began",
    )
}

/// A segment and the seqs a reader expects in it.
#[derive(Debug, Clone)]
pub(crate) struct Span {
    pub(crate) id: SegmentId,
    /// Last seq the segment holds (for the active segment: the head when the reader was
    /// made). `last < id.first_seq` means the segment holds none.
    pub(crate) last: Seq,
}

/// Everything a reader needs, taken from the journal under its lock.
#[derive(Debug)]
pub(crate) struct ReadPlan {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) spans: Vec<Span>,
    pub(crate) from: Seq,
}

/// The state both readers share: which segment, which seq comes next.
struct Cursor {
    storage: Arc<dyn Storage>,
    spans: VecDeque<Span>,
    from: Seq,
    current: Option<(Span, Scanner)>,
    /// Seq the next record of the current segment must have.
    expected: Seq,
    decoder: RecordDecoder,
    /// Set after the end or an error: the reader yields nothing more.
    done: bool,
}

impl std::fmt::Debug for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cursor")
            .field("spans", &self.spans)
            .field("from", &self.from)
            .field("expected", &self.expected)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Cursor {
    fn new(plan: ReadPlan) -> Self {
        Cursor {
            storage: plan.storage,
            spans: plan.spans.into(),
            from: plan.from,
            current: None,
            expected: plan.from,
            decoder: RecordDecoder::new(),
            done: false,
        }
    }

    fn corrupt(&self, span: &Span, seq: Seq, reason: CorruptionReason) -> ReadError {
        ReadError::Corrupt(Corruption {
            segment: span.id.file_name(),
            seq,
            reason,
        })
    }

    /// Moves to the next record at or after `from`, body loaded, header checked against
    /// the seq and generation it must have.
    fn advance(&mut self) -> Result<Option<RecordHeader>, ReadError> {
        loop {
            let Some((span, scanner)) = self.current.as_mut() else {
                let Some(span) = self.spans.pop_front() else {
                    return Ok(None);
                };
                if span.last < span.id.first_seq {
                    continue;
                }
                let scanner = match Scanner::open(&*self.storage, &span.id) {
                    Ok(scanner) => scanner,
                    Err(ScanOpenError::Io(source)) => {
                        return Err(ReadError::Io {
                            name: span.id.file_name(),
                            source,
                        })
                    }
                    Err(ScanOpenError::Header(e)) => {
                        return Err(self.corrupt(&span, span.id.first_seq, e.into()))
                    }
                };
                self.expected = span.id.first_seq;
                self.current = Some((span, scanner));
                continue;
            };
            if self.expected > span.last {
                self.current = None;
                continue;
            }
            let want_body = self.expected >= self.from;
            let step = scanner.step(want_body).map_err(|source| ReadError::Io {
                name: scanner.name.clone(),
                source,
            })?;
            let expected = self.expected;
            let reason = match step {
                Step::Sync { .. } => continue,
                Step::Record { header, .. } => {
                    if header.seq != expected {
                        CorruptionReason::SeqMismatch { found: header.seq }
                    } else if header.generation != span.id.generation {
                        CorruptionReason::Generation {
                            found: header.generation,
                            segment: span.id.generation,
                        }
                    } else {
                        self.expected = expected.next();
                        if want_body {
                            return Ok(Some(header));
                        }
                        continue;
                    }
                }
                Step::Invalid(reason) => reason.into(),
                Step::End => CorruptionReason::Missing,
            };
            let span = span.clone();
            return Err(self.corrupt(&span, expected, reason));
        }
    }

    /// The next record, verified: header, plaintext payload, bytes as stored.
    fn next_verified(&mut self) -> Result<Option<(RecordRef<'_>, &[u8])>, ReadError> {
        if self.done {
            return Ok(None);
        }
        let header = match self.advance() {
            Ok(Some(header)) => header,
            Ok(None) => {
                self.done = true;
                return Ok(None);
            }
            Err(e) => {
                self.done = true;
                return Err(e);
            }
        };
        let Some((span, scanner)) = self.current.as_ref() else {
            // `advance` returned a record, so a segment is current.
            self.done = true;
            return Ok(None);
        };
        let bytes = scanner.record_bytes();
        match self.decoder.decode(bytes) {
            Ok((record, _)) => Ok(Some((record, bytes))),
            Err(e) => {
                let reason = match e {
                    DecodeError::Invalid { reason } => reason,
                    DecodeError::Incomplete { record_bytes_min } => InvalidRecord::PastEnd {
                        frame_bytes_min: record_bytes_min as u64,
                    },
                };
                let error = ReadError::Corrupt(Corruption {
                    segment: span.id.file_name(),
                    seq: header.seq,
                    reason: reason.into(),
                });
                self.done = true;
                Err(error)
            }
        }
    }
}

/// Reads verified records in seq order from a chosen seq up to the head the journal had when
/// the reader was made. After an error it yields nothing more.
#[derive(Debug)]
pub struct Reader {
    cursor: Cursor,
}

impl Reader {
    pub(crate) fn new(plan: ReadPlan) -> Self {
        Reader {
            cursor: Cursor::new(plan),
        }
    }

    /// The next record without copying its payload (borrowed until the next call).
    pub fn next_record(&mut self) -> Result<Option<RecordRef<'_>>, ReadError> {
        Ok(self.cursor.next_verified()?.map(|(record, _)| record))
    }
}

impl Iterator for Reader {
    type Item = Result<Record, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record()
            .map(|record| record.map(|r| r.to_record()))
            .transpose()
    }
}

/// Reads verified records exactly as stored (compressed payloads stay compressed), for the
/// shipper. Every record is verified (decompressed and hashed) before it is returned.
#[derive(Debug)]
pub struct RawReader {
    cursor: Cursor,
}

impl RawReader {
    pub(crate) fn new(plan: ReadPlan) -> Self {
        RawReader {
            cursor: Cursor::new(plan),
        }
    }

    /// The next record's header and stored bytes (borrowed until the next call).
    pub fn next_stored(&mut self) -> Result<Option<(RecordHeader, &[u8])>, ReadError> {
        Ok(self
            .cursor
            .next_verified()?
            .map(|(record, bytes)| (record.header, bytes)))
    }
}

impl Iterator for RawReader {
    type Item = Result<StoredRecord, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_stored()
            .map(|stored| {
                stored.map(|(header, bytes)| StoredRecord {
                    header,
                    bytes: bytes.to_vec(),
                })
            })
            .transpose()
    }
}
