//! The journal's vocabulary: newtypes for sequence numbers, generations, disks, jobs and
//! timestamps, and the closed enums for record kinds, codecs and flags.
//!
//! Newtypes exist so that a seq cannot be passed where a generation is expected. Nothing here
//! performs I/O or reads the clock: a [`Timestamp`] is always given by the caller.

use std::fmt;

/// Position of a record in a job's journal. Dense per job: the first appended record is
/// `Seq(1)`, every later one is the previous plus one. `Seq(0)` means "none".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub u64);

impl Seq {
    /// "No record": the head of an empty journal, the durable seq before the first sync.
    pub const NONE: Seq = Seq(0);
    /// The first seq a journal hands out.
    pub const FIRST: Seq = Seq(1);
    /// Largest seq the format accepts. Far beyond any real journal (2^63 records); the bound
    /// exists so that `next()` can never overflow on a seq read from a damaged file.
    pub const MAX: Seq = Seq(1 << 63);

    /// The seq after this one.
    ///
    /// Saturates at `u64::MAX`; every seq read from storage or the network is checked against
    /// [`Seq::MAX`] first, so saturation is unreachable for valid journals.
    #[must_use]
    pub fn next(self) -> Seq {
        Seq(self.0.saturating_add(1))
    }

    /// The seq before this one (`Seq(0)` stays `Seq(0)`).
    #[must_use]
    pub fn prev(self) -> Seq {
        Seq(self.0.saturating_sub(1))
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Generation of a job's history (as DRBD's generation identifiers): a new one starts at every
/// promotion. Every record and every segment carries the generation that wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A protected disk within a job (consistency group).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskId(pub u32);

/// A replication job: the unit of sequencing. One journal serves exactly one job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub [u8; 16]);

impl JobId {
    /// Parses 32 hex digits (either case), as [`Display`](fmt::Display) writes them.
    pub fn parse_hex(text: &str) -> Option<JobId> {
        if text.len() != 32 || !text.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(JobId(out))
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Wall-clock time of a write in microseconds since the Unix epoch, as the caller saw it.
/// The journal stores it and never interprets it (it may go backwards between records).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// A timestamp from microseconds since the Unix epoch.
    pub const fn from_unix_micros(micros: u64) -> Self {
        Timestamp(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn unix_micros(self) -> u64 {
        self.0
    }
}

/// What a record describes. The byte values are part of the on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// Data written at `offset`; `length` is the plaintext payload length.
    Write,
    /// The extent `offset..offset+length` was discarded; no payload.
    Trim,
    /// The extent `offset..offset+length` now reads as zeros; no payload.
    WriteZeroes,
    /// A flush: every earlier record of the job is covered by it; no payload, offset and
    /// length zero.
    Flush,
    /// A named point in time; the payload is the caller's label (for example the checkpoint
    /// name), `length` is its length, offset zero.
    Checkpoint,
    /// A step of a resync (begin, block hashes of one region, end); the payload is a
    /// [`crate::resync::ResyncMark`], `length` is its length, offset zero.
    Resync,
}

impl RecordKind {
    /// Every kind, in format order (for tests and generators).
    pub const ALL: [RecordKind; 6] = [
        RecordKind::Write,
        RecordKind::Trim,
        RecordKind::WriteZeroes,
        RecordKind::Flush,
        RecordKind::Checkpoint,
        RecordKind::Resync,
    ];

    /// The byte stored in the record header.
    pub const fn to_byte(self) -> u8 {
        match self {
            RecordKind::Write => 1,
            RecordKind::Trim => 2,
            RecordKind::WriteZeroes => 3,
            RecordKind::Flush => 4,
            RecordKind::Checkpoint => 5,
            RecordKind::Resync => 6,
        }
    }

    /// The kind stored as `byte`, if the format knows it.
    pub const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Trim),
            3 => Some(RecordKind::WriteZeroes),
            4 => Some(RecordKind::Flush),
            5 => Some(RecordKind::Checkpoint),
            6 => Some(RecordKind::Resync),
            _ => None,
        }
    }

    /// Whether records of this kind carry a payload (`length` is then the payload length).
    pub const fn has_payload(self) -> bool {
        matches!(
            self,
            RecordKind::Write | RecordKind::Checkpoint | RecordKind::Resync
        )
    }
}

/// How a record's payload is stored. The byte values are part of the on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Stored as is.
    None,
    /// One zstd frame that decompresses to exactly `length` bytes.
    Zstd,
}

impl Codec {
    /// The byte stored in the record header.
    pub const fn to_byte(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Zstd => 1,
        }
    }

    /// The codec stored as `byte`, if the format knows it.
    pub const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// Record flags. Unknown bits are rejected by the decoder (a new flag needs a new version).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u16);

impl Flags {
    /// No flag set.
    pub const NONE: Flags = Flags(0);
    /// The client asked for forced unit access: the write is durable before it is
    /// acknowledged.
    pub const FUA: Flags = Flags(1);
    /// Every bit this version of the format defines.
    pub const KNOWN: Flags = Flags(1);

    /// Flags from their stored bits, if every set bit is known.
    pub const fn from_bits(bits: u16) -> Option<Flags> {
        if bits & !Self::KNOWN.0 == 0 {
            Some(Flags(bits))
        } else {
            None
        }
    }

    /// The stored bits.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// Whether every flag of `other` is set in `self`.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` with every flag of `other` set.
    #[must_use]
    pub const fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
}

/// How the journal stores payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Never compress.
    None,
    /// Try zstd at `level` on every payload of at least
    /// [`COMPRESS_MIN_BYTES`](crate::record::COMPRESS_MIN_BYTES) and keep the result only
    /// when it makes the stored record smaller.
    Zstd {
        /// zstd compression level (1 is the measured default; negative levels are faster).
        level: i32,
    },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd { level: 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_and_codec_bytes_round_trip() {
        for kind in RecordKind::ALL {
            assert_eq!(RecordKind::from_byte(kind.to_byte()), Some(kind));
        }
        for codec in [Codec::None, Codec::Zstd] {
            assert_eq!(Codec::from_byte(codec.to_byte()), Some(codec));
        }
        assert_eq!(RecordKind::from_byte(0), None);
        assert_eq!(RecordKind::from_byte(7), None);
        assert_eq!(Codec::from_byte(2), None);
    }

    #[test]
    fn unknown_flags_are_rejected() {
        assert_eq!(Flags::from_bits(0), Some(Flags::NONE));
        assert_eq!(Flags::from_bits(1), Some(Flags::FUA));
        assert_eq!(Flags::from_bits(2), None);
        assert_eq!(Flags::from_bits(0x8000), None);
        assert!(Flags::FUA.contains(Flags::FUA));
        assert!(!Flags::NONE.contains(Flags::FUA));
    }

    #[test]
    fn job_id_displays_as_hex() {
        let mut id = [0u8; 16];
        id[0] = 0xab;
        id[15] = 0x01;
        assert_eq!(JobId(id).to_string(), "ab000000000000000000000000000001");
        assert_eq!(
            JobId::parse_hex("ab000000000000000000000000000001"),
            Some(JobId(id))
        );
        assert_eq!(
            JobId::parse_hex("AB000000000000000000000000000001"),
            Some(JobId(id))
        );
        for bad in [
            "",
            "ab",
            "ab00000000000000000000000000000g",
            "ab0000000000000000000000000000011",
            "é0000000000000000000000000000001",
        ] {
            assert_eq!(JobId::parse_hex(bad), None, "{bad:?}");
        }
    }
}
