//! Tracking mode: when the job's backlog passes its bound (or the appliance is gone too
//! long, or an operator paused it), writes stop being journalled and only their regions are
//! marked in the crash-safe [`DirtyMap`], to be resynced later.
//!
//! The switch is made under the backing watermark's lock (`BackingWatermark::exclusive`),
//! the same lock every journalled append takes, so each write is either journalled (its seq
//! below the switch) or tracked. Before the first tracked write reaches a backing disk, every
//! journalled write has returned, the backing disks are synced and the *redo floor* (the last
//! journalled seq) is durable in `DATA_DIR/redo-floor`: the start-up redo replays only records
//! above it, so it can never roll a tracked write back with an older journalled one.
//!
//! Must never: let a tracked write reach its backing disk before its region's mark is
//! durable, clear a region while tracking (a tracked write may have marked it), or lower the
//! redo floor.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use journal::{DiskId, Seq};
use transport::fsutil::{write_replacing, MODE_PRIVATE_FILE};

use crate::dirty::DirtyMap;
use crate::redo::{BackingDevices, BackingWatermark};

/// The redo floor's file in the data directory.
pub const REDO_FLOOR_FILE: &str = "redo-floor";
/// Longest wait for journalled writes in flight when tracking begins.
pub const SWITCH_WAIT_MAX: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain bookkeeping: a panic elsewhere does not make it inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the redo floor (`Seq::NONE` when there is none yet). The file holds the seq as
/// decimal text; anything else is an error naming the file.
pub fn read_redo_floor(data_dir: &Path) -> Result<Seq, String> {
    let path = data_dir.join(REDO_FLOOR_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map(Seq)
            .map_err(|_| format!("{}: not a seq: {:?}", path.display(), text.trim())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Seq::NONE),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[derive(Debug, Default)]
struct Floor {
    /// The redo floor on disk.
    durable: Seq,
    /// The last journalled seq when tracking began, if the floor has not reached it yet.
    pending: Option<Seq>,
}

/// The job's tracking switch, its dirty map and its redo floor.
#[derive(Debug)]
pub struct Tracker {
    map: Arc<DirtyMap>,
    tracking: AtomicBool,
    watermark: Arc<BackingWatermark>,
    devices: BackingDevices,
    floor: Mutex<Floor>,
    floor_path: PathBuf,
}

/// Why a tracked write could not be admitted (the client gets EIO; nothing was written).
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// The mark could not be made durable.
    #[error("dirty map: {0}")]
    Map(String),
    /// The backing disks could not be synced, or the floor written.
    #[error("entering tracking mode: {0}")]
    Switch(String),
}

impl Tracker {
    /// A tracker over `map` (journalling, not tracking), for the backing `devices` whose
    /// journalled writes `watermark` follows; the redo floor lives in `data_dir`.
    pub fn new(
        map: Arc<DirtyMap>,
        watermark: Arc<BackingWatermark>,
        devices: BackingDevices,
        data_dir: &Path,
        floor: Seq,
    ) -> Self {
        Self {
            map,
            tracking: AtomicBool::new(false),
            watermark,
            devices,
            floor: Mutex::new(Floor {
                durable: floor,
                pending: None,
            }),
            floor_path: data_dir.join(REDO_FLOOR_FILE),
        }
    }

    /// The dirty map.
    pub fn map(&self) -> &Arc<DirtyMap> {
        &self.map
    }

    /// Whether writes are tracked instead of journalled. Only meaningful inside the
    /// watermark's lock (`BackingWatermark::append`), where the chain asks it.
    pub fn tracking(&self) -> bool {
        self.tracking.load(Ordering::Acquire)
    }

    /// Stops journalling: every later write is tracked. Returns the last journalled seq.
    pub fn start_tracking(&self) -> Seq {
        self.watermark.exclusive(|last| {
            self.tracking.store(true, Ordering::Release);
            let mut floor = lock(&self.floor);
            if last > floor.durable {
                floor.pending = Some(last);
            }
            last
        })
    }

    /// Journals again: every later write is journalled.
    pub fn stop_tracking(&self) {
        self.watermark.exclusive(|_| {
            self.tracking.store(false, Ordering::Release);
        });
    }

    /// Clears `region` of `disk` if the job is journalling (never while tracking: a tracked
    /// write may have found the bit set and skipped its mark). Whether it cleared.
    pub fn clear_if_journalling(&self, disk: DiskId, region: u64) -> bool {
        self.watermark.exclusive(|_| {
            if self.tracking.load(Ordering::Acquire) {
                return false;
            }
            self.map.clear(disk, region).is_ok()
        })
    }

    /// Admits a tracked write of `disk`'s `offset..offset+len`: the redo floor is durable at
    /// the switch, and the regions are durably marked. Blocking; call before the backing
    /// write.
    pub fn before_tracked_write(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> Result<(), TrackError> {
        self.settle_floor()?;
        self.map
            .mark(disk, offset, len)
            .map_err(|e| TrackError::Map(e.to_string()))
    }

    /// Makes the redo floor durable at the seq tracking began at, once: waits for the
    /// journalled writes in flight, syncs the backing disks, writes the floor.
    fn settle_floor(&self) -> Result<(), TrackError> {
        let mut floor = lock(&self.floor);
        let Some(target) = floor.pending else {
            return Ok(());
        };
        let deadline = Instant::now() + SWITCH_WAIT_MAX;
        while self.watermark.written() < target {
            if Instant::now() > deadline {
                return Err(TrackError::Switch(format!(
                    "journalled writes up to seq {target} did not return in {} s",
                    SWITCH_WAIT_MAX.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for (name, device) in &self.devices {
            device
                .sync_data()
                .map_err(|e| TrackError::Switch(format!("syncing disk {name}: {e}")))?;
        }
        write_replacing(
            &self.floor_path,
            format!("{}\n", target.0).as_bytes(),
            MODE_PRIVATE_FILE,
        )
        .map_err(|e| TrackError::Switch(format!("{}: {e}", self.floor_path.display())))?;
        floor.durable = target;
        floor.pending = None;
        tracing::info!(floor = %target, "tracking: backing disks synced, redo floor recorded");
        Ok(())
    }
}
