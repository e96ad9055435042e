//! [`SharedJournal`]: the journal for many threads, with group commit. Callers `append`
//! (hashing and compression run outside the lock; only seq assignment and the pwrite run
//! under it), then `wait_durable`: one waiter becomes the leader and makes ONE fdatasync
//! for everything appended so far, *without* holding the append lock, so appends continue
//! while it runs; every waiter whose seq it covers returns.
//!
//! std `Mutex` and `Condvar` only; no async runtime. Must never: hold the append lock during
//! an fdatasync issued by a sync (rollover is the documented exception: it seals a segment),
//! let a follower return for a seq no completed fdatasync covers, or let any call succeed
//! after the journal is poisoned.

use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{AppendError, ReadError, SyncError, TrimError};
use crate::journal::{Core, JournalConfig, JournalStats, Recovery, SyncPlan};
use crate::reader::{RawReader, Reader};
use crate::record::{Entry, RecordEncoder};
use crate::types::Seq;

/// Encoders kept for reuse between appends (each holds a zstd context). More concurrent
/// appenders than this simply create a fresh encoder.
const ENCODER_POOL_MAX: usize = 16;

/// A journal shared by threads (`Send + Sync`), with group commit.
#[derive(Debug)]
pub struct SharedJournal {
    core: Mutex<Core>,
    sync: Mutex<SyncState>,
    /// Signalled whenever a leader finishes (durable seq advanced, or poisoned).
    synced: Condvar,
    encoders: Mutex<Vec<RecordEncoder>>,
    /// Copy of the config, readable without the append lock.
    config: JournalConfig,
    recovery: Recovery,
}

#[derive(Debug)]
struct SyncState {
    /// Highest seq a completed fdatasync covered, as published by leaders.
    durable: Seq,
    /// Whether a leader is syncing now.
    leader: bool,
    /// Set when a sync failed: every later wait fails.
    poisoned: Option<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind (the journal's own
    // code does not panic under them); the poisoned-journal state, not the mutex's poison
    // flag, is what guards durability.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl SharedJournal {
    pub(crate) fn new(core: Core) -> Self {
        let durable = core.durable();
        let poisoned = core.poison_cause().map(str::to_string);
        SharedJournal {
            config: core.config().clone(),
            recovery: core.recovery().clone(),
            core: Mutex::new(core),
            sync: Mutex::new(SyncState {
                durable,
                leader: false,
                poisoned,
            }),
            synced: Condvar::new(),
            encoders: Mutex::new(Vec::new()),
        }
    }

    /// Appends one record and returns its seq; the record has reached the OS when this
    /// returns. Call [`wait_durable`](SharedJournal::wait_durable) to make it durable.
    pub fn append(&self, entry: Entry<'_>) -> Result<Seq, AppendError> {
        let mut encoder = lock(&self.encoders)
            .pop()
            .unwrap_or_else(|| RecordEncoder::new(self.config.compression));
        let prepared = encoder.prepare(&entry);
        {
            let mut pool = lock(&self.encoders);
            if pool.len() < ENCODER_POOL_MAX {
                pool.push(encoder);
            }
        }
        let mut record = prepared?;
        lock(&self.core).append_prepared(&mut record)
    }

    /// Appends a record exactly as another journal stored it, keeping its seq and generation
    /// (see [`Journal::append_stored`](crate::Journal::append_stored)).
    pub fn append_stored(&self, record: &[u8]) -> Result<Seq, AppendError> {
        lock(&self.core).append_stored(record)
    }

    /// Blocks until `seq` is durable; returns the durable seq (at least `seq`). One waiter
    /// at a time leads: it makes one fdatasync covering everything appended before it began,
    /// while appends continue; the others wait for it and return if it covered them.
    pub fn wait_durable(&self, seq: Seq) -> Result<Seq, SyncError> {
        let mut state = lock(&self.sync);
        loop {
            if let Some(cause) = &state.poisoned {
                return Err(SyncError::Poisoned {
                    cause: cause.clone(),
                });
            }
            if state.durable >= seq {
                return Ok(state.durable);
            }
            if !state.leader {
                break;
            }
            state = self.synced.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.leader = true;
        drop(state);

        let result = self.lead_sync();

        let mut state = lock(&self.sync);
        state.leader = false;
        match &result {
            Ok(durable) => state.durable = state.durable.max(*durable),
            Err(SyncError::Poisoned { .. } | SyncError::Io { .. }) => {
                if state.poisoned.is_none() {
                    let cause = lock(&self.core).poison_cause().map(str::to_string);
                    state.poisoned = Some(cause.unwrap_or_else(|| "sync failed".to_string()));
                }
            }
            Err(SyncError::NotAppended { .. }) => {}
        }
        drop(state);
        self.synced.notify_all();
        let durable = result?;
        if durable < seq {
            return Err(SyncError::NotAppended {
                seq,
                head: self.head_seq(),
            });
        }
        Ok(durable)
    }

    /// The leader's sync: frame and plan under the lock, fdatasync without it.
    fn lead_sync(&self) -> Result<Seq, SyncError> {
        let plan = lock(&self.core).prepare_sync(false)?;
        match plan {
            SyncPlan::Done(durable) => Ok(durable),
            SyncPlan::Sync { target, name, file } => {
                // The append lock is not held here: appends (and rollovers, which sync the
                // segment they seal themselves) go on while the device works.
                let result = file.sync_data();
                lock(&self.core).finish_sync(target, &name, result)
            }
        }
    }

    /// Makes everything appended so far durable (a `wait_durable` for the current head).
    pub fn sync(&self) -> Result<Seq, SyncError> {
        let head = self.head_seq();
        self.wait_durable(head)
    }

    /// Last appended seq.
    pub fn head_seq(&self) -> Seq {
        lock(&self.core).head()
    }

    /// Last seq covered by a completed fdatasync.
    pub fn durable_seq(&self) -> Seq {
        lock(&self.core).durable()
    }

    /// Oldest seq still stored.
    pub fn first_seq(&self) -> Seq {
        lock(&self.core).first_seq()
    }

    /// Counters since opening.
    pub fn stats(&self) -> JournalStats {
        lock(&self.core).stats()
    }

    /// What opening found and repaired.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The configuration.
    pub fn config(&self) -> &JournalConfig {
        &self.config
    }

    /// Whether an I/O or fsync error poisoned the journal, and which.
    pub fn poisoned(&self) -> Option<String> {
        lock(&self.core).poison_cause().map(str::to_string)
    }

    /// A reader of verified records from `from` up to the current head. Reading takes no
    /// lock after this returns.
    pub fn reader(&self, from: Seq) -> Result<Reader, ReadError> {
        Ok(Reader::new(lock(&self.core).read_plan(from)?))
    }

    /// A reader of verified records exactly as stored.
    pub fn raw_reader(&self, from: Seq) -> Result<RawReader, ReadError> {
        Ok(RawReader::new(lock(&self.core).read_plan(from)?))
    }

    /// Deletes every sealed segment whose records are all below `up_to`.
    pub fn trim(&self, up_to: Seq) -> Result<Seq, TrimError> {
        lock(&self.core).trim(up_to)
    }
}
