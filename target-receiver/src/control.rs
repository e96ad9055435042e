//! What the operator's commands mean on the appliance: finding a job by name or id, turning
//! "latest", "seq:N", "checkpoint:N", "tag:T" or a time into a point, asking the agent for a
//! checkpoint and waiting for it to be catalogued, creating and deleting views. The REST
//! API (`status.rs`, through `web::api::Control`) calls these; they know nothing of HTTP.
//!
//! Must never create a view below the retention floor or above the applied seq, or report a
//! checkpoint before it is in the catalog.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use journal::Seq;
use thiserror::Error;

use crate::history::{Checkpoint, HistoryError};
use crate::jobs::{CheckpointRequestError, Job, Jobs};
use crate::views::{View, ViewError, Views};

/// How long a checkpoint request waits for the agent's record to be applied.
pub const CHECKPOINT_WAIT: Duration = Duration::from_secs(30);

/// Why an operator's request failed.
#[derive(Debug, Error)]
pub enum ControlError {
    /// No such job, checkpoint or view.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The request cannot be met in the job's current state.
    #[error("{0}")]
    Conflict(String),
    /// It did not complete in time.
    #[error("{0}")]
    Timeout(String),
    /// The appliance failed.
    #[error("{0}")]
    Internal(String),
}

impl From<HistoryError> for ControlError {
    fn from(e: HistoryError) -> Self {
        ControlError::Internal(e.to_string())
    }
}

impl From<ViewError> for ControlError {
    fn from(e: ViewError) -> Self {
        match e {
            ViewError::Expired { .. } | ViewError::Future { .. } | ViewError::InResync { .. } => {
                ControlError::Conflict(e.to_string())
            }
            ViewError::UnknownDisk(_) | ViewError::OutOfRange { .. } | ViewError::ReadOnly => {
                ControlError::BadRequest(e.to_string())
            }
            ViewError::History(_) | ViewError::Io { .. } => ControlError::Internal(e.to_string()),
        }
    }
}

/// The job named `query`: an exact name, else an exact id, else a unique id prefix.
pub fn find_job(jobs: &Jobs, query: &str) -> Result<Arc<Job>, ControlError> {
    let all = jobs.all();
    if let Some(job) = all.iter().find(|j| j.meta().info.job_name == query) {
        return Ok(Arc::clone(job));
    }
    let query_lower = query.to_ascii_lowercase();
    let matching: Vec<&Arc<Job>> = all
        .iter()
        .filter(|j| !query.is_empty() && j.id().to_string().starts_with(&query_lower))
        .collect();
    match matching.as_slice() {
        [job] => Ok(Arc::clone(job)),
        [] => Err(ControlError::NotFound(format!(
            "no job named or with id {query:?}"
        ))),
        _ => Err(ControlError::BadRequest(format!(
            "{query:?} matches {} jobs: give more of the id",
            matching.len()
        ))),
    }
}

/// Microseconds since the Unix epoch as RFC 3339 UTC.
pub fn format_time(micros: u64) -> String {
    humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(micros)).to_string()
}

/// Parses an RFC 3339 UTC time (`2026-11-29T21:00:00Z`, fractions allowed) or `@SECONDS`
/// since the Unix epoch, into microseconds.
pub fn parse_time(text: &str) -> Result<u64, ControlError> {
    let bad = || {
        ControlError::BadRequest(format!(
            "{text:?} is not a time: use RFC 3339 in UTC (2026-11-29T21:00:00Z) or @SECONDS since the Unix epoch"
        ))
    };
    let time = match text.strip_prefix('@') {
        Some(seconds) => UNIX_EPOCH + Duration::from_secs(seconds.parse().map_err(|_| bad())?),
        None => humantime::parse_rfc3339_weak(text).map_err(|_| bad())?,
    };
    let since = time.duration_since(UNIX_EPOCH).map_err(|_| bad())?;
    Ok(since.as_micros().min(u128::from(u64::MAX)) as u64)
}

/// The point `at` names in `job`'s history (see the module docs for the forms).
pub fn resolve_point(job: &Job, at: &str) -> Result<Seq, ControlError> {
    let at = at.trim();
    if at == "latest" {
        return Ok(job.applied());
    }
    if let Some(n) = at.strip_prefix("seq:") {
        return n
            .parse()
            .map(Seq)
            .map_err(|_| ControlError::BadRequest(format!("{at:?}: seq:N needs a number")));
    }
    let catalog = job.history.checkpoints()?;
    if let Some(n) = at.strip_prefix("checkpoint:") {
        let seq = n.parse().map(Seq).map_err(|_| {
            ControlError::BadRequest(format!("{at:?}: checkpoint:SEQ needs a number"))
        })?;
        return catalog
            .iter()
            .find(|c| c.seq == seq)
            .map(|c| c.seq)
            .ok_or_else(|| ControlError::NotFound(format!("no checkpoint at seq {seq}")));
    }
    if let Some(tag) = at.strip_prefix("tag:") {
        return catalog
            .iter()
            .rev()
            .find(|c| c.tags.iter().any(|t| t == tag))
            .map(|c| c.seq)
            .ok_or_else(|| ControlError::NotFound(format!("no checkpoint tagged {tag:?}")));
    }
    let micros = parse_time(at)?;
    catalog
        .iter()
        .rev()
        .find(|c| c.timestamp.0 <= micros)
        .map(|c| c.seq)
        .ok_or_else(|| {
            ControlError::Conflict(format!(
                "no kept point at or before {}: the oldest is {}",
                format_time(micros),
                catalog
                    .first()
                    .map_or("none".to_owned(), |c| format_time(c.timestamp.0))
            ))
        })
}

/// Asks `job`'s agent for a checkpoint and waits until it is in the catalog.
pub async fn create_checkpoint(
    job: Arc<Job>,
    tags: Vec<String>,
    app_consistent: bool,
) -> Result<Checkpoint, ControlError> {
    let mark = journal::mark::CheckpointMark {
        request_id: 0,
        app_consistent,
        tags: tags.clone(),
    };
    mark.check()
        .map_err(|e| ControlError::BadRequest(e.to_string()))?;
    let request_id = job
        .request_checkpoint(tags, app_consistent)
        .map_err(|e| match e {
            CheckpointRequestError::NotConnected | CheckpointRequestError::Inconsistent => {
                ControlError::Conflict(e.to_string())
            }
            CheckpointRequestError::Busy => ControlError::Timeout(e.to_string()),
        })?;
    let deadline = tokio::time::Instant::now() + CHECKPOINT_WAIT;
    loop {
        let found = {
            let job = Arc::clone(&job);
            tokio::task::spawn_blocking(move || -> Result<Option<Checkpoint>, HistoryError> {
                // The newest few checkpoints: the answer lands after the request.
                Ok(job
                    .history
                    .checkpoints()?
                    .into_iter()
                    .rev()
                    .take(64)
                    .find(|c| c.request_id == request_id))
            })
            .await
            .map_err(|e| ControlError::Internal(e.to_string()))??
        };
        if let Some(checkpoint) = found {
            return Ok(checkpoint);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ControlError::Timeout(format!(
                "the agent's checkpoint was not applied within {}s (it is recorded when it arrives)",
                CHECKPOINT_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates a view of `job` at `at`.
pub fn create_view(
    views: &Views,
    job: &Arc<Job>,
    at: &str,
    writable: bool,
) -> Result<Arc<View>, ControlError> {
    let seq = resolve_point(job, at)?;
    Ok(views.create(job, seq, writable)?)
}

/// The time of point `seq`: the checkpoint's there, when one is.
pub fn point_time(job: &Job, seq: Seq) -> Option<String> {
    job.history
        .checkpoint_at_or_before(seq)
        .ok()
        .flatten()
        .filter(|c| c.seq == seq)
        .map(|c| format_time(c.timestamp.0))
}

/// Now, in microseconds since the Unix epoch (the appliance's clock).
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros().min(u128::from(u64::MAX)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_and_format() {
        assert_eq!(parse_time("@1700000000").unwrap(), 1_700_000_000_000_000);
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z").unwrap(),
            1_700_000_000_000_000
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:20.5Z").unwrap(),
            1_700_000_000_500_000
        );
        assert_eq!(
            format_time(1_700_000_000_000_001),
            "2023-11-14T22:13:20.000001Z"
        );
        for bad in ["", "yesterday", "@x", "2023-13-01T00:00:00Z"] {
            assert!(parse_time(bad).is_err(), "{bad:?}");
        }
    }
}
