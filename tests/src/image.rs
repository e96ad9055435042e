//! Disk images on the test's side: sparse files, the in-memory model a scenario checks the
//! export against, content hashes, and a comparison that says *where* two images differ.
//!
//! Must never: hold a whole large image in memory except the model a test asks for (disks in
//! the suite are tens of MiB), or report "different" without the first differing offset.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use crate::rng::Rng;

/// Granularity at which [`compare_files`] reports differences.
pub const COMPARE_BLOCK_BYTES: usize = 4096;

/// Creates (or truncates) a sparse file of `size_bytes` that reads as zeros.
pub fn create_sparse(path: &Path, size_bytes: u64) -> Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(size_bytes)
        .with_context(|| format!("sizing {} to {size_bytes} bytes", path.display()))?;
    Ok(())
}

/// blake3 of a file's whole content, as hex.
pub fn blake3_file(path: &Path) -> Result<String> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(BufReader::with_capacity(1 << 20, file))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// blake3 of bytes in memory, as hex.
pub fn blake3_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// How two images differ: sizes, number of differing blocks and the first one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Size of the first image in bytes.
    pub left_bytes: u64,
    /// Size of the second image in bytes.
    pub right_bytes: u64,
    /// Offset of the first differing byte, if the common prefix differs.
    pub first_offset: Option<u64>,
    /// Number of [`COMPARE_BLOCK_BYTES`] blocks that differ within the common length.
    pub blocks_differing: u64,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sizes {} vs {} bytes; {} block(s) of {} bytes differ",
            self.left_bytes, self.right_bytes, self.blocks_differing, COMPARE_BLOCK_BYTES
        )?;
        if let Some(off) = self.first_offset {
            write!(
                f,
                ", first at byte {off} (block {})",
                off / COMPARE_BLOCK_BYTES as u64
            )?;
        }
        Ok(())
    }
}

/// Compares two image files; `None` when they are byte-for-byte equal.
pub fn compare_files(left: &Path, right: &Path) -> Result<Option<Difference>> {
    let mut l = BufReader::with_capacity(
        1 << 20,
        File::open(left).with_context(|| format!("opening {}", left.display()))?,
    );
    let mut r = BufReader::with_capacity(
        1 << 20,
        File::open(right).with_context(|| format!("opening {}", right.display()))?,
    );
    let left_bytes = std::fs::metadata(left)?.len();
    let right_bytes = std::fs::metadata(right)?.len();
    let common = left_bytes.min(right_bytes);
    let mut lb = vec![0u8; COMPARE_BLOCK_BYTES];
    let mut rb = vec![0u8; COMPARE_BLOCK_BYTES];
    let mut first_offset = None;
    let mut blocks_differing = 0;
    let mut pos = 0u64;
    while pos < common {
        let n = (common - pos).min(COMPARE_BLOCK_BYTES as u64) as usize;
        l.read_exact(&mut lb[..n])
            .with_context(|| format!("reading {}", left.display()))?;
        r.read_exact(&mut rb[..n])
            .with_context(|| format!("reading {}", right.display()))?;
        if lb[..n] != rb[..n] {
            blocks_differing += 1;
            if first_offset.is_none() {
                let i = lb[..n]
                    .iter()
                    .zip(&rb[..n])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                first_offset = Some(pos + i as u64);
            }
        }
        pos += n as u64;
    }
    if blocks_differing == 0 && left_bytes == right_bytes {
        return Ok(None);
    }
    Ok(Some(Difference {
        left_bytes,
        right_bytes,
        first_offset,
        blocks_differing,
    }))
}

/// Fails with where they differ unless the two files are byte-for-byte equal.
pub fn assert_same_content(what: &str, left: &Path, right: &Path) -> Result<()> {
    if let Some(d) = compare_files(left, right)? {
        bail!(
            "{what}: {} and {} differ: {d}",
            left.display(),
            right.display()
        );
    }
    Ok(())
}

/// Writes `bytes` to a new file at `path`.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Sector size the model tracks "unknown after discard" at.
pub const SECTOR_BYTES: u64 = 512;

/// The expected content of a disk, updated as the scenario writes; the oracle the export, the
/// backing file and the replayed image are checked against. A discarded range may read back
/// as zeros or as before (NBD leaves it to the server), so it is "unknown" until rewritten.
#[derive(Debug, Clone)]
pub struct Model {
    /// Invariant: its length is the disk size, a multiple of [`SECTOR_BYTES`].
    bytes: Vec<u8>,
    /// One flag per sector: content unspecified since a discard.
    unknown: Vec<bool>,
}

impl Model {
    /// A disk of `size_bytes` zeros.
    pub fn zeroed(size_bytes: u64) -> Self {
        Self::from_bytes(vec![0; usize::try_from(size_bytes).unwrap_or(usize::MAX)])
    }

    /// A model holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        assert!(
            (bytes.len() as u64).is_multiple_of(SECTOR_BYTES),
            "model size not a multiple of {SECTOR_BYTES}"
        );
        let sectors = bytes.len() / SECTOR_BYTES as usize;
        Self {
            bytes,
            unknown: vec![false; sectors],
        }
    }

    /// The disk's size.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether the disk has no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The expected content (meaningless where [`Model::is_known`] is false).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether every byte's content is specified (nothing discarded and not rewritten).
    pub fn all_known(&self) -> bool {
        !self.unknown.contains(&true)
    }

    /// Whether the sector holding byte `offset` has a specified content.
    pub fn is_known(&self, offset: u64) -> bool {
        !self.unknown[(offset / SECTOR_BYTES) as usize]
    }

    /// Records that `len` bytes at `offset` were all set to `byte`.
    pub fn fill(&mut self, offset: u64, len: u64, byte: u8) {
        self.range_mut(offset, len).fill(byte);
        self.mark(offset, len, false);
    }

    /// Records a write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.range_mut(offset, data.len() as u64)
            .copy_from_slice(data);
        self.mark(offset, data.len() as u64, false);
    }

    /// Records a discard: the sectors read back unspecified until rewritten.
    pub fn discard(&mut self, offset: u64, len: u64) {
        assert!(
            offset.is_multiple_of(SECTOR_BYTES) && len.is_multiple_of(SECTOR_BYTES),
            "discard {offset}+{len} not sector-aligned"
        );
        let _ = self.range_mut(offset, len);
        self.mark(offset, len, true);
    }

    fn mark(&mut self, offset: u64, len: u64, unknown: bool) {
        if len == 0 {
            return;
        }
        let first = offset / SECTOR_BYTES;
        let last = (offset + len - 1) / SECTOR_BYTES;
        for s in first..=last {
            // A partial-sector write over a discarded sector leaves the rest unknown.
            let whole = s * SECTOR_BYTES >= offset && (s + 1) * SECTOR_BYTES <= offset + len;
            if unknown || whole {
                self.unknown[s as usize] = unknown;
            }
        }
    }

    fn range_mut(&mut self, offset: u64, len: u64) -> &mut [u8] {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = usize::try_from(offset + len).unwrap_or(usize::MAX);
        assert!(
            end <= self.bytes.len(),
            "model write {offset}+{len} beyond {} bytes",
            self.bytes.len()
        );
        &mut self.bytes[start..end]
    }

    /// Maximal runs of one repeated byte over known content: `(offset, len, byte)`.
    pub fn runs(&self) -> Vec<(u64, u64, u8)> {
        let mut runs = Vec::new();
        let mut start = 0usize;
        let n = self.bytes.len();
        while start < n {
            if !self.is_known(start as u64) {
                start += SECTOR_BYTES as usize;
                continue;
            }
            let byte = self.bytes[start];
            let mut end = start;
            while end < n && self.bytes[end] == byte && self.is_known(end as u64) {
                end += 1;
            }
            runs.push((start as u64, (end - start) as u64, byte));
            start = end;
        }
        runs
    }

    /// blake3 of the expected content; only meaningful when [`Model::all_known`].
    pub fn blake3(&self) -> String {
        blake3_bytes(&self.bytes)
    }

    /// Fails with where they differ unless the file at `path` holds the model's content
    /// (unknown sectors are not compared, but the size is).
    pub fn assert_matches(&self, what: &str, path: &Path) -> Result<()> {
        let actual = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        ensure!(
            actual.len() == self.bytes.len(),
            "{what}: {} has {} bytes, the disk {}",
            path.display(),
            actual.len(),
            self.bytes.len()
        );
        let mut first = None;
        let mut sectors_differing = 0u64;
        for (i, (a, e)) in actual
            .chunks(SECTOR_BYTES as usize)
            .zip(self.bytes.chunks(SECTOR_BYTES as usize))
            .enumerate()
        {
            if !self.unknown[i] && a != e {
                sectors_differing += 1;
                if first.is_none() {
                    let j = a.iter().zip(e).position(|(x, y)| x != y).unwrap_or(0);
                    let off = i as u64 * SECTOR_BYTES + j as u64;
                    first = Some((off, a[j], e[j]));
                }
            }
        }
        if let Some((off, got, want)) = first {
            bail!(
                "{what}: {} differs from the model in {sectors_differing} sector(s) of {SECTOR_BYTES} bytes; \
                 first at byte {off}: 0x{got:02x}, expected 0x{want:02x}",
                path.display()
            );
        }
        Ok(())
    }
}

/// Random content with zero holes: `size_bytes` long, 64 KiB regions, about a third of them
/// left zero so converters that skip zeros (qemu-img, nbdcopy) take both paths.
pub fn random_image_bytes(rng: &mut Rng, size_bytes: u64) -> Vec<u8> {
    const REGION_BYTES: usize = 64 * 1024;
    let mut bytes = vec![0u8; usize::try_from(size_bytes).unwrap_or(usize::MAX)];
    for region in bytes.chunks_mut(REGION_BYTES) {
        if rng.below(3) != 0 {
            rng.fill(region);
        }
    }
    bytes
}
