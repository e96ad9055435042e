//! The server's judgement of a request header against what was negotiated for the export:
//! execute it, answer it with an error, do nothing, or disconnect. Pure, so every server
//! built on this crate (the capture agent, the appliance's recovery views) errors the same
//! requests the same way, and the table lives in one tested place.
//!
//! Never touches data: a rejected request must leave the export and any journal unchanged.

use crate::transmission::{
    BlockSizes, Command, CommandFlags, ErrorCode, RequestHeader, TransmissionFlags,
};

/// What the transmission phase agreed on for one export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportParams {
    /// Export size in bytes.
    pub size_bytes: u64,
    /// Advertised block size constraints.
    pub block_sizes: BlockSizes,
    /// Advertised transmission flags.
    pub flags: TransmissionFlags,
}

/// A request the server must carry out, with its flags parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Read `length` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes to read (nonzero, at most the maximum block size).
        length: u32,
    },
    /// Write the request's payload at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload bytes (nonzero, at most the maximum block size).
        length: u32,
        /// Persist before replying.
        fua: bool,
    },
    /// Make every write already answered durable.
    Flush,
    /// Discard a range (this server zeroes it, so it reads back as zeroes).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Bytes to discard (nonzero).
        length: u32,
        /// Persist before replying.
        fua: bool,
    },
    /// Zero a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes to zero (nonzero).
        length: u32,
        /// Persist before replying.
        fua: bool,
        /// The range must stay allocated (no hole may be punched).
        no_hole: bool,
    },
}

/// The server's decision on one request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Carry the operation out and reply.
    Execute(Operation),
    /// A zero-length request: valid, nothing to do, reply success (the protocol leaves the
    /// behaviour open and asks only that the server not disconnect).
    Nothing,
    /// Reply with `error` and carry on; the reason is for the log and for structured error
    /// messages.
    Reject {
        /// The NBD error to send.
        error: ErrorCode,
        /// Why, for humans.
        reason: &'static str,
    },
    /// `NBD_CMD_DISC`: finish in-flight requests and close; no reply.
    Disconnect,
}

fn reject(error: ErrorCode, reason: &'static str) -> Verdict {
    Verdict::Reject { error, reason }
}

/// Judges `header` against `export`. Checks, in order: read-only export, known and
/// advertised command, known and applicable flags, length against the maximum block size
/// (`READ` and `WRITE`, the commands whose length is a payload), alignment to the minimum
/// block size, range within the export, zero length.
///
/// On an export advertising `NBD_FLAG_READ_ONLY`, `WRITE`, `TRIM` and `WRITE_ZEROES` are
/// answered `EPERM` before anything else is looked at: the protocol asks for `EPERM` for a
/// write or trim on a read-only export, and such an export advertises neither `SEND_TRIM`
/// nor `SEND_WRITE_ZEROES`, so the advertised-command check would otherwise answer `EINVAL`.
pub fn judge(header: &RequestHeader, export: &ExportParams) -> Verdict {
    use TransmissionFlags as T;
    let advertised = |flag: T| export.flags.contains(flag);
    let writes = matches!(
        header.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && advertised(T::READ_ONLY) {
        return reject(ErrorCode::EPERM, "export is read-only");
    }

    let command_ok = match header.command {
        Command::Read | Command::Write | Command::Disc => true,
        Command::Flush => advertised(T::SEND_FLUSH),
        Command::Trim => advertised(T::SEND_TRIM),
        Command::WriteZeroes => advertised(T::SEND_WRITE_ZEROES),
        Command::Cache => advertised(T::SEND_CACHE),
        Command::BlockStatus | Command::Other(_) => false,
    };
    if !command_ok {
        return reject(ErrorCode::EINVAL, "unknown or unadvertised command");
    }

    let mut allowed = CommandFlags(0);
    if advertised(T::SEND_FUA) {
        allowed = allowed | CommandFlags::FUA;
    }
    match header.command {
        Command::Read if advertised(T::SEND_DF) => allowed = allowed | CommandFlags::DF,
        Command::WriteZeroes => {
            allowed = allowed | CommandFlags::NO_HOLE;
            if advertised(T::SEND_FAST_ZERO) {
                allowed = allowed | CommandFlags::FAST_ZERO;
            }
        }
        _ => {}
    }
    if header.flags.0 & !allowed.0 != 0 {
        return reject(ErrorCode::EINVAL, "command flag not valid for this command");
    }
    let fua = header.flags.contains(CommandFlags::FUA);

    match header.command {
        Command::Disc => return Verdict::Disconnect,
        // Offset and length are reserved for FLUSH; tolerated rather than refused.
        Command::Flush => return Verdict::Execute(Operation::Flush),
        _ => {}
    }

    let (offset, length) = (header.offset, header.length);
    let payload_command = matches!(header.command, Command::Read | Command::Write);
    if payload_command && length > export.block_sizes.max_bytes {
        return reject(ErrorCode::EINVAL, "length exceeds the maximum block size");
    }
    let min = u64::from(export.block_sizes.min_bytes.max(1));
    if offset % min != 0 || u64::from(length) % min != 0 {
        return reject(
            ErrorCode::EINVAL,
            "request not aligned to the minimum block size",
        );
    }
    let in_range = offset
        .checked_add(u64::from(length))
        .is_some_and(|end| end <= export.size_bytes);
    if !in_range {
        return match header.command {
            Command::Write | Command::WriteZeroes => reject(
                ErrorCode::ENOSPC,
                "request extends past the end of the export",
            ),
            _ => reject(
                ErrorCode::EINVAL,
                "request extends past the end of the export",
            ),
        };
    }
    if length == 0 {
        return Verdict::Nothing;
    }
    let op = match header.command {
        Command::Read => Operation::Read { offset, length },
        Command::Write => Operation::Write {
            offset,
            length,
            fua,
        },
        Command::Trim => Operation::Trim {
            offset,
            length,
            fua,
        },
        Command::WriteZeroes => Operation::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: header.flags.contains(CommandFlags::NO_HOLE),
        },
        // CACHE is only reachable if a server advertises it; this crate's servers do not.
        _ => return reject(ErrorCode::EINVAL, "unsupported command"),
    };
    Verdict::Execute(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transmission::Handle;

    const FLAGS: TransmissionFlags = TransmissionFlags(
        TransmissionFlags::HAS_FLAGS.0
            | TransmissionFlags::SEND_FLUSH.0
            | TransmissionFlags::SEND_FUA.0
            | TransmissionFlags::SEND_TRIM.0
            | TransmissionFlags::SEND_WRITE_ZEROES.0
            | TransmissionFlags::CAN_MULTI_CONN.0,
    );

    fn export(flags: TransmissionFlags) -> ExportParams {
        ExportParams {
            size_bytes: 1 << 20,
            block_sizes: BlockSizes {
                min_bytes: 512,
                preferred_bytes: 4096,
                max_bytes: 65536,
            },
            flags,
        }
    }

    /// Judges one request (command, flags, offset, length) and compares the verdict, as
    /// text, with `expected`.
    fn check(flags: TransmissionFlags, req: (u16, u16, u64, u32), expected: &str) {
        let header = RequestHeader {
            command: Command::from_code(req.0),
            flags: CommandFlags(req.1),
            handle: Handle(1),
            offset: req.2,
            length: req.3,
        };
        let got = match judge(&header, &export(flags)) {
            Verdict::Reject { error, reason } => format!("{} {reason}", error.name()),
            other => format!("{other:?}"),
        };
        assert_eq!(got, expected, "request {req:?}");
    }

    #[test]
    fn verdicts() {
        let f = FLAGS;
        check(
            f,
            (0, 0, 0, 4096),
            "Execute(Read { offset: 0, length: 4096 })",
        );
        check(
            f,
            (1, 1, 512, 512),
            "Execute(Write { offset: 512, length: 512, fua: true })",
        );
        check(f, (3, 0, 0, 0), "Execute(Flush)");
        check(f, (3, 1, 7, 9), "Execute(Flush)");
        check(f, (2, 0, 0, 0), "Disconnect");
        check(
            f,
            (4, 0, 0, 1 << 20),
            "Execute(Trim { offset: 0, length: 1048576, fua: false })",
        );
        check(
            f,
            (6, 3, 0, 1 << 20),
            "Execute(WriteZeroes { offset: 0, length: 1048576, fua: true, no_hole: true })",
        );
        // Zero length.
        check(f, (0, 0, 0, 0), "Nothing");
        check(f, (1, 0, 1 << 20, 0), "Nothing");
        // Unknown, unadvertised, unsupported commands.
        check(f, (9, 0, 0, 512), "EINVAL unknown or unadvertised command");
        check(f, (5, 0, 0, 512), "EINVAL unknown or unadvertised command");
        check(f, (7, 0, 0, 512), "EINVAL unknown or unadvertised command");
        check(
            TransmissionFlags::HAS_FLAGS,
            (3, 0, 0, 0),
            "EINVAL unknown or unadvertised command",
        );
        check(
            TransmissionFlags::HAS_FLAGS,
            (4, 0, 0, 512),
            "EINVAL unknown or unadvertised command",
        );
        check(
            TransmissionFlags::HAS_FLAGS,
            (6, 0, 0, 512),
            "EINVAL unknown or unadvertised command",
        );
        // Flags.
        check(
            f,
            (0, 4, 0, 512),
            "EINVAL command flag not valid for this command",
        );
        check(
            f | TransmissionFlags::SEND_DF,
            (0, 4, 0, 512),
            "Execute(Read { offset: 0, length: 512 })",
        );
        check(
            f,
            (1, 2, 0, 512),
            "EINVAL command flag not valid for this command",
        );
        check(
            f,
            (6, 16, 0, 512),
            "EINVAL command flag not valid for this command",
        );
        check(
            f,
            (1, 0x8000, 0, 512),
            "EINVAL command flag not valid for this command",
        );
        check(
            TransmissionFlags::HAS_FLAGS,
            (1, 1, 0, 512),
            "EINVAL command flag not valid for this command",
        );
        // Read-only.
        check(
            f | TransmissionFlags::READ_ONLY,
            (1, 0, 0, 512),
            "EPERM export is read-only",
        );
        check(
            f | TransmissionFlags::READ_ONLY,
            (0, 0, 0, 512),
            "Execute(Read { offset: 0, length: 512 })",
        );
        // Read-only as a recovery view advertises it (no flush, FUA, trim or write-zeroes):
        // every kind of write is EPERM, advertised or not, whatever its flags, range or
        // length; reads go on as usual.
        let ro = TransmissionFlags(
            TransmissionFlags::HAS_FLAGS.0
                | TransmissionFlags::READ_ONLY.0
                | TransmissionFlags::CAN_MULTI_CONN.0,
        );
        check(ro, (1, 0, 0, 512), "EPERM export is read-only");
        check(ro, (1, 1, 0, 512), "EPERM export is read-only");
        check(ro, (1, 0, 1 << 30, 512), "EPERM export is read-only");
        check(ro, (1, 0, 0, 0), "EPERM export is read-only");
        check(ro, (4, 0, 0, 512), "EPERM export is read-only");
        check(ro, (6, 2, 0, 512), "EPERM export is read-only");
        check(
            ro,
            (0, 0, 0, 512),
            "Execute(Read { offset: 0, length: 512 })",
        );
        check(ro, (0, 0, 0, 0), "Nothing");
        check(
            ro,
            (0, 1, 0, 512),
            "EINVAL command flag not valid for this command",
        );
        check(ro, (3, 0, 0, 0), "EINVAL unknown or unadvertised command");
        check(ro, (2, 0, 0, 0), "Disconnect");
        // Larger than the maximum block size: READ and WRITE only.
        check(
            f,
            (0, 0, 0, 65536 + 512),
            "EINVAL length exceeds the maximum block size",
        );
        check(
            f,
            (1, 0, 0, u32::MAX),
            "EINVAL length exceeds the maximum block size",
        );
        // Misaligned.
        check(
            f,
            (0, 0, 1, 512),
            "EINVAL request not aligned to the minimum block size",
        );
        check(
            f,
            (1, 0, 0, 511),
            "EINVAL request not aligned to the minimum block size",
        );
        check(
            f,
            (4, 0, 512, 100),
            "EINVAL request not aligned to the minimum block size",
        );
        // Past the end.
        check(
            f,
            (1, 0, (1 << 20) - 512, 1024),
            "ENOSPC request extends past the end of the export",
        );
        check(
            f,
            (6, 0, 1 << 20, 512),
            "ENOSPC request extends past the end of the export",
        );
        check(
            f,
            (0, 0, 1 << 20, 512),
            "EINVAL request extends past the end of the export",
        );
        check(
            f,
            (4, 0, 1 << 21, 512),
            "EINVAL request extends past the end of the export",
        );
        check(
            f,
            (1, 0, u64::MAX - 511, 1024),
            "ENOSPC request extends past the end of the export",
        );
        check(
            f,
            (0, 0, 2 << 20, 0),
            "EINVAL request extends past the end of the export",
        );
    }
}
