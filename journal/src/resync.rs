//! The payload of a `Resync` record: the steps of a resync, written into the journal so each
//! sits at an exact seq, ordered with the writes around it. Layout (little-endian), documented
//! in `docs/journal-format.md`:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | step: 1 = begin, 2 = hashes, 3 = end |
//!
//! Begin (the replicas are inconsistent from this seq on):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 1 | 1 | reason: 1 = initial sync, 2 = after tracking (`ahead`), 3 = after an agent restart |
//! | 2 | 8 | bytes to compare (the dirty regions' total) |
//!
//! Hashes (the record's `disk` names the disk):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 1 | 8 | offset of the first block, in bytes |
//! | 9 | 4 | block size in bytes ([`RESYNC_BLOCK_BYTES_MIN`] ..= [`RESYNC_BLOCK_BYTES_MAX`], a power of two) |
//! | 13 | 4 | block count (1 ..= [`RESYNC_HASHES_MAX`]) |
//! | 17 | 16 × count | per block: the first 16 bytes of the blake3 of its content on the source (the last block is hashed as far as the disk reaches) |
//!
//! End (the replicas are consistent again from this seq on): no further bytes.
//!
//! A hashes record is answered by the appliance with a `ResyncNeed` frame naming the blocks
//! whose replica content, at exactly this seq, hashes differently; the agent then appends
//! those blocks as ordinary writes.
//!
//! Must never panic on any input: the appliance decodes what it received.

/// Smallest block a hashes record may describe.
pub const RESYNC_BLOCK_BYTES_MIN: u32 = 4096;
/// Largest block a hashes record may describe.
pub const RESYNC_BLOCK_BYTES_MAX: u32 = 1 << 20;
/// Most blocks in one hashes record.
pub const RESYNC_HASHES_MAX: u32 = 4096;
/// Bytes of one block hash.
pub const BLOCK_HASH_BYTES: usize = 16;

/// Why a resync began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// A new job copies its disks.
    Initial,
    /// The job tracked dirty regions instead of journalling (the appliance was away or slow).
    Ahead,
    /// The agent restarted with regions marked dirty.
    Restart,
}

impl ResyncReason {
    /// The reason's name in logs and the API.
    pub fn name(self) -> &'static str {
        match self {
            ResyncReason::Initial => "initial sync",
            ResyncReason::Ahead => "after tracking",
            ResyncReason::Restart => "after an agent restart",
        }
    }
}

/// One step of a resync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncMark {
    /// The replicas are inconsistent from this record on.
    Begin {
        /// Why.
        reason: ResyncReason,
        /// Bytes the resync compares.
        total_bytes: u64,
    },
    /// The source's block hashes of one extent of the record's disk.
    Hashes {
        /// Offset of the first block.
        offset: u64,
        /// Block size.
        block_bytes: u32,
        /// One hash per block.
        hashes: Vec<[u8; BLOCK_HASH_BYTES]>,
    },
    /// Every dirty region was compared and sent: the replicas are consistent from here on.
    End,
}

/// Why bytes are not a resync mark.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResyncMarkError {
    /// The bytes end early, run on, or break a field rule.
    #[error("resync mark: {0}")]
    Invalid(&'static str),
}

/// The hash of one block as a hashes record carries it.
pub fn block_hash(bytes: &[u8]) -> [u8; BLOCK_HASH_BYTES] {
    let mut out = [0u8; BLOCK_HASH_BYTES];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..BLOCK_HASH_BYTES]);
    out
}

fn block_bytes_ok(block_bytes: u32) -> bool {
    block_bytes.is_power_of_two()
        && (RESYNC_BLOCK_BYTES_MIN..=RESYNC_BLOCK_BYTES_MAX).contains(&block_bytes)
}

impl ResyncMark {
    /// The payload bytes. A hashes mark must have 1 ..= [`RESYNC_HASHES_MAX`] hashes and a
    /// valid block size.
    pub fn encode(&self) -> Result<Vec<u8>, ResyncMarkError> {
        let mut out = Vec::new();
        match self {
            ResyncMark::Begin {
                reason,
                total_bytes,
            } => {
                out.push(1);
                out.push(match reason {
                    ResyncReason::Initial => 1,
                    ResyncReason::Ahead => 2,
                    ResyncReason::Restart => 3,
                });
                out.extend_from_slice(&total_bytes.to_le_bytes());
            }
            ResyncMark::Hashes {
                offset,
                block_bytes,
                hashes,
            } => {
                if hashes.is_empty() || hashes.len() > RESYNC_HASHES_MAX as usize {
                    return Err(ResyncMarkError::Invalid("hash count out of range"));
                }
                if !block_bytes_ok(*block_bytes) {
                    return Err(ResyncMarkError::Invalid("block size out of range"));
                }
                out.reserve(17 + hashes.len() * BLOCK_HASH_BYTES);
                out.push(2);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&block_bytes.to_le_bytes());
                out.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
                for h in hashes {
                    out.extend_from_slice(h);
                }
            }
            ResyncMark::End => out.push(3),
        }
        Ok(out)
    }

    /// Reads a mark back; any deviation from the layout is an error.
    pub fn decode(bytes: &[u8]) -> Result<ResyncMark, ResyncMarkError> {
        let invalid = ResyncMarkError::Invalid;
        let (&step, rest) = bytes.split_first().ok_or(invalid("empty"))?;
        match step {
            1 => {
                if rest.len() != 9 {
                    return Err(invalid("begin has the wrong length"));
                }
                let reason = match rest[0] {
                    1 => ResyncReason::Initial,
                    2 => ResyncReason::Ahead,
                    3 => ResyncReason::Restart,
                    _ => return Err(invalid("unknown resync reason")),
                };
                let mut total = [0u8; 8];
                total.copy_from_slice(&rest[1..9]);
                Ok(ResyncMark::Begin {
                    reason,
                    total_bytes: u64::from_le_bytes(total),
                })
            }
            2 => {
                if rest.len() < 16 {
                    return Err(invalid("hashes header is short"));
                }
                let mut offset = [0u8; 8];
                offset.copy_from_slice(&rest[..8]);
                let mut word = [0u8; 4];
                word.copy_from_slice(&rest[8..12]);
                let block_bytes = u32::from_le_bytes(word);
                word.copy_from_slice(&rest[12..16]);
                let count = u32::from_le_bytes(word);
                if !block_bytes_ok(block_bytes) {
                    return Err(invalid("block size out of range"));
                }
                if count == 0 || count > RESYNC_HASHES_MAX {
                    return Err(invalid("hash count out of range"));
                }
                let body = &rest[16..];
                if body.len() != count as usize * BLOCK_HASH_BYTES {
                    return Err(invalid("hash bytes do not match the count"));
                }
                let hashes = body
                    .chunks_exact(BLOCK_HASH_BYTES)
                    .map(|c| {
                        let mut h = [0u8; BLOCK_HASH_BYTES];
                        h.copy_from_slice(c);
                        h
                    })
                    .collect();
                Ok(ResyncMark::Hashes {
                    offset: u64::from_le_bytes(offset),
                    block_bytes,
                    hashes,
                })
            }
            3 if rest.is_empty() => Ok(ResyncMark::End),
            3 => Err(invalid("end has trailing bytes")),
            _ => Err(invalid("unknown resync step")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip() {
        let marks = [
            ResyncMark::Begin {
                reason: ResyncReason::Initial,
                total_bytes: 1 << 40,
            },
            ResyncMark::Begin {
                reason: ResyncReason::Restart,
                total_bytes: 0,
            },
            ResyncMark::Hashes {
                offset: 3 << 20,
                block_bytes: 65536,
                hashes: vec![block_hash(b"a"), block_hash(&[0; 65536])],
            },
            ResyncMark::End,
        ];
        for mark in marks {
            let bytes = mark.encode().unwrap();
            assert_eq!(ResyncMark::decode(&bytes).unwrap(), mark);
        }
    }

    #[test]
    fn bad_marks_are_refused_not_encoded() {
        let no_hashes = ResyncMark::Hashes {
            offset: 0,
            block_bytes: 65536,
            hashes: vec![],
        };
        assert!(no_hashes.encode().is_err());
        let odd_block = ResyncMark::Hashes {
            offset: 0,
            block_bytes: 65535,
            hashes: vec![[0; 16]],
        };
        assert!(odd_block.encode().is_err());
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        let bytes = ResyncMark::Hashes {
            offset: 7,
            block_bytes: 4096,
            hashes: vec![[1; 16], [2; 16]],
        }
        .encode()
        .unwrap();
        for cut in 0..bytes.len() {
            assert!(ResyncMark::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(ResyncMark::decode(&longer).is_err());
        for step in [0u8, 4, 255] {
            assert!(ResyncMark::decode(&[step]).is_err());
        }
        assert!(ResyncMark::decode(&[1, 9, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(ResyncMark::decode(&[3, 0]).is_err());
    }

    #[test]
    fn what_decodes_encodes_to_the_same_bytes() {
        // Random byte strings (bounded): the decoder never panics, and whatever it accepts is
        // exactly what the encoder writes.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..64usize {
            for _ in 0..200 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        if state.is_multiple_of(3) {
                            (state >> 8) as u8
                        } else {
                            (state % 4) as u8
                        }
                    })
                    .collect();
                if let Ok(mark) = ResyncMark::decode(&bytes) {
                    assert_eq!(mark.encode().unwrap(), bytes);
                }
            }
        }
    }
}
