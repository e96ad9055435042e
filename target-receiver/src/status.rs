//! What the appliance reports about its jobs, computed from their live state on demand: the
//! REST API's job statuses (the web crate's DTOs) and the Prometheus metrics. Rendering only
//! reads atomics and short locks; nothing here blocks.

use std::sync::Arc;

use journal::Seq;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use web::api::{
    ApiError, BoxFuture, CheckpointStatus, Control, CreateCheckpoint, CreateView, DiskStatus,
    JobStatus, ViewExport, ViewStatus,
};

use crate::control::{self, ControlError};
use crate::history::{Checkpoint, CheckpointKind};
use crate::jobs::{mode_name, Job, Jobs};
use crate::views::{self, View, Views};

/// The job's state as the operator sees it: while the agent is connected, the state it
/// reports (`syncing`, `replicating`, `ahead`, `resyncing`, `paused`, `error`); otherwise
/// what the appliance knows (`paused`, `disconnected`, `refused`, `waiting`), or `error`
/// when the applier is stopped on one.
pub fn job_state(job: &Job) -> (&'static str, Option<String>) {
    let link = job.link();
    if let Some(error) = job.apply_error() {
        return ("error", Some(format!("applier: {error}")));
    }
    if link.connected {
        return match &link.agent_status {
            Some(a) => (
                a.state.name(),
                (!a.reason.is_empty()).then(|| a.reason.clone()),
            ),
            None => ("replicating", None),
        };
    }
    if job.control.borrow().paused {
        return (
            "paused",
            Some("paused by an operator; the agent is not connected".into()),
        );
    }
    match link.last_error {
        Some(e) if e.starts_with("refused") => ("refused", Some(e)),
        Some(e) => ("disconnected", Some(e)),
        None if link.heartbeat.is_some() => ("disconnected", None),
        None => (
            "waiting",
            Some("the agent has not connected since the appliance started".into()),
        ),
    }
}

/// Every state [`job_state`] can report, for the `cdp_job_state` metric.
pub const JOB_STATES: [&str; 9] = [
    "syncing",
    "replicating",
    "ahead",
    "resyncing",
    "paused",
    "disconnected",
    "refused",
    "error",
    "waiting",
];

/// A job's status for the REST API.
pub fn job_status(job: &Job) -> JobStatus {
    let meta = job.meta();
    let link = job.link();
    let (state, state_reason) = job_state(job);
    let landed = job.landing.durable_seq();
    let applied = job.applied();
    let heartbeat = link.heartbeat.as_ref();
    let retention = job.retention();
    let oldest = retention.as_ref().and_then(|r| r.oldest.as_ref());
    JobStatus {
        id: meta.info.job.to_string(),
        name: meta.info.job_name.clone(),
        agent: meta.agent.clone(),
        state: state.to_owned(),
        state_reason,
        mode: mode_name(meta.info.mode).to_owned(),
        generation: meta.info.generation.0,
        connected: link.connected,
        rpo_seconds: heartbeat.map_or(0.0, |(h, _)| h.rpo_micros as f64 / 1e6),
        lag_records: heartbeat.map_or(0, |(h, _)| h.lag_records),
        lag_bytes: heartbeat.map_or(0, |(h, _)| h.lag_bytes),
        agent_head_seq: heartbeat.map_or(landed.0, |(h, _)| h.head_seq.0),
        landing_durable_seq: landed.0,
        applied_seq: applied.0,
        apply_lag_records: landed.0.saturating_sub(applied.0),
        last_heartbeat_age_seconds: heartbeat.map(|(_, at)| at.elapsed().as_secs_f64()),
        history_oldest_seq: oldest.map(|c| c.seq.0),
        history_oldest_time: oldest.map(|c| crate::control::format_time(c.timestamp.0)),
        checkpoints: retention.as_ref().map_or(0, |r| r.checkpoints as u64),
        consistent: job.consistent(),
        resync_done_bytes: link
            .agent_status
            .as_ref()
            .map_or(0, |a| a.resync_done_bytes),
        resync_total_bytes: link
            .agent_status
            .as_ref()
            .map_or(0, |a| a.resync_total_bytes),
        dirty_bytes: link.agent_status.as_ref().map_or(0, |a| a.dirty_bytes),
        paused: job.control.borrow().paused,
        throttle_bytes_per_second: job.control.borrow().throttle_bytes_per_second,
        disks: job
            .replicas
            .values()
            .map(|r| DiskStatus {
                id: r.info.disk.0,
                name: r.info.name.clone(),
                size_bytes: r.info.size_bytes,
                replica_path: r.path.display().to_string(),
            })
            .collect(),
    }
}

/// Where the appliance serves recovery views over NBD.
#[derive(Debug, Clone)]
pub struct ViewServer {
    /// The NBD server's shared state (its export table).
    pub context: Arc<nbd_server::ServerContext>,
    /// The address clients dial.
    pub addr: std::net::SocketAddr,
}

/// The REST API's view of the appliance.
#[derive(Debug)]
pub struct ApplianceControl {
    jobs: Arc<Jobs>,
    views: Arc<Views>,
    view_server: Option<ViewServer>,
}

impl ApplianceControl {
    /// The control of `jobs` and `views`, serving views on `view_server` when there is one.
    pub fn new(jobs: Arc<Jobs>, views: Arc<Views>, view_server: Option<ViewServer>) -> Self {
        Self {
            jobs,
            views,
            view_server,
        }
    }

    fn view_status(&self, view: &View) -> ViewStatus {
        let job = self.jobs.get(view.job);
        ViewStatus {
            id: view.id,
            job: view.job.to_string(),
            job_name: job
                .as_ref()
                .map_or_else(String::new, |j| j.meta().info.job_name.clone()),
            seq: view.at.0,
            time: job.as_ref().and_then(|j| control::point_time(j, view.at)),
            writable: view.writable(),
            exports: view
                .disks
                .values()
                .map(|d| {
                    let export = views::export_name(view.id, &d.name);
                    ViewExport {
                        disk: d.name.clone(),
                        uri: self
                            .view_server
                            .as_ref()
                            .map_or_else(String::new, |s| format!("nbd://{}/{export}", s.addr)),
                        export,
                        size_bytes: d.size_bytes(),
                    }
                })
                .collect(),
        }
    }
}

fn api_error(e: ControlError) -> ApiError {
    match e {
        ControlError::NotFound(m) => ApiError::NotFound(m),
        ControlError::BadRequest(m) => ApiError::BadRequest(m),
        ControlError::Conflict(m) => ApiError::Conflict(m),
        ControlError::Timeout(m) => ApiError::Unavailable(m),
        ControlError::Internal(m) => ApiError::Internal(m),
    }
}

fn checkpoint_status(c: &Checkpoint) -> CheckpointStatus {
    CheckpointStatus {
        seq: c.seq.0,
        time: control::format_time(c.timestamp.0),
        unix_micros: c.timestamp.0,
        kind: match c.kind {
            CheckpointKind::Auto => "auto",
            CheckpointKind::Tagged => "tagged",
        }
        .to_owned(),
        app_consistent: c.app_consistent,
        tags: c.tags.clone(),
    }
}

impl Control for ApplianceControl {
    fn jobs(&self) -> Vec<JobStatus> {
        self.jobs.all().iter().map(|job| job_status(job)).collect()
    }

    fn checkpoints(&self, job: &str) -> Result<Vec<CheckpointStatus>, ApiError> {
        let job = control::find_job(&self.jobs, job).map_err(api_error)?;
        let catalog = job.history.checkpoints().map_err(|e| api_error(e.into()))?;
        Ok(catalog.iter().map(checkpoint_status).collect())
    }

    fn create_checkpoint(
        &self,
        job: &str,
        request: CreateCheckpoint,
    ) -> BoxFuture<'_, Result<CheckpointStatus, ApiError>> {
        let job = control::find_job(&self.jobs, job);
        Box::pin(async move {
            let job = job.map_err(api_error)?;
            let checkpoint = control::create_checkpoint(job, request.tags, request.app_consistent)
                .await
                .map_err(api_error)?;
            Ok(checkpoint_status(&checkpoint))
        })
    }

    fn views(&self) -> Vec<ViewStatus> {
        self.views
            .list()
            .iter()
            .map(|v| self.view_status(v))
            .collect()
    }

    fn create_view(&self, request: CreateView) -> Result<ViewStatus, ApiError> {
        let server = self.view_server.as_ref().ok_or_else(|| {
            ApiError::Conflict(
                "this appliance serves no views: start it with --view-listen ADDR".into(),
            )
        })?;
        let job = control::find_job(&self.jobs, &request.job).map_err(api_error)?;
        let view = control::create_view(&self.views, &job, &request.at, request.writable)
            .map_err(api_error)?;
        if let Err(e) = views::add_exports(&server.context, &view) {
            views::remove_exports(&server.context, &view);
            self.views.delete(view.id);
            return Err(ApiError::Internal(e.to_string()));
        }
        tracing::info!(view = view.id, job = %view.job, seq = %view.at, writable = view.writable(), "view created");
        Ok(self.view_status(&view))
    }

    fn delete_view(&self, id: u64) -> Result<(), ApiError> {
        let view = self
            .views
            .delete(id)
            .ok_or_else(|| ApiError::NotFound(format!("no view {id}")))?;
        if let Some(server) = &self.view_server {
            views::remove_exports(&server.context, &view);
        }
        tracing::info!(view = id, "view deleted");
        Ok(())
    }

    fn set_link(&self, job: &str, change: web::api::LinkChange) -> Result<JobStatus, ApiError> {
        // One change at a time, so that two at once (a pause and a throttle) cannot each
        // keep the other's field as it was before and lose it. Held only around a small
        // file write; it guards no data, so a poisoned lock is as good as a clean one.
        static CHANGING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let job = control::find_job(&self.jobs, job).map_err(api_error)?;
        let _changing = CHANGING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = *job.control.borrow();
        let wanted = journal::wire::Control {
            paused: change.paused.unwrap_or(current.paused),
            throttle_bytes_per_second: change
                .throttle_bytes_per_second
                .unwrap_or(current.throttle_bytes_per_second),
        };
        job.set_control(wanted)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        tracing::info!(
            job = %job.id(),
            paused = wanted.paused,
            throttle_bytes_per_second = wanted.throttle_bytes_per_second,
            "link settings changed"
        );
        Ok(job_status(&job))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JobLabel {
    job: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JobStateLabel {
    job: String,
    state: String,
}

/// The appliance's metrics, one registry per appliance.
#[derive(Debug)]
pub struct ApplianceMetrics {
    registry: Registry,
    landing_durable_seq: Family<JobLabel, Gauge>,
    applied_seq: Family<JobLabel, Gauge>,
    apply_lag_records: Family<JobLabel, Gauge>,
    rpo_seconds: Family<JobLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    heartbeat_age_seconds: Family<JobLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    landed_bytes: Family<JobLabel, Counter>,
    corrupt_records: Family<JobLabel, Counter>,
    job_state: Family<JobStateLabel, Gauge>,
    connected: Family<JobLabel, Gauge>,
    history_oldest_seconds: Family<JobLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    history_bytes: Family<JobLabel, Gauge>,
    checkpoints: Family<JobLabel, Gauge>,
    history_over_bound: Family<JobLabel, Gauge>,
    consistent: Family<JobLabel, Gauge>,
    resync_remaining_bytes: Family<JobLabel, Gauge>,
    dirty_bytes: Family<JobLabel, Gauge>,
}

impl Default for ApplianceMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ApplianceMetrics {
    /// Every metric registered, no sample yet.
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            landing_durable_seq: Family::default(),
            applied_seq: Family::default(),
            apply_lag_records: Family::default(),
            rpo_seconds: Family::default(),
            heartbeat_age_seconds: Family::default(),
            landed_bytes: Family::default(),
            corrupt_records: Family::default(),
            job_state: Family::default(),
            connected: Family::default(),
            history_oldest_seconds: Family::default(),
            history_bytes: Family::default(),
            checkpoints: Family::default(),
            history_over_bound: Family::default(),
            consistent: Family::default(),
            resync_remaining_bytes: Family::default(),
            dirty_bytes: Family::default(),
        };
        let r = &mut m.registry;
        r.register(
            "cdp_landing_durable_seq",
            "Last seq durable in the job's landing journal",
            m.landing_durable_seq.clone(),
        );
        r.register(
            "cdp_applied_seq",
            "Last seq applied to the job's replica disks",
            m.applied_seq.clone(),
        );
        r.register(
            "cdp_apply_lag_records",
            "Records landed but not yet applied",
            m.apply_lag_records.clone(),
        );
        r.register(
            "cdp_rpo_seconds",
            "Age of the oldest write not yet durable at the appliance, as last reported by the agent (its clock)",
            m.rpo_seconds.clone(),
        );
        r.register(
            "cdp_agent_heartbeat_age_seconds",
            "Seconds since the agent's last heartbeat (on the appliance's clock)",
            m.heartbeat_age_seconds.clone(),
        );
        r.register(
            "cdp_landed_bytes",
            "Stored record bytes landed since the appliance started",
            m.landed_bytes.clone(),
        );
        r.register(
            "cdp_corrupt_records",
            "Records refused for a failed checksum, framing or seq (then fetched again)",
            m.corrupt_records.clone(),
        );
        r.register(
            "cdp_job_state",
            "1 for the job's current state, 0 for the others",
            m.job_state.clone(),
        );
        r.register(
            "cdp_job_connected",
            "1 while the job's agent is connected",
            m.connected.clone(),
        );
        r.register(
            "cdp_history_oldest_seconds",
            "Age of the oldest recoverable checkpoint (appliance clock minus the agent's timestamp)",
            m.history_oldest_seconds.clone(),
        );
        r.register(
            "cdp_history_bytes",
            "Bytes of the job's history store (RocksDB estimate)",
            m.history_bytes.clone(),
        );
        r.register(
            "cdp_checkpoints",
            "Checkpoints in the job's catalog",
            m.checkpoints.clone(),
        );
        r.register(
            "cdp_history_over_bound",
            "1 while the job's history is larger than --history-bytes-max (nothing is removed for it)",
            m.history_over_bound.clone(),
        );
        r.register(
            "cdp_replica_consistent",
            "1 while the job's replicas are a consistent image (0 during a resync: no recovery point)",
            m.consistent.clone(),
        );
        r.register(
            "cdp_resync_remaining_bytes",
            "Bytes of dirty regions the current initial sync or resync has still to compare (agent's report)",
            m.resync_remaining_bytes.clone(),
        );
        r.register(
            "cdp_dirty_bytes",
            "Bytes of regions the agent has marked dirty, to be resynced (agent's report)",
            m.dirty_bytes.clone(),
        );
        m
    }

    /// Samples every job and renders the exposition text.
    pub fn render(&self, jobs: &Jobs) -> String {
        for job in jobs.all() {
            let label = JobLabel {
                job: job.id().to_string(),
            };
            let status = job_status(&job);
            let landed = Seq(status.landing_durable_seq);
            self.landing_durable_seq
                .get_or_create(&label)
                .set(landed.0 as i64);
            self.applied_seq
                .get_or_create(&label)
                .set(status.applied_seq as i64);
            self.apply_lag_records
                .get_or_create(&label)
                .set(status.apply_lag_records as i64);
            self.rpo_seconds
                .get_or_create(&label)
                .set(status.rpo_seconds);
            if let Some(age) = status.last_heartbeat_age_seconds {
                self.heartbeat_age_seconds.get_or_create(&label).set(age);
            }
            set_counter(
                &self.landed_bytes.get_or_create(&label),
                job.landed_bytes.load(std::sync::atomic::Ordering::Relaxed),
            );
            set_counter(
                &self.corrupt_records.get_or_create(&label),
                job.corrupt_records
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
            for state in JOB_STATES {
                let label = JobStateLabel {
                    job: label.job.clone(),
                    state: state.to_owned(),
                };
                self.job_state
                    .get_or_create(&label)
                    .set(i64::from(status.state == state));
            }
            self.connected
                .get_or_create(&label)
                .set(i64::from(status.connected));
            self.consistent
                .get_or_create(&label)
                .set(i64::from(status.consistent));
            self.resync_remaining_bytes.get_or_create(&label).set(
                i64::try_from(
                    status
                        .resync_total_bytes
                        .saturating_sub(status.resync_done_bytes),
                )
                .unwrap_or(i64::MAX),
            );
            self.dirty_bytes
                .get_or_create(&label)
                .set(i64::try_from(status.dirty_bytes).unwrap_or(i64::MAX));
            if let Some(r) = job.retention() {
                if let Some(oldest) = &r.oldest {
                    let age = crate::control::now_micros().saturating_sub(oldest.timestamp.0)
                        as f64
                        / 1e6;
                    self.history_oldest_seconds.get_or_create(&label).set(age);
                }
                self.history_bytes
                    .get_or_create(&label)
                    .set(i64::try_from(r.history_bytes).unwrap_or(i64::MAX));
                self.checkpoints
                    .get_or_create(&label)
                    .set(r.checkpoints as i64);
                self.history_over_bound
                    .get_or_create(&label)
                    .set(i64::from(r.over_bound));
            }
        }
        let mut text = String::new();
        // Encoding into a String cannot fail: fmt::Write for String never errors.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Raises a counter to `total` (counters only go up; the job's own totals are the truth).
fn set_counter(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}
