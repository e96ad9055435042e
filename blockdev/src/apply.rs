//! Applying one verified journal record to a block device: a write writes its payload, a
//! trim or write-zeroes makes its extent read as zeroes (the agent zeroes trimmed ranges
//! too, so replica and source agree byte for byte), a flush or checkpoint changes nothing.
//!
//! Must never write outside the device: an extent past its end is refused, untouched.

use std::io;

use journal::{RecordHeader, RecordKind, Seq};

/// Why a record could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The record's extent does not lie inside the device.
    #[error("record seq {seq} ({kind:?} at {offset}+{length}) lies outside the disk of {size_bytes} bytes")]
    OutOfRange {
        /// The record.
        seq: Seq,
        /// Its kind.
        kind: RecordKind,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u32,
        /// The device's size.
        size_bytes: u64,
    },
    /// A write's payload is not as long as its header says (the caller passed the wrong
    /// bytes; a verified record always matches).
    #[error("record seq {seq}: payload of {payload_bytes} bytes for a length of {length}")]
    PayloadLength {
        /// The record.
        seq: Seq,
        /// Bytes passed.
        payload_bytes: usize,
        /// The header's length.
        length: u32,
    },
    /// The device failed.
    #[error("record seq {seq}: {source}")]
    Io {
        /// The record.
        seq: Seq,
        /// The device's error.
        source: io::Error,
    },
}

/// Applies the record `header` (with its verified plaintext `payload`) to `device`; returns
/// the bytes it changed (zero for a flush or checkpoint).
pub fn apply_record(
    device: &dyn crate::BlockDevice,
    header: &RecordHeader,
    payload: &[u8],
) -> Result<u64, ApplyError> {
    let in_range = header
        .offset
        .checked_add(u64::from(header.length))
        .is_some_and(|end| end <= device.size_bytes());
    let seq = header.seq;
    let io = |source| ApplyError::Io { seq, source };
    match header.kind {
        RecordKind::Flush | RecordKind::Checkpoint | RecordKind::Resync => return Ok(0),
        _ if !in_range => {
            return Err(ApplyError::OutOfRange {
                seq,
                kind: header.kind,
                offset: header.offset,
                length: header.length,
                size_bytes: device.size_bytes(),
            })
        }
        RecordKind::Write => {
            if payload.len() != header.length as usize {
                return Err(ApplyError::PayloadLength {
                    seq,
                    payload_bytes: payload.len(),
                    length: header.length,
                });
            }
            device.write_at(payload, header.offset).map_err(io)?;
        }
        RecordKind::Trim | RecordKind::WriteZeroes => {
            device
                .zero_range(header.offset, u64::from(header.length), true)
                .map_err(io)?;
        }
    }
    Ok(u64::from(header.length))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockDevice, MemDevice};
    use journal::{
        decode_record, encode_record, Compression, DiskId, Entry, Generation, Timestamp,
    };

    fn record(entry: Entry<'_>, seq: u64) -> journal::Record {
        let bytes = encode_record(&entry, Generation(1), Seq(seq), Compression::None).unwrap();
        decode_record(&bytes).unwrap().0
    }

    #[test]
    fn records_change_the_device_as_the_agent_did() {
        let dev = MemDevice::new(64 << 10);
        let w = record(Entry::write(DiskId(0), 4096, &[7; 8192], Timestamp(1)), 1);
        assert_eq!(apply_record(&dev, &w.header, &w.payload).unwrap(), 8192);
        let z = record(
            Entry {
                kind: RecordKind::WriteZeroes,
                offset: 8192,
                length: 1024,
                payload: &[],
                ..Entry::write(DiskId(0), 0, &[], Timestamp(2))
            },
            2,
        );
        apply_record(&dev, &z.header, &z.payload).unwrap();
        let mut buf = vec![0; 64 << 10];
        dev.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 7));
        assert!(buf[8192..9216].iter().all(|&b| b == 0));
        assert!(buf[9216..12288].iter().all(|&b| b == 7));
    }

    #[test]
    fn a_record_past_the_end_is_refused_untouched() {
        let dev = MemDevice::new(8192);
        let w = record(Entry::write(DiskId(0), 4096, &[7; 8192], Timestamp(1)), 9);
        let err = apply_record(&dev, &w.header, &w.payload).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("record seq 9 (Write at 4096+8192) lies outside"),
            "{err}"
        );
        assert_eq!(dev.writes(), 0);
    }
}
