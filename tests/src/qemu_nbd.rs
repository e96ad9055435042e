//! `qemu-nbd` as the reference NBD server: the differential tests run one workload against it
//! and against `cdp-agent` and require identical images.
//!
//! Must never: outlive the test (Drop kills it by pid) or be waited for without a deadline.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::agent::{file_tail, temp_dir, unix_uri, READY_TIMEOUT, STOP_TIMEOUT};
use crate::cmd::{poll_until, signal, wait_deadline};

/// A `qemu-nbd` serving one raw file as one export over a Unix socket.
#[derive(Debug)]
pub struct QemuNbd {
    /// Invariant: `Some` until reaped.
    child: Option<Child>,
    socket: PathBuf,
    export: String,
    log: PathBuf,
    _dir: TempDir,
}

impl QemuNbd {
    /// Serves `image` as export `export` (`-t --shared=8`, writeback cache like the agent's
    /// backing file) and waits until the socket accepts connections.
    pub fn start(image: &Path, export: &str) -> Result<QemuNbd> {
        let dir = temp_dir("qemu-nbd-")?;
        let socket = dir.path().join("nbd.sock");
        let log = dir.path().join("qemu-nbd.log");
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "--shared=8", "-x", export, "-k"])
            .arg(&socket)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.path().join("qemu-nbd.err"))?)
            .spawn()
            .context("starting qemu-nbd (see scripts/install-test-deps)")?;
        let mut server = QemuNbd {
            child: Some(child),
            socket,
            export: export.to_owned(),
            log,
            _dir: dir,
        };
        let socket = server.socket.clone();
        poll_until("qemu-nbd accepting on its socket", READY_TIMEOUT, || {
            if let Some(child) = server.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "qemu-nbd exited with {status}: {}",
                        file_tail(&server.log, 4096)
                    );
                }
            }
            Ok(UnixStream::connect(&socket).ok().map(|_| ()))
        })?;
        Ok(server)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn uri(&self) -> String {
        unix_uri(&self.export, &self.socket)
    }

    /// The Unix socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops it with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            if child.try_wait()?.is_none() {
                signal(child.id(), libc::SIGTERM)?;
            }
            if wait_deadline(&mut child, STOP_TIMEOUT)?.is_none() {
                let _ = child.kill();
                let _ = wait_deadline(&mut child, Duration::from_secs(10));
                bail!("qemu-nbd still running {STOP_TIMEOUT:?} after SIGTERM (killed)");
            }
        }
        Ok(())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = wait_deadline(&mut child, Duration::from_secs(10));
        }
    }
}
