//! The applier: replays a job's landing journal onto its replica disks in seq order, so each
//! replica is always a usable raw image, current up to the applied seq.
//!
//! One pass ([`apply_pass`]) reads verified records from `applied + 1` up to the landing
//! journal's durable seq (at most [`APPLY_PASS_BYTES_MAX`] of payload), applies each to its
//! replica (`blockdev::apply_record`), `fdatasync`s the replicas it touched, and only then
//! advances the applied seq. Applying is idempotent: after a crash the records after the last
//! recorded applied seq are applied again, in order, and give the same image.
//!
//! Must never: apply a record the journal did not verify, apply seq `s` before every seq below
//! it, apply beyond the landing journal's durable seq, or record an applied seq whose replicas
//! are not synced.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use blockdev::BlockDevice;
use journal::{DiskId, ReadError, Seq};
use thiserror::Error;

use crate::jobs::{Job, JobError};

/// Payload bytes applied per pass, at most (a single larger record goes alone).
pub const APPLY_PASS_BYTES_MAX: u64 = 64 << 20;
/// The applied file is rewritten at most this often while records keep coming (each write
/// costs two fsyncs); it is always written when the applier catches up.
pub const APPLIED_RECORD_INTERVAL: Duration = Duration::from_millis(200);

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
    /// Syncing a replica failed.
    #[error("syncing replica {disk}: {source}")]
    Sync {
        /// The disk's name.
        disk: String,
        /// The error.
        source: std::io::Error,
    },
    /// The applied seq could not be recorded.
    #[error(transparent)]
    Record(#[from] JobError),
    /// Seqs are not dense: the journal returned `found` where `expected` belongs.
    #[error("landing journal returned seq {found} where {expected} belongs")]
    Gap {
        /// The seq due.
        expected: Seq,
        /// The seq read.
        found: Seq,
    },
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Records applied.
    pub records: u64,
    /// Bytes written or zeroed.
    pub bytes: u64,
    /// The applied seq after the pass.
    pub applied: Seq,
}

/// Applies records of `job` from its applied seq + 1 up to `up_to` (at most
/// [`APPLY_PASS_BYTES_MAX`] of payload), syncs the replicas touched, advances the applied
/// seq; records it durably and trims the landing journal when `record` says so. Blocking.
pub fn apply_pass(job: &Job, up_to: Seq, record: bool) -> Result<Pass, ApplyError> {
    let mut pass = Pass {
        applied: job.applied(),
        ..Pass::default()
    };
    if up_to > pass.applied {
        let mut reader = job.landing.reader(pass.applied.next())?;
        let mut touched = BTreeSet::new();
        let mut expected = pass.applied.next();
        while expected <= up_to && pass.bytes < APPLY_PASS_BYTES_MAX {
            let Some(rec) = reader.next_record()? else {
                break;
            };
            let h = rec.header;
            if h.seq != expected {
                return Err(ApplyError::Gap {
                    expected,
                    found: h.seq,
                });
            }
            let replica = job.replicas.get(&h.disk).ok_or(ApplyError::UnknownDisk {
                seq: h.seq,
                disk: h.disk,
            })?;
            let changed = blockdev::apply_record(&*replica.device, &h, rec.payload).map_err(|source| {
                ApplyError::Replica {
                    disk: replica.info.name.clone(),
                    source,
                }
            })?;
            if changed > 0 {
                touched.insert(h.disk);
            }
            pass.bytes += changed;
            pass.records += 1;
            expected = expected.next();
        }
        for disk in &touched {
            let replica = &job.replicas[disk];
            replica.device.sync_data().map_err(|source| ApplyError::Sync {
                disk: replica.info.name.clone(),
                source,
            })?;
        }
        pass.applied = expected.prev();
        job.set_applied(pass.applied);
    }
    if record && job.applied() > job.applied_durable() {
        let applied = job.applied();
        job.record_applied(applied)?;
        // Only whole sealed segments below the recorded seq go: a crash before this point
        // re-applies from the landing journal, which still holds every record needed.
        if let Err(e) = job.landing.trim(applied.next()) {
            tracing::warn!(job = %job.id(), error = %e, "trimming the landing journal failed");
        }
    }
    Ok(pass)
}

/// Runs the applier of `job` until `stop` fires: applies whatever lands, records the applied
/// seq at most every [`APPLIED_RECORD_INTERVAL`] while busy and always when caught up. After
/// an error it retries with a growing delay (the job shows the error meanwhile).
pub async fn run_applier(job: std::sync::Arc<Job>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut landed = job.landed.subscribe();
    let mut last_record = Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            break;
        }
        let up_to = *landed.borrow_and_update();
        let behind = up_to > job.applied();
        let unrecorded = job.applied() > job.applied_durable();
        if behind || unrecorded {
            let record = !behind || last_record.elapsed() >= APPLIED_RECORD_INTERVAL;
            let worker = std::sync::Arc::clone(&job);
            let result = tokio::task::spawn_blocking(move || {
                let pass = apply_pass(&worker, up_to, false)?;
                // Caught up with what landed: record at once.
                let caught_up = pass.applied >= up_to;
                if record || caught_up {
                    apply_pass(&worker, pass.applied, true)?;
                }
                Ok::<_, ApplyError>(caught_up || record)
            })
            .await;
            match result {
                Ok(Ok(recorded)) => {
                    if recorded {
                        last_record = Instant::now();
                    }
                    if job.apply_error().is_some() {
                        tracing::info!(job = %job.id(), "applier recovered");
                        job.set_apply_error(None);
                    }
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::error!(job = %job.id(), error = %e, retry_in = ?backoff, "applier stopped on an error");
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
