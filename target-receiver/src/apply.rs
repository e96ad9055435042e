//! The applier: replays a job's landing journal onto its replica disks in seq order, keeping
//! every overwritten block's before-image in the history store, so each replica is always a
//! usable raw image current up to the applied seq and any earlier point can be read back.
//!
//! One pass ([`apply_pass`]):
//! 1. reads verified records from `applied + 1` up to the landing journal's durable seq (at
//!    most [`APPLY_PASS_RECORDS_MAX`] records and [`APPLY_PASS_IMAGE_BYTES_MAX`] of
//!    before-images);
//! 2. computes the before-image of every block each record touches — from the replica, or
//!    from an earlier record of the same pass — and the checkpoints the pass makes;
//! 3. commits the before-images to the history store with the pass marked *pending*, synced;
//! 4. writes the records to the replicas (`blockdev::apply_record`) and `fdatasync`s them;
//! 5. records the applied seq (and the checkpoints) and clears the pending mark, synced.
//!
//! A crash between 3 and 5 leaves the pending mark: [`recover`] restores every block the pass
//! touched from its before-image (latest record first, so the oldest image wins), syncs, and
//! clears the mark; the pass is then applied again, producing the same before-images.
//! Failpoints (`failpoints` feature) sit at each step boundary.
//!
//! Must never: apply a record the journal did not verify, apply seq `s` before every seq
//! below it, apply beyond the landing journal's durable seq, overwrite a replica block before
//! its before-image is durable, or create a checkpoint while the replica is inconsistent.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use blockdev::BlockDevice;
use journal::{DiskId, ReadError, RecordHeader, RecordKind, Seq, Timestamp};
use thiserror::Error;

use crate::history::{
    Block, Checkpoint, CheckpointKind, Entry, HistoryError, Pending, ResyncInterval, BLOCK_BYTES,
};
use crate::jobs::Job;
use journal::resync::{block_hash, ResyncMark, BLOCK_HASH_BYTES};
use journal::wire::ResyncNeed;

/// Records applied per pass, at most.
pub const APPLY_PASS_RECORDS_MAX: usize = 4096;
/// After a pass smaller than a quarter of [`APPLY_PASS_RECORDS_MAX`], the applier waits this
/// long for more records before the next one (the replicas lag the landing journal by about
/// this much; the RPO is measured at the landing journal and is not affected).
pub const APPLY_GATHER: Duration = Duration::from_millis(200);
/// Before-image bytes (of blocks that are not all zero) gathered per pass, at most; one
/// record always goes whole.
pub const APPLY_PASS_IMAGE_BYTES_MAX: usize = 32 << 20;

/// Why applying stopped.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// The landing journal could not be read, or a record failed verification.
    #[error("reading the landing journal: {0}")]
    Read(#[from] ReadError),
    /// A record names a disk the job does not have.
    #[error("record seq {seq} names disk id {}, which the job does not have", .disk.0)]
    UnknownDisk {
        /// The record.
        seq: Seq,
        /// Its disk.
        disk: DiskId,
    },
    /// A record did not fit its replica, or the replica failed.
    #[error("replica {disk}: {source}")]
    Replica {
        /// The disk's name.
        disk: String,
        /// What failed.
        source: blockdev::ApplyError,
    },
    /// Reading, syncing or restoring a replica failed.
    #[error("replica {disk}: {source}")]
    Io {
        /// The disk's name.
        disk: String,
        /// The error.
        source: std::io::Error,
    },
    /// The history store failed.
    #[error(transparent)]
    History(#[from] HistoryError),
    /// Seqs are not dense: the journal returned `found` where `expected` belongs.
    #[error("landing journal returned seq {found} where {expected} belongs")]
    Gap {
        /// The seq due.
        expected: Seq,
        /// The seq read.
        found: Seq,
    },
    /// A failpoint stopped the pass (tests only).
    #[error("failpoint {0}")]
    Failpoint(&'static str),
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Records applied.
    pub records: u64,
    /// Bytes written or zeroed.
    pub bytes: u64,
    /// Before-images recorded.
    pub images: u64,
    /// The applied seq after the pass.
    pub applied: Seq,
    /// Resync hashes records answered.
    pub answered: u64,
}

/// A record held for the pass: its header and plaintext payload.
struct Held {
    header: RecordHeader,
    payload: Vec<u8>,
}

/// Blocks `[first, last]` a record's extent touches; `None` for one that touches none.
fn block_span(header: &RecordHeader) -> Option<(u64, u64)> {
    match header.kind {
        RecordKind::Write | RecordKind::Trim | RecordKind::WriteZeroes if header.length > 0 => {
            let block = BLOCK_BYTES as u64;
            let end = header.offset + u64::from(header.length);
            Some((header.offset / block, (end - 1) / block))
        }
        _ => None,
    }
}

/// Reads block `block` of `device` (zero-padded past the device's end).
fn read_block(device: &dyn BlockDevice, block: u64) -> std::io::Result<Block> {
    let start = block * BLOCK_BYTES as u64;
    let len = device
        .size_bytes()
        .saturating_sub(start)
        .min(BLOCK_BYTES as u64) as usize;
    let mut buf = vec![0u8; len];
    device.read_at(&mut buf, start)?;
    Ok(Block::from_bytes(&buf))
}

/// Block `block`'s content after `record` changed `before`.
fn after(before: &Block, header: &RecordHeader, payload: &[u8], block: u64) -> Block {
    let block_start = block * BLOCK_BYTES as u64;
    let from = header.offset.max(block_start);
    let to = (header.offset + u64::from(header.length)).min(block_start + BLOCK_BYTES as u64);
    let mut bytes = before.to_vec();
    let (lo, hi) = ((from - block_start) as usize, (to - block_start) as usize);
    match header.kind {
        RecordKind::Write => {
            let at = (from - header.offset) as usize;
            bytes[lo..hi].copy_from_slice(&payload[at..at + (hi - lo)]);
        }
        _ => bytes[lo..hi].fill(0),
    }
    Block::from_bytes(&bytes)
}

/// Which blocks of a resync hashes record differ from the replica as it is at that record:
/// the replica's bytes, with the blocks earlier records of the same pass changed taken from
/// `overlay`. A bit per block, as `ResyncNeed::differing` carries them. Blocks past the end
/// of the disk are never named (the agent hashes only what the disk holds).
fn compare_hashes(
    job: &Job,
    overlay: &HashMap<(DiskId, u64), Block>,
    header: &RecordHeader,
    offset: u64,
    block_bytes: u32,
    hashes: &[[u8; BLOCK_HASH_BYTES]],
) -> Result<Vec<u8>, ApplyError> {
    let replica = job
        .replicas
        .get(&header.disk)
        .ok_or(ApplyError::UnknownDisk {
            seq: header.seq,
            disk: header.disk,
        })?;
    let size = replica.device.size_bytes();
    let mut differing = vec![0u8; hashes.len().div_ceil(8)];
    let mut buf = vec![0u8; block_bytes as usize];
    for (i, hash) in hashes.iter().enumerate() {
        let Some(start) = (i as u64)
            .checked_mul(u64::from(block_bytes))
            .and_then(|d| offset.checked_add(d))
            .filter(|&start| start < size)
        else {
            break;
        };
        let len = (size - start).min(u64::from(block_bytes)) as usize;
        let bytes = &mut buf[..len];
        replica
            .device
            .read_at(bytes, start)
            .map_err(|source| ApplyError::Io {
                disk: replica.info.name.clone(),
                source,
            })?;
        let block = BLOCK_BYTES as u64;
        let end = start + len as u64;
        for b in start / block..end.div_ceil(block) {
            if let Some(image) = overlay.get(&(header.disk, b)) {
                // The block as an earlier record of this pass left it.
                let mut whole = vec![0u8; BLOCK_BYTES];
                image.copy_to(&mut whole);
                let (from, to) = ((b * block).max(start), ((b + 1) * block).min(end));
                bytes[(from - start) as usize..(to - start) as usize].copy_from_slice(
                    &whole[(from - b * block) as usize..(to - b * block) as usize],
                );
            }
        }
        if block_hash(bytes) != *hash {
            differing[i / 8] |= 1 << (i % 8);
        }
    }
    Ok(differing)
}

/// The checkpoint a `Checkpoint` record asks for, if its payload is a valid mark.
fn tagged_checkpoint(header: &RecordHeader, payload: &[u8]) -> Option<Checkpoint> {
    let mark = journal::mark::CheckpointMark::decode(payload).ok()?;
    Some(Checkpoint {
        seq: header.seq,
        timestamp: header.timestamp,
        kind: CheckpointKind::Tagged,
        app_consistent: mark.app_consistent,
        tags: mark.tags,
        request_id: mark.request_id,
    })
}

macro_rules! failpoint {
    ($name:literal) => {
        fail::fail_point!($name, |_| Err(ApplyError::Failpoint($name)));
    };
}

/// Restores the replicas after a crash interrupted a pass (see the module docs). Returns the
/// batch it rolled back. Blocking.
pub fn recover(job: &Job) -> Result<Option<Pending>, ApplyError> {
    let Some(pending) = job.history.pending()? else {
        return Ok(None);
    };
    tracing::warn!(job = %job.id(), first = %pending.first, last = %pending.last, "rolling back a batch a crash interrupted");
    let mut held = Vec::new();
    let mut reader = job.landing.reader(pending.first)?;
    while let Some(rec) = reader.next_record()? {
        if rec.header.seq > pending.last {
            break;
        }
        held.push(rec.header);
    }
    let mut touched = BTreeSet::new();
    for header in held.iter().rev() {
        let Some((first, last)) = block_span(header) else {
            continue;
        };
        let replica = job
            .replicas
            .get(&header.disk)
            .ok_or(ApplyError::UnknownDisk {
                seq: header.seq,
                disk: header.disk,
            })?;
        let io = |source| ApplyError::Io {
            disk: replica.info.name.clone(),
            source,
        };
        for block in first..=last {
            if let Some(image) = job.history.entry(header.disk, block, header.seq)? {
                let start = block * BLOCK_BYTES as u64;
                let len = replica
                    .device
                    .size_bytes()
                    .saturating_sub(start)
                    .min(BLOCK_BYTES as u64) as usize;
                let mut bytes = vec![0u8; len];
                image.copy_to(&mut bytes);
                replica.device.write_at(&bytes, start).map_err(io)?;
                touched.insert(header.disk);
            }
        }
    }
    sync_replicas(job, &touched)?;
    failpoint!("recover::before-clear");
    job.history.clear_pending()?;
    Ok(Some(pending))
}

fn sync_replicas(job: &Job, disks: &BTreeSet<DiskId>) -> Result<(), ApplyError> {
    for disk in disks {
        if let Some(replica) = job.replicas.get(disk) {
            replica
                .device
                .sync_data()
                .map_err(|source| ApplyError::Io {
                    disk: replica.info.name.clone(),
                    source,
                })?;
        }
    }
    Ok(())
}

/// Applies records of `job` from its applied seq + 1 up to `up_to` (see the module docs).
/// Blocking.
pub fn apply_pass(job: &Job, up_to: Seq) -> Result<Pass, ApplyError> {
    let applied = job.applied();
    let mut pass = Pass {
        applied,
        ..Pass::default()
    };
    if up_to <= applied {
        return Ok(pass);
    }

    // 1 and 2: records, before-images, checkpoints.
    let mut reader = job.landing.reader(applied.next())?;
    let mut held: Vec<Held> = Vec::new();
    let mut overlay: HashMap<(DiskId, u64), Block> = HashMap::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut image_bytes = 0usize;
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let mut resyncs = job.resyncs();
    let mut resyncs_changed = false;
    let mut needs: Vec<ResyncNeed> = Vec::new();
    let mut expected = applied.next();
    while expected <= up_to
        && held.len() < APPLY_PASS_RECORDS_MAX
        && (held.is_empty() || image_bytes < APPLY_PASS_IMAGE_BYTES_MAX)
    {
        let Some(rec) = reader.next_record()? else {
            break;
        };
        let header = rec.header;
        if header.seq != expected {
            return Err(ApplyError::Gap {
                expected,
                found: header.seq,
            });
        }
        let consistent = resyncs.last().is_none_or(|r| r.end.is_some());
        if header.kind == RecordKind::Checkpoint {
            match tagged_checkpoint(&header, rec.payload) {
                // A replica in the middle of a resync is no recovery point.
                Some(_) if !consistent => {
                    tracing::warn!(job = %job.id(), seq = %header.seq, "checkpoint inside a resync; not recorded")
                }
                Some(cp) => checkpoints.push(cp),
                None => {
                    tracing::warn!(job = %job.id(), seq = %header.seq, "checkpoint record with an unreadable mark; ignored")
                }
            }
        }
        if header.kind == RecordKind::Resync {
            match ResyncMark::decode(rec.payload) {
                Ok(ResyncMark::Begin {
                    reason,
                    total_bytes,
                }) => {
                    tracing::info!(job = %job.id(), seq = %header.seq, reason = reason.name(), total_bytes, "resync begins: the replicas are inconsistent until it ends");
                    if consistent {
                        resyncs.push(ResyncInterval {
                            begin: header.seq,
                            end: None,
                        });
                        resyncs_changed = true;
                    }
                }
                Ok(ResyncMark::End) => {
                    if let Some(open) = resyncs.last_mut().filter(|r| r.end.is_none()) {
                        tracing::info!(job = %job.id(), seq = %header.seq, began = %open.begin, "resync ends: the replicas are consistent");
                        open.end = Some(header.seq);
                        resyncs_changed = true;
                    }
                }
                Ok(ResyncMark::Hashes {
                    offset,
                    block_bytes,
                    hashes,
                }) => {
                    let differing =
                        compare_hashes(job, &overlay, &header, offset, block_bytes, &hashes)?;
                    needs.push(ResyncNeed {
                        hashes_seq: header.seq,
                        count: hashes.len() as u32,
                        differing,
                    });
                }
                Err(e) => {
                    tracing::warn!(job = %job.id(), seq = %header.seq, error = %e, "resync record with an unreadable mark; ignored")
                }
            }
        }
        if let Some((first, last)) = block_span(&header) {
            let replica = job
                .replicas
                .get(&header.disk)
                .ok_or(ApplyError::UnknownDisk {
                    seq: header.seq,
                    disk: header.disk,
                })?;
            let end = header.offset.checked_add(u64::from(header.length));
            if end.is_none_or(|end| end > replica.device.size_bytes()) {
                return Err(ApplyError::Replica {
                    disk: replica.info.name.clone(),
                    source: blockdev::ApplyError::OutOfRange {
                        seq: header.seq,
                        kind: header.kind,
                        offset: header.offset,
                        length: header.length,
                        size_bytes: replica.device.size_bytes(),
                    },
                });
            }
            for block in first..=last {
                let key = (header.disk, block);
                let before = match overlay.remove(&key) {
                    Some(b) => b,
                    None => {
                        read_block(&*replica.device, block).map_err(|source| ApplyError::Io {
                            disk: replica.info.name.clone(),
                            source,
                        })?
                    }
                };
                let next = after(&before, &header, rec.payload, block);
                if matches!(before, Block::Data(_)) {
                    image_bytes += BLOCK_BYTES;
                }
                entries.push(Entry {
                    disk: header.disk,
                    block,
                    seq: header.seq,
                    image: before,
                });
                overlay.insert(key, next);
            }
        }
        held.push(Held {
            header,
            payload: rec.payload.to_vec(),
        });
        expected = expected.next();
    }
    drop(overlay);
    let Some(last) = held.last().map(|h| h.header.seq) else {
        return Ok(pass);
    };
    let last_timestamp = held.last().map_or(Timestamp(0), |h| h.header.timestamp);
    let consistent_at_end = resyncs.last().is_none_or(|r| r.end.is_some());
    if let Some(auto) = job.auto_checkpoint_due(last, last_timestamp) {
        if consistent_at_end && !checkpoints.iter().any(|c| c.seq == auto.seq) {
            checkpoints.push(auto);
        }
    }

    // 3: before-images durable, the pass marked pending.
    job.history.commit(
        Pending {
            first: applied.next(),
            last,
        },
        &entries,
    )?;
    failpoint!("apply::after-commit");

    // 4: the replicas.
    let mut touched = BTreeSet::new();
    for (i, h) in held.iter().enumerate() {
        if block_span(&h.header).is_none() {
            continue;
        }
        let replica = &job.replicas[&h.header.disk];
        pass.bytes +=
            blockdev::apply_record(&*replica.device, &h.header, &h.payload).map_err(|source| {
                ApplyError::Replica {
                    disk: replica.info.name.clone(),
                    source,
                }
            })?;
        touched.insert(h.header.disk);
        if i == held.len() / 2 {
            failpoint!("apply::mid-replica");
        }
    }
    failpoint!("apply::after-replica-write");
    sync_replicas(job, &touched)?;
    failpoint!("apply::after-replica-sync");

    // 5: applied, checkpoints, pending cleared.
    checkpoints.sort_by_key(|c| c.seq);
    job.history
        .finish_pass(last, &checkpoints, resyncs_changed.then_some(&resyncs[..]))?;
    failpoint!("apply::after-finish");
    job.set_applied(last);
    if resyncs_changed {
        job.set_resyncs(resyncs);
    }
    pass.answered = needs.len() as u64;
    for need in needs {
        job.send_resync_need(need);
    }
    for cp in &checkpoints {
        job.note_checkpoint(cp);
    }
    // The landing journal keeps everything after the applied seq, which is now durable.
    if let Err(e) = job.landing.trim(last.next()) {
        tracing::warn!(job = %job.id(), error = %e, "trimming the landing journal failed");
    }
    pass.records = held.len() as u64;
    pass.images = entries.len() as u64;
    pass.applied = last;
    Ok(pass)
}

/// Runs the applier of `job` until `stop` fires: applies whatever lands; after an error it
/// retries with a growing delay (the job shows the error meanwhile).
pub async fn run_applier(job: std::sync::Arc<Job>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut landed = job.landed.subscribe();
    let mut backoff = Duration::from_millis(100);
    let mut last_error_at: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let up_to = *landed.borrow_and_update();
        if up_to > job.applied() {
            let worker = std::sync::Arc::clone(&job);
            let result = tokio::task::spawn_blocking(move || -> Result<Pass, ApplyError> {
                recover(&worker)?;
                apply_pass(&worker, up_to)
            })
            .await;
            match result {
                Ok(Ok(pass)) => {
                    if job.apply_error().is_some() {
                        tracing::info!(job = %job.id(), "applier recovered");
                        job.set_apply_error(None);
                    }
                    backoff = Duration::from_millis(100);
                    // A small pass still costs two synced history writes and the replicas'
                    // fdatasyncs, which compete with the landing journal's syncs (the RPO)
                    // for the disk: while records trickle in, gather them for a while.
                    // A resync waits on the answers: no gathering while it runs.
                    if (pass.records as usize) < APPLY_PASS_RECORDS_MAX / 4 && pass.answered == 0 {
                        tokio::select! {
                            _ = tokio::time::sleep(APPLY_GATHER) => {}
                            _ = stop.changed() => {}
                        }
                    }
                    continue;
                }
                Ok(Err(e)) => {
                    if last_error_at.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::error!(job = %job.id(), error = %e, retry_in = ?backoff, "applier stopped on an error");
                        last_error_at = Some(Instant::now());
                    }
                    job.set_apply_error(Some(e.to_string()));
                }
                Err(e) => {
                    tracing::error!(job = %job.id(), error = %e, "applier task failed");
                    job.set_apply_error(Some(format!("applier task failed: {e}")));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
            continue;
        }
        tokio::select! {
            changed = landed.changed() => if changed.is_err() { break },
            _ = stop.changed() => {}
        }
    }
}
