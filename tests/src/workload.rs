//! Workloads as data: a list of [`Op`]s is both a `qemu-io` script and an update of the
//! [`Model`], so what a scenario sends and what it expects cannot drift apart. Random
//! workloads come from a seeded [`Rng`] and are replayable.
//!
//! Must never: generate an operation outside the range it was given (parallel clients rely on
//! disjoint ranges), or an unaligned discard.

use std::path::{Path, PathBuf};

use crate::clients::QemuIo;
use crate::image::{Model, SECTOR_BYTES};
use crate::rng::Rng;

/// Smallest random request.
pub const OP_BYTES_MIN: u64 = 512;
/// Largest random request.
pub const OP_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// One client operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `write [-f] -P byte off len`: `len` bytes of `byte`, with FUA when `fua`.
    Write {
        offset: u64,
        len: u64,
        byte: u8,
        fua: bool,
    },
    /// `write -s FILE off len`: the first `len` bytes of a random-content source file.
    WriteFrom { offset: u64, len: u64 },
    /// `write -z [-u] off len`: NBD WRITE_ZEROES, may unmap when `unmap`.
    Zeroes { offset: u64, len: u64, unmap: bool },
    /// `discard off len`: NBD TRIM; content unspecified afterwards.
    Discard { offset: u64, len: u64 },
    /// `flush`: NBD FLUSH.
    Flush,
    /// Several `aio_write -P` in flight at once on the connection, then `aio_flush`.
    AioWrites(Vec<(u64, u64, u8)>),
}

/// Random content the [`Op::WriteFrom`] operations copy from, written once per workload.
#[derive(Debug, Clone)]
pub struct Source {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Source {
    /// Writes [`OP_BYTES_MAX`] random bytes to `path`.
    pub fn create(rng: &mut Rng, path: &Path) -> anyhow::Result<Source> {
        let mut bytes = vec![0u8; OP_BYTES_MAX as usize];
        rng.fill(&mut bytes);
        crate::image::write_file(path, &bytes)?;
        Ok(Source {
            path: path.to_owned(),
            bytes,
        })
    }
}

impl Op {
    /// The `qemu-io` command(s) for this operation, quiet so failures stand out.
    pub fn commands(&self, source: Option<&Source>) -> Vec<String> {
        match self {
            Op::Write {
                offset,
                len,
                byte,
                fua,
            } => {
                let f = if *fua { "-f " } else { "" };
                vec![format!("write -q {f}-P 0x{byte:02x} {offset} {len}")]
            }
            Op::WriteFrom { offset, len } => {
                let path = source
                    .map(|s| s.path.display().to_string())
                    .unwrap_or_default();
                vec![format!("write -q -s {path} {offset} {len}")]
            }
            Op::Zeroes { offset, len, unmap } => {
                let u = if *unmap { "-u " } else { "" };
                vec![format!("write -q -z {u}{offset} {len}")]
            }
            Op::Discard { offset, len } => vec![format!("discard -q {offset} {len}")],
            Op::Flush => vec!["flush".to_owned()],
            Op::AioWrites(writes) => writes
                .iter()
                .map(|(offset, len, byte)| format!("aio_write -q -P 0x{byte:02x} {offset} {len}"))
                .chain(std::iter::once("aio_flush".to_owned()))
                .collect(),
        }
    }

    /// Applies this operation to the model.
    pub fn apply(&self, model: &mut Model, source: Option<&Source>) {
        match self {
            Op::Write {
                offset, len, byte, ..
            } => model.fill(*offset, *len, *byte),
            Op::WriteFrom { offset, len } => {
                let data = source.map(|s| &s.bytes[..*len as usize]);
                if let Some(data) = data {
                    model.write(*offset, data);
                }
            }
            Op::Zeroes { offset, len, .. } => model.fill(*offset, *len, 0),
            Op::Discard { offset, len } => model.discard(*offset, *len),
            Op::Flush => {}
            Op::AioWrites(writes) => {
                // In flight together: only meaningful when they do not overlap.
                for (offset, len, byte) in writes {
                    model.fill(*offset, *len, *byte);
                }
            }
        }
    }

    /// Number of NBD writes (WRITE commands) this operation sends at most, ignoring the
    /// client's splitting of requests above its maximum transfer size.
    pub fn writes(&self) -> u64 {
        match self {
            Op::Write { .. } | Op::WriteFrom { .. } => 1,
            Op::AioWrites(w) => w.len() as u64,
            _ => 0,
        }
    }
}

/// A `qemu-io` script running `ops` against `uri`.
pub fn script(uri: &str, ops: &[Op], source: Option<&Source>) -> QemuIo {
    let mut io = QemuIo::new(uri);
    for op in ops {
        for c in op.commands(source) {
            io.push(c);
        }
    }
    io
}

/// Applies `ops` to `model` in order.
pub fn apply(model: &mut Model, ops: &[Op], source: Option<&Source>) {
    for op in ops {
        op.apply(model, source);
    }
}

/// `read -P` commands checking every run of one repeated byte of at least `min_run_bytes`
/// inside `start..end` (known content only). Runs are split at [`OP_BYTES_MAX`] so no single
/// read is huge.
pub fn verify_commands(model: &Model, start: u64, end: u64, min_run_bytes: u64) -> Vec<String> {
    let mut cmds = Vec::new();
    for (offset, len, byte) in model.runs() {
        let s = offset.max(start);
        let e = (offset + len).min(end);
        if e <= s || e - s < min_run_bytes {
            continue;
        }
        let mut pos = s;
        while pos < e {
            let n = (e - pos).min(OP_BYTES_MAX);
            cmds.push(format!("read -q -P 0x{byte:02x} {pos} {n}"));
            pos += n;
        }
    }
    cmds
}

/// A random request size, sector-aligned, spread evenly over the powers of two from
/// [`OP_BYTES_MIN`] to [`OP_BYTES_MAX`] and capped at `max_bytes`.
pub fn random_len(rng: &mut Rng, max_bytes: u64) -> u64 {
    let max = max_bytes.clamp(OP_BYTES_MIN, OP_BYTES_MAX);
    let max_shift = 63 - max.leading_zeros() as u64; // log2(max)
    let min_shift = 9; // log2(OP_BYTES_MIN)
    let shift = rng.range(min_shift, max_shift);
    let len = rng.range(1u64 << shift, (2u64 << shift).min(max + 1) - 1);
    (len / SECTOR_BYTES).max(1) * SECTOR_BYTES
}

/// `n` random operations inside `start..end` (sector-aligned, non-empty): mostly patterned
/// writes, some with random content, FUA, write-zeroes (with and without unmap), discards,
/// flushes and batches of concurrent non-overlapping async writes. Ends with a flush.
pub fn random_ops(rng: &mut Rng, start: u64, end: u64, n: usize) -> Vec<Op> {
    assert!(start.is_multiple_of(SECTOR_BYTES) && end.is_multiple_of(SECTOR_BYTES) && start < end);
    let span = end - start;
    let place = |rng: &mut Rng| {
        let len = random_len(rng, span);
        let slots = (span - len) / SECTOR_BYTES;
        let offset = start + rng.range(0, slots) * SECTOR_BYTES;
        (offset, len)
    };
    let mut ops = Vec::with_capacity(n + 1);
    for _ in 0..n {
        let op = match rng.below(100) {
            0..=49 => {
                let (offset, len) = place(rng);
                Op::Write {
                    offset,
                    len,
                    byte: rng.nonzero_byte(),
                    fua: false,
                }
            }
            50..=57 => {
                let (offset, len) = place(rng);
                Op::Write {
                    offset,
                    len,
                    byte: rng.nonzero_byte(),
                    fua: true,
                }
            }
            58..=69 => {
                let (offset, len) = place(rng);
                Op::WriteFrom { offset, len }
            }
            70..=77 => {
                let (offset, len) = place(rng);
                Op::Zeroes {
                    offset,
                    len,
                    unmap: rng.below(2) == 0,
                }
            }
            78..=83 => {
                let (offset, len) = place(rng);
                Op::Discard { offset, len }
            }
            84..=89 => Op::Flush,
            _ => {
                // Up to 16 writes in flight, each in its own slice of the range so none overlap.
                let count = rng.range(2, 16);
                let slice = (span / count) / SECTOR_BYTES * SECTOR_BYTES;
                let writes = (0..count)
                    .filter(|_| slice >= SECTOR_BYTES)
                    .map(|i| {
                        let len = random_len(rng, slice.min(256 * 1024));
                        let slots = (slice - len) / SECTOR_BYTES;
                        let offset = start + i * slice + rng.range(0, slots) * SECTOR_BYTES;
                        (offset, len, rng.nonzero_byte())
                    })
                    .collect();
                Op::AioWrites(writes)
            }
        };
        ops.push(op);
    }
    ops.push(Op::Flush);
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ops_stay_in_range_and_aligned() {
        let mut rng = Rng::new(7);
        for (start, end) in [(0, 64 << 20), (16 << 20, 32 << 20), (4096, 8192)] {
            for op in random_ops(&mut rng, start, end, 300) {
                let ranges = match &op {
                    Op::Write { offset, len, .. }
                    | Op::WriteFrom { offset, len }
                    | Op::Zeroes { offset, len, .. }
                    | Op::Discard { offset, len } => vec![(*offset, *len)],
                    Op::AioWrites(w) => w.iter().map(|(o, l, _)| (*o, *l)).collect(),
                    Op::Flush => vec![],
                };
                for (o, l) in ranges {
                    assert!(o >= start && o + l <= end, "{op:?} outside {start}..{end}");
                    assert!(
                        o % 512 == 0 && l % 512 == 0 && (512..=OP_BYTES_MAX).contains(&l),
                        "{op:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn model_tracks_discards_and_runs() {
        let mut m = Model::zeroed(8192);
        apply(
            &mut m,
            &[
                Op::Write {
                    offset: 0,
                    len: 4096,
                    byte: 1,
                    fua: false,
                },
                Op::Discard {
                    offset: 1024,
                    len: 1024,
                },
                Op::Write {
                    offset: 1536,
                    len: 1024,
                    byte: 2,
                    fua: false,
                },
            ],
            None,
        );
        assert_eq!(
            m.runs(),
            vec![
                (0, 1024, 1),
                (1536, 1024, 2),
                (2560, 1536, 1),
                (4096, 4096, 0)
            ]
        );
        assert!(!m.all_known());
        assert_eq!(
            verify_commands(&m, 0, 8192, 2048),
            vec!["read -q -P 0x00 4096 4096".to_owned()]
        );
    }
}
