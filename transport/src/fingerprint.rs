//! Certificate fingerprints: the blake3 hash of a certificate's DER encoding, shown as 64
//! lowercase hex digits. A fingerprint is what both sides pin; the certificate itself is
//! never trusted for anything else (no chains, no names, no validity dates).
//!
//! An operator can recompute one with
//! `openssl x509 -in cert.pem -outform der | b3sum`.

use std::fmt;
use std::str::FromStr;

/// Number of bytes in a fingerprint (a blake3 hash).
pub const FINGERPRINT_BYTES: usize = 32;

/// The blake3 hash of a DER-encoded certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; FINGERPRINT_BYTES]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_certificate(der: &[u8]) -> Self {
        Self(*blake3::hash(der).as_bytes())
    }

    /// The raw hash.
    pub fn as_bytes(&self) -> &[u8; FINGERPRINT_BYTES] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_encode(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Why a string is not a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a fingerprint: {0}")]
pub struct ParseFingerprintError(#[from] pub ParseHexError);

impl FromStr for Fingerprint {
    type Err = ParseFingerprintError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(hex_decode_32(text)?))
    }
}

/// Why a string is not 32 bytes of hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseHexError {
    /// The string does not have exactly 64 characters.
    #[error("expected {expected} hex digits, found {found} characters")]
    Length {
        /// Characters required.
        expected: usize,
        /// Characters given.
        found: usize,
    },
    /// A character is not a hex digit.
    #[error("character {position} is not a hex digit")]
    NotHex {
        /// Zero-based position of the first bad character.
        position: usize,
    },
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// Decodes exactly 32 bytes of hex (either case).
pub(crate) fn hex_decode_32(text: &str) -> Result<[u8; 32], ParseHexError> {
    let mut out = [0u8; 32];
    hex_decode_into(text, &mut out)?;
    Ok(out)
}

/// Decodes exactly `out.len()` bytes of hex (either case) into `out`.
pub(crate) fn hex_decode_into(text: &str, out: &mut [u8]) -> Result<(), ParseHexError> {
    let digits = text.as_bytes();
    if digits.len() != out.len() * 2 {
        return Err(ParseHexError::Length {
            expected: out.len() * 2,
            found: text.chars().count(),
        });
    }
    let value = |position: usize| -> Result<u8, ParseHexError> {
        match digits[position] {
            digit @ b'0'..=b'9' => Ok(digit - b'0'),
            digit @ b'a'..=b'f' => Ok(digit - b'a' + 10),
            digit @ b'A'..=b'F' => Ok(digit - b'A' + 10),
            _ => Err(ParseHexError::NotHex { position }),
        }
    };
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = (value(2 * index)? << 4) | value(2 * index + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<&str, &str>) {
        let got = input
            .parse::<Fingerprint>()
            .map(|fingerprint| fingerprint.to_string())
            .map_err(|err| err.to_string());
        assert_eq!(
            got,
            expected.map(str::to_owned).map_err(str::to_owned),
            "{input:?}"
        );
    }

    #[test]
    fn parse_and_display() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        check(hex, Ok(hex));
        check(&hex.to_uppercase(), Ok(hex));
        check(
            "0011",
            Err("not a fingerprint: expected 64 hex digits, found 4 characters"),
        );
        check(
            &format!("{}g", &hex[..63]),
            Err("not a fingerprint: character 63 is not a hex digit"),
        );
        check(
            &format!("{}é", &hex[..62]),
            Err("not a fingerprint: character 62 is not a hex digit"),
        );
        check(
            "",
            Err("not a fingerprint: expected 64 hex digits, found 0 characters"),
        );
    }

    #[test]
    fn fingerprint_is_blake3_of_der() {
        let fingerprint = Fingerprint::of_certificate(b"abc");
        assert_eq!(
            fingerprint.to_string(),
            blake3::hash(b"abc").to_hex().as_str()
        );
    }
}
