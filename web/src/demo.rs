//! `cdp demo`: starts an appliance (`cdp-receiver`) and an agent (`cdp-agent`) on loopback
//! with a sparse sample disk, pairs them, shows the operator how to write to the disk and
//! find the replica, reports the job's status every few seconds, and stops both on Ctrl-C.
//!
//! Each step is a small function whose error names the step and carries the tail of the
//! child's log. Must never signal a process it did not start (it signals only its own
//! children, by the pid of a `Child` it has not reaped), never use `pkill`, and never
//! delete the demo directory: it is kept for the operator to inspect.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::api::JobStatus;
use crate::client::{ApiClient, ClientError};
use crate::format::{self, shell_quote};
use crate::token::{ApiToken, TokenFileError, TOKEN_FILE_NAME};

/// The appliance's binary, looked for next to `cdp`.
pub const RECEIVER_PROGRAM: &str = "cdp-receiver";
/// The agent's binary, looked for next to `cdp`.
pub const AGENT_PROGRAM: &str = "cdp-agent";
/// The job the demo's agent runs.
pub const JOB_NAME: &str = "demo";
/// The name the demo's agent pairs under.
pub const AGENT_NAME: &str = "demo-agent";
/// The demo's one disk.
pub const DISK_NAME: &str = "disk0";
/// Size of the sample disk: sparse, so it costs no space until written.
pub const DISK_SIZE_BYTES_DEFAULT: u64 = 256 << 20;
/// Longest line read from a child's stdout; a longer one is cut there.
const CHILD_LINE_BYTES_MAX: u64 = 4096;
/// Lines of a child's log shown with an error.
const LOG_TAIL_LINES: usize = 20;
/// Bytes read from the end of a log to find those lines.
const LOG_TAIL_BYTES_MAX: u64 = 16 << 10;

/// `say!(out, "format", args…)`: one line to the operator (see [`say`]).
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        say($out, format_args!($($arg)*))
    };
}

/// What the demo needs to run; [`DemoConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Where to put everything; `None` makes a fresh `/tmp/cdp-demo.XXXXXX`.
    pub dir: Option<PathBuf>,
    /// Where `cdp-receiver` and `cdp-agent` are (the directory of `cdp` itself).
    pub bin_dir: PathBuf,
    /// How long a started child may take to print `ready`.
    pub ready_timeout: Duration,
    /// How long `init` and `pair` may take.
    pub command_timeout: Duration,
    /// How long the job may take to appear in the API with its disk.
    pub job_timeout: Duration,
    /// How often the API is asked while waiting for the job.
    pub job_poll_interval: Duration,
    /// How often a status line is printed.
    pub status_interval: Duration,
    /// How long a child may take to exit after SIGTERM before it gets SIGKILL.
    pub stop_timeout: Duration,
    /// Size of the sample disk.
    pub disk_size_bytes: u64,
}

impl DemoConfig {
    /// The defaults: 30 s to get ready, 30 s for the job to appear, a status line every 5 s.
    pub fn new(dir: Option<PathBuf>, bin_dir: PathBuf) -> Self {
        Self {
            dir,
            bin_dir,
            ready_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(60),
            job_timeout: Duration::from_secs(30),
            job_poll_interval: Duration::from_millis(250),
            status_interval: Duration::from_secs(5),
            stop_timeout: Duration::from_secs(10),
            disk_size_bytes: DISK_SIZE_BYTES_DEFAULT,
        }
    }
}

/// A step of the demo, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Making or checking the demo directory.
    PrepareDir,
    /// Finding the sibling binaries.
    FindBinaries,
    /// `cdp-receiver init`.
    InitAppliance,
    /// `cdp-receiver run` until `ready`.
    StartAppliance,
    /// `cdp-receiver pair` and saving the bundle.
    MakeBundle,
    /// Creating the sparse source disk.
    CreateDisk,
    /// `cdp-agent pair`.
    PairAgent,
    /// `cdp-agent run` until `ready`.
    StartAgent,
    /// Reading the appliance's API token.
    ReadToken,
    /// Polling the API until the job and its disk appear.
    WaitForJob,
    /// Printing status lines until shutdown.
    Watch,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PrepareDir => "preparing the demo directory",
            Self::FindBinaries => "finding cdp-receiver and cdp-agent",
            Self::InitAppliance => "cdp-receiver init",
            Self::StartAppliance => "starting cdp-receiver",
            Self::MakeBundle => "cdp-receiver pair",
            Self::CreateDisk => "creating the source disk",
            Self::PairAgent => "cdp-agent pair",
            Self::StartAgent => "starting cdp-agent",
            Self::ReadToken => "reading the api token",
            Self::WaitForJob => "waiting for the job to appear",
            Self::Watch => "watching the job",
        })
    }
}

/// A failed step: which, why, and the end of the logs that may say more.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {cause}{}", render_logs(.logs))]
pub struct DemoError {
    /// The step that failed.
    pub step: Step,
    /// What went wrong.
    pub cause: Cause,
    /// The last lines of the logs of the children involved.
    pub logs: Vec<LogTail>,
}

/// What went wrong in a step.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// `--dir` names a directory with something in it.
    #[error("{path} is not empty; give an empty or absent directory")]
    DirNotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A sibling binary is not there.
    #[error(
        "{path} not found; cdp demo runs the cdp-receiver and cdp-agent built next to it \
         (cargo build --workspace --bins)"
    )]
    MissingBinary {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A child could not be started.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A child exited when it should not have (or unsuccessfully).
    #[error("{program} exited with {status}")]
    Exited {
        /// The child's program name.
        program: &'static str,
        /// How it ended.
        status: ExitStatus,
    },
    /// A child closed its output before saying `ready` and has not exited.
    #[error("{program} closed its output before saying ready")]
    ClosedOutput {
        /// The child's program name.
        program: &'static str,
    },
    /// A child did not say `ready` in time.
    #[error("{program} did not say ready within {seconds} s")]
    NotReady {
        /// The child's program name.
        program: &'static str,
        /// The deadline.
        seconds: u64,
    },
    /// A short-lived command did not finish in time.
    #[error("{program} did not finish within {seconds} s")]
    TimedOut {
        /// The child's program name.
        program: &'static str,
        /// The deadline.
        seconds: u64,
    },
    /// A child said `ready` without reporting a listener the demo needs.
    #[error("{program} did not report a usable {what} address (got {got:?})")]
    Listener {
        /// The child's program name.
        program: &'static str,
        /// Which listener.
        what: &'static str,
        /// What it reported, if anything.
        got: Option<String>,
    },
    /// The appliance's token file could not be used.
    #[error(transparent)]
    Token(TokenFileError),
    /// The API address could not be used.
    #[error(transparent)]
    Api(ClientError),
    /// The job did not appear in time.
    #[error("job {JOB_NAME:?} with disk {DISK_NAME:?} did not appear in the api within {seconds} s ({last})")]
    NoJob {
        /// The deadline.
        seconds: u64,
        /// The last thing the API said.
        last: String,
    },
}

/// The last lines of a child's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogTail {
    /// The log file.
    pub path: PathBuf,
    /// Its last lines (at most 20), or why it could not be read.
    pub lines: Vec<String>,
}

fn render_logs(logs: &[LogTail]) -> String {
    let mut text = String::new();
    for log in logs {
        if log.lines.is_empty() {
            text.push_str(&format!("\n({} is empty)", log.path.display()));
            continue;
        }
        text.push_str(&format!("\n--- last lines of {} ---", log.path.display()));
        for line in &log.lines {
            text.push_str("\n  ");
            text.push_str(line);
        }
    }
    text
}

/// Reads the last [`LOG_TAIL_LINES`] lines of `path`.
pub fn log_tail(path: &Path) -> LogTail {
    let read = || -> io::Result<Vec<String>> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let start = len.saturating_sub(LOG_TAIL_BYTES_MAX);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.take(LOG_TAIL_BYTES_MAX).read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<&str> = text.lines().collect();
        if start > 0 && !lines.is_empty() {
            // The first line is probably cut in the middle.
            lines.remove(0);
        }
        let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
        Ok(lines[skip..]
            .iter()
            .map(|line| (*line).to_owned())
            .collect())
    };
    LogTail {
        path: path.to_owned(),
        lines: read().unwrap_or_else(|err| vec![format!("(cannot read it: {err})")]),
    }
}

/// A line a child prints on stdout while starting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildLine {
    /// `listening WHAT VALUE`: a listener is bound (VALUE is an address or a path).
    Listening {
        /// What listens (`quic`, `api`, `metrics`, `nbd-tcp`, `nbd-unix`).
        what: String,
        /// Where (the rest of the line).
        value: String,
    },
    /// `ready`: everything is up.
    Ready,
    /// Anything else; logged and otherwise ignored, so children may say more later.
    Other(String),
}

/// Parses one line of a child's startup output.
pub fn parse_child_line(line: &str) -> ChildLine {
    let trimmed = line.trim_end();
    if trimmed == "ready" {
        return ChildLine::Ready;
    }
    if let Some((what, value)) = trimmed
        .strip_prefix("listening ")
        .and_then(|rest| rest.split_once(' '))
    {
        if !what.is_empty() && !value.trim().is_empty() {
            return ChildLine::Listening {
                what: what.to_owned(),
                value: value.trim().to_owned(),
            };
        }
    }
    ChildLine::Other(trimmed.to_owned())
}

/// The listeners a child reported before `ready`, in the order it reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listeners(pub Vec<(String, String)>);

impl Listeners {
    /// What the child reported for `what`, if anything (the last report wins).
    pub fn value(&self, what: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(name, _)| name == what)
            .map(|(_, value)| value.as_str())
    }

    /// The socket address reported for `what`.
    pub fn socket_addr(
        &self,
        program: &'static str,
        what: &'static str,
    ) -> Result<SocketAddr, Cause> {
        let value = self.value(what);
        value
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| Cause::Listener {
                program,
                what,
                got: value.map(str::to_owned),
            })
    }
}

/// Why a child's startup output ended without `ready`.
#[derive(Debug)]
pub enum ReadyError {
    /// Its stdout reached end of file.
    Eof,
    /// Reading its stdout failed.
    Io(io::Error),
}

/// Reads lines from `reader` until `ready`, collecting the `listening` lines.
pub async fn read_until_ready<R: AsyncBufRead + Unpin>(
    program: &str,
    reader: &mut R,
) -> Result<Listeners, ReadyError> {
    let mut listeners = Listeners::default();
    loop {
        match next_line(reader).await.map_err(ReadyError::Io)? {
            None => return Err(ReadyError::Eof),
            Some(line) => match parse_child_line(&line) {
                ChildLine::Ready => return Ok(listeners),
                ChildLine::Listening { what, value } => {
                    tracing::debug!(program, what, value, "listener");
                    listeners.0.push((what, value));
                }
                ChildLine::Other(line) => tracing::debug!(program, line, "stdout"),
            },
        }
    }
}

/// One line of at most [`CHILD_LINE_BYTES_MAX`] bytes, or `None` at end of file.
async fn next_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> io::Result<Option<String>> {
    let mut bytes = Vec::new();
    let read = (&mut *reader)
        .take(CHILD_LINE_BYTES_MAX)
        .read_until(b'\n', &mut bytes)
        .await?;
    if read == 0 {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&bytes).trim_end().to_owned()))
}

/// A long-running child we started.
#[derive(Debug)]
struct Running {
    program: &'static str,
    child: Child,
    log: PathBuf,
}

/// What a started child reported: its listeners, and its pid for the operator.
#[derive(Debug)]
struct Started {
    listeners: Listeners,
    pid: Option<u32>,
}

/// The long-running children, stopped agent first.
#[derive(Debug, Default)]
struct Children {
    receiver: Option<Running>,
    agent: Option<Running>,
}

impl Children {
    /// Completes when a running child exits: its program, its log and how it ended.
    async fn exited(&mut self) -> (&'static str, PathBuf, io::Result<ExitStatus>) {
        async fn wait(running: &mut Running) -> (&'static str, PathBuf, io::Result<ExitStatus>) {
            let status = running.child.wait().await;
            (running.program, running.log.clone(), status)
        }
        match (self.receiver.as_mut(), self.agent.as_mut()) {
            (Some(receiver), Some(agent)) => tokio::select! {
                exited = wait(receiver) => exited,
                exited = wait(agent) => exited,
            },
            (Some(one), None) | (None, Some(one)) => wait(one).await,
            (None, None) => std::future::pending().await,
        }
    }

    /// Stops the agent, then the appliance, saying what happened.
    async fn stop(&mut self, stop_timeout: Duration, out: &mut dyn Write) {
        for mut running in [self.agent.take(), self.receiver.take()]
            .into_iter()
            .flatten()
        {
            let outcome = stop_child(&mut running.child, stop_timeout).await;
            say!(out, "  {}: {outcome}", running.program);
        }
    }
}

/// How a child ended when asked to stop.
#[derive(Debug)]
enum StopOutcome {
    AlreadyExited(ExitStatus),
    Stopped(ExitStatus),
    Killed { seconds: u64 },
    Failed(io::Error),
}

impl fmt::Display for StopOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyExited(status) => write!(f, "had already exited ({status})"),
            Self::Stopped(status) => write!(f, "stopped ({status})"),
            Self::Killed { seconds } => write!(f, "did not stop within {seconds} s; killed"),
            Self::Failed(err) => write!(f, "could not be stopped: {err}"),
        }
    }
}

/// SIGTERM, then up to `stop_timeout` for the child to exit, then SIGKILL.
async fn stop_child(child: &mut Child, stop_timeout: Duration) -> StopOutcome {
    match child.try_wait() {
        Ok(Some(status)) => return StopOutcome::AlreadyExited(status),
        Ok(None) => {}
        Err(err) => return StopOutcome::Failed(err),
    }
    if let Some(pid) = child.id() {
        if let Err(err) = terminate(pid) {
            tracing::warn!(pid, %err, "SIGTERM failed; killing");
        }
    }
    match tokio::time::timeout(stop_timeout, child.wait()).await {
        Ok(Ok(status)) => StopOutcome::Stopped(status),
        Ok(Err(err)) => StopOutcome::Failed(err),
        Err(_) => {
            // `kill` sends SIGKILL and reaps.
            match child.kill().await {
                Ok(()) => StopOutcome::Killed {
                    seconds: stop_timeout.as_secs(),
                },
                Err(err) => StopOutcome::Failed(err),
            }
        }
    }
}

/// Sends SIGTERM to our own child `pid`.
fn terminate(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours. `pid` comes from
    // `Child::id` of a child we started and have not reaped (tokio returns `None` once it
    // has), so the kernel keeps the pid ours even if the child has exited: it cannot name
    // another process.
    let result = unsafe { libc::kill(pid, libc::SIGTERM) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `[OsString; N]` from anything an `OsString` can be made from (`&str`, `String`, `&Path`).
macro_rules! os_args {
    ($($arg:expr),* $(,)?) => {
        [$(OsString::from($arg)),*]
    };
}

/// Every path the demo uses, from the demo directory and the binaries' directory.
#[derive(Debug, Clone)]
struct Layout {
    cdp: PathBuf,
    receiver: PathBuf,
    agent: PathBuf,
    appliance_dir: PathBuf,
    appliance_log: PathBuf,
    agent_dir: PathBuf,
    agent_log: PathBuf,
    bundle: PathBuf,
    source_disk: PathBuf,
    nbd_socket: PathBuf,
}

impl Layout {
    fn new(dir: &Path, bin_dir: &Path) -> Self {
        Self {
            cdp: bin_dir.join("cdp"),
            receiver: bin_dir.join(RECEIVER_PROGRAM),
            agent: bin_dir.join(AGENT_PROGRAM),
            appliance_dir: dir.join("appliance"),
            appliance_log: dir.join("appliance.log"),
            agent_dir: dir.join("agent"),
            agent_log: dir.join("agent.log"),
            bundle: dir.join("bundle"),
            source_disk: dir.join("source").join(format!("{DISK_NAME}.img")),
            nbd_socket: dir.join("nbd.sock"),
        }
    }
}

/// Runs the demo until `shutdown` completes (or a step fails), then stops the children,
/// agent first. Progress and the guide go to `out`. Returns the demo directory, which is
/// kept.
pub async fn run(
    config: &DemoConfig,
    out: &mut dyn Write,
    shutdown: impl Future<Output = ()>,
) -> Result<PathBuf, DemoError> {
    let dir = prepare_dir(config.dir.as_deref())?;
    let layout = Layout::new(&dir, &config.bin_dir);
    find_binaries(&layout)?;
    say!(out, "cdp demo in {}", dir.display());
    let mut children = Children::default();
    let outcome = {
        let mut shutdown = pin!(shutdown);
        tokio::select! {
            outcome = start_and_watch(config, &layout, &mut children, out) => outcome,
            () = &mut shutdown => Ok(()),
        }
    };
    if children.agent.is_some() || children.receiver.is_some() {
        say!(out, "stopping");
        children.stop(config.stop_timeout, out).await;
    }
    say!(out, "the demo directory is kept: {}", dir.display());
    outcome.map(|()| dir)
}

/// Steps 2 to 8, then status lines until a child exits; returns only on error.
async fn start_and_watch(
    config: &DemoConfig,
    layout: &Layout,
    children: &mut Children,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    run_to_completion(
        Step::InitAppliance,
        RECEIVER_PROGRAM,
        &layout.receiver,
        &os_args!["init", "--data-dir", &layout.appliance_dir],
        &layout.appliance_log,
        config.command_timeout,
    )
    .await?;
    say!(
        out,
        "  appliance initialised in {}",
        layout.appliance_dir.display()
    );

    let loopback_any = "127.0.0.1:0";
    let receiver = start(
        Step::StartAppliance,
        RECEIVER_PROGRAM,
        &layout.receiver,
        &os_args![
            "run",
            "--data-dir",
            &layout.appliance_dir,
            "--listen",
            loopback_any,
            "--api-listen",
            loopback_any,
            "--metrics-listen",
            loopback_any,
            "--view-listen",
            loopback_any
        ],
        &layout.appliance_log,
        config,
        &mut children.receiver,
    )
    .await?;
    let listener_error = |cause| DemoError {
        step: Step::StartAppliance,
        cause,
        logs: vec![log_tail(&layout.appliance_log)],
    };
    let listeners = &receiver.listeners;
    let quic = listeners
        .socket_addr(RECEIVER_PROGRAM, "quic")
        .map_err(listener_error)?;
    let api = listeners
        .socket_addr(RECEIVER_PROGRAM, "api")
        .map_err(listener_error)?;
    let receiver_metrics = listeners.value("metrics").map(str::to_owned);
    let receiver_pid = receiver.pid;
    say!(
        out,
        "  appliance running: quic {quic}, api {api} (log {})",
        layout.appliance_log.display()
    );

    let bundle = run_to_completion(
        Step::MakeBundle,
        RECEIVER_PROGRAM,
        &layout.receiver,
        &os_args!["pair", "--data-dir", &layout.appliance_dir],
        &layout.appliance_log,
        config.command_timeout,
    )
    .await?;
    write_private(&layout.bundle, &bundle).map_err(|cause| DemoError {
        step: Step::MakeBundle,
        cause,
        logs: Vec::new(),
    })?;
    say!(out, "  pairing bundle saved to {}", layout.bundle.display());

    create_sparse_disk(&layout.source_disk, config.disk_size_bytes).map_err(|cause| DemoError {
        step: Step::CreateDisk,
        cause,
        logs: Vec::new(),
    })?;
    say!(
        out,
        "  source disk {} ({}, sparse)",
        layout.source_disk.display(),
        format::bytes(config.disk_size_bytes)
    );

    run_to_completion(
        Step::PairAgent,
        AGENT_PROGRAM,
        &layout.agent,
        &os_args![
            "pair",
            "--data-dir",
            &layout.agent_dir,
            "--bundle",
            &layout.bundle,
            "--name",
            AGENT_NAME
        ],
        &layout.agent_log,
        config.command_timeout,
    )
    .await?;
    say!(out, "  agent paired as {AGENT_NAME}");

    let mut disk_flag = OsString::from(format!("{DISK_NAME}="));
    disk_flag.push(&layout.source_disk);
    let agent = start(
        Step::StartAgent,
        AGENT_PROGRAM,
        &layout.agent,
        &os_args![
            "run",
            "--data-dir",
            &layout.agent_dir,
            "--nbd-socket",
            &layout.nbd_socket,
            "--nbd-listen",
            loopback_any,
            "--disk",
            &disk_flag,
            "--metrics-listen",
            loopback_any,
            "--target",
            quic.to_string(),
            "--job-name",
            JOB_NAME
        ],
        &layout.agent_log,
        config,
        &mut children.agent,
    )
    .await?;
    let facts = GuideFacts {
        layout: layout.clone(),
        nbd_socket: agent
            .listeners
            .value("nbd-unix")
            .map_or_else(|| layout.nbd_socket.clone(), PathBuf::from),
        nbd_tcp: agent.listeners.value("nbd-tcp").map(str::to_owned),
        receiver_metrics,
        agent_metrics: agent.listeners.value("metrics").map(str::to_owned),
        receiver_pid,
        agent_pid: agent.pid,
        replica: PathBuf::new(),
    };
    say!(out, "  agent running (log {})", layout.agent_log.display());

    let token =
        ApiToken::load(&layout.appliance_dir.join(TOKEN_FILE_NAME)).map_err(|err| DemoError {
            step: Step::ReadToken,
            cause: Cause::Token(err),
            logs: vec![log_tail(&layout.appliance_log)],
        })?;
    let client = ApiClient::new(&api.to_string(), token).map_err(|err| DemoError {
        step: Step::ReadToken,
        cause: Cause::Api(err),
        logs: Vec::new(),
    })?;
    let replica = wait_for_job(config, &client, children, layout).await?;
    let facts = GuideFacts { replica, ..facts };
    say!(out, "\n{}", guide_text(&facts).trim_end());
    watch(config, &client, children, Instant::now(), out).await
}

/// Step 1: the demo directory, made fresh or checked empty, as an absolute path.
fn prepare_dir(dir: Option<&Path>) -> Result<PathBuf, DemoError> {
    let error = |cause| DemoError {
        step: Step::PrepareDir,
        cause,
        logs: Vec::new(),
    };
    let io_error = |action, path: &Path, source| {
        error(Cause::Io {
            action,
            path: path.to_owned(),
            source,
        })
    };
    let dir = match dir {
        None => {
            let temp = std::env::temp_dir();
            tempfile::Builder::new()
                .prefix("cdp-demo.")
                .tempdir_in(&temp)
                .map_err(|err| io_error("creating a directory in", &temp, err))?
                .keep()
        }
        Some(dir) => {
            match fs::read_dir(dir) {
                Ok(mut entries) => {
                    if entries.next().is_some() {
                        return Err(error(Cause::DirNotEmpty {
                            path: dir.to_owned(),
                        }));
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir_all(dir).map_err(|err| io_error("creating", dir, err))?;
                }
                Err(err) => return Err(io_error("reading", dir, err)),
            }
            dir.to_owned()
        }
    };
    fs::canonicalize(&dir).map_err(|err| io_error("resolving", &dir, err))
}

/// The sibling binaries must exist before anything starts.
fn find_binaries(layout: &Layout) -> Result<(), DemoError> {
    for path in [&layout.receiver, &layout.agent] {
        if !path.is_file() {
            return Err(DemoError {
                step: Step::FindBinaries,
                cause: Cause::MissingBinary { path: path.clone() },
                logs: Vec::new(),
            });
        }
    }
    Ok(())
}

/// A command for a child: stdin closed, stdout piped, stderr appended to `log`, its own
/// process group (so the terminal's Ctrl-C reaches only `cdp`, which stops the children in
/// order), killed if its handle is dropped (on an early return or a panic).
fn command(program_path: &Path, args: &[OsString], log: &Path) -> Result<Command, Cause> {
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| Cause::Io {
            action: "opening",
            path: log.to_owned(),
            source,
        })?;
    let mut command = Command::new(program_path);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .process_group(0)
        .kill_on_drop(true);
    Ok(command)
}

/// Runs a short-lived command to completion; returns its stdout.
async fn run_to_completion(
    step: Step,
    program: &'static str,
    program_path: &Path,
    args: &[OsString],
    log: &Path,
    timeout: Duration,
) -> Result<Vec<u8>, DemoError> {
    let error = |cause| DemoError {
        step,
        cause,
        logs: vec![log_tail(log)],
    };
    let child = command(program_path, args, log)
        .map_err(error)?
        .spawn()
        .map_err(|source| {
            error(Cause::Spawn {
                path: program_path.to_owned(),
                source,
            })
        })?;
    // On timeout the future, and with it the child, is dropped: `kill_on_drop` kills it.
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| {
            error(Cause::TimedOut {
                program,
                seconds: timeout.as_secs(),
            })
        })?
        .map_err(|source| {
            error(Cause::Io {
                action: "waiting for",
                path: program_path.to_owned(),
                source,
            })
        })?;
    if !output.status.success() {
        return Err(error(Cause::Exited {
            program,
            status: output.status,
        }));
    }
    Ok(output.stdout)
}

/// Starts a long-running child and waits for its `ready` line. The child is put in `slot`
/// at once, so that a shutdown during startup stops it like any other; if it fails to get
/// ready it is stopped and the slot emptied.
async fn start(
    step: Step,
    program: &'static str,
    program_path: &Path,
    args: &[OsString],
    log: &Path,
    config: &DemoConfig,
    slot: &mut Option<Running>,
) -> Result<Started, DemoError> {
    let error = |cause| DemoError {
        step,
        cause,
        logs: vec![log_tail(log)],
    };
    let mut child = command(program_path, args, log)
        .map_err(error)?
        .spawn()
        .map_err(|source| {
            error(Cause::Spawn {
                path: program_path.to_owned(),
                source,
            })
        })?;
    let stdout = child.stdout.take();
    let running = slot.insert(Running {
        program,
        child,
        log: log.to_owned(),
    });
    let cause = match stdout {
        // `command` always pipes stdout; kept as an error rather than a panic.
        None => Cause::ClosedOutput { program },
        Some(stdout) => {
            let mut reader = BufReader::new(stdout);
            let ready =
                tokio::time::timeout(config.ready_timeout, read_until_ready(program, &mut reader))
                    .await;
            match ready {
                Ok(Ok(listeners)) => {
                    // Keep draining stdout so the child never blocks on a full pipe.
                    tokio::spawn(async move {
                        while let Ok(Some(line)) = next_line(&mut reader).await {
                            tracing::debug!(program, line, "stdout");
                        }
                    });
                    return Ok(Started {
                        listeners,
                        pid: running.child.id(),
                    });
                }
                Ok(Err(ReadyError::Eof)) => {
                    // Most likely it exited; give it a moment to be reaped.
                    match tokio::time::timeout(config.stop_timeout, running.child.wait()).await {
                        Ok(Ok(status)) => Cause::Exited { program, status },
                        _ => Cause::ClosedOutput { program },
                    }
                }
                Ok(Err(ReadyError::Io(source))) => Cause::Io {
                    action: "reading the output of",
                    path: program_path.to_owned(),
                    source,
                },
                Err(_) => Cause::NotReady {
                    program,
                    seconds: config.ready_timeout.as_secs(),
                },
            }
        }
    };
    if let Some(mut running) = slot.take() {
        stop_child(&mut running.child, config.stop_timeout).await;
    }
    Err(error(cause))
}

/// Writes `contents` to a new file only its owner can read (the bundle is a secret until
/// used).
fn write_private(path: &Path, contents: &[u8]) -> Result<(), Cause> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .map_err(|source| Cause::Io {
            action: "writing",
            path: path.to_owned(),
            source,
        })
}

/// Step 5: a sparse raw image of `size_bytes`.
fn create_sparse_disk(path: &Path, size_bytes: u64) -> Result<(), Cause> {
    let io_error = |action, path: &Path| {
        let path = path.to_owned();
        move |source| Cause::Io {
            action,
            path,
            source,
        }
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_error("creating", parent))?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|file| file.set_len(size_bytes))
        .map_err(io_error("creating", path))
}

/// Polls the API until the job and its disk appear; returns the replica's path. Fails early
/// if a child exits.
async fn wait_for_job(
    config: &DemoConfig,
    client: &ApiClient,
    children: &mut Children,
    layout: &Layout,
) -> Result<PathBuf, DemoError> {
    let poll = async {
        let deadline = tokio::time::Instant::now() + config.job_timeout;
        let mut last;
        loop {
            match client.jobs().await {
                Ok(jobs) => match replica_path(&jobs) {
                    Some(path) => return Ok(path),
                    None => {
                        last = format!(
                            "the api lists {} job(s), none named {JOB_NAME:?} with its disk",
                            jobs.len()
                        );
                    }
                },
                Err(err) => last = err.to_string(),
            }
            if tokio::time::Instant::now() + config.job_poll_interval > deadline {
                return Err(Cause::NoJob {
                    seconds: config.job_timeout.as_secs(),
                    last,
                });
            }
            tokio::time::sleep(config.job_poll_interval).await;
        }
    };
    let both_logs = || vec![log_tail(&layout.appliance_log), log_tail(&layout.agent_log)];
    tokio::select! {
        polled = poll => polled.map_err(|cause| DemoError { step: Step::WaitForJob, cause, logs: both_logs() }),
        (program, log, status) = children.exited() => Err(exited_error(Step::WaitForJob, program, &log, status)),
    }
}

/// The replica path of the demo job's disk, once the API lists both.
fn replica_path(jobs: &[JobStatus]) -> Option<PathBuf> {
    jobs.iter()
        .find(|job| job.name == JOB_NAME)?
        .disks
        .iter()
        .find(|disk| disk.name == DISK_NAME)
        .map(|disk| PathBuf::from(&disk.replica_path))
}

fn exited_error(
    step: Step,
    program: &'static str,
    log: &Path,
    status: io::Result<ExitStatus>,
) -> DemoError {
    let cause = match status {
        Ok(status) => Cause::Exited { program, status },
        Err(source) => Cause::Io {
            action: "waiting for",
            path: PathBuf::from(program),
            source,
        },
    };
    DemoError {
        step,
        cause,
        logs: vec![log_tail(log)],
    }
}

/// Prints a status line every `status_interval` until a child exits (the error returned).
async fn watch(
    config: &DemoConfig,
    client: &ApiClient,
    children: &mut Children,
    started: Instant,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    loop {
        tokio::select! {
            (program, log, status) = children.exited() => {
                return Err(exited_error(Step::Watch, program, &log, status));
            }
            () = tokio::time::sleep(config.status_interval) => {
                let line = match client.jobs().await {
                    Ok(jobs) => status_line(started.elapsed(), jobs.iter().find(|job| job.name == JOB_NAME)),
                    Err(err) => format!("{}  api: {err}", elapsed_text(started.elapsed())),
                };
                say!(out, "{line}");
            }
        }
    }
}

/// Writes one line to the operator. A failed write (a closed pipe) must not stop the demo
/// from stopping its children, so it is ignored.
fn say(out: &mut dyn Write, line: fmt::Arguments<'_>) {
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn elapsed_text(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    let text = if seconds < 60 {
        format!("{seconds}s")
    } else {
        // Exact below 2^53 seconds.
        format::duration(seconds as f64)
    };
    format!("[{text:>6}]")
}

/// One status line: `[   15s]  demo: replicating, RPO 0.25s, lag 12 rec / 48 KiB, applied seq 1200`.
pub fn status_line(elapsed: Duration, job: Option<&JobStatus>) -> String {
    let prefix = elapsed_text(elapsed);
    let Some(job) = job else {
        return format!("{prefix}  job {JOB_NAME} is not listed by the appliance");
    };
    let state = match &job.state_reason {
        Some(reason) => format!("{} ({reason})", format::job_state(job)),
        None => format::job_state(job),
    };
    format!(
        "{prefix}  {}: {state}, RPO {}, lag {} rec / {}, applied seq {} of {}",
        job.name,
        format::duration(job.rpo_seconds),
        job.lag_records,
        format::bytes(job.lag_bytes),
        job.applied_seq,
        job.agent_head_seq,
    )
}

/// What the guide shows.
#[derive(Debug, Clone)]
struct GuideFacts {
    layout: Layout,
    nbd_socket: PathBuf,
    nbd_tcp: Option<String>,
    receiver_metrics: Option<String>,
    agent_metrics: Option<String>,
    receiver_pid: Option<u32>,
    agent_pid: Option<u32>,
    replica: PathBuf,
}

/// The friendly guide printed once everything runs.
fn guide_text(facts: &GuideFacts) -> String {
    let layout = &facts.layout;
    let path = |path: &Path| shell_quote(&path.to_string_lossy()).into_owned();
    let nbd_url = format!(
        "nbd+unix:///{DISK_NAME}?socket={}",
        facts.nbd_socket.display()
    );
    let pid = |pid: Option<u32>| pid.map_or_else(|| "?".to_owned(), |pid| pid.to_string());
    let metrics = |addr: &Option<String>| {
        addr.as_ref().map_or_else(
            || "(not reported)".to_owned(),
            |addr| format!("http://{addr}/metrics"),
        )
    };
    let mut text = String::new();
    let mut line = |s: String| {
        text.push_str(&s);
        text.push('\n');
    };
    line(format!(
        "The appliance (cdp-receiver, pid {}) and the agent (cdp-agent, pid {}) are running.",
        pid(facts.receiver_pid),
        pid(facts.agent_pid)
    ));
    line(String::new());
    line(
        "Write to the protected disk (any NBD client; this one comes with qemu-utils):".to_owned(),
    );
    line(format!(
        "  qemu-io -f raw -c 'write -P 0xab 0 1M' {}",
        shell_quote(&nbd_url)
    ));
    if let Some(tcp) = &facts.nbd_tcp {
        line(format!("  (or over TCP: nbd://{tcp}/{DISK_NAME})"));
    }
    line(String::new());
    line("Watch it replicate:".to_owned());
    line(format!(
        "  {} --appliance-dir {} status",
        path(&layout.cdp),
        path(&layout.appliance_dir)
    ));
    line(String::new());
    line(format!("The replica is {}", facts.replica.display()));
    line("Compare it with the source once applied seq has caught up:".to_owned());
    line(format!(
        "  cmp {} {}",
        path(&layout.source_disk),
        path(&facts.replica)
    ));
    line(format!(
        "  qemu-img compare -f raw -F raw {} {}",
        path(&layout.source_disk),
        path(&facts.replica)
    ));
    line(String::new());
    line("Go back in time: checkpoint, overwrite, then read the disk as it was:".to_owned());
    let cdp = format!(
        "{} --appliance-dir {}",
        path(&layout.cdp),
        path(&layout.appliance_dir)
    );
    line(format!("  {cdp} checkpoint {JOB_NAME} --tag before"));
    line(format!(
        "  qemu-io -f raw -c 'write -P 0xcd 0 1M' {}",
        shell_quote(&nbd_url)
    ));
    line(format!("  {cdp} view create {JOB_NAME} --at tag:before"));
    line("  qemu-io -f raw -r -c 'read -P 0xab 0 1M' NBD-URI-THE-VIEW-PRINTS".to_owned());
    line(format!("  {cdp} checkpoints {JOB_NAME}    {cdp} view list"));
    line(String::new());
    line("Metrics:".to_owned());
    line(format!("  appliance  {}", metrics(&facts.receiver_metrics)));
    line(format!("  agent      {}", metrics(&facts.agent_metrics)));
    line("Logs:".to_owned());
    line(format!("  appliance  {}", layout.appliance_log.display()));
    line(format!("  agent      {}", layout.agent_log.display()));
    line(String::new());
    line("Press Ctrl-C to stop both; the demo directory is kept.".to_owned());
    text
}

#[cfg(test)]
mod tests;
