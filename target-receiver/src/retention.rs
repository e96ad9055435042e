//! Retention: how far back a job's history reaches, and what it costs.
//!
//! A pass ([`retention_pass`]) measures time on the agent's clock, from the job's newest
//! checkpoint (so a long disconnection does not expire history nobody replaced):
//! - points older than the window go: the floor rises to the newest checkpoint older than the
//!   window's start, and the history store's compaction drops every before-image with a seq at
//!   or below it; catalog entries below the floor go too;
//! - older checkpoints are thinned in the catalog: past `hourly_after`, one automatic
//!   checkpoint per hour is kept; past `daily_after`, one per day; tagged checkpoints stay for
//!   as long as the window covers them;
//! - a history larger than `history_bytes_max` is reported (a warning and a metric), never
//!   cut: the window is a promise.
//!
//! Must never raise the floor above a lease (a view's point) or into the window.

use std::time::Duration;

use journal::Seq;
use thiserror::Error;

use crate::history::{Checkpoint, CheckpointKind, HistoryError};
use crate::jobs::Job;

/// Longest window an operator may ask for.
pub const WINDOW_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// How much history a job keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Every point this recent (agent clock, from the newest checkpoint) stays readable.
    pub window: Duration,
    /// Automatic checkpoints older than this are thinned to one per hour.
    pub hourly_after: Duration,
    /// Automatic checkpoints older than this are thinned to one per day.
    pub daily_after: Duration,
    /// History above this size is reported (0: no bound).
    pub history_bytes_max: u64,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(24 * 3600),
            hourly_after: Duration::from_secs(3600),
            daily_after: Duration::from_secs(7 * 24 * 3600),
            history_bytes_max: 0,
        }
    }
}

impl RetentionPolicy {
    /// Checks the policy's rules.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.window.is_zero() || self.window > WINDOW_MAX {
            return Err("the history window must be between 1 s and 30 days");
        }
        if self.hourly_after > self.daily_after {
            return Err("hourly thinning must start before daily thinning");
        }
        Ok(())
    }
}

/// Why a pass failed.
#[derive(Debug, Error)]
pub enum RetentionError {
    /// The history store failed.
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// What a pass did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// The floor after the pass.
    pub floor: Seq,
    /// Whether the floor rose.
    pub floor_raised: bool,
    /// Checkpoints removed from the catalog.
    pub checkpoints_removed: usize,
    /// Checkpoints left.
    pub checkpoints: usize,
    /// The oldest checkpoint left, if any.
    pub oldest: Option<Checkpoint>,
    /// History bytes (RocksDB's estimate).
    pub history_bytes: u64,
    /// Whether the history is above `history_bytes_max`.
    pub over_bound: bool,
}

/// One retention pass over `job`; `lease` is the lowest point a view holds. Blocking.
pub fn retention_pass(
    job: &Job,
    policy: &RetentionPolicy,
    lease: Option<Seq>,
) -> Result<RetentionOutcome, RetentionError> {
    let history = &job.history;
    let catalog = history.checkpoints()?;
    let mut outcome = RetentionOutcome {
        floor: history.floor(),
        ..RetentionOutcome::default()
    };
    let Some(newest) = catalog.last() else {
        outcome.history_bytes = history.stats()?.bytes;
        return Ok(outcome);
    };
    let now = newest.timestamp.0;
    let micros = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
    let window_start = now.saturating_sub(micros(policy.window));

    // The floor: the newest checkpoint older than the window, held below every lease.
    let mut floor = catalog
        .iter()
        .rev()
        .find(|c| c.timestamp.0 < window_start)
        .map_or(Seq::NONE, |c| c.seq);
    if let Some(lease) = lease {
        floor = floor.min(lease);
    }
    if floor > history.floor() {
        history.set_floor(floor)?;
        outcome.floor_raised = true;
    }
    outcome.floor = history.floor();

    // The catalog: below the floor, and thinned.
    let hourly_before = now.saturating_sub(micros(policy.hourly_after));
    let daily_before = now.saturating_sub(micros(policy.daily_after));
    let mut remove = Vec::new();
    let mut last_bucket: Option<(u64, u64)> = None;
    for c in &catalog {
        if c.seq < outcome.floor {
            remove.push(c.seq);
            continue;
        }
        if c.kind == CheckpointKind::Tagged
            || c.timestamp.0 >= hourly_before
            || Some(c.seq) == lease
        {
            continue;
        }
        let bucket = if c.timestamp.0 < daily_before {
            (1, c.timestamp.0 / micros(Duration::from_secs(24 * 3600)))
        } else {
            (0, c.timestamp.0 / micros(Duration::from_secs(3600)))
        };
        if last_bucket == Some(bucket) {
            remove.push(c.seq);
        } else {
            last_bucket = Some(bucket);
        }
    }
    history.delete_checkpoints(&remove)?;
    let removed: std::collections::HashSet<Seq> = remove.iter().copied().collect();
    outcome.checkpoints_removed = remove.len();
    outcome.checkpoints = catalog.len() - remove.len();
    outcome.oldest = catalog.iter().find(|c| !removed.contains(&c.seq)).cloned();
    outcome.history_bytes = history.stats()?.bytes;
    outcome.over_bound =
        policy.history_bytes_max > 0 && outcome.history_bytes > policy.history_bytes_max;
    Ok(outcome)
}
