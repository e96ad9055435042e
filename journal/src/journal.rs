//! The journal proper: opening and recovery, append, sync, rollover, trim and poisoning
//! ([`Core`], shared by [`Journal`] and [`SharedJournal`](crate::SharedJournal)), and the
//! single-threaded [`Journal`].
//!
//! Must never: return from `append` before the record reached the OS; report a seq durable
//! that no completed fdatasync covered; retry an fdatasync after it failed (the journal is
//! poisoned instead); truncate a record that a sync frame proves was durable; rewrite a block
//! holding durable bytes; delete a segment that is not sealed.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{
    AppendError, Corruption, CorruptionReason, OpenError, ReadError, SyncError, TrimError,
};
use crate::mem::MemStorage;
use crate::reader::{RawReader, ReadPlan, Reader, ScanOpenError, Scanner, Span, Step};
use crate::record::{decode_header, Entry, PreparedRecord, RecordDecoder, RecordEncoder};
use crate::segment::{
    decode_frame, encode_sync_frame, sync_frame_bytes, Frame, SegmentId, SEGMENT_DATA_OFFSET,
    SEGMENT_TMP_SUFFIX, SYNC_ALIGN_BYTES, SYNC_FRAME_HEADER_BYTES, SYNC_MAGIC,
};
use crate::storage::{read_full_at, DirStorage, Storage, StorageFile};
use crate::types::{Compression, Generation, JobId, Seq};

/// Default size of a segment file: 64 MiB.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Smallest allowed `segment_bytes_max` (tests use small segments to roll over often).
pub const SEGMENT_BYTES_MIN: u64 = 16 << 10;
/// Largest allowed `segment_bytes_max`.
pub const SEGMENT_BYTES_LIMIT: u64 = 1 << 40;

/// How a journal is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalConfig {
    /// The job; every segment found must belong to it.
    pub job: JobId,
    /// The generation new records and segments get; the journal refuses to open if it holds
    /// a newer one.
    pub generation: Generation,
    /// Size each segment file is preallocated to; a segment is sealed when the next record
    /// does not fit (a record larger than this gets a segment of its own).
    pub segment_bytes_max: u64,
    /// How payloads are stored.
    pub compression: Compression,
}

impl JournalConfig {
    /// Defaults: 64 MiB segments, zstd level 1 where it pays.
    pub fn new(job: JobId, generation: Generation) -> Self {
        JournalConfig {
            job,
            generation,
            segment_bytes_max: SEGMENT_BYTES_DEFAULT,
            compression: Compression::default(),
        }
    }

    fn check(&self) -> Result<(), OpenError> {
        if self.segment_bytes_max < SEGMENT_BYTES_MIN {
            return Err(OpenError::Config {
                reason: "segment_bytes_max is below SEGMENT_BYTES_MIN (16 KiB)",
            });
        }
        if self.segment_bytes_max > SEGMENT_BYTES_LIMIT {
            return Err(OpenError::Config {
                reason: "segment_bytes_max is above SEGMENT_BYTES_LIMIT (1 TiB)",
            });
        }
        if let Compression::Zstd { level } = self.compression {
            let range = zstd::compression_level_range();
            if !range.contains(&level) {
                return Err(OpenError::Config {
                    reason: "zstd level is outside the range zstd supports",
                });
            }
        }
        Ok(())
    }
}

/// What a journal can be opened on: a storage, or a directory path (a [`DirStorage`]).
pub trait IntoStorage {
    /// The storage (creating the directory if needed).
    fn into_storage(self) -> io::Result<Arc<dyn Storage>>;
}

impl IntoStorage for Arc<dyn Storage> {
    fn into_storage(self) -> io::Result<Arc<dyn Storage>> {
        Ok(self)
    }
}

impl IntoStorage for DirStorage {
    fn into_storage(self) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(self))
    }
}

impl IntoStorage for MemStorage {
    fn into_storage(self) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(self))
    }
}

impl IntoStorage for &Path {
    fn into_storage(self) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(DirStorage::open(self)?))
    }
}

impl IntoStorage for PathBuf {
    fn into_storage(self) -> io::Result<Arc<dyn Storage>> {
        self.as_path().into_storage()
    }
}

impl IntoStorage for &PathBuf {
    fn into_storage(self) -> io::Result<Arc<dyn Storage>> {
        self.as_path().into_storage()
    }
}

/// What opening found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The torn tail cut from the active segment, if there was one.
    pub torn_tail: Option<TornTail>,
    /// Leftovers of interrupted segment creations, removed.
    pub removed_tmp_files: Vec<String>,
}

/// A torn tail: bytes after the last valid frame of the active segment that no sync frame
/// proves durable. They were cut; no record from them is ever returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// File name of the segment.
    pub segment: String,
    /// First seq not recovered (the head is now `seq - 1`).
    pub seq: Seq,
    /// Offset of the tear in the segment file.
    pub offset: u64,
    /// Length of the non-zero bytes that were cut.
    pub bytes_discarded: u64,
    /// Why the frame at the tear is not valid.
    pub reason: CorruptionReason,
}

/// Counters since the journal was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Records appended.
    pub records: u64,
    /// Plaintext payload bytes appended.
    pub payload_bytes: u64,
    /// Bytes written for records as stored (headers included).
    pub stored_bytes: u64,
    /// Records stored zstd-compressed.
    pub compressed_records: u64,
    /// fdatasync calls made by syncs (rollovers not counted).
    pub syncs: u64,
    /// Segments created (the first one included).
    pub segments_created: u64,
}

#[derive(Debug, Clone)]
struct Sealed {
    id: SegmentId,
}

/// The segment appends go to.
#[derive(Debug)]
struct Active {
    id: SegmentId,
    name: String,
    nonce: [u8; 16],
    file: Arc<dyn StorageFile>,
    /// Where the next frame goes. Invariant: after a sync, a multiple of `SYNC_ALIGN_BYTES`
    /// (or `capacity`), so appends never rewrite a block that holds durable bytes.
    write_offset: u64,
    /// Allocated length of the file.
    capacity: u64,
    /// Bytes before this offset have had their writeback started (see `WRITEBACK_BYTES`).
    writeback_from: u64,
}

/// After this many bytes appended, the journal starts their writeback (without waiting), so
/// the fdatasync of a sync or of a rollover finds little left to flush and does not stall
/// appends behind it.
pub const WRITEBACK_BYTES: u64 = 1 << 20;

/// A sync to perform without the append lock.
#[derive(Debug)]
pub(crate) enum SyncPlan {
    /// Nothing to sync: everything up to this seq is durable.
    Done(Seq),
    /// fdatasync `file`; then every seq up to `target` is durable.
    Sync {
        target: Seq,
        name: String,
        file: Arc<dyn StorageFile>,
    },
}

/// The journal's state behind the append lock.
#[derive(Debug)]
pub(crate) struct Core {
    storage: Arc<dyn Storage>,
    config: JournalConfig,
    /// Sealed segments, oldest first. Invariant: first seqs non-decreasing; segment `i`
    /// holds exactly the seqs from its first seq to the next segment's first seq minus one,
    /// and is fully durable (synced before its successor was created).
    sealed: Vec<Sealed>,
    active: Active,
    /// Last appended seq (`Seq(0)` if none).
    head: Seq,
    /// Last seq covered by a completed fdatasync. Invariant: `durable <= head`.
    durable: Seq,
    /// The first error that poisoned the journal.
    poisoned: Option<String>,
    stats: JournalStats,
    recovery: Recovery,
}

/// An unpredictable nonce for a new segment (see `SegmentHeader::nonce`). Drawn from std's
/// `RandomState`, which the OS seeds: the journal reads no clock and needs no RNG crate, and
/// a guest cannot guess it. It is not a key; it only marks frames as this segment's.
fn fresh_nonce(id: &SegmentId) -> [u8; 16] {
    use std::hash::{BuildHasher, RandomState};
    let state = RandomState::new();
    let a = state.hash_one((id.job.0, id.generation.0, id.first_seq.0, 0u8));
    let b = state.hash_one((id.job.0, id.generation.0, id.first_seq.0, 1u8));
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&a.to_le_bytes());
    nonce[8..].copy_from_slice(&b.to_le_bytes());
    nonce
}

fn align_up(offset: u64) -> u64 {
    offset.div_ceil(SYNC_ALIGN_BYTES) * SYNC_ALIGN_BYTES
}

fn io_open(name: &str) -> impl FnOnce(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        name: name.to_string(),
        source,
    }
}

impl Core {
    pub(crate) fn open(
        storage: Arc<dyn Storage>,
        config: JournalConfig,
    ) -> Result<Core, OpenError> {
        config.check()?;
        let mut recovery = Recovery::default();
        let mut ids = Vec::new();
        for name in storage.list().map_err(io_open("journal directory"))? {
            if name.ends_with(SEGMENT_TMP_SUFFIX) {
                // A creation interrupted before its rename: never held a record.
                storage.remove(&name).map_err(io_open(&name))?;
                recovery.removed_tmp_files.push(name);
                continue;
            }
            let Some(id) = SegmentId::parse_file_name(&name) else {
                continue;
            };
            if id.job != config.job {
                return Err(OpenError::ForeignJob {
                    segment: name,
                    found: id.job,
                    expected: config.job,
                });
            }
            ids.push(id);
        }
        if !recovery.removed_tmp_files.is_empty() {
            storage.sync_dir().map_err(io_open("journal directory"))?;
        }
        ids.sort_by_key(|id| (id.first_seq, id.generation));
        for pair in ids.windows(2) {
            if pair[1].generation < pair[0].generation {
                return Err(Corruption {
                    segment: pair[1].file_name(),
                    seq: pair[1].first_seq,
                    reason: CorruptionReason::GenerationOrder {
                        found: pair[1].generation,
                        before: pair[0].generation,
                    },
                }
                .into());
            }
        }
        if let Some(newest) = ids.last() {
            if newest.generation > config.generation {
                return Err(OpenError::StaleGeneration {
                    found: newest.generation,
                    configured: config.generation,
                });
            }
        }
        let mut stats = JournalStats::default();
        let Some(last) = ids.pop() else {
            let active = create_segment(&*storage, &config, Seq::FIRST, 0)
                .map_err(|(name, source)| OpenError::Io { name, source })?;
            stats.segments_created = 1;
            return Ok(Core {
                storage,
                config,
                sealed: Vec::new(),
                active,
                head: Seq::NONE,
                durable: Seq::NONE,
                poisoned: None,
                stats,
                recovery,
            });
        };
        for id in &ids {
            // Opening checks the header block against the name; records are checked when read.
            Scanner::open(&*storage, id).map_err(|e| scan_open_error(id, e))?;
        }
        let (active, head) = recover_active(&*storage, &last, &mut recovery)?;
        let mut core = Core {
            storage,
            config,
            sealed: ids.into_iter().map(|id| Sealed { id }).collect(),
            active,
            head,
            durable: head,
            poisoned: None,
            stats,
            recovery,
        };
        if core.active.id.generation < core.config.generation {
            // A new generation starts a new segment; the old one is sealed as it is (recovery
            // synced it), possibly holding no record at all.
            let next = create_segment(&*core.storage, &core.config, head.next(), 0)
                .map_err(|(name, source)| OpenError::Io { name, source })?;
            let old = std::mem::replace(&mut core.active, next);
            core.sealed.push(Sealed { id: old.id });
            core.stats.segments_created += 1;
        }
        Ok(core)
    }

    pub(crate) fn config(&self) -> &JournalConfig {
        &self.config
    }

    pub(crate) fn head(&self) -> Seq {
        self.head
    }

    pub(crate) fn durable(&self) -> Seq {
        self.durable
    }

    pub(crate) fn stats(&self) -> JournalStats {
        self.stats
    }

    pub(crate) fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Oldest seq still stored (`head + 1` when none is).
    pub(crate) fn first_seq(&self) -> Seq {
        self.sealed
            .first()
            .map_or(self.active.id.first_seq, |s| s.id.first_seq)
    }

    pub(crate) fn poison_cause(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    fn poison(&mut self, name: &str, error: &io::Error) {
        if self.poisoned.is_none() {
            self.poisoned = Some(format!("{name}: {error}"));
        }
    }

    fn append_poisoned(&self) -> Result<(), AppendError> {
        match &self.poisoned {
            Some(cause) => Err(AppendError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn sync_poisoned(&self) -> Result<(), SyncError> {
        match &self.poisoned {
            Some(cause) => Err(SyncError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Appends a prepared record: gives it the next seq and writes it into the OS.
    pub(crate) fn append_prepared(
        &mut self,
        record: &mut PreparedRecord,
    ) -> Result<Seq, AppendError> {
        self.append_poisoned()?;
        let seq = self.head.next();
        let len = record.record_bytes() as u64;
        self.make_room(len)?;
        let compressed = record.header().codec != crate::types::Codec::None;
        let payload_bytes = record.header().payload_bytes() as u64;
        let bytes = record.finish(self.config.generation, seq)?;
        self.write_record(bytes, seq, payload_bytes, compressed)
    }

    /// Appends a record exactly as another journal stored it (a landing journal receiving
    /// what an agent shipped). The caller verified it in full (`verify_stored`); this checks
    /// again what ties it to this journal: a valid header, the next seq, this generation,
    /// and a length that matches the header.
    pub(crate) fn append_stored(&mut self, bytes: &[u8]) -> Result<Seq, AppendError> {
        self.append_poisoned()?;
        let header = decode_header(bytes).map_err(|e| AppendError::Stored {
            reason: e.to_string(),
        })?;
        let seq = self.head.next();
        if header.seq != seq {
            return Err(AppendError::Stored {
                reason: format!("record has seq {}, the journal expects {seq}", header.seq),
            });
        }
        if header.generation != self.config.generation {
            return Err(AppendError::Stored {
                reason: format!(
                    "record has generation {}, the journal writes {}",
                    header.generation, self.config.generation
                ),
            });
        }
        if header.record_bytes() != bytes.len() {
            return Err(AppendError::Stored {
                reason: format!(
                    "record is {} bytes, its header says {}",
                    bytes.len(),
                    header.record_bytes()
                ),
            });
        }
        self.make_room(bytes.len() as u64)?;
        let compressed = header.codec != crate::types::Codec::None;
        self.write_record(bytes, seq, header.payload_bytes() as u64, compressed)
    }

    /// Makes the active segment able to take a record of `len` bytes: rolls over, or grows
    /// an empty segment for a record larger than its preallocation.
    fn make_room(&mut self, len: u64) -> Result<(), AppendError> {
        if self.active.write_offset + len > self.active.capacity {
            if self.head >= self.active.id.first_seq {
                self.rollover(len)?;
            } else {
                // An empty segment takes any record, growing beyond its preallocation.
                let want = align_up(self.active.write_offset + len);
                if let Err(e) = self.active.file.allocate(want) {
                    let name = self.active.name.clone();
                    self.poison(&name, &e);
                    return Err(AppendError::Io { name, source: e });
                }
                self.active.capacity = want;
            }
        }
        Ok(())
    }

    /// Writes a finished record (`bytes`, holding `seq`) at the active segment's end.
    fn write_record(
        &mut self,
        bytes: &[u8],
        seq: Seq,
        payload_bytes: u64,
        compressed: bool,
    ) -> Result<Seq, AppendError> {
        let len = bytes.len() as u64;
        if let Err(e) = self
            .active
            .file
            .write_all_at(bytes, self.active.write_offset)
        {
            let name = self.active.name.clone();
            self.poison(&name, &e);
            return Err(AppendError::Io { name, source: e });
        }
        self.active.write_offset += len;
        if self.active.write_offset - self.active.writeback_from >= WRITEBACK_BYTES {
            let (from, to) = (self.active.writeback_from, self.active.write_offset);
            if let Err(e) = self.active.file.start_writeback(from, to - from) {
                let name = self.active.name.clone();
                self.poison(&name, &e);
                return Err(AppendError::Io { name, source: e });
            }
            self.active.writeback_from = to;
        }
        self.head = seq;
        self.stats.records += 1;
        self.stats.payload_bytes += payload_bytes;
        self.stats.stored_bytes += len;
        self.stats.compressed_records += u64::from(compressed);
        Ok(seq)
    }

    /// Seals the active segment (fdatasync: a sealed segment is fully durable) and starts a
    /// new one able to hold a record of `record_bytes`.
    fn rollover(&mut self, record_bytes: u64) -> Result<(), AppendError> {
        if let Err(e) = self.active.file.sync_data() {
            let name = self.active.name.clone();
            self.poison(&name, &e);
            return Err(AppendError::Io { name, source: e });
        }
        self.durable = self.durable.max(self.head);
        let next =
            match create_segment(&*self.storage, &self.config, self.head.next(), record_bytes) {
                Ok(next) => next,
                Err((name, e)) => {
                    self.poison(&name, &e);
                    return Err(AppendError::Io { name, source: e });
                }
            };
        let old = std::mem::replace(&mut self.active, next);
        self.sealed.push(Sealed { id: old.id });
        self.stats.segments_created += 1;
        Ok(())
    }

    /// First half of a sync, under the append lock: writes the sync frame (which records the
    /// durable seq of the previous sync and pads to a block boundary) and says which file to
    /// fdatasync for which seq. `mark`: write a frame even if nothing new was appended, so
    /// that the current durable seq is itself recorded (used by `close`).
    pub(crate) fn prepare_sync(&mut self, mark: bool) -> Result<SyncPlan, SyncError> {
        self.sync_poisoned()?;
        if self.head == self.durable && !mark {
            return Ok(SyncPlan::Done(self.durable));
        }
        let at = self.active.write_offset;
        let frame_bytes = sync_frame_bytes(at);
        if at + u64::from(frame_bytes) > self.active.capacity {
            // No room for the frame: the segment is full, the next append rolls over.
            self.active.write_offset = self.active.capacity;
        } else {
            let frame = encode_sync_frame(self.durable, frame_bytes, self.active.nonce);
            if let Err(e) = self.active.file.write_all_at(&frame, at) {
                let name = self.active.name.clone();
                self.poison(&name, &e);
                return Err(SyncError::Io { name, source: e });
            }
            self.active.write_offset = at + u64::from(frame_bytes);
        }
        Ok(SyncPlan::Sync {
            target: self.head,
            name: self.active.name.clone(),
            file: self.active.file.clone(),
        })
    }

    /// Second half of a sync, under the append lock again, with the fdatasync's result.
    pub(crate) fn finish_sync(
        &mut self,
        target: Seq,
        name: &str,
        result: io::Result<()>,
    ) -> Result<Seq, SyncError> {
        self.stats.syncs += 1;
        if let Err(e) = result {
            self.poison(name, &e);
            return Err(SyncError::Io {
                name: name.to_string(),
                source: e,
            });
        }
        // Another thread's failure while this fdatasync ran also makes its outcome doubtful.
        self.sync_poisoned()?;
        self.durable = self.durable.max(target);
        Ok(self.durable)
    }

    /// Deletes every sealed segment whose records are all below `up_to`; returns the oldest
    /// seq still stored.
    pub(crate) fn trim(&mut self, up_to: Seq) -> Result<Seq, TrimError> {
        if let Some(cause) = &self.poisoned {
            return Err(TrimError::Poisoned {
                cause: cause.clone(),
            });
        }
        while let Some(oldest) = self.sealed.first() {
            let next_first = self
                .sealed
                .get(1)
                .map_or(self.active.id.first_seq, |s| s.id.first_seq);
            if next_first > up_to {
                break;
            }
            let name = oldest.id.file_name();
            // One directory sync per removal: removals become durable oldest first, so a
            // crash never leaves a hole in the middle of the journal.
            let result = self
                .storage
                .remove(&name)
                .and_then(|()| self.storage.sync_dir());
            if let Err(e) = result {
                self.poison(&name, &e);
                return Err(TrimError::Io { name, source: e });
            }
            self.sealed.remove(0);
        }
        Ok(self.first_seq())
    }

    /// What a reader from `from` needs, up to the current head.
    pub(crate) fn read_plan(&self, from: Seq) -> Result<ReadPlan, ReadError> {
        if let Some(cause) = &self.poisoned {
            return Err(ReadError::Poisoned {
                cause: cause.clone(),
            });
        }
        let first = self.first_seq();
        if from < first || from < Seq::FIRST {
            return Err(ReadError::Trimmed { from, first });
        }
        if from > self.head.next() {
            return Err(ReadError::BeyondHead {
                from,
                head: self.head,
            });
        }
        let mut spans = Vec::new();
        let ids = self
            .sealed
            .iter()
            .map(|s| s.id)
            .chain(std::iter::once(self.active.id));
        let mut ids = ids.peekable();
        while let Some(id) = ids.next() {
            let last = ids.peek().map_or(self.head, |next| next.first_seq.prev());
            if last >= from && last >= id.first_seq {
                spans.push(Span { id, last });
            }
        }
        Ok(ReadPlan {
            storage: self.storage.clone(),
            spans,
            from,
        })
    }
}

fn scan_open_error(id: &SegmentId, error: ScanOpenError) -> OpenError {
    match error {
        ScanOpenError::Io(source) => OpenError::Io {
            name: id.file_name(),
            source,
        },
        ScanOpenError::Header(e) => Corruption {
            segment: id.file_name(),
            seq: id.first_seq,
            reason: e.into(),
        }
        .into(),
    }
}

/// Creates a segment: written under a temporary name, header synced, then renamed and the
/// directory synced, so a segment under its final name always has a durable header (and
/// its predecessor, synced before, is sealed). On error: the file name and the error.
fn create_segment(
    storage: &dyn Storage,
    config: &JournalConfig,
    first_seq: Seq,
    record_bytes: u64,
) -> Result<Active, (String, io::Error)> {
    let id = SegmentId {
        job: config.job,
        generation: config.generation,
        first_seq,
    };
    let name = id.file_name();
    let tmp = id.tmp_file_name();
    let nonce = fresh_nonce(&id);
    let capacity = config.segment_bytes_max.max(align_up(
        SEGMENT_DATA_OFFSET + record_bytes + SYNC_ALIGN_BYTES + SYNC_FRAME_HEADER_BYTES as u64,
    ));
    let with = |file: &str| {
        let file = file.to_string();
        move |e| (file, e)
    };
    let file = storage.create(&tmp).map_err(with(&tmp))?;
    file.allocate(capacity).map_err(with(&tmp))?;
    file.write_all_at(&id.encode_header(nonce), 0)
        .map_err(with(&tmp))?;
    file.sync_data().map_err(with(&tmp))?;
    storage.rename(&tmp, &name).map_err(with(&name))?;
    storage.sync_dir().map_err(with(&name))?;
    Ok(Active {
        id,
        name,
        nonce,
        file,
        write_offset: SEGMENT_DATA_OFFSET,
        capacity,
        writeback_from: SEGMENT_DATA_OFFSET,
    })
}

/// Scans the active segment, verifying every record, and finds where it ends. An invalid
/// frame with no proof of durability after it is a torn tail: cut (zeroed) and reported.
/// An invalid frame that a later sync frame proves durable is corruption: an error, nothing
/// changed. Then the segment is synced, so every record found is durable.
fn recover_active(
    storage: &dyn Storage,
    id: &SegmentId,
    recovery: &mut Recovery,
) -> Result<(Active, Seq), OpenError> {
    let mut scanner = Scanner::open(storage, id).map_err(|e| scan_open_error(id, e))?;
    let name = id.file_name();
    let mut decoder = RecordDecoder::new();
    let mut expected = id.first_seq;
    let mut marked = Seq::NONE;
    let tear = loop {
        let step = scanner.step(true).map_err(io_open(&name))?;
        match step {
            Step::End => break None,
            Step::Sync { durable_seq } => marked = marked.max(durable_seq),
            Step::Invalid(reason) => break Some((scanner.offset(), reason.into())),
            Step::Record { header, at } => {
                let reason = if header.seq != expected {
                    CorruptionReason::SeqMismatch { found: header.seq }
                } else if header.generation != id.generation {
                    CorruptionReason::Generation {
                        found: header.generation,
                        segment: id.generation,
                    }
                } else {
                    match decoder.verify_stored(scanner.record_bytes()) {
                        Ok(_) => {
                            expected = expected.next();
                            continue;
                        }
                        Err(e) => match e {
                            crate::record::DecodeError::Invalid { reason } => reason.into(),
                            crate::record::DecodeError::Incomplete { record_bytes_min } => {
                                crate::record::InvalidRecord::PastEnd {
                                    frame_bytes_min: record_bytes_min as u64,
                                }
                                .into()
                            }
                        },
                    }
                };
                break Some((at, reason));
            }
        }
    };
    let capacity = scanner.file_len;
    let file = scanner.file.clone();
    let write_offset = match tear {
        None => capacity,
        Some((offset, reason)) => {
            let (proof, nonzero_end) =
                scan_past_tear(&*file, offset, capacity, scanner.header.nonce, expected)
                    .map_err(io_open(&name))?;
            if marked >= expected || proof.is_some() {
                return Err(Corruption {
                    segment: name,
                    seq: expected,
                    reason,
                }
                .into());
            }
            if nonzero_end > offset {
                // Cut the tail and zero it (set_len, then allocate again), so no byte of it
                // can ever be read back as a frame.
                file.set_len(offset)
                    .and_then(|()| file.allocate(capacity))
                    .map_err(io_open(&name))?;
                recovery.torn_tail = Some(TornTail {
                    segment: name.clone(),
                    seq: expected,
                    offset,
                    bytes_discarded: nonzero_end - offset,
                    reason,
                });
            }
            // Appends resume on a fresh block: the block at the tear may hold durable bytes.
            align_up(offset).min(capacity)
        }
    };
    file.sync_data().map_err(io_open(&name))?;
    let active = Active {
        id: *id,
        name,
        nonce: scanner.header.nonce,
        file,
        write_offset,
        capacity,
        writeback_from: write_offset,
    };
    Ok((active, expected.prev()))
}

/// Looks at `[tear, end)` for a sync frame of this segment recording a durable seq of at
/// least `seq` (proof that the tear is corruption), and for the end of the non-zero bytes.
fn scan_past_tear(
    file: &dyn StorageFile,
    tear: u64,
    end: u64,
    nonce: [u8; 16],
    seq: Seq,
) -> io::Result<(Option<Seq>, u64)> {
    const CHUNK_BYTES: usize = 1 << 20;
    let overlap = SYNC_FRAME_HEADER_BYTES - 1;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut at = tear;
    let mut nonzero_end = tear;
    while at < end {
        let want = (end - at).min(CHUNK_BYTES as u64) as usize;
        let n = read_full_at(file, &mut buf[..want], at)?;
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        if let Some(i) = data.iter().rposition(|&b| b != 0) {
            nonzero_end = nonzero_end.max(at + i as u64 + 1);
        }
        let last_chunk = at + n as u64 >= end;
        // Frames starting in the overlap are looked at again with the next chunk.
        let starts = if last_chunk {
            n
        } else {
            n.saturating_sub(overlap)
        };
        for i in 0..starts {
            if data[i] != SYNC_MAGIC[0] || !data[i..].starts_with(&SYNC_MAGIC) {
                continue;
            }
            if let Ok((
                Frame::Sync {
                    durable_seq,
                    nonce: found,
                },
                _,
            )) = decode_frame(&data[i..])
            {
                if found == nonce && durable_seq >= seq {
                    return Ok((Some(durable_seq), nonzero_end));
                }
            }
        }
        if last_chunk || starts == 0 {
            at += n as u64;
        } else {
            at += starts as u64;
        }
    }
    Ok((None, nonzero_end))
}

/// A single-threaded journal. For many threads with group commit, see
/// [`SharedJournal`](crate::SharedJournal) (`into_shared`).
#[derive(Debug)]
pub struct Journal {
    core: Core,
    encoder: RecordEncoder,
}

impl Journal {
    /// Opens the journal on `storage` (a [`Storage`] or a directory path), creating it if
    /// empty: removes leftovers of interrupted segment creations, checks every segment
    /// header, verifies every record of the active segment, cuts a torn tail (reported in
    /// [`Journal::recovery`]) and refuses corruption.
    pub fn open(storage: impl IntoStorage, config: JournalConfig) -> Result<Journal, OpenError> {
        let storage = storage
            .into_storage()
            .map_err(io_open("journal directory"))?;
        let encoder = RecordEncoder::new(config.compression);
        Ok(Journal {
            core: Core::open(storage, config)?,
            encoder,
        })
    }

    /// Last appended seq (`Seq(0)` if none).
    pub fn head_seq(&self) -> Seq {
        self.core.head()
    }

    /// Last seq covered by a completed fdatasync.
    pub fn durable_seq(&self) -> Seq {
        self.core.durable()
    }

    /// Oldest seq still stored (`head_seq() + 1` when none is).
    pub fn first_seq(&self) -> Seq {
        self.core.first_seq()
    }

    /// What opening found and repaired.
    pub fn recovery(&self) -> &Recovery {
        self.core.recovery()
    }

    /// Counters since opening.
    pub fn stats(&self) -> JournalStats {
        self.core.stats()
    }

    /// The configuration.
    pub fn config(&self) -> &JournalConfig {
        self.core.config()
    }

    /// Whether an I/O or fsync error poisoned the journal, and which.
    pub fn poisoned(&self) -> Option<&str> {
        self.core.poison_cause()
    }

    /// Appends one record and returns its seq. The record has reached the OS (a pwrite into
    /// the segment) when this returns, so the caller may then write the backing disk; it is
    /// durable after the next [`sync`](Journal::sync).
    pub fn append(&mut self, entry: Entry<'_>) -> Result<Seq, AppendError> {
        self.core.append_poisoned()?;
        let mut record = self.encoder.prepare(&entry)?;
        self.core.append_prepared(&mut record)
    }

    /// Appends a record exactly as another journal stored it, keeping its seq and generation:
    /// how a landing journal takes what an agent shipped. The record must be the next seq,
    /// of this journal's generation, and already verified (`verify_stored`); its header is
    /// checked again here. Durable after the next [`sync`](Journal::sync).
    pub fn append_stored(&mut self, record: &[u8]) -> Result<Seq, AppendError> {
        self.core.append_stored(record)
    }

    /// Makes everything appended durable with one fdatasync; returns the durable seq.
    pub fn sync(&mut self) -> Result<Seq, SyncError> {
        self.sync_with(false)
    }

    fn sync_with(&mut self, mark: bool) -> Result<Seq, SyncError> {
        match self.core.prepare_sync(mark)? {
            SyncPlan::Done(durable) => Ok(durable),
            SyncPlan::Sync { target, name, file } => {
                let result = file.sync_data();
                self.core.finish_sync(target, &name, result)
            }
        }
    }

    /// Syncs, then records the durable seq in a sync frame and syncs again, so that after a
    /// clean close even the last batch is proven durable (recovery then reports damage to it
    /// as corruption rather than cutting it as a torn tail). Returns the durable seq.
    pub fn close(mut self) -> Result<Seq, SyncError> {
        self.sync_with(false)?;
        self.sync_with(true)
    }

    /// A reader of verified records from `from` up to the current head.
    pub fn reader(&self, from: Seq) -> Result<Reader, ReadError> {
        Ok(Reader::new(self.core.read_plan(from)?))
    }

    /// A reader of verified records exactly as stored, from `from` up to the current head.
    pub fn raw_reader(&self, from: Seq) -> Result<RawReader, ReadError> {
        Ok(RawReader::new(self.core.read_plan(from)?))
    }

    /// Deletes every sealed segment whose records are all below `up_to` (call it with what
    /// the peer acknowledged durable, plus one). Returns the oldest seq still stored.
    pub fn trim(&mut self, up_to: Seq) -> Result<Seq, TrimError> {
        self.core.trim(up_to)
    }

    /// The same journal, shareable between threads with group commit.
    pub fn into_shared(self) -> crate::SharedJournal {
        crate::SharedJournal::new(self.core)
    }
}
