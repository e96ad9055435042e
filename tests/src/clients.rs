//! Thin wrappers over the real NBD clients the scenarios drive: `qemu-io` scripts that fail on
//! any pattern mismatch, and `nbdcopy`/`nbdinfo` helpers.
//!
//! Must never: treat a client's "verification failed" as success, even when the client exits 0.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::cmd::{Output, Tool, TOOL_TIMEOUT};

/// Words in a client's output that mean a check failed even if it exited 0.
const FAILURE_MARKERS: &[&str] = &[
    "verification failed",
    "Pattern verification",
    "failed:",
    "Error",
    "error:",
];

/// A `qemu-io` run: one process, one NBD connection, commands executed in order.
#[derive(Debug, Clone)]
pub struct QemuIo {
    target: String,
    commands: Vec<String>,
    timeout: Duration,
}

impl QemuIo {
    /// A script against the raw image at `target` (an NBD URI).
    pub fn new(target: &str) -> Self {
        Self {
            target: target.to_owned(),
            commands: Vec::new(),
            timeout: TOOL_TIMEOUT,
        }
    }

    /// Appends a command (`write -P 0xab 0 4k`, `read -P 0 1M 64k`, `flush`, ...).
    pub fn cmd(mut self, command: impl Into<String>) -> Self {
        self.commands.push(command.into());
        self
    }

    /// Appends a command in place.
    pub fn push(&mut self, command: impl Into<String>) {
        self.commands.push(command.into());
    }

    /// Number of commands so far.
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    /// Whether there is no command yet.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Replaces the default deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The tool invocation this script runs.
    pub fn tool(&self) -> Tool {
        let mut tool = Tool::new("qemu-io")
            .args(["-f", "raw"])
            .timeout(self.timeout);
        for c in &self.commands {
            tool = tool.arg("-c").arg(c);
        }
        tool.arg(&self.target)
    }

    /// Runs the script; fails on a non-zero exit or any failure in its output.
    pub fn run(&self) -> Result<Output> {
        let out = self.tool().run_ok()?;
        check_no_failure(&out)?;
        Ok(out)
    }
}

/// Fails when a client's output reports a failed check or I/O error.
pub fn check_no_failure(out: &Output) -> Result<()> {
    let bad: Vec<&str> = out
        .stdout
        .lines()
        .chain(out.stderr.lines())
        .filter(|l| FAILURE_MARKERS.iter().any(|m| l.contains(m)))
        .take(20)
        .collect();
    if !bad.is_empty() {
        bail!(
            "client reported failures:\n  {}\n{}",
            bad.join("\n  "),
            out.describe()
        );
    }
    Ok(())
}

/// Copies the whole export at `uri` into the local file `target` with `nbdcopy`.
pub fn export_to_file(uri: &str, target: &Path) -> Result<Output> {
    Tool::new("nbdcopy").arg("--").arg(uri).arg(target).run_ok()
}

/// Copies the local file `source` into the export at `uri` with `nbdcopy`.
pub fn file_to_export(source: &Path, uri: &str) -> Result<Output> {
    Tool::new("nbdcopy").arg("--").arg(source).arg(uri).run_ok()
}

/// The export's size as `nbdinfo --size` reports it.
pub fn export_size(uri: &str) -> Result<u64> {
    let out = Tool::new("nbdinfo").arg("--size").arg(uri).run_ok()?;
    out.stdout
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("nbdinfo --size printed {:?}: {e}", out.stdout))
}

/// Whether the export at `uri` advertises `what` (`nbdinfo --can WHAT`: exit 0 yes, 2 no).
pub fn export_can(uri: &str, what: &str) -> Result<bool> {
    let out = Tool::new("nbdinfo").args(["--can", what]).arg(uri).run()?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(2) => Ok(false),
        _ => bail!("nbdinfo --can {what} failed:\n{}", out.describe()),
    }
}
