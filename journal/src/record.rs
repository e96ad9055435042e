//! The record format as pure codecs: encode an [`Entry`] into the bytes stored on disk and
//! shipped on the network, decode and verify such bytes. No I/O, no clock.
//!
//! Layout (little-endian, byte by byte in `docs/journal-format.md`): a 96-byte header with a
//! crc32c over its first 92 bytes, then the payload as stored (raw or one zstd frame). The
//! header carries a crc32c of the stored payload (checked first, so any changed stored byte is
//! caught) and the blake3 of the *plaintext* payload, checked after decompression.
//!
//! Must never: panic on any input, return a payload byte whose blake3 it has not checked, or
//! allocate more than [`RECORD_PAYLOAD_BYTES_MAX`] for a payload whatever the header claims.

use crate::types::{Codec, Compression, DiskId, Flags, Generation, RecordKind, Seq, Timestamp};

/// The four bytes every record starts with.
pub const RECORD_MAGIC: [u8; 4] = *b"CDPR";
/// The record format version this code writes and reads.
pub const RECORD_VERSION: u16 = 1;
/// Length of the fixed record header.
pub const RECORD_HEADER_BYTES: usize = 96;
/// Largest plaintext payload (and largest `length` of a record with a payload): 32 MiB.
/// Readers size their buffers by it, so memory stays bounded whatever a header claims.
pub const RECORD_PAYLOAD_BYTES_MAX: u32 = 32 << 20;
/// Largest record as stored: header plus the largest payload (compression never grows it).
pub const RECORD_BYTES_MAX: usize = RECORD_HEADER_BYTES + RECORD_PAYLOAD_BYTES_MAX as usize;
/// Payloads shorter than this are never compressed: zstd's frame overhead and the call cost
/// outweigh what it could save.
pub const COMPRESS_MIN_BYTES: usize = 512;
/// Bytes sampled (16 pieces spread over the payload) to estimate its byte entropy before
/// any zstd call; see [`looks_incompressible`].
pub const ENTROPY_SAMPLE_BYTES: usize = 512;
/// Payloads of at least this size are first probed with a sample; see [`COMPRESS_PROBE_BYTES`].
pub const COMPRESS_PROBE_MIN_BYTES: usize = 16 << 10;
/// Size of the probe: the first bytes of a large payload are compressed first and, when they
/// do not shrink by at least 1/16, the payload is stored raw without compressing the rest.
/// This bounds the cost of incompressible data (measured in `docs/BENCHMARKS.md`).
pub const COMPRESS_PROBE_BYTES: usize = 4 << 10;

/// Byte offset of the header checksum; the checksum covers every byte before it.
const HEADER_CRC_AT: usize = 92;

/// One write (or trim, flush, …) to append, as the caller describes it. The journal adds the
/// seq and the generation.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    /// Disk of the job the record applies to.
    pub disk: DiskId,
    /// What the record describes.
    pub kind: RecordKind,
    /// Byte offset on the disk (zero for `Flush` and `Checkpoint`).
    pub offset: u64,
    /// Plaintext payload length for `Write` and `Checkpoint`, extent length for `Trim` and
    /// `WriteZeroes`, zero for `Flush`.
    pub length: u32,
    /// The plaintext payload: the data of a `Write`, the label of a `Checkpoint`, empty
    /// otherwise.
    pub payload: &'a [u8],
    /// When the caller saw the write (the journal never reads the clock).
    pub timestamp: Timestamp,
    /// Record flags (FUA).
    pub flags: Flags,
}

impl<'a> Entry<'a> {
    /// A `Write` of `payload` at `offset`.
    pub fn write(disk: DiskId, offset: u64, payload: &'a [u8], timestamp: Timestamp) -> Self {
        Entry {
            disk,
            kind: RecordKind::Write,
            offset,
            // Saturates for payloads over 4 GiB, which `prepare` then rejects as a length
            // mismatch rather than silently truncating.
            length: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            payload,
            timestamp,
            flags: Flags::NONE,
        }
    }

    /// The same entry with `flags` set.
    #[must_use]
    pub fn with_flags(mut self, flags: Flags) -> Self {
        self.flags = flags;
        self
    }
}

/// A record header, decoded and checked (its checksum and every field rule hold).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record describes.
    pub kind: RecordKind,
    /// How the payload is stored.
    pub codec: Codec,
    /// Record flags.
    pub flags: Flags,
    /// Disk of the job.
    pub disk: DiskId,
    /// Generation that wrote the record.
    pub generation: Generation,
    /// Position in the job's journal.
    pub seq: Seq,
    /// Caller's timestamp.
    pub timestamp: Timestamp,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Plaintext payload length, or extent length for `Trim` / `WriteZeroes`.
    pub length: u32,
    /// Length of the payload as stored after the header. Invariant: `length` for
    /// `Codec::None` with a payload, less than `length` for `Codec::Zstd`, zero without a
    /// payload.
    pub stored_length: u32,
    /// blake3 of the plaintext payload (of the empty string when there is none).
    pub payload_hash: [u8; 32],
    /// crc32c of the payload as stored (compressed or not): catches any change to the
    /// stored bytes, even one that would decompress to the same plaintext.
    pub stored_crc: u32,
}

impl RecordHeader {
    /// Length of the whole record as stored: header plus stored payload.
    pub fn record_bytes(&self) -> usize {
        RECORD_HEADER_BYTES + self.stored_length as usize
    }

    /// Length of the plaintext payload (`length` for kinds with a payload, else zero).
    pub fn payload_bytes(&self) -> usize {
        if self.kind.has_payload() {
            self.length as usize
        } else {
            0
        }
    }

    /// The header as stored, checksum included.
    pub fn encode(&self) -> [u8; RECORD_HEADER_BYTES] {
        let mut out = [0u8; RECORD_HEADER_BYTES];
        out[0..4].copy_from_slice(&RECORD_MAGIC);
        out[4..6].copy_from_slice(&RECORD_VERSION.to_le_bytes());
        out[6] = self.kind.to_byte();
        out[7] = self.codec.to_byte();
        out[8..10].copy_from_slice(&self.flags.bits().to_le_bytes());
        // 10..12 reserved, zero.
        out[12..16].copy_from_slice(&self.disk.0.to_le_bytes());
        out[16..24].copy_from_slice(&self.generation.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.seq.0.to_le_bytes());
        out[32..40].copy_from_slice(&self.timestamp.0.to_le_bytes());
        out[40..48].copy_from_slice(&self.offset.to_le_bytes());
        out[48..52].copy_from_slice(&self.length.to_le_bytes());
        out[52..56].copy_from_slice(&self.stored_length.to_le_bytes());
        out[56..88].copy_from_slice(&self.payload_hash);
        out[88..92].copy_from_slice(&self.stored_crc.to_le_bytes());
        let crc = crc32c::crc32c(&out[..HEADER_CRC_AT]);
        out[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Checks the rules that tie the fields together (see `docs/journal-format.md`).
    fn check_fields(&self) -> Result<(), InvalidRecord> {
        if self.seq < Seq::FIRST || self.seq > Seq::MAX {
            return Err(InvalidRecord::SeqOutOfRange { seq: self.seq });
        }
        if self.offset.checked_add(u64::from(self.length)).is_none() {
            return Err(InvalidRecord::ExtentOverflow {
                offset: self.offset,
                length: self.length,
            });
        }
        let extent_ok = match self.kind {
            RecordKind::Flush => self.offset == 0 && self.length == 0,
            RecordKind::Checkpoint | RecordKind::Resync => self.offset == 0,
            RecordKind::Write | RecordKind::Trim | RecordKind::WriteZeroes => true,
        };
        if !extent_ok {
            return Err(InvalidRecord::NonZeroExtent {
                kind: self.kind,
                offset: self.offset,
                length: self.length,
            });
        }
        if self.kind.has_payload() {
            if self.length > RECORD_PAYLOAD_BYTES_MAX {
                return Err(InvalidRecord::PayloadTooLarge {
                    length: self.length,
                });
            }
            let stored_ok = match self.codec {
                Codec::None => self.stored_length == self.length,
                Codec::Zstd => self.stored_length > 0 && self.stored_length < self.length,
            };
            if !stored_ok {
                return Err(InvalidRecord::StoredLength {
                    codec: self.codec,
                    length: self.length,
                    stored_length: self.stored_length,
                });
            }
        } else if self.codec != Codec::None || self.stored_length != 0 {
            return Err(InvalidRecord::StoredLength {
                codec: self.codec,
                length: self.length,
                stored_length: self.stored_length,
            });
        }
        Ok(())
    }
}

/// A verified record with its plaintext payload, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The header fields.
    pub header: RecordHeader,
    /// The plaintext payload (decompressed, blake3 checked).
    pub payload: Vec<u8>,
}

/// A verified record whose plaintext payload borrows from the input or the decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// The header fields.
    pub header: RecordHeader,
    /// The plaintext payload (decompressed, blake3 checked).
    pub payload: &'a [u8],
}

impl RecordRef<'_> {
    /// An owned copy.
    pub fn to_record(&self) -> Record {
        Record {
            header: self.header,
            payload: self.payload.to_vec(),
        }
    }
}

/// A verified record exactly as stored (header and stored payload, compressed or not): what
/// the shipper sends and a landing journal stores, without recompression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// The header fields (already checked against `bytes`).
    pub header: RecordHeader,
    /// The record's bytes as stored: `header.record_bytes()` long.
    pub bytes: Vec<u8>,
}

/// Why an entry cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The entry breaks a field rule of the format (wrong length for its payload, payload on
    /// a kind that has none, extent overflow, payload over the maximum, …).
    #[error("invalid entry: {reason}")]
    InvalidEntry {
        /// The rule it breaks.
        reason: InvalidRecord,
    },
}

/// Why bytes are not (yet) a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are the start of a record but not all of it: decode again once the buffer
    /// holds at least `record_bytes_min` bytes.
    #[error("incomplete record: need at least {record_bytes_min} bytes")]
    Incomplete {
        /// A lower bound on the length of the whole record, larger than the input.
        record_bytes_min: usize,
    },
    /// The bytes can never become a valid record, whatever follows them.
    #[error("invalid record: {reason}")]
    Invalid {
        /// What is wrong with them.
        reason: InvalidRecord,
    },
}

impl From<InvalidRecord> for DecodeError {
    fn from(reason: InvalidRecord) -> Self {
        DecodeError::Invalid { reason }
    }
}

/// What makes bytes an invalid record (or an entry unencodable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRecord {
    /// The first four bytes are not `CDPR`.
    #[error("bad magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// The header is of a version this code does not read.
    #[error("unsupported record version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// The header's crc32c does not match its bytes.
    #[error("header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum {
        /// The checksum stored in the header.
        stored: u32,
        /// The checksum of the header bytes.
        computed: u32,
    },
    /// The kind byte is not one the format defines.
    #[error("unknown record kind {byte}")]
    UnknownKind {
        /// The byte found.
        byte: u8,
    },
    /// The codec byte is not one the format defines.
    #[error("unknown codec {byte}")]
    UnknownCodec {
        /// The byte found.
        byte: u8,
    },
    /// A flag bit this version does not define is set.
    #[error("unknown flags {bits:#06x}")]
    UnknownFlags {
        /// The flag bits found.
        bits: u16,
    },
    /// A reserved header field is not zero.
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
    /// The seq is zero or above [`Seq::MAX`].
    #[error("seq {seq} is out of range")]
    SeqOutOfRange {
        /// The seq found.
        seq: Seq,
    },
    /// `offset + length` does not fit in a u64.
    #[error("extent at offset {offset} with length {length} overflows")]
    ExtentOverflow {
        /// The offset.
        offset: u64,
        /// The length.
        length: u32,
    },
    /// A `Flush` with a non-zero offset or length, or a `Checkpoint` with a non-zero offset.
    #[error("{kind:?} record with offset {offset} and length {length}")]
    NonZeroExtent {
        /// The kind.
        kind: RecordKind,
        /// The offset.
        offset: u64,
        /// The length.
        length: u32,
    },
    /// The payload is longer than [`RECORD_PAYLOAD_BYTES_MAX`].
    #[error("payload length {length} exceeds the maximum {RECORD_PAYLOAD_BYTES_MAX}")]
    PayloadTooLarge {
        /// The length claimed or given.
        length: u32,
    },
    /// The entry's `length` does not match its payload (or a kind without payload got one).
    #[error("{kind:?} entry with length {length} and a payload of {payload_bytes} bytes")]
    PayloadLength {
        /// The kind.
        kind: RecordKind,
        /// The length given.
        length: u32,
        /// The payload's length.
        payload_bytes: usize,
    },
    /// The stored length does not fit the kind, codec and length.
    #[error("stored length {stored_length} does not fit codec {codec:?} and length {length}")]
    StoredLength {
        /// The codec.
        codec: Codec,
        /// The plaintext or extent length.
        length: u32,
        /// The stored length.
        stored_length: u32,
    },
    /// The crc32c of the stored payload does not match the header.
    #[error("stored payload checksum mismatch: header {stored:#010x}, computed {computed:#010x}")]
    StoredChecksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the stored bytes.
        computed: u32,
    },
    /// The zstd frame does not decompress.
    #[error("payload does not decompress: {error}")]
    Decompress {
        /// zstd's error name.
        error: &'static str,
    },
    /// The zstd frame decompresses to a different length than the header says.
    #[error("payload decompresses to {found} bytes, header says {length}")]
    DecompressedLength {
        /// The length in the header.
        length: u32,
        /// The length found.
        found: usize,
    },
    /// The blake3 of the plaintext payload does not match the header.
    #[error("payload blake3 mismatch")]
    PayloadHash,
    /// A sync frame carries another segment's nonce (it was not written by this segment).
    #[error("sync frame nonce does not match the segment")]
    SyncFrameNonce,
    /// The frame extends past the end of the segment file.
    #[error("frame of at least {frame_bytes_min} bytes extends past the end of the segment")]
    PastEnd {
        /// The frame's length, as far as it is known.
        frame_bytes_min: u64,
    },
    /// A segment's sync frame claims a length shorter than its header or past the segment.
    #[error("sync frame of {frame_bytes} bytes does not fit")]
    SyncFrameLength {
        /// The length claimed.
        frame_bytes: u32,
    },
}

/// Decodes and checks a record header (magic, version, checksum, field rules) from the start
/// of `bytes`. Does not look at the payload.
pub fn decode_header(bytes: &[u8]) -> Result<RecordHeader, DecodeError> {
    let Some(head) = bytes.get(..RECORD_HEADER_BYTES) else {
        return Err(DecodeError::Incomplete {
            record_bytes_min: RECORD_HEADER_BYTES,
        });
    };
    let mut r = Le(head);
    let magic = r.array::<4>(0);
    if magic != RECORD_MAGIC {
        return Err(InvalidRecord::BadMagic { found: magic }.into());
    }
    let version = r.u16(4);
    if version != RECORD_VERSION {
        return Err(InvalidRecord::UnsupportedVersion { version }.into());
    }
    let stored = r.u32(HEADER_CRC_AT);
    let computed = crc32c::crc32c(&head[..HEADER_CRC_AT]);
    if stored != computed {
        return Err(InvalidRecord::HeaderChecksum { stored, computed }.into());
    }
    let kind =
        RecordKind::from_byte(head[6]).ok_or(InvalidRecord::UnknownKind { byte: head[6] })?;
    let codec = Codec::from_byte(head[7]).ok_or(InvalidRecord::UnknownCodec { byte: head[7] })?;
    let bits = r.u16(8);
    let flags = Flags::from_bits(bits).ok_or(InvalidRecord::UnknownFlags { bits })?;
    if r.u16(10) != 0 {
        return Err(InvalidRecord::ReservedNotZero.into());
    }
    let header = RecordHeader {
        kind,
        codec,
        flags,
        disk: DiskId(r.u32(12)),
        generation: Generation(r.u64(16)),
        seq: Seq(r.u64(24)),
        timestamp: Timestamp(r.u64(32)),
        offset: r.u64(40),
        length: r.u32(48),
        stored_length: r.u32(52),
        payload_hash: r.array::<32>(56),
        stored_crc: r.u32(88),
    };
    header.check_fields()?;
    Ok(header)
}

/// Decodes and fully verifies one record from the start of `bytes`; returns it (payload
/// decompressed) and the number of bytes it occupies. Allocates a fresh decoder: use
/// [`RecordDecoder`] to decode many.
pub fn decode_record(bytes: &[u8]) -> Result<(Record, usize), DecodeError> {
    let mut decoder = RecordDecoder::new();
    let (record, used) = decoder.decode(bytes)?;
    Ok((record.to_record(), used))
}

/// Verifies one record as stored at the start of `bytes` (header, decompression, blake3) and
/// returns its header and length: `bytes[..length]` are then safe to ship or store as is.
pub fn verify_stored(bytes: &[u8]) -> Result<(RecordHeader, usize), DecodeError> {
    RecordDecoder::new().verify_stored(bytes)
}

/// Encodes one record with a fresh encoder: the bytes as they are stored and shipped.
pub fn encode_record(
    entry: &Entry<'_>,
    generation: Generation,
    seq: Seq,
    compression: Compression,
) -> Result<Vec<u8>, EncodeError> {
    let mut prepared = RecordEncoder::new(compression).prepare(entry)?;
    prepared.finish(generation, seq)?;
    Ok(prepared.into_bytes())
}

/// Turns entries into stored records; keeps one zstd context for reuse.
pub struct RecordEncoder {
    compression: Compression,
    /// Created on first use; `None` afterwards only if zstd could not allocate a context, in
    /// which case payloads are stored raw (compression is an optimisation, never required).
    compressor: Option<zstd::bulk::Compressor<'static>>,
    compressor_tried: bool,
}

impl std::fmt::Debug for RecordEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordEncoder")
            .field("compression", &self.compression)
            .finish_non_exhaustive()
    }
}

impl RecordEncoder {
    /// An encoder that stores payloads as `compression` says.
    pub fn new(compression: Compression) -> Self {
        RecordEncoder {
            compression,
            compressor: None,
            compressor_tried: false,
        }
    }

    /// Checks `entry`, hashes its payload and stores it (compressed when that makes it
    /// smaller). The seq and generation are added by [`PreparedRecord::finish`], so the costly
    /// part can run before the caller takes the journal's append lock.
    pub fn prepare(&mut self, entry: &Entry<'_>) -> Result<PreparedRecord, EncodeError> {
        let payload = entry.payload;
        let expected_payload = if entry.kind.has_payload() {
            entry.length as usize
        } else {
            0
        };
        if entry.kind.has_payload() && entry.length > RECORD_PAYLOAD_BYTES_MAX {
            return Err(EncodeError::InvalidEntry {
                reason: InvalidRecord::PayloadTooLarge {
                    length: entry.length,
                },
            });
        }
        if payload.len() != expected_payload {
            return Err(EncodeError::InvalidEntry {
                reason: InvalidRecord::PayloadLength {
                    kind: entry.kind,
                    length: entry.length,
                    payload_bytes: payload.len(),
                },
            });
        }
        let mut bytes = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
        bytes.resize(RECORD_HEADER_BYTES, 0);
        let codec = if self.compress_into(payload, &mut bytes) {
            Codec::Zstd
        } else {
            bytes.truncate(RECORD_HEADER_BYTES);
            bytes.extend_from_slice(payload);
            Codec::None
        };
        let stored_length = u32::try_from(bytes.len() - RECORD_HEADER_BYTES).map_err(|_| {
            EncodeError::InvalidEntry {
                reason: InvalidRecord::PayloadTooLarge {
                    length: entry.length,
                },
            }
        })?;
        let header = RecordHeader {
            kind: entry.kind,
            codec,
            flags: entry.flags,
            disk: entry.disk,
            generation: Generation(0),
            seq: Seq::FIRST,
            timestamp: entry.timestamp,
            offset: entry.offset,
            length: entry.length,
            stored_length,
            payload_hash: *blake3::hash(payload).as_bytes(),
            stored_crc: crc32c::crc32c(&bytes[RECORD_HEADER_BYTES..]),
        };
        header
            .check_fields()
            .map_err(|reason| EncodeError::InvalidEntry { reason })?;
        Ok(PreparedRecord { header, bytes })
    }

    /// Appends the zstd frame of `payload` to `out` (which holds the header area) and returns
    /// true if compression is enabled, worth trying, and makes the payload smaller. On false,
    /// `out` holds garbage after the header area, which the caller replaces.
    fn compress_into(&mut self, payload: &[u8], out: &mut Vec<u8>) -> bool {
        let Compression::Zstd { level } = self.compression else {
            return false;
        };
        if payload.len() < COMPRESS_MIN_BYTES || looks_incompressible(payload) {
            return false;
        }
        if !self.compressor_tried {
            self.compressor_tried = true;
            self.compressor = zstd::bulk::Compressor::new(level).ok();
        }
        let Some(compressor) = self.compressor.as_mut() else {
            return false;
        };
        if payload.len() >= COMPRESS_PROBE_MIN_BYTES {
            // Probe: a sample that does not shrink by 1/16 says the payload is (mostly)
            // incompressible, so the full attempt is skipped. Costs one small compression.
            let sample = &payload[..COMPRESS_PROBE_BYTES];
            let limit = COMPRESS_PROBE_BYTES - COMPRESS_PROBE_BYTES / 16;
            out.resize(RECORD_HEADER_BYTES + limit, 0);
            if compressor
                .compress_to_buffer(sample, &mut out[RECORD_HEADER_BYTES..])
                .is_err()
            {
                return false;
            }
        }
        // The frame must be strictly smaller than the payload, else it is not worth storing.
        out.resize(RECORD_HEADER_BYTES + payload.len() - 1, 0);
        match compressor.compress_to_buffer(payload, &mut out[RECORD_HEADER_BYTES..]) {
            Ok(written) => {
                out.truncate(RECORD_HEADER_BYTES + written);
                true
            }
            Err(_) => false,
        }
    }
}

/// A cheap test (well under a microsecond) that says a payload is not worth a zstd attempt:
/// the collision entropy of a 512-byte sample is above 7 bits per byte. Random, encrypted
/// and already-compressed data land near 7.4 (the sample's bias below 8); text and most
/// binary structures far below. Like btrfs's compression heuristic it samples and counts;
/// it uses the sum of squared counts rather than logarithms so it costs no floating point.
/// Data that is uniform byte-wise yet LZ-compressible within one record (a random block
/// repeated inside the same write) is stored raw: a rare case, and only space is lost.
pub fn looks_incompressible(payload: &[u8]) -> bool {
    const PIECES: usize = 16;
    const PIECE_BYTES: usize = ENTROPY_SAMPLE_BYTES / PIECES;
    if payload.len() < ENTROPY_SAMPLE_BYTES {
        return false;
    }
    let mut counts = [0u32; 256];
    let stride = (payload.len() - PIECE_BYTES) / (PIECES - 1);
    for piece in 0..PIECES {
        let start = piece * stride;
        for &byte in &payload[start..start + PIECE_BYTES] {
            counts[byte as usize] += 1;
        }
    }
    // Collision entropy H2 = -log2(sum p^2) > 7  <=>  sum c^2 < n^2 / 128.
    let sum_squares: u64 = counts.iter().map(|&c| u64::from(c) * u64::from(c)).sum();
    let n = ENTROPY_SAMPLE_BYTES as u64;
    sum_squares < n * n / 128
}

/// An entry hashed and stored, waiting for its seq and generation.
#[derive(Debug)]
pub struct PreparedRecord {
    header: RecordHeader,
    /// Invariant: the first [`RECORD_HEADER_BYTES`] are the header area (filled by
    /// `finish`), the rest is the payload as stored (`header.stored_length` bytes).
    bytes: Vec<u8>,
}

impl PreparedRecord {
    /// Sets the seq and generation, writes the header and returns the record as stored.
    pub fn finish(&mut self, generation: Generation, seq: Seq) -> Result<&[u8], EncodeError> {
        self.header.generation = generation;
        self.header.seq = seq;
        self.header
            .check_fields()
            .map_err(|reason| EncodeError::InvalidEntry { reason })?;
        self.bytes[..RECORD_HEADER_BYTES].copy_from_slice(&self.header.encode());
        Ok(&self.bytes)
    }

    /// The header (seq and generation as last set by `finish`).
    pub fn header(&self) -> &RecordHeader {
        &self.header
    }

    /// Length of the record as stored.
    pub fn record_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The bytes as stored (valid only after `finish`).
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Decodes and verifies stored records; keeps one zstd context and one scratch buffer (at
/// most [`RECORD_PAYLOAD_BYTES_MAX`] bytes) for reuse.
#[derive(Default)]
pub struct RecordDecoder {
    dctx: Option<zstd::zstd_safe::DCtx<'static>>,
    /// Decompression output. Invariant: never longer than `RECORD_PAYLOAD_BYTES_MAX`, because
    /// it is only grown to a `length` that passed `check_fields`.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for RecordDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordDecoder")
            .field("scratch_bytes", &self.scratch.len())
            .finish_non_exhaustive()
    }
}

impl RecordDecoder {
    /// A decoder with no buffers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes and fully verifies the record at the start of `bytes`: returns it with its
    /// plaintext payload (borrowed from `bytes` or from the decoder) and its stored length.
    pub fn decode<'a>(
        &'a mut self,
        bytes: &'a [u8],
    ) -> Result<(RecordRef<'a>, usize), DecodeError> {
        let header = decode_header(bytes)?;
        let total = header.record_bytes();
        let Some(stored) = bytes.get(RECORD_HEADER_BYTES..total) else {
            return Err(DecodeError::Incomplete {
                record_bytes_min: total,
            });
        };
        let payload = self.plaintext(&header, stored)?;
        Ok((RecordRef { header, payload }, total))
    }

    /// Verifies the record as stored at the start of `bytes` and returns its header and
    /// length, so that exactly `bytes[..length]` can be shipped or stored as is.
    pub fn verify_stored(&mut self, bytes: &[u8]) -> Result<(RecordHeader, usize), DecodeError> {
        let (record, total) = self.decode(bytes)?;
        Ok((record.header, total))
    }

    /// The verified plaintext of a record whose header checked out.
    fn plaintext<'a>(
        &'a mut self,
        header: &RecordHeader,
        stored: &'a [u8],
    ) -> Result<&'a [u8], InvalidRecord> {
        let computed = crc32c::crc32c(stored);
        if computed != header.stored_crc {
            return Err(InvalidRecord::StoredChecksum {
                stored: header.stored_crc,
                computed,
            });
        }
        let payload: &[u8] = match header.codec {
            Codec::None => stored,
            Codec::Zstd => {
                let length = header.length as usize;
                if self.scratch.len() < length {
                    self.scratch.resize(length, 0);
                }
                let dctx = self
                    .dctx
                    // `create` panics only when zstd cannot allocate its context: an
                    // out-of-memory condition, treated like a failed Vec allocation (abort).
                    .get_or_insert_with(zstd::zstd_safe::DCtx::create);
                let out = &mut self.scratch[..length];
                let found =
                    dctx.decompress(out, stored)
                        .map_err(|code| InvalidRecord::Decompress {
                            error: zstd::zstd_safe::get_error_name(code),
                        })?;
                if found != length {
                    return Err(InvalidRecord::DecompressedLength {
                        length: header.length,
                        found,
                    });
                }
                &self.scratch[..length]
            }
        };
        if blake3::hash(payload).as_bytes() != &header.payload_hash {
            return Err(InvalidRecord::PayloadHash);
        }
        Ok(payload)
    }
}

/// Little-endian reads at fixed offsets of a slice whose length the caller checked.
struct Le<'a>(&'a [u8]);

impl Le<'_> {
    fn array<const N: usize>(&mut self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        // Callers pass constant offsets inside a slice of known length (a header); a short
        // slice would be a bug here, and yields zeros rather than a panic.
        if let Some(bytes) = self.0.get(at..at + N) {
            out.copy_from_slice(bytes);
        }
        out
    }
    fn u16(&mut self, at: usize) -> u16 {
        u16::from_le_bytes(self.array(at))
    }
    fn u32(&mut self, at: usize) -> u32 {
        u32::from_le_bytes(self.array(at))
    }
    fn u64(&mut self, at: usize) -> u64 {
        u64::from_le_bytes(self.array(at))
    }
}

pub(crate) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    Le(bytes).u32(at)
}

pub(crate) fn le_u64(bytes: &[u8], at: usize) -> u64 {
    Le(bytes).u64(at)
}

pub(crate) fn le_array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    Le(bytes).array(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: RecordKind, offset: u64, length: u32, payload: &[u8]) -> Entry<'_> {
        Entry {
            disk: DiskId(3),
            kind,
            offset,
            length,
            payload,
            timestamp: Timestamp(1_700_000_000_000_000),
            flags: Flags::FUA,
        }
    }

    fn encode(entry: &Entry<'_>, compression: Compression) -> Vec<u8> {
        encode_record(entry, Generation(7), Seq(42), compression).unwrap()
    }

    /// The data-driven helper: decoding `input` gives `expected` (a header summary or error).
    fn check(input: &[u8], expected: Result<(RecordKind, Codec, usize), DecodeError>) {
        let got = decode_record(input).map(|(r, used)| (r.header.kind, r.header.codec, used));
        assert_eq!(got, expected, "input of {} bytes", input.len());
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    #[test]
    fn round_trips_every_kind_and_codec() {
        let text = b"all work and no play makes jack a dull boy. ".repeat(100);
        let noise = random(70_000, 9);
        let cases: Vec<(Entry<'_>, Codec)> = vec![
            (entry(RecordKind::Write, 4096, 0, b""), Codec::None),
            (entry(RecordKind::Write, 512, 5, b"hello"), Codec::None),
            (
                entry(RecordKind::Write, 0, text.len() as u32, &text),
                Codec::Zstd,
            ),
            (
                entry(RecordKind::Write, 8192, noise.len() as u32, &noise),
                Codec::None,
            ),
            (entry(RecordKind::Trim, 1 << 30, 1 << 20, b""), Codec::None),
            (
                entry(RecordKind::WriteZeroes, 0, u32::MAX, b""),
                Codec::None,
            ),
            (entry(RecordKind::Flush, 0, 0, b""), Codec::None),
            (entry(RecordKind::Checkpoint, 0, 6, b"before"), Codec::None),
        ];
        for (e, codec) in cases {
            let bytes = encode(&e, Compression::default());
            check(&bytes, Ok((e.kind, codec, bytes.len())));
            let (record, _) = decode_record(&bytes).unwrap();
            assert_eq!(record.payload, e.payload);
            assert_eq!(record.header.seq, Seq(42));
            assert_eq!(record.header.generation, Generation(7));
            assert_eq!(record.header.offset, e.offset);
            assert_eq!(record.header.length, e.length);
            assert_eq!(record.header.flags, Flags::FUA);
            assert_eq!(record.header.timestamp, e.timestamp);
            assert_eq!(verify_stored(&bytes).unwrap().1, bytes.len());
            // Without compression every payload is stored raw.
            let raw = encode(&e, Compression::None);
            check(&raw, Ok((e.kind, Codec::None, raw.len())));
        }
    }

    #[test]
    fn header_layout_is_as_documented() {
        let bytes = encode(
            &entry(RecordKind::Write, 0x0102, 3, b"abc"),
            Compression::None,
        );
        assert_eq!(&bytes[0..4], b"CDPR");
        assert_eq!(&bytes[4..6], &[1, 0]);
        assert_eq!(bytes[6], 1);
        assert_eq!(bytes[7], 0);
        assert_eq!(&bytes[8..10], &[1, 0]);
        assert_eq!(&bytes[12..16], &[3, 0, 0, 0]);
        assert_eq!(&bytes[16..24], &7u64.to_le_bytes());
        assert_eq!(&bytes[24..32], &42u64.to_le_bytes());
        assert_eq!(&bytes[40..48], &0x0102u64.to_le_bytes());
        assert_eq!(&bytes[48..52], &3u32.to_le_bytes());
        assert_eq!(&bytes[52..56], &3u32.to_le_bytes());
        assert_eq!(&bytes[56..88], blake3::hash(b"abc").as_bytes());
        assert_eq!(&bytes[88..92], &crc32c::crc32c(b"abc").to_le_bytes());
        assert_eq!(&bytes[92..96], &crc32c::crc32c(&bytes[..92]).to_le_bytes());
        assert_eq!(&bytes[96..], b"abc");
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let text = b"0123456789abcdef".repeat(64);
        let bytes = encode(
            &entry(RecordKind::Write, 0, 1024, &text),
            Compression::default(),
        );
        for cut in 0..bytes.len() {
            let need = if cut < RECORD_HEADER_BYTES {
                RECORD_HEADER_BYTES
            } else {
                bytes.len()
            };
            check(
                &bytes[..cut],
                Err(DecodeError::Incomplete {
                    record_bytes_min: need,
                }),
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_invalid() {
        let text = b"0123456789abcdef".repeat(64);
        for compression in [Compression::None, Compression::default()] {
            let bytes = encode(&entry(RecordKind::Write, 0, 1024, &text), compression);
            for at in 0..bytes.len() {
                for bit in [0x01u8, 0x80] {
                    let mut bad = bytes.clone();
                    bad[at] ^= bit;
                    let got = decode_record(&bad);
                    assert!(
                        matches!(got, Err(DecodeError::Invalid { .. })),
                        "byte {at} bit {bit:#x}: {got:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn field_rules() {
        let bad = |e: Entry<'_>| encode_record(&e, Generation(1), Seq(1), Compression::None);
        let invalid = |reason| Err(EncodeError::InvalidEntry { reason });
        assert_eq!(
            bad(entry(RecordKind::Write, 0, 4, b"abc")),
            invalid(InvalidRecord::PayloadLength {
                kind: RecordKind::Write,
                length: 4,
                payload_bytes: 3
            })
        );
        assert_eq!(
            bad(entry(RecordKind::Trim, 0, 4, b"abc")),
            invalid(InvalidRecord::PayloadLength {
                kind: RecordKind::Trim,
                length: 4,
                payload_bytes: 3
            })
        );
        assert_eq!(
            bad(entry(RecordKind::Flush, 1, 0, b"")),
            invalid(InvalidRecord::NonZeroExtent {
                kind: RecordKind::Flush,
                offset: 1,
                length: 0
            })
        );
        assert_eq!(
            bad(entry(RecordKind::Trim, u64::MAX, 1, b"")),
            invalid(InvalidRecord::ExtentOverflow {
                offset: u64::MAX,
                length: 1
            })
        );
        assert_eq!(
            bad(entry(
                RecordKind::Write,
                0,
                RECORD_PAYLOAD_BYTES_MAX + 1,
                b""
            )),
            invalid(InvalidRecord::PayloadTooLarge {
                length: RECORD_PAYLOAD_BYTES_MAX + 1
            })
        );
        let ok = encode_record(
            &entry(RecordKind::Write, 0, 1, b"x"),
            Generation(1),
            Seq(0),
            Compression::None,
        );
        assert_eq!(ok, invalid(InvalidRecord::SeqOutOfRange { seq: Seq(0) }));
    }

    /// A header with a valid checksum but a rule broken must still be rejected: the decoder
    /// does not trust the writer.
    #[test]
    fn checksummed_but_inconsistent_headers_are_invalid() {
        let bytes = encode(&entry(RecordKind::Write, 0, 3, b"abc"), Compression::None);
        let reseal = |mut b: Vec<u8>| {
            let crc = crc32c::crc32c(&b[..92]);
            b[92..96].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let mut b = bytes.clone();
        b[52..56].copy_from_slice(&2u32.to_le_bytes());
        check(
            &reseal(b),
            Err(InvalidRecord::StoredLength {
                codec: Codec::None,
                length: 3,
                stored_length: 2,
            }
            .into()),
        );
        let mut b = bytes.clone();
        b[7] = 1; // claims zstd with stored == length
        check(
            &reseal(b),
            Err(InvalidRecord::StoredLength {
                codec: Codec::Zstd,
                length: 3,
                stored_length: 3,
            }
            .into()),
        );
        let mut b = bytes.clone();
        b[6] = 9;
        check(
            &reseal(b),
            Err(InvalidRecord::UnknownKind { byte: 9 }.into()),
        );
        let mut b = bytes.clone();
        b[8] = 2;
        check(
            &reseal(b),
            Err(InvalidRecord::UnknownFlags { bits: 2 }.into()),
        );
        let mut b = bytes.clone();
        b[11] = 1;
        check(&reseal(b), Err(InvalidRecord::ReservedNotZero.into()));
        let mut b = bytes.clone();
        b[96] = b'x';
        check(
            &b,
            Err(InvalidRecord::StoredChecksum {
                stored: crc32c::crc32c(b"abc"),
                computed: crc32c::crc32c(b"xbc"),
            }
            .into()),
        );
        // A payload changed together with its crc still fails blake3.
        let mut b = bytes.clone();
        b[96] = b'x';
        b[88..92].copy_from_slice(&crc32c::crc32c(b"xbc").to_le_bytes());
        check(&reseal(b), Err(InvalidRecord::PayloadHash.into()));
        let mut b = bytes;
        b[4] = 2;
        check(
            &b,
            Err(InvalidRecord::UnsupportedVersion { version: 2 }.into()),
        );
    }

    /// A zstd frame that claims more output than the header's length is refused without
    /// allocating for it (decompression bomb).
    #[test]
    fn zstd_bomb_is_bounded_by_the_header_length() {
        let zeros = vec![0u8; 1 << 20];
        let frame = zstd::bulk::compress(&zeros, 1).unwrap();
        let header = RecordHeader {
            kind: RecordKind::Write,
            codec: Codec::Zstd,
            flags: Flags::NONE,
            disk: DiskId(0),
            generation: Generation(0),
            seq: Seq(1),
            timestamp: Timestamp(0),
            offset: 0,
            length: 4096,
            stored_length: frame.len() as u32,
            payload_hash: *blake3::hash(&zeros[..4096]).as_bytes(),
            stored_crc: crc32c::crc32c(&frame),
        };
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(&frame);
        match decode_record(&bytes) {
            Err(DecodeError::Invalid {
                reason: InvalidRecord::Decompress { .. },
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn entropy_heuristic() {
        assert!(looks_incompressible(&random(4096, 3)));
        assert!(looks_incompressible(&random(1 << 20, 4)));
        let text: Vec<u8> = (0..20_000u64)
            .flat_map(|i| format!("line {i} value {}\n", i * 7919 % 10007).into_bytes())
            .collect();
        let compressed = zstd::bulk::compress(&text, 3).unwrap();
        assert!(compressed.len() > 4096);
        assert!(looks_incompressible(&compressed));
        assert!(!looks_incompressible(&text));
        assert!(!looks_incompressible(&random(ENTROPY_SAMPLE_BYTES - 1, 5)));
        assert!(!looks_incompressible(&[0u8; 4096]));
        assert!(!looks_incompressible(
            &b"all work and no play makes jack. ".repeat(200)
        ));
        // Half zeros: compressible, and the sample sees it.
        let mut half = random(4096, 6);
        half[2048..].fill(0);
        assert!(!looks_incompressible(&half));
        // Random bytes restricted to 64 values: 6 bits of entropy, zstd saves ~25%.
        let six_bits: Vec<u8> = random(4096, 7).iter().map(|b| b & 0x3f).collect();
        assert!(!looks_incompressible(&six_bits));
    }

    #[test]
    fn incompressible_payloads_are_stored_raw_and_probe_skips_them() {
        for len in [COMPRESS_MIN_BYTES, 4096, COMPRESS_PROBE_MIN_BYTES, 1 << 18] {
            let noise = random(len, len as u64);
            let bytes = encode(
                &entry(RecordKind::Write, 0, len as u32, &noise),
                Compression::default(),
            );
            check(
                &bytes,
                Ok((RecordKind::Write, Codec::None, RECORD_HEADER_BYTES + len)),
            );
        }
        // Compressible after an incompressible first probe is stored raw (documented cost of
        // the probe); compressible from the start is compressed.
        let mut mixed = random(COMPRESS_PROBE_BYTES, 1);
        mixed.extend(std::iter::repeat_n(b'a', 60_000));
        let bytes = encode(
            &entry(RecordKind::Write, 0, mixed.len() as u32, &mixed),
            Compression::default(),
        );
        check(&bytes, Ok((RecordKind::Write, Codec::None, bytes.len())));
        let small = b"a".repeat(COMPRESS_MIN_BYTES - 1);
        let bytes = encode(
            &entry(RecordKind::Write, 0, small.len() as u32, &small),
            Compression::default(),
        );
        check(&bytes, Ok((RecordKind::Write, Codec::None, bytes.len())));
    }
}
