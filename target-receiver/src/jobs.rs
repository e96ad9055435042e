//! The appliance's jobs on disk and in memory. One directory per job:
//!
//! ```text
//! DATA_DIR/jobs/<job id, 32 hex>/job.toml          what the job is (written once, atomically)
//! DATA_DIR/jobs/<job id>/landing/                  the landing journal (journal crate)
//! DATA_DIR/jobs/<job id>/replicas/<disk>.img       one raw replica per source disk
//! DATA_DIR/jobs/<job id>/history/                  before-images, checkpoints, applied seq (RocksDB)
//! DATA_DIR/jobs/<job id>/control.toml              paused, throttle (operator settings)
//! DATA_DIR/seed/<job name>/<disk>.img              optional pre-seeded replica, moved in on creation
//! ```
//!
//! A [`Job`] holds the open landing journal, the replicas, the history store and the live
//! state the API and the metrics read. Opening a job finishes the recovery of a pass a crash
//! interrupted (`apply::recover`). Must never: let two connections append to one landing
//! journal at once (the [`Job::writer`] lock).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use blockdev::{create_image, FileDevice};
use journal::ship::JobInfo;
use journal::wire::{
    AgentStatus, CheckpointRequest, Control, DiskInfo, Heartbeat, Mode, ResyncNeed,
};
use journal::{DiskId, Generation, JobId, Journal, JournalConfig, Seq, SharedJournal};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;
use transport::fsutil::{write_replacing, MODE_PUBLIC_FILE};

use crate::history::{Checkpoint, CheckpointKind, History, ResyncInterval};

/// The directory holding every job.
pub const JOBS_DIR: &str = "jobs";
/// A job's description.
pub const JOB_FILE: &str = "job.toml";
/// A job's landing journal directory.
pub const LANDING_DIR: &str = "landing";
/// A job's replica directory.
pub const REPLICAS_DIR: &str = "replicas";
/// A job's history store directory.
pub const HISTORY_DIR: &str = "history";
/// A job's operator settings (pause, throttle).
pub const CONTROL_FILE: &str = "control.toml";
/// Pre-seeded replicas: `DATA_DIR/seed/<job name>/<disk name>.img` is moved into a new job.
pub const SEED_DIR: &str = "seed";
/// Resync answers queued for the connected stream, at most (the agent keeps far fewer
/// hashes records unanswered).
pub const RESYNC_NEEDS_QUEUED_MAX: usize = 1024;

/// `control.toml`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlFile {
    #[serde(default)]
    paused: bool,
    #[serde(default)]
    throttle_bytes_per_second: u64,
}
/// Default interval between automatic checkpoints.
pub const CHECKPOINT_INTERVAL_DEFAULT: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a job could not be created, loaded or updated.
#[derive(Debug, Error)]
pub enum JobError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A job file does not parse.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The history store could not be opened or read.
    #[error("history store {path}: {message}")]
    History {
        /// Its directory.
        path: PathBuf,
        /// The error.
        message: String,
    },
    /// Recovering an interrupted apply failed.
    #[error("job {job}: recovering an interrupted apply: {message}")]
    Recover {
        /// The job.
        job: JobId,
        /// The error.
        message: String,
    },
    /// The landing journal could not be opened.
    #[error("landing journal {path}: {message}")]
    Landing {
        /// Its directory.
        path: PathBuf,
        /// The journal's error.
        message: String,
    },
    /// A disk name cannot be a replica file name.
    #[error("disk name {0:?} cannot name a replica file")]
    DiskName(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> JobError + '_ {
    move |source| JobError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `job.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    id: String,
    name: String,
    /// The paired agent that created the job; only it may replicate into it.
    agent: String,
    generation: u64,
    mode: String,
    #[serde(rename = "disk")]
    disks: Vec<DiskFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskFile {
    id: u32,
    name: String,
    size_bytes: u64,
}

/// What a job is: as the agent first announced it, and who the agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobMeta {
    /// The job as announced (id, name, generation, mode, disks).
    pub info: JobInfo,
    /// The paired agent's name.
    pub agent: String,
}

impl JobMeta {
    fn to_file(&self) -> JobFile {
        JobFile {
            id: self.info.job.to_string(),
            name: self.info.job_name.clone(),
            agent: self.agent.clone(),
            generation: self.info.generation.0,
            mode: mode_name(self.info.mode).to_owned(),
            disks: self
                .info
                .disks
                .iter()
                .map(|d| DiskFile {
                    id: d.disk.0,
                    name: d.name.clone(),
                    size_bytes: d.size_bytes,
                })
                .collect(),
        }
    }

    fn from_file(file: JobFile, path: &Path) -> Result<Self, JobError> {
        let parse = |message: String| JobError::Parse {
            path: path.to_owned(),
            message,
        };
        let job = JobId::parse_hex(&file.id)
            .ok_or_else(|| parse(format!("job id {:?} is not 32 hex digits", file.id)))?;
        let mode = match file.mode.as_str() {
            "async" => Mode::Async,
            "sync" => Mode::Sync,
            other => return Err(parse(format!("mode {other:?} is neither async nor sync"))),
        };
        Ok(JobMeta {
            info: JobInfo {
                job,
                job_name: file.name,
                generation: Generation(file.generation),
                mode,
                disks: file
                    .disks
                    .into_iter()
                    .map(|d| DiskInfo {
                        disk: DiskId(d.id),
                        name: d.name,
                        size_bytes: d.size_bytes,
                    })
                    .collect(),
            },
            agent: file.agent,
        })
    }
}

/// `async` or `sync`.
pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Async => "async",
        Mode::Sync => "sync",
    }
}

/// What the link to the job's agent looks like now.
#[derive(Debug, Clone, Default)]
pub struct LinkStatus {
    /// A connection carries the job now.
    pub connected: bool,
    /// The agent's last heartbeat and when it arrived.
    pub heartbeat: Option<(Heartbeat, Instant)>,
    /// Why the last connection ended or was refused, if it did not end cleanly.
    pub last_error: Option<String>,
    /// The agent's last status (state, resync progress), as it reported it.
    pub agent_status: Option<AgentStatus>,
}

/// One replica disk.
#[derive(Debug)]
pub struct Replica {
    /// The disk as the agent announced it.
    pub info: DiskInfo,
    /// The raw image.
    pub path: PathBuf,
    /// The open image.
    pub device: Arc<FileDevice>,
}

/// A job: its landing journal, replicas and live state.
#[derive(Debug)]
pub struct Job {
    /// The job's directory.
    pub dir: PathBuf,
    meta: JobMeta,
    /// The landing journal. Invariant: only the holder of [`Job::writer`] appends to it.
    pub landing: Arc<SharedJournal>,
    /// The replicas by disk id.
    pub replicas: BTreeMap<DiskId, Replica>,
    /// Before-images, checkpoints and the applied seq.
    pub history: Arc<History>,
    /// Held by the connection that lands records for the job.
    pub writer: Arc<tokio::sync::Mutex<()>>,
    /// Bumped when a new connection takes the job over; the old one stops when it sees it.
    pub session: watch::Sender<u64>,
    /// The landing journal's durable seq, published for the applier.
    pub landed: watch::Sender<Seq>,
    /// Highest seq applied to the replicas, synced, and recorded in the history store.
    applied: AtomicU64,
    /// The replicas are a consistent image (no resync in progress): checkpoints may be made.
    consistent: AtomicBool,
    /// Agent timestamp of the newest checkpoint, for the automatic interval.
    last_checkpoint_micros: AtomicU64,
    /// Interval between automatic checkpoints, in microseconds of the agent's clock.
    checkpoint_interval_micros: AtomicU64,
    link: Mutex<LinkStatus>,
    apply_error: Mutex<Option<String>>,
    /// Records refused for a bad checksum, framing or seq, over the job's life in this process.
    pub corrupt_records: AtomicU64,
    /// Stored record bytes landed, over the job's life in this process.
    pub landed_bytes: AtomicU64,
    /// Set once the applier has been started for this job.
    pub applier_started: AtomicBool,
    /// The connected stream's channel for checkpoint requests (`None` while disconnected).
    checkpoint_requests: Mutex<Option<tokio::sync::mpsc::Sender<CheckpointRequest>>>,
    next_request_id: AtomicU64,
    /// What the last retention pass found (for metrics and the API).
    retention: Mutex<Option<crate::retention::RetentionOutcome>>,
    /// The resyncs the history records (the last may be open); the applier's copy.
    resyncs: Mutex<Vec<ResyncInterval>>,
    /// The connected stream's channel for resync answers (`None` while disconnected).
    resync_needs: Mutex<Option<tokio::sync::mpsc::Sender<ResyncNeed>>>,
    /// The operator's settings for the link; the connected stream sends every change.
    pub control: watch::Sender<Control>,
}

/// Why a checkpoint could not be asked for.
#[derive(Debug, Error)]
pub enum CheckpointRequestError {
    /// No agent is connected to answer it.
    #[error(
        "the job's agent is not connected: a checkpoint is recorded by the agent, in its journal"
    )]
    NotConnected,
    /// Too many requests are waiting.
    #[error("too many checkpoint requests are waiting for the agent")]
    Busy,
    /// The replicas are being resynced: no checkpoint until that is done.
    #[error(
        "the replicas are inconsistent until the resync completes: no checkpoint can be made now"
    )]
    Inconsistent,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data under these locks is plain status; a panic elsewhere does not make it unsafe.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Job {
    /// Creates the job's directory, replicas (sparse, of the announced sizes), description
    /// and empty landing journal, all durable, or opens what an earlier attempt left.
    fn create(dir: PathBuf, meta: JobMeta) -> Result<Job, JobError> {
        fs::create_dir_all(dir.join(REPLICAS_DIR)).map_err(io_error(&dir))?;
        let seed_dir = dir
            .parent()
            .and_then(Path::parent)
            .map(|data| data.join(SEED_DIR).join(&meta.info.job_name));
        for disk in &meta.info.disks {
            let path = replica_path(&dir, &disk.name)?;
            if let Some(seed) = seed_dir
                .as_ref()
                .map(|d| d.join(format!("{}.img", disk.name)))
            {
                take_seed(&seed, &path, disk.size_bytes)?;
            }
            create_image(&path, disk.size_bytes).map_err(io_error(&path))?;
        }
        let text = toml::to_string(&meta.to_file()).map_err(|e| JobError::Parse {
            path: dir.join(JOB_FILE),
            message: e.to_string(),
        })?;
        let path = dir.join(JOB_FILE);
        write_replacing(&path, text.as_bytes(), MODE_PUBLIC_FILE).map_err(io_error(&path))?;
        if let Some(parent) = dir.parent() {
            fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io_error(parent))?;
        }
        Job::open(dir, meta)
    }

    /// Opens the job in `dir` described by `meta`.
    fn open(dir: PathBuf, meta: JobMeta) -> Result<Job, JobError> {
        let landing_dir = dir.join(LANDING_DIR);
        let journal = Journal::open(
            &landing_dir,
            JournalConfig::new(meta.info.job, meta.info.generation),
        )
        .map_err(|e| JobError::Landing {
            path: landing_dir.clone(),
            message: e.to_string(),
        })?;
        if let Some(torn) = &journal.recovery().torn_tail {
            tracing::warn!(job = %meta.info.job, ?torn, "landing journal had a torn tail; it was cut");
        }
        let mut replicas = BTreeMap::new();
        for disk in &meta.info.disks {
            let path = replica_path(&dir, &disk.name)?;
            let device = create_image(&path, disk.size_bytes).map_err(io_error(&path))?;
            replicas.insert(
                disk.disk,
                Replica {
                    info: disk.clone(),
                    path,
                    device: Arc::new(device),
                },
            );
        }
        let history_dir = dir.join(HISTORY_DIR);
        let history_error = |e: crate::history::HistoryError| JobError::History {
            path: history_dir.clone(),
            message: e.to_string(),
        };
        let history = History::open(&history_dir).map_err(history_error)?;
        let applied = history.applied().map_err(history_error)?;
        let last_checkpoint = history
            .checkpoint_at_or_before(Seq::MAX)
            .map_err(history_error)?
            .map_or(0, |c| c.timestamp.0);
        let landed = journal.durable_seq();
        // The landing journal is trimmed only below the applied seq recorded, so it holds
        // everything after it; a recorded seq beyond what landed means the files were mixed.
        if applied > landed {
            return Err(JobError::History {
                path: history_dir,
                message: format!(
                    "applied seq {applied} is beyond the landing journal's durable seq {landed}"
                ),
            });
        }
        let resyncs = history.resync_intervals().map_err(history_error)?;
        let consistent = resyncs.last().is_none_or(|r| r.end.is_some());
        let control = read_control(&dir.join(CONTROL_FILE))?;
        let (landed_tx, _) = watch::channel(landed);
        let (session, _) = watch::channel(0);
        let job = Job {
            dir,
            meta,
            landing: Arc::new(journal.into_shared()),
            replicas,
            history: Arc::new(history),
            writer: Arc::new(tokio::sync::Mutex::new(())),
            session,
            landed: landed_tx,
            applied: AtomicU64::new(applied.0),
            consistent: AtomicBool::new(consistent),
            last_checkpoint_micros: AtomicU64::new(last_checkpoint),
            checkpoint_interval_micros: AtomicU64::new(
                CHECKPOINT_INTERVAL_DEFAULT.as_micros() as u64
            ),
            link: Mutex::new(LinkStatus::default()),
            apply_error: Mutex::new(None),
            corrupt_records: AtomicU64::new(0),
            landed_bytes: AtomicU64::new(0),
            applier_started: AtomicBool::new(false),
            checkpoint_requests: Mutex::new(None),
            next_request_id: AtomicU64::new(1),
            retention: Mutex::new(None),
            resyncs: Mutex::new(resyncs),
            resync_needs: Mutex::new(None),
            control: watch::channel(control).0,
        };
        if let Some(pending) = crate::apply::recover(&job).map_err(|e| JobError::Recover {
            job: job.id(),
            message: e.to_string(),
        })? {
            tracing::info!(job = %job.id(), first = %pending.first, last = %pending.last, "rolled back; the batch is applied again");
        }
        Ok(job)
    }

    /// The job's id.
    pub fn id(&self) -> JobId {
        self.meta.info.job
    }

    /// What the job is.
    pub fn meta(&self) -> &JobMeta {
        &self.meta
    }

    /// Highest seq applied to the replicas.
    pub fn applied(&self) -> Seq {
        Seq(self.applied.load(Ordering::Acquire))
    }

    /// The replicas hold every record up to `seq`, synced, and the history store says so.
    pub fn set_applied(&self, seq: Seq) {
        let before = self.applied.swap(seq.0, Ordering::AcqRel);
        assert!(
            seq.0 >= before,
            "applied seq went back from {before} to {seq}"
        );
    }

    /// Whether the replicas are a consistent image (checkpoints may be made).
    pub fn consistent(&self) -> bool {
        self.consistent.load(Ordering::Acquire)
    }

    /// Marks the replicas consistent or not (a resync makes them inconsistent until done).
    pub fn set_consistent(&self, consistent: bool) {
        self.consistent.store(consistent, Ordering::Release);
    }

    /// Sets the interval between automatic checkpoints.
    pub fn set_checkpoint_interval(&self, interval: std::time::Duration) {
        self.checkpoint_interval_micros.store(
            interval.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// The automatic checkpoint a pass ending at `seq` (agent time `timestamp`) makes, if
    /// one is due.
    pub fn auto_checkpoint_due(
        &self,
        seq: Seq,
        timestamp: journal::Timestamp,
    ) -> Option<Checkpoint> {
        let last = self.last_checkpoint_micros.load(Ordering::Relaxed);
        let interval = self.checkpoint_interval_micros.load(Ordering::Relaxed);
        (timestamp.0 >= last.saturating_add(interval)).then_some(Checkpoint {
            seq,
            timestamp,
            kind: CheckpointKind::Auto,
            app_consistent: false,
            tags: Vec::new(),
            request_id: 0,
        })
    }

    /// The connected stream takes checkpoint requests through `sender` (`None`: it ended).
    pub fn set_checkpoint_channel(
        &self,
        sender: Option<tokio::sync::mpsc::Sender<CheckpointRequest>>,
    ) {
        *lock(&self.checkpoint_requests) = sender;
    }

    /// Asks the agent for a checkpoint; returns the request id its record will carry.
    pub fn request_checkpoint(
        &self,
        tags: Vec<String>,
        app_consistent: bool,
    ) -> Result<u64, CheckpointRequestError> {
        if !self.consistent() {
            return Err(CheckpointRequestError::Inconsistent);
        }
        let sender = lock(&self.checkpoint_requests)
            .clone()
            .ok_or(CheckpointRequestError::NotConnected)?;
        // Ids only need to be unique among requests in flight; the process start time keeps
        // them apart from those of an earlier run still in the landing journal.
        let request_id = (std::process::id() as u64) << 40
            | self.next_request_id.fetch_add(1, Ordering::Relaxed);
        sender
            .try_send(CheckpointRequest {
                request_id,
                app_consistent,
                tags,
            })
            .map_err(|e| match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => CheckpointRequestError::Busy,
                tokio::sync::mpsc::error::TrySendError::Closed(_) => {
                    CheckpointRequestError::NotConnected
                }
            })?;
        Ok(request_id)
    }

    /// The resyncs the history records, oldest first.
    pub fn resyncs(&self) -> Vec<ResyncInterval> {
        lock(&self.resyncs).clone()
    }

    /// The applier recorded new resync intervals (durably, with its pass).
    pub fn set_resyncs(&self, resyncs: Vec<ResyncInterval>) {
        let consistent = resyncs.last().is_none_or(|r| r.end.is_some());
        *lock(&self.resyncs) = resyncs;
        self.set_consistent(consistent);
    }

    /// The connected stream takes resync answers through `sender` (`None`: it ended).
    pub fn set_resync_channel(&self, sender: Option<tokio::sync::mpsc::Sender<ResyncNeed>>) {
        *lock(&self.resync_needs) = sender;
    }

    /// Sends the answer to a hashes record to the connected agent. Without a connection it
    /// is dropped: the agent asks again for every region it has no answer for when it
    /// reconnects.
    pub fn send_resync_need(&self, need: ResyncNeed) {
        if let Some(sender) = lock(&self.resync_needs).as_ref() {
            if sender.try_send(need).is_err() {
                tracing::warn!(job = %self.id(), "resync answer dropped: the stream's queue is full or closed; the agent will ask again");
            }
        }
    }

    /// Changes the operator's link settings, durably, and tells the connected agent.
    pub fn set_control(&self, control: Control) -> Result<(), JobError> {
        let path = self.dir.join(CONTROL_FILE);
        let file = ControlFile {
            paused: control.paused,
            throttle_bytes_per_second: control.throttle_bytes_per_second,
        };
        let text = toml::to_string(&file).map_err(|e| JobError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_replacing(&path, text.as_bytes(), MODE_PUBLIC_FILE).map_err(io_error(&path))?;
        self.control.send_replace(control);
        Ok(())
    }

    /// What the last retention pass found.
    pub fn retention(&self) -> Option<crate::retention::RetentionOutcome> {
        lock(&self.retention).clone()
    }

    /// Records what a retention pass found.
    pub fn set_retention(&self, outcome: crate::retention::RetentionOutcome) {
        *lock(&self.retention) = Some(outcome);
    }

    /// A checkpoint joined the catalog.
    pub fn note_checkpoint(&self, checkpoint: &Checkpoint) {
        self.last_checkpoint_micros
            .fetch_max(checkpoint.timestamp.0, Ordering::Relaxed);
    }

    /// The link status.
    pub fn link(&self) -> LinkStatus {
        lock(&self.link).clone()
    }

    /// Changes the link status.
    pub fn update_link(&self, f: impl FnOnce(&mut LinkStatus)) {
        f(&mut lock(&self.link));
    }

    /// The applier's last error, if it is stopped on one.
    pub fn apply_error(&self) -> Option<String> {
        lock(&self.apply_error).clone()
    }

    /// Sets or clears the applier's error.
    pub fn set_apply_error(&self, error: Option<String>) {
        *lock(&self.apply_error) = error;
    }
}

/// Reads `control.toml`; absent: not paused, no throttle.
fn read_control(path: &Path) -> Result<Control, JobError> {
    let file: ControlFile = match fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| JobError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => ControlFile::default(),
        Err(e) => return Err(io_error(path)(e)),
    };
    Ok(Control {
        paused: file.paused,
        throttle_bytes_per_second: file.throttle_bytes_per_second,
    })
}

/// Moves a pre-seeded replica from `seed` to `replica` when there is one (and no replica
/// yet): a copy of the source disk made by other means, so the initial sync only compares
/// hashes. A seed of the wrong size is refused, never truncated.
fn take_seed(seed: &Path, replica: &Path, size_bytes: u64) -> Result<(), JobError> {
    let meta = match fs::metadata(seed) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(seed)(e)),
    };
    if replica.exists() {
        return Ok(());
    }
    if meta.len() != size_bytes {
        return Err(JobError::Io {
            path: seed.to_owned(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the seed holds {} bytes but the disk has {size_bytes}; remove or fix it",
                    meta.len()
                ),
            ),
        });
    }
    fs::rename(seed, replica).map_err(io_error(seed))?;
    tracing::info!(seed = %seed.display(), replica = %replica.display(), "pre-seeded replica moved in");
    Ok(())
}

/// Where the replica of disk `name` lives in job directory `dir`.
fn replica_path(dir: &Path, name: &str) -> Result<PathBuf, JobError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(JobError::DiskName(name.to_owned()));
    }
    Ok(dir.join(REPLICAS_DIR).join(format!("{name}.img")))
}

/// Every job of the appliance.
#[derive(Debug)]
pub struct Jobs {
    dir: PathBuf,
    jobs: Mutex<BTreeMap<JobId, Arc<Job>>>,
}

impl Jobs {
    /// Loads every job under `data_dir/jobs/`.
    pub fn load(data_dir: &Path) -> Result<Jobs, JobError> {
        let dir = data_dir.join(JOBS_DIR);
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let mut jobs = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let entry = entry.map_err(io_error(&dir))?;
            let job_dir = entry.path();
            let Some(id) = entry.file_name().to_str().and_then(JobId::parse_hex) else {
                continue;
            };
            let file = job_dir.join(JOB_FILE);
            let text = match fs::read_to_string(&file) {
                Ok(text) => text,
                // A creation that crashed before its description was written never
                // acknowledged anything; the agent will create it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(&file)(e)),
            };
            let parsed: JobFile = toml::from_str(&text).map_err(|e| JobError::Parse {
                path: file.clone(),
                message: e.to_string(),
            })?;
            let meta = JobMeta::from_file(parsed, &file)?;
            if meta.info.job != id {
                return Err(JobError::Parse {
                    path: file,
                    message: format!(
                        "holds job {} but lives in the directory of {id}",
                        meta.info.job
                    ),
                });
            }
            let job = Job::open(job_dir, meta)?;
            tracing::info!(
                job = %id,
                name = %job.meta.info.job_name,
                landed = %job.landing.durable_seq(),
                applied = %job.applied(),
                "job loaded"
            );
            jobs.insert(id, Arc::new(job));
        }
        Ok(Jobs {
            dir,
            jobs: Mutex::new(jobs),
        })
    }

    /// The job `id`, if it exists.
    pub fn get(&self, id: JobId) -> Option<Arc<Job>> {
        lock(&self.jobs).get(&id).cloned()
    }

    /// Every job, by id.
    pub fn all(&self) -> Vec<Arc<Job>> {
        lock(&self.jobs).values().cloned().collect()
    }

    /// The job `meta` describes, created if it does not exist yet (blocking: creates files).
    pub fn get_or_create(&self, meta: JobMeta) -> Result<Arc<Job>, JobError> {
        let mut jobs = lock(&self.jobs);
        if let Some(job) = jobs.get(&meta.info.job) {
            return Ok(Arc::clone(job));
        }
        let id = meta.info.job;
        let job = Arc::new(Job::create(self.dir.join(id.to_string()), meta)?);
        tracing::info!(job = %id, name = %job.meta.info.job_name, agent = %job.meta.agent, "job created");
        jobs.insert(id, Arc::clone(&job));
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> JobMeta {
        JobMeta {
            info: JobInfo {
                job: JobId([7; 16]),
                job_name: "web".into(),
                generation: Generation(1),
                mode: Mode::Sync,
                disks: vec![
                    DiskInfo {
                        disk: DiskId(0),
                        name: "os".into(),
                        size_bytes: 1 << 20,
                    },
                    DiskInfo {
                        disk: DiskId(3),
                        name: "data".into(),
                        size_bytes: 3 << 20,
                    },
                ],
            },
            agent: "host-1".into(),
        }
    }

    #[test]
    fn a_created_job_loads_back_with_its_replicas_and_applied_seq() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::load(dir.path()).unwrap();
        let job = jobs.get_or_create(meta()).unwrap();
        assert_eq!(job.replicas.len(), 2);
        assert_eq!(
            blockdev::BlockDevice::size_bytes(&*job.replicas[&DiskId(3)].device),
            3 << 20
        );
        assert_eq!(job.applied(), Seq::NONE);
        drop(job);
        drop(jobs);
        let jobs = Jobs::load(dir.path()).unwrap();
        let job = jobs.get(JobId([7; 16])).unwrap();
        assert_eq!(job.meta(), &meta());
        assert_eq!(job.applied(), Seq::NONE);
        let text = fs::read_to_string(job.dir.join(JOB_FILE)).unwrap();
        assert!(text.contains("agent = \"host-1\""), "{text}");
    }

    #[test]
    fn disk_names_that_escape_the_directory_are_refused() {
        let dir = Path::new("/j");
        for bad in ["", "../x", ".hidden", "a/b", "x y"] {
            assert!(replica_path(dir, bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            replica_path(dir, "os-1.2_x").unwrap(),
            Path::new("/j/replicas/os-1.2_x.img")
        );
    }
}
