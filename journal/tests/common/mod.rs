//! Helpers shared by the journal's integration tests: a Vec-based model of the records, a
//! deterministic payload generator, and checks that a journal matches the model exactly.
//! Test code: it may unwrap, a panic is a failed test.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use journal::segment::{decode_frame, Frame, SEGMENT_DATA_OFFSET, SYNC_ALIGN_BYTES};
use journal::{
    Compression, DiskId, Entry, Flags, Generation, JobId, Journal, JournalConfig, Record,
    RecordKind, Seq, Timestamp,
};

pub const JOB: JobId = JobId([0x5a; 16]);

pub fn config(segment_bytes_max: u64) -> JournalConfig {
    JournalConfig {
        segment_bytes_max,
        ..JournalConfig::new(JOB, Generation(1))
    }
}

pub fn config_with(segment_bytes_max: u64, compression: Compression) -> JournalConfig {
    JournalConfig {
        compression,
        ..config(segment_bytes_max)
    }
}

/// One record as the model keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    pub kind: RecordKind,
    pub disk: DiskId,
    pub offset: u64,
    pub length: u32,
    pub payload: Vec<u8>,
    pub timestamp: Timestamp,
    pub flags: Flags,
}

impl Model {
    pub fn entry(&self) -> Entry<'_> {
        Entry {
            disk: self.disk,
            kind: self.kind,
            offset: self.offset,
            length: self.length,
            payload: &self.payload,
            timestamp: self.timestamp,
            flags: self.flags,
        }
    }

    /// A record of `kind` whose payload (if any) has `len` bytes from `seed`.
    pub fn new(kind: RecordKind, len: usize, seed: u64, compressible: bool, fua: bool) -> Model {
        let (offset, length, payload) = match kind {
            RecordKind::Write => (
                seed % 1000 * 4096,
                len as u32,
                payload(len, seed, compressible),
            ),
            RecordKind::Checkpoint | RecordKind::Resync => {
                let label = format!("mark-{seed}").into_bytes();
                (0, label.len() as u32, label)
            }
            RecordKind::Trim | RecordKind::WriteZeroes => (seed % 77 * 512, len as u32, vec![]),
            RecordKind::Flush => (0, 0, vec![]),
        };
        Model {
            kind,
            disk: DiskId((seed % 3) as u32),
            offset,
            length,
            payload,
            timestamp: Timestamp(1_700_000_000_000_000 + seed),
            flags: if fua { Flags::FUA } else { Flags::NONE },
        }
    }

    pub fn write(len: usize, seed: u64, compressible: bool) -> Model {
        Model::new(RecordKind::Write, len, seed, compressible, false)
    }

    /// Whether `record` is this model record at `seq`.
    pub fn check(&self, record: &Record, seq: Seq, generation: Generation) {
        let h = &record.header;
        assert_eq!(h.seq, seq);
        assert_eq!(h.generation, generation, "seq {seq}");
        assert_eq!(h.kind, self.kind, "seq {seq}");
        assert_eq!(h.disk, self.disk, "seq {seq}");
        assert_eq!(h.offset, self.offset, "seq {seq}");
        assert_eq!(h.length, self.length, "seq {seq}");
        assert_eq!(h.timestamp, self.timestamp, "seq {seq}");
        assert_eq!(h.flags, self.flags, "seq {seq}");
        assert!(record.payload == self.payload, "seq {seq}: payload differs");
    }
}

/// Deterministic bytes: xorshift noise, or text-like runs that zstd shrinks.
pub fn payload(len: usize, seed: u64, compressible: bool) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    if compressible {
        let words: [&[u8]; 6] = [b"block ", b"sector ", b"journal ", b"0000", b"\n", b"seq "];
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            out.extend_from_slice(words[(next() % 6) as usize]);
        }
        out.truncate(len);
        out
    } else {
        (0..len).map(|_| (next() >> 29) as u8).collect()
    }
}

/// Reads every record from `from` and checks it against `model` (seq `s` is `model[s-1]`):
/// exactly the records from `from` to the journal's head, in order.
pub fn check_reads(journal: &Journal, from: Seq, model: &[Model]) {
    let head = journal.head_seq();
    assert!(
        head.0 as usize <= model.len(),
        "head {head} beyond model {}",
        model.len()
    );
    let generation = journal.config().generation;
    let mut seq = from;
    for record in journal.reader(from).unwrap() {
        let record = record.unwrap_or_else(|e| panic!("reading seq {seq}: {e}"));
        let expected = &model[(seq.0 - 1) as usize];
        assert!(record.header.generation <= generation);
        expected.check(&record, seq, record.header.generation);
        seq = seq.next();
    }
    assert_eq!(seq, head.next(), "reader from {from} stopped early");
}

/// A frame of a segment file as a test sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// Record `seq` at `start..end`.
    Record { seq: Seq, start: u64, end: u64 },
    /// Sync frame at `start..start+header`; the rest of it up to `end` is padding.
    Sync {
        start: u64,
        header_end: u64,
        end: u64,
    },
}

/// Walks the frames of a segment image the way the journal does (zero gaps up to a block
/// boundary are skipped), stopping at the first invalid frame.
pub fn extents(image: &[u8]) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut at = SEGMENT_DATA_OFFSET as usize;
    while at + 4 <= image.len() {
        if !(at as u64).is_multiple_of(SYNC_ALIGN_BYTES) && image[at..at + 4] == [0; 4] {
            let gap = (SYNC_ALIGN_BYTES - at as u64 % SYNC_ALIGN_BYTES) as usize;
            if image[at..(at + gap).min(image.len())]
                .iter()
                .all(|&b| b == 0)
            {
                at += gap;
                continue;
            }
        }
        match decode_frame(&image[at..]) {
            Ok((Frame::Record(h), len)) => {
                out.push(Extent::Record {
                    seq: h.seq,
                    start: at as u64,
                    end: (at + len) as u64,
                });
                at += len;
            }
            Ok((Frame::Sync { .. }, len)) => {
                out.push(Extent::Sync {
                    start: at as u64,
                    header_end: (at + journal::segment::SYNC_FRAME_HEADER_BYTES) as u64,
                    end: (at + len) as u64,
                });
                at += len;
            }
            Err(_) => break,
        }
    }
    out
}
