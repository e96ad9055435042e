//! Running external tools (qemu-io, nbdcopy, fio, mkfs, ...) with a deadline and their output
//! captured, so a failing test prints the exact command, its exit status, stdout and stderr.
//!
//! Must never: wait for a tool without a deadline, or leave a timed-out tool (or anything it
//! started) running. Each tool runs in its own process group and, on timeout, only that group
//! is killed.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Default deadline for one tool invocation; tests pass a longer one for long jobs.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// How long we keep reading a tool's pipes after it exited; a grandchild that inherited them
/// must not hang the test.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Most of a stream shown in an error message (its tail is what explains a failure).
const SHOWN_OUTPUT_BYTES_MAX: usize = 16 * 1024;

/// One external command to run to completion with a deadline.
#[derive(Debug)]
pub struct Tool {
    program: OsString,
    args: Vec<OsString>,
    timeout: Duration,
    dir: Option<std::path::PathBuf>,
}

/// What a finished tool left behind.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, quoted so it can be pasted into a shell.
    pub command: String,
    /// How the tool ended.
    pub status: ExitStatus,
    /// Its standard output (lossy UTF-8).
    pub stdout: String,
    /// Its standard error (lossy UTF-8).
    pub stderr: String,
    /// Wall-clock time it took.
    pub elapsed: Duration,
}

impl Tool {
    /// A command running `program` (looked up in `PATH` unless it contains a slash).
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            timeout: TOOL_TIMEOUT,
            dir: None,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends several arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Replaces the default deadline ([`TOOL_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs the tool in `dir`.
    pub fn current_dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_owned());
        self
    }

    /// The command line, quoted for a shell.
    pub fn command_line(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the tool to completion whatever its exit status; fails only if it cannot start or
    /// exceeds its deadline.
    pub fn run(self) -> Result<Output> {
        let command = self.command_line();
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a timeout kills the tool and whatever it started, nothing else.
            .process_group(0);
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| {
            format!("cannot start `{command}` (is it installed? see scripts/install-test-deps)")
        })?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let waited = wait_deadline(&mut child, self.timeout);
        let status = match waited {
            Ok(Some(status)) => status,
            Ok(None) => {
                kill_group(&mut child);
                let out = Output {
                    command,
                    status: ExitStatus::from_raw(libc::SIGKILL),
                    stdout: collect(stdout),
                    stderr: collect(stderr),
                    elapsed: started.elapsed(),
                };
                bail!(
                    "timed out after {:?} (killed):\n{}",
                    self.timeout,
                    out.describe()
                );
            }
            Err(e) => {
                kill_group(&mut child);
                return Err(e).with_context(|| format!("waiting for `{command}`"));
            }
        };
        Ok(Output {
            command,
            status,
            stdout: collect(stdout),
            stderr: collect(stderr),
            elapsed: started.elapsed(),
        })
    }

    /// Runs the tool and requires exit status 0.
    pub fn run_ok(self) -> Result<Output> {
        let out = self.run()?;
        if !out.status.success() {
            bail!("command failed:\n{}", out.describe());
        }
        Ok(out)
    }

    /// Runs the tool and requires exactly exit code `code`.
    pub fn run_code(self, code: i32) -> Result<Output> {
        let out = self.run()?;
        if out.status.code() != Some(code) {
            bail!("expected exit code {code}:\n{}", out.describe());
        }
        Ok(out)
    }
}

impl Output {
    /// The command, its status and both streams, for an error message.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "$ {}", self.command);
        let _ = writeln!(s, "status: {} after {:.2?}", self.status, self.elapsed);
        let _ = writeln!(s, "--- stdout ---\n{}", tail(&self.stdout));
        let _ = write!(s, "--- stderr ---\n{}", tail(&self.stderr));
        s
    }
}

/// Waits for `child` until `timeout`; `Ok(None)` when it is still running at the deadline.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout` saying what was awaited.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            return match last_error {
                Some(e) => Err(e.context(format!("{what}: not done after {timeout:?}"))),
                None => bail!("{what}: not done after {timeout:?}"),
            };
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` to the process `pid`, a process this harness started.
pub fn signal(pid: u32, signal: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) has no memory-safety preconditions; `pid` is positive (a child's pid),
    // so this never signals a process group or every process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("kill({pid}, {signal})"));
    }
    Ok(())
}

/// Kills the process group led by `child` (the tool and what it started) and reaps `child`.
fn kill_group(child: &mut Child) {
    if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions. `-pgid` names the process group
        // this harness created for `child` with `process_group(0)`, so only the tool and its
        // descendants are signalled.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

type Drained = mpsc::Receiver<Vec<u8>>;

fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<Drained> {
    let mut pipe = pipe?;
    let (tx, rx) = mpsc::sync_channel(1);
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    Some(rx)
}

fn collect(rx: Option<Drained>) -> String {
    rx.and_then(|rx| rx.recv_timeout(PIPE_DRAIN_TIMEOUT).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(s: &str) -> &str {
    if s.len() <= SHOWN_OUTPUT_BYTES_MAX {
        return s;
    }
    let mut start = s.len() - SHOWN_OUTPUT_BYTES_MAX;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Quotes `s` for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,+@%".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
