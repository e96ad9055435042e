//! Assembles an appliance from its configuration: locks the data directory, loads its
//! identity, trust store and jobs, binds the QUIC listener (replication and pairing), the
//! REST API and `/metrics`; then serves until told to stop, stops every connection and
//! applier, and syncs.
//!
//! `run` is what `cdp-receiver run` calls. It prints one `listening KIND ADDR` line per
//! listener, then `ready`, on stdout, and records the bound addresses in the data directory
//! (`quic.addr`, `api.addr`) for `cdp-receiver pair` and the `cdp` tool.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdev::BlockDevice;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use transport::fsutil::{write_replacing, MODE_PUBLIC_FILE};
use transport::{DataDir, Server, SystemClock};
use web::api::ApiToken;

use crate::apply::run_applier;
use crate::jobs::{JobError, Jobs};
use crate::landing::serve_connection;
use crate::retention::{retention_pass, RetentionPolicy};
use crate::status::{ApplianceControl, ApplianceMetrics, ViewServer};
use crate::views::Views;

/// The lock file: one appliance per data directory.
pub const LOCK_FILE: &str = "appliance.lock";
/// The REST API's bearer token.
pub const API_TOKEN_FILE: &str = "api-token";
/// Where the running appliance records its QUIC address.
pub const QUIC_ADDR_FILE: &str = "quic.addr";
/// Where the running appliance records its API address.
pub const API_ADDR_FILE: &str = "api.addr";

/// How an appliance runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplianceConfig {
    /// Identity, trust store, pairing tokens, API token and jobs live here.
    pub data_dir: PathBuf,
    /// QUIC listener for agents (replication and pairing).
    pub listen: SocketAddr,
    /// REST API listener, if any.
    pub api_listen: Option<SocketAddr>,
    /// `/metrics` listener, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// NBD listener for recovery views, if any.
    pub view_listen: Option<SocketAddr>,
    /// How much history every job keeps.
    pub retention: RetentionPolicy,
    /// Interval between automatic checkpoints.
    pub checkpoint_interval: Duration,
    /// How often retention runs over every job.
    pub retention_interval: Duration,
}

impl ApplianceConfig {
    /// A configuration with every default, listening for agents on `listen`.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            listen,
            api_listen: None,
            metrics_listen: None,
            view_listen: None,
            retention: RetentionPolicy::default(),
            checkpoint_interval: crate::jobs::CHECKPOINT_INTERVAL_DEFAULT,
            retention_interval: RETENTION_INTERVAL,
        }
    }
}

/// How often retention runs over every job, by default.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(10);
/// Compaction to reclaim the space of dropped history runs at most this often per job.
pub const COMPACTION_INTERVAL: Duration = Duration::from_secs(600);

/// A bound listener, as announced on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listening {
    /// `listening quic ADDR`
    Quic(SocketAddr),
    /// `listening api ADDR`
    Api(SocketAddr),
    /// `listening metrics ADDR`
    Metrics(SocketAddr),
    /// `listening nbd-views ADDR`
    Views(SocketAddr),
}

impl fmt::Display for Listening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Quic(addr) => write!(f, "listening quic {addr}"),
            Self::Api(addr) => write!(f, "listening api {addr}"),
            Self::Metrics(addr) => write!(f, "listening metrics {addr}"),
            Self::Views(addr) => write!(f, "listening nbd-views {addr}"),
        }
    }
}

/// Why the appliance could not start or stopped badly.
#[derive(Debug, Error)]
pub enum ApplianceError {
    /// A file of the data directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another appliance uses the data directory.
    #[error("{0}: another cdp-receiver is using this data directory")]
    Locked(PathBuf),
    /// The data directory was never initialised.
    #[error("{0} is not an initialised appliance data directory: run `cdp-receiver init --data-dir {0}` first")]
    NotInitialised(PathBuf),
    /// The identity, trust store or API token could not be loaded.
    #[error("{what}: {message}")]
    Load {
        /// What was being loaded.
        what: &'static str,
        /// The error.
        message: String,
    },
    /// A job could not be loaded.
    #[error(transparent)]
    Job(#[from] JobError),
    /// A listener could not be bound.
    #[error("binding {what} on {addr}: {message}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// The error.
        message: String,
    },
    /// Syncing at shutdown failed.
    #[error("final sync failed: {0}")]
    Sync(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ApplianceError + '_ {
    move |source| ApplianceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates the data directory's identity and API token (`cdp-receiver init`); keeps what
/// exists. Returns whether anything was created.
pub fn init(data_dir: &Path) -> Result<InitSummary, ApplianceError> {
    transport::fsutil::create_private_dir(data_dir).map_err(io_error(data_dir))?;
    let data = DataDir::new(data_dir);
    let had_identity = data.identity_dir().join(transport::KEY_FILE).exists();
    let identity = data.identity().map_err(|e| ApplianceError::Load {
        what: "identity",
        message: e.to_string(),
    })?;
    let token_path = data_dir.join(API_TOKEN_FILE);
    let had_token = token_path.exists();
    ApiToken::load_or_create(&token_path).map_err(|e| ApplianceError::Load {
        what: "API token",
        message: e.to_string(),
    })?;
    Ok(InitSummary {
        created: !(had_identity && had_token),
        fingerprint: identity.fingerprint().to_string(),
        token_path,
    })
}

/// What `init` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitSummary {
    /// Whether the identity or the token was created now.
    pub created: bool,
    /// The appliance's certificate fingerprint.
    pub fingerprint: String,
    /// The API token file.
    pub token_path: PathBuf,
}

/// A started appliance: every listener bound, nothing served yet.
#[derive(Debug)]
pub struct Appliance {
    server: Server,
    jobs: Arc<Jobs>,
    views: Arc<Views>,
    retention: RetentionPolicy,
    checkpoint_interval: Duration,
    retention_interval: Duration,
    api: Option<(TcpListener, ApiToken)>,
    metrics_listener: Option<TcpListener>,
    view_listener: Option<(TcpListener, SocketAddr)>,
    listening: Vec<Listening>,
    _lock: File,
}

impl Appliance {
    /// Starts the appliance `config` describes.
    pub async fn start(config: &ApplianceConfig) -> Result<Self, ApplianceError> {
        let dir = &config.data_dir;
        let data = DataDir::new(dir);
        if !data.identity_dir().join(transport::KEY_FILE).exists() {
            return Err(ApplianceError::NotInitialised(dir.clone()));
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(ApplianceError::Locked(lock_path));
        }
        let identity = data.identity().map_err(|e| ApplianceError::Load {
            what: "identity",
            message: e.to_string(),
        })?;
        let trust = data.trust_store().map_err(|e| ApplianceError::Load {
            what: "trust store",
            message: e.to_string(),
        })?;
        let jobs_dir = dir.clone();
        let jobs = tokio::task::spawn_blocking(move || Jobs::load(&jobs_dir))
            .await
            .map_err(|e| ApplianceError::Load {
                what: "jobs",
                message: e.to_string(),
            })??;
        let jobs = Arc::new(jobs);
        config
            .retention
            .check()
            .map_err(|message| ApplianceError::Load {
                what: "retention policy",
                message: message.to_owned(),
            })?;
        let views = Arc::new(Views::new(dir).map_err(|e| ApplianceError::Load {
            what: "views",
            message: e.to_string(),
        })?);

        let mut listening = Vec::new();
        let server = Server::bind(
            config.listen,
            &identity,
            Arc::new(trust),
            data.pending_tokens(),
            Arc::new(SystemClock),
        )
        .map_err(|e| ApplianceError::Bind {
            what: "QUIC listener",
            addr: config.listen,
            message: e.to_string(),
        })?;
        let quic = server.local_addr().map_err(|e| ApplianceError::Bind {
            what: "QUIC listener",
            addr: config.listen,
            message: e.to_string(),
        })?;
        listening.push(Listening::Quic(quic));
        record_addr(&dir.join(QUIC_ADDR_FILE), quic)?;

        let mut api = None;
        if let Some(addr) = config.api_listen {
            let token_path = dir.join(API_TOKEN_FILE);
            let token = ApiToken::load(&token_path).map_err(|e| ApplianceError::Load {
                what: "API token",
                message: e.to_string(),
            })?;
            let (listener, bound) = bind_tcp("REST API", addr).await?;
            listening.push(Listening::Api(bound));
            record_addr(&dir.join(API_ADDR_FILE), bound)?;
            api = Some((listener, token));
        }
        let mut metrics_listener = None;
        if let Some(addr) = config.metrics_listen {
            let (listener, bound) = bind_tcp("metrics listener", addr).await?;
            listening.push(Listening::Metrics(bound));
            metrics_listener = Some(listener);
        }
        let mut view_listener = None;
        if let Some(addr) = config.view_listen {
            let (listener, bound) = bind_tcp("NBD view listener", addr).await?;
            listening.push(Listening::Views(bound));
            view_listener = Some((listener, bound));
        }
        tracing::info!(data_dir = %dir.display(), jobs = jobs.all().len(), fingerprint = %identity.fingerprint(), "appliance started");
        Ok(Self {
            server,
            jobs,
            views,
            retention: config.retention,
            checkpoint_interval: config.checkpoint_interval,
            retention_interval: config.retention_interval,
            api,
            metrics_listener,
            view_listener,
            listening,
            _lock: lock,
        })
    }

    /// The bound listeners, in announcement order.
    pub fn listening(&self) -> &[Listening] {
        &self.listening
    }

    /// The appliance's jobs.
    pub fn jobs(&self) -> Arc<Jobs> {
        Arc::clone(&self.jobs)
    }

    /// Serves until `stop` completes; then closes every connection, stops the appliers and
    /// syncs every landing journal and replica.
    pub async fn serve(self, stop: impl Future<Output = ()>) -> Result<(), ApplianceError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let mut appliers = tokio::task::JoinSet::new();
        // Appliers for the jobs loaded now; jobs created later get theirs from the watcher.
        let start_appliers = {
            let jobs = Arc::clone(&self.jobs);
            let stop_rx = stop_rx.clone();
            let interval = self.checkpoint_interval;
            move |appliers: &mut tokio::task::JoinSet<()>| {
                for job in jobs.all() {
                    if !job.applier_started.swap(true, Ordering::AcqRel) {
                        job.set_checkpoint_interval(interval);
                        appliers.spawn(run_applier(job, stop_rx.clone()));
                    }
                }
            }
        };
        {
            let (jobs, views, policy) = (
                Arc::clone(&self.jobs),
                Arc::clone(&self.views),
                self.retention,
            );
            let retention_interval = self.retention_interval.max(Duration::from_millis(100));
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(retention_interval);
                let mut compacted: std::collections::HashMap<journal::JobId, Instant> =
                    std::collections::HashMap::new();
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.changed() => break,
                    }
                    let (jobs, views) = (Arc::clone(&jobs), Arc::clone(&views));
                    let mut done = std::mem::take(&mut compacted);
                    let result = tokio::task::spawn_blocking(move || {
                        run_retention(&jobs, &views, &policy, &mut done);
                        done
                    })
                    .await;
                    match result {
                        Ok(done) => compacted = done,
                        Err(e) => tracing::error!(error = %e, "retention task failed"),
                    }
                }
            });
        }
        start_appliers(&mut appliers);

        let view_server = self.view_listener.map(|(listener, addr)| {
            let context = Arc::new(nbd_server::ServerContext::new(
                nbd_server::ServerLimits::default(),
                Arc::new(nbd_server::NoEvents),
                stop_rx.clone(),
            ));
            tasks.spawn(nbd_server::serve_tcp(listener, Arc::clone(&context)));
            ViewServer { context, addr }
        });
        if let Some((listener, token)) = self.api {
            let control = Arc::new(ApplianceControl::new(
                Arc::clone(&self.jobs),
                Arc::clone(&self.views),
                view_server.clone(),
            ));
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let router = web::api::router(token, control);
                if let Err(e) = web::api::serve(listener, router, async move {
                    let _ = stop.changed().await;
                })
                .await
                {
                    tracing::warn!(error = %e, "REST API listener failed");
                }
            });
        }
        if let Some(listener) = self.metrics_listener {
            let metrics = Arc::new(ApplianceMetrics::new());
            let jobs = Arc::clone(&self.jobs);
            let render: web::metrics::Render = Arc::new(move || metrics.render(&jobs));
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                if let Err(e) = web::metrics::serve(listener, render, async move {
                    let _ = stop.changed().await;
                })
                .await
                {
                    tracing::warn!(error = %e, "metrics listener failed");
                }
            });
        }

        let mut connections = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        // New jobs appear when an agent first connects; look for them at this pace.
        let mut new_jobs = tokio::time::interval(std::time::Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = self.server.accept() => match accepted {
                    Some(connection) => {
                        connections.spawn(serve_connection(connection, Arc::clone(&self.jobs), stop_rx.clone()));
                    }
                    None => break,
                },
                _ = new_jobs.tick() => start_appliers(&mut appliers),
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
        while connections.join_next().await.is_some() {}
        self.server.shutdown().await;
        while appliers.join_next().await.is_some() {}
        while tasks.join_next().await.is_some() {}

        let jobs = Arc::clone(&self.jobs);
        let failures = tokio::task::spawn_blocking(move || {
            let mut failures = Vec::new();
            for job in jobs.all() {
                if let Err(e) = job.landing.sync() {
                    failures.push(format!("job {}: landing journal: {e}", job.id()));
                }
                for replica in job.replicas.values() {
                    if let Err(e) = replica.device.sync_data() {
                        failures.push(format!("replica {}: {e}", replica.path.display()));
                    }
                }
            }
            failures
        })
        .await
        .map_err(|e| ApplianceError::Sync(e.to_string()))?;
        if failures.is_empty() {
            tracing::info!("stopped");
            Ok(())
        } else {
            Err(ApplianceError::Sync(failures.join("; ")))
        }
    }
}

/// One retention pass over every job; compacts a job whose floor rose, at most every
/// [`COMPACTION_INTERVAL`].
fn run_retention(
    jobs: &Jobs,
    views: &Views,
    policy: &RetentionPolicy,
    compacted: &mut std::collections::HashMap<journal::JobId, Instant>,
) {
    for job in jobs.all() {
        // Under the views' lock: no view is created below the floor while it is chosen.
        let outcome = views.with_leases(|lease| retention_pass(&job, policy, lease(job.id())));
        match outcome {
            Ok(outcome) => {
                if outcome.over_bound {
                    tracing::warn!(job = %job.id(), bytes = outcome.history_bytes, bound = policy.history_bytes_max, "history is larger than its bound; the window is kept");
                }
                let due = compacted
                    .get(&job.id())
                    .is_none_or(|t| t.elapsed() >= COMPACTION_INTERVAL);
                if outcome.floor_raised && due {
                    if let Err(e) = job.history.compact() {
                        tracing::warn!(job = %job.id(), error = %e, "compacting the history failed");
                    }
                    compacted.insert(job.id(), Instant::now());
                }
                job.set_retention(outcome);
            }
            Err(e) => tracing::error!(job = %job.id(), error = %e, "retention failed"),
        }
    }
}

async fn bind_tcp(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), ApplianceError> {
    let bind_error = |e: std::io::Error| ApplianceError::Bind {
        what,
        addr,
        message: e.to_string(),
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    Ok((listener, bound))
}

fn record_addr(path: &Path, addr: SocketAddr) -> Result<(), ApplianceError> {
    write_replacing(path, format!("{addr}\n").as_bytes(), MODE_PUBLIC_FILE).map_err(io_error(path))
}

/// Starts the appliance, prints the start-up lines and `ready` on stdout, serves until
/// `stop`.
pub async fn run(
    config: ApplianceConfig,
    stop: impl Future<Output = ()>,
) -> Result<(), ApplianceError> {
    let appliance = Appliance::start(&config).await?;
    let mut stdout = std::io::stdout().lock();
    let out = |e| ApplianceError::Io {
        path: PathBuf::from("<stdout>"),
        source: e,
    };
    for listener in appliance.listening() {
        writeln!(stdout, "{listener}").map_err(out)?;
    }
    writeln!(stdout, "ready").map_err(out)?;
    stdout.flush().map_err(out)?;
    drop(stdout);
    appliance.serve(stop).await
}
