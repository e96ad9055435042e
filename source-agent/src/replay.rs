//! `cdp-agent replay`: rebuilds one disk's image from the job's journal into a file, starting
//! from zeroes of the recorded size or from a copy of a base image, applying every verified
//! record of that disk in seq order.
//!
//! Takes the data directory's lock, so it never reads a journal an agent is writing. Never
//! applies a record the journal could not verify: the first bad record stops the replay with
//! an error naming its segment and seq.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use journal::{Journal, ReadError};
use thiserror::Error;

use crate::config::JournalSettings;
use crate::journal_sink::{journal_config, JOURNAL_DIR};
use crate::registry::{DataDirLock, Registry, RegistryError};
use crate::sink::{RecordKind, Seq};
use blockdev::{BlockDevice, FileDevice};

/// Interval between progress lines.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Why a replay failed.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// The disk table could not be read, has no such disk, or an agent holds the directory.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The data directory has no journal.
    #[error("no journal in {0}")]
    NoJournal(PathBuf),
    /// The journal could not be opened.
    #[error("opening the journal in {path}: {message}")]
    Open {
        /// The journal directory.
        path: PathBuf,
        /// The journal's error.
        message: String,
    },
    /// The journal no longer holds the disk's first records and no base image was given.
    #[error("the journal starts at seq {first}: earlier records were trimmed, so replay needs --base with the image as of seq {before}")]
    Trimmed {
        /// Oldest stored seq.
        first: Seq,
        /// The seq the base image must reflect.
        before: Seq,
    },
    /// Reading the journal failed (a record failed verification, or I/O).
    #[error("reading the journal: {0}")]
    Read(#[from] ReadError),
    /// A verified record does not fit the disk (the disk table and journal disagree).
    #[error("disk {disk}: {source}")]
    Apply {
        /// The disk.
        disk: String,
        /// What was wrong with the record.
        source: blockdev::ApplyError,
    },
    /// The base image's size is not the disk's recorded size.
    #[error("base image {path} is {size_bytes} bytes, disk {disk} is {recorded_bytes}")]
    BaseSize {
        /// The base image.
        path: PathBuf,
        /// Its size.
        size_bytes: u64,
        /// The disk.
        disk: String,
        /// The recorded size.
        recorded_bytes: u64,
    },
    /// Creating or writing the output failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplaySummary {
    /// Records of this disk applied.
    pub records: u64,
    /// Bytes written or zeroed.
    pub bytes: u64,
    /// The last seq read (of any disk).
    pub last_seq: Seq,
}

/// Rebuilds disk `disk` of the agent whose data directory is `data_dir` into `out`, from
/// zeroes or from a copy of `base`. `progress` receives human-readable progress lines.
pub fn replay(
    data_dir: &Path,
    disk: &str,
    out: &Path,
    base: Option<&Path>,
    progress: &mut dyn FnMut(&str),
) -> Result<ReplaySummary, ReplayError> {
    let _lock = DataDirLock::acquire(data_dir)?;
    let registry = Registry::load(data_dir)?;
    let record = registry.disk(disk)?.clone();
    let journal_dir = data_dir.join(JOURNAL_DIR);
    if !journal_dir.is_dir() {
        return Err(ReplayError::NoJournal(journal_dir));
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ReplayError::Io { path, source }
    };

    match base {
        Some(base) => {
            let size_bytes = std::fs::metadata(base).map_err(io(base))?.len();
            if size_bytes != record.size_bytes {
                return Err(ReplayError::BaseSize {
                    path: base.to_owned(),
                    size_bytes,
                    disk: disk.to_owned(),
                    recorded_bytes: record.size_bytes,
                });
            }
            std::fs::copy(base, out).map_err(io(out))?;
        }
        None => {
            let file = std::fs::File::create(out).map_err(io(out))?;
            file.set_len(record.size_bytes).map_err(io(out))?;
        }
    }
    let image = FileDevice::open(out).map_err(io(out))?;

    // The journal's own settings only matter for writing; replay reads.
    let journal = Journal::open(
        &journal_dir,
        journal_config(&registry, &JournalSettings::default()),
    )
    .map_err(|e| ReplayError::Open {
        path: journal_dir.clone(),
        message: e.to_string(),
    })?;
    let first = journal.first_seq();
    let head = journal.head_seq();
    if first > Seq::FIRST && base.is_none() {
        return Err(ReplayError::Trimmed {
            first,
            before: first.prev(),
        });
    }
    progress(&format!(
        "replay: disk {disk} (id {}), {} bytes, journal seqs {first}..={head}",
        record.id, record.size_bytes
    ));
    let mut summary = ReplaySummary::default();
    if head == Seq::NONE {
        image.sync_data().map_err(io(out))?;
        return Ok(summary);
    }
    let mut reader = journal.reader(first.max(Seq::FIRST))?;
    let mut last_report = Instant::now();
    while let Some(rec) = reader.next_record()? {
        let h = rec.header;
        summary.last_seq = h.seq;
        if h.disk.0 != record.id
            || !matches!(
                h.kind,
                RecordKind::Write | RecordKind::Trim | RecordKind::WriteZeroes
            )
        {
            continue;
        }
        summary.bytes += blockdev::apply_record(&image, &h, rec.payload).map_err(|e| match e {
            blockdev::ApplyError::Io { source, .. } => ReplayError::Io {
                path: out.to_owned(),
                source,
            },
            other => ReplayError::Apply {
                disk: disk.to_owned(),
                source: other,
            },
        })?;
        summary.records += 1;
        if last_report.elapsed() >= PROGRESS_INTERVAL {
            last_report = Instant::now();
            progress(&format!(
                "replay: seq {}/{head}, {} records applied, {} bytes",
                h.seq, summary.records, summary.bytes
            ));
        }
    }
    image.sync_data().map_err(io(out))?;
    progress(&format!(
        "replay: done at seq {}, {} records applied, {} bytes",
        summary.last_seq, summary.records, summary.bytes
    ));
    Ok(summary)
}
