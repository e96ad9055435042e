//! The transmission phase: requests (`READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`,
//! `WRITE_ZEROES`, ...), simple replies and structured reply chunks (`NONE`, `OFFSET_DATA`,
//! `OFFSET_HOLE`, `ERROR`, `ERROR_OFFSET`). Pure codecs; unknown commands and chunk types are
//! kept as values so the server can answer them, never rejected by a panic.

use crate::wire::{len_u16, len_u32, truncate_str, DecodeError, Invalid, Reader, STRING_BYTES_MAX};

/// Magic number of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic number of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic number of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Transmission flags (16 bits) the server advertises for an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    /// `NBD_FLAG_HAS_FLAGS` (always set).
    pub const HAS_FLAGS: Self = Self(1 << 0);
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: Self = Self(1 << 1);
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: Self = Self(1 << 2);
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: Self = Self(1 << 3);
    /// `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: Self = Self(1 << 4);
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: Self = Self(1 << 5);
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: Self = Self(1 << 6);
    /// `NBD_FLAG_SEND_DF`.
    pub const SEND_DF: Self = Self(1 << 7);
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: Self = Self(1 << 8);
    /// `NBD_FLAG_SEND_RESIZE`.
    pub const SEND_RESIZE: Self = Self(1 << 9);
    /// `NBD_FLAG_SEND_CACHE`.
    pub const SEND_CACHE: Self = Self(1 << 10);
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub const SEND_FAST_ZERO: Self = Self(1 << 11);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for TransmissionFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`), all in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable length and alignment: a power of two, at most 64 KiB.
    pub min_bytes: u32,
    /// Smallest efficient length: a power of two, at least `max(min_bytes, 512)`.
    pub preferred_bytes: u32,
    /// Largest `READ`/`WRITE`/`WRITE_ZEROES` length: a multiple of `min_bytes` and at least
    /// `preferred_bytes`.
    pub max_bytes: u32,
}

impl BlockSizes {
    /// Checks the constraints the protocol puts on the three values.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !self.min_bytes.is_power_of_two() || self.min_bytes > 1 << 16 {
            return Err("minimum block size must be a power of two no larger than 65536");
        }
        if !self.preferred_bytes.is_power_of_two() || self.preferred_bytes < self.min_bytes.max(512)
        {
            return Err(
                "preferred block size must be a power of two of at least max(minimum, 512)",
            );
        }
        if !self.max_bytes.is_multiple_of(self.min_bytes) || self.max_bytes < self.preferred_bytes {
            return Err("maximum block size must be a multiple of the minimum and at least the preferred size");
        }
        Ok(())
    }
}

/// A request's command (16 bits); unknown values are kept so they can be answered `EINVAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE` (the only request with a payload).
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Any other value.
    Other(u16),
}

impl Command {
    /// The 16-bit wire value.
    pub fn code(self) -> u16 {
        match self {
            Self::Read => 0,
            Self::Write => 1,
            Self::Disc => 2,
            Self::Flush => 3,
            Self::Trim => 4,
            Self::Cache => 5,
            Self::WriteZeroes => 6,
            Self::BlockStatus => 7,
            Self::Other(code) => code,
        }
    }

    /// The command for a wire value.
    pub fn from_code(code: u16) -> Self {
        match code {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disc,
            3 => Self::Flush,
            4 => Self::Trim,
            5 => Self::Cache,
            6 => Self::WriteZeroes,
            7 => Self::BlockStatus,
            other => Self::Other(other),
        }
    }

    /// A short lowercase name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Disc => "disc",
            Self::Flush => "flush",
            Self::Trim => "trim",
            Self::Cache => "cache",
            Self::WriteZeroes => "write_zeroes",
            Self::BlockStatus => "block_status",
            Self::Other(_) => "unknown",
        }
    }
}

/// Command flags (16 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CommandFlags(pub u16);

impl CommandFlags {
    /// `NBD_CMD_FLAG_FUA`.
    pub const FUA: Self = Self(1 << 0);
    /// `NBD_CMD_FLAG_NO_HOLE`.
    pub const NO_HOLE: Self = Self(1 << 1);
    /// `NBD_CMD_FLAG_DF`.
    pub const DF: Self = Self(1 << 2);
    /// `NBD_CMD_FLAG_REQ_ONE`.
    pub const REQ_ONE: Self = Self(1 << 3);
    /// `NBD_CMD_FLAG_FAST_ZERO`.
    pub const FAST_ZERO: Self = Self(1 << 4);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for CommandFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// The client's opaque request identifier, echoed in every reply to that request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(pub u64);

/// The fixed 28-byte part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: CommandFlags,
    /// The command.
    pub command: Command,
    /// Echoed in the reply.
    pub handle: Handle,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (for `WRITE`, also the payload length).
    pub length: u32,
}

impl RequestHeader {
    /// Encoded length in bytes.
    pub const LEN: usize = 28;

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_bytes(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }

    /// Appends the header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.0.to_be_bytes());
        out.extend_from_slice(&self.command.code().to_be_bytes());
        out.extend_from_slice(&self.handle.0.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }

    /// Decodes the header; the payload of a `WRITE` is not touched.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(buf);
        r.magic32(REQUEST_MAGIC)?;
        let flags = CommandFlags(r.u16()?);
        let command = Command::from_code(r.u16()?);
        let handle = Handle(r.u64()?);
        let offset = r.u64()?;
        let length = r.u32()?;
        Ok((
            Self {
                flags,
                command,
                handle,
                offset,
                length,
            },
            r.position(),
        ))
    }
}

/// A whole request: header and, for `WRITE`, its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The header.
    pub header: RequestHeader,
    /// The `WRITE` payload (empty for every other command).
    pub payload: &'a [u8],
}

impl<'a> Request<'a> {
    /// Decodes a request; a `WRITE` payload longer than `payload_bytes_max` is invalid as soon
    /// as the header is seen.
    pub fn decode(buf: &'a [u8], payload_bytes_max: u32) -> Result<(Self, usize), DecodeError> {
        let (header, used) = RequestHeader::decode(buf)?;
        let payload_bytes = header.payload_bytes();
        if payload_bytes > payload_bytes_max {
            return Err(Invalid::PayloadTooLarge {
                payload_bytes: u64::from(payload_bytes),
                payload_bytes_max: u64::from(payload_bytes_max),
            }
            .into());
        }
        let mut r = Reader::new(buf);
        r.bytes(used)?;
        let payload = r.bytes(payload_bytes as usize)?;
        Ok((Self { header, payload }, r.position()))
    }

    /// Appends the request to `out`; the header's length is taken as is, so a caller can build
    /// deliberately inconsistent requests for tests.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.header.encode(out);
        out.extend_from_slice(self.payload);
    }
}

/// An NBD error value (32 bits) as carried by replies; zero means success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// Success.
    pub const OK: Self = Self(0);
    /// `NBD_EPERM`.
    pub const EPERM: Self = Self(1);
    /// `NBD_EIO`.
    pub const EIO: Self = Self(5);
    /// `NBD_ENOMEM`.
    pub const ENOMEM: Self = Self(12);
    /// `NBD_EINVAL`.
    pub const EINVAL: Self = Self(22);
    /// `NBD_ENOSPC`.
    pub const ENOSPC: Self = Self(28);
    /// `NBD_EOVERFLOW`.
    pub const EOVERFLOW: Self = Self(75);
    /// `NBD_ENOTSUP`.
    pub const ENOTSUP: Self = Self(95);
    /// `NBD_ESHUTDOWN`.
    pub const ESHUTDOWN: Self = Self(108);

    /// The protocol's name, for logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "OK",
            1 => "EPERM",
            5 => "EIO",
            12 => "ENOMEM",
            22 => "EINVAL",
            28 => "ENOSPC",
            75 => "EOVERFLOW",
            95 => "ENOTSUP",
            108 => "ESHUTDOWN",
            _ => "unknown",
        }
    }
}

/// The 16-byte simple reply header; a successful `READ` reply is followed by `length` bytes
/// of data the client knows from its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReplyHeader {
    /// The error, or [`ErrorCode::OK`].
    pub error: ErrorCode,
    /// The request's handle.
    pub handle: Handle,
}

impl SimpleReplyHeader {
    /// Encoded length in bytes.
    pub const LEN: usize = 16;

    /// Appends the header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.error.0.to_be_bytes());
        out.extend_from_slice(&self.handle.0.to_be_bytes());
    }

    /// Decodes the header.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(buf);
        r.magic32(SIMPLE_REPLY_MAGIC)?;
        let error = ErrorCode(r.u32()?);
        let handle = Handle(r.u64()?);
        Ok((Self { error, handle }, r.position()))
    }
}

/// Structured reply flags (16 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ReplyFlags(pub u16);

impl ReplyFlags {
    /// `NBD_REPLY_FLAG_DONE`: the last chunk of this reply.
    pub const DONE: Self = Self(1 << 0);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

/// A structured reply chunk type (16 bits); bit 15 marks error chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkType(pub u16);

impl ChunkType {
    /// `NBD_REPLY_TYPE_NONE`.
    pub const NONE: Self = Self(0);
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    pub const OFFSET_DATA: Self = Self(1);
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    pub const OFFSET_HOLE: Self = Self(2);
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    pub const BLOCK_STATUS: Self = Self(5);
    /// `NBD_REPLY_TYPE_ERROR`.
    pub const ERROR: Self = Self((1 << 15) + 1);
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub const ERROR_OFFSET: Self = Self((1 << 15) + 2);

    /// Whether this is an error chunk type.
    pub fn is_error(self) -> bool {
        self.0 & (1 << 15) != 0
    }
}

/// The 20-byte header of a structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags.
    pub flags: ReplyFlags,
    /// Chunk type.
    pub kind: ChunkType,
    /// The request's handle.
    pub handle: Handle,
    /// Length of the payload that follows, in bytes.
    pub payload_bytes: u32,
}

impl ChunkHeader {
    /// Encoded length in bytes.
    pub const LEN: usize = 20;

    /// Appends the header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.0.to_be_bytes());
        out.extend_from_slice(&self.kind.0.to_be_bytes());
        out.extend_from_slice(&self.handle.0.to_be_bytes());
        out.extend_from_slice(&self.payload_bytes.to_be_bytes());
    }

    /// Decodes the header.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(buf);
        r.magic32(STRUCTURED_REPLY_MAGIC)?;
        let flags = ReplyFlags(r.u16()?);
        let kind = ChunkType(r.u16()?);
        let handle = Handle(r.u64()?);
        let payload_bytes = r.u32()?;
        Ok((
            Self {
                flags,
                kind,
                handle,
                payload_bytes,
            },
            r.position(),
        ))
    }

    /// Appends the header and the offset of an `OFFSET_DATA` chunk whose `data_bytes` bytes of
    /// data the caller sends next, so large reads need not be copied into one buffer.
    pub fn encode_offset_data_prefix(
        handle: Handle,
        flags: ReplyFlags,
        offset: u64,
        data_bytes: u32,
        out: &mut Vec<u8>,
    ) {
        Self {
            flags,
            kind: ChunkType::OFFSET_DATA,
            handle,
            payload_bytes: data_bytes.saturating_add(8),
        }
        .encode(out);
        out.extend_from_slice(&offset.to_be_bytes());
    }
}

/// A structured reply chunk's payload, interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkBody<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Absolute offset of `data` in the export.
        offset: u64,
        /// At least one byte of data.
        data: &'a [u8],
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Absolute offset of the hole.
        offset: u64,
        /// Hole length in bytes (nonzero).
        hole_bytes: u32,
    },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error {
        /// Nonzero error.
        error: ErrorCode,
        /// Message for humans (may be empty).
        message: &'a str,
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// Nonzero error.
        error: ErrorCode,
        /// Message for humans (may be empty).
        message: &'a str,
        /// Where in the request the error occurred.
        offset: u64,
    },
    /// Any other chunk type (block status included); clients decide what to do with it.
    Other {
        /// Its type.
        kind: ChunkType,
        /// Its payload.
        payload: &'a [u8],
    },
}

impl ChunkBody<'_> {
    /// The chunk type of this body.
    pub fn kind(&self) -> ChunkType {
        match self {
            Self::None => ChunkType::NONE,
            Self::OffsetData { .. } => ChunkType::OFFSET_DATA,
            Self::OffsetHole { .. } => ChunkType::OFFSET_HOLE,
            Self::Error { .. } => ChunkType::ERROR,
            Self::ErrorOffset { .. } => ChunkType::ERROR_OFFSET,
            Self::Other { kind, .. } => *kind,
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Self::None => {}
            Self::OffsetData { offset, data } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(data);
            }
            Self::OffsetHole { offset, hole_bytes } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&hole_bytes.to_be_bytes());
            }
            Self::Error { error, message } => {
                let message = truncate_str(message, STRING_BYTES_MAX);
                out.extend_from_slice(&error.0.to_be_bytes());
                out.extend_from_slice(&len_u16(message.len()).to_be_bytes());
                out.extend_from_slice(message.as_bytes());
            }
            Self::ErrorOffset {
                error,
                message,
                offset,
            } => {
                let message = truncate_str(message, STRING_BYTES_MAX);
                out.extend_from_slice(&error.0.to_be_bytes());
                out.extend_from_slice(&len_u16(message.len()).to_be_bytes());
                out.extend_from_slice(message.as_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
            }
            Self::Other { payload, .. } => out.extend_from_slice(payload),
        }
    }
}

/// A whole structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredChunk<'a> {
    /// Reply flags.
    pub flags: ReplyFlags,
    /// The request's handle.
    pub handle: Handle,
    /// The interpreted payload.
    pub body: ChunkBody<'a>,
}

impl<'a> StructuredChunk<'a> {
    /// Appends the chunk to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut payload = Vec::new();
        self.body.encode_payload(&mut payload);
        ChunkHeader {
            flags: self.flags,
            kind: self.body.kind(),
            handle: self.handle,
            payload_bytes: len_u32(payload.len()),
        }
        .encode(out);
        out.extend_from_slice(&payload);
    }

    /// Decodes a chunk and interprets its payload; payloads longer than `payload_bytes_max`,
    /// and payloads that break their type's length rules, are invalid.
    pub fn decode(buf: &'a [u8], payload_bytes_max: u32) -> Result<(Self, usize), DecodeError> {
        let (header, used) = ChunkHeader::decode(buf)?;
        if header.payload_bytes > payload_bytes_max {
            return Err(Invalid::PayloadTooLarge {
                payload_bytes: u64::from(header.payload_bytes),
                payload_bytes_max: u64::from(payload_bytes_max),
            }
            .into());
        }
        let mut r = Reader::new(buf);
        r.bytes(used)?;
        let payload = r.bytes(header.payload_bytes as usize)?;
        let body = parse_body(header.kind, payload)?;
        if header.kind == ChunkType::NONE && !header.flags.contains(ReplyFlags::DONE) {
            return Err(Invalid::Malformed {
                what: "NONE chunk without the DONE flag",
            }
            .into());
        }
        Ok((
            Self {
                flags: header.flags,
                handle: header.handle,
                body,
            },
            r.position(),
        ))
    }
}

fn parse_body(kind: ChunkType, payload: &[u8]) -> Result<ChunkBody<'_>, DecodeError> {
    let malformed = |what| DecodeError::from(Invalid::Malformed { what });
    let mut r = Reader::new(payload);
    let body = match kind {
        ChunkType::NONE if payload.is_empty() => ChunkBody::None,
        ChunkType::NONE => return Err(malformed("NONE chunk with a payload")),
        ChunkType::OFFSET_DATA if payload.len() >= 9 => ChunkBody::OffsetData {
            offset: r.u64()?,
            data: r.bytes(r.remaining())?,
        },
        ChunkType::OFFSET_DATA => return Err(malformed("OFFSET_DATA chunk shorter than 9 bytes")),
        ChunkType::OFFSET_HOLE if payload.len() == 12 => {
            let offset = r.u64()?;
            let hole_bytes = r.u32()?;
            if hole_bytes == 0 {
                return Err(malformed("OFFSET_HOLE chunk of zero length"));
            }
            ChunkBody::OffsetHole { offset, hole_bytes }
        }
        ChunkType::OFFSET_HOLE => return Err(malformed("OFFSET_HOLE chunk not 12 bytes")),
        ChunkType::ERROR | ChunkType::ERROR_OFFSET => {
            let error = ErrorCode(r.u32().map_err(|_| malformed("error chunk too short"))?);
            let message_bytes =
                usize::from(r.u16().map_err(|_| malformed("error chunk too short"))?);
            let message = r
                .bytes(message_bytes)
                .map_err(|_| malformed("error message longer than its chunk"))?;
            let message = crate::wire::protocol_str(message)
                .ok_or_else(|| malformed("error message not a valid string"))?;
            if error == ErrorCode::OK {
                return Err(malformed("error chunk with error zero"));
            }
            if kind == ChunkType::ERROR {
                if r.remaining() != 0 {
                    return Err(malformed("ERROR chunk with trailing bytes"));
                }
                ChunkBody::Error { error, message }
            } else {
                let offset = r
                    .u64()
                    .map_err(|_| malformed("ERROR_OFFSET chunk too short"))?;
                if r.remaining() != 0 {
                    return Err(malformed("ERROR_OFFSET chunk with trailing bytes"));
                }
                ChunkBody::ErrorOffset {
                    error,
                    message,
                    offset,
                }
            }
        }
        kind => ChunkBody::Other { kind, payload },
    };
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> Vec<u8> {
        let mut out = Vec::new();
        RequestHeader {
            flags: CommandFlags(flags),
            command: Command::from_code(command),
            handle: Handle(0x0102_0304_0506_0708),
            offset,
            length,
        }
        .encode(&mut out);
        out
    }

    /// Decodes `input` as one request (payload bound 64 KiB) and compares the outcome, shown as
    /// text, with `expected`.
    fn check(input: &[u8], expected: &str) {
        let got = match Request::decode(input, 65536) {
            Ok((req, used)) => format!(
                "{used}: {} flags={:#x} offset={} length={} payload={}",
                req.header.command.name(),
                req.header.flags.0,
                req.header.offset,
                req.header.length,
                req.payload.len()
            ),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expected, "input {input:02x?}");
    }

    #[test]
    fn requests() {
        check(
            &header(0, 0, 4096, 512),
            "28: read flags=0x0 offset=4096 length=512 payload=0",
        );
        let mut write = header(1, 1, 0, 4);
        write.extend_from_slice(b"abcdXX");
        check(&write, "32: write flags=0x1 offset=0 length=4 payload=4");
        check(&write[..30], "incomplete frame: need at least 32 bytes");
        check(
            &header(2, 0, 0, 0),
            "28: disc flags=0x0 offset=0 length=0 payload=0",
        );
        check(
            &header(3, 1, 0, 0),
            "28: flush flags=0x1 offset=0 length=0 payload=0",
        );
        check(
            &header(4, 0, 1, 2),
            "28: trim flags=0x0 offset=1 length=2 payload=0",
        );
        check(
            &header(6, 3, 0, 1 << 30),
            "28: write_zeroes flags=0x3 offset=0 length=1073741824 payload=0",
        );
        check(
            &header(42, 0xffff, u64::MAX, u32::MAX),
            "28: unknown flags=0xffff offset=18446744073709551615 length=4294967295 payload=0",
        );
        check(
            &header(1, 0, 0, 65537),
            "invalid frame: payload of 65537 bytes exceeds the bound of 65536 bytes",
        );
        check(
            &header(0, 0, 0, 0)[..27],
            "incomplete frame: need at least 28 bytes",
        );
        check(&[], "incomplete frame: need at least 4 bytes");
        let mut bad = header(0, 0, 0, 0);
        bad[3] = 0x14;
        check(
            &bad,
            "invalid frame: bad magic 0x25609514, expected 0x25609513",
        );
    }

    #[test]
    fn chunks_round_trip() {
        let bodies = [
            ChunkBody::None,
            ChunkBody::OffsetData {
                offset: 512,
                data: b"hello",
            },
            ChunkBody::OffsetHole {
                offset: 0,
                hole_bytes: 4096,
            },
            ChunkBody::Error {
                error: ErrorCode::EINVAL,
                message: "bad",
            },
            ChunkBody::ErrorOffset {
                error: ErrorCode::EIO,
                message: "",
                offset: 7,
            },
            ChunkBody::Other {
                kind: ChunkType::BLOCK_STATUS,
                payload: &[0; 12],
            },
        ];
        for body in bodies {
            let chunk = StructuredChunk {
                flags: ReplyFlags::DONE,
                handle: Handle(9),
                body,
            };
            let mut out = Vec::new();
            chunk.encode(&mut out);
            assert_eq!(
                StructuredChunk::decode(&out, 1 << 20),
                Ok((chunk, out.len()))
            );
        }
    }

    #[test]
    fn offset_data_prefix_matches_full_encoding() {
        let mut full = Vec::new();
        StructuredChunk {
            flags: ReplyFlags::DONE,
            handle: Handle(3),
            body: ChunkBody::OffsetData {
                offset: 1024,
                data: b"xyz",
            },
        }
        .encode(&mut full);
        let mut split = Vec::new();
        ChunkHeader::encode_offset_data_prefix(Handle(3), ReplyFlags::DONE, 1024, 3, &mut split);
        split.extend_from_slice(b"xyz");
        assert_eq!(full, split);
    }

    /// Each malformed chunk is given as (type, flags, payload) and must be rejected.
    #[test]
    fn malformed_chunks() {
        let cases: &[(u16, u16, &[u8])] = &[
            (0, 0, b""),
            (0, 1, b"x"),
            (1, 1, &[0; 8]),
            (2, 1, &[0; 11]),
            (2, 1, &[0; 12]),
            (0x8001, 1, &[0, 0, 0, 22, 0, 5, b'a']),
            (0x8001, 1, &[0, 0, 0, 0, 0, 0]),
            (0x8001, 1, &[0, 0, 0, 22, 0, 0, 1]),
            (0x8002, 1, &[0, 0, 0, 22, 0, 0]),
        ];
        for &(kind, flags, payload) in cases {
            let mut out = Vec::new();
            ChunkHeader {
                flags: ReplyFlags(flags),
                kind: ChunkType(kind),
                handle: Handle(1),
                payload_bytes: payload.len() as u32,
            }
            .encode(&mut out);
            out.extend_from_slice(payload);
            assert!(
                matches!(
                    StructuredChunk::decode(&out, 1 << 20),
                    Err(DecodeError::Invalid(_))
                ),
                "type {kind:#x} payload {payload:?}"
            );
        }
    }

    #[test]
    fn simple_reply_round_trip() {
        let reply = SimpleReplyHeader {
            error: ErrorCode::ENOSPC,
            handle: Handle(77),
        };
        let mut out = Vec::new();
        reply.encode(&mut out);
        assert_eq!(SimpleReplyHeader::decode(&out), Ok((reply, 16)));
    }

    #[test]
    fn block_sizes() {
        let ok = |min, preferred, max| BlockSizes {
            min_bytes: min,
            preferred_bytes: preferred,
            max_bytes: max,
        };
        assert!(ok(1, 4096, 1 << 25).validate().is_ok());
        assert!(ok(512, 4096, 1 << 25).validate().is_ok());
        assert!(ok(3, 4096, 1 << 25).validate().is_err());
        assert!(ok(1 << 17, 1 << 17, 1 << 25).validate().is_err());
        assert!(ok(512, 256, 1 << 25).validate().is_err());
        assert!(ok(512, 4096, 2048).validate().is_err());
        assert!(ok(512, 4096, 4097).validate().is_err());
    }
}
