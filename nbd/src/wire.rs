//! Big-endian cursor over a byte slice and the one decode error type shared by every frame.
//!
//! Every read is bounds-checked and reports how many bytes the frame needs in total, so the
//! codecs never index past the end of their input and never panic.

use thiserror::Error;

/// Longest string (export name, description, error message) the protocol allows, in bytes.
pub const STRING_BYTES_MAX: usize = 4096;

/// Why a buffer could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The buffer holds the start of a frame but not all of it: read until the buffer holds at
    /// least `frame_bytes_min` bytes and decode again.
    #[error("incomplete frame: need at least {frame_bytes_min} bytes")]
    Incomplete {
        /// A lower bound on the length of the whole frame, larger than the buffer given.
        frame_bytes_min: usize,
    },
    /// The bytes can never become a valid frame, whatever follows them.
    #[error("invalid frame: {0}")]
    Invalid(#[from] Invalid),
}

/// What makes a frame invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Invalid {
    /// The frame does not start with the magic number its position in the stream requires.
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic {
        /// The magic number the frame must start with.
        expected: u64,
        /// The magic number found.
        found: u64,
    },
    /// The client set flags the server never advertised (the server must then hang up).
    #[error("unknown client flags {flags:#x}")]
    UnknownClientFlags {
        /// The client flags as sent.
        flags: u32,
    },
    /// The client flags ask for zero-less export-name replies the server did not offer.
    #[error("client flags {flags:#x} ask for a feature the server did not advertise")]
    UnadvertisedClientFlags {
        /// The client flags as sent.
        flags: u32,
    },
    /// Option data longer than the decoder's bound.
    #[error("option data of {data_bytes} bytes exceeds the bound of {data_bytes_max} bytes")]
    OptionTooLarge {
        /// Length announced in the option header.
        data_bytes: u32,
        /// The decoder's bound.
        data_bytes_max: u32,
    },
    /// A payload (write data, reply data, chunk payload) longer than the decoder's bound.
    #[error("payload of {payload_bytes} bytes exceeds the bound of {payload_bytes_max} bytes")]
    PayloadTooLarge {
        /// Length announced in the frame header.
        payload_bytes: u64,
        /// The decoder's bound.
        payload_bytes_max: u64,
    },
    /// A field whose value the protocol forbids in this frame.
    #[error("malformed {what}")]
    Malformed {
        /// Which field or rule was broken.
        what: &'static str,
    },
}

/// A forward-only reader of big-endian fields.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left after the cursor.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes, or `Incomplete` naming the total this frame needs.
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(Invalid::Malformed {
            what: "length overflows the address space",
        })?;
        match self.buf.get(self.pos..end) {
            Some(slice) => {
                self.pos = end;
                Ok(slice)
            }
            None => Err(DecodeError::Incomplete {
                frame_bytes_min: end,
            }),
        }
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Reads a 64-bit magic number and checks it.
    pub(crate) fn magic64(&mut self, expected: u64) -> Result<(), DecodeError> {
        let found = self.u64()?;
        if found != expected {
            return Err(Invalid::BadMagic { expected, found }.into());
        }
        Ok(())
    }

    /// Reads a 32-bit magic number and checks it.
    pub(crate) fn magic32(&mut self, expected: u32) -> Result<(), DecodeError> {
        let found = self.u32()?;
        if found != expected {
            return Err(Invalid::BadMagic {
                expected: u64::from(expected),
                found: u64::from(found),
            }
            .into());
        }
        Ok(())
    }
}

/// Converts a buffer length to a 32-bit length field, saturating: every caller bounds its
/// lengths far below 4 GiB, and a saturated field only makes the peer reject the frame.
pub(crate) fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Converts a buffer length to a 16-bit length field, saturating (see [`len_u32`]).
pub(crate) fn len_u16(len: usize) -> u16 {
    u16::try_from(len).unwrap_or(u16::MAX)
}

/// Checks the protocol's rules for strings: UTF-8, no NUL, at most [`STRING_BYTES_MAX`] bytes.
pub(crate) fn protocol_str(bytes: &[u8]) -> Option<&str> {
    if bytes.len() > STRING_BYTES_MAX || bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// Truncates a string to at most `max` bytes on a character boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
