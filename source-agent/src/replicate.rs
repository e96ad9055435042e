//! Shipping the job's journal to the paired appliance: a thin tokio/quinn driver around the
//! sans-IO [`Shipper`] (`journal::ship`). It connects (and reconnects, with back-off), opens
//! the job's stream, keeps the journal durable as it grows (the shipper ships only durable
//! records), reads the records the shipper asks for, sends its frames, feeds it the
//! appliance's acks, and trims the journal below what the appliance acknowledged.
//!
//! [`Replication`] is the handle the rest of the agent holds: the `journal` filter tells it
//! about appends and, in sync mode, waits on it for the appliance's ack; the metrics read its
//! status.
//!
//! Must never: ship a record the local journal has not made durable, trim the journal at or
//! above the appliance's acknowledged seq, or let an outage of the appliance fail a write
//! (async mode) or stall it beyond `sync_ack_timeout_ms` (sync mode).

use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use journal::ship::{
    JobInfo, ReadDone, ReadRequest, ShipError, Shipper, ShipperConfig, ShipperState,
};
use journal::wire::{AgentStatus, Frame, JobState, Mode};
use journal::{ReadError, Seq, SharedJournal, SyncError, Timestamp};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use transport::{Client, Fault, FrameError, FrameReceiver, FrameSender};

/// How often heartbeats are considered and the status is refreshed.
pub const TICK_INTERVAL: Duration = Duration::from_millis(100);
/// First wait before reconnecting; doubles up to [`RECONNECT_DELAY_MAX`].
pub const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between connection attempts.
pub const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(5);
/// Wait before asking again after the appliance refused the job (an operator must act).
pub const REFUSED_RETRY_DELAY: Duration = Duration::from_secs(30);
/// A resync starts only after the link has been streaming this long (and the backlog is
/// under a quarter of its bound): hysteresis, so a flapping link does not flap the job.
pub const RESYNC_AFTER_STREAMING: Duration = Duration::from_secs(2);
/// How often the agent sends its job status to the appliance, besides every change.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// The job's replication state, as reported in metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Dialling the appliance.
    Connecting,
    /// Streaming records.
    Replicating,
    /// The last attempt failed; waiting to try again.
    Disconnected,
    /// The appliance refused the job; an operator must act (the reason is in the status).
    Refused,
}

impl LinkState {
    /// Every state, for the `cdp_job_state` metric.
    pub const ALL: [LinkState; 4] = [
        LinkState::Connecting,
        LinkState::Replicating,
        LinkState::Disconnected,
        LinkState::Refused,
    ];

    /// The state's name in metrics and the API.
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Replicating => "streaming",
            LinkState::Disconnected => "disconnected",
            LinkState::Refused => "refused",
        }
    }
}

/// What the shipper reports.
#[derive(Clone, Debug)]
pub struct ShipStatus {
    /// Link state.
    pub state: LinkState,
    /// Why the last connection ended, when it did not end cleanly.
    pub reason: Option<String>,
    /// Highest seq the appliance acknowledged durable.
    pub acked: Seq,
    /// Oldest unacknowledged record's seq and timestamp, when known (for the RPO).
    pub oldest_unacked: Option<(Seq, Timestamp)>,
    /// Stored bytes in flight.
    pub lag_bytes: u64,
    /// Stored record bytes shipped, resends included, since the agent started.
    pub shipped_bytes: u64,
    /// UDP bytes sent on replication connections since the agent started.
    pub wire_bytes: u64,
    /// The job's state (`cdp_job_state`), and why.
    pub job_state: JobState,
    /// Why the job is in its state (empty when there is nothing to say).
    pub job_reason: String,
    /// The current (re)sync's progress.
    pub resync: crate::resync::Progress,
    /// Bytes of regions marked dirty.
    pub dirty_bytes: u64,
    /// Unacknowledged journal bytes, as the backlog bound counts them.
    pub backlog_bytes: u64,
}

/// The replication handle shared by the driver, the filter chain and the metrics.
#[derive(Debug)]
pub struct Replication {
    mode: Mode,
    sync_ack_timeout: Duration,
    /// The appliance's acknowledged seq. Invariant: never decreases.
    acked: watch::Sender<Seq>,
    /// Signalled after every append, so the driver syncs and ships at once.
    appended: Notify,
    /// Sync mode fell back to async after an ack timed out; cleared when the appliance
    /// catches up.
    degraded: AtomicBool,
    /// The agent's own bandwidth limit in bytes per second (0: none); changeable at run time
    /// (`SIGHUP` re-reads the configuration file).
    agent_throttle: std::sync::atomic::AtomicU64,
    status: Mutex<ShipStatus>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain status data: a panic elsewhere does not make it inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent's clock in microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Replication {
    /// A handle for a job in `mode`; `acked` is where the appliance stood last (nothing known
    /// yet: `Seq::NONE`).
    pub fn new(mode: Mode, sync_ack_timeout: Duration) -> Self {
        let (acked, _) = watch::channel(Seq::NONE);
        Self {
            mode,
            sync_ack_timeout,
            acked,
            appended: Notify::new(),
            degraded: AtomicBool::new(false),
            agent_throttle: std::sync::atomic::AtomicU64::new(0),
            status: Mutex::new(ShipStatus {
                state: LinkState::Connecting,
                reason: None,
                acked: Seq::NONE,
                oldest_unacked: None,
                lag_bytes: 0,
                shipped_bytes: 0,
                wire_bytes: 0,
                job_state: JobState::Replicating,
                job_reason: String::new(),
                resync: crate::resync::Progress::default(),
                dirty_bytes: 0,
                backlog_bytes: 0,
            }),
        }
    }

    /// The replication mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A record was appended: wake the driver.
    pub fn notify_appended(&self) {
        self.appended.notify_one();
    }

    /// In sync mode, waits until the appliance holds `seq` durably, or until the ack
    /// timeout, after which the job runs degraded (async) until the appliance catches up.
    /// Returns at once in async mode or while degraded.
    pub async fn wait_acked(&self, seq: Seq) {
        if self.mode != Mode::Sync || self.degraded.load(Ordering::Acquire) {
            return;
        }
        let mut acked = self.acked.subscribe();
        let waited =
            tokio::time::timeout(self.sync_ack_timeout, acked.wait_for(|a| *a >= seq)).await;
        if waited.is_err() && !self.degraded.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                %seq,
                timeout_ms = self.sync_ack_timeout.as_millis() as u64,
                "sync replication: no ack from the appliance in time; acknowledging writes after the local journal until it catches up"
            );
        }
    }

    /// Sets the agent's own bandwidth limit (0: none); the driver applies it within a tick.
    pub fn set_agent_throttle(&self, bytes_per_second: u64) {
        self.agent_throttle
            .store(bytes_per_second, Ordering::Release);
    }

    /// The agent's own bandwidth limit (0: none).
    pub fn agent_throttle(&self) -> u64 {
        self.agent_throttle.load(Ordering::Acquire)
    }

    /// Sets the job's state before the driver runs (so the first scrape already shows a
    /// pending sync); the driver keeps it current from then on.
    pub fn set_job_state(&self, state: JobState, reason: &str) {
        self.update(|s| {
            s.job_state = state;
            s.job_reason = reason.to_owned();
        });
    }

    /// Whether sync mode has fallen back to async.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// A copy of the status.
    pub fn status(&self) -> ShipStatus {
        lock(&self.status).clone()
    }

    /// The RPO in seconds at `now_micros`: age of the oldest write the appliance has not
    /// acknowledged, zero when everything is acknowledged.
    pub fn rpo_seconds(&self, now_micros: u64, head: Seq) -> f64 {
        let status = lock(&self.status);
        if head <= status.acked {
            return 0.0;
        }
        status.oldest_unacked.map_or(0.0, |(_, t)| {
            now_micros.saturating_sub(t.unix_micros()) as f64 / 1e6
        })
    }

    fn update(&self, f: impl FnOnce(&mut ShipStatus)) {
        f(&mut lock(&self.status));
    }

    fn publish_acked(&self, acked: Seq, head: Seq) {
        self.acked.send_if_modified(|a| {
            if acked > *a {
                *a = acked;
                true
            } else {
                false
            }
        });
        if acked >= head && self.degraded.swap(false, Ordering::AcqRel) {
            tracing::info!(%acked, "sync replication: the appliance caught up; writes wait for its ack again");
        }
    }
}

/// Longest the consistency hook may run (each of `freeze` and `thaw`).
pub const CHECKPOINT_HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything the driver needs.
#[derive(Debug)]
pub struct ShipperSetup {
    /// The job as announced in every hello.
    pub job: JobInfo,
    /// The appliance.
    pub target: SocketAddr,
    /// The QUIC endpoint (holding the agent's identity and the pinned appliance).
    pub client: Client,
    /// Window and batch bounds.
    pub config: ShipperConfig,
    /// Fault injection (tests only).
    pub fault: Option<Fault>,
    /// Run as `HOOK freeze` before and `HOOK thaw` after an application-consistent
    /// checkpoint (for example a guest agent's fsfreeze).
    pub checkpoint_hook: Option<std::path::PathBuf>,
    /// The backing disks' synced watermark: the journal is never trimmed above it.
    pub backing: Option<Arc<crate::redo::BackingWatermark>>,
    /// Tracking and resync (absent only in tests of the bare shipper).
    pub resync: Option<crate::resync::Resync>,
    /// Unacknowledged journal bytes past which the job goes `ahead`.
    pub backlog_bytes_max: u64,
    /// Age of the oldest unacknowledged write past which the job goes `ahead`.
    pub backlog_age_max: Duration,
}

/// Unacknowledged journal bytes, from samples of (head seq, stored bytes appended so far).
#[derive(Debug, Default)]
struct Backlog {
    samples: VecDeque<(Seq, u64)>,
}

impl Backlog {
    /// Records that the journal's head was `head` when `stored` bytes had been appended.
    fn sample(&mut self, head: Seq, stored: u64) {
        if self.samples.back().is_none_or(|&(h, _)| h < head) {
            self.samples.push_back((head, stored));
        }
    }

    /// Bytes appended after `acked` (counting from the newest sample at or below it; what
    /// was appended before the agent started is not counted).
    fn unacked(&mut self, acked: Seq, stored_now: u64) -> u64 {
        while self.samples.len() > 1 && self.samples[1].0 <= acked {
            self.samples.pop_front();
        }
        self.samples
            .front()
            .map_or(0, |&(_, stored)| stored_now.saturating_sub(stored))
    }
}

/// A token bucket over stored record bytes.
#[derive(Debug)]
struct Throttle {
    rate: u64,
    /// Bytes that may go now; negative: owed.
    tokens: f64,
    at: tokio::time::Instant,
}

impl Throttle {
    fn new() -> Self {
        Self {
            rate: 0,
            tokens: 0.0,
            at: tokio::time::Instant::now(),
        }
    }

    fn set_rate(&mut self, rate: u64) {
        if rate != self.rate {
            self.rate = rate;
            self.tokens = 0.0;
            self.at = tokio::time::Instant::now();
        }
    }

    /// Takes `bytes` (may be negative: a refund) from the bucket.
    fn debit(&mut self, bytes: f64) {
        if self.rate != 0 {
            self.tokens -= bytes;
        }
    }

    /// When `bytes` may be sent (now, or later); takes them from the bucket when now.
    fn admit(&mut self, bytes: usize) -> Option<tokio::time::Instant> {
        if self.rate == 0 {
            return None;
        }
        let now = tokio::time::Instant::now();
        let rate = self.rate as f64;
        // Bursts of at most a quarter second.
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(rate / 4.0);
        self.at = now;
        if self.tokens >= 0.0 {
            self.tokens -= bytes as f64;
            None
        } else {
            Some(now + Duration::from_secs_f64(-self.tokens / rate))
        }
    }
}

/// What a job's driver keeps across connections.
#[derive(Debug)]
struct Job {
    resync: Option<crate::resync::Resync>,
    backlog: Backlog,
    backlog_bytes_max: u64,
    backlog_age_max: Duration,
    /// The appliance's settings, as last received.
    control: journal::wire::Control,
    throttle: Throttle,
    /// Why the job went to tracking, while it tracks.
    tracking_reason: Option<String>,
    /// The status last sent to the appliance, and when.
    sent_status: Option<(AgentStatus, tokio::time::Instant)>,
}

impl Job {
    fn tracking(&self) -> bool {
        self.tracking_reason.is_some()
    }

    /// Measures the backlog; past a bound, switches to tracking.
    fn check_backlog(&mut self, journal: &SharedJournal, replication: &Replication, acked: Seq) {
        let stored = journal.stats().stored_bytes;
        self.backlog.sample(journal.head_seq(), stored);
        let bytes = self.backlog.unacked(acked, stored);
        let status = replication.status();
        let age = status
            .oldest_unacked
            .filter(|_| journal.head_seq() > acked)
            .map_or(Duration::ZERO, |(_, t)| {
                Duration::from_micros(now_micros().saturating_sub(t.unix_micros()))
            });
        replication.update(|s| s.backlog_bytes = bytes);
        if self.tracking() {
            return;
        }
        let Some(resync) = self.resync.as_mut() else {
            return;
        };
        let reason = if bytes > self.backlog_bytes_max {
            format!(
                "{bytes} unacknowledged journal bytes passed the bound of {}",
                self.backlog_bytes_max
            )
        } else if age > self.backlog_age_max {
            format!(
                "the oldest unacknowledged write is {} s old, past the bound of {} s",
                age.as_secs(),
                self.backlog_age_max.as_secs()
            )
        } else {
            return;
        };
        let last = resync.tracker().start_tracking();
        resync.note_tracking();
        tracing::warn!(%reason, journalled_up_to = %last, "job goes ahead: writes are no longer journalled, their regions are marked dirty and will be resynced");
        self.tracking_reason = Some(reason);
    }

    /// The job's state and reason now.
    fn state(&self, link: LinkState, link_reason: Option<&str>) -> (JobState, String) {
        if link == LinkState::Refused {
            return (JobState::Error, link_reason.unwrap_or("refused").to_owned());
        }
        if self.control.paused {
            let mut reason = "paused by an operator".to_owned();
            if self.tracking() {
                reason.push_str("; tracking dirty regions");
            }
            return (JobState::Paused, reason);
        }
        if let Some(reason) = &self.tracking_reason {
            return (JobState::Ahead, reason.clone());
        }
        match &self.resync {
            Some(r) if r.wanted() => {
                let state = if r.reason() == journal::resync::ResyncReason::Initial {
                    JobState::Syncing
                } else {
                    JobState::Resyncing
                };
                let mut reason = r.reason().name().to_owned();
                if !r.running() {
                    reason.push_str("; waiting for the link");
                }
                (state, reason)
            }
            _ => (JobState::Replicating, String::new()),
        }
    }

    /// Publishes the job's state in the status (metrics) and returns it for the appliance.
    fn publish(&self, replication: &Replication) -> AgentStatus {
        let status = replication.status();
        let (state, reason) = self.state(status.state, status.reason.as_deref());
        let progress = self
            .resync
            .as_ref()
            .map(|r| r.progress())
            .unwrap_or_default();
        let dirty = self
            .resync
            .as_ref()
            .map_or(0, |r| r.tracker().map().dirty_bytes());
        if state != status.job_state {
            tracing::info!(state = state.name(), %reason, "job state");
        }
        replication.update(|s| {
            s.job_state = state;
            s.job_reason = reason.clone();
            s.resync = progress;
            s.dirty_bytes = dirty;
        });
        AgentStatus {
            state,
            resync_done_bytes: progress.done_bytes,
            resync_total_bytes: progress.total_bytes,
            dirty_bytes: dirty,
            reason,
        }
    }
}

/// Runs `hook ARG` with a deadline; whether it exited 0.
async fn run_hook(hook: &std::path::Path, arg: &str) -> bool {
    let mut command = tokio::process::Command::new(hook);
    command
        .arg(arg)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    match tokio::time::timeout(CHECKPOINT_HOOK_TIMEOUT, command.status()).await {
        Ok(Ok(status)) if status.success() => true,
        Ok(Ok(status)) => {
            tracing::warn!(hook = %hook.display(), arg, %status, "checkpoint hook failed");
            false
        }
        Ok(Err(e)) => {
            tracing::warn!(hook = %hook.display(), arg, error = %e, "checkpoint hook could not run");
            false
        }
        Err(_) => {
            tracing::warn!(hook = %hook.display(), arg, "checkpoint hook timed out");
            false
        }
    }
}

/// Answers a checkpoint request: the hook's `freeze` (when asked and configured), a
/// `Checkpoint` record in the journal, the hook's `thaw`. The record is marked
/// application-consistent only if `freeze` succeeded.
async fn take_checkpoint(
    journal: &Arc<SharedJournal>,
    replication: &Replication,
    hook: Option<&std::path::Path>,
    request: journal::wire::CheckpointRequest,
) -> Result<Seq, String> {
    let frozen = match (request.app_consistent, hook) {
        (true, Some(hook)) => run_hook(hook, "freeze").await,
        (true, None) => {
            tracing::warn!("an application-consistent checkpoint was asked for, but no checkpoint_hook is configured");
            false
        }
        (false, _) => false,
    };
    let mark = journal::mark::CheckpointMark {
        request_id: request.request_id,
        app_consistent: frozen,
        tags: request.tags,
    }
    .encode()
    .map_err(|e| e.to_string());
    let appended = match mark {
        Ok(mark) => {
            let j = Arc::clone(journal);
            tokio::task::spawn_blocking(move || {
                j.append(journal::Entry {
                    disk: journal::DiskId(0),
                    kind: journal::RecordKind::Checkpoint,
                    offset: 0,
                    length: mark.len() as u32,
                    payload: &mark,
                    timestamp: Timestamp(now_micros()),
                    flags: journal::Flags::NONE,
                })
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        }
        Err(e) => Err(e),
    };
    if let (true, Some(hook)) = (request.app_consistent && hook.is_some(), hook) {
        run_hook(hook, "thaw").await;
    }
    replication.notify_appended();
    appended
}

/// The local endpoint for dialling `target`: any address of the same family.
pub fn client_bind_addr(target: SocketAddr) -> SocketAddr {
    match target {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// How a connection ended.
enum End {
    /// The agent is stopping.
    Stopped,
    /// The appliance refused the job.
    Refused(String),
    /// The connection failed; try again.
    Failed(String),
}

/// Runs the shipper of `journal` until `stop` fires.
pub async fn run_shipper(
    setup: ShipperSetup,
    journal: Arc<SharedJournal>,
    replication: Arc<Replication>,
    mut stop: watch::Receiver<bool>,
) {
    let mut shipper = Shipper::new(
        setup.config,
        setup.job.clone(),
        journal.first_seq(),
        journal.head_seq(),
        journal.durable_seq(),
    );
    let mut job = Job {
        resync: setup.resync,
        backlog: Backlog::default(),
        backlog_bytes_max: setup.backlog_bytes_max,
        backlog_age_max: setup.backlog_age_max,
        control: journal::wire::Control {
            paused: false,
            throttle_bytes_per_second: 0,
        },
        throttle: Throttle::new(),
        tracking_reason: None,
        sent_status: None,
    };
    job.publish(&replication);
    let mut delay = RECONNECT_DELAY_MIN;
    let mut wire_before = 0;
    loop {
        if *stop.borrow() {
            break;
        }
        replication.update(|s| s.state = LinkState::Connecting);
        // A handshake with an appliance that is gone takes its full timeout: the backlog
        // bound is watched meanwhile too.
        let connecting = setup.client.connect(setup.target);
        tokio::pin!(connecting);
        let mut tick = tokio::time::interval(TICK_INTERVAL);
        let connected = loop {
            tokio::select! {
                connected = &mut connecting => break Some(connected),
                _ = stop.changed() => break None,
                _ = tick.tick() => {
                    refresh_oldest_unacked(&journal, &replication, shipper.acked_seq()).await;
                    job.check_backlog(&journal, &replication, shipper.acked_seq());
                    job.publish(&replication);
                }
            }
        };
        let Some(connected) = connected else {
            break;
        };
        let end = match connected {
            Ok(connection) => {
                delay = RECONNECT_DELAY_MIN;
                tracing::info!(target = %setup.target, appliance = %connection.peer_name().as_str(), "connected to the appliance");
                let end = match connection.open_bi().await {
                    Ok((send, recv)) => {
                        let mut tx = FrameSender::new(send, setup.fault);
                        let mut rx = FrameReceiver::new(recv);
                        let mut link = Link {
                            job: &mut job,
                            shipper: &mut shipper,
                            journal: &journal,
                            replication: &replication,
                            connection: &connection,
                            wire_before,
                            hook: setup.checkpoint_hook.as_deref(),
                            backing: setup.backing.as_deref(),
                            trimmed_to: Seq::NONE,
                        };
                        link.stream(&mut tx, &mut rx, &mut stop).await
                    }
                    Err(e) => End::Failed(format!("opening the job's stream: {e}")),
                };
                wire_before += connection.udp_sent_bytes();
                let (lost, datagrams) = connection.loss_stats();
                tracing::info!(
                    sent_bytes = connection.udp_sent_bytes(),
                    datagrams,
                    lost_packets = lost,
                    "connection to the appliance ends"
                );
                connection.close(transport::CloseCode::Done.code(), b"agent closing");
                end
            }
            Err(e) => End::Failed(e.to_string()),
        };
        shipper.handle_disconnected();
        if let Some(r) = job.resync.as_mut() {
            r.abandon();
        }
        let wait = match end {
            End::Stopped => break,
            End::Refused(reason) => {
                tracing::error!(%reason, "the appliance refused the job; retrying in {}s", REFUSED_RETRY_DELAY.as_secs());
                replication.update(|s| {
                    s.state = LinkState::Refused;
                    s.reason = Some(reason);
                    s.lag_bytes = 0;
                });
                REFUSED_RETRY_DELAY
            }
            End::Failed(reason) => {
                tracing::warn!(%reason, retry_in = ?delay, "replication link down");
                replication.update(|s| {
                    s.state = LinkState::Disconnected;
                    s.reason = Some(reason);
                    s.lag_bytes = 0;
                });
                let wait = delay;
                delay = (delay * 2).min(RECONNECT_DELAY_MAX);
                wait
            }
        };
        // While disconnected the journal still grows: keep it durable and the RPO current.
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            refresh_oldest_unacked(&journal, &replication, shipper.acked_seq()).await;
            job.check_backlog(&journal, &replication, shipper.acked_seq());
            job.publish(&replication);
            let tick =
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + TICK_INTERVAL));
            tokio::select! {
                _ = tick => {}
                _ = stop.changed() => break,
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
    }
    replication.update(|s| s.state = LinkState::Disconnected);
}

/// Looks up the timestamp of the oldest unacknowledged record when it changed.
async fn refresh_oldest_unacked(
    journal: &Arc<SharedJournal>,
    replication: &Replication,
    acked: Seq,
) {
    let next = acked.next();
    let known = replication.status().oldest_unacked.map(|(seq, _)| seq);
    if journal.head_seq() < next {
        replication.update(|s| s.oldest_unacked = None);
        return;
    }
    if known == Some(next) {
        return;
    }
    let j = Arc::clone(journal);
    let found = tokio::task::spawn_blocking(move || -> Result<Option<Timestamp>, ReadError> {
        let mut reader = j.raw_reader(next)?;
        Ok(reader.next_stored()?.map(|(h, _)| h.timestamp))
    })
    .await;
    if let Ok(Ok(Some(timestamp))) = found {
        replication.update(|s| s.oldest_unacked = Some((next, timestamp)));
    }
}

/// One connection's streaming loop.
struct Link<'a> {
    job: &'a mut Job,
    shipper: &'a mut Shipper,
    journal: &'a Arc<SharedJournal>,
    replication: &'a Arc<Replication>,
    connection: &'a transport::Connection,
    wire_before: u64,
    hook: Option<&'a std::path::Path>,
    backing: Option<&'a crate::redo::BackingWatermark>,
    /// The journal was last trimmed below this seq on this connection.
    trimmed_to: Seq,
}

impl Link<'_> {
    async fn stream(
        &mut self,
        tx: &mut FrameSender,
        rx: &mut FrameReceiver,
        stop: &mut watch::Receiver<bool>,
    ) -> End {
        match self.stream_inner(tx, rx, stop).await {
            Ok(end) => end,
            Err(LinkError::Ship(ShipError::Refused { code, message })) => {
                End::Refused(format!("{code:?}: {message}"))
            }
            Err(e) => End::Failed(e.to_string()),
        }
    }

    async fn stream_inner(
        &mut self,
        tx: &mut FrameSender,
        rx: &mut FrameReceiver,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<End, LinkError> {
        let journal = self.journal;
        self.shipper.handle_journal(
            journal.first_seq(),
            journal.head_seq(),
            journal.durable_seq(),
        );
        self.shipper.handle_connected();
        let mut read_task: Option<JoinHandle<Result<Option<ReadDone>, ReadError>>> = None;
        let mut sync_task: Option<JoinHandle<Result<Seq, SyncError>>> = None;
        let mut trim_task: Option<JoinHandle<()>> = None;
        let mut tick = tokio::time::interval(TICK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut streaming = false;
        let mut streaming_since = None;
        // A batch waiting for the throttle or for a resume, and when it may go.
        let mut held: Option<Frame> = None;
        // The wire bytes the throttle has accounted for, and the last batch it charged.
        let mut wire_charged = self.connection.udp_sent_bytes();
        let mut batch_charged = 0u64;
        let mut held_until: Option<tokio::time::Instant> = None;
        loop {
            let head = journal.head_seq();
            self.shipper
                .handle_journal(journal.first_seq(), head, journal.durable_seq());
            if sync_task.is_none() && head > journal.durable_seq() {
                let j = Arc::clone(journal);
                sync_task = Some(tokio::task::spawn_blocking(move || j.sync()));
            }
            if read_task.is_none() {
                if let Some(request) = self.shipper.poll_read() {
                    let j = Arc::clone(journal);
                    read_task = Some(tokio::task::spawn_blocking(move || {
                        read_records(&j, request)
                    }));
                }
            }
            loop {
                let frame = match held.take() {
                    Some(f) => f,
                    None => match self.shipper.poll_transmit() {
                        Some(f) => f,
                        None => break,
                    },
                };
                if let Frame::Batch(b) = &frame {
                    if self.job.control.paused {
                        held = Some(frame);
                        held_until = None;
                        break;
                    }
                    if held_until.is_none_or(|t| t <= tokio::time::Instant::now()) {
                        held_until = self.job.throttle.admit(b.records.len());
                        if held_until.is_none() {
                            // The limit is on the wire: whatever went out beyond what was
                            // charged (QUIC and TLS overhead, retransmissions) is charged now.
                            let wire = self.connection.udp_sent_bytes();
                            let extra = wire as f64 - wire_charged as f64 - batch_charged as f64;
                            self.job.throttle.debit(extra);
                            wire_charged = wire;
                            batch_charged = b.records.len() as u64;
                        }
                    }
                    if held_until.is_some() {
                        held = Some(frame);
                        break;
                    }
                }
                tx.send(&frame).await?;
            }
            if trim_task.as_ref().is_none_or(|t| t.is_finished()) {
                // Below what the appliance acknowledged, and below what the backing disks
                // hold durably (the redo after a crash needs everything above that).
                let _ = self.shipper.poll_trim();
                let mut up_to = self.shipper.acked_seq().next();
                if let Some(backing) = self.backing {
                    up_to = up_to.min(backing.synced().next());
                }
                if up_to > self.trimmed_to {
                    self.trimmed_to = up_to;
                    let j = Arc::clone(journal);
                    trim_task = Some(tokio::task::spawn_blocking(move || {
                        if let Err(e) = j.trim(up_to) {
                            tracing::warn!(error = %e, "trimming the journal failed");
                        }
                    }));
                }
            }
            if !streaming && *self.shipper.state() == ShipperState::Streaming {
                streaming = true;
                streaming_since = Some(tokio::time::Instant::now());
                tracing::info!(acked = %self.shipper.acked_seq(), head = %head, "streaming to the appliance");
                self.replication.update(|s| {
                    s.state = LinkState::Replicating;
                    s.reason = None;
                });
            }
            self.replication
                .publish_acked(self.shipper.acked_seq(), head);
            let (shipped, inflight) = (
                self.shipper.shipped_bytes_total(),
                self.shipper.inflight_bytes(),
            );
            let wire = self.wire_before + self.connection.udp_sent_bytes();
            self.replication.update(|s| {
                s.acked = s.acked.max(self.shipper.acked_seq());
                s.lag_bytes = inflight;
                s.shipped_bytes = shipped;
                s.wire_bytes = wire;
            });

            tokio::select! {
                biased;
                _ = stop.changed() => {
                    tx.finish();
                    return Ok(End::Stopped);
                }
                _ = async {
                    match held_until {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                }, if held.is_some() => {
                    held_until = Some(tokio::time::Instant::now());
                }
                done = async {
                    match self.job.resync.as_mut() {
                        Some(r) => r.next_done().await,
                        None => std::future::pending().await,
                    }
                } => {
                    done.map_err(LinkError::Resync)?;
                    self.replication.notify_appended();
                }
                frame = rx.recv() => match frame? {
                    Some(frame) => {
                        self.shipper.handle_frame(frame)?;
                        if let Some(control) = self.shipper.poll_control() {
                            if control != self.job.control {
                                tracing::info!(paused = control.paused, throttle_bytes_per_second = control.throttle_bytes_per_second, "the appliance changed the job's link settings");
                            }
                            self.job.control = control;
                            self.job.throttle.set_rate(min_rate(self.replication.agent_throttle(), control.throttle_bytes_per_second));
                            if !control.paused && held.is_some() {
                                held_until = Some(tokio::time::Instant::now());
                            }
                        }
                        while let Some(need) = self.shipper.poll_resync_need() {
                            if let Some(r) = self.job.resync.as_mut() {
                                r.handle_need(need);
                            }
                        }
                        while let Some(request) = self.shipper.poll_checkpoint() {
                            let id = request.request_id;
                            match take_checkpoint(journal, self.replication, self.hook, request).await {
                                Ok(seq) => tracing::info!(request = id, %seq, "checkpoint recorded"),
                                Err(e) => tracing::error!(request = id, error = %e, "checkpoint could not be recorded"),
                            }
                        }
                    }
                    None => return Ok(End::Failed("the appliance closed the stream".into())),
                },
                done = join(&mut sync_task) => {
                    sync_task = None;
                    done.map_err(|e| LinkError::Task(e.to_string()))?.map_err(|e| LinkError::Journal(e.to_string()))?;
                }
                done = join(&mut read_task) => {
                    read_task = None;
                    let read = done.map_err(|e| LinkError::Task(e.to_string()))?.map_err(|e| LinkError::Journal(e.to_string()))?;
                    match read {
                        Some(read) => self.shipper.handle_read(read),
                        // The shipper asks only for durable seqs the journal holds.
                        None => return Err(LinkError::Journal("a record the shipper asked for is not in the journal".into())),
                    }
                }
                _ = self.replication.appended.notified() => {}
                _ = tick.tick() => {
                    refresh_oldest_unacked(journal, self.replication, self.shipper.acked_seq()).await;
                    let oldest = self.replication.status().oldest_unacked.map(|(_, t)| t);
                    self.shipper.handle_tick(now_micros(), oldest);
                    self.job_tick(tx, streaming_since).await?;
                }
            }
        }
    }
}

impl Link<'_> {
    /// Once per tick while connected: backlog bound, leaving tracking, the resync's next
    /// steps, and the status for the appliance.
    async fn job_tick(
        &mut self,
        tx: &mut FrameSender,
        streaming_since: Option<tokio::time::Instant>,
    ) -> Result<(), LinkError> {
        let journal = self.journal;
        let acked = self.shipper.acked_seq();
        self.job.throttle.set_rate(min_rate(
            self.replication.agent_throttle(),
            self.job.control.throttle_bytes_per_second,
        ));
        self.job.check_backlog(journal, self.replication, acked);
        let backlog = self.replication.status().backlog_bytes;
        let settled = streaming_since.is_some_and(|t| t.elapsed() >= RESYNC_AFTER_STREAMING);
        let calm = backlog < self.job.backlog_bytes_max / 4;
        let paused = self.job.control.paused;
        if self.job.tracking() && settled && calm && !paused && acked >= journal.head_seq() {
            if let Some(r) = self.job.resync.as_ref() {
                r.tracker().stop_tracking();
                tracing::info!("the appliance caught up: journalling again; the dirty regions will be resynced");
            }
            self.job.tracking_reason = None;
        }
        if let Some(r) = self.job.resync.as_mut() {
            // Leaving tracking waits for a settled link (above); a resync after a restart
            // or a new job's initial sync starts as soon as the job streams.
            if self.job.tracking_reason.is_none()
                && !paused
                && streaming_since.is_some()
                && r.wanted()
            {
                if !r.running() && calm {
                    r.begin().await.map_err(LinkError::Resync)?;
                }
                // Each region in flight may append up to its size in resync writes: keep
                // them to a quarter of the backlog bound, so the resync cannot trip it.
                let region = r.tracker().map().region_bytes().max(1);
                let limit = (self.job.backlog_bytes_max / 4 / region)
                    .clamp(1, crate::resync::RESYNC_OUTSTANDING_MAX as u64)
                    as usize;
                r.poll_work(backlog < self.job.backlog_bytes_max / 2, limit);
                if r.settle().await.map_err(LinkError::Resync)? {
                    self.replication.notify_appended();
                }
                self.replication.notify_appended();
            }
        }
        let status = self.job.publish(self.replication);
        let due = self
            .job
            .sent_status
            .as_ref()
            .is_none_or(|(last, at)| *last != status || at.elapsed() >= STATUS_INTERVAL);
        if due && *self.shipper.state() == ShipperState::Streaming {
            tx.send(&Frame::AgentStatus(status.clone())).await?;
            self.job.sent_status = Some((status, tokio::time::Instant::now()));
        }
        Ok(())
    }
}

/// The lower of two rates, 0 meaning no limit.
fn min_rate(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, r) | (r, 0) => r,
        (a, b) => a.min(b),
    }
}

/// Awaits a task slot; pending forever while it is empty (so a `select!` branch sleeps).
async fn join<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task.as_mut() {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

/// Reads the records a [`ReadRequest`] asks for, exactly as stored.
fn read_records(
    journal: &SharedJournal,
    request: ReadRequest,
) -> Result<Option<ReadDone>, ReadError> {
    let mut reader = journal.raw_reader(request.from)?;
    let mut records = Vec::new();
    let mut count = 0u32;
    let mut first_timestamp = None;
    let mut seq = request.from;
    while seq <= request.to_max && (records.is_empty() || records.len() < request.bytes_max) {
        let Some((header, bytes)) = reader.next_stored()? else {
            break;
        };
        if records.len() + bytes.len() > request.bytes_max && !records.is_empty() {
            break;
        }
        first_timestamp.get_or_insert(header.timestamp);
        records.extend_from_slice(bytes);
        count += 1;
        seq = seq.next();
    }
    Ok(first_timestamp.map(|first_timestamp| ReadDone {
        first_seq: request.from,
        count,
        records,
        first_timestamp,
    }))
}

/// Why a connection's streaming loop stopped.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Ship(#[from] ShipError),
    #[error("local journal: {0}")]
    Journal(String),
    #[error("blocking task failed: {0}")]
    Task(String),
    #[error("resync: {0}")]
    Resync(String),
}
