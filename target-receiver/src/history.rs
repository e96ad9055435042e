//! The point-in-time history of one job, in RocksDB: the only module of cdp that imports it.
//!
//! Column families and keys (all integers big-endian, so byte order is numeric order):
//!
//! | family | key | value |
//! |---|---|---|
//! | `before` | disk u32, block u64, seq u64 | the block's content just before record `seq` overwrote it: a codec byte (0 raw, then 4096 bytes; 1 all zero, nothing more) |
//! | `checkpoints` | seq u64 | a checkpoint (see [`Checkpoint::encode`]) |
//! | `meta` | `applied` | u64: every record up to it is applied and its before-images are here |
//! | `meta` | `pending` | u64 first, u64 last: a batch whose before-images are durable and whose replica writes may be partial |
//! | `meta` | `floor` | u64: retention removed every entry with seq ≤ floor; points below it are gone |
//!
//! Block `b` of a disk at point `T` holds the before-image of the first `before` entry for
//! `b` with seq > `T`, or, when there is none, what the replica holds now: one seek per block,
//! whatever the disk size or the history's length (DESIGN §2.4).
//!
//! Must never: let a replica block be overwritten before its before-image is durable here
//! (the applier's order: [`History::commit`] with sync, then the replica), or drop an entry a
//! retained point still needs (the compaction filter drops only seq ≤ floor, and the floor
//! never passes a lease).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use journal::{DiskId, Seq, Timestamp};
use rocksdb::compaction_filter::Decision;
use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions,
    SliceTransform, WriteBatch, WriteOptions, DB,
};
use thiserror::Error;

/// History is kept per block of this many bytes.
pub const BLOCK_BYTES: usize = 4096;

const CF_BEFORE: &str = "before";
const CF_CHECKPOINTS: &str = "checkpoints";
const CF_META: &str = "meta";
const KEY_APPLIED: &[u8] = b"applied";
const KEY_PENDING: &[u8] = b"pending";
const KEY_FLOOR: &[u8] = b"floor";
const KEY_RESYNCS: &[u8] = b"resyncs";
/// Resync intervals kept in the meta column, at most (the oldest go first).
pub const RESYNC_INTERVALS_MAX: usize = 1024;

/// The seqs of one resync: the replicas are no recovery point strictly between `begin` and
/// `end` (at `begin` nothing has changed yet; at `end` every differing block was sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncInterval {
    /// Seq of the `Resync` begin record.
    pub begin: Seq,
    /// Seq of the end record; `None` while the resync goes on.
    pub end: Option<Seq>,
}

impl ResyncInterval {
    /// Whether the replicas at `seq` are inside this resync (no recovery point).
    pub fn covers(&self, seq: Seq) -> bool {
        seq > self.begin && self.end.is_none_or(|end| seq < end)
    }
}
/// `before` keys: disk (4) + block (8) + seq (8).
const BEFORE_KEY_BYTES: usize = 20;
/// The part of a `before` key naming the block.
const BLOCK_PREFIX_BYTES: usize = 12;
const CODEC_RAW: u8 = 0;
const CODEC_ZERO: u8 = 1;

/// Why the history store failed.
#[derive(Debug, Error)]
pub enum HistoryError {
    /// RocksDB reported an error.
    #[error("history store: {0}")]
    Db(#[from] rocksdb::Error),
    /// A stored value does not decode.
    #[error("history store: corrupt {what}: {detail}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// A block's content as history keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Block {
    /// All zeroes (stored as one byte).
    Zero,
    /// Exactly [`BLOCK_BYTES`] bytes.
    Data(Box<[u8]>),
}

impl Block {
    /// The block holding `bytes` (at most [`BLOCK_BYTES`], zero-padded).
    pub fn from_bytes(bytes: &[u8]) -> Block {
        if bytes.iter().all(|&b| b == 0) {
            return Block::Zero;
        }
        let mut data = vec![0u8; BLOCK_BYTES].into_boxed_slice();
        data[..bytes.len()].copy_from_slice(bytes);
        Block::Data(data)
    }

    /// Copies the block's first `out.len()` bytes into `out`.
    pub fn copy_to(&self, out: &mut [u8]) {
        match self {
            Block::Zero => out.fill(0),
            Block::Data(data) => out.copy_from_slice(&data[..out.len()]),
        }
    }

    /// The block's bytes, owned.
    pub fn to_vec(&self) -> Vec<u8> {
        match self {
            Block::Zero => vec![0; BLOCK_BYTES],
            Block::Data(data) => data.to_vec(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Block::Zero => vec![CODEC_ZERO],
            Block::Data(data) => {
                let mut out = Vec::with_capacity(1 + BLOCK_BYTES);
                out.push(CODEC_RAW);
                out.extend_from_slice(data);
                out
            }
        }
    }

    fn decode(bytes: &[u8]) -> Result<Block, HistoryError> {
        match bytes.split_first() {
            Some((&CODEC_ZERO, [])) => Ok(Block::Zero),
            Some((&CODEC_RAW, data)) if data.len() == BLOCK_BYTES => Ok(Block::Data(data.into())),
            _ => Err(HistoryError::Corrupt {
                what: "before-image",
                detail: format!("{} bytes, codec {:?}", bytes.len(), bytes.first()),
            }),
        }
    }
}

/// How a checkpoint came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointKind {
    /// Made by the appliance every `checkpoint_interval`.
    Auto,
    /// Asked for by an operator (`cdp checkpoint`), written by the agent into its journal.
    Tagged,
}

/// A named, timestamped point of the job's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The point: the state after every record up to this seq.
    pub seq: Seq,
    /// The agent's clock at that point.
    pub timestamp: Timestamp,
    /// How it was made.
    pub kind: CheckpointKind,
    /// The agent's hook (e.g. a guest fsfreeze) succeeded before it.
    pub app_consistent: bool,
    /// Operator tags.
    pub tags: Vec<String>,
    /// The appliance's request the agent answered with this checkpoint (0: none).
    pub request_id: u64,
}

impl Checkpoint {
    /// `timestamp u64 | kind u8 | app_consistent u8 | request id u64 | tag count u16 |
    /// (len u16, utf-8)*`, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.tags.iter().map(|t| 2 + t.len()).sum::<usize>());
        out.extend_from_slice(&self.timestamp.0.to_le_bytes());
        out.push(match self.kind {
            CheckpointKind::Auto => 0,
            CheckpointKind::Tagged => 1,
        });
        out.push(u8::from(self.app_consistent));
        out.extend_from_slice(&self.request_id.to_le_bytes());
        let tags: Vec<&String> = self
            .tags
            .iter()
            .filter(|t| t.len() <= usize::from(u16::MAX))
            .take(usize::from(u16::MAX))
            .collect();
        out.extend_from_slice(&(tags.len() as u16).to_le_bytes());
        for tag in tags {
            out.extend_from_slice(&(tag.len() as u16).to_le_bytes());
            out.extend_from_slice(tag.as_bytes());
        }
        out
    }

    /// Decodes what [`Checkpoint::encode`] wrote for point `seq`.
    pub fn decode(seq: Seq, bytes: &[u8]) -> Result<Checkpoint, HistoryError> {
        let corrupt = |detail: &str| HistoryError::Corrupt {
            what: "checkpoint",
            detail: format!("seq {seq}: {detail}"),
        };
        let head = bytes.get(..20).ok_or_else(|| corrupt("too short"))?;
        let timestamp = Timestamp(u64::from_le_bytes(
            head[..8].try_into().map_err(|_| corrupt("timestamp"))?,
        ));
        let kind = match head[8] {
            0 => CheckpointKind::Auto,
            1 => CheckpointKind::Tagged,
            _ => return Err(corrupt("unknown kind")),
        };
        let app_consistent = match head[9] {
            0 => false,
            1 => true,
            _ => return Err(corrupt("bad consistency byte")),
        };
        let request_id =
            u64::from_le_bytes(head[10..18].try_into().map_err(|_| corrupt("request id"))?);
        let count = u16::from_le_bytes([head[18], head[19]]);
        let mut at = 20;
        let mut tags = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let len = bytes.get(at..at + 2).ok_or_else(|| corrupt("tag length"))?;
            let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
            let tag = bytes
                .get(at + 2..at + 2 + len)
                .ok_or_else(|| corrupt("tag"))?;
            tags.push(String::from_utf8(tag.to_vec()).map_err(|_| corrupt("tag is not UTF-8"))?);
            at += 2 + len;
        }
        if at != bytes.len() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(Checkpoint {
            seq,
            timestamp,
            kind,
            app_consistent,
            tags,
            request_id,
        })
    }
}

/// A batch whose before-images are durable and whose replica writes may be partial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    /// Its first record.
    pub first: Seq,
    /// Its last record.
    pub last: Seq,
}

/// One before-image to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The disk.
    pub disk: DiskId,
    /// The block (offset / [`BLOCK_BYTES`]).
    pub block: u64,
    /// The record that overwrites it.
    pub seq: Seq,
    /// Its content just before.
    pub image: Block,
}

/// What the store holds, roughly (RocksDB's estimates).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryStats {
    /// Before-image entries.
    pub entries: u64,
    /// Bytes on disk: SST and blob files.
    pub bytes: u64,
}

fn before_key(disk: DiskId, block: u64, seq: Seq) -> [u8; BEFORE_KEY_BYTES] {
    let mut key = [0u8; BEFORE_KEY_BYTES];
    key[..4].copy_from_slice(&disk.0.to_be_bytes());
    key[4..12].copy_from_slice(&block.to_be_bytes());
    key[12..].copy_from_slice(&seq.0.to_be_bytes());
    key
}

fn key_seq(key: &[u8]) -> Option<Seq> {
    let bytes: [u8; 8] = key
        .get(BLOCK_PREFIX_BYTES..BEFORE_KEY_BYTES)?
        .try_into()
        .ok()?;
    Some(Seq(u64::from_be_bytes(bytes)))
}

fn read_u64(bytes: &[u8], what: &'static str) -> Result<u64, HistoryError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| HistoryError::Corrupt {
        what,
        detail: format!("{} bytes instead of 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(array))
}

/// Where before-images live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueStorage {
    /// In RocksDB's blob files (the default).
    BlobFiles,
    /// Inline in the LSM tree's SST files.
    Inline,
}

/// A job's history store.
pub struct History {
    db: DB,
    /// Shared with the compaction filter: entries with seq ≤ floor are dropped.
    floor: Arc<AtomicU64>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("path", &self.db.path())
            .field("floor", &self.floor.load(Ordering::Relaxed))
            .finish()
    }
}

impl History {
    /// Opens (or creates) the history store in `dir`, before-images in blob files.
    pub fn open(dir: &Path) -> Result<History, HistoryError> {
        Self::open_with(dir, ValueStorage::BlobFiles)
    }

    /// Opens (or creates) the history store in `dir`, keeping before-images as `storage`
    /// says (the benchmark `benches/history_values.rs` compares the two).
    pub fn open_with(dir: &Path, storage: ValueStorage) -> Result<History, HistoryError> {
        let floor = Arc::new(AtomicU64::new(0));
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // Two background jobs: the appliance shares two cores with everything else.
        db_opts.set_max_background_jobs(2);

        let mut before = Options::default();
        if storage == ValueStorage::BlobFiles {
            // Before-images go to blob files: the LSM tree holds only keys and small
            // pointers, so compaction rewrites little (measured against values inline:
            // docs/BENCHMARKS.md, "History store").
            before.set_enable_blob_files(true);
            before.set_min_blob_size(64);
            before.set_enable_blob_gc(true);
        }
        before.set_prefix_extractor(SliceTransform::create_fixed_prefix(BLOCK_PREFIX_BYTES));
        before.set_memtable_prefix_bloom_ratio(0.1);
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_whole_key_filtering(false);
        before.set_block_based_table_factory(&table);
        let filter_floor = Arc::clone(&floor);
        before.set_compaction_filter(
            "cdp-retention",
            move |_level: u32, key: &[u8], _value: &[u8]| match key_seq(key) {
                Some(seq) if seq.0 <= filter_floor.load(Ordering::Relaxed) => Decision::Remove,
                _ => Decision::Keep,
            },
        );
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_BEFORE, before),
            ColumnFamilyDescriptor::new(CF_CHECKPOINTS, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&db_opts, dir, cfs)?;
        let history = History { db, floor };
        let stored = history.meta_u64(KEY_FLOOR)?.unwrap_or(0);
        history.floor.store(stored, Ordering::Relaxed);
        Ok(history)
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, HistoryError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| HistoryError::Corrupt {
                what: "column family",
                detail: format!("{name} is missing"),
            })
    }

    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, HistoryError> {
        match self.db.get_cf(self.cf(CF_META)?, key)? {
            Some(v) => Ok(Some(read_u64(&v, "meta value")?)),
            None => Ok(None),
        }
    }

    fn sync_write(&self, batch: WriteBatch) -> Result<(), HistoryError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// Every record up to this seq is applied to the replicas.
    pub fn applied(&self) -> Result<Seq, HistoryError> {
        Ok(Seq(self.meta_u64(KEY_APPLIED)?.unwrap_or(0)))
    }

    /// The batch a crash interrupted, if any.
    pub fn pending(&self) -> Result<Option<Pending>, HistoryError> {
        match self.db.get_cf(self.cf(CF_META)?, KEY_PENDING)? {
            None => Ok(None),
            Some(v) if v.len() == 16 => Ok(Some(Pending {
                first: Seq(read_u64(&v[..8], "pending")?),
                last: Seq(read_u64(&v[8..], "pending")?),
            })),
            Some(v) => Err(HistoryError::Corrupt {
                what: "pending batch",
                detail: format!("{} bytes", v.len()),
            }),
        }
    }

    /// Makes a batch's before-images durable, with the batch marked pending: after this, and
    /// only after this, the replica may be overwritten.
    pub fn commit(&self, pending: Pending, entries: &[Entry]) -> Result<(), HistoryError> {
        let before = self.cf(CF_BEFORE)?;
        let mut batch = WriteBatch::default();
        for e in entries {
            batch.put_cf(before, before_key(e.disk, e.block, e.seq), e.image.encode());
        }
        let mut marker = [0u8; 16];
        marker[..8].copy_from_slice(&pending.first.0.to_be_bytes());
        marker[8..].copy_from_slice(&pending.last.0.to_be_bytes());
        batch.put_cf(self.cf(CF_META)?, KEY_PENDING, marker);
        self.sync_write(batch)
    }

    /// The batch is applied and its replicas synced: `applied` becomes `last`, the pending
    /// mark goes, and `checkpoints` join the catalog, in one durable write.
    pub fn finish_with(
        &self,
        applied: Seq,
        checkpoints: &[Checkpoint],
    ) -> Result<(), HistoryError> {
        self.finish_pass(applied, checkpoints, None)
    }

    /// [`History::finish_with`], also replacing the resync intervals when the pass changed
    /// them, in the same durable write.
    pub fn finish_pass(
        &self,
        applied: Seq,
        checkpoints: &[Checkpoint],
        resyncs: Option<&[ResyncInterval]>,
    ) -> Result<(), HistoryError> {
        let meta = self.cf(CF_META)?;
        let mut batch = WriteBatch::default();
        if let Some(resyncs) = resyncs {
            let keep = &resyncs[resyncs.len().saturating_sub(RESYNC_INTERVALS_MAX)..];
            let mut bytes = Vec::with_capacity(keep.len() * 16);
            for r in keep {
                bytes.extend_from_slice(&r.begin.0.to_be_bytes());
                bytes.extend_from_slice(&r.end.map_or(0, |e| e.0).to_be_bytes());
            }
            batch.put_cf(meta, KEY_RESYNCS, bytes);
        }
        batch.put_cf(meta, KEY_APPLIED, applied.0.to_be_bytes());
        batch.delete_cf(meta, KEY_PENDING);
        for cp in checkpoints {
            batch.put_cf(
                self.cf(CF_CHECKPOINTS)?,
                cp.seq.0.to_be_bytes(),
                cp.encode(),
            );
        }
        self.sync_write(batch)
    }

    /// Clears the pending mark after a rollback (the replica holds the state before the
    /// batch again).
    pub fn clear_pending(&self) -> Result<(), HistoryError> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_META)?, KEY_PENDING);
        self.sync_write(batch)
    }

    /// The before-image record `seq` saved for `block`, if it saved one.
    pub fn entry(&self, disk: DiskId, block: u64, seq: Seq) -> Result<Option<Block>, HistoryError> {
        match self
            .db
            .get_cf(self.cf(CF_BEFORE)?, before_key(disk, block, seq))?
        {
            Some(v) => Ok(Some(Block::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// A reader of `disk` as it was at point `at`.
    pub fn reader(&self, disk: DiskId, at: Seq) -> Result<PointReader<'_>, HistoryError> {
        let mut opts = ReadOptions::default();
        opts.set_prefix_same_as_start(true);
        let iter = self.db.raw_iterator_cf_opt(self.cf(CF_BEFORE)?, opts);
        Ok(PointReader { iter, disk, at })
    }

    /// Adds (or replaces) a checkpoint in the catalog.
    pub fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), HistoryError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_CHECKPOINTS)?,
            checkpoint.seq.0.to_be_bytes(),
            checkpoint.encode(),
        );
        self.sync_write(batch)
    }

    /// Every checkpoint, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, HistoryError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_CHECKPOINTS)?, IteratorMode::Start)
        {
            let (key, value) = item?;
            out.push(Checkpoint::decode(
                Seq(read_u64(&key, "checkpoint key")?),
                &value,
            )?);
        }
        Ok(out)
    }

    /// The newest checkpoint at or before `seq`.
    pub fn checkpoint_at_or_before(&self, seq: Seq) -> Result<Option<Checkpoint>, HistoryError> {
        let key = seq.0.to_be_bytes();
        let mut iter = self.db.iterator_cf(
            self.cf(CF_CHECKPOINTS)?,
            IteratorMode::From(&key, Direction::Reverse),
        );
        match iter.next() {
            Some(item) => {
                let (key, value) = item?;
                Ok(Some(Checkpoint::decode(
                    Seq(read_u64(&key, "checkpoint key")?),
                    &value,
                )?))
            }
            None => Ok(None),
        }
    }

    /// Removes checkpoints from the catalog (thinning, retention).
    pub fn delete_checkpoints(&self, seqs: &[Seq]) -> Result<(), HistoryError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let cf = self.cf(CF_CHECKPOINTS)?;
        let mut batch = WriteBatch::default();
        for seq in seqs {
            batch.delete_cf(cf, seq.0.to_be_bytes());
        }
        self.sync_write(batch)
    }

    /// The resyncs the history knows, oldest first (the last may still be open).
    pub fn resync_intervals(&self) -> Result<Vec<ResyncInterval>, HistoryError> {
        let Some(bytes) = self.db.get_cf(self.cf(CF_META)?, KEY_RESYNCS)? else {
            return Ok(Vec::new());
        };
        if bytes.len() % 16 != 0 {
            return Err(HistoryError::Corrupt {
                what: "resync intervals",
                detail: format!("{} bytes", bytes.len()),
            });
        }
        bytes
            .chunks_exact(16)
            .map(|c| {
                let begin = Seq(read_u64(&c[..8], "resync begin")?);
                let end = read_u64(&c[8..], "resync end")?;
                Ok(ResyncInterval {
                    begin,
                    end: (end != 0).then_some(Seq(end)),
                })
            })
            .collect()
    }

    /// Points at or below this seq are gone.
    pub fn floor(&self) -> Seq {
        Seq(self.floor.load(Ordering::Relaxed))
    }

    /// Gives up every point below `floor`: entries with seq ≤ `floor` are dropped by
    /// compaction from now on. The caller guarantees no lease or window covers them.
    pub fn set_floor(&self, floor: Seq) -> Result<(), HistoryError> {
        if floor <= self.floor() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META)?, KEY_FLOOR, floor.0.to_be_bytes());
        self.sync_write(batch)?;
        self.floor.store(floor.0, Ordering::Relaxed);
        Ok(())
    }

    /// Compacts the before-images, so entries below the floor give their space back.
    pub fn compact(&self) -> Result<(), HistoryError> {
        self.db
            .compact_range_cf(self.cf(CF_BEFORE)?, None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    /// Rough size of the store.
    pub fn stats(&self) -> Result<HistoryStats, HistoryError> {
        let cf = self.cf(CF_BEFORE)?;
        let prop = |name: &str| -> Result<u64, HistoryError> {
            Ok(self.db.property_int_value_cf(cf, name)?.unwrap_or(0))
        };
        Ok(HistoryStats {
            entries: prop("rocksdb.estimate-num-keys")?,
            bytes: prop("rocksdb.total-sst-files-size")? + prop("rocksdb.total-blob-file-size")?,
        })
    }
}

/// Reads blocks of one disk as they were at one point; reuses one iterator.
pub struct PointReader<'a> {
    iter: rocksdb::DBRawIterator<'a>,
    disk: DiskId,
    at: Seq,
}

impl std::fmt::Debug for PointReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointReader")
            .field("disk", &self.disk)
            .field("at", &self.at)
            .finish()
    }
}

impl PointReader<'_> {
    /// Block `block` at the reader's point, if history holds it (else the replica does).
    pub fn block(&mut self, block: u64) -> Result<Option<Block>, HistoryError> {
        let key = before_key(self.disk, block, self.at.next());
        self.iter.seek(key);
        if !self.iter.valid() {
            self.iter.status()?;
            return Ok(None);
        }
        match (self.iter.key(), self.iter.value()) {
            (Some(k), Some(v))
                if k.len() == BEFORE_KEY_BYTES
                    && k[..BLOCK_PREFIX_BYTES] == key[..BLOCK_PREFIX_BYTES] =>
            {
                Ok(Some(Block::decode(v)?))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(fill: u8) -> Block {
        Block::from_bytes(&[fill; BLOCK_BYTES])
    }

    #[test]
    fn the_first_entry_after_a_point_is_the_block_at_that_point() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::open(dir.path()).unwrap();
        let entry = |block, seq, image| Entry {
            disk: DiskId(1),
            block,
            seq: Seq(seq),
            image,
        };
        h.commit(
            Pending {
                first: Seq(5),
                last: Seq(9),
            },
            &[
                entry(3, 5, Block::Zero),
                entry(3, 9, data(5)),
                entry(4, 7, data(1)),
            ],
        )
        .unwrap();
        assert_eq!(
            h.pending().unwrap(),
            Some(Pending {
                first: Seq(5),
                last: Seq(9)
            })
        );
        h.finish_with(Seq(9), &[]).unwrap();
        assert_eq!(h.pending().unwrap(), None);
        assert_eq!(h.applied().unwrap(), Seq(9));
        let r = |at: u64, block: u64| h.reader(DiskId(1), Seq(at)).unwrap().block(block).unwrap();
        assert_eq!(r(4, 3), Some(Block::Zero));
        assert_eq!(r(5, 3), Some(data(5)));
        assert_eq!(r(8, 3), Some(data(5)));
        assert_eq!(r(9, 3), None, "at the last point the replica holds it");
        assert_eq!(r(6, 4), Some(data(1)));
        assert_eq!(r(7, 4), None);
        assert_eq!(r(0, 5), None, "a block never overwritten");
        // Another disk with the same block numbers sees nothing.
        assert_eq!(h.reader(DiskId(2), Seq(0)).unwrap().block(3).unwrap(), None);
        assert_eq!(h.entry(DiskId(1), 3, Seq(9)).unwrap(), Some(data(5)));
    }

    #[test]
    fn the_floor_survives_reopening_and_compaction_drops_entries_below_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let h = History::open(dir.path()).unwrap();
            let entries: Vec<Entry> = (1..=100)
                .map(|seq| Entry {
                    disk: DiskId(0),
                    block: seq % 10,
                    seq: Seq(seq),
                    image: data(seq as u8),
                })
                .collect();
            h.commit(
                Pending {
                    first: Seq(1),
                    last: Seq(100),
                },
                &entries,
            )
            .unwrap();
            h.finish_with(Seq(100), &[]).unwrap();
            h.set_floor(Seq(50)).unwrap();
            h.compact().unwrap();
            assert_eq!(h.entry(DiskId(0), 0, Seq(50)).unwrap(), None);
            assert_eq!(h.entry(DiskId(0), 1, Seq(51)).unwrap(), Some(data(51)));
        }
        let h = History::open(dir.path()).unwrap();
        assert_eq!(h.floor(), Seq(50));
        assert_eq!(
            h.reader(DiskId(0), Seq(50)).unwrap().block(1).unwrap(),
            Some(data(51))
        );
    }

    #[test]
    fn checkpoints_round_trip_and_are_found_by_seq() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::open(dir.path()).unwrap();
        let cp = |seq, tags: &[&str]| Checkpoint {
            seq: Seq(seq),
            timestamp: Timestamp(seq * 1000),
            kind: if tags.is_empty() {
                CheckpointKind::Auto
            } else {
                CheckpointKind::Tagged
            },
            app_consistent: seq % 2 == 0,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            request_id: seq * 3,
        };
        h.put_checkpoint(&cp(10, &[])).unwrap();
        h.finish_with(Seq(20), &[cp(20, &["before-upgrade", "ü"])])
            .unwrap();
        assert_eq!(
            h.checkpoints().unwrap(),
            vec![cp(10, &[]), cp(20, &["before-upgrade", "ü"])]
        );
        assert_eq!(
            h.checkpoint_at_or_before(Seq(15)).unwrap(),
            Some(cp(10, &[]))
        );
        assert_eq!(h.checkpoint_at_or_before(Seq(9)).unwrap(), None);
        h.delete_checkpoints(&[Seq(10)]).unwrap();
        assert_eq!(h.checkpoints().unwrap().len(), 1);
        for bad in [
            &[][..],
            &[0u8; 19][..],
            &[0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
        ] {
            assert!(Checkpoint::decode(Seq(1), bad).is_err());
        }
    }
}
