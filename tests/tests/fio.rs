//! fio's NBD engine (libnbd) against `cdp-agent`: four jobs of random writes with mixed block
//! sizes (4 KiB / 64 KiB / 1 MiB), queue depth 16 each, on disjoint ranges, every block
//! verified with crc32c after it is written. The journal is then replayed against the backing
//! file.
//!
//! Must never: run unbounded (size and runtime are capped) or pass with a verify error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cdp_tests::{Agent, Tool, MIB};

const JOBS: u64 = 4;
const JOB_BYTES: u64 = 24 * MIB;
const DISK_BYTES: u64 = JOBS * JOB_BYTES + 8 * MIB;

#[test]
fn fio_random_writes_verified_with_crc32c() -> Result<()> {
    let agent = Agent::one_disk_of(DISK_BYTES)?;
    let uri = agent.uri("d0");
    let out = Tool::new("fio")
        .args([
            "--name=cdp-randwrite",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bssplit=4k/50:64k/40:1m/10",
            "--iodepth=16",
            &format!("--numjobs={JOBS}"),
            &format!("--size={JOB_BYTES}"),
            &format!("--offset_increment={JOB_BYTES}"),
            "--verify=crc32c",
            "--verify_fatal=1",
            // No verify-state files in the working directory (the checkout).
            "--verify_state_save=0",
            "--do_verify=1",
            "--runtime=120",
            "--output-format=json",
        ])
        .timeout(Duration::from_secs(240))
        .run_ok()?;
    ensure!(
        !out.stderr.contains("verify"),
        "fio reported verify problems:\n{}",
        out.describe()
    );
    // The engine prints "fio: connected to NBD server" before the JSON document.
    let json = out.stdout.find('{').map_or("", |i| &out.stdout[i..]);
    let report: serde_json::Value = serde_json::from_str(json)
        .with_context(|| format!("fio JSON report:\n{}", out.describe()))?;
    let jobs = report["jobs"].as_array().context("no jobs in fio report")?;
    assert_eq!(jobs.len() as u64, JOBS, "fio jobs: {report:#}");
    for job in jobs {
        let name = job["jobname"].as_str().unwrap_or_default();
        assert_eq!(job["error"], 0, "fio job {name} failed: {job:#}");
        // Every byte of the job's range written once, then read back for verification.
        assert_eq!(
            job["write"]["io_bytes"].as_u64(),
            Some(JOB_BYTES),
            "fio job {name} writes: {job:#}"
        );
        assert_eq!(
            job["read"]["io_bytes"].as_u64(),
            Some(JOB_BYTES),
            "fio job {name} verify reads: {job:#}"
        );
    }
    agent.finish()?;
    Ok(())
}
