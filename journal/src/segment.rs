//! The segment file format as pure codecs: file names, the segment header, and the frames
//! that follow it (records and sync frames). No I/O.
//!
//! A segment is `SEGMENT_DATA_OFFSET` bytes of header block (a 64-byte header, the rest
//! zero, never rewritten) followed by frames packed back to back: records (`CDPR`) and sync
//! frames (`CDPS`). A sync frame is written at the start of every sync; it records the
//! highest seq an *earlier*, completed fdatasync made durable, and pads to the next
//! [`SYNC_ALIGN_BYTES`] boundary so that later appends never rewrite a block that holds
//! durable bytes. Byte-by-byte layout and the recovery rules: `docs/journal-format.md`.
//!
//! Must never: panic on any input, or accept a name, header or frame whose checksum or
//! field rules fail.

use crate::record::{
    decode_header, le_array, le_u32, le_u64, DecodeError, InvalidRecord, RecordHeader,
    RECORD_HEADER_BYTES,
};
use crate::types::{Generation, JobId, Seq};

/// The four bytes a segment file starts with.
pub const SEGMENT_MAGIC: [u8; 4] = *b"CDPG";
/// The segment format version this code writes and reads.
pub const SEGMENT_VERSION: u16 = 1;
/// Length of the segment header proper (the header block is longer).
pub const SEGMENT_HEADER_BYTES: usize = 64;
/// Where the first frame starts: the header owns a whole 4 KiB block, which is written and
/// synced once when the segment is created and never rewritten.
pub const SEGMENT_DATA_OFFSET: u64 = 4096;
/// The four bytes a sync frame starts with.
pub const SYNC_MAGIC: [u8; 4] = *b"CDPS";
/// Length of a sync frame's header (the frame itself extends to an alignment boundary).
pub const SYNC_FRAME_HEADER_BYTES: usize = 40;
/// After a sync, appends resume at a multiple of this many bytes, so that no block holding
/// durable bytes is ever written again (sectors are not assumed to be atomic).
pub const SYNC_ALIGN_BYTES: u64 = 4096;
/// The longest frame header: enough bytes to learn any frame's kind and length.
pub const FRAME_HEADER_BYTES_MAX: usize = RECORD_HEADER_BYTES;
/// File name suffix of a segment.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// File name suffix of a segment being created (deleted on open if found).
pub const SEGMENT_TMP_SUFFIX: &str = ".seg.tmp";

const SEGMENT_CRC_AT: usize = 60;
const SYNC_CRC_AT: usize = 36;

/// Identity of a segment: the job, the generation that wrote it and its first seq. Sealed
/// segments are immutable, so this name is globally unique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SegmentId {
    /// Job of every record in it.
    pub job: JobId,
    /// Generation of every record in it.
    pub generation: Generation,
    /// Seq of its first record (the next seq when it was created).
    pub first_seq: Seq,
}

impl SegmentId {
    /// The file name: `<job: 32 hex>-<generation: 16 hex>-<first seq: 16 hex>.seg`. Fixed
    /// width, so names sort like (job, generation, first seq).
    pub fn file_name(&self) -> String {
        format!(
            "{}-{:016x}-{:016x}{SEGMENT_SUFFIX}",
            self.job, self.generation.0, self.first_seq.0
        )
    }

    /// The name of the segment while it is being created.
    pub fn tmp_file_name(&self) -> String {
        format!(
            "{}-{:016x}-{:016x}{SEGMENT_TMP_SUFFIX}",
            self.job, self.generation.0, self.first_seq.0
        )
    }

    /// Parses a segment file name (`None` for any other name, including temporary ones).
    pub fn parse_file_name(name: &str) -> Option<SegmentId> {
        let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
        let bytes = stem.as_bytes();
        if bytes.len() != 32 + 1 + 16 + 1 + 16 || bytes[32] != b'-' || bytes[49] != b'-' {
            return None;
        }
        let mut job = [0u8; 16];
        for (i, byte) in job.iter_mut().enumerate() {
            *byte = u8::try_from(hex(stem.get(2 * i..2 * i + 2)?)?).ok()?;
        }
        let generation = Generation(hex(stem.get(33..49)?)?);
        let first_seq = Seq(hex(stem.get(50..66)?)?);
        if first_seq < Seq::FIRST || first_seq > Seq::MAX {
            return None;
        }
        Some(SegmentId {
            job: JobId(job),
            generation,
            first_seq,
        })
    }

    /// The segment header as stored, checksum included. `nonce` is the segment's random
    /// sync-frame nonce (see [`SegmentHeader`]).
    pub fn encode_header(&self, nonce: [u8; 16]) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES];
        out[0..4].copy_from_slice(&SEGMENT_MAGIC);
        out[4..6].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        out[8..24].copy_from_slice(&self.job.0);
        out[24..32].copy_from_slice(&self.generation.0.to_le_bytes());
        out[32..40].copy_from_slice(&self.first_seq.0.to_le_bytes());
        // The data offset is a constant of version 1, stored so that a reader can check it.
        out[40..44].copy_from_slice(&(SEGMENT_DATA_OFFSET as u32).to_le_bytes());
        out[44..60].copy_from_slice(&nonce);
        let crc = crc32c::crc32c(&out[..SEGMENT_CRC_AT]);
        out[SEGMENT_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a segment header.
    pub fn decode_header(bytes: &[u8]) -> Result<SegmentHeader, InvalidSegmentHeader> {
        let head = bytes
            .get(..SEGMENT_HEADER_BYTES)
            .ok_or(InvalidSegmentHeader::Short { bytes: bytes.len() })?;
        let magic: [u8; 4] = le_array(head, 0);
        if magic != SEGMENT_MAGIC {
            return Err(InvalidSegmentHeader::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes(le_array(head, 4));
        if version != SEGMENT_VERSION {
            return Err(InvalidSegmentHeader::UnsupportedVersion { version });
        }
        let stored = le_u32(head, SEGMENT_CRC_AT);
        let computed = crc32c::crc32c(&head[..SEGMENT_CRC_AT]);
        if stored != computed {
            return Err(InvalidSegmentHeader::Checksum { stored, computed });
        }
        let data_offset = le_u32(head, 40);
        if u64::from(data_offset) != SEGMENT_DATA_OFFSET || head[6..8] != [0, 0] {
            return Err(InvalidSegmentHeader::Layout);
        }
        let id = SegmentId {
            job: JobId(le_array(head, 8)),
            generation: Generation(le_u64(head, 24)),
            first_seq: Seq(le_u64(head, 32)),
        };
        if id.first_seq < Seq::FIRST || id.first_seq > Seq::MAX {
            return Err(InvalidSegmentHeader::Layout);
        }
        Ok(SegmentHeader {
            id,
            nonce: le_array(head, 44),
        })
    }
}

/// A decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Job, generation and first seq (must match the file name).
    pub id: SegmentId,
    /// Random bytes drawn when the segment was created and repeated in each of its sync
    /// frames. A payload cannot forge a sync frame without them (the guest never sees a
    /// segment header), which matters when recovery searches past a tear for sync frames.
    pub nonce: [u8; 16],
}

fn hex(digits: &str) -> Option<u64> {
    // Lowercase only: one spelling per name, so two names never denote the same segment.
    if digits
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        u64::from_str_radix(digits, 16).ok()
    } else {
        None
    }
}

/// What makes a segment header invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSegmentHeader {
    /// The file is shorter than a header.
    #[error("file of {bytes} bytes is shorter than a segment header")]
    Short {
        /// Bytes available.
        bytes: usize,
    },
    /// The first four bytes are not `CDPG`.
    #[error("bad segment magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A version this code does not read.
    #[error("unsupported segment version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// The crc32c does not match.
    #[error("segment header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Stored checksum.
        stored: u32,
        /// Computed checksum.
        computed: u32,
    },
    /// Reserved bytes, data offset or first seq break the version's rules.
    #[error("segment header fields break the format's rules")]
    Layout,
    /// The header names another job, generation or first seq than the file name.
    #[error("segment header says {found:?}, the file name says otherwise")]
    NameMismatch {
        /// What the header says.
        found: SegmentId,
    },
}

/// A frame inside a segment, header decoded and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A record; its payload is not verified yet.
    Record(RecordHeader),
    /// A sync frame.
    Sync {
        /// Highest seq an fdatasync that completed before this frame was written made durable.
        durable_seq: Seq,
        /// The nonce of the segment that wrote it.
        nonce: [u8; 16],
    },
}

/// Decodes the frame header at the start of `bytes` and returns the frame and its length.
/// Needs at most [`FRAME_HEADER_BYTES_MAX`] bytes; the returned length may exceed `bytes`.
pub fn decode_frame(bytes: &[u8]) -> Result<(Frame, usize), DecodeError> {
    let Some(magic) = bytes.get(..4) else {
        return Err(DecodeError::Incomplete {
            record_bytes_min: 4,
        });
    };
    if magic == SYNC_MAGIC {
        let Some(head) = bytes.get(..SYNC_FRAME_HEADER_BYTES) else {
            return Err(DecodeError::Incomplete {
                record_bytes_min: SYNC_FRAME_HEADER_BYTES,
            });
        };
        let stored = le_u32(head, SYNC_CRC_AT);
        let computed = crc32c::crc32c(&head[..SYNC_CRC_AT]);
        if stored != computed {
            return Err(InvalidRecord::HeaderChecksum { stored, computed }.into());
        }
        if le_u32(head, 32) != 0 {
            return Err(InvalidRecord::ReservedNotZero.into());
        }
        let frame_bytes = le_u32(head, 4);
        if (frame_bytes as usize) < SYNC_FRAME_HEADER_BYTES
            || u64::from(frame_bytes) > SYNC_ALIGN_BYTES + SYNC_FRAME_HEADER_BYTES as u64
        {
            return Err(InvalidRecord::SyncFrameLength { frame_bytes }.into());
        }
        let durable_seq = Seq(le_u64(head, 8));
        if durable_seq > Seq::MAX {
            return Err(InvalidRecord::SeqOutOfRange { seq: durable_seq }.into());
        }
        let nonce = le_array(head, 16);
        return Ok((Frame::Sync { durable_seq, nonce }, frame_bytes as usize));
    }
    let header = decode_header(bytes)?;
    Ok((Frame::Record(header), header.record_bytes()))
}

/// Length of the sync frame written at `offset`: up to the next [`SYNC_ALIGN_BYTES`]
/// boundary, one block further when the gap is shorter than the frame's header.
pub fn sync_frame_bytes(offset: u64) -> u32 {
    let gap = (SYNC_ALIGN_BYTES - offset % SYNC_ALIGN_BYTES) % SYNC_ALIGN_BYTES;
    let gap = if gap < SYNC_FRAME_HEADER_BYTES as u64 {
        gap + SYNC_ALIGN_BYTES
    } else {
        gap
    };
    // gap <= SYNC_ALIGN_BYTES + header bytes, a small constant.
    gap as u32
}

/// The header of a sync frame of `frame_bytes` recording `durable_seq`, for the segment
/// whose nonce is `nonce`.
pub fn encode_sync_frame(
    durable_seq: Seq,
    frame_bytes: u32,
    nonce: [u8; 16],
) -> [u8; SYNC_FRAME_HEADER_BYTES] {
    let mut out = [0u8; SYNC_FRAME_HEADER_BYTES];
    out[0..4].copy_from_slice(&SYNC_MAGIC);
    out[4..8].copy_from_slice(&frame_bytes.to_le_bytes());
    out[8..16].copy_from_slice(&durable_seq.0.to_le_bytes());
    out[16..32].copy_from_slice(&nonce);
    let crc = crc32c::crc32c(&out[..SYNC_CRC_AT]);
    out[SYNC_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SegmentId {
        let mut job = [0u8; 16];
        job[0] = 0xc0;
        job[15] = 0x0f;
        SegmentId {
            job: JobId(job),
            generation: Generation(2),
            first_seq: Seq(0x1234),
        }
    }

    /// Data-driven helper for names: parsing `name` gives `expected`.
    fn check(name: &str, expected: Option<SegmentId>) {
        assert_eq!(SegmentId::parse_file_name(name), expected, "{name}");
    }

    #[test]
    fn file_names() {
        let name = id().file_name();
        assert_eq!(
            name,
            "c000000000000000000000000000000f-0000000000000002-0000000000001234.seg"
        );
        check(&name, Some(id()));
        check(&id().tmp_file_name(), None);
        check(&name.to_uppercase().replace(".SEG", ".seg"), None);
        check(
            &name.replace("-0000000000001234", "-0000000000000000"),
            None,
        );
        check(
            &name.replace("-0000000000001234", "-8000000000000001"),
            None,
        );
        check(&name.replace("-0000000000001234", "-000000000001234"), None);
        check(
            &name.replace("-0000000000001234", "+0000000000001234"),
            None,
        );
        check("", None);
        check(".seg", None);
        check(
            "é000000000000000000000000000000f-0000000000000002-0000000000001234.seg",
            None,
        );
    }

    #[test]
    fn header_round_trips_and_rejects_every_flip() {
        let header = id().encode_header([7; 16]);
        assert_eq!(
            SegmentId::decode_header(&header),
            Ok(SegmentHeader {
                id: id(),
                nonce: [7; 16]
            })
        );
        for at in 0..SEGMENT_HEADER_BYTES {
            let mut bad = header;
            bad[at] ^= 0x10;
            assert!(SegmentId::decode_header(&bad).is_err(), "byte {at}");
        }
        assert_eq!(
            SegmentId::decode_header(&header[..10]),
            Err(InvalidSegmentHeader::Short { bytes: 10 })
        );
    }

    #[test]
    fn sync_frames() {
        for offset in [4096u64, 4097, 4096 + 4056, 4096 + 4057, 8191, 1 << 30] {
            let len = u64::from(sync_frame_bytes(offset));
            assert_eq!((offset + len) % SYNC_ALIGN_BYTES, 0, "{offset}");
            assert!(len >= SYNC_FRAME_HEADER_BYTES as u64);
            assert!(len <= SYNC_ALIGN_BYTES + SYNC_FRAME_HEADER_BYTES as u64);
        }
        let frame = encode_sync_frame(Seq(77), 100, [5; 16]);
        assert_eq!(
            decode_frame(&frame),
            Ok((
                Frame::Sync {
                    durable_seq: Seq(77),
                    nonce: [5; 16]
                },
                100
            ))
        );
        for at in 0..SYNC_FRAME_HEADER_BYTES {
            let mut bad = frame;
            bad[at] ^= 0x01;
            assert!(decode_frame(&bad).is_err(), "byte {at}");
        }
        assert!(decode_frame(&encode_sync_frame(Seq(1), 10, [0; 16])).is_err());
        assert_eq!(
            decode_frame(&frame[..10]),
            Err(DecodeError::Incomplete {
                record_bytes_min: SYNC_FRAME_HEADER_BYTES
            })
        );
        assert!(matches!(
            decode_frame(&[0u8; 96]),
            Err(DecodeError::Invalid {
                reason: InvalidRecord::BadMagic { .. }
            })
        ));
    }
}
