//! The payload of a `Checkpoint` record: what the agent writes into its journal when an
//! operator asks for a checkpoint, so the checkpoint sits at an exact seq of the sequence,
//! ordered with the writes around it. Layout (little-endian), documented in
//! `docs/journal-format.md`:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | request id (chosen by the appliance; 0 when none) |
//! | 8 | 1 | flags: bit 0 = application-consistent (the agent's hook succeeded) |
//! | 9 | 2 | tag count (≤ [`CHECKPOINT_TAGS_MAX`]) |
//! | 11 | … | per tag: u16 length (1 ..= [`CHECKPOINT_TAG_BYTES_MAX`]), UTF-8 bytes |
//!
//! Must never panic on any input: the appliance decodes what it received.

/// Most tags on one checkpoint.
pub const CHECKPOINT_TAGS_MAX: usize = 16;
/// Longest tag, in bytes of UTF-8.
pub const CHECKPOINT_TAG_BYTES_MAX: usize = 128;

/// A checkpoint as the agent records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointMark {
    /// The appliance's request this answers (0 when none).
    pub request_id: u64,
    /// The agent's consistency hook ran and succeeded before the record was appended.
    pub app_consistent: bool,
    /// Operator tags.
    pub tags: Vec<String>,
}

/// Why bytes are not a checkpoint mark.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MarkError {
    /// The bytes end early, run on, or break a field rule.
    #[error("checkpoint mark: {0}")]
    Invalid(&'static str),
}

impl CheckpointMark {
    /// Checks the tag rules.
    pub fn check(&self) -> Result<(), MarkError> {
        if self.tags.len() > CHECKPOINT_TAGS_MAX {
            return Err(MarkError::Invalid("too many tags"));
        }
        if self
            .tags
            .iter()
            .any(|t| t.is_empty() || t.len() > CHECKPOINT_TAG_BYTES_MAX)
        {
            return Err(MarkError::Invalid("a tag is empty or too long"));
        }
        Ok(())
    }

    /// The payload bytes; the mark must pass [`CheckpointMark::check`].
    pub fn encode(&self) -> Result<Vec<u8>, MarkError> {
        self.check()?;
        let mut out = Vec::with_capacity(11 + self.tags.iter().map(|t| 2 + t.len()).sum::<usize>());
        out.extend_from_slice(&self.request_id.to_le_bytes());
        out.push(u8::from(self.app_consistent));
        // Both fit u16: checked above.
        out.extend_from_slice(&(self.tags.len() as u16).to_le_bytes());
        for tag in &self.tags {
            out.extend_from_slice(&(tag.len() as u16).to_le_bytes());
            out.extend_from_slice(tag.as_bytes());
        }
        Ok(out)
    }

    /// Decodes a payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, MarkError> {
        let invalid = MarkError::Invalid;
        let head = bytes.get(..11).ok_or(invalid("shorter than its header"))?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&head[..8]);
        let app_consistent = match head[8] {
            0 => false,
            1 => true,
            _ => return Err(invalid("unknown flags")),
        };
        let count = usize::from(u16::from_le_bytes([head[9], head[10]]));
        if count > CHECKPOINT_TAGS_MAX {
            return Err(invalid("too many tags"));
        }
        let mut at = 11;
        let mut tags = Vec::with_capacity(count);
        for _ in 0..count {
            let len = bytes
                .get(at..at + 2)
                .ok_or(invalid("tag length cut short"))?;
            let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
            if len == 0 || len > CHECKPOINT_TAG_BYTES_MAX {
                return Err(invalid("a tag is empty or too long"));
            }
            let tag = bytes
                .get(at + 2..at + 2 + len)
                .ok_or(invalid("tag cut short"))?;
            tags.push(String::from_utf8(tag.to_vec()).map_err(|_| invalid("a tag is not UTF-8"))?);
            at += 2 + len;
        }
        if at != bytes.len() {
            return Err(invalid("bytes after the last tag"));
        }
        Ok(Self {
            request_id: u64::from_le_bytes(id),
            app_consistent,
            tags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_and_bad_bytes_are_refused() {
        let mark = CheckpointMark {
            request_id: 42,
            app_consistent: true,
            tags: vec!["before-upgrade".into(), "ü".into()],
        };
        let bytes = mark.encode().unwrap();
        assert_eq!(CheckpointMark::decode(&bytes).unwrap(), mark);
        for cut in 0..bytes.len() {
            assert!(
                CheckpointMark::decode(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(CheckpointMark::decode(&longer).is_err());
        let mut flags = bytes;
        flags[8] = 2;
        assert!(CheckpointMark::decode(&flags).is_err());
        let too_many = CheckpointMark {
            tags: vec!["t".into(); CHECKPOINT_TAGS_MAX + 1],
            ..mark
        };
        assert!(too_many.encode().is_err());
    }
}
