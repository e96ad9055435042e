//! The resync (and initial sync): brings the replicas of dirty regions back in line by
//! comparing block hashes, sending only the blocks that differ. Everything goes through the
//! journal, so it is ordered with the writes around it:
//!
//! 1. a `Resync` begin record (the appliance marks the replicas inconsistent from it on);
//! 2. per dirty region, under the region's range lock (so no write is half-way through it):
//!    the region is read from the backing disk, hashed per [`RESYNC_BLOCK_BYTES`] block, and
//!    a hashes record appended. The appliance's applier compares them with the replica *at
//!    that record's seq* and answers with a `ResyncNeed` frame naming the differing blocks;
//! 3. the differing blocks are read again under their range lock and appended as ordinary
//!    `Write` records (their content at that seq), then the region is cleared in the dirty
//!    map once those records are durable in the journal;
//! 4. when the map is clean, an end record (the replicas are consistent from it on).
//!
//! Writes keep being journalled throughout, so a region compared at seq `h` is correct at
//! `h`, and every later write to it follows in the journal. A lost connection or a switch to
//! tracking abandons the regions in progress: they stay dirty and are compared again.
//!
//! Must never: clear a region before the records that bring its replica in line are durable
//! in the journal, clear one while tracking, or end a resync while the map is not clean.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use blockdev::BlockDevice;
use journal::resync::{block_hash, ResyncMark, ResyncReason};
use journal::wire::ResyncNeed;
use journal::{DiskId, Entry, Flags, RecordKind, Seq, SharedJournal, Timestamp};
use tokio::task::JoinSet;

use crate::ranges::RangeLocks;
use crate::redo::BackingWatermark;
use crate::replicate::now_micros;
use crate::tracker::Tracker;

/// Block size of the hash comparison.
pub const RESYNC_BLOCK_BYTES: u32 = 64 << 10;
/// Hashes records awaiting their answer, at most.
pub const RESYNC_OUTSTANDING_MAX: usize = 64;
/// Bytes of one resync `Write` record, at most.
pub const RESYNC_WRITE_BYTES_MAX: u64 = 1 << 20;

/// One disk as the resync sees it.
#[derive(Debug, Clone)]
pub struct ResyncDisk {
    /// Its id in the journal.
    pub id: DiskId,
    /// Its name, for the log.
    pub name: String,
    /// The backing disk.
    pub device: Arc<dyn BlockDevice>,
    /// The journal filter's range locks for it.
    pub ranges: Arc<RangeLocks>,
}

/// A region whose hashes record awaits its answer.
#[derive(Debug, Clone, Copy)]
struct Asked {
    disk: DiskId,
    region: u64,
    offset: u64,
    bytes: u64,
}

/// What a resync task reports.
#[derive(Debug)]
enum Done {
    /// A region's hashes record was appended at `seq`.
    Hashed(Seq, Asked),
    /// The differing blocks of a region were appended, the last at `seq` (`None`: the job
    /// went to tracking first, nothing was appended).
    Sent(Asked, Option<Seq>),
}

/// Progress of the current resync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Why it runs (`None`: no resync runs).
    pub reason: Option<ResyncReason>,
    /// Bytes of regions compared and settled.
    pub done_bytes: u64,
    /// Bytes of regions to compare.
    pub total_bytes: u64,
}

/// The resync driver: lives across connections; the shipper's loop feeds it.
#[derive(Debug)]
pub struct Resync {
    tracker: Arc<Tracker>,
    watermark: Arc<BackingWatermark>,
    journal: Arc<SharedJournal>,
    disks: BTreeMap<DiskId, ResyncDisk>,
    /// The reason the next resync will give (the map was created dirty: initial sync).
    next_reason: ResyncReason,
    running: Option<ResyncReason>,
    /// Regions still to compare in this round.
    queue: VecDeque<(DiskId, u64)>,
    asked: BTreeMap<Seq, Asked>,
    tasks: JoinSet<Result<Done, String>>,
    /// Regions whose records must be durable (at the seq) before they are cleared.
    clears: Vec<(Asked, Seq)>,
    done_bytes: u64,
    total_bytes: u64,
}

impl Resync {
    /// A driver over the tracker's dirty map; `initial` says the map was created dirty for a
    /// new job (its first resync is the initial sync).
    pub fn new(
        tracker: Arc<Tracker>,
        watermark: Arc<BackingWatermark>,
        journal: Arc<SharedJournal>,
        disks: Vec<ResyncDisk>,
        initial: bool,
    ) -> Self {
        Self {
            tracker,
            watermark,
            journal,
            disks: disks.into_iter().map(|d| (d.id, d)).collect(),
            next_reason: if initial {
                ResyncReason::Initial
            } else {
                ResyncReason::Restart
            },
            running: None,
            queue: VecDeque::new(),
            asked: BTreeMap::new(),
            tasks: JoinSet::new(),
            clears: Vec::new(),
            done_bytes: 0,
            total_bytes: 0,
        }
    }

    /// The tracker.
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// Whether there is anything to resync (dirty regions, or a resync under way).
    pub fn wanted(&self) -> bool {
        self.running.is_some() || !self.tracker.map().is_clean()
    }

    /// Whether a resync runs.
    pub fn running(&self) -> bool {
        self.running.is_some()
    }

    /// The reason the next (or current) resync gives.
    pub fn reason(&self) -> ResyncReason {
        self.running.unwrap_or(self.next_reason)
    }

    /// The job went to tracking: the next resync follows it.
    pub fn note_tracking(&mut self) {
        if self.next_reason != ResyncReason::Initial {
            self.next_reason = ResyncReason::Ahead;
        }
        self.abandon();
    }

    /// Progress now.
    pub fn progress(&self) -> Progress {
        Progress {
            reason: self.running,
            done_bytes: self.done_bytes.min(self.total_bytes),
            total_bytes: self.total_bytes,
        }
    }

    /// The connection is gone (or the job went to tracking): the regions in progress stay
    /// dirty and are compared again in the next round.
    pub fn abandon(&mut self) {
        self.asked.clear();
        self.queue.clear();
        self.tasks.abort_all();
        self.tasks = JoinSet::new();
    }

    /// Begins a resync: appends the begin record and queues every dirty region.
    pub async fn begin(&mut self) -> Result<(), String> {
        let reason = self.next_reason;
        let total = self.tracker.map().dirty_bytes();
        let mark = ResyncMark::Begin {
            reason,
            total_bytes: total,
        };
        append_mark(&self.journal, DiskId(0), mark).await?;
        tracing::info!(reason = reason.name(), bytes = total, "resync begins");
        self.running = Some(reason);
        self.done_bytes = 0;
        self.total_bytes = total;
        self.refill()?;
        Ok(())
    }

    fn refill(&mut self) -> Result<(), String> {
        self.queue.clear();
        for &disk in self.disks.keys() {
            let regions = self
                .tracker
                .map()
                .dirty_regions(disk)
                .map_err(|e| e.to_string())?;
            self.queue.extend(regions.into_iter().map(|r| (disk, r)));
        }
        Ok(())
    }

    /// Starts more comparisons while fewer than `limit` (at most
    /// [`RESYNC_OUTSTANDING_MAX`]) are out and `room` says the journal's backlog has room.
    pub fn poll_work(&mut self, room: bool, limit: usize) {
        if self.running.is_none() || !room {
            return;
        }
        while self.asked.len() + self.tasks.len() < limit.min(RESYNC_OUTSTANDING_MAX) {
            let Some((disk, region)) = self.queue.pop_front() else {
                break;
            };
            let Some(d) = self.disks.get(&disk).cloned() else {
                continue;
            };
            let region_bytes = self.tracker.map().region_bytes();
            let offset = region * region_bytes;
            let size = d.device.size_bytes();
            if offset >= size {
                continue;
            }
            let bytes = (size - offset).min(region_bytes);
            let asked = Asked {
                disk,
                region,
                offset,
                bytes,
            };
            let journal = Arc::clone(&self.journal);
            self.tasks
                .spawn(async move { hash_region(d, journal, asked).await });
        }
    }

    /// The appliance answered a hashes record: sends the differing blocks, or settles the
    /// region when none differ. Answers to records of an abandoned round are ignored.
    pub fn handle_need(&mut self, need: ResyncNeed) {
        let Some(asked) = self.asked.remove(&need.hashes_seq) else {
            return;
        };
        let blocks = asked.bytes.div_ceil(u64::from(RESYNC_BLOCK_BYTES)) as u32;
        let differing: Vec<u32> = (0..blocks.min(need.count))
            .filter(|&i| need.differs(i))
            .collect();
        if differing.is_empty() {
            self.clears.push((asked, need.hashes_seq));
            return;
        }
        let Some(d) = self.disks.get(&asked.disk).cloned() else {
            return;
        };
        let (journal, watermark, tracker) = (
            Arc::clone(&self.journal),
            Arc::clone(&self.watermark),
            Arc::clone(&self.tracker),
        );
        self.tasks.spawn(async move {
            send_blocks(d, journal, watermark, tracker, asked, differing).await
        });
    }

    /// The next finished task (pending forever while none runs).
    pub async fn next_done(&mut self) -> Result<(), String> {
        let Some(joined) = self.tasks.join_next().await else {
            return std::future::pending().await;
        };
        match joined.map_err(|e| format!("resync task: {e}"))?? {
            Done::Hashed(seq, asked) => {
                self.asked.insert(seq, asked);
            }
            Done::Sent(asked, Some(seq)) => self.clears.push((asked, seq)),
            // The job went to tracking: the region stays dirty.
            Done::Sent(_, None) => {}
        }
        Ok(())
    }

    /// Settles the regions whose records are durable (clears and persists them); ends the
    /// resync when nothing is left. Returns whether it ended now. Blocking work runs on the
    /// blocking pool.
    pub async fn settle(&mut self) -> Result<bool, String> {
        let Some(reason) = self.running else {
            return Ok(false);
        };
        let durable = self.journal.durable_seq();
        let (ready, waiting): (Vec<_>, Vec<_>) =
            self.clears.drain(..).partition(|(_, seq)| *seq <= durable);
        self.clears = waiting;
        if !ready.is_empty() {
            let tracker = Arc::clone(&self.tracker);
            let settled = tokio::task::spawn_blocking(move || -> Result<u64, String> {
                let mut bytes = 0;
                for (asked, _) in &ready {
                    if tracker.clear_if_journalling(asked.disk, asked.region) {
                        bytes += asked.bytes;
                    }
                }
                tracker.map().persist().map_err(|e| e.to_string())?;
                Ok(bytes)
            })
            .await
            .map_err(|e| format!("resync task: {e}"))??;
            self.done_bytes += settled;
        }
        if !self.queue.is_empty() || !self.asked.is_empty() || !self.tasks.is_empty() {
            return Ok(false);
        }
        if !self.clears.is_empty() {
            return Ok(false);
        }
        if !self.tracker.map().is_clean() {
            // Regions dirtied meanwhile (a tracking episode) or abandoned: another round.
            self.refill()?;
            self.total_bytes = self.done_bytes + self.tracker.map().dirty_bytes();
            return Ok(false);
        }
        if self.tracker.tracking() {
            return Ok(false);
        }
        append_mark(&self.journal, DiskId(0), ResyncMark::End).await?;
        tracing::info!(
            reason = reason.name(),
            bytes = self.total_bytes,
            "resync complete: the replicas are consistent"
        );
        self.running = None;
        self.next_reason = ResyncReason::Ahead;
        self.done_bytes = 0;
        self.total_bytes = 0;
        Ok(true)
    }
}

/// Appends a resync mark as a `Resync` record (blocking).
fn append_resync(journal: &SharedJournal, disk: DiskId, mark: &ResyncMark) -> Result<Seq, String> {
    let bytes = mark.encode().map_err(|e| e.to_string())?;
    journal
        .append(Entry {
            disk,
            kind: RecordKind::Resync,
            offset: 0,
            length: bytes.len() as u32,
            payload: &bytes,
            timestamp: Timestamp(now_micros()),
            flags: Flags::NONE,
        })
        .map_err(|e| e.to_string())
}

/// [`append_resync`] on the blocking pool.
async fn append_mark(
    journal: &Arc<SharedJournal>,
    disk: DiskId,
    mark: ResyncMark,
) -> Result<Seq, String> {
    let journal = Arc::clone(journal);
    tokio::task::spawn_blocking(move || append_resync(&journal, disk, &mark))
        .await
        .map_err(|e| format!("resync task: {e}"))?
}

/// Reads a region under its range lock, hashes its blocks and appends the hashes record.
async fn hash_region(
    disk: ResyncDisk,
    journal: Arc<SharedJournal>,
    asked: Asked,
) -> Result<Done, String> {
    let _range = disk
        .ranges
        .lock(asked.offset, asked.offset + asked.bytes)
        .await;
    let seq = tokio::task::spawn_blocking(move || -> Result<Seq, String> {
        let mut data = vec![0u8; asked.bytes as usize];
        disk.device
            .read_at(&mut data, asked.offset)
            .map_err(|e| format!("resync: reading disk {}: {e}", disk.name))?;
        let hashes = data
            .chunks(RESYNC_BLOCK_BYTES as usize)
            .map(block_hash)
            .collect();
        let mark = ResyncMark::Hashes {
            offset: asked.offset,
            block_bytes: RESYNC_BLOCK_BYTES,
            hashes,
        };
        append_resync(&journal, disk.id, &mark)
    })
    .await
    .map_err(|e| format!("resync task: {e}"))??;
    Ok(Done::Hashed(seq, asked))
}

/// Appends the differing blocks of a region as `Write` records, each run of blocks under its
/// range lock, read from the backing disk at that moment.
async fn send_blocks(
    disk: ResyncDisk,
    journal: Arc<SharedJournal>,
    watermark: Arc<BackingWatermark>,
    tracker: Arc<Tracker>,
    asked: Asked,
    differing: Vec<u32>,
) -> Result<Done, String> {
    let block = u64::from(RESYNC_BLOCK_BYTES);
    let end = asked.offset + asked.bytes;
    // Runs of adjacent differing blocks, each at most RESYNC_WRITE_BYTES_MAX.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for i in differing {
        let start = asked.offset + u64::from(i) * block;
        let stop = (start + block).min(end);
        match runs.last_mut() {
            Some((s, e)) if *e == start && stop - *s <= RESYNC_WRITE_BYTES_MAX => *e = stop,
            _ => runs.push((start, stop)),
        }
    }
    let mut last = None;
    for (start, stop) in runs {
        let _range = disk.ranges.lock(start, stop).await;
        let (d, j, w, t) = (
            disk.clone(),
            Arc::clone(&journal),
            Arc::clone(&watermark),
            Arc::clone(&tracker),
        );
        let seqs = tokio::task::spawn_blocking(move || -> Result<Vec<Seq>, String> {
            let mut data = vec![0u8; (stop - start) as usize];
            d.device
                .read_at(&mut data, start)
                .map_err(|e| format!("resync: reading disk {}: {e}", d.name))?;
            let seqs = w
                .append(|| {
                    if t.tracking() {
                        return Ok(Vec::new());
                    }
                    j.append(Entry {
                        disk: d.id,
                        kind: RecordKind::Write,
                        offset: start,
                        length: data.len() as u32,
                        payload: &data,
                        timestamp: Timestamp(now_micros()),
                        flags: Flags::NONE,
                    })
                    .map(|seq| vec![seq])
                    .map_err(|e| crate::sink::SinkError::Journal(e.to_string()))
                })
                .map_err(|e| e.to_string())?;
            // The data came from the disk: it is there already.
            w.complete(&seqs);
            Ok(seqs)
        })
        .await
        .map_err(|e| format!("resync task: {e}"))??;
        match seqs.last() {
            Some(&seq) => last = Some(seq),
            None => return Ok(Done::Sent(asked, None)),
        }
    }
    Ok(Done::Sent(asked, last))
}
