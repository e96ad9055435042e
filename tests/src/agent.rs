//! The `cdp-agent` process under test: started with a temporary data directory and sparse
//! backing files, awaited until it prints `ready`, stopped with SIGTERM, and replayed so a
//! scenario can check that the journal rebuilds exactly the backing file. It can be paired
//! with an [`Appliance`] and ship its journal there (`--target`, `--mode`), and run inside a
//! network namespace of a [`crate::netns::NetPair`] (`.netns(name)`).
//!
//! Must never: leave the agent running after the test (Drop kills it by pid), wait for it
//! without a deadline, or signal any process other than the one it started.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;

use crate::appliance::Appliance;
use crate::cmd::{poll_until, signal, wait_deadline, Tool};
use crate::image::{blake3_file, compare_files, create_sparse};
use crate::metrics::{scrape, Metrics};
use crate::netns::{command_in, tool_in, within};

/// Longest wait for `ready` after spawning the agent.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the agent to exit after SIGTERM/SIGINT.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a `cdp-agent replay` may take.
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(120);
/// Disk size used when a test does not say (sparse, so cheap).
pub const DEFAULT_DISK_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes of the agent's log shown in an error message.
const LOG_TAIL_BYTES: u64 = 8 * 1024;

/// The directory holding the built binaries: `$CDP_BIN_DIR`, else `$CARGO_TARGET_DIR/debug`,
/// else `$HOME/.cache/cdp/target/debug` (the convention of `scripts/env.sh`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CDP_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("debug");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/cdp/target/debug")
}

/// Path of the built binary `name`; fails with how to build it when absent.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    ensure!(
        path.is_file(),
        "{} not found: build it first (`cargo build --workspace --bins`, as scripts/test does), \
         or point CDP_BIN_DIR at the directory holding it",
        path.display()
    );
    Ok(path)
}

/// Whether temporary directories are kept for inspection (`CDP_KEEP_TMP=1`).
pub fn keep_tmp() -> bool {
    std::env::var_os("CDP_KEEP_TMP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A new temporary directory (kept, and its path printed, when `CDP_KEEP_TMP` is set).
pub fn temp_dir(prefix: &str) -> Result<TempDir> {
    let mut dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating a temporary directory")?;
    if keep_tmp() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// How a disk's backing file starts.
#[derive(Debug, Clone)]
enum Initial {
    /// A sparse file of this many bytes.
    Zeroed(u64),
    /// A sparse file of this many bytes at this path (outside the agent's directory).
    ZeroedAt(PathBuf, u64),
    /// A copy of this image, also given to `replay --base`.
    Image(PathBuf),
}

/// Longest a `cdp-agent pair` may take.
pub const PAIR_TIMEOUT: Duration = Duration::from_secs(60);

/// What to start: disks and listeners. Defaults to one Unix socket and a metrics listener.
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    disks: Vec<(String, Initial)>,
    unix_sockets: usize,
    tcp_listeners: Vec<String>,
    metrics: bool,
    /// The data directory of the appliance to pair with before the first start.
    pair_with: Option<PathBuf>,
    /// The name the agent pairs under (`cdp-agent pair --name`).
    agent_name: String,
    /// After pairing, the agent's identity is replaced by a copy of this directory.
    identity_from: Option<PathBuf>,
    /// `--target`.
    target: Option<SocketAddr>,
    /// `--mode`.
    mode: Option<String>,
    /// `--job-name`.
    job_name: Option<String>,
    /// Extra environment of every start.
    env: Vec<(String, String)>,
    /// The network namespace the agent (and its pairing) runs in.
    netns: Option<String>,
    /// Extra `cdp-agent run` arguments.
    extra_args: Vec<String>,
}

impl Default for AgentBuilder {
    fn default() -> Self {
        Self {
            disks: Vec::new(),
            unix_sockets: 1,
            tcp_listeners: Vec::new(),
            metrics: true,
            pair_with: None,
            agent_name: "test-agent".to_owned(),
            identity_from: None,
            target: None,
            mode: None,
            job_name: None,
            env: Vec::new(),
            netns: None,
            extra_args: Vec::new(),
        }
    }
}

impl AgentBuilder {
    /// Adds a disk `name` backed by a sparse file of `size_bytes`.
    pub fn disk(mut self, name: &str, size_bytes: u64) -> Self {
        self.disks
            .push((name.to_owned(), Initial::Zeroed(size_bytes)));
        self
    }

    /// Adds a disk `name` backed by a sparse file of `size_bytes` created at `backing` (for
    /// example on a small file system, to make the backing disk fail).
    pub fn disk_at(mut self, name: &str, backing: &Path, size_bytes: u64) -> Self {
        self.disks.push((
            name.to_owned(),
            Initial::ZeroedAt(backing.to_owned(), size_bytes),
        ));
        self
    }

    /// Adds a disk `name` whose backing file starts as a copy of `image`; the replay starts
    /// from the same image (`--base`).
    pub fn disk_image(mut self, name: &str, image: &Path) -> Self {
        self.disks
            .push((name.to_owned(), Initial::Image(image.to_owned())));
        self
    }

    /// Number of Unix-socket listeners (default 1).
    pub fn unix_sockets(mut self, n: usize) -> Self {
        self.unix_sockets = n;
        self
    }

    /// Adds a TCP listener on `addr` (e.g. `127.0.0.1:0`, `[::1]:0`).
    pub fn tcp(mut self, addr: &str) -> Self {
        self.tcp_listeners.push(addr.to_owned());
        self
    }

    /// Whether to start the metrics listener (default yes).
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// Pairs with `appliance` (a bundle from `cdp-receiver pair`, then `cdp-agent pair`)
    /// before the first start, and ships the journal to it (`--target`).
    pub fn replicate_to(self, appliance: &Appliance) -> Self {
        self.pair_with(appliance).target(appliance.quic_addr())
    }

    /// Pairs with `appliance` before the first start, without choosing a `--target`.
    pub fn pair_with(mut self, appliance: &Appliance) -> Self {
        self.pair_with = Some(appliance.data_dir().to_owned());
        self
    }

    /// The name the agent pairs under (default `test-agent`).
    pub fn agent_name(mut self, name: &str) -> Self {
        self.agent_name = name.to_owned();
        self
    }

    /// After pairing, replaces the agent's identity (`DATA/identity`) with a copy of
    /// `identity_dir` (another agent's): its pin of the appliance is right, but the appliance
    /// never pinned its certificate.
    pub fn identity_from(mut self, identity_dir: &Path) -> Self {
        self.identity_from = Some(identity_dir.to_owned());
        self
    }

    /// Ships the journal to `addr` (`--target`), paired or not.
    pub fn target(mut self, addr: SocketAddr) -> Self {
        self.target = Some(addr);
        self
    }

    /// Replication mode (`--mode async|sync`).
    pub fn mode(mut self, mode: &str) -> Self {
        self.mode = Some(mode.to_owned());
        self
    }

    /// The job's name (`--job-name`).
    pub fn job_name(mut self, name: &str) -> Self {
        self.job_name = Some(name.to_owned());
        self
    }

    /// Passes `arg` to `cdp-agent run` (after the builder's own arguments).
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_owned());
        self
    }

    /// Sets `key=value` in the agent's environment at every start.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Runs the agent, and `cdp-agent pair`, inside the network namespace `name` (`ip netns
    /// exec`); its metrics are scraped from inside it. Its Unix sockets and files stay where
    /// every client can reach them.
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// Creates the backing files, spawns `cdp-agent run` and waits for `ready`.
    pub fn start(self) -> Result<Agent> {
        Agent::start(self)
    }
}

/// One exported disk.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The NBD export name.
    pub name: String,
    /// The backing file the agent writes.
    pub backing: PathBuf,
    /// Size of the disk in bytes.
    pub size_bytes: u64,
    /// The image the backing file started as, when not zeros; passed to `replay --base`.
    pub base: Option<PathBuf>,
}

/// The listeners the agent reported before `ready`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listeners {
    /// `listening nbd-tcp ADDR`
    pub nbd_tcp: Vec<SocketAddr>,
    /// `listening nbd-unix PATH`
    pub nbd_unix: Vec<PathBuf>,
    /// `listening metrics ADDR`
    pub metrics: Option<SocketAddr>,
}

/// The listeners asked for, checked against what the agent reports.
#[derive(Debug, Clone)]
struct Expected {
    nbd_unix: Vec<PathBuf>,
    nbd_tcp: usize,
    metrics: bool,
}

/// A running (or stopped) `cdp-agent run` with its temporary directory.
#[derive(Debug)]
pub struct Agent {
    /// Invariant: `Some` until the process has been reaped.
    child: Option<Child>,
    program: PathBuf,
    /// Arguments of `cdp-agent`, the same for every (re)start.
    args: Vec<OsString>,
    /// Extra environment, the same for every (re)start.
    env: Vec<(String, String)>,
    /// The network namespace the agent runs in, the same for every (re)start.
    netns: Option<String>,
    expected: Expected,
    /// How many times the process was spawned.
    starts: u32,
    data_dir: PathBuf,
    log: PathBuf,
    disks: Vec<Disk>,
    listeners: Listeners,
    /// Lines the agent printed on stdout, including after `ready`.
    stdout: Arc<Mutex<Vec<String>>>,
    exit: Option<ExitStatus>,
    // Last: removed after everything above is done with it.
    dir: TempDir,
}

impl Agent {
    /// A builder with no disk yet.
    pub fn builder() -> AgentBuilder {
        AgentBuilder::default()
    }

    /// An agent with one sparse disk `d0` of [`DEFAULT_DISK_BYTES`] on a Unix socket.
    pub fn one_disk() -> Result<Agent> {
        Self::builder().disk("d0", DEFAULT_DISK_BYTES).start()
    }

    /// An agent with one sparse disk `d0` of `size_bytes` on a Unix socket.
    pub fn one_disk_of(size_bytes: u64) -> Result<Agent> {
        Self::builder().disk("d0", size_bytes).start()
    }

    fn start(b: AgentBuilder) -> Result<Agent> {
        ensure!(!b.disks.is_empty(), "an agent needs at least one disk");
        let program = binary("cdp-agent")?;
        let dir = temp_dir("cdp-agent-")?;
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir)?;
        let mut disks = Vec::new();
        for (name, initial) in &b.disks {
            let mut backing = dir.path().join(format!("{name}.img"));
            let (size_bytes, base) = match initial {
                Initial::Zeroed(size) => {
                    create_sparse(&backing, *size)?;
                    (*size, None)
                }
                Initial::ZeroedAt(path, size) => {
                    backing.clone_from(path);
                    create_sparse(&backing, *size)?;
                    (*size, None)
                }
                Initial::Image(image) => {
                    let base = dir.path().join(format!("{name}.base.img"));
                    std::fs::copy(image, &base).with_context(|| {
                        format!("copying {} to {}", image.display(), base.display())
                    })?;
                    std::fs::copy(image, &backing).with_context(|| {
                        format!("copying {} to {}", image.display(), backing.display())
                    })?;
                    (std::fs::metadata(&backing)?.len(), Some(base))
                }
            };
            disks.push(Disk {
                name: name.clone(),
                backing,
                size_bytes,
                base,
            });
        }
        let sockets: Vec<PathBuf> = (0..b.unix_sockets)
            .map(|i| dir.path().join(format!("nbd{i}.sock")))
            .collect();

        let mut args: Vec<OsString> =
            vec!["run".into(), "--data-dir".into(), data_dir.clone().into()];
        for addr in &b.tcp_listeners {
            args.extend(["--nbd-listen".into(), addr.into()]);
        }
        for sock in &sockets {
            args.extend(["--nbd-socket".into(), sock.clone().into()]);
        }
        for d in &disks {
            args.extend([
                "--disk".into(),
                format!("{}={}", d.name, d.backing.display()).into(),
            ]);
        }
        if b.metrics {
            args.extend(["--metrics-listen".into(), "127.0.0.1:0".into()]);
        }
        if let Some(target) = b.target {
            args.extend(["--target".into(), target.to_string().into()]);
        }
        if let Some(mode) = &b.mode {
            args.extend(["--mode".into(), mode.into()]);
        }
        if let Some(name) = &b.job_name {
            args.extend(["--job-name".into(), name.into()]);
        }
        args.extend(b.extra_args.iter().map(OsString::from));
        if let Some(appliance_dir) = &b.pair_with {
            pair(
                &program,
                appliance_dir,
                dir.path(),
                &data_dir,
                &b.agent_name,
                b.netns.as_deref(),
            )?;
        }
        if let Some(identity) = &b.identity_from {
            replace_identity(&data_dir.join("identity"), identity)?;
        }
        let log = dir.path().join("agent.log");
        let mut agent = Agent {
            child: None,
            program,
            args,
            env: b.env,
            netns: b.netns,
            expected: Expected {
                nbd_unix: sockets,
                nbd_tcp: b.tcp_listeners.len(),
                metrics: b.metrics,
            },
            data_dir,
            log,
            disks,
            listeners: Listeners::default(),
            stdout: Arc::new(Mutex::new(Vec::new())),
            exit: None,
            starts: 0,
            dir,
        };
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts the agent again on the same data directory, backing files and listeners (after
    /// [`Agent::stop`] or [`Agent::kill`]) and waits for `ready`.
    pub fn restart(&mut self) -> Result<()> {
        ensure!(!self.is_running(), "restart: the agent is still running");
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let mut cmd = command_in(self.netns.as_deref(), &self.program);
        cmd.args(&self.args);
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        let command_line = format!("{cmd:?}");
        // Appends, so the log of a run before a crash stays readable.
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .env("RUST_BACKTRACE", "1");
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe and touches no memory of the parent. It makes the kernel
        // kill the agent if the test thread that started it dies without running Drop.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {command_line}"))?;
        let stdout_pipe = child.stdout.take().context("agent stdout not piped")?;
        let (tx, rx) = mpsc::channel();
        {
            let stdout = Arc::clone(&self.stdout);
            let start = self.starts;
            thread::spawn(move || {
                for line in BufReader::new(stdout_pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut lines) = stdout.lock() {
                        lines.push(if start > 1 {
                            format!("[run {start}] {line}")
                        } else {
                            line.clone()
                        });
                    }
                    // The receiver is gone after `ready`; keep draining so the agent never
                    // blocks on a full pipe.
                    let _ = tx.send(line);
                }
            });
        }
        self.child = Some(child);
        self.exit = None;
        self.listeners = self
            .await_ready(&rx)
            .with_context(|| format!("starting {command_line}"))?;
        let (l, e) = (&self.listeners, &self.expected);
        ensure!(
            l.nbd_unix == e.nbd_unix,
            "agent reported Unix listeners {:?}, expected {:?}",
            l.nbd_unix,
            e.nbd_unix
        );
        ensure!(
            l.nbd_tcp.len() == e.nbd_tcp,
            "agent reported TCP listeners {:?}, expected {}",
            l.nbd_tcp,
            e.nbd_tcp
        );
        ensure!(
            l.metrics.is_some() == e.metrics,
            "agent reported metrics listener {:?}, expected {}",
            l.metrics,
            if e.metrics { "one" } else { "none" }
        );
        Ok(())
    }

    fn await_ready(&mut self, rx: &mpsc::Receiver<String>) -> Result<Listeners> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut listeners = Listeners::default();
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    let line = line.trim();
                    if line == "ready" {
                        return Ok(listeners);
                    }
                    if let Some(rest) = line.strip_prefix("listening ") {
                        let (kind, addr) = rest
                            .split_once(' ')
                            .with_context(|| format!("bad listener line {line:?}"))?;
                        let addr = addr.trim();
                        match kind {
                            "nbd-tcp" => listeners.nbd_tcp.push(
                                addr.parse()
                                    .with_context(|| format!("bad address in {line:?}"))?,
                            ),
                            "nbd-unix" => listeners.nbd_unix.push(PathBuf::from(addr)),
                            "metrics" => {
                                ensure!(
                                    listeners.metrics.is_none(),
                                    "two metrics listeners: {line:?}"
                                );
                                listeners.metrics = Some(
                                    addr.parse()
                                        .with_context(|| format!("bad address in {line:?}"))?,
                                );
                            }
                            _ => bail!("unknown listener kind in {line:?}"),
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.reap(Duration::from_secs(5));
                    bail!(
                        "agent closed stdout before `ready` (exit: {status:?})\n{}",
                        self.diagnostics()
                    );
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    self.exit = Some(status);
                    bail!(
                        "agent exited with {status} before `ready`\n{}",
                        self.diagnostics()
                    );
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "agent not ready within {READY_TIMEOUT:?}\n{}",
                    self.diagnostics()
                );
            }
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The disks, in the order given to the builder.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// The disk named `name`.
    pub fn disk(&self, name: &str) -> Result<&Disk> {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .with_context(|| format!("no disk {name:?}"))
    }

    /// The listeners reported before `ready`.
    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// The agent's temporary directory (data dir, backing files, sockets, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The agent's data directory (its journal).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `nbd+unix:///NAME?socket=PATH` for the first Unix listener.
    pub fn uri(&self, disk: &str) -> String {
        match self.listeners.nbd_unix.first() {
            Some(sock) => unix_uri(disk, sock),
            None => String::from("nbd+unix:///?socket=/nonexistent-no-unix-listener"),
        }
    }

    /// `nbd+unix:///NAME?socket=PATH` for Unix listener `i`.
    pub fn unix_uri(&self, disk: &str, i: usize) -> Result<String> {
        let sock = self
            .listeners
            .nbd_unix
            .get(i)
            .with_context(|| format!("no Unix listener {i}"))?;
        Ok(unix_uri(disk, sock))
    }

    /// `nbd://ADDR/NAME` for TCP listener `i`.
    pub fn tcp_uri(&self, disk: &str, i: usize) -> Result<String> {
        let addr = self
            .listeners
            .nbd_tcp
            .get(i)
            .with_context(|| format!("no TCP listener {i}"))?;
        Ok(format!("nbd://{addr}/{disk}"))
    }

    /// Scrapes `/metrics`.
    pub fn metrics(&self) -> Result<Metrics> {
        let addr = self
            .listeners
            .metrics
            .context("agent started without a metrics listener")?;
        within(self.netns.as_deref(), || scrape(addr))
    }

    /// Metric `name` with `labels`, or 0 when the agent does not expose it (yet) or cannot
    /// be scraped.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics()
            .ok()
            .and_then(|m| m.value(name, labels).ok())
            .unwrap_or(0.0)
    }

    /// Whether the agent reports `job` in `state` (`cdp_job_state{state} 1`).
    pub fn in_job_state(&self, job: &str, state: &str) -> bool {
        self.metric("cdp_job_state", &[("job", job), ("state", state)]) == 1.0
    }

    /// Waits until the agent reports `job` in `state`; fails after `timeout` with its logs.
    pub fn wait_job_state(&self, job: &str, state: &str, timeout: Duration) -> Result<()> {
        poll_until(&format!("the job going {state}"), timeout, || {
            Ok(self.in_job_state(job, state).then_some(()))
        })
        .with_context(|| self.diagnostics())
    }

    /// The job id (32 hex digits), from the `job` label of `cdp_journal_head_seq`.
    pub fn job_id(&self) -> Result<String> {
        let m = self.metrics()?;
        let sample = m
            .samples
            .iter()
            .find(|s| s.name == "cdp_journal_head_seq")
            .with_context(|| format!("no cdp_journal_head_seq in /metrics:\n{}", m.text))?;
        sample
            .labels
            .get("job")
            .cloned()
            .with_context(|| format!("cdp_journal_head_seq has no job label:\n{}", m.text))
    }

    /// The whole log (stderr) of every run so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// Lines the agent printed on stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The agent's stdout lines and the tail of its log, for error messages.
    pub fn diagnostics(&self) -> String {
        let stdout = self.stdout_lines().join("\n");
        format!(
            "--- agent stdout ---\n{stdout}\n--- agent log ({}) tail ---\n{}",
            self.log.display(),
            file_tail(&self.log, LOG_TAIL_BYTES)
        )
    }

    /// Whether the agent process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                self.child = None;
                self.exit = Some(status);
                false
            }
            Some(Err(_)) | None => false,
        }
    }

    /// Stops the agent with SIGTERM and requires a clean exit (status 0) in time.
    pub fn stop(&mut self) -> Result<()> {
        self.stop_with(libc::SIGTERM)
    }

    /// Stops the agent with `sig` (SIGTERM or SIGINT) and requires exit status 0 in time.
    pub fn stop_with(&mut self, sig: libc::c_int) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if child.try_wait()?.is_none() {
                signal(child.id(), sig)?;
            }
            match wait_deadline(child, STOP_TIMEOUT)? {
                Some(status) => {
                    self.child = None;
                    self.exit = Some(status);
                }
                None => {
                    self.kill();
                    bail!(
                        "agent still running {STOP_TIMEOUT:?} after signal {sig} (killed)\n{}",
                        self.diagnostics()
                    );
                }
            }
        }
        match self.exit {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!(
                "agent exited with {status}, expected a clean exit\n{}",
                self.diagnostics()
            ),
            None => bail!("agent exit status unknown"),
        }
    }

    /// Kills the agent with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL to this child's pid only.
            let _ = child.kill();
            self.exit = wait_deadline(&mut child, Duration::from_secs(10))
                .ok()
                .flatten();
        }
    }

    fn reap(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = wait_deadline(child, timeout).ok().flatten();
        if status.is_some() {
            self.child = None;
            self.exit = status;
        }
        status
    }

    /// Rebuilds disk `disk` from the journal with `cdp-agent replay` (stopping the agent first
    /// if it runs) and returns the rebuilt image's path.
    pub fn replay(&mut self, disk: &str) -> Result<PathBuf> {
        if self.is_running() {
            self.stop()?;
        }
        let d = self.disk(disk)?.clone();
        let out = self.dir.path().join(format!("{disk}.replayed.img"));
        if out.exists() {
            std::fs::remove_file(&out)?;
        }
        let mut tool = Tool::new(&self.program)
            .arg("replay")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--disk")
            .arg(format!("{disk}={}", out.display()))
            .timeout(REPLAY_TIMEOUT);
        if let Some(base) = &d.base {
            tool = tool.arg("--base").arg(base);
        }
        tool.run_ok().context("replaying the journal")?;
        ensure!(
            out.is_file(),
            "`cdp-agent replay` exited 0 but wrote no {}",
            out.display()
        );
        Ok(out)
    }

    /// Replays every disk and requires each rebuilt image to equal its backing file
    /// byte for byte; returns the blake3 of each disk.
    pub fn verify_replay(&mut self) -> Result<Vec<(String, String)>> {
        let mut hashes = Vec::new();
        for d in self.disks.clone() {
            let rebuilt = self.replay(&d.name)?;
            let backing_hash = blake3_file(&d.backing)?;
            let rebuilt_hash = blake3_file(&rebuilt)?;
            if backing_hash != rebuilt_hash {
                let diff = compare_files(&d.backing, &rebuilt)?
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "no byte differs".into());
                bail!(
                    "disk {}: replayed journal differs from the backing file\n  backing  {} blake3 {backing_hash}\n  \
                     replayed {} blake3 {rebuilt_hash}\n  {diff}\n{}",
                    d.name,
                    d.backing.display(),
                    rebuilt.display(),
                    self.diagnostics()
                );
            }
            hashes.push((d.name.clone(), backing_hash));
        }
        Ok(hashes)
    }

    /// Ends a scenario: stops the agent cleanly, replays every disk's journal and requires
    /// blake3(backing) == blake3(rebuilt).
    pub fn finish(mut self) -> Result<Vec<(String, String)>> {
        self.stop()?;
        self.verify_replay()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Pairs the agent data directory `data_dir` with the appliance in `appliance_dir`: a bundle
/// from `cdp-receiver pair` written to `work_dir/bundle`, then `cdp-agent pair` (inside the
/// network namespace `netns`, since it dials the appliance; making the bundle only reads the
/// appliance's data directory).
fn pair(
    agent_program: &Path,
    appliance_dir: &Path,
    work_dir: &Path,
    data_dir: &Path,
    name: &str,
    netns: Option<&str>,
) -> Result<()> {
    let bundle = Tool::new(binary("cdp-receiver")?)
        .arg("pair")
        .arg("--data-dir")
        .arg(appliance_dir)
        .args(["--expires", "10m"])
        .timeout(PAIR_TIMEOUT)
        .run_ok()
        .context("making a pairing bundle")?;
    let bundle_path = work_dir.join("bundle");
    std::fs::write(&bundle_path, &bundle.stdout)
        .with_context(|| format!("writing {}", bundle_path.display()))?;
    tool_in(netns, agent_program)
        .arg("pair")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--bundle")
        .arg(&bundle_path)
        .args(["--name", name])
        .timeout(PAIR_TIMEOUT)
        .run_ok()
        .context("pairing the agent")?;
    Ok(())
}

/// Replaces the identity directory `target` by a copy of `source` (same file modes: the
/// key must stay private or the agent refuses it).
fn replace_identity(target: &Path, source: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::remove_dir_all(target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", target.display())),
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(target)
        .with_context(|| format!("creating {}", target.display()))?;
    for entry in
        std::fs::read_dir(source).with_context(|| format!("listing {}", source.display()))?
    {
        let entry = entry?;
        let to = target.join(entry.file_name());
        std::fs::copy(entry.path(), &to)
            .with_context(|| format!("copying {} to {}", entry.path().display(), to.display()))?;
    }
    Ok(())
}

/// `nbd+unix:///NAME?socket=PATH`
pub fn unix_uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// The last `bytes` of a file, lossy, or a note that it cannot be read.
pub fn file_tail(path: &Path, bytes: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(bytes)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}
