//! Fuzz bodies: each takes arbitrary bytes, decodes them as a stream of frames the way a
//! server reads its socket, and checks that every decoded frame re-encodes to the bytes it
//! came from. `fuzz/` (cargo-fuzz, nightly) calls these; `cargo test -p nbd` runs them over
//! the seed corpus in `fuzz/corpus/`. A panic here is a finding, so these bodies assert.

use crate::handshake::{ClientFlags, HandshakeFlags, ServerGreeting};
use crate::option::{ClientOption, OptionReply, OptionRequest};
use crate::transmission::{Request, SimpleReplyHeader, StructuredChunk};
use crate::verdict::{judge, ExportParams};
use crate::wire::DecodeError;
use crate::{BlockSizes, TransmissionFlags};

/// Bound on write payloads the request target accepts, in bytes (the agent's maximum block
/// size).
pub const PAYLOAD_BYTES_MAX: u32 = 32 << 20;
/// Bound on option data the option target accepts, in bytes (the agent's default).
pub const OPTION_BYTES_MAX: u32 = 16 << 10;

/// Decodes `data` as transmission-phase requests, judges each against a small export, and
/// checks that each re-encodes exactly.
pub fn decode_request(data: &[u8]) {
    let export = ExportParams {
        size_bytes: 1 << 20,
        block_sizes: BlockSizes {
            min_bytes: 512,
            preferred_bytes: 4096,
            max_bytes: PAYLOAD_BYTES_MAX,
        },
        flags: TransmissionFlags(0x17d),
    };
    let mut rest = data;
    loop {
        match Request::decode(rest, PAYLOAD_BYTES_MAX) {
            Ok((request, used)) => {
                assert!(
                    used > 0 && used <= rest.len(),
                    "decoder consumed {used} bytes"
                );
                let _ = judge(&request.header, &export);
                let mut out = Vec::new();
                request.encode(&mut out);
                assert_eq!(out, rest[..used], "request does not round-trip");
                rest = &rest[used..];
            }
            Err(DecodeError::Incomplete { frame_bytes_min }) => {
                assert!(frame_bytes_min > rest.len(), "incomplete but enough bytes");
                return;
            }
            Err(DecodeError::Invalid(_)) => return,
        }
    }
}

/// Decodes `data` as the client's side of a handshake: client flags, then option requests,
/// each interpreted and re-encoded.
pub fn decode_option(data: &[u8]) {
    let offered = HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES;
    let mut rest = match ClientFlags::decode(data, offered) {
        Ok((flags, used)) => {
            let mut out = Vec::new();
            flags.encode(&mut out);
            assert_eq!(out, data[..used], "client flags do not round-trip");
            &data[used..]
        }
        // Without valid flags the stream may still be options only: decode those.
        Err(_) => data,
    };
    loop {
        match OptionRequest::decode(rest, OPTION_BYTES_MAX) {
            Ok((request, used)) => {
                assert!(
                    used > 0 && used <= rest.len(),
                    "decoder consumed {used} bytes"
                );
                let mut out = Vec::new();
                request.encode(&mut out);
                assert_eq!(out, rest[..used], "option request does not round-trip");
                if let Ok(option) = ClientOption::parse(&request) {
                    let mut again = Vec::new();
                    option.encode(&mut again);
                    let (reparsed, _) = OptionRequest::decode(&again, u32::MAX)
                        .unwrap_or_else(|e| panic!("re-encoded option does not decode: {e}"));
                    assert_eq!(
                        ClientOption::parse(&reparsed).ok(),
                        Some(option),
                        "option does not round-trip"
                    );
                }
                rest = &rest[used..];
            }
            Err(DecodeError::Incomplete { frame_bytes_min }) => {
                assert!(frame_bytes_min > rest.len(), "incomplete but enough bytes");
                return;
            }
            Err(DecodeError::Invalid(_)) => return,
        }
    }
}

/// Runs every decoder of this crate, server and client side, over `data`: the two targets
/// above plus greetings, option replies, simple replies and structured chunks.
pub fn decode_any(data: &[u8]) {
    decode_request(data);
    decode_option(data);
    let _ = ServerGreeting::decode(data);
    let _ = SimpleReplyHeader::decode(data);
    let mut rest = data;
    while let Ok((reply, used)) = OptionReply::decode(rest, OPTION_BYTES_MAX) {
        let _ = crate::option::InfoReply::parse(reply.data);
        let _ = crate::option::ServerEntry::parse(reply.data);
        rest = &rest[used..];
    }
    let mut rest = data;
    while let Ok((chunk, used)) = StructuredChunk::decode(rest, PAYLOAD_BYTES_MAX) {
        let mut out = Vec::new();
        chunk.encode(&mut out);
        assert_eq!(out, rest[..used], "chunk does not round-trip");
        rest = &rest[used..];
    }
}
