//! The job's journal (`DATA_DIR/journal/`, the `journal` crate's `SharedJournal` with group
//! commit) behind the [`RecordSink`] trait the `journal` filter uses.
//!
//! One journal per agent: every disk's records share its one sequencer, so any seq prefix is
//! a crash-consistent image of all the agent's disks together.

use std::path::Path;
use std::sync::Arc;

use journal::{
    Compression, Entry, Flags, Generation, JobId, Journal, JournalConfig, SharedJournal,
};

use crate::agent::StartError;
use crate::config::JournalSettings;
use crate::registry::Registry;
use crate::sink::{RecordSink, Seq, SinkEntry, SinkError};

/// Name of the journal directory inside the data directory.
pub const JOURNAL_DIR: &str = "journal";

/// The journal's configuration for the job `registry` describes.
pub fn journal_config(registry: &Registry, settings: &JournalSettings) -> JournalConfig {
    let mut config = JournalConfig::new(JobId(registry.job()), Generation(registry.generation()));
    config.segment_bytes_max = settings.segment_bytes_max;
    config.compression = if settings.compression {
        Compression::default()
    } else {
        Compression::None
    };
    config
}

/// Opens (or creates) the job's journal, repairing a torn tail.
pub fn open(
    data_dir: &Path,
    registry: &Registry,
    settings: &JournalSettings,
) -> Result<Arc<JournalSink>, StartError> {
    let dir = data_dir.join(JOURNAL_DIR);
    let journal = Journal::open(&dir, journal_config(registry, settings)).map_err(|e| {
        StartError::Journal {
            path: dir.clone(),
            message: e.to_string(),
        }
    })?;
    if let Some(torn) = &journal.recovery().torn_tail {
        tracing::warn!(
            ?torn,
            "journal had a torn tail (a crash interrupted a write); it was cut"
        );
    }
    tracing::info!(
        path = %dir.display(),
        head_seq = %journal.head_seq(),
        durable_seq = %journal.durable_seq(),
        "journal opened"
    );
    Ok(Arc::new(JournalSink {
        journal: Arc::new(journal.into_shared()),
    }))
}

/// The real journal as a [`RecordSink`].
#[derive(Debug)]
pub struct JournalSink {
    journal: Arc<SharedJournal>,
}

impl JournalSink {
    /// The journal itself, for the shipper (readers, trim).
    pub fn shared(&self) -> Arc<SharedJournal> {
        Arc::clone(&self.journal)
    }
}

impl RecordSink for JournalSink {
    fn append(&self, entry: &SinkEntry<'_>) -> Result<Seq, SinkError> {
        let flags = if entry.fua { Flags::FUA } else { Flags::NONE };
        self.journal
            .append(Entry {
                disk: entry.disk,
                kind: entry.kind,
                offset: entry.offset,
                length: entry.length,
                payload: entry.payload,
                timestamp: entry.timestamp,
                flags,
            })
            .map_err(|e| SinkError::Journal(e.to_string()))
    }

    fn wait_durable(&self, seq: Seq) -> Result<Seq, SinkError> {
        self.journal
            .wait_durable(seq)
            .map_err(|e| SinkError::Journal(e.to_string()))
    }

    fn sync(&self) -> Result<Seq, SinkError> {
        self.journal
            .sync()
            .map_err(|e| SinkError::Journal(e.to_string()))
    }

    fn head_seq(&self) -> Seq {
        self.journal.head_seq()
    }

    fn durable_seq(&self) -> Seq {
        self.journal.durable_seq()
    }
}
