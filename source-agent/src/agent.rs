//! Assembles an agent from its configuration: locks the data directory, registers the disks,
//! opens the journal and the backing disks, builds each disk's filter chain, binds every
//! listener; then serves until told to stop, finishes in-flight requests and syncs.
//!
//! `run` is what `cdp-agent run` calls. It prints the start-up protocol on stdout (one
//! `listening KIND ADDR` line per listener, then `ready`) only after every listener is bound.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use journal::ship::{JobInfo, ShipperConfig};
use journal::wire::DiskInfo;
use journal::{Generation, JobId, SharedJournal};

use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::backing::{BlockDevice, FileDevice};
use crate::chain::DiskChain;
use crate::config::{AgentConfig, ConfigError, ReplicationSettings};
use crate::metrics::AgentMetrics;
use crate::redo::{run_backing_sync, BackingDevices, BackingWatermark};
use crate::registry::{DataDirLock, Registry, RegistryError};
use crate::replicate::{client_bind_addr, run_shipper, Replication, ShipperSetup};
use crate::server::{serve_tcp, serve_unix, Export, ServerContext, ServerEvents};
use crate::sink::RecordSink;

/// A bound listener, as announced on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listening {
    /// `listening nbd-tcp ADDR`
    NbdTcp(SocketAddr),
    /// `listening nbd-unix PATH`
    NbdUnix(PathBuf),
    /// `listening metrics ADDR`
    Metrics(SocketAddr),
}

impl fmt::Display for Listening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NbdTcp(addr) => write!(f, "listening nbd-tcp {addr}"),
            Self::NbdUnix(path) => write!(f, "listening nbd-unix {}", path.display()),
            Self::Metrics(addr) => write!(f, "listening metrics {addr}"),
        }
    }
}

/// Parts a test can substitute (an in-memory journal, in-memory disks).
#[derive(Debug, Default)]
pub struct Overrides {
    /// The journal to use instead of `DATA_DIR/journal/`.
    pub sink: Option<Arc<dyn RecordSink>>,
    /// Backing disks by name, instead of opening the configured paths.
    pub devices: BTreeMap<String, Arc<dyn BlockDevice>>,
}

/// Why the agent could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The configuration breaks a rule.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory cannot be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The disk table or the data-directory lock failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A backing disk cannot be opened.
    #[error("disk {name}: opening {path}: {source}")]
    Device {
        /// The disk.
        name: String,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A backing disk's size does not suit its export.
    #[error("disk {name}: size {size_bytes} bytes is {reason}")]
    DiskSize {
        /// The disk.
        name: String,
        /// Its size.
        size_bytes: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The journal cannot be opened.
    #[error("journal in {path}: {message}")]
    Journal {
        /// The journal directory.
        path: PathBuf,
        /// The journal's error.
        message: String,
    },
    /// Replication is configured but cannot start.
    #[error("replication: {0}")]
    Replication(String),
    /// The NBD server refused a disk's export (configuration validation rules it out).
    #[error(transparent)]
    Export(#[from] nbd_server::AddExportError),
    /// A listener cannot be bound.
    #[error("binding {what}: {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why stopping the agent did not end cleanly.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The final journal sync or a backing-disk sync failed: data the clients flushed may
    /// not be durable.
    #[error("final sync failed: {0}")]
    Sync(String),
}

/// Why `run` failed.
#[derive(Debug, Error)]
pub enum RunError {
    /// Start-up failed.
    #[error(transparent)]
    Start(#[from] StartError),
    /// Stopping failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The start-up lines could not be printed.
    #[error("writing the start-up lines to stdout: {0}")]
    Stdout(std::io::Error),
}

/// A started agent: every listener bound, nothing served yet.
#[derive(Debug)]
pub struct Agent {
    ctx: Arc<ServerContext>,
    shutdown: watch::Sender<bool>,
    tcp: Vec<TcpListener>,
    unix: Vec<(UnixListener, PathBuf)>,
    metrics_listener: Option<TcpListener>,
    listening: Vec<Listening>,
    sink: Arc<dyn RecordSink>,
    chains: Vec<Arc<DiskChain>>,
    metrics: Arc<AgentMetrics>,
    job_hex: String,
    /// The shipper's setup and the journal it reads, when replication is configured.
    shipping: Option<(ShipperSetup, Arc<SharedJournal>)>,
    replication: Option<Arc<Replication>>,
    /// The backing disks and their synced watermark, when the agent owns its journal.
    backing_sync: Option<(Arc<BackingWatermark>, BackingDevices)>,
    _lock: DataDirLock,
}

impl Agent {
    /// Starts the agent `config` describes.
    pub async fn start(config: &AgentConfig) -> Result<Self, StartError> {
        Self::start_with(config, Overrides::default()).await
    }

    /// Starts the agent with some parts substituted.
    pub async fn start_with(
        config: &AgentConfig,
        overrides: Overrides,
    ) -> Result<Self, StartError> {
        let disks = config.validate()?;
        let data_dir = &config.data_dir;
        std::fs::create_dir_all(data_dir).map_err(|source| StartError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let lock = DataDirLock::acquire(data_dir)?;
        let mut registry = Registry::load_or_new(data_dir)?;

        let mut opened = Vec::with_capacity(disks.len());
        for disk in &disks {
            let device: Arc<dyn BlockDevice> =
                match overrides.devices.get(&disk.name) {
                    Some(device) => Arc::clone(device),
                    None => Arc::new(FileDevice::open(&disk.path).map_err(|source| {
                        StartError::Device {
                            name: disk.name.clone(),
                            path: disk.path.clone(),
                            source,
                        }
                    })?),
                };
            let size_bytes = device.size_bytes();
            let min = u64::from(disk.block_sizes.min_bytes);
            if size_bytes == 0 || !size_bytes.is_multiple_of(min) {
                return Err(StartError::DiskSize {
                    name: disk.name.clone(),
                    size_bytes,
                    reason: format!(
                        "not a positive multiple of block_size_min {min} (set block_size_min = 1 to export any size)"
                    ),
                });
            }
            let id = registry.register(&disk.name, size_bytes, &disk.path)?;
            opened.push((disk, device, id));
        }
        registry.save()?;

        let mut shared_journal = None;
        let sink: Arc<dyn RecordSink> = match overrides.sink {
            Some(sink) => sink,
            None => {
                let sink = crate::journal_sink::open(data_dir, &registry, &config.journal)?;
                shared_journal = Some(sink.shared());
                sink
            }
        };
        // The journal is the source of truth: before serving, every record it holds is
        // applied again to its backing disk (a crash may have cut a backing write short).
        let mut watermark = None;
        let mut redo_floor = journal::Seq::NONE;
        if let Some(journal) = &shared_journal {
            let devices: BTreeMap<journal::DiskId, (String, Arc<dyn BlockDevice>)> = opened
                .iter()
                .map(|(disk, device, id)| (*id, (disk.name.clone(), Arc::clone(device))))
                .collect();
            let j = Arc::clone(journal);
            let floor = crate::tracker::read_redo_floor(data_dir).map_err(|message| {
                StartError::Journal {
                    path: data_dir.join(crate::tracker::REDO_FLOOR_FILE),
                    message,
                }
            })?;
            redo_floor = floor;
            let done = tokio::task::spawn_blocking(move || crate::redo::redo(&j, &devices, floor))
                .await
                .map_err(|e| StartError::Journal {
                    path: data_dir.join(crate::journal_sink::JOURNAL_DIR),
                    message: format!("redo task failed: {e}"),
                })?
                .map_err(|message| StartError::Journal {
                    path: data_dir.join(crate::journal_sink::JOURNAL_DIR),
                    message,
                })?;
            if done.records > 0 {
                tracing::info!(records = done.records, bytes = done.bytes, head = %done.head, "backing disks brought up to the journal");
            }
            watermark = Some(Arc::new(BackingWatermark::new(done.head)));
        }
        // Only a replicating agent trims its journal, so only it needs the backing disks'
        // synced watermark (without trimming, the redo covers every record).
        let backing_sync = watermark
            .clone()
            .filter(|_| config.replication.is_some())
            .map(|w| {
                let devices: BackingDevices = opened
                    .iter()
                    .map(|(disk, device, _)| (disk.name.clone(), Arc::clone(device)))
                    .collect();
                (w, devices)
            });
        let mut shipping = None;
        let mut replication = None;
        let mut tracker = None;
        let mut initial_sync = false;
        if let Some(settings) = &config.replication {
            let journal = shared_journal.clone().ok_or_else(|| {
                StartError::Replication("replication needs the agent's own journal".into())
            })?;
            let job = JobInfo {
                job: JobId(registry.job()),
                job_name: settings
                    .job_name
                    .clone()
                    .unwrap_or_else(|| default_job_name(data_dir)),
                generation: Generation(registry.generation()),
                mode: settings.mode()?,
                disks: opened
                    .iter()
                    .map(|(disk, device, id)| DiskInfo {
                        disk: *id,
                        name: disk.name.clone(),
                        size_bytes: device.size_bytes(),
                    })
                    .collect(),
            };
            let mut setup = shipper_setup(data_dir, settings, job)?;
            setup.backing = watermark.clone();
            if let (Some(w), Some((_, devices))) = (&watermark, &backing_sync) {
                let path = data_dir.join(crate::dirty::DIRTY_MAP_FILE);
                let created = !path.exists();
                let sizes: Vec<(journal::DiskId, u64)> = opened
                    .iter()
                    .map(|(_, device, id)| (*id, device.size_bytes()))
                    .collect();
                let open = || {
                    crate::dirty::DirtyMap::open(
                        &path,
                        &sizes,
                        crate::dirty::REGION_BYTES_DEFAULT,
                        crate::dirty::Initial::Dirty,
                    )
                };
                let map = match open() {
                    // Neither slot is readable: which regions were dirty is unknown, so every
                    // region is (a full comparison by hashes, never a silent gap). The bad
                    // file is kept beside for inspection.
                    Err(e @ crate::dirty::OpenError::NoValidSlot { .. }) => {
                        let kept = path.with_extension("map.unreadable");
                        tracing::error!(error = %e, kept = %kept.display(), "the dirty map is unreadable: every region is treated as dirty and will be compared");
                        std::fs::rename(&path, &kept).map_err(|source| StartError::DataDir {
                            path: kept.clone(),
                            source,
                        })?;
                        open()
                    }
                    other => other,
                }
                .map_err(|e| StartError::Replication(format!("{}: {e}", path.display())))?;
                if created {
                    tracing::info!("new dirty map: every region is dirty until the initial sync has compared it");
                } else if !map.is_clean() {
                    tracing::info!(
                        dirty_bytes = map.dirty_bytes(),
                        "regions marked dirty before the restart will be resynced"
                    );
                }
                tracker = Some(Arc::new(crate::tracker::Tracker::new(
                    Arc::new(map),
                    Arc::clone(w),
                    devices.clone(),
                    data_dir,
                    redo_floor,
                )));
                initial_sync = created;
            }
            let shipping_replication = Arc::new(Replication::new(
                setup.job.mode,
                Duration::from_millis(settings.sync_ack_timeout_ms),
            ));
            shipping_replication.set_agent_throttle(settings.throttle_bytes_per_second);
            replication = Some(shipping_replication);
            shipping = Some((setup, journal));
        }
        let metrics = Arc::new(AgentMetrics::new());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let events: Arc<dyn ServerEvents> = Arc::clone(&metrics) as Arc<dyn ServerEvents>;
        let ctx = Arc::new(ServerContext::new(
            config.limits.server_limits(),
            events,
            shutdown_rx,
        ));
        let mut chains = Vec::new();
        for (disk, device, id) in opened {
            let chain = Arc::new(
                DiskChain::new(id, &disk.name, &disk.chain, device, &sink, &metrics)
                    .with_replication(replication.clone())
                    .with_watermark(watermark.clone())
                    .with_tracker(tracker.clone()),
            );
            let filters: Vec<&str> = disk.chain.iter().map(|f| f.name()).collect();
            ctx.add_export(Export {
                name: disk.name.clone(),
                description: format!(
                    "cdp-agent disk {} (filters: {})",
                    disk.name,
                    filters.join(", ")
                ),
                block_sizes: disk.block_sizes,
                backend: Arc::clone(&chain) as Arc<dyn nbd_server::ExportBackend>,
                read_only: false,
            })?;
            chains.push(chain);
        }

        if let (Some(tracker), Some(w), Some((setup, journal))) =
            (&tracker, &watermark, shipping.as_mut())
        {
            let disks = chains
                .iter()
                .filter_map(|c| {
                    Some(crate::resync::ResyncDisk {
                        id: c.id(),
                        name: c.name().to_owned(),
                        device: c.device(),
                        ranges: c.ranges()?,
                    })
                })
                .collect();
            if let (Some(r), false) = (&replication, tracker.map().is_clean()) {
                let (state, reason) = if initial_sync {
                    (
                        journal::wire::JobState::Syncing,
                        "initial sync; waiting for the link",
                    )
                } else {
                    (
                        journal::wire::JobState::Resyncing,
                        "after an agent restart; waiting for the link",
                    )
                };
                r.set_job_state(state, reason);
            }
            setup.resync = Some(crate::resync::Resync::new(
                Arc::clone(tracker),
                Arc::clone(w),
                Arc::clone(journal),
                disks,
                initial_sync,
            ));
        }

        let mut listening = Vec::new();
        let mut tcp = Vec::new();
        for addr in &config.nbd_listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    what: format!("NBD TCP listener {addr}"),
                    source,
                })?;
            let bound = listener.local_addr().map_err(|source| StartError::Bind {
                what: format!("NBD TCP listener {addr}"),
                source,
            })?;
            listening.push(Listening::NbdTcp(bound));
            tcp.push(listener);
        }
        let mut unix = Vec::new();
        for path in &config.nbd_socket {
            remove_stale_socket(path);
            let listener = UnixListener::bind(path).map_err(|source| StartError::Bind {
                what: format!("NBD Unix socket {}", path.display()),
                source,
            })?;
            listening.push(Listening::NbdUnix(path.clone()));
            unix.push((listener, path.clone()));
        }
        let mut metrics_listener = None;
        if let Some(addr) = config.metrics_listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    what: format!("metrics listener {addr}"),
                    source,
                })?;
            let bound = listener.local_addr().map_err(|source| StartError::Bind {
                what: format!("metrics listener {addr}"),
                source,
            })?;
            listening.push(Listening::Metrics(bound));
            metrics_listener = Some(listener);
        }

        tracing::info!(
            job = %registry.job_hex(),
            disks = disks.len(),
            data_dir = %data_dir.display(),
            "agent started"
        );
        Ok(Self {
            ctx,
            shutdown,
            tcp,
            unix,
            metrics_listener,
            listening,
            sink,
            chains,
            metrics,
            job_hex: registry.job_hex(),
            shipping,
            replication,
            backing_sync,
            _lock: lock,
        })
    }

    /// The bound listeners, in announcement order.
    pub fn listening(&self) -> &[Listening] {
        &self.listening
    }

    /// The job's journal.
    pub fn sink(&self) -> Arc<dyn RecordSink> {
        Arc::clone(&self.sink)
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> Arc<AgentMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Serves until `stop` completes; then stops accepting, lets every connection finish its
    /// in-flight requests, syncs the journal and every backing disk, and returns.
    pub async fn serve(self, stop: impl Future<Output = ()>) -> Result<(), ServeError> {
        let mut accept = JoinSet::new();
        for listener in self.tcp {
            accept.spawn(serve_tcp(listener, Arc::clone(&self.ctx)));
        }
        for (listener, path) in self.unix {
            accept.spawn(serve_unix(listener, path, Arc::clone(&self.ctx)));
        }
        let metrics_server = self.metrics_listener.map(|listener| {
            let metrics = Arc::clone(&self.metrics);
            let sink = Arc::clone(&self.sink);
            let job = self.job_hex.clone();
            let replication = self.replication.clone();
            let render: web::metrics::Render = Arc::new(move || {
                let head = sink.head_seq();
                metrics.set_journal(&job, head.0, sink.durable_seq().0);
                if let Some(r) = &replication {
                    metrics.set_replication(&job, r, head);
                }
                metrics.render()
            });
            let mut shutdown = self.ctx.shutdown();
            tokio::spawn(web::metrics::serve(listener, render, async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            }))
        });

        let (ship_stop, ship_stop_rx) = watch::channel(false);
        let backing_sync = self.backing_sync.map(|(watermark, devices)| {
            tokio::spawn(run_backing_sync(watermark, devices, ship_stop_rx.clone()))
        });
        let shipper = self.shipping.map(|(setup, journal)| {
            tracing::info!(target = %setup.target, job = %setup.job.job_name, mode = ?setup.job.mode, "replicating");
            let replication = self.replication.clone();
            tokio::spawn(async move {
                if let Some(replication) = replication {
                    run_shipper(setup, journal, replication, ship_stop_rx).await;
                }
            })
        });

        stop.await;
        tracing::info!("stopping: finishing in-flight requests");
        // Receivers live in the context, so sending cannot fail while `self.ctx` exists.
        let _ = self.shutdown.send(true);
        while accept.join_next().await.is_some() {}
        self.ctx.drained().await;

        let mut failures = Vec::new();
        let sink = Arc::clone(&self.sink);
        match tokio::task::spawn_blocking(move || sink.sync()).await {
            Ok(Ok(seq)) => tracing::info!(durable_seq = %seq, "journal synced"),
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(e) => failures.push(format!("journal sync task: {e}")),
        }
        for chain in &self.chains {
            if let Err(e) = chain.sync_device().await {
                failures.push(e.to_string());
            }
        }
        if let Some(shipper) = shipper {
            // Give a connected shipper a moment to deliver the tail, so a clean stop leaves
            // nothing unacknowledged; an unreachable appliance does not hold the stop up.
            if let Some(replication) = &self.replication {
                let head = self.sink.head_seq();
                let drained = tokio::time::timeout(SHUTDOWN_DRAIN_TIMEOUT, async {
                    while replication.status().state == crate::replicate::LinkState::Replicating
                        && replication.status().acked < head
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await;
                let acked = replication.status().acked;
                if drained.is_err() || acked < head {
                    tracing::warn!(%acked, %head, "stopping with records the appliance has not acknowledged; they are shipped at the next start");
                }
            }
            let _ = ship_stop.send(true);
            if let Err(e) = shipper.await {
                tracing::warn!(error = %e, "shipper task failed");
            }
        }
        let _ = ship_stop.send(true);
        if let Some(task) = backing_sync {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "backing sync task failed");
            }
        }
        if let Some(server) = metrics_server {
            match server.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "metrics listener failed"),
                Err(e) => tracing::warn!(error = %e, "metrics task failed"),
            }
        }
        if failures.is_empty() {
            tracing::info!("stopped");
            Ok(())
        } else {
            Err(ServeError::Sync(failures.join("; ")))
        }
    }
}

/// How long a clean stop waits for the appliance to acknowledge the journal's tail.
pub const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// The job's name when none is configured: the data directory's name.
fn default_job_name(data_dir: &Path) -> String {
    let name: String = data_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("job")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if name.is_empty() || name.starts_with(['.', '-']) {
        "job".to_owned()
    } else {
        name
    }
}

/// Loads the agent's identity and pinned appliance and binds the QUIC endpoint.
fn shipper_setup(
    data_dir: &Path,
    settings: &ReplicationSettings,
    job: JobInfo,
) -> Result<ShipperSetup, StartError> {
    let data = transport::DataDir::new(data_dir);
    if !data.identity_dir().join(transport::KEY_FILE).exists() {
        return Err(StartError::Replication(format!(
            "this agent is not paired: run `cdp-agent pair --data-dir {} --bundle FILE` with a bundle from `cdp-receiver pair`",
            data_dir.display()
        )));
    }
    let identity = data
        .identity()
        .map_err(|e| StartError::Replication(format!("identity: {e}")))?;
    let trust = data
        .trust_store()
        .map_err(|e| StartError::Replication(format!("trust store: {e}")))?;
    if trust.peers().is_empty() {
        return Err(StartError::Replication(format!(
            "no appliance is pinned in {}: run `cdp-agent pair` first",
            data.trust_path().display()
        )));
    }
    let client = transport::Client::bind(
        client_bind_addr(settings.target),
        &identity,
        Arc::new(trust),
    )
    .map_err(|e| StartError::Replication(format!("QUIC endpoint: {e}")))?
    .with_congestion(settings.congestion()?);
    let fault = transport::Fault::from_env();
    if let Some(fault) = fault {
        tracing::warn!(
            ?fault,
            "FAULT INJECTION is on (CDP_FAULT_CORRUPT_BATCHES): batches are corrupted on purpose"
        );
    }
    Ok(ShipperSetup {
        resync: None,
        backlog_bytes_max: settings.backlog_bytes_max,
        backlog_age_max: Duration::from_secs(settings.backlog_age_max_secs),
        job,
        target: settings.target,
        client,
        config: ShipperConfig {
            inflight_bytes_max: settings.inflight_bytes_max,
            batch_bytes_max: settings.batch_bytes_max as usize,
            ..ShipperConfig::default()
        },
        fault,
        checkpoint_hook: settings.checkpoint_hook.clone(),
        backing: None,
    })
}

/// Removes a leftover socket file from an earlier run (never any other kind of file).
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Starts the agent, prints the start-up lines and `ready` on stdout, serves until `stop`.
pub async fn run(
    config: AgentConfig,
    config_file: Option<PathBuf>,
    stop: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let agent = Agent::start(&config).await?;
    if let Some(replication) = agent.replication.clone() {
        tokio::spawn(reload_on_sighup(config_file, replication));
    }
    let mut stdout = std::io::stdout().lock();
    for listener in agent.listening() {
        writeln!(stdout, "{listener}").map_err(RunError::Stdout)?;
    }
    writeln!(stdout, "ready").map_err(RunError::Stdout)?;
    stdout.flush().map_err(RunError::Stdout)?;
    drop(stdout);
    agent.serve(stop).await?;
    Ok(())
}

/// On every SIGHUP, re-reads the configuration file and applies what can change while the
/// agent runs: the replication throttle. Everything else needs a restart (and says so).
async fn reload_on_sighup(config_file: Option<PathBuf>, replication: Arc<Replication>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP: the throttle cannot be changed at run time");
            return;
        }
    };
    while hangup.recv().await.is_some() {
        let Some(path) = &config_file else {
            tracing::warn!(
                "SIGHUP: the agent was started with flags, not --config: nothing to re-read"
            );
            continue;
        };
        match AgentConfig::from_file(path).map(|c| c.replication) {
            Ok(Some(settings)) => {
                replication.set_agent_throttle(settings.throttle_bytes_per_second);
                tracing::info!(throttle_bytes_per_second = settings.throttle_bytes_per_second, file = %path.display(), "SIGHUP: throttle re-read (other settings need a restart)");
            }
            Ok(None) => {
                tracing::warn!(file = %path.display(), "SIGHUP: the file has no [replication] section any more; a restart is needed to stop replicating")
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "SIGHUP: the configuration file does not read; nothing changed")
            }
        }
    }
}
