//! `DATA_DIR/dirty.map`: the crash-safe map of the regions of each disk written while the agent
//! is not journalling (the appliance unreachable or too slow), so a resync copies those regions
//! only. DRBD's activity log and bitmap in one: one bit per region of `region_bytes` (1 MiB by
//! default), the whole map written and `fdatasync`ed by every cold mark.
//!
//! [`DirtyMap::mark`] returns only once every region it covers is set in a slot that a
//! completed `fdatasync` made durable, so a write let through after it is still marked after
//! `kill -9` or a power cut. A mark of regions already durably marked costs a few atomic loads:
//! no lock, no I/O. A cold mark sets its bits under the lock and persists the whole map;
//! concurrent cold marks share one `fdatasync` (group commit, as `journal::SharedJournal`).
//! Clears are lazy: in memory until the next persist, whoever makes it (a crash before then
//! only means the region is copied again).
//!
//! The file holds two slots written in turn, each with a generation and a blake3 checksum, so a
//! torn write of one never loses the other. Format byte by byte: `docs/agent.md`, "Dirty map".
//!
//! Must never: return from `mark` before its regions are durable; write the slot holding the
//! newest durable generation; open as clean a region the newest valid slot holds dirty, or open
//! at all when no slot is valid; retry or trust an `fdatasync` after one failed (the map is
//! poisoned until reopened).
//!
//! What it cannot see: a write that races the `clear` of its region. `clear(r)` means "every
//! write to `r` that a mark let through is on the target"; the resync must clear a region only
//! when no write to it can be in flight outside the journal.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use thiserror::Error;
use transport::fsutil;

use crate::sink::DiskId;

/// Name of the map inside the data directory.
pub const DIRTY_MAP_FILE: &str = "dirty.map";
/// Default bytes of disk per bit: 1 MiB (16 KiB of bitmap per TiB of disk).
pub const REGION_BYTES_DEFAULT: u64 = 1 << 20;
/// Smallest allowed region: one sector.
pub const REGION_BYTES_MIN: u64 = 512;
/// Largest allowed region.
pub const REGION_BYTES_MAX: u64 = 1 << 40;
/// Largest slot (header, bitmaps, checksum, padding): 2^31 regions, 2 PiB of disk at 1 MiB a
/// region. Bounds what opening a damaged file can make us allocate.
pub const SLOT_BYTES_MAX: u64 = 256 << 20;

const MAGIC: [u8; 8] = *b"CDPDIRTY";
const FORMAT_VERSION: u32 = 1;
const HEADER_BYTES: u64 = 32;
const DISK_ENTRY_BYTES: u64 = 16;
const CHECKSUM_BYTES: u64 = 32;
/// Slots start and end on 4 KiB boundaries, so no page or sector holds bytes of both: writing
/// one slot never rewrites a byte of the other, even on media that tear whole pages.
const SLOT_ALIGN_BYTES: u64 = 4096;
const FILE_MODE: u32 = fsutil::MODE_PRIVATE_FILE;

/// What a newly created map holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initial {
    /// Every region dirty: a new job must copy everything (the initial sync).
    Dirty,
    /// Every region clean: the target already holds what the disks hold.
    Clean,
}

/// Counters since opening.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyStats {
    /// Marks that found a region not yet durably marked and waited for a persist.
    pub cold_marks: u64,
    /// Slots written and `fdatasync`ed (each may have served many cold marks).
    pub persists: u64,
}

/// Why a slot of the file is not used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidSlot {
    /// The file's length is not two equal slots of a multiple of 4 KiB within
    /// [`SLOT_BYTES_MAX`].
    #[error("file length {file_bytes} is not two slots of a multiple of 4 KiB")]
    FileLength {
        /// The file's length.
        file_bytes: u64,
    },
    /// The slot does not start with the magic bytes `CDPDIRTY`.
    #[error("bad magic")]
    Magic,
    /// The slot is of a format version this agent does not know.
    #[error("format version {found} is not supported (this agent writes {FORMAT_VERSION})")]
    Version {
        /// The version found.
        found: u32,
    },
    /// The header describes more than the slot holds.
    #[error("header describes {needed_bytes} bytes, the slot has {slot_bytes}")]
    Truncated {
        /// Bytes the header's disks need, checksum included.
        needed_bytes: u64,
        /// Bytes of the slot.
        slot_bytes: u64,
    },
    /// The checksum does not match: a torn or damaged write.
    #[error("checksum mismatch")]
    Checksum,
    /// The checksum matches but the content breaks a rule (the message says which).
    #[error("{reason}")]
    Content {
        /// The rule broken.
        reason: &'static str,
    },
}

/// Why [`DirtyMap::open`] failed.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The arguments break a rule (the message says which); the file was not touched.
    #[error("invalid dirty map config: {reason}")]
    Config {
        /// The rule broken.
        reason: &'static str,
    },
    /// Reading, creating or replacing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Neither slot is valid, so which regions are dirty is unknown. Never treated as clean
    /// here; the caller may choose to start over with every region dirty.
    #[error("{}: no valid slot (first: {first}; second: {second})", path.display())]
    NoValidSlot {
        /// The file.
        path: PathBuf,
        /// Why the first slot is not used.
        first: InvalidSlot,
        /// Why the second slot is not used.
        second: InvalidSlot,
    },
    /// The file was written with another region size.
    #[error("{}: regions of {found} bytes, not {expected}", path.display())]
    RegionBytes {
        /// The file.
        path: PathBuf,
        /// The region size in the file.
        found: u64,
        /// The region size asked for.
        expected: u64,
    },
    /// A disk given is not in the file.
    #[error("{}: disk {} is not in the map", path.display(), disk.0)]
    UnknownDisk {
        /// The file.
        path: PathBuf,
        /// The disk.
        disk: DiskId,
    },
    /// A disk in the file was not given: its dirty regions would be forgotten.
    #[error("{}: the map holds disk {}, which was not given", path.display(), disk.0)]
    MissingDisk {
        /// The file.
        path: PathBuf,
        /// The disk.
        disk: DiskId,
    },
    /// A disk is smaller than the map says: its regions no longer mean what they meant.
    #[error("{}: disk {} is {size_bytes} bytes, smaller than the map's {map_bytes}", path.display(), disk.0)]
    Shrunk {
        /// The file.
        path: PathBuf,
        /// The disk.
        disk: DiskId,
        /// Its size now.
        size_bytes: u64,
        /// Its size in the map.
        map_bytes: u64,
    },
}

/// A disk or a range the map does not cover.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RangeError {
    /// The disk is not in the map.
    #[error("disk {} is not in the dirty map", disk.0)]
    UnknownDisk {
        /// The disk.
        disk: DiskId,
    },
    /// The byte range ends beyond the disk.
    #[error("disk {}: {len} bytes at {offset} end beyond its {size_bytes} bytes", disk.0)]
    BeyondEnd {
        /// The disk.
        disk: DiskId,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the disk.
        size_bytes: u64,
    },
    /// The region index is not below the disk's region count.
    #[error("disk {}: region {region} is beyond its {regions} regions", disk.0)]
    RegionBeyondEnd {
        /// The disk.
        disk: DiskId,
        /// The region asked for.
        region: u64,
        /// Regions of the disk.
        regions: u64,
    },
}

/// Why a persist (or the persist a cold mark waits for) failed.
#[derive(Debug, Error)]
pub enum PersistError {
    /// An earlier I/O or fsync error poisoned the map; reopen it.
    #[error("dirty map is poisoned by an earlier error ({cause}); reopen it")]
    Poisoned {
        /// The first error.
        cause: String,
    },
    /// The write or `fdatasync` failed; the map is now poisoned (an fsync is never retried).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Why a mark failed. The write it guards must not be let through.
#[derive(Debug, Error)]
pub enum MarkError {
    /// The range is not in the map (nothing was marked).
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The marks could not be made durable.
    #[error(transparent)]
    Persist(#[from] PersistError),
}

/// The file's disks and region size: what a slot's header says, and where its bitmaps lie.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Layout {
    /// A power of two in [`REGION_BYTES_MIN`, `REGION_BYTES_MAX`].
    region_bytes: u64,
    /// Disk ids and sizes in bytes, ids unique.
    disks: Vec<(DiskId, u64)>,
}

impl Layout {
    fn regions(&self, size_bytes: u64) -> u64 {
        size_bytes.div_ceil(self.region_bytes)
    }

    fn words(&self, size_bytes: u64) -> u64 {
        self.regions(size_bytes).div_ceil(64)
    }

    /// Bytes from the slot's start to its checksum, or `None` past [`SLOT_BYTES_MAX`].
    fn content_bytes(&self) -> Option<u64> {
        let disks = u64::try_from(self.disks.len()).ok()?;
        let mut bytes = HEADER_BYTES.checked_add(disks.checked_mul(DISK_ENTRY_BYTES)?)?;
        for &(_, size_bytes) in &self.disks {
            bytes = bytes.checked_add(self.words(size_bytes).checked_mul(8)?)?;
        }
        (bytes + CHECKSUM_BYTES <= SLOT_BYTES_MAX).then_some(bytes)
    }

    /// Bytes of one slot, or `None` past [`SLOT_BYTES_MAX`].
    fn slot_bytes(&self) -> Option<u64> {
        let padded = (self.content_bytes()? + CHECKSUM_BYTES).next_multiple_of(SLOT_ALIGN_BYTES);
        (padded <= SLOT_BYTES_MAX).then_some(padded)
    }
}

/// One decoded, verified slot.
#[derive(Debug)]
struct Slot {
    generation: u64,
    layout: Layout,
    /// Bitmap words of every disk, in the layout's order.
    words: Vec<Vec<u64>>,
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Decodes and verifies one slot (`bytes` is exactly the slot, padding included).
fn decode_slot(bytes: &[u8]) -> Result<Slot, InvalidSlot> {
    let slot_bytes = bytes.len() as u64;
    if slot_bytes < HEADER_BYTES {
        return Err(InvalidSlot::Truncated {
            needed_bytes: HEADER_BYTES,
            slot_bytes,
        });
    }
    if bytes[0..8] != MAGIC {
        return Err(InvalidSlot::Magic);
    }
    let version = le_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(InvalidSlot::Version { found: version });
    }
    let disk_count = u64::from(le_u32(bytes, 12));
    let generation = le_u64(bytes, 16);
    let region_bytes = le_u64(bytes, 24);
    let disks_end = HEADER_BYTES + disk_count * DISK_ENTRY_BYTES;
    if disks_end + CHECKSUM_BYTES > slot_bytes {
        return Err(InvalidSlot::Truncated {
            needed_bytes: disks_end + CHECKSUM_BYTES,
            slot_bytes,
        });
    }
    // Locate the checksum before judging any field: a torn slot is "checksum mismatch", not
    // whatever its garbled fields happen to break. A region size of 0 would divide by zero.
    let region_bytes_valid = region_bytes.is_power_of_two()
        && (REGION_BYTES_MIN..=REGION_BYTES_MAX).contains(&region_bytes);
    let mut needed_bytes = disks_end;
    let mut disks = Vec::with_capacity(disk_count as usize);
    for entry in 0..disk_count {
        let at = (HEADER_BYTES + entry * DISK_ENTRY_BYTES) as usize;
        let size_bytes = le_u64(bytes, at + 8);
        disks.push((DiskId(le_u32(bytes, at)), size_bytes));
        let words = size_bytes.div_ceil(region_bytes.max(1)).div_ceil(64);
        needed_bytes = needed_bytes.saturating_add(words.saturating_mul(8));
    }
    let needed_with_checksum = needed_bytes.saturating_add(CHECKSUM_BYTES);
    if needed_with_checksum > slot_bytes {
        return Err(InvalidSlot::Truncated {
            needed_bytes: needed_with_checksum,
            slot_bytes,
        });
    }
    let content = &bytes[..needed_bytes as usize];
    let stored = &bytes[needed_bytes as usize..needed_with_checksum as usize];
    if blake3::hash(content).as_bytes()[..] != *stored {
        return Err(InvalidSlot::Checksum);
    }
    if !region_bytes_valid {
        return Err(InvalidSlot::Content {
            reason: "region size is not a power of two between 512 bytes and 1 TiB",
        });
    }
    if has_duplicate_ids(&disks) {
        return Err(InvalidSlot::Content {
            reason: "a disk id appears twice",
        });
    }
    let layout = Layout {
        region_bytes,
        disks,
    };
    if layout.slot_bytes() != Some(slot_bytes) {
        return Err(InvalidSlot::Content {
            reason: "slot size does not match its disks",
        });
    }
    let mut at = disks_end as usize;
    let mut words = Vec::with_capacity(layout.disks.len());
    for &(_, size_bytes) in &layout.disks {
        let count = layout.words(size_bytes) as usize;
        let disk_words: Vec<u64> = (0..count).map(|i| le_u64(bytes, at + 8 * i)).collect();
        at += 8 * count;
        if let Some(&last) = disk_words.last() {
            if last & !last_word_mask(layout.regions(size_bytes)) != 0 {
                return Err(InvalidSlot::Content {
                    reason: "bits set past a disk's last region",
                });
            }
        }
        words.push(disk_words);
    }
    Ok(Slot {
        generation,
        layout,
        words,
    })
}

/// Writes one slot into `buffer` (cleared first): header, the bitmap words `word(disk, i)`,
/// checksum, zero padding.
fn encode_slot(
    buffer: &mut Vec<u8>,
    layout: &Layout,
    slot_bytes: u64,
    generation: u64,
    mut word: impl FnMut(usize, usize) -> u64,
) {
    buffer.clear();
    buffer.extend_from_slice(&MAGIC);
    buffer.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    // A layout fits SLOT_BYTES_MAX (checked when it was made), so its disk count fits a u32.
    buffer.extend_from_slice(&(layout.disks.len() as u32).to_le_bytes());
    buffer.extend_from_slice(&generation.to_le_bytes());
    buffer.extend_from_slice(&layout.region_bytes.to_le_bytes());
    for &(DiskId(id), size_bytes) in &layout.disks {
        buffer.extend_from_slice(&id.to_le_bytes());
        buffer.extend_from_slice(&0u32.to_le_bytes());
        buffer.extend_from_slice(&size_bytes.to_le_bytes());
    }
    for (disk, &(_, size_bytes)) in layout.disks.iter().enumerate() {
        for i in 0..layout.words(size_bytes) as usize {
            buffer.extend_from_slice(&word(disk, i).to_le_bytes());
        }
    }
    let checksum = blake3::hash(buffer);
    buffer.extend_from_slice(checksum.as_bytes());
    buffer.resize(slot_bytes as usize, 0);
}

fn has_duplicate_ids(disks: &[(DiskId, u64)]) -> bool {
    let mut ids: Vec<DiskId> = disks.iter().map(|&(id, _)| id).collect();
    ids.sort_unstable();
    ids.windows(2).any(|pair| pair[0] == pair[1])
}

/// The bits of the last bitmap word that stand for regions of a disk of `regions` regions.
fn last_word_mask(regions: u64) -> u64 {
    match regions % 64 {
        0 => u64::MAX,
        used => (1u64 << used) - 1,
    }
}

/// The words covering regions `first..=last` with, for each, the mask of those regions' bits.
fn word_masks(first: u64, last: u64) -> impl Iterator<Item = (usize, u64)> {
    let (first_word, last_word) = (first / 64, last / 64);
    (first_word..=last_word).map(move |word| {
        let low = if word == first_word { first % 64 } else { 0 };
        let high = if word == last_word { last % 64 } else { 63 };
        let mask = (u64::MAX >> (63 - high)) & (u64::MAX << low);
        (word as usize, mask)
    })
}

/// Bitmap words with every region of a disk of `regions` regions set.
fn all_set_words(regions: u64) -> Vec<u64> {
    let mut words = vec![u64::MAX; regions.div_ceil(64) as usize];
    if let Some(last) = words.last_mut() {
        *last = last_word_mask(regions);
    }
    words
}

/// Where persists go: the map's file, or in tests a double that fails on purpose.
trait SlotFile: fmt::Debug + Send + Sync {
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()>;
    fn sync_data(&self) -> io::Result<()>;
}

impl SlotFile for File {
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, bytes, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// One disk's bits.
struct DiskBits {
    id: DiskId,
    size_bytes: u64,
    regions: u64,
    /// The map as the next persist writes it. Changed only under `DirtyMap::state`'s lock, so
    /// a persist's snapshot and its bookkeeping see one consistent map.
    dirty: Box<[AtomicU64]>,
    /// Regions a mark may skip. **Invariant:** a bit set here is set in `dirty` and in the
    /// newest slot a completed `fdatasync` made durable. Set only by a persist that covered it,
    /// cleared together with `dirty` by `clear`, both under the lock.
    durable: Box<[AtomicU64]>,
}

impl DiskBits {
    fn new(id: DiskId, size_bytes: u64, layout: &Layout, words: &[u64]) -> Self {
        let atomics = || words.iter().map(|&w| AtomicU64::new(w)).collect();
        DiskBits {
            id,
            size_bytes,
            regions: layout.regions(size_bytes),
            dirty: atomics(),
            // What opening found is the newest durable slot.
            durable: atomics(),
        }
    }
}

fn load_words(bits: &[AtomicU64]) -> impl Iterator<Item = u64> + '_ {
    bits.iter().map(|w| w.load(Ordering::Acquire))
}

/// The persist side, behind the lock.
struct PersistState {
    /// Slot (0 or 1) holding the newest durable generation; the next persist writes the other.
    newest_slot: u64,
    /// Generation of that slot.
    generation: u64,
    /// Snapshots of the map taken by persist leaders so far.
    snapshots_taken: u64,
    /// The last snapshot a completed `fdatasync` made durable.
    snapshots_durable: u64,
    /// Whether `dirty` changed since the last snapshot was taken.
    modified: bool,
    /// Whether a leader is persisting now.
    leader: bool,
    /// Set by the first failed write or `fdatasync`: every later persist fails.
    poisoned: Option<String>,
    /// The slot image, reused between persists (taken by the leader while it writes).
    buffer: Vec<u8>,
    stats: DirtyStats,
}

/// The dirty-region map of a job's disks (`Send + Sync`, shared as `Arc<DirtyMap>`).
pub struct DirtyMap {
    path: PathBuf,
    /// Disks in the order the caller gave them; persists write this layout.
    layout: Layout,
    slot_bytes: u64,
    region_shift: u32,
    disks: Vec<DiskBits>,
    /// Mirrors `state.poisoned` for the lock-free fast path of `mark`.
    poisoned: AtomicBool,
    file: Box<dyn SlotFile>,
    state: Mutex<PersistState>,
    /// Signalled whenever a leader finishes (a snapshot durable, or the map poisoned).
    persisted: Condvar,
}

impl fmt::Debug for DirtyMap {
    // The bitmaps and the slot buffer can be megabytes: the shape and counters only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyMap")
            .field("path", &self.path)
            .field("region_bytes", &self.layout.region_bytes)
            .field("disks", &self.layout.disks)
            .field("dirty_bytes", &self.dirty_bytes())
            .field("stats", &self.stats())
            .field("poisoned", &self.poisoned())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks panics on purpose; the poisoned-map state, not the mutex's
    // poison flag, is what guards durability.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl DirtyMap {
    /// Opens the map at `path` (`DATA_DIR/dirty.map`), creating it when missing.
    ///
    /// `disks` are the job's disks (id, size in bytes) in the order the agent knows them. A
    /// new file starts with every region dirty or clean as `initial` says; its directory is
    /// fsynced. An existing file must hold the same disks (in any order) and region size; a
    /// disk that grew gets its new regions (and the old partial last one) marked dirty, and
    /// the file is rewritten atomically before this returns. A disk that shrank, a disk given
    /// but not in the file, or one in the file but not given is an error, as is a file with
    /// no valid slot ([`OpenError::NoValidSlot`]). `region_bytes` is a power of two between
    /// [`REGION_BYTES_MIN`] and [`REGION_BYTES_MAX`].
    pub fn open(
        path: &Path,
        disks: &[(DiskId, u64)],
        region_bytes: u64,
        initial: Initial,
    ) -> Result<DirtyMap, OpenError> {
        let layout = Layout {
            region_bytes,
            disks: disks.to_vec(),
        };
        if !region_bytes.is_power_of_two()
            || !(REGION_BYTES_MIN..=REGION_BYTES_MAX).contains(&region_bytes)
        {
            return Err(OpenError::Config {
                reason: "region_bytes must be a power of two between 512 bytes and 1 TiB",
            });
        }
        if has_duplicate_ids(disks) {
            return Err(OpenError::Config {
                reason: "a disk id is given twice",
            });
        }
        let Some(slot_bytes) = layout.slot_bytes() else {
            return Err(OpenError::Config {
                reason: "the map would exceed SLOT_BYTES_MAX (256 MiB a slot)",
            });
        };
        let io_error = |source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        };

        // (bits, slot holding the newest generation, that generation)
        let (words, newest_slot, generation) = match read_file(path).map_err(io_error)? {
            None => {
                let words: Vec<Vec<u64>> = layout
                    .disks
                    .iter()
                    .map(|&(_, size_bytes)| match initial {
                        Initial::Dirty => all_set_words(layout.regions(size_bytes)),
                        Initial::Clean => vec![0; layout.words(size_bytes) as usize],
                    })
                    .collect();
                let image = fresh_file(&layout, slot_bytes, 0, &words);
                fsutil::write_new(path, &image, FILE_MODE).map_err(io_error)?;
                (words, 1, 1)
            }
            Some(bytes) => {
                let (index, slot) = newest_valid_slot(path, &bytes)?;
                let (words, grown) = reconcile(path, &slot, &layout)?;
                if grown {
                    // The slots change size: a new file replaces the old one atomically.
                    let base = slot.generation + 1;
                    let image = fresh_file(&layout, slot_bytes, base, &words);
                    fsutil::write_replacing(path, &image, FILE_MODE).map_err(io_error)?;
                    (words, 1, base + 1)
                } else {
                    (words, index, slot.generation)
                }
            }
        };
        let file = open_rw(path).map_err(io_error)?;
        let disks = layout
            .disks
            .iter()
            .zip(&words)
            .map(|(&(id, size_bytes), words)| DiskBits::new(id, size_bytes, &layout, words))
            .collect();
        Ok(DirtyMap {
            path: path.to_path_buf(),
            region_shift: region_bytes.trailing_zeros(),
            layout,
            slot_bytes,
            disks,
            poisoned: AtomicBool::new(false),
            file: Box::new(file),
            state: Mutex::new(PersistState {
                newest_slot,
                generation,
                snapshots_taken: 0,
                snapshots_durable: 0,
                modified: false,
                leader: false,
                poisoned: None,
                buffer: Vec::with_capacity(slot_bytes as usize),
                stats: DirtyStats::default(),
            }),
            persisted: Condvar::new(),
        })
    }

    fn disk(&self, disk: DiskId) -> Result<&DiskBits, RangeError> {
        self.disks
            .iter()
            .find(|bits| bits.id == disk)
            .ok_or(RangeError::UnknownDisk { disk })
    }

    /// Marks every region overlapping `[offset, offset + len)` of `disk` and returns once those
    /// marks are durable; the write may be let through only after `Ok`. A range of regions all
    /// durably marked already returns at once (no lock, no I/O); otherwise the bits are set
    /// and the whole map persisted, one `fdatasync` shared by concurrent cold marks. An empty
    /// range marks nothing.
    pub fn mark(&self, disk: DiskId, offset: u64, len: u64) -> Result<(), MarkError> {
        let bits = self.disk(disk)?;
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= bits.size_bytes)
            .ok_or(RangeError::BeyondEnd {
                disk,
                offset,
                len,
                size_bytes: bits.size_bytes,
            })?;
        if len == 0 {
            return Ok(());
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(self.poisoned_error().into());
        }
        let (first, last) = (offset >> self.region_shift, (end - 1) >> self.region_shift);
        let durable = word_masks(first, last)
            .all(|(word, mask)| bits.durable[word].load(Ordering::Acquire) & mask == mask);
        if durable {
            return Ok(());
        }
        let mut state = lock(&self.state);
        state.stats.cold_marks += 1;
        for (word, mask) in word_masks(first, last) {
            let before = bits.dirty[word].fetch_or(mask, Ordering::AcqRel);
            state.modified |= before & mask != mask;
        }
        self.persist_locked(state).map_err(MarkError::from)
    }

    /// Marks every region of every disk and returns once that is durable (for example when
    /// the target lost its copy and everything must be sent again).
    pub fn mark_all(&self) -> Result<(), PersistError> {
        let mut state = lock(&self.state);
        for bits in &self.disks {
            for (word, all) in bits.dirty.iter().zip(all_set_words(bits.regions)) {
                let before = word.fetch_or(all, Ordering::AcqRel);
                state.modified |= before != all;
            }
        }
        self.persist_locked(state)
    }

    /// Clears `region` of `disk` in memory: the region no longer needs a resync. Durable only
    /// after the next persist (by [`persist`](DirtyMap::persist) or a cold mark); a crash
    /// before that only means the region is copied again. The next mark of it is cold.
    ///
    /// Call it only when every write to the region that a mark let through is on the target
    /// and none can be in flight outside the journal: the map cannot see a write racing this.
    pub fn clear(&self, disk: DiskId, region: u64) -> Result<(), RangeError> {
        let bits = self.disk(disk)?;
        if region >= bits.regions {
            return Err(RangeError::RegionBeyondEnd {
                disk,
                region,
                regions: bits.regions,
            });
        }
        let mut state = lock(&self.state);
        let (word, bit) = ((region / 64) as usize, 1u64 << (region % 64));
        // `durable` first: a fast-path mark must never find a bit the next persist clears.
        bits.durable[word].fetch_and(!bit, Ordering::AcqRel);
        let before = bits.dirty[word].fetch_and(!bit, Ordering::AcqRel);
        state.modified |= before & bit != 0;
        Ok(())
    }

    /// Makes the map as it is now durable (clears included); returns at once when nothing
    /// changed since the last persist. Shares an `fdatasync` with concurrent cold marks.
    pub fn persist(&self) -> Result<(), PersistError> {
        self.persist_locked(lock(&self.state))
    }

    /// Waits until a snapshot taken after the caller's change (or the last one, when nothing
    /// changed since) is durable, leading the persist when no one else does.
    fn persist_locked(&self, mut state: MutexGuard<'_, PersistState>) -> Result<(), PersistError> {
        let needed = state.snapshots_taken + u64::from(state.modified);
        loop {
            if let Some(cause) = &state.poisoned {
                return Err(PersistError::Poisoned {
                    cause: cause.clone(),
                });
            }
            if state.snapshots_durable >= needed {
                return Ok(());
            }
            if !state.leader {
                // This leader's snapshot is taken now, so it covers `needed`.
                return self.lead_persist(state);
            }
            state = self
                .persisted
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The leader's persist: snapshot under the lock, write and `fdatasync` without it (cold
    /// marks and clears go on meanwhile), then publish what became durable.
    fn lead_persist(&self, mut state: MutexGuard<'_, PersistState>) -> Result<(), PersistError> {
        state.leader = true;
        state.snapshots_taken += 1;
        state.modified = false;
        let snapshot = state.snapshots_taken;
        let generation = state.generation + 1;
        let slot = 1 - state.newest_slot;
        let mut buffer = std::mem::take(&mut state.buffer);
        encode_slot(
            &mut buffer,
            &self.layout,
            self.slot_bytes,
            generation,
            |disk, word| self.disks[disk].dirty[word].load(Ordering::Acquire),
        );
        drop(state);

        let result = self
            .file
            .write_all_at(&buffer, slot * self.slot_bytes)
            .and_then(|()| self.file.sync_data());

        let mut state = lock(&self.state);
        state.leader = false;
        let outcome = match result {
            Ok(()) => {
                state.newest_slot = slot;
                state.generation = generation;
                state.snapshots_durable = snapshot;
                state.stats.persists += 1;
                self.publish_durable(&buffer);
                Ok(())
            }
            Err(source) => {
                if state.poisoned.is_none() {
                    state.poisoned = Some(format!("{}: {source}", self.path.display()));
                }
                self.poisoned.store(true, Ordering::Release);
                Err(PersistError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        state.buffer = buffer;
        drop(state);
        self.persisted.notify_all();
        outcome
    }

    /// After a durable persist of `slot_image`, under the lock: a region set in that slot and
    /// still dirty (not cleared since the snapshot) may be skipped by later marks.
    fn publish_durable(&self, slot_image: &[u8]) {
        let mut at = (HEADER_BYTES + self.layout.disks.len() as u64 * DISK_ENTRY_BYTES) as usize;
        for bits in &self.disks {
            for (dirty, durable) in bits.dirty.iter().zip(bits.durable.iter()) {
                let written = le_u64(slot_image, at);
                at += 8;
                durable.fetch_or(written & dirty.load(Ordering::Acquire), Ordering::AcqRel);
            }
        }
    }

    fn poisoned_error(&self) -> PersistError {
        let cause = lock(&self.state).poisoned.clone();
        PersistError::Poisoned {
            cause: cause.unwrap_or_else(|| "an earlier persist failed".to_string()),
        }
    }

    /// The dirty regions of `disk` in memory (lazy clears included), as ascending region
    /// indexes: region `r` is bytes `[r * region_bytes, (r + 1) * region_bytes)` clipped to
    /// the disk.
    pub fn dirty_regions(&self, disk: DiskId) -> Result<Vec<u64>, RangeError> {
        let bits = self.disk(disk)?;
        let mut regions = Vec::new();
        for (index, word) in load_words(&bits.dirty).enumerate() {
            let mut rest = word;
            while rest != 0 {
                regions.push(index as u64 * 64 + u64::from(rest.trailing_zeros()));
                rest &= rest - 1;
            }
        }
        Ok(regions)
    }

    /// Bytes of all disks in dirty regions (a disk's last region clipped to its size).
    pub fn dirty_bytes(&self) -> u64 {
        let mut total = 0;
        for bits in &self.disks {
            let count: u64 = load_words(&bits.dirty)
                .map(|w| u64::from(w.count_ones()))
                .sum();
            total += count * self.layout.region_bytes;
            let last = bits.regions.saturating_sub(1);
            let last_dirty = bits.regions > 0
                && bits.dirty[(last / 64) as usize].load(Ordering::Acquire) & (1 << (last % 64))
                    != 0;
            if last_dirty {
                total -= bits.regions * self.layout.region_bytes - bits.size_bytes;
            }
        }
        total
    }

    /// Bytes of disk per region.
    pub fn region_bytes(&self) -> u64 {
        self.layout.region_bytes
    }

    /// Whether no region of any disk is dirty in memory.
    pub fn is_clean(&self) -> bool {
        self.disks
            .iter()
            .all(|bits| load_words(&bits.dirty).all(|w| w == 0))
    }

    /// Counters since opening.
    pub fn stats(&self) -> DirtyStats {
        lock(&self.state).stats
    }

    /// The first I/O or fsync error, if one poisoned the map.
    pub fn poisoned(&self) -> Option<String> {
        lock(&self.state).poisoned.clone()
    }

    /// The map's file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The whole file, or `None` when it does not exist. Bounded: a file longer than two slots of
/// [`SLOT_BYTES_MAX`] is refused as such by [`newest_valid_slot`] without being read whole.
fn read_file(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(2 * SLOT_BYTES_MAX + 1).read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Two slots of the same map: slot 0 with generation `base`, slot 1 with `base + 1`.
fn fresh_file(layout: &Layout, slot_bytes: u64, base: u64, words: &[Vec<u64>]) -> Vec<u8> {
    let mut image = Vec::with_capacity(2 * slot_bytes as usize);
    let mut slot = Vec::new();
    for generation in [base, base + 1] {
        encode_slot(&mut slot, layout, slot_bytes, generation, |d, w| {
            words[d][w]
        });
        image.extend_from_slice(&slot);
    }
    image
}

fn split_slots(bytes: &[u8]) -> Result<(&[u8], &[u8]), InvalidSlot> {
    let file_bytes = bytes.len() as u64;
    let slot_bytes = file_bytes / 2;
    if file_bytes == 0
        || !file_bytes.is_multiple_of(2 * SLOT_ALIGN_BYTES)
        || slot_bytes > SLOT_BYTES_MAX
    {
        return Err(InvalidSlot::FileLength { file_bytes });
    }
    Ok(bytes.split_at(slot_bytes as usize))
}

/// The valid slot with the highest generation (slot 0 on a tie) and its index (0 or 1).
fn newest_valid_slot(path: &Path, bytes: &[u8]) -> Result<(u64, Slot), OpenError> {
    let (first, second) = match split_slots(bytes) {
        Ok((first, second)) => (decode_slot(first), decode_slot(second)),
        Err(reason) => (Err(reason.clone()), Err(reason)),
    };
    match (first, second) {
        (Ok(a), Ok(b)) if b.generation > a.generation => Ok((1, b)),
        (Ok(a), _) => Ok((0, a)),
        (Err(_), Ok(b)) => Ok((1, b)),
        (Err(first), Err(second)) => Err(OpenError::NoValidSlot {
            path: path.to_path_buf(),
            first,
            second,
        }),
    }
}

/// The slot's bits in the caller's layout, and whether a disk grew (its new regions set).
fn reconcile(
    path: &Path,
    slot: &Slot,
    layout: &Layout,
) -> Result<(Vec<Vec<u64>>, bool), OpenError> {
    if slot.layout.region_bytes != layout.region_bytes {
        return Err(OpenError::RegionBytes {
            path: path.to_path_buf(),
            found: slot.layout.region_bytes,
            expected: layout.region_bytes,
        });
    }
    if let Some(&(disk, _)) = slot
        .layout
        .disks
        .iter()
        .find(|(id, _)| !layout.disks.iter().any(|(given, _)| given == id))
    {
        return Err(OpenError::MissingDisk {
            path: path.to_path_buf(),
            disk,
        });
    }
    let mut grown = false;
    let mut words = Vec::with_capacity(layout.disks.len());
    for &(disk, size_bytes) in &layout.disks {
        let Some(index) = slot.layout.disks.iter().position(|&(id, _)| id == disk) else {
            return Err(OpenError::UnknownDisk {
                path: path.to_path_buf(),
                disk,
            });
        };
        let map_bytes = slot.layout.disks[index].1;
        if size_bytes < map_bytes {
            return Err(OpenError::Shrunk {
                path: path.to_path_buf(),
                disk,
                size_bytes,
                map_bytes,
            });
        }
        let mut disk_words = slot.words[index].clone();
        if size_bytes > map_bytes {
            grown = true;
            disk_words.resize(layout.words(size_bytes) as usize, 0);
            // Bytes [map_bytes, size_bytes) are new; their regions (the old partial last one
            // included) have never been copied.
            let first = map_bytes / layout.region_bytes;
            let last = (size_bytes - 1) / layout.region_bytes;
            for (word, mask) in word_masks(first, last) {
                disk_words[word] |= mask;
            }
        }
        words.push(disk_words);
    }
    Ok((words, grown))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const RB: u64 = 4096;
    const D1: DiskId = DiskId(1);
    const D2: DiskId = DiskId(2);

    fn open(path: &Path, disks: &[(DiskId, u64)], initial: Initial) -> DirtyMap {
        DirtyMap::open(path, disks, RB, initial).unwrap()
    }

    /// Reopens the map and checks each disk's dirty regions.
    fn check(path: &Path, disks: &[(DiskId, u64)], expected: &[&[u64]]) {
        let map = open(path, disks, Initial::Clean);
        for (&(disk, _), expected) in disks.iter().zip(expected) {
            assert_eq!(
                map.dirty_regions(disk).unwrap(),
                *expected,
                "disk {}",
                disk.0
            );
        }
    }

    fn dirty(path: &Path, disks: &[(DiskId, u64)]) -> Vec<u64> {
        open(path, disks, Initial::Clean)
            .dirty_regions(disks[0].0)
            .unwrap()
    }

    #[test]
    fn a_mark_covers_every_region_its_bytes_touch() {
        let long: Vec<u64> = (62..=132).collect();
        let cases: &[(u64, u64, &[u64])] = &[
            (0, 1, &[0]),
            (0, RB, &[0]),
            (0, RB + 1, &[0, 1]),
            (RB - 1, 2, &[0, 1]),
            (5 * RB, 0, &[]),
            (63 * RB, 2 * RB, &[63, 64]),
            (62 * RB + 7, 70 * RB, &long),
            (199 * RB, RB - 100, &[199]),
        ];
        let size_bytes = 200 * RB - 100;
        for &(offset, len, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(DIRTY_MAP_FILE);
            let map = open(&path, &[(D1, size_bytes)], Initial::Clean);
            map.mark(D1, offset, len).unwrap();
            assert_eq!(
                map.dirty_regions(D1).unwrap(),
                expected,
                "{len} at {offset}"
            );
            drop(map);
            check(&path, &[(D1, size_bytes)], &[expected]);
        }
    }

    #[test]
    fn marks_survive_reopen_and_a_durable_region_costs_no_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DIRTY_MAP_FILE);
        let disks = [(D1, 1000 * RB), (D2, 10 * RB + 1)];
        let map = open(&path, &disks, Initial::Clean);
        assert!(map.is_clean());
        map.mark(D1, 3 * RB, 10).unwrap();
        map.mark(D1, 999 * RB, RB).unwrap();
        map.mark(D2, 10 * RB, 1).unwrap();
        assert_eq!(map.stats().persists, 3);
        for _ in 0..100 {
            map.mark(D1, 3 * RB + 100, 200).unwrap();
            map.mark(D2, 10 * RB, 1).unwrap();
        }
        assert_eq!(map.stats().persists, 3, "already durable: no I/O");
        assert_eq!(map.dirty_bytes(), 2 * RB + 1);
        assert!(!map.is_clean());
        drop(map);
        check(&path, &disks, &[&[3, 999], &[10]]);
    }

    #[test]
    fn clears_are_durable_only_after_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DIRTY_MAP_FILE);
        let disks = [(D1, 100 * RB)];
        let map = open(&path, &disks, Initial::Clean);
        map.mark(D1, RB, 3 * RB).unwrap();
        map.clear(D1, 2).unwrap();
        assert_eq!(map.dirty_regions(D1).unwrap(), [1, 3]);
        drop(map);
        check(&path, &disks, &[&[1, 2, 3]]);

        let map = open(&path, &disks, Initial::Clean);
        map.clear(D1, 2).unwrap();
        map.persist().unwrap();
        let persists = map.stats().persists;
        map.persist().unwrap();
        assert_eq!(map.stats().persists, persists, "nothing changed: no I/O");
        drop(map);
        check(&path, &disks, &[&[1, 3]]);
    }

    #[test]
    fn a_cleared_region_is_marked_durably_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DIRTY_MAP_FILE);
        let disks = [(D1, 100 * RB)];
        // Cleared in memory only, then cleared durably: the next mark must persist both times.
        for persist_the_clear in [false, true] {
            let map = open(&path, &disks, Initial::Clean);
            map.mark(D1, 7 * RB, 1).unwrap();
            map.clear(D1, 7).unwrap();
            if persist_the_clear {
                map.persist().unwrap();
            }
            let persists = map.stats().persists;
            map.mark(D1, 7 * RB, 1).unwrap();
            assert_eq!(map.stats().persists, persists + 1);
            drop(map);
            check(&path, &disks, &[&[7]]);
        }
    }

    #[test]
    fn a_new_map_starts_dirty_or_clean_and_mark_all_marks_everything() {
        let dir = tempfile::tempdir().unwrap();
        let disks = [(D1, 130 * RB + 5), (D2, 0), (DiskId(9), RB)];
        let all: Vec<u64> = (0..131).collect();

        let path = dir.path().join("dirty");
        let map = open(&path, &disks, Initial::Dirty);
        assert_eq!(map.dirty_bytes(), 130 * RB + 5 + RB);
        drop(map);
        check(&path, &disks, &[&all, &[], &[0]]);

        let path = dir.path().join("clean");
        let map = open(&path, &disks, Initial::Clean);
        assert!(map.is_clean());
        assert_eq!(map.dirty_bytes(), 0);
        map.mark_all().unwrap();
        assert_eq!(map.dirty_bytes(), 130 * RB + 5 + RB);
        drop(map);
        check(&path, &disks, &[&all, &[], &[0]]);
    }

    #[test]
    fn a_grown_disk_gets_its_new_regions_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DIRTY_MAP_FILE);
        let map = open(&path, &[(D1, 10 * RB + 100), (D2, RB)], Initial::Clean);
        map.mark(D1, 2 * RB, 1).unwrap();
        drop(map);
        // Region 10 was partial: its new bytes were never copied. The bitmap grows past a word.
        let grown = [(D1, 70 * RB), (D2, RB)];
        let map = open(&path, &grown, Initial::Clean);
        let expected: Vec<u64> = [2].into_iter().chain(10..70).collect();
        assert_eq!(map.dirty_regions(D1).unwrap(), expected);
        assert_eq!(map.dirty_regions(D2).unwrap(), [] as [u64; 0]);
        // The growth was written before open returned, and persists go on from there.
        map.mark(D2, 0, 1).unwrap();
        drop(map);
        check(&path, &grown, &[&expected, &[0]]);
    }

    #[test]
    fn a_mismatch_with_the_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DIRTY_MAP_FILE);
        let disks = [(D1, 10 * RB), (D2, 5 * RB)];
        open(&path, &disks, Initial::Dirty);
        let before = std::fs::read(&path).unwrap();
        let open = |disks: &[(DiskId, u64)], region_bytes| {
            DirtyMap::open(&path, disks, region_bytes, Initial::Clean).unwrap_err()
        };
        let err = open(&disks, 2 * RB);
        assert!(
            matches!(err, OpenError::RegionBytes { found: RB, expected, .. } if expected == 2 * RB),
            "{err}"
        );
        let err = open(&[(D1, 10 * RB), (D2, 5 * RB), (DiskId(3), RB)], RB);
        assert!(
            matches!(
                err,
                OpenError::UnknownDisk {
                    disk: DiskId(3),
                    ..
                }
            ),
            "{err}"
        );
        let err = open(&[(D1, 10 * RB)], RB);
        assert!(
            matches!(err, OpenError::MissingDisk { disk: D2, .. }),
            "{err}"
        );
        let err = open(&[(D1, 10 * RB), (D2, 5 * RB - 1)], RB);
        assert!(matches!(err, OpenError::Shrunk { disk: D2, .. }), "{err}");
        assert!(err.to_string().contains(DIRTY_MAP_FILE), "{err}");
        let err = open(&disks, 3000);
        assert!(matches!(err, OpenError::Config { .. }), "{err}");
        let err = open(&[(D1, RB), (D1, RB)], RB);
        assert!(matches!(err, OpenError::Config { .. }), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "refusals change nothing"
        );
        // The same disks in another order are the same map.
        check(
            &path,
            &[(D2, 5 * RB), (D1, 10 * RB)],
            &[&[0, 1, 2, 3, 4], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]],
        );
    }

    #[test]
    fn ranges_outside_the_map_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DIRTY_MAP_FILE);
        let map = open(&path, &[(D1, 10 * RB)], Initial::Clean);
        let err = map.mark(D2, 0, 1).unwrap_err();
        assert!(
            matches!(err, MarkError::Range(RangeError::UnknownDisk { .. })),
            "{err}"
        );
        let err = map.mark(D1, 10 * RB - 1, 2).unwrap_err();
        assert!(
            matches!(err, MarkError::Range(RangeError::BeyondEnd { .. })),
            "{err}"
        );
        let err = map.mark(D1, u64::MAX, 2).unwrap_err();
        assert!(
            matches!(err, MarkError::Range(RangeError::BeyondEnd { .. })),
            "{err}"
        );
        let err = map.clear(D1, 10).unwrap_err();
        assert!(matches!(err, RangeError::RegionBeyondEnd { .. }), "{err}");
        assert!(map.dirty_regions(D2).is_err());
        assert!(map.is_clean());
    }

    /// Opens `path` with slot 0 holding `old` (generation 2) and slot 1 holding `new`
    /// (generation 3); returns both file images.
    fn two_states(path: &Path, disks: &[(DiskId, u64)]) -> (Vec<u8>, Vec<u8>) {
        let map = open(path, disks, Initial::Clean);
        map.mark(D1, 0, 3 * RB).unwrap(); // slot 0: {0, 1, 2}
        let old = std::fs::read(path).unwrap();
        map.clear(D1, 1).unwrap();
        map.mark(D1, 39_000 * RB, 1).unwrap(); // slot 1: {0, 2, 39000}
        (old, std::fs::read(path).unwrap())
    }

    struct Xorshift(u64);
    impl Xorshift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn a_torn_persist_reopens_as_the_old_or_the_new_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DIRTY_MAP_FILE);
        // 40000 regions: a bitmap of 5000 bytes, slots of 8 KiB spanning 16 sectors.
        let disks = [(D1, 40_000 * RB)];
        let (old, new) = two_states(&path, &disks);
        let slot_bytes = old.len() / 2;
        assert_eq!(slot_bytes, 8192);
        assert_eq!(
            old[..slot_bytes],
            new[..slot_bytes],
            "the newest slot was not written"
        );
        let (old_state, new_state) = (vec![0, 1, 2], vec![0, 2, 39_000]);

        let mut crashes = Vec::new();
        // The write cut short at any byte (then the old bytes, or garbage, after it).
        for cut in (0..=slot_bytes)
            .step_by(97)
            .chain([1, 8, slot_bytes - 1, slot_bytes])
        {
            for garbage in [None, Some(0xa5u8)] {
                let mut image = old.clone();
                image[slot_bytes..slot_bytes + cut].copy_from_slice(&new[slot_bytes..][..cut]);
                if let Some(byte) = garbage {
                    image[slot_bytes + cut..].fill(byte);
                }
                crashes.push(image);
            }
        }
        // Sectors reaching the media in any order: each 512-byte sector old or new.
        let mut rng = Xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..64 {
            let mut image = old.clone();
            for sector in (slot_bytes..2 * slot_bytes).step_by(512) {
                if rng.next() & 1 == 1 {
                    image[sector..sector + 512].copy_from_slice(&new[sector..sector + 512]);
                }
            }
            crashes.push(image);
        }
        let (mut saw_old, mut saw_new) = (false, false);
        for image in crashes {
            std::fs::write(&path, &image).unwrap();
            let found = dirty(&path, &disks);
            saw_old |= found == old_state;
            saw_new |= found == new_state;
            assert!(
                found == old_state || found == new_state,
                "reopened as {found:?}"
            );
        }
        assert!(saw_old && saw_new);
    }

    #[test]
    fn a_damaged_slot_falls_back_to_the_other_and_two_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DIRTY_MAP_FILE);
        let disks = [(D1, 40_000 * RB)];
        let (_, image) = two_states(&path, &disks);
        let slot_bytes = image.len() / 2;
        let checksum_at = 32 + 16 + 5000;
        // Magic, version, disk count, generation, region size, disk entry, bitmap, checksum.
        let offsets = [
            0,
            9,
            12,
            16,
            25,
            32,
            40,
            48,
            48 + 4875,
            checksum_at,
            checksum_at + 31,
        ];
        for (slot, expected) in [(0, vec![0, 2, 39_000]), (1, vec![0, 1, 2])] {
            for offset in offsets {
                let mut damaged = image.clone();
                damaged[slot * slot_bytes + offset] ^= 0x40;
                std::fs::write(&path, &damaged).unwrap();
                assert_eq!(dirty(&path, &disks), expected, "slot {slot} byte {offset}");
            }
        }
        for (first, second) in [(0, 0), (16, 48), (checksum_at, 9)] {
            let mut damaged = image.clone();
            damaged[first] ^= 1;
            damaged[slot_bytes + second] ^= 1;
            std::fs::write(&path, &damaged).unwrap();
            let err = DirtyMap::open(&path, &disks, RB, Initial::Clean).unwrap_err();
            assert!(matches!(err, OpenError::NoValidSlot { .. }), "{err}");
            assert!(err.to_string().contains(DIRTY_MAP_FILE), "{err}");
        }
        let longer = [&image[..], &image[..slot_bytes]].concat();
        for bytes in [&[][..], &image[..100], &image[..slot_bytes], &longer] {
            std::fs::write(&path, bytes).unwrap();
            let err = DirtyMap::open(&path, &disks, RB, Initial::Clean).unwrap_err();
            assert!(matches!(err, OpenError::NoValidSlot { .. }), "{err}");
        }
    }

    #[derive(Debug)]
    enum Fault {
        /// The write stops after this many bytes and fails.
        TornWrite(usize),
        /// The write succeeds; the fdatasync fails.
        Sync,
    }

    #[derive(Debug)]
    struct Faulty {
        file: File,
        fault: Fault,
    }

    impl SlotFile for Faulty {
        fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
            match self.fault {
                Fault::TornWrite(cut) => {
                    FileExt::write_all_at(&self.file, &bytes[..cut], offset)?;
                    Err(io::Error::other("injected torn write"))
                }
                Fault::Sync => FileExt::write_all_at(&self.file, bytes, offset),
            }
        }

        fn sync_data(&self) -> io::Result<()> {
            match self.fault {
                Fault::TornWrite(_) => self.file.sync_data(),
                Fault::Sync => Err(io::Error::other("injected fdatasync failure")),
            }
        }
    }

    #[test]
    fn an_io_error_poisons_the_map_until_reopened() {
        let disks = [(D1, 100 * RB)];
        for fault in [Fault::TornWrite(0), Fault::TornWrite(40), Fault::Sync] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(DIRTY_MAP_FILE);
            let mut map = open(&path, &disks, Initial::Clean);
            map.mark(D1, 0, 1).unwrap();
            let sync_fails = matches!(fault, Fault::Sync);
            map.file = Box::new(Faulty {
                file: open_rw(&path).unwrap(),
                fault,
            });
            let err = map.mark(D1, 50 * RB, 1).unwrap_err();
            assert!(
                matches!(err, MarkError::Persist(PersistError::Io { .. })),
                "{err}"
            );
            assert!(map.poisoned().unwrap().contains("injected"));
            // Every later mark fails, the durable fast path included, and so does persist.
            let err = map.mark(D1, 0, 1).unwrap_err();
            assert!(
                matches!(err, MarkError::Persist(PersistError::Poisoned { .. })),
                "{err}"
            );
            assert!(matches!(
                map.mark(D1, 60 * RB, 1),
                Err(MarkError::Persist(PersistError::Poisoned { .. }))
            ));
            assert!(matches!(map.persist(), Err(PersistError::Poisoned { .. })));
            assert!(matches!(map.mark_all(), Err(PersistError::Poisoned { .. })));
            drop(map);
            // The failed write went to the other slot: region 0 stays, 50 may or may not.
            let found = dirty(&path, &disks);
            let possible: &[&[u64]] = if sync_fails {
                &[&[0], &[0, 50]]
            } else {
                &[&[0]]
            };
            assert!(possible.contains(&found.as_slice()), "{found:?}");
        }
    }

    #[test]
    fn concurrent_cold_marks_are_all_durable() {
        const THREADS: u64 = 8;
        const MARKS: u64 = 40;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DIRTY_MAP_FILE);
        let disks = [(D1, THREADS * MARKS * RB), (D2, THREADS * RB)];
        let map = Arc::new(open(&path, &disks, Initial::Clean));
        let threads: Vec<_> = (0..THREADS)
            .map(|thread| {
                let map = Arc::clone(&map);
                std::thread::spawn(move || {
                    for i in 0..MARKS {
                        // Disjoint regions sharing bitmap words with the other threads.
                        map.mark(D1, (i * THREADS + thread) * RB + 1, 10).unwrap();
                        if i == MARKS / 2 {
                            map.mark(D2, thread * RB, RB).unwrap();
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let stats = map.stats();
        assert_eq!(stats.cold_marks, THREADS * (MARKS + 1));
        assert!(stats.persists <= stats.cold_marks, "{stats:?}");
        drop(map);
        let all_d1: Vec<u64> = (0..THREADS * MARKS).collect();
        let all_d2: Vec<u64> = (0..THREADS).collect();
        check(&path, &disks, &[&all_d1, &all_d2]);
    }
}
