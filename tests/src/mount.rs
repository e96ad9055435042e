//! Guards for the kernel objects the file-system scenario creates: an `nbdfuse` file, a loop
//! device on it, and a mounted file system. Each is undone on Drop, in reverse order of
//! creation, even when the test fails.
//!
//! Must never: leave a mount, a loop device or an `nbdfuse` process behind, detach a loop
//! device or unmount anything it did not create itself, or retry without a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use crate::agent::file_tail;
use crate::cmd::{poll_until, wait_deadline, Tool};

/// Longest wait for a mount, a detach or an unmount that the kernel reports busy.
pub const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// Fails with a clear message unless this process can use FUSE, loop devices and mount
/// (root with `/dev/fuse` and `/dev/loop-control`). Such tests never skip themselves.
pub fn require_root_and_fuse() -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "this test needs root (loop devices, mount): running as uid {euid}; run the suite as root \
         (CI does), it never skips"
    );
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        ensure!(
            Path::new(dev).exists(),
            "this test needs {dev}: run in a machine or container that provides it \
             (e.g. docker --privileged / --device {dev}); it never skips"
        );
    }
    Ok(())
}

/// An NBD export presented as a file by `nbdfuse MOUNTDIR/FILE URI`.
#[derive(Debug)]
pub struct FuseFile {
    mount_dir: PathBuf,
    file: PathBuf,
    /// Invariant: `Some` while nbdfuse may be running.
    child: Option<Child>,
    log: PathBuf,
    mounted: bool,
}

impl FuseFile {
    /// Mounts `uri` as `mount_dir/disk` (creating `mount_dir`) and waits until the file is
    /// there and has `size_bytes`.
    pub fn mount(uri: &str, mount_dir: &Path, size_bytes: u64) -> Result<FuseFile> {
        std::fs::create_dir_all(mount_dir)?;
        let file = mount_dir.join("disk");
        let pidfile = mount_dir.with_extension("pid");
        let log = mount_dir.with_extension("log");
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&file)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting nbdfuse (see scripts/install-test-deps)")?;
        let mut fuse = FuseFile {
            mount_dir: mount_dir.to_owned(),
            file,
            child: Some(child),
            log,
            mounted: true,
        };
        let file = fuse.file.clone();
        poll_until("nbdfuse serving its file", Duration::from_secs(30), || {
            if let Some(child) = fuse.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    fuse.mounted = false;
                    bail!(
                        "nbdfuse exited with {status}: {}",
                        file_tail(&fuse.log, 4096)
                    );
                }
            }
            if !pidfile.exists() {
                return Ok(None);
            }
            Ok(std::fs::metadata(&file).ok().map(|m| m.len()))
        })
        .and_then(|len| {
            ensure!(
                len == size_bytes,
                "nbdfuse file {} has {len} bytes, the export {size_bytes}",
                file.display()
            );
            Ok(())
        })?;
        Ok(fuse)
    }

    /// The file standing for the export.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Unmounts (`fusermount3 -u`, retried while busy) and waits for nbdfuse to exit.
    pub fn unmount(&mut self) -> Result<()> {
        if self.mounted {
            let dir = self.mount_dir.clone();
            poll_until(
                &format!("fusermount3 -u {}", dir.display()),
                UNMOUNT_TIMEOUT,
                || {
                    let out = Tool::new("fusermount3")
                        .arg("-u")
                        .arg(&dir)
                        .timeout(Duration::from_secs(10))
                        .run()?;
                    if out.status.success() {
                        return Ok(Some(()));
                    }
                    // Busy while a loop device still holds the file; anything else is an error.
                    if out.stderr.contains("busy") {
                        return Ok(None);
                    }
                    bail!("unmounting nbdfuse:\n{}", out.describe());
                },
            )?;
            self.mounted = false;
        }
        if let Some(mut child) = self.child.take() {
            match wait_deadline(&mut child, UNMOUNT_TIMEOUT)? {
                Some(status) if status.success() => {}
                Some(status) => bail!(
                    "nbdfuse exited with {status}: {}",
                    file_tail(&self.log, 4096)
                ),
                None => {
                    let _ = child.kill();
                    let _ = wait_deadline(&mut child, Duration::from_secs(10));
                    bail!("nbdfuse still running {UNMOUNT_TIMEOUT:?} after unmount (killed)");
                }
            }
        }
        Ok(())
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("cleanup: {e:#}");
            if self.mounted {
                // Last resort: a lazy unmount of our own mount point, then reap nbdfuse.
                let _ = Tool::new("fusermount3")
                    .args(["-u", "-z"])
                    .arg(&self.mount_dir)
                    .run();
            }
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = wait_deadline(&mut child, Duration::from_secs(10));
            }
        }
    }
}

/// A loop device attached with `losetup -f --show FILE`.
#[derive(Debug)]
pub struct LoopDevice {
    device: PathBuf,
    attached: bool,
}

impl LoopDevice {
    /// Attaches the first free loop device to `file`.
    pub fn attach(file: &Path) -> Result<LoopDevice> {
        let out = Tool::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .timeout(Duration::from_secs(30))
            .run_ok()?;
        let device = PathBuf::from(out.stdout.trim());
        ensure!(
            device.starts_with("/dev/"),
            "losetup printed {:?}, not a device",
            out.stdout
        );
        Ok(LoopDevice {
            device,
            attached: true,
        })
    }

    /// The block device, e.g. `/dev/loop3`.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Detaches the device (retried while busy).
    pub fn detach(&mut self) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        let dev = self.device.clone();
        poll_until(
            &format!("losetup -d {}", dev.display()),
            UNMOUNT_TIMEOUT,
            || {
                let out = Tool::new("losetup")
                    .arg("-d")
                    .arg(&dev)
                    .timeout(Duration::from_secs(10))
                    .run()?;
                if out.status.success() {
                    return Ok(Some(()));
                }
                if out.stderr.contains("busy") {
                    return Ok(None);
                }
                bail!("detaching loop device:\n{}", out.describe());
            },
        )?;
        self.attached = false;
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// A file system mounted with `mount DEVICE DIR` (or a tmpfs).
#[derive(Debug)]
pub struct Mounted {
    dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    /// Mounts `device` on `dir` (creating `dir`), with extra `options` (`-o`), if any.
    pub fn mount(device: &Path, dir: &Path, options: Option<&str>) -> Result<Mounted> {
        std::fs::create_dir_all(dir)?;
        let mut tool = Tool::new("mount").timeout(Duration::from_secs(60));
        if let Some(o) = options {
            tool = tool.arg("-o").arg(o);
        }
        tool.arg(device).arg(dir).run_ok()?;
        Ok(Mounted {
            dir: dir.to_owned(),
            mounted: true,
        })
    }

    /// Mounts a tmpfs of at most `size_bytes` on `dir` (creating `dir`): a small file system
    /// that fills up, so writes to a sparse file on it fail with ENOSPC.
    pub fn tmpfs(dir: &Path, size_bytes: u64) -> Result<Mounted> {
        std::fs::create_dir_all(dir)?;
        Tool::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_bytes}"))
            .arg("tmpfs")
            .arg(dir)
            .timeout(Duration::from_secs(60))
            .run_ok()
            .context("mounting a tmpfs (this test needs root; it never skips)")?;
        Ok(Mounted {
            dir: dir.to_owned(),
            mounted: true,
        })
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts (retried while busy).
    pub fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        let dir = self.dir.clone();
        poll_until(
            &format!("umount {}", dir.display()),
            UNMOUNT_TIMEOUT,
            || {
                let out = Tool::new("umount")
                    .arg(&dir)
                    .timeout(Duration::from_secs(60))
                    .run()?;
                if out.status.success() {
                    return Ok(Some(()));
                }
                if out.stderr.contains("busy") {
                    return Ok(None);
                }
                bail!("unmounting:\n{}", out.describe());
            },
        )?;
        self.mounted = false;
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            eprintln!("cleanup: {e:#}");
            let _ = Tool::new("umount").arg("-l").arg(&self.dir).run();
        }
    }
}
