//! The `cdp-receiver` appliance under test: initialised in a temporary data directory,
//! started on loopback and awaited until it prints `ready`, stopped with SIGTERM or killed
//! with SIGKILL, and restarted on the same data directory and the same QUIC port so its
//! agents reconnect; or inside a network namespace of a [`crate::netns::NetPair`], its QUIC
//! listener on the namespace's veth address ([`ApplianceBuilder`]). Reads what it reports
//! (metrics, the REST API, `cdp status`) and what it keeps on disk (replicas, the landing
//! journal, the applied seq).
//!
//! Must never: leave the appliance running after the test (Drop kills it by pid), wait for it
//! without a deadline, signal any process other than the one it started, or open the landing
//! journal while the appliance runs (two writers would corrupt it).

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use journal::{Generation, JobId, Journal, JournalConfig};
use tempfile::TempDir;

use crate::agent::{binary, file_tail, temp_dir, Agent, READY_TIMEOUT, STOP_TIMEOUT};
use crate::cmd::{poll_until, signal, wait_deadline, Tool};
use crate::image::{blake3_file, compare_files};
use crate::metrics::{scrape, Metrics};
use crate::netns::{command_in, tool_in, within};

/// Connect, read and write timeout of one REST API request.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest REST API reply accepted.
const API_REPLY_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Bytes of the appliance's log shown in an error message.
const LOG_TAIL_BYTES: u64 = 8 * 1024;

/// The listeners the appliance reported before `ready`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplianceListeners {
    /// `listening quic ADDR`: where agents connect (replication and pairing).
    pub quic: Option<SocketAddr>,
    /// `listening api ADDR`: the REST API.
    pub api: Option<SocketAddr>,
    /// `listening metrics ADDR`: `/metrics`.
    pub metrics: Option<SocketAddr>,
    /// `listening nbd-views ADDR`: recovery views over NBD.
    pub views: Option<SocketAddr>,
}

/// What to start: extra arguments of `cdp-receiver run`, where its QUIC listener binds, and
/// the network namespace it runs in. Defaults to loopback in the test's own namespace.
#[derive(Debug, Clone)]
pub struct ApplianceBuilder {
    extra_args: Vec<String>,
    quic_ip: IpAddr,
    netns: Option<String>,
}

impl Default for ApplianceBuilder {
    fn default() -> Self {
        Self {
            extra_args: Vec::new(),
            quic_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            netns: None,
        }
    }
}

impl ApplianceBuilder {
    /// Appends extra arguments of `cdp-receiver run` (for example `--history-window 30s`).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Binds the QUIC listener (where agents connect) on `ip`, port picked by the kernel
    /// (default 127.0.0.1). The API, metrics and views listeners stay on loopback.
    pub fn quic_ip(mut self, ip: impl Into<IpAddr>) -> Self {
        self.quic_ip = ip.into();
        self
    }

    /// Runs the appliance, and the `cdp` CLI calls, inside the network namespace `name`
    /// (`ip netns exec`); its metrics and REST API are reached from inside it.
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// Initialises a data directory (`cdp-receiver init`), spawns `cdp-receiver run` and
    /// waits for `ready`.
    pub fn start(self) -> Result<Appliance> {
        Appliance::start_from(self)
    }
}

/// A running (or stopped) `cdp-receiver run` with its temporary data directory.
#[derive(Debug)]
pub struct Appliance {
    /// Invariant: `Some` until the process has been reaped.
    child: Option<Child>,
    program: PathBuf,
    /// Extra arguments of `cdp-receiver run`, the same for every (re)start.
    extra_args: Vec<String>,
    /// Where the first start binds the QUIC listener.
    quic_ip: IpAddr,
    /// The network namespace the appliance runs in, the same for every (re)start.
    netns: Option<String>,
    /// How many times the process was spawned.
    starts: u32,
    data_dir: PathBuf,
    log: PathBuf,
    /// Invariant: after the first start, `quic` is the address every restart binds again,
    /// so that the agents pinned to it reconnect.
    listeners: ApplianceListeners,
    /// Lines the appliance printed on stdout, over every run.
    stdout: Arc<Mutex<Vec<String>>>,
    exit: Option<ExitStatus>,
    // Last: removed after everything above is done with it.
    dir: TempDir,
}

impl Appliance {
    /// Initialises a data directory (`cdp-receiver init`) and starts the appliance with its
    /// QUIC, REST API and metrics listeners on loopback ports the kernel picks.
    pub fn start() -> Result<Appliance> {
        Self::start_with(&[])
    }

    /// [`Appliance::start`] with extra arguments for `cdp-receiver run` (for example
    /// `--history-window 30s`).
    pub fn start_with(extra_args: &[&str]) -> Result<Appliance> {
        Self::builder().args(extra_args).start()
    }

    /// A builder: loopback, no extra argument, the test's own network namespace.
    pub fn builder() -> ApplianceBuilder {
        ApplianceBuilder::default()
    }

    fn start_from(b: ApplianceBuilder) -> Result<Appliance> {
        let program = binary("cdp-receiver")?;
        let dir = temp_dir("cdp-appliance-")?;
        let data_dir = dir.path().join("data");
        Tool::new(&program)
            .arg("init")
            .arg("--data-dir")
            .arg(&data_dir)
            .run_ok()
            .context("initialising the appliance's data directory")?;
        let mut appliance = Appliance {
            child: None,
            program,
            extra_args: b.extra_args,
            quic_ip: b.quic_ip,
            netns: b.netns,
            starts: 0,
            log: dir.path().join("appliance.log"),
            data_dir,
            listeners: ApplianceListeners::default(),
            stdout: Arc::new(Mutex::new(Vec::new())),
            exit: None,
            dir,
        };
        appliance.spawn()?;
        Ok(appliance)
    }

    /// Starts the appliance again on the same data directory and the same QUIC port (after
    /// [`Appliance::stop`] or [`Appliance::kill`]) and waits for `ready`. The API and metrics
    /// listeners may move to new ports.
    pub fn restart(&mut self) -> Result<()> {
        ensure!(
            !self.is_running(),
            "restart: the appliance is still running"
        );
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let quic = self
            .listeners
            .quic
            .unwrap_or_else(|| SocketAddr::new(self.quic_ip, 0))
            .to_string();
        let mut cmd = command_in(self.netns.as_deref(), &self.program);
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen", &quic])
            .args(["--api-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--view-listen", "127.0.0.1:0"])
            .args(&self.extra_args);
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
        // kill the appliance if the test thread that started it dies without running Drop.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {command_line}"))?;
        let stdout_pipe = child.stdout.take().context("appliance stdout not piped")?;
        let (tx, rx) = mpsc::channel();
        {
            let stdout = Arc::clone(&self.stdout);
            let start = self.starts;
            thread::spawn(move || {
                for line in BufReader::new(stdout_pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut lines) = stdout.lock() {
                        lines.push(format!("[run {start}] {line}"));
                    }
                    // The receiver is gone after `ready`; keep draining so the appliance
                    // never blocks on a full pipe.
                    let _ = tx.send(line);
                }
            });
        }
        self.child = Some(child);
        self.exit = None;
        let reported = self
            .await_ready(&rx)
            .with_context(|| format!("starting {command_line}"))?;
        let quic = reported.quic.with_context(|| {
            format!(
                "the appliance reported no QUIC listener\n{}",
                self.diagnostics()
            )
        })?;
        if let Some(before) = self.listeners.quic {
            ensure!(
                quic == before,
                "the restarted appliance listens on {quic}, not on {before} as asked"
            );
        }
        ensure!(
            reported.api.is_some() && reported.metrics.is_some(),
            "the appliance reported listeners {reported:?}; expected quic, api and metrics"
        );
        self.listeners = reported;
        Ok(())
    }

    fn await_ready(&mut self, rx: &mpsc::Receiver<String>) -> Result<ApplianceListeners> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut listeners = ApplianceListeners::default();
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
                        let addr: SocketAddr = addr
                            .trim()
                            .parse()
                            .with_context(|| format!("bad address in {line:?}"))?;
                        let slot = match kind {
                            "quic" => &mut listeners.quic,
                            "api" => &mut listeners.api,
                            "metrics" => &mut listeners.metrics,
                            "nbd-views" => &mut listeners.views,
                            _ => bail!("unknown listener kind in {line:?}"),
                        };
                        ensure!(slot.is_none(), "two {kind} listeners: {line:?}");
                        *slot = Some(addr);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.reap(Duration::from_secs(5));
                    bail!(
                        "appliance closed stdout before `ready` (exit: {status:?})\n{}",
                        self.diagnostics()
                    );
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    self.exit = Some(status);
                    bail!(
                        "appliance exited with {status} before `ready`\n{}",
                        self.diagnostics()
                    );
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "appliance not ready within {READY_TIMEOUT:?}\n{}",
                    self.diagnostics()
                );
            }
        }
    }

    /// The appliance's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The appliance's temporary directory (data dir and log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The appliance's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The listeners of the current (or last) run.
    pub fn listeners(&self) -> ApplianceListeners {
        self.listeners
    }

    /// Where agents connect; the same over restarts.
    pub fn quic_addr(&self) -> SocketAddr {
        // Set by the first successful spawn, which `start` requires.
        self.listeners
            .quic
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Scrapes `/metrics`.
    pub fn metrics(&self) -> Result<Metrics> {
        let addr = self
            .listeners
            .metrics
            .context("appliance has no metrics listener")?;
        within(self.netns.as_deref(), || scrape(addr))
    }

    /// The bearer token of the REST API (`DIR/api-token`).
    pub fn api_token(&self) -> Result<String> {
        let path = self.data_dir.join("api-token");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// `GET /api/v1/jobs` with the API token: the `jobs` array.
    pub fn api_jobs(&self) -> Result<Vec<serde_json::Value>> {
        let addr = self
            .listeners
            .api
            .context("appliance has no API listener")?;
        let token = self.api_token()?;
        let body = within(self.netns.as_deref(), || {
            http_get(addr, "/api/v1/jobs", Some(&token))
        })?;
        let value: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("GET /api/v1/jobs: not JSON: {body:?}"))?;
        let jobs = value
            .get("jobs")
            .and_then(serde_json::Value::as_array)
            .with_context(|| format!("GET /api/v1/jobs: no `jobs` array in {value}"))?;
        Ok(jobs.clone())
    }

    /// `cdp --appliance-dir DIR ARGS...`, which must succeed.
    pub fn cdp(&self, args: &[&str]) -> Result<crate::Output> {
        tool_in(self.netns.as_deref(), binary("cdp")?)
            .arg("--appliance-dir")
            .arg(&self.data_dir)
            .args(args)
            .timeout(Duration::from_secs(90))
            .run_ok()
    }

    /// `cdp --appliance-dir DIR ARGS... --json`, which must succeed, parsed.
    pub fn cdp_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--json");
        let out = self.cdp(&all)?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("no JSON from cdp:\n{}", out.describe()))
    }

    /// `cdp --appliance-dir DIR status --json`, parsed: the `jobs` array.
    pub fn cdp_status_jobs(&self) -> Result<Vec<serde_json::Value>> {
        let out = tool_in(self.netns.as_deref(), binary("cdp")?)
            .arg("--appliance-dir")
            .arg(&self.data_dir)
            .args(["status", "--json"])
            .timeout(Duration::from_secs(30))
            .run_ok()?;
        let value: serde_json::Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("`cdp status --json` printed no JSON:\n{}", out.describe()))?;
        let jobs = value
            .get("jobs")
            .and_then(serde_json::Value::as_array)
            .with_context(|| format!("`cdp status --json`: no `jobs` array in {value}"))?;
        Ok(jobs.clone())
    }

    /// A one-time pairing bundle from `cdp-receiver pair` (the appliance must be running).
    pub fn pair_bundle(&self) -> Result<String> {
        let out = Tool::new(&self.program)
            .arg("pair")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--expires", "10m"])
            .timeout(Duration::from_secs(30))
            .run_ok()
            .context("making a pairing bundle")?;
        ensure!(
            out.stdout.starts_with("cdp-pairing-bundle v1"),
            "`cdp-receiver pair` printed no bundle:\n{}",
            out.describe()
        );
        Ok(out.stdout)
    }

    /// `DIR/jobs`.
    pub fn jobs_dir(&self) -> PathBuf {
        self.data_dir.join("jobs")
    }

    /// The names of the job directories under `DIR/jobs` (none before an agent connects).
    pub fn job_dirs(&self) -> Result<Vec<String>> {
        let dir = self.jobs_dir();
        let mut names = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    names.push(entry?.file_name().to_string_lossy().into_owned());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        }
        names.sort();
        Ok(names)
    }

    /// The directory of job `job` (32 hex digits).
    pub fn job_dir(&self, job: &str) -> PathBuf {
        self.jobs_dir().join(job)
    }

    /// The replica of disk `disk` of job `job`.
    pub fn replica_path(&self, job: &str, disk: &str) -> PathBuf {
        self.job_dir(job)
            .join("replicas")
            .join(format!("{disk}.img"))
    }

    /// The seq recorded in the job's `applied` file (`cdp-applied v1\n<seq>\n`).
    pub fn applied_file_seq(&self, job: &str) -> Result<u64> {
        let path = self.job_dir(job).join("applied");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut lines = text.lines();
        match (lines.next(), lines.next(), lines.next()) {
            (Some("cdp-applied v1"), Some(seq), None) => seq
                .parse()
                .with_context(|| format!("{}: bad seq {seq:?}", path.display())),
            _ => bail!("{}: unexpected contents {text:?}", path.display()),
        }
    }

    /// The applied seq the appliance recovered for `job` at its last start, from its
    /// `job loaded job=ID ... applied=SEQ` log line: what it had recorded durably, whatever
    /// file or store holds it.
    pub fn loaded_applied_seq(&self, job: &str) -> Result<u64> {
        let log = std::fs::read_to_string(&self.log)
            .with_context(|| format!("reading {}", self.log.display()))?;
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("job loaded") && l.contains(&format!("job={job}")))
            .with_context(|| format!("no `job loaded job={job}` line in {}", self.log.display()))?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("applied="))
            .and_then(|seq| seq.parse().ok())
            .with_context(|| format!("no applied=SEQ in {line:?}"))
    }

    /// Every seq in the job's landing journal, in the order the journal yields them, read
    /// with the `journal` crate. Only while the appliance is stopped.
    pub fn landing_seqs(&mut self, job: &str) -> Result<Vec<u64>> {
        ensure!(
            !self.is_running(),
            "landing_seqs: stop the appliance first (the landing journal has one writer)"
        );
        let id = JobId::parse_hex(job).with_context(|| format!("{job:?} is not a job id"))?;
        let generation = self.job_generation(job)?;
        let dir = self.job_dir(job).join("landing");
        let journal = Journal::open(
            dir.as_path(),
            JournalConfig::new(id, Generation(generation)),
        )
        .with_context(|| format!("opening the landing journal {}", dir.display()))?;
        let mut reader = journal
            .reader(journal.first_seq())
            .with_context(|| format!("reading the landing journal {}", dir.display()))?;
        let mut seqs = Vec::new();
        while let Some(record) = reader
            .next_record()
            .with_context(|| format!("reading the landing journal {}", dir.display()))?
        {
            seqs.push(record.header.seq.0);
        }
        Ok(seqs)
    }

    /// The generation in the job's `job.toml`.
    fn job_generation(&self, job: &str) -> Result<u64> {
        let path = self.job_dir(job).join("job.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.lines()
            .find_map(|l| l.trim().strip_prefix("generation = "))
            .and_then(|g| g.trim().parse().ok())
            .with_context(|| format!("{}: no `generation = N` line in {text:?}", path.display()))
    }

    /// The appliance's stdout lines and the tail of its log, for error messages.
    pub fn diagnostics(&self) -> String {
        let stdout = self.stdout.lock().map(|l| l.join("\n")).unwrap_or_default();
        format!(
            "--- appliance data dir {} ---\n--- appliance stdout ---\n{stdout}\n--- appliance log ({}) tail ---\n{}",
            self.data_dir.display(),
            self.log.display(),
            file_tail(&self.log, LOG_TAIL_BYTES)
        )
    }

    /// Whether the appliance process is still running.
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

    /// Stops the appliance with SIGTERM and requires a clean exit (status 0) in time.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if child.try_wait()?.is_none() {
                signal(child.id(), libc::SIGTERM)?;
            }
            match wait_deadline(child, STOP_TIMEOUT)? {
                Some(status) => {
                    self.child = None;
                    self.exit = Some(status);
                }
                None => {
                    self.kill();
                    bail!(
                        "appliance still running {STOP_TIMEOUT:?} after SIGTERM (killed)\n{}",
                        self.diagnostics()
                    );
                }
            }
        }
        match self.exit {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!(
                "appliance exited with {status}, expected a clean exit\n{}",
                self.diagnostics()
            ),
            None => bail!("appliance exit status unknown"),
        }
    }

    /// Kills the appliance with SIGKILL (a crash) and reaps it.
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
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain HTTP/1.0 GET of `path` on `addr`, with a bearer token if given; the body of a
/// `200` reply.
pub fn http_get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, API_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(API_TIMEOUT))?;
    stream.set_write_timeout(Some(API_TIMEOUT))?;
    let auth = bearer.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n{auth}\r\n"
            )
            .as_bytes(),
        )
        .with_context(|| format!("sending GET {path} to {addr}"))?;
    let mut reply = Vec::new();
    stream
        .take(API_REPLY_BYTES_MAX)
        .read_to_end(&mut reply)
        .with_context(|| format!("reading GET {path} from {addr}"))?;
    let reply = String::from_utf8(reply).with_context(|| format!("GET {path}: not UTF-8"))?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no end of headers in {reply:?}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        bail!("GET {path} from {addr}: {status_line:?}\n{body}");
    }
    Ok(body.to_owned())
}

/// Where a replicating pair stands: the agent's journal and what the appliance holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The agent's `cdp_journal_head_seq`.
    pub agent_head: u64,
    /// The agent's `cdp_acked_seq`.
    pub agent_acked: u64,
    /// The appliance's `cdp_landing_durable_seq`.
    pub landed: u64,
    /// The appliance's `cdp_applied_seq`.
    pub applied: u64,
    /// The agent reports the job `replicating` (no sync or resync pending, not ahead).
    pub replicating: bool,
}

/// One look at both sides' metrics for `job`.
pub fn progress(agent: &Agent, appliance: &Appliance, job: &str) -> Result<Progress> {
    let labels = [("job", job)];
    let a = agent.metrics()?;
    let b = appliance.metrics()?;
    let seq = |m: &Metrics, name: &str| m.value(name, &labels).map(|v| v as u64);
    Ok(Progress {
        agent_head: seq(&a, "cdp_journal_head_seq")?,
        agent_acked: seq(&a, "cdp_acked_seq")?,
        landed: seq(&b, "cdp_landing_durable_seq")?,
        applied: seq(&b, "cdp_applied_seq")?,
        replicating: a
            .value("cdp_job_state", &[("job", job), ("state", "replicating")])
            .is_ok_and(|v| v == 1.0),
    })
}

/// Waits until the appliance has applied everything the agent journaled (applied seq ==
/// acked seq == the agent's head) and returns that seq; fails after `timeout` with where
/// both sides stood and their logs.
pub fn wait_drained(
    agent: &Agent,
    appliance: &Appliance,
    job: &str,
    timeout: Duration,
) -> Result<u64> {
    let mut last = None;
    poll_until(
        "the appliance applying the agent's journal",
        timeout,
        || {
            let p = progress(agent, appliance, job)?;
            last = Some(p);
            Ok(
                (p.replicating && p.applied == p.agent_head && p.agent_acked == p.agent_head)
                    .then_some(p.agent_head),
            )
        },
    )
    .with_context(|| {
        format!(
            "last progress {last:?}\n{}\n{}",
            agent.diagnostics(),
            appliance.diagnostics()
        )
    })
}

/// Requires every replica of the agent's disks to equal its backing file (blake3), saying
/// where they differ otherwise.
pub fn assert_replicas_equal_sources(
    agent: &Agent,
    appliance: &Appliance,
    job: &str,
) -> Result<()> {
    for disk in agent.disks() {
        let replica = appliance.replica_path(job, &disk.name);
        let source_hash = blake3_file(&disk.backing)?;
        let replica_hash =
            blake3_file(&replica).with_context(|| format!("disk {}: no replica", disk.name))?;
        if source_hash != replica_hash {
            let diff = compare_files(&disk.backing, &replica)?
                .map(|d| d.to_string())
                .unwrap_or_else(|| "no byte differs".into());
            bail!(
                "disk {}: the replica differs from the source\n  source  {} blake3 {source_hash}\n  \
                 replica {} blake3 {replica_hash}\n  {diff}\n{}\n{}",
                disk.name,
                disk.backing.display(),
                replica.display(),
                agent.diagnostics(),
                appliance.diagnostics()
            );
        }
    }
    Ok(())
}
