//! The NBD protocol as pure codecs over bytes, shared by the agent's capture server and the
//! appliance's recovery views. It performs no I/O and never panics on any input.
//!
//! Shape: every frame has `encode(&self, &mut Vec<u8>)` and
//! `decode(&[u8]) -> Result<(Frame, usize), DecodeError>`, where [`DecodeError::Incomplete`]
//! says how many bytes the frame needs and [`DecodeError::Invalid`] says it can never be
//! valid. Decoders that read a length from the wire take a bound (`*_bytes_max`) and reject
//! anything longer before looking for the bytes. [`verdict::judge`] holds the server's rules
//! for which requests to execute and which errors to answer, so every server built on this
//! crate behaves the same.
//!
//! Covered (fixed newstyle only): greeting, client flags, options `EXPORT_NAME`, `ABORT`,
//! `LIST`, `STARTTLS` (recognised, for refusing), `INFO`, `GO`, `STRUCTURED_REPLY`, any
//! other option kept as raw bytes; replies `ACK`, `SERVER`, `INFO` (`EXPORT`, `NAME`,
//! `DESCRIPTION`, `BLOCK_SIZE`), errors; requests `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`,
//! `WRITE_ZEROES` with `FUA`, `NO_HOLE`, `DF`; simple replies; structured chunks `NONE`,
//! `OFFSET_DATA`, `OFFSET_HOLE`, `ERROR`, `ERROR_OFFSET`.

// Tests may unwrap: a panic there is a failed test. The library itself is linted without
// `cfg(test)` by `cargo clippy --all-targets`, so nothing slips through.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod fuzz;
pub mod handshake;
pub mod option;
pub mod transmission;
pub mod verdict;
mod wire;

pub use handshake::{ClientFlags, ExportNameReply, HandshakeFlags, ServerGreeting};
pub use option::{
    ClientOption, ExportQuery, InfoReply, InfoType, OptionCode, OptionError, OptionHeader,
    OptionReply, OptionRequest, ReplyType, ServerEntry,
};
pub use transmission::{
    BlockSizes, ChunkBody, ChunkHeader, ChunkType, Command, CommandFlags, ErrorCode, Handle,
    ReplyFlags, Request, RequestHeader, SimpleReplyHeader, StructuredChunk, TransmissionFlags,
};
pub use verdict::{judge, ExportParams, Operation, Verdict};
pub use wire::{DecodeError, Invalid, STRING_BYTES_MAX};
