//! Keeping the backing disks in step with the journal, which is the source of truth.
//!
//! A write is appended to the journal before the backing disk is written, so a crash between
//! the two (kill -9, power loss before the page cache reached the disk) can leave the backing
//! disk without a write the journal — and so the replica — has. Three pieces close that gap:
//!
//! - [`BackingWatermark`]: which journaled records have reached their backing disk. Every
//!   append registers its seqs as in flight; the chain completes them once the backing write
//!   returned.
//! - [`run_backing_sync`]: every [`BACKING_SYNC_INTERVAL`], `fdatasync`s the backing disks
//!   and publishes the seq below which every record is durable on them (`backing_synced`).
//!   The shipper never trims the journal above it, so a record leaves the journal only once
//!   both the appliance and the backing disk hold it durably.
//! - [`redo`]: at start-up, every record the journal still holds is applied again to its
//!   backing disk, in seq order (idempotent), and the disks are synced. After it, the backing
//!   disks hold everything the journal does.
//!
//! Must never: report a seq synced whose backing write has not returned, or serve a client
//! before the redo finished.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use blockdev::BlockDevice;
use journal::{DiskId, RecordKind, Seq, SharedJournal};

use crate::sink::SinkError;

/// The backing disks a sync covers, with their names for the log.
pub type BackingDevices = Vec<(String, Arc<dyn BlockDevice>)>;

/// How often the backing disks are synced so the journal can be trimmed behind them.
pub const BACKING_SYNC_INTERVAL: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain bookkeeping: a panic elsewhere does not make it inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct Inflight {
    /// Seqs appended whose backing write has not returned.
    seqs: BTreeSet<Seq>,
    /// The last seq appended through [`BackingWatermark::append`].
    last: Seq,
}

/// Which journaled records have reached their backing disk.
#[derive(Debug, Default)]
pub struct BackingWatermark {
    inflight: Mutex<Inflight>,
    /// Every record at or below this seq is durable on its backing disk.
    synced: AtomicU64,
}

impl BackingWatermark {
    /// A watermark starting at `synced` (what the redo made durable).
    pub fn new(synced: Seq) -> Self {
        Self {
            inflight: Mutex::new(Inflight {
                seqs: BTreeSet::new(),
                last: synced,
            }),
            synced: AtomicU64::new(synced.0),
        }
    }

    /// Runs `append` (which appends records and returns their seqs) and registers the seqs
    /// as in flight, atomically with respect to [`BackingWatermark::written`], so no seq is
    /// ever reported written before it was registered.
    pub fn append(
        &self,
        append: impl FnOnce() -> Result<Vec<Seq>, SinkError>,
    ) -> Result<Vec<Seq>, SinkError> {
        let mut inflight = lock(&self.inflight);
        let seqs = append()?;
        for &seq in &seqs {
            inflight.seqs.insert(seq);
            inflight.last = inflight.last.max(seq);
        }
        Ok(seqs)
    }

    /// Runs `f` with the last seq appended, while no append can run (the tracker switches
    /// between journalling and tracking here, so every write falls on one side).
    pub fn exclusive<R>(&self, f: impl FnOnce(Seq) -> R) -> R {
        let inflight = lock(&self.inflight);
        f(inflight.last)
    }

    /// The backing writes of `seqs` returned (successfully or not).
    pub fn complete(&self, seqs: &[Seq]) {
        let mut inflight = lock(&self.inflight);
        for seq in seqs {
            inflight.seqs.remove(seq);
        }
    }

    /// Every record at or below this seq has had its backing write return.
    pub fn written(&self) -> Seq {
        let inflight = lock(&self.inflight);
        inflight
            .seqs
            .first()
            .map_or(inflight.last, |first| first.prev())
    }

    /// Every record at or below this seq is durable on its backing disk.
    pub fn synced(&self) -> Seq {
        Seq(self.synced.load(Ordering::Acquire))
    }

    fn set_synced(&self, seq: Seq) {
        self.synced.fetch_max(seq.0, Ordering::AcqRel);
    }
}

/// Syncs `devices` every [`BACKING_SYNC_INTERVAL`] and advances the watermark's synced seq,
/// until `stop` fires.
pub async fn run_backing_sync(
    watermark: Arc<BackingWatermark>,
    devices: BackingDevices,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(BACKING_SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let written = watermark.written();
        if written <= watermark.synced() {
            continue;
        }
        let devices = devices.clone();
        let synced = tokio::task::spawn_blocking(move || {
            for (name, device) in &devices {
                if let Err(e) = device.sync_data() {
                    tracing::error!(disk = %name, error = %e, "syncing the backing disk failed; the journal keeps every record");
                    return false;
                }
            }
            true
        })
        .await
        .unwrap_or(false);
        if synced {
            watermark.set_synced(written);
        }
    }
}

/// What a redo did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Redo {
    /// Records applied again.
    pub records: u64,
    /// Bytes written or zeroed.
    pub bytes: u64,
    /// The last seq in the journal (everything up to it is now durable on the disks).
    pub head: Seq,
}

/// Applies every record `journal` holds above `floor` to its backing disk in `devices`, in
/// seq order, then syncs the disks. Records of disks not configured now are skipped (their
/// disk is not being served). Records at or below the redo floor are on their disks already,
/// and tracked writes made after them may have overwritten them (`crate::tracker`). Blocking.
pub fn redo(
    journal: &SharedJournal,
    devices: &BTreeMap<DiskId, (String, Arc<dyn BlockDevice>)>,
    floor: Seq,
) -> Result<Redo, String> {
    let mut done = Redo {
        head: journal.head_seq(),
        ..Redo::default()
    };
    let first = journal.first_seq();
    if first > done.head {
        return Ok(done);
    }
    let mut reader = journal
        .reader(first)
        .map_err(|e| format!("reading the journal for the redo: {e}"))?;
    let mut touched = BTreeSet::new();
    while let Some(record) = reader
        .next_record()
        .map_err(|e| format!("reading the journal for the redo: {e}"))?
    {
        let header = record.header;
        if header.seq <= floor {
            continue;
        }
        if !matches!(
            header.kind,
            RecordKind::Write | RecordKind::Trim | RecordKind::WriteZeroes
        ) {
            continue;
        }
        let Some((name, device)) = devices.get(&header.disk) else {
            continue;
        };
        done.bytes += blockdev::apply_record(&**device, &header, record.payload)
            .map_err(|e| format!("redo onto disk {name}: {e}"))?;
        done.records += 1;
        touched.insert(header.disk);
    }
    for disk in touched {
        if let Some((name, device)) = devices.get(&disk) {
            device
                .sync_data()
                .map_err(|e| format!("syncing disk {name} after the redo: {e}"))?;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_waits_for_every_write_in_flight() {
        let w = BackingWatermark::new(Seq(10));
        assert_eq!(w.written(), Seq(10));
        let a = w.append(|| Ok(vec![Seq(11)])).unwrap();
        let b = w.append(|| Ok(vec![Seq(12), Seq(13)])).unwrap();
        assert_eq!(w.written(), Seq(10));
        w.complete(&b);
        assert_eq!(w.written(), Seq(10), "seq 11 is still in flight");
        w.complete(&a);
        assert_eq!(w.written(), Seq(13));
        assert!(w.append(|| Err(SinkError::Journal("full".into()))).is_err());
        assert_eq!(w.written(), Seq(13));
        assert_eq!(w.synced(), Seq(10));
        w.set_synced(Seq(13));
        w.set_synced(Seq(12));
        assert_eq!(w.synced(), Seq(13), "synced never goes back");
    }
}
