//! Resilient replication with the real binaries on loopback: the initial sync of a disk that
//! already holds data (and of a pre-seeded replica, which costs only hashes), an outage
//! longer than the backlog bound (the job goes `ahead`, then resyncs), `kill -9` of the agent
//! while it tracks dirty regions and while it resyncs, and the bandwidth throttle.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cdp_tests::appliance::assert_replicas_equal_sources;
use cdp_tests::image::write_file;
use cdp_tests::{poll_until, temp_dir, wait_drained, Agent, Appliance, QemuIo, Rng, Source, MIB};

/// Longest wait for a job to drain after its disturbances.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest one qemu-io invocation may take while the appliance is away: the agent must keep
/// serving (it is far above a healthy write's latency, far below a stall).
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// UDP bytes the agent sent on replication connections since it started.
fn wire_bytes(agent: &Agent, job: &str) -> f64 {
    agent.metric("cdp_wire_bytes_total", &[("job", job)])
}

/// A disk image of `size` bytes with random data in its first `data` bytes.
fn image_with_data(rng: &mut Rng, path: &Path, size: u64, data: u64) -> Result<()> {
    let mut bytes = vec![0u8; size as usize];
    rng.fill(&mut bytes[..data as usize]);
    write_file(path, &bytes)
}

/// qemu-io writes of random data (`len` bytes from `source`) at each of `offsets`, checked.
fn write_from(
    agent: &Agent,
    disk: &str,
    source: &Source,
    offsets: &[u64],
    len: u64,
) -> Result<Duration> {
    let mut io = QemuIo::new(&agent.uri(disk)).timeout(WRITE_DEADLINE);
    for offset in offsets {
        io.push(
            cdp_tests::Op::WriteFrom {
                offset: *offset,
                len,
            }
            .commands(Some(source))[0]
                .clone(),
        );
    }
    let started = Instant::now();
    let out = io.run()?;
    cdp_tests::clients::check_no_failure(&out)?;
    Ok(started.elapsed())
}

#[test]
fn initial_sync_copies_a_disk_with_data_and_a_seeded_replica_costs_only_hashes() -> Result<()> {
    let mut rng = Rng::for_test("initial_sync");
    let work = temp_dir("cdp-initial-sync-")?;
    let size = 64 * MIB;
    let image = work.path().join("source.img");
    image_with_data(&mut rng, &image, size, 24 * MIB)?;
    let source = Source::create(&mut rng, &work.path().join("random.bin"))?;

    let appliance = Appliance::start()?;
    let agent = Agent::builder()
        .disk_image("d0", &image)
        .replicate_to(&appliance)
        .job_name("sync-a")
        .start()?;
    let job = agent.job_id()?;
    // Writes while the initial sync runs, some into data the sync has still to compare.
    let offsets: Vec<u64> = (0..32).map(|i| i * 2 * MIB + 12_288).collect();
    write_from(&agent, "d0", &source, &offsets, 256 * 1024)?;
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    assert_replicas_equal_sources(&agent, &appliance, &job)?;
    let sent = wire_bytes(&agent, &job);
    ensure!(
        sent > 24.0 * MIB as f64,
        "the initial sync sent {sent} bytes, less than the disk's 24 MiB of data"
    );

    // A second job whose replica is seeded with an identical copy: only hashes travel.
    let copy = work.path().join("copy.img");
    std::fs::copy(&agent.disks()[0].backing, &copy)?;
    let seed_dir = appliance.data_dir().join("seed").join("sync-b");
    std::fs::create_dir_all(&seed_dir)?;
    std::fs::copy(&copy, seed_dir.join("d0.img"))?;
    let seeded = Agent::builder()
        .disk_image("d0", &copy)
        .agent_name("seeded-agent")
        .replicate_to(&appliance)
        .job_name("sync-b")
        .start()?;
    let seeded_job = seeded.job_id()?;
    wait_drained(&seeded, &appliance, &seeded_job, DRAIN_TIMEOUT)?;
    assert_replicas_equal_sources(&seeded, &appliance, &seeded_job)?;
    let sent = wire_bytes(&seeded, &seeded_job);
    ensure!(
        sent < 0.01 * size as f64,
        "a pre-seeded replica cost {sent} wire bytes, not under 1% of the {size}-byte disk"
    );
    Ok(())
}

#[test]
fn an_outage_past_the_backlog_bound_goes_ahead_and_resyncs_without_stalling_writes() -> Result<()> {
    let mut rng = Rng::for_test("outage_ahead");
    let work = temp_dir("cdp-outage-")?;
    let source = Source::create(&mut rng, &work.path().join("random.bin"))?;
    let mut appliance = Appliance::start()?;
    let agent = Agent::builder()
        .disk("d0", 128 * MIB)
        .replicate_to(&appliance)
        .job_name("outage")
        .arg("--backlog-bytes-max=4194304")
        .arg("--backlog-age-max-secs=3")
        .start()?;
    let job = agent.job_id()?;
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;

    appliance.stop()?;
    // Past the byte bound: 8 MiB of writes; every write completes well within the deadline.
    let mut slowest = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut round = 0u64;
    while !agent.in_job_state(&job, "ahead") {
        ensure!(
            Instant::now() < deadline,
            "the job never went ahead\n{}",
            agent.diagnostics()
        );
        let offsets: Vec<u64> = (0..8).map(|i| (round * 8 + i) % 100 * MIB + 4096).collect();
        slowest = slowest.max(write_from(&agent, "d0", &source, &offsets, 512 * 1024)?);
        round += 1;
    }
    // More writes while ahead: tracked, not journalled.
    for i in 0..20u64 {
        slowest = slowest.max(write_from(
            &agent,
            "d0",
            &source,
            &[(i * 5 + 3) * MIB],
            64 * 1024,
        )?);
    }
    ensure!(
        slowest < WRITE_DEADLINE,
        "a write took {slowest:?} while the appliance was away"
    );
    let dirty = agent.metric("cdp_dirty_bytes", &[("job", &job)]);
    ensure!(dirty > 0.0, "nothing is marked dirty while ahead");

    appliance.restart()?;
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    assert_replicas_equal_sources(&agent, &appliance, &job)?;
    let log = agent.log_text();
    ensure!(
        log.contains("job goes ahead")
            && log.contains("resync begins")
            && log.contains("resync complete"),
        "the agent's log does not show ahead → resyncing → replicating\n{}",
        agent.diagnostics()
    );
    let status = appliance.api_jobs()?;
    ensure!(
        status[0]["consistent"] == true && status[0]["state"] == "replicating",
        "the appliance does not show the job consistent and replicating: {status:?}"
    );
    Ok(())
}

#[test]
fn kill9_while_ahead_and_while_resyncing_resyncs_only_marked_regions() -> Result<()> {
    let mut rng = Rng::for_test("kill9_ahead");
    let work = temp_dir("cdp-kill9-ahead-")?;
    let source = Source::create(&mut rng, &work.path().join("random.bin"))?;
    let size = 256 * MIB;
    let mut appliance = Appliance::start()?;
    let mut agent = Agent::builder()
        .disk("d0", size)
        .replicate_to(&appliance)
        .job_name("kill9")
        .arg("--backlog-bytes-max=4194304")
        .arg("--backlog-age-max-secs=2")
        .arg("--throttle=8388608")
        .start()?;
    let job = agent.job_id()?;
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;

    appliance.stop()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0u64;
    while !agent.in_job_state(&job, "ahead") {
        ensure!(
            Instant::now() < deadline,
            "the job never went ahead\n{}",
            agent.diagnostics()
        );
        write_from(&agent, "d0", &source, &[(i % 8) * MIB], 512 * 1024)?;
        i += 1;
    }
    // 48 regions dirtied while ahead, 1 MiB each.
    let offsets: Vec<u64> = (0..48).map(|r| (16 + r * 4) * MIB).collect();
    write_from(&agent, "d0", &source, &offsets, MIB)?;
    agent.kill();
    agent.restart()?;
    // The appliance is still away, so nothing can clear them: the marks must be back.
    poll_until(
        "the dirty regions reported after kill -9",
        Duration::from_secs(20),
        || {
            let dirty = agent.metric("cdp_dirty_bytes", &[("job", &job)]);
            Ok((dirty >= 48.0 * MIB as f64).then_some(()))
        },
    )
    .with_context(|| {
        format!(
            "the dirty regions did not survive kill -9\n{}",
            agent.diagnostics()
        )
    })?;

    // The appliance returns; the resync is throttled to 8 MiB/s, so it is caught midway.
    appliance.restart()?;
    agent.wait_job_state(&job, "resyncing", Duration::from_secs(60))?;
    poll_until(
        "the resync making progress",
        Duration::from_secs(60),
        || {
            let remaining = agent.metric("cdp_resync_remaining_bytes", &[("job", &job)]);
            Ok((remaining > 0.0 && remaining < 40.0 * MIB as f64).then_some(()))
        },
    )
    .with_context(|| agent.diagnostics())?;
    agent.kill();
    agent.restart()?;
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    assert_replicas_equal_sources(&agent, &appliance, &job)?;
    // Since this last start, only what was still dirty travelled: far less than the disk.
    let sent = wire_bytes(&agent, &job);
    ensure!(
        sent < 64.0 * MIB as f64,
        "the resync after the restart sent {sent} bytes; the marked regions hold at most 56 MiB and the disk {size}"
    );
    Ok(())
}

#[test]
fn an_unreadable_dirty_map_makes_every_region_dirty_and_the_job_converges() -> Result<()> {
    let size = 32 * MIB;
    let appliance = Appliance::start()?;
    let mut agent = Agent::builder()
        .disk("d0", size)
        .replicate_to(&appliance)
        .job_name("bad-map")
        .start()?;
    let job = agent.job_id()?;
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    agent.stop()?;
    let map = agent.data_dir().join("dirty.map");
    let len = std::fs::metadata(&map)?.len();
    write_file(&map, &vec![0xa5; len as usize])?;
    agent.restart()?;
    // Besides the initial sync before the stop, a resync of the whole disk after it.
    let whole = format!("bytes={size}");
    poll_until("a resync of every region", Duration::from_secs(30), || {
        let log = agent.log_text();
        let whole_disk_resyncs = log
            .lines()
            .filter(|l| l.contains("resync begins") && l.contains(&whole))
            .count();
        Ok((whole_disk_resyncs >= 2 && log.contains("after an agent restart")).then_some(()))
    })
    .with_context(|| agent.diagnostics())?;
    ensure!(
        agent.data_dir().join("dirty.map.unreadable").exists(),
        "the unreadable map was not kept for inspection"
    );
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    assert_replicas_equal_sources(&agent, &appliance, &job)?;
    Ok(())
}

#[test]
fn the_throttle_holds_the_wire_rate_and_pause_stops_shipping() -> Result<()> {
    let mut rng = Rng::for_test("throttle");
    let work = temp_dir("cdp-throttle-")?;
    let source = Source::create(&mut rng, &work.path().join("random.bin"))?;
    let appliance = Appliance::start()?;
    let agent = Agent::builder()
        .disk("d0", 256 * MIB)
        .replicate_to(&appliance)
        .job_name("throttled")
        .start()?;
    let job = agent.job_id()?;
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;

    let limit = 4.0 * MIB as f64;
    let out = appliance.cdp(&["throttle", "throttled", "4M"])?;
    ensure!(out.status.success(), "cdp throttle failed: {out:?}");
    // 64 MiB of incompressible writes of 256 KiB (so batches are about 1 MiB and the
    // window holds dozens of them), far faster than the limit.
    let offsets: Vec<u64> = (0..256).map(|i| i * 256 * 1024).collect();
    write_from(&agent, "d0", &source, &offsets, 256 * 1024)?;
    std::thread::sleep(Duration::from_secs(2));
    let (before, t0) = (wire_bytes(&agent, &job), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let (after, t1) = (wire_bytes(&agent, &job), Instant::now());
    let rate = (after - before) / (t1 - t0).as_secs_f64();
    ensure!(
        (rate - limit).abs() <= 0.1 * limit,
        "wire rate {rate:.0} B/s under a limit of {limit:.0} B/s"
    );

    // Pause: nothing more lands; resume: the job drains.
    let out = appliance.cdp(&["pause", "throttled"])?;
    ensure!(out.status.success(), "cdp pause failed: {out:?}");
    agent.wait_job_state(&job, "paused", Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(1));
    let landed = |a: &Appliance| -> Result<f64> {
        a.metrics()?
            .value("cdp_landing_durable_seq", &[("job", &job)])
    };
    let paused_at = landed(&appliance)?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        landed(&appliance)? == paused_at,
        "records kept landing while the job was paused"
    );
    for args in [
        ["throttle", "throttled", "off"],
        ["resume", "throttled", ""],
    ] {
        let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
        let out = appliance.cdp(&args)?;
        ensure!(out.status.success(), "cdp {args:?} failed: {out:?}");
    }
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    assert_replicas_equal_sources(&agent, &appliance, &job)?;
    Ok(())
}
