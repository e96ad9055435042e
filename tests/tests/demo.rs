//! `cdp demo`, the README's main job, exactly as a user runs it: the real `cdp`, which starts
//! the real `cdp-receiver` and `cdp-agent`; the `qemu-io` command it prints writes to the
//! protected disk; the write shows up in the replica it names; Ctrl-C (SIGINT) stops
//! everything cleanly.
//!
//! Must never leave `cdp` or its children running: `cdp` runs in its own process group with
//! PR_SET_PDEATHSIG, and on any failure the group is killed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cdp_tests::{binary, blake3_file, poll_until, temp_dir, Tool};

/// Longest the demo may take to print its guide.
const GUIDE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a write may take to reach the replica.
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Kills the demo's process group on drop, whatever happened.
struct Demo {
    child: Child,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pgid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill(2) has no memory-safety preconditions; `-pgid` is the process
                // group this test created for the demo (`process_group(0)`).
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
            let _ = self.child.wait();
        }
    }
}

/// The text between `prefix` and the end of the first line that starts with it (trimmed).
fn line_after<'a>(lines: &'a [String], prefix: &str) -> Option<&'a str> {
    lines
        .iter()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .map(str::trim)
}

#[test]
fn demo_replicates_a_qemu_io_write_and_stops_cleanly() -> Result<()> {
    let dir = temp_dir("cdp-demo-test-")?;
    let demo_dir = dir.path().join("demo");
    let mut command = Command::new(binary("cdp")?);
    command
        .args(["demo", "--dir"])
        .arg(&demo_dir)
        .env("CDP_BIN_DIR", cdp_tests::bin_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: runs in the forked child before exec and only calls prctl(2).
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let mut child = command.spawn().context("starting cdp demo")?;
    let stdout = child.stdout.take().context("stdout")?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut demo = Demo { child };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (etx, erx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = etx.send(line);
        }
    });

    // Read the guide up to "Press Ctrl-C".
    let mut lines = Vec::new();
    let deadline = Instant::now() + GUIDE_TIMEOUT;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let done = line.contains("Press Ctrl-C");
                lines.push(line);
                if done {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let err: Vec<String> = erx.try_iter().collect();
                bail!(
                    "cdp demo ended before its guide:\n{}\n{}",
                    lines.join("\n"),
                    err.join("\n")
                );
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no guide after {GUIDE_TIMEOUT:?}:\n{}",
            lines.join("\n")
        );
    }

    // The exact qemu-io command the guide prints.
    let qemu_line = line_after(&lines, "qemu-io ").context("the guide has no qemu-io command")?;
    let uri = qemu_line
        .rsplit('\'')
        .nth(1)
        .context("the qemu-io command has no quoted URI")?
        .to_owned();
    ensure!(
        uri.starts_with("nbd+unix:///disk0?socket="),
        "unexpected URI {uri}"
    );
    let replica = line_after(&lines, "The replica is ").context("the guide names no replica")?;
    let replica = std::path::PathBuf::from(replica);
    let source = demo_dir.join("source/disk0.img");
    Tool::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xab 0 1M", &uri])
        .run_ok()?;
    let expected = blake3_file(&source)?;
    poll_until("the write reaching the replica", REPLICATE_TIMEOUT, || {
        Ok((blake3_file(&replica)? == expected).then_some(()))
    })?;
    let mut head = vec![0u8; 1 << 20];
    std::fs::File::open(&replica)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0))?;
    ensure!(
        head.iter().all(|&b| b == 0xab),
        "the replica does not hold the pattern written"
    );

    // `cdp status` as the guide says.
    let status_line = line_after(&lines, "Watch it replicate:").map(|_| ());
    ensure!(status_line.is_some(), "the guide does not say how to watch");
    // The job shows `syncing` until the initial sync has compared the sample disk.
    let mut last = String::new();
    let shown = poll_until(
        "cdp status showing the job replicating",
        REPLICATE_TIMEOUT,
        || {
            let status = Tool::new(binary("cdp")?)
                .arg("--appliance-dir")
                .arg(demo_dir.join("appliance"))
                .arg("status")
                .run_ok()?;
            last = status.stdout.clone();
            Ok(status.stdout.contains("replicating").then_some(()))
        },
    );
    ensure!(shown.is_ok(), "cdp status:\n{last}");

    // Ctrl-C stops both children and cdp exits 0.
    cdp_tests::cmd::signal(demo.child.id(), libc::SIGINT)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = demo.child.try_wait()? {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "cdp demo did not stop after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = rx.try_iter().collect();
    ensure!(
        status.success(),
        "cdp demo exited with {status}:\n{}",
        rest.join("\n")
    );
    ensure!(
        rest.iter().any(|l| l.contains("cdp-agent: stopped"))
            && rest.iter().any(|l| l.contains("cdp-receiver: stopped")),
        "the demo did not report both children stopped:\n{}",
        rest.join("\n")
    );
    Ok(())
}
