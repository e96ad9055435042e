//! The frames of the fixed-newstyle greeting: the server's greeting, the client's flags and
//! the reply that ends `NBD_OPT_EXPORT_NAME`. Pure codecs; they never perform I/O.

use crate::transmission::TransmissionFlags;
use crate::wire::{DecodeError, Invalid, Reader};

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, the newstyle magic, also the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

/// Handshake flags the server sends in its greeting (16 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandshakeFlags(pub u16);

impl HandshakeFlags {
    /// `NBD_FLAG_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: Self = Self(1 << 0);
    /// `NBD_FLAG_NO_ZEROES`.
    pub const NO_ZEROES: Self = Self(1 << 1);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for HandshakeFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// The server's opening frame: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerGreeting {
    /// The handshake flags offered.
    pub flags: HandshakeFlags,
}

impl ServerGreeting {
    /// Encoded length in bytes.
    pub const LEN: usize = 18;

    /// Appends the frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.flags.0.to_be_bytes());
    }

    /// Decodes the frame from the start of `buf`; returns it and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(buf);
        r.magic64(NBD_MAGIC)?;
        r.magic64(IHAVEOPT)?;
        let flags = HandshakeFlags(r.u16()?);
        Ok((Self { flags }, r.position()))
    }
}

/// The client's flags (32 bits), parsed: only the two flags the protocol defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES`: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Encoded length in bytes.
    pub const LEN: usize = 4;
    const FIXED_NEWSTYLE: u32 = 1 << 0;
    const NO_ZEROES: u32 = 1 << 1;

    /// The 32-bit wire value.
    pub fn bits(&self) -> u32 {
        let mut bits = 0;
        if self.fixed_newstyle {
            bits |= Self::FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            bits |= Self::NO_ZEROES;
        }
        bits
    }

    /// Appends the frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.bits().to_be_bytes());
    }

    /// Decodes the client flags, rejecting unknown flags and flags the server (whose greeting
    /// offered `offered`) did not advertise: the protocol requires the server to hang up then.
    pub fn decode(buf: &[u8], offered: HandshakeFlags) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(buf);
        let flags = r.u32()?;
        if flags & !(Self::FIXED_NEWSTYLE | Self::NO_ZEROES) != 0 {
            return Err(Invalid::UnknownClientFlags { flags }.into());
        }
        let parsed = Self {
            fixed_newstyle: flags & Self::FIXED_NEWSTYLE != 0,
            no_zeroes: flags & Self::NO_ZEROES != 0,
        };
        if (parsed.fixed_newstyle && !offered.contains(HandshakeFlags::FIXED_NEWSTYLE))
            || (parsed.no_zeroes && !offered.contains(HandshakeFlags::NO_ZEROES))
        {
            return Err(Invalid::UnadvertisedClientFlags { flags }.into());
        }
        Ok((parsed, r.position()))
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: export size, transmission flags and, unless
/// the client negotiated `NO_ZEROES`, 124 reserved zero bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size_bytes: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Whether the 124 zero bytes follow (false when `NO_ZEROES` was negotiated).
    pub zero_padding: bool,
}

impl ExportNameReply {
    /// Number of reserved zero bytes.
    pub const PADDING_LEN: usize = 124;

    /// Appends the frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.size_bytes.to_be_bytes());
        out.extend_from_slice(&self.flags.0.to_be_bytes());
        if self.zero_padding {
            out.extend_from_slice(&[0u8; Self::PADDING_LEN]);
        }
    }

    /// Decodes the reply; the client knows from negotiation whether padding follows.
    pub fn decode(buf: &[u8], zero_padding: bool) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(buf);
        let size_bytes = r.u64()?;
        let flags = TransmissionFlags(r.u16()?);
        if zero_padding {
            r.bytes(Self::PADDING_LEN)?;
        }
        Ok((
            Self {
                size_bytes,
                flags,
                zero_padding,
            },
            r.position(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes client flags from `input` and compares with `expected` (`Err` as its message).
    fn check(input: &[u8], offered: HandshakeFlags, expected: Result<(ClientFlags, usize), &str>) {
        let got = ClientFlags::decode(input, offered).map_err(|e| e.to_string());
        assert_eq!(got, expected.map_err(str::to_owned), "input {input:02x?}");
    }

    #[test]
    fn client_flags() {
        let both = HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES;
        let fixed = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: false,
        };
        let all = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        };
        check(&[0, 0, 0, 1], both, Ok((fixed, 4)));
        check(&[0, 0, 0, 3, 9], both, Ok((all, 4)));
        check(&[0, 0, 0, 0], both, Ok((ClientFlags::default(), 4)));
        check(
            &[0, 0, 0],
            both,
            Err("incomplete frame: need at least 4 bytes"),
        );
        check(
            &[0, 0, 0, 4],
            both,
            Err("invalid frame: unknown client flags 0x4"),
        );
        check(
            &[0x80, 0, 0, 1],
            both,
            Err("invalid frame: unknown client flags 0x80000001"),
        );
        check(
            &[0, 0, 0, 3],
            HandshakeFlags::FIXED_NEWSTYLE,
            Err("invalid frame: client flags 0x3 ask for a feature the server did not advertise"),
        );
    }

    #[test]
    fn greeting_round_trip() {
        let greeting = ServerGreeting {
            flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
        };
        let mut out = Vec::new();
        greeting.encode(&mut out);
        assert_eq!(out.len(), ServerGreeting::LEN);
        assert_eq!(&out[..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(ServerGreeting::decode(&out), Ok((greeting, 18)));
        assert_eq!(
            ServerGreeting::decode(&out[..17]),
            Err(DecodeError::Incomplete {
                frame_bytes_min: 18
            })
        );
    }

    #[test]
    fn export_name_reply_padding() {
        for zero_padding in [false, true] {
            let reply = ExportNameReply {
                size_bytes: 1 << 30,
                flags: TransmissionFlags(0x1ed),
                zero_padding,
            };
            let mut out = Vec::new();
            reply.encode(&mut out);
            assert_eq!(out.len(), if zero_padding { 134 } else { 10 });
            assert_eq!(
                ExportNameReply::decode(&out, zero_padding),
                Ok((reply, out.len()))
            );
        }
    }
}
