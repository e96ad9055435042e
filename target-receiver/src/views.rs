//! Recovery views: a job's disks as they were at one point, read through the history store,
//! optionally writable through a copy-on-write overlay. Creating one costs the same for any
//! disk size or history length: it is a seq and a lease, nothing is copied.
//!
//! Reading block `b` at `T` (DESIGN §2.4): the replica's block is read first, then the
//! history store is asked for the first before-image of `b` with seq > `T`; if there is one it
//! wins. That order is what makes a view safe while the applier runs: the applier makes a
//! before-image durable before it overwrites the replica, so whichever replica content this
//! read saw, the history lookup after it finds the image when one is needed.
//!
//! Must never: change a replica or the history store (a writable view writes only its own
//! overlay file), or read below the retention floor (a view's lease holds the floor at or
//! below its point for as long as the view exists).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use blockdev::{create_image, BlockDevice, FileDevice};
use journal::{DiskId, JobId, Seq};
use thiserror::Error;

use crate::history::{HistoryError, BLOCK_BYTES};
use crate::jobs::Job;

/// Where views keep their overlays, inside the data directory.
pub const VIEWS_DIR: &str = "views";

/// Why a view could not be made or read.
#[derive(Debug, Error)]
pub enum ViewError {
    /// The point is below what retention kept.
    #[error("seq {at} is no longer in the history (the oldest point kept is {floor})")]
    Expired {
        /// The point asked for.
        at: Seq,
        /// The oldest point kept.
        floor: Seq,
    },
    /// The point is beyond what the replicas hold.
    #[error("seq {at} is not applied yet (applied: {applied})")]
    Future {
        /// The point asked for.
        at: Seq,
        /// The applied seq.
        applied: Seq,
    },
    /// The point lies inside a resync: the replicas were no consistent image there.
    #[error("seq {at} lies inside a resync (seqs {begin} to {}): the replicas were not a consistent image there; pick a point before or after it", .end.map_or_else(|| "now".to_owned(), |e| e.to_string()))]
    InResync {
        /// The point asked for.
        at: Seq,
        /// The resync's begin record.
        begin: Seq,
        /// Its end record, if it ended.
        end: Option<Seq>,
    },
    /// The disk is not the job's.
    #[error("the job has no disk id {}", .0 .0)]
    UnknownDisk(DiskId),
    /// A read or write past the disk's end.
    #[error("{offset}+{length} lies outside the disk of {size_bytes} bytes")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Disk size.
        size_bytes: u64,
    },
    /// The view is read-only.
    #[error("the view is read-only")]
    ReadOnly,
    /// The history store failed.
    #[error(transparent)]
    History(#[from] HistoryError),
    /// The replica or the overlay failed.
    #[error("{what}: {source}")]
    Io {
        /// Which file.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain bookkeeping: a panic elsewhere does not make it inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads `buf.len()` bytes from `offset` of disk `disk` of `job` as they were at `at`.
pub fn read_at(
    job: &Job,
    disk: DiskId,
    at: Seq,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ViewError> {
    let replica = job
        .replicas
        .get(&disk)
        .ok_or(ViewError::UnknownDisk(disk))?;
    let size_bytes = replica.device.size_bytes();
    let end = offset
        .checked_add(buf.len() as u64)
        .filter(|&end| end <= size_bytes)
        .ok_or(ViewError::OutOfRange {
            offset,
            length: buf.len() as u64,
            size_bytes,
        })?;
    if buf.is_empty() {
        return Ok(());
    }
    // The replica first, then the history (see the module docs for why this order).
    replica
        .device
        .read_at(buf, offset)
        .map_err(|source| ViewError::Io {
            what: format!("replica {}", replica.path.display()),
            source,
        })?;
    let mut reader = job.history.reader(disk, at)?;
    let block_bytes = BLOCK_BYTES as u64;
    for block in offset / block_bytes..=(end - 1) / block_bytes {
        if let Some(image) = reader.block(block)? {
            let block_start = block * block_bytes;
            let from = offset.max(block_start);
            let to = end.min(block_start + block_bytes);
            let image = image.to_vec();
            buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(
                &image[(from - block_start) as usize..(to - block_start) as usize],
            );
        }
    }
    Ok(())
}

/// A writable view's copy-on-write overlay for one disk: a sparse file of the disk's size and
/// the set of blocks it holds.
#[derive(Debug)]
struct Overlay {
    file: FileDevice,
    path: PathBuf,
    /// Blocks written through the view. Invariant: the file holds their whole content.
    blocks: Mutex<BTreeSet<u64>>,
}

/// One disk of a view.
#[derive(Debug)]
pub struct ViewDisk {
    /// The job.
    pub job: Arc<Job>,
    /// The disk.
    pub disk: DiskId,
    /// The disk's name.
    pub name: String,
    /// The point.
    pub at: Seq,
    overlay: Option<Overlay>,
}

impl ViewDisk {
    /// The disk's size.
    pub fn size_bytes(&self) -> u64 {
        self.job
            .replicas
            .get(&self.disk)
            .map_or(0, |r| r.device.size_bytes())
    }

    /// Whether writes are accepted.
    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    /// Reads from the view: the overlay's blocks, else the disk at the view's point.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ViewError> {
        read_at(&self.job, self.disk, self.at, offset, buf)?;
        let Some(overlay) = &self.overlay else {
            return Ok(());
        };
        let blocks = lock(&overlay.blocks);
        if blocks.is_empty() || buf.is_empty() {
            return Ok(());
        }
        let block_bytes = BLOCK_BYTES as u64;
        let end = offset + buf.len() as u64;
        for &block in blocks.range(offset / block_bytes..=(end - 1) / block_bytes) {
            let from = offset.max(block * block_bytes);
            let to = end.min((block + 1) * block_bytes);
            overlay
                .file
                .read_at(
                    &mut buf[(from - offset) as usize..(to - offset) as usize],
                    from,
                )
                .map_err(|source| ViewError::Io {
                    what: format!("overlay {}", overlay.path.display()),
                    source,
                })?;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (zeroes when `data` is `None`, for `length` bytes) into the
    /// overlay; the replica and the history never change.
    pub fn write(&self, offset: u64, data: Option<&[u8]>, length: u64) -> Result<(), ViewError> {
        let overlay = self.overlay.as_ref().ok_or(ViewError::ReadOnly)?;
        let size_bytes = self.size_bytes();
        let end = offset
            .checked_add(length)
            .filter(|&end| end <= size_bytes)
            .ok_or(ViewError::OutOfRange {
                offset,
                length,
                size_bytes,
            })?;
        if length == 0 {
            return Ok(());
        }
        let io = |source| ViewError::Io {
            what: format!("overlay {}", overlay.path.display()),
            source,
        };
        let block_bytes = BLOCK_BYTES as u64;
        // Whole blocks first read as the view sees them (partial writes keep the rest), then
        // changed, written to the overlay, and marked: all under the overlay's lock, so two
        // writes to one block cannot interleave.
        let mut blocks = lock(&overlay.blocks);
        for block in offset / block_bytes..=(end - 1) / block_bytes {
            let block_start = block * block_bytes;
            let len = size_bytes.saturating_sub(block_start).min(block_bytes) as usize;
            let mut content = vec![0u8; len];
            if blocks.contains(&block) {
                overlay
                    .file
                    .read_at(&mut content, block_start)
                    .map_err(io)?;
            } else {
                read_at(&self.job, self.disk, self.at, block_start, &mut content)?;
            }
            let from = offset.max(block_start);
            let to = end.min(block_start + len as u64);
            let range = (from - block_start) as usize..(to - block_start) as usize;
            match data {
                Some(data) => content[range]
                    .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]),
                None => content[range].fill(0),
            }
            overlay.file.write_at(&content, block_start).map_err(io)?;
            blocks.insert(block);
        }
        Ok(())
    }
}

/// A view: every disk of a job at one point.
#[derive(Debug)]
pub struct View {
    /// The view's id.
    pub id: u64,
    /// The job.
    pub job: JobId,
    /// The point.
    pub at: Seq,
    /// Its disks, by id.
    pub disks: BTreeMap<DiskId, Arc<ViewDisk>>,
    dir: Option<PathBuf>,
}

impl View {
    /// Whether the view accepts writes.
    pub fn writable(&self) -> bool {
        self.dir.is_some()
    }
}

/// Every view of the appliance; their points are the leases retention respects.
#[derive(Debug)]
pub struct Views {
    dir: PathBuf,
    next_id: AtomicU64,
    views: Mutex<BTreeMap<u64, Arc<View>>>,
}

impl Views {
    /// No views yet; overlays live under `data_dir/views/` (leftovers of an earlier run are
    /// removed: views do not survive a restart).
    pub fn new(data_dir: &Path) -> Result<Views, ViewError> {
        let dir = data_dir.join(VIEWS_DIR);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| ViewError::Io {
                what: dir.display().to_string(),
                source,
            })?;
        }
        Ok(Views {
            dir,
            next_id: AtomicU64::new(1),
            views: Mutex::new(BTreeMap::new()),
        })
    }

    /// Creates a view of every disk of `job` at `at`. Constant time: a lease and, when
    /// writable, empty sparse overlay files.
    pub fn create(&self, job: &Arc<Job>, at: Seq, writable: bool) -> Result<Arc<View>, ViewError> {
        // The lease is taken under the same lock retention reads leases under, and the floor
        // is checked after: a retention pass either sees this lease or ran before it and its
        // floor is seen here.
        let mut views = lock(&self.views);
        let floor = job.history.floor();
        if at < floor {
            return Err(ViewError::Expired { at, floor });
        }
        let applied = job.applied();
        if at > applied {
            return Err(ViewError::Future { at, applied });
        }
        if let Some(r) = job.resyncs().into_iter().find(|r| r.covers(at)) {
            return Err(ViewError::InResync {
                at,
                begin: r.begin,
                end: r.end,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dir = writable.then(|| self.dir.join(id.to_string()));
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir).map_err(|source| ViewError::Io {
                what: dir.display().to_string(),
                source,
            })?;
        }
        let mut disks = BTreeMap::new();
        for (disk, replica) in &job.replicas {
            let overlay = match &dir {
                Some(dir) => {
                    let path = dir.join(format!("{}.overlay", replica.info.name));
                    let file = create_image(&path, replica.info.size_bytes).map_err(|source| {
                        ViewError::Io {
                            what: path.display().to_string(),
                            source,
                        }
                    })?;
                    Some(Overlay {
                        file,
                        path,
                        blocks: Mutex::new(BTreeSet::new()),
                    })
                }
                None => None,
            };
            disks.insert(
                *disk,
                Arc::new(ViewDisk {
                    job: Arc::clone(job),
                    disk: *disk,
                    name: replica.info.name.clone(),
                    at,
                    overlay,
                }),
            );
        }
        let view = Arc::new(View {
            id,
            job: job.id(),
            at,
            disks,
            dir,
        });
        views.insert(id, Arc::clone(&view));
        Ok(view)
    }

    /// Every view, by id.
    pub fn list(&self) -> Vec<Arc<View>> {
        lock(&self.views).values().cloned().collect()
    }

    /// The view `id`.
    pub fn get(&self, id: u64) -> Option<Arc<View>> {
        lock(&self.views).get(&id).cloned()
    }

    /// Deletes view `id` (its overlay files go; readers still holding it finish first).
    pub fn delete(&self, id: u64) -> Option<Arc<View>> {
        let view = lock(&self.views).remove(&id)?;
        if let Some(dir) = &view.dir {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                tracing::warn!(view = id, dir = %dir.display(), error = %e, "removing a view's overlay failed");
            }
        }
        Some(view)
    }

    /// The lowest point a view of `job` holds, if any: retention keeps everything from it.
    pub fn lease(&self, job: JobId) -> Option<Seq> {
        lock(&self.views)
            .values()
            .filter(|v| v.job == job)
            .map(|v| v.at)
            .min()
    }

    /// Runs `f` while no view can be created or deleted (retention uses it to pick a floor
    /// no lease covers).
    pub fn with_leases<T>(&self, f: impl FnOnce(&dyn Fn(JobId) -> Option<Seq>) -> T) -> T {
        let views = lock(&self.views);
        let lease = |job: JobId| views.values().filter(|v| v.job == job).map(|v| v.at).min();
        f(&lease)
    }
}

/// Largest read or write a view's export accepts (advertised as its maximum block size).
pub const VIEW_REQUEST_BYTES_MAX: u32 = 32 << 20;

/// One disk of a view as an NBD export's backend.
#[derive(Debug)]
pub struct ViewBackend(pub Arc<ViewDisk>);

impl ViewBackend {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ViewDisk) -> Result<T, ViewError> + Send + 'static,
    ) -> Result<T, nbd_server::BackendError> {
        let disk = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || f(&disk))
            .await
            .map_err(|e| {
                nbd_server::BackendError::new(nbd::ErrorCode::EIO, format!("view task failed: {e}"))
            })?
            .map_err(|e| {
                let code = match e {
                    ViewError::ReadOnly => nbd::ErrorCode::EPERM,
                    _ => nbd::ErrorCode::EIO,
                };
                nbd_server::BackendError::new(code, e.to_string())
            })
    }
}

impl nbd_server::ExportBackend for ViewBackend {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }

    fn execute(&self, op: nbd::Operation, payload: Vec<u8>) -> nbd_server::BackendFuture<'_> {
        Box::pin(async move {
            match op {
                nbd::Operation::Read { offset, length } => {
                    self.blocking(move |disk| {
                        let mut buf = vec![0u8; length as usize];
                        disk.read(offset, &mut buf).map(|()| Some(buf))
                    })
                    .await
                }
                nbd::Operation::Write { offset, .. } => {
                    self.blocking(move |disk| {
                        let length = payload.len() as u64;
                        disk.write(offset, Some(&payload), length).map(|()| None)
                    })
                    .await
                }
                nbd::Operation::Trim { offset, length, .. }
                | nbd::Operation::WriteZeroes { offset, length, .. } => {
                    self.blocking(move |disk| {
                        disk.write(offset, None, u64::from(length)).map(|()| None)
                    })
                    .await
                }
                // The overlay is scratch space for a test or a recovery and does not outlive
                // the appliance's process, so there is nothing to make durable.
                nbd::Operation::Flush => Ok(None),
            }
        })
    }
}

/// The NBD export name of disk `disk` of view `id`.
pub fn export_name(id: u64, disk: &str) -> String {
    format!("view{id}-{disk}")
}

/// Serves a view's disks on `server` (one export per disk).
pub fn add_exports(server: &nbd_server::ServerContext, view: &View) -> Result<(), ViewError> {
    for disk in view.disks.values() {
        let export = nbd_server::Export {
            name: export_name(view.id, &disk.name),
            description: format!(
                "cdp recovery view {} of job {} at seq {}: disk {}",
                view.id, view.job, view.at, disk.name
            ),
            block_sizes: nbd::BlockSizes {
                min_bytes: 512,
                preferred_bytes: BLOCK_BYTES as u32,
                max_bytes: VIEW_REQUEST_BYTES_MAX,
            },
            backend: Arc::new(ViewBackend(Arc::clone(disk))),
            read_only: !disk.writable(),
        };
        server.add_export(export).map_err(|e| ViewError::Io {
            what: format!("export of view {}", view.id),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    Ok(())
}

/// Stops serving a view's disks; connections finish what is in flight and close.
pub fn remove_exports(server: &nbd_server::ServerContext, view: &View) {
    for disk in view.disks.values() {
        server.remove_export(&export_name(view.id, &disk.name));
    }
}
