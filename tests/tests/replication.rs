//! Replication end to end: a real `cdp-agent` paired with a real `cdp-receiver` appliance on
//! loopback, written to by `qemu-io`. Every replica must equal its source disk once the
//! appliance has applied the agent's journal; kill -9 of either side loses nothing
//! acknowledged and leaves no gap; sync mode acknowledges a write only once the appliance holds
//! it durably; an unpaired or wrongly paired agent changes nothing; corrupted batches are
//! refused and fetched again (DESIGN §3.9, docs/wire-protocol.md, docs/pairing.md).
//!
//! Each randomised scenario prints its seed (`CDP_TEST_SEED` replays it) and its temporary
//! directories (`CDP_KEEP_TMP=1` keeps them).
//!
//! A replica must equal its source disk even where the client was told nothing (a write in
//! flight at a crash) or was told of a failure (the backing disk refused the write):
//! `agent_kill9_during_large_writes_leaves_replica_equal_to_source` and
//! `a_write_the_source_disk_refused_never_reaches_the_replica` aim at those two windows.
//!
//! Must never: pass while a replica differs from its source, wait without a deadline, or leave
//! an agent, an appliance or a client running.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cdp_tests::agent::temp_dir;
use cdp_tests::appliance::assert_replicas_equal_sources;
use cdp_tests::cmd::Output;
use cdp_tests::mount::Mounted;
use cdp_tests::workload::{self, Op, Source};
use cdp_tests::{
    poll_until, progress, wait_drained, Agent, Appliance, Model, QemuIo, Rng, KIB, MIB,
};

/// Longest wait for the appliance to apply everything the agent journaled, when the link is
/// up. Generous: a loaded 2-core machine with debug binaries.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for an agent to reconnect after the appliance was killed and restarted. The
/// agent notices the dead connection only at the QUIC idle timeout (30 s, docs/pairing.md),
/// then reconnects with a back-off of at most 5 s.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest wait for the agent to report the link up after it started.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a refused agent is watched for ever reporting `replicating`.
const REFUSED_WINDOW: Duration = Duration::from_secs(3);
/// Deadline of one `qemu-io` script.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Prints where a scenario's files are, so a failure can be inspected (with `CDP_KEEP_TMP=1`).
fn print_dirs(test: &str, agent: &Agent, appliance: &Appliance) {
    eprintln!(
        "{test}: agent dir {}, appliance dir {}",
        agent.dir().display(),
        appliance.dir().display()
    );
}

/// `len` bytes of `path` at `offset`.
fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; usize::try_from(len)?];
    f.read_exact(&mut buf)
        .with_context(|| format!("reading {len} bytes at {offset} of {}", path.display()))?;
    Ok(buf)
}

/// A client loop on its own thread; [`Background::finish`] (or Drop) stops it between two
/// rounds and joins it, so no client outlives the test.
struct Background<T> {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<T>>>,
}

/// What a background loop sees: whether to stop, and where it counts its rounds.
#[derive(Clone)]
struct Control {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
}

impl Control {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn round_done(&self) {
        self.rounds.fetch_add(1, Ordering::AcqRel);
    }
}

impl<T: Send + 'static> Background<T> {
    fn spawn(body: impl FnOnce(&Control) -> Result<T> + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let control = Control {
            stop: Arc::clone(&stop),
            rounds: Arc::clone(&rounds),
        };
        let handle = thread::spawn(move || body(&control));
        Self {
            stop,
            rounds,
            handle: Some(handle),
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Acquire)
    }

    fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits until `n` more rounds completed than now (or the loop ended).
    fn wait_rounds(&self, n: u64, timeout: Duration) -> Result<()> {
        let target = self.rounds() + n;
        poll_until("the client completing more rounds", timeout, || {
            Ok((self.rounds() >= target || self.is_finished()).then_some(()))
        })
    }

    /// Stops the loop after its current round and returns what it returned.
    fn finish(mut self) -> Result<T> {
        self.stop.store(true, Ordering::Release);
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| anyhow::anyhow!("the client thread panicked"))?,
            None => bail!("the client thread was already joined"),
        }
    }
}

impl<T> Drop for Background<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn replicas_equal_sources_for_several_disks() -> Result<()> {
    let test = "replicas_equal_sources_for_several_disks";
    let mut rng = Rng::for_test(test);
    let mut appliance = Appliance::start()?;
    let disk_count = rng.range(2, 3);
    let mut builder = Agent::builder()
        .replicate_to(&appliance)
        .job_name("several-disks");
    for i in 0..disk_count {
        builder = builder.disk(&format!("d{i}"), rng.range(8, 32) * MIB);
    }
    let mut agent = builder.start()?;
    print_dirs(test, &agent, &appliance);
    let job = agent.job_id()?;
    let source = Source::create(&mut rng, &agent.dir().join("source.bin"))?;

    // Random work on every disk at once (one qemu-io each), with at least one write-zeroes
    // and one discard per disk at random places.
    let mut scripts = Vec::new();
    let mut models = BTreeMap::new();
    for disk in agent.disks() {
        let size = disk.size_bytes;
        let count = rng.range(30, 60) as usize;
        let mut ops = workload::random_ops(&mut rng, 0, size, count);
        let sectors = size / 512;
        let zero_at = rng.below(sectors - 2048) * 512;
        let discard_at = rng.below(sectors - 2048) * 512;
        ops.push(Op::Zeroes {
            offset: zero_at,
            len: rng.range(1, 2048) * 512,
            unmap: rng.below(2) == 0,
        });
        ops.push(Op::Discard {
            offset: discard_at,
            len: rng.range(1, 2048) * 512,
        });
        ops.push(Op::Flush);
        let mut model = Model::zeroed(size);
        workload::apply(&mut model, &ops, Some(&source));
        scripts.push(
            workload::script(&agent.uri(&disk.name), &ops, Some(&source)).timeout(CLIENT_TIMEOUT),
        );
        models.insert(disk.name.clone(), model);
    }
    thread::scope(|s| -> Result<()> {
        let running: Vec<_> = scripts.iter().map(|io| s.spawn(move || io.run())).collect();
        for r in running {
            r.join()
                .map_err(|_| anyhow::anyhow!("a qemu-io thread panicked"))??;
        }
        Ok(())
    })?;

    let head = wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    assert_replicas_equal_sources(&agent, &appliance, &job)?;
    for disk in agent.disks() {
        models[&disk.name].assert_matches(
            &format!("replica of {}", disk.name),
            &appliance.replica_path(&job, &disk.name),
        )?;
    }

    // The REST API and `cdp status --json` show the job, replicating and drained.
    let jobs = appliance.api_jobs()?;
    ensure!(
        jobs.len() == 1,
        "GET /api/v1/jobs: expected one job, got {jobs:?}"
    );
    let j = &jobs[0];
    ensure!(
        j["id"] == job.as_str()
            && j["name"] == "several-disks"
            && j["agent"] == "test-agent"
            && j["state"] == "replicating"
            && j["mode"] == "async"
            && j["connected"] == true
            && j["applied_seq"] == head
            && j["landing_durable_seq"] == head,
        "GET /api/v1/jobs: unexpected job (agent head {head}, job {job}): {j:#}"
    );
    let disks = j["disks"].as_array().context("no disks array")?;
    ensure!(
        disks.len() == agent.disks().len(),
        "API lists {} disks, the agent has {}: {j:#}",
        disks.len(),
        agent.disks().len()
    );
    for disk in agent.disks() {
        let d = disks
            .iter()
            .find(|d| d["name"] == disk.name.as_str())
            .with_context(|| format!("API does not list disk {}: {j:#}", disk.name))?;
        ensure!(
            d["size_bytes"] == disk.size_bytes,
            "disk {}: API size {} != {}",
            disk.name,
            d["size_bytes"],
            disk.size_bytes
        );
        let path = d["replica_path"].as_str().context("no replica_path")?;
        ensure!(
            Path::new(path) == appliance.replica_path(&job, &disk.name),
            "disk {}: API replica path {path} != {}",
            disk.name,
            appliance.replica_path(&job, &disk.name).display()
        );
    }
    let status = appliance.cdp_status_jobs()?;
    ensure!(
        status.len() == 1 && status[0]["id"] == job.as_str() && status[0]["state"] == "replicating",
        "`cdp status --json`: expected job {job} replicating, got {status:?}"
    );

    // A replicating agent trims its journal behind the appliance's acks, so a replay from
    // zeroes is not possible; the replica compared with the source above is the check.
    agent.stop()?;
    appliance.stop()?;
    Ok(())
}

/// One command of the kill -9 stream.
#[derive(Debug, Clone, Copy)]
enum Cmd {
    Write {
        offset: u64,
        len: u64,
        byte: u8,
        fua: bool,
    },
    Flush,
}

impl Cmd {
    /// Not quiet: qemu-io prints `wrote LEN/LEN bytes at offset OFF` when the server
    /// acknowledged the write.
    fn command(&self) -> String {
        match self {
            Cmd::Write {
                offset,
                len,
                byte,
                fua,
            } => {
                let f = if *fua { "-f " } else { "" };
                format!("write {f}-P 0x{byte:02x} {offset} {len}")
            }
            Cmd::Flush => "flush".to_owned(),
        }
    }
}

/// One qemu-io run of the kill -9 stream and what it reported.
#[derive(Debug)]
struct StreamRun {
    cmds: Vec<Cmd>,
    output: Output,
}

impl StreamRun {
    /// The writes the server acknowledged, by offset.
    fn acknowledged_offsets(&self) -> Vec<u64> {
        self.output
            .stdout
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("wrote ")?;
                let (_, offset) = rest.split_once(" bytes at offset ")?;
                offset.trim().parse().ok()
            })
            .collect()
    }

    /// Writes that must survive a crash of the agent: acknowledged with FUA, or acknowledged
    /// and followed by a FLUSH that completed (proved by a later acknowledged write, or by
    /// qemu-io finishing without error). Also returns the write in flight at the crash, if
    /// any (sent, never acknowledged).
    fn durable_writes(&self) -> (Vec<Cmd>, Option<Cmd>) {
        let acked = self.acknowledged_offsets();
        let is_acked = |c: &Cmd| matches!(c, Cmd::Write { offset, .. } if acked.contains(offset));
        let all_done = self.output.status.success();
        let last_acked = self.cmds.iter().rposition(is_acked);
        let flush_done = |i: usize| all_done || last_acked.is_some_and(|last| last > i);
        let mut durable = Vec::new();
        for (i, c) in self.cmds.iter().enumerate() {
            let Cmd::Write { fua, .. } = c else { continue };
            if !is_acked(c) {
                continue;
            }
            let flushed = self.cmds[i + 1..]
                .iter()
                .enumerate()
                .any(|(j, later)| matches!(later, Cmd::Flush) && flush_done(i + 1 + j));
            if *fua || flushed {
                durable.push(*c);
            }
        }
        let in_flight = if all_done {
            None
        } else {
            self.cmds[last_acked.map_or(0, |i| i + 1)..]
                .iter()
                .find(|c| matches!(c, Cmd::Write { .. }))
                .copied()
        };
        (durable, in_flight)
    }
}

#[test]
fn agent_kill9_mid_stream_loses_no_acknowledged_fua_or_flushed_write() -> Result<()> {
    let test = "agent_kill9_mid_stream_loses_no_acknowledged_fua_or_flushed_write";
    let mut rng = Rng::for_test(test);
    const DISK_BYTES: u64 = 64 * MIB;
    const SLOT_BYTES: u64 = 128 * KIB;
    const CMDS_PER_RUN: usize = 40;
    let mut appliance = Appliance::start()?;
    let mut agent = Agent::builder()
        .disk("d0", DISK_BYTES)
        .replicate_to(&appliance)
        .start()?;
    print_dirs(test, &agent, &appliance);
    let job = agent.job_id()?;
    agent.wait_job_state(&job, "replicating", LINK_UP_TIMEOUT)?;

    // Every write gets its own 128 KiB slot, so each acknowledged write's pattern must be
    // found whole in the replica, whatever came after it.
    let mut slots: Vec<u64> = (0..DISK_BYTES / SLOT_BYTES).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut plan_rng = Rng::new(rng.next_u64());
    let kill_at_head = rng.range(20, 150) as f64;
    let uri = agent.uri("d0");
    let stream = Background::spawn(move |control| -> Result<Vec<StreamRun>> {
        let mut runs = Vec::new();
        while !control.stopping() && slots.len() >= CMDS_PER_RUN {
            let mut cmds = Vec::new();
            while cmds.len() < CMDS_PER_RUN {
                if plan_rng.below(6) == 0 {
                    cmds.push(Cmd::Flush);
                    continue;
                }
                let slot = slots.pop().context("out of slots")?;
                let len = plan_rng.range(1, SLOT_BYTES / 512) * 512;
                let offset = slot * SLOT_BYTES + plan_rng.below((SLOT_BYTES - len) / 512 + 1) * 512;
                cmds.push(Cmd::Write {
                    offset,
                    len,
                    byte: plan_rng.nonzero_byte(),
                    fua: plan_rng.below(2) == 0,
                });
            }
            let mut io = QemuIo::new(&uri).timeout(CLIENT_TIMEOUT);
            for c in &cmds {
                io.push(c.command());
            }
            let output = io.tool().run()?;
            let failed = !output.status.success();
            runs.push(StreamRun { cmds, output });
            control.round_done();
            if failed {
                // The agent is gone: what this run reported is all that was acknowledged.
                break;
            }
        }
        Ok(runs)
    });

    poll_until(
        "the agent's journal head reaching the kill point",
        Duration::from_secs(60),
        || {
            let head = agent.metric("cdp_journal_head_seq", &[("job", &job)]);
            Ok((head >= kill_at_head || stream.is_finished()).then_some(()))
        },
    )?;
    ensure!(
        !stream.is_finished(),
        "the client stream ended before the kill point (head {kill_at_head}): make it longer"
    );
    agent.kill();
    let runs = stream.finish()?;
    let last = runs.last().context("no qemu-io run")?;
    ensure!(
        !last.output.status.success() || runs.len() > 1,
        "no qemu-io run noticed the kill:\n{}",
        last.output.describe()
    );
    let mut durable = Vec::new();
    let mut in_flight = None;
    for run in &runs {
        let (d, f) = run.durable_writes();
        durable.extend(d);
        in_flight = in_flight.or(f);
    }
    eprintln!(
        "{test}: killed at head >= {kill_at_head}; {} qemu-io runs, {} acknowledged writes must survive; in flight: {in_flight:?}",
        runs.len(),
        durable.len()
    );

    agent
        .restart()
        .context("restarting the agent after kill -9")?;
    let head = wait_drained(&agent, &appliance, &job, RECONNECT_TIMEOUT)?;
    let replica = appliance.replica_path(&job, "d0");
    let backing = agent.disk("d0")?.backing.clone();
    for c in &durable {
        let Cmd::Write {
            offset, len, byte, ..
        } = *c
        else {
            continue;
        };
        for (what, path) in [("replica", &replica), ("source", &backing)] {
            let bytes = read_range(path, offset, len)?;
            if let Some(i) = bytes.iter().position(|b| *b != byte) {
                bail!(
                    "{what} lost an acknowledged write after kill -9 of the agent: {} \
                     (byte {} reads 0x{:02x}); drained at seq {head}\n{}\n{}",
                    c.command(),
                    offset + i as u64,
                    bytes[i],
                    agent.diagnostics(),
                    appliance.diagnostics()
                );
            }
        }
    }
    if let Err(e) = assert_replicas_equal_sources(&agent, &appliance, &job) {
        let note = in_flight_note(in_flight, &backing, &replica)?;
        return Err(e.context(format!(
            "after kill -9 of the agent; the write in flight at the kill was {in_flight:?}{note}"
        )));
    }
    // A replicating agent trims its journal behind the appliance's acks, so a replay from
    // zeroes is not possible; the replica compared with the source above is the check.
    agent.stop()?;
    appliance.stop()?;
    Ok(())
}

/// Says whether the write in flight at a crash is the difference between source and
/// replica: whole in the replica, not in the source disk.
fn in_flight_note(in_flight: Option<Cmd>, source: &Path, replica: &Path) -> Result<String> {
    let Some(Cmd::Write {
        offset, len, byte, ..
    }) = in_flight
    else {
        return Ok(String::new());
    };
    let in_replica = read_range(replica, offset, len)?.iter().all(|b| *b == byte);
    let in_source = read_range(source, offset, len)?.iter().all(|b| *b == byte);
    Ok(if in_replica && !in_source {
        "\n  => that unacknowledged write is whole in the replica (so in the agent's journal) but \
         not in the source disk: the agent journals a write before writing its backing disk and \
         does not reconcile the two after a crash"
            .to_owned()
    } else {
        format!("\n  (in flight write: whole in replica {in_replica}, whole in source {in_source})")
    })
}

#[test]
fn agent_kill9_during_large_writes_leaves_replica_equal_to_source() -> Result<()> {
    // Reproduces, in a few attempts, the crash window of the write path: the record is in
    // the journal (and so shipped), the backing disk is not written yet.
    let test = "agent_kill9_during_large_writes_leaves_replica_equal_to_source";
    let mut rng = Rng::for_test(test);
    const DISK_BYTES: u64 = 64 * MIB;
    const ATTEMPTS: u64 = 5;
    const WRITES_PER_ATTEMPT: usize = 12;
    let mut appliance = Appliance::start()?;
    let mut agent = Agent::builder()
        .disk("d0", DISK_BYTES)
        .replicate_to(&appliance)
        .start()?;
    print_dirs(test, &agent, &appliance);
    let job = agent.job_id()?;
    let labels = [("job", job.as_str())];
    agent.wait_job_state(&job, "replicating", LINK_UP_TIMEOUT)?;
    // 4 MiB of random bytes: every record is as large as the client sends and does not
    // compress, so appending it and writing the backing disk each take a while.
    let source = Source::create(&mut rng, &agent.dir().join("source.bin"))?;
    let len = workload::OP_BYTES_MAX;
    for attempt in 1..=ATTEMPTS {
        let head_before = agent.metrics()?.value("cdp_journal_head_seq", &labels)?;
        let kill_after = rng.range(1, WRITES_PER_ATTEMPT as u64 / 2) as f64;
        let ops: Vec<Op> = (0..WRITES_PER_ATTEMPT)
            .map(|_| Op::WriteFrom {
                offset: rng.below((DISK_BYTES - len) / 512 + 1) * 512,
                len,
            })
            .collect();
        let io = workload::script(&agent.uri("d0"), &ops, Some(&source)).timeout(CLIENT_TIMEOUT);
        let client = Background::spawn(move |_| io.tool().run());
        // Kill as soon as the journal holds the record: no sleep between looks, the window
        // is a few milliseconds (bounded by the deadline and by the client ending).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let head = agent.metrics()?.value("cdp_journal_head_seq", &labels)?;
            if head >= head_before + kill_after || client.is_finished() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "attempt {attempt}: the journal head stayed at {head}\n{}",
                agent.diagnostics()
            );
        }
        agent.kill();
        let output = client.finish()?;
        agent
            .restart()
            .context("restarting the agent after kill -9")?;
        let head = wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
        assert_replicas_equal_sources(&agent, &appliance, &job).with_context(|| {
            format!(
                "attempt {attempt}: kill -9 of the agent once its journal head reached {} \
                 during 4 MiB writes (drained at {head}); the client saw:\n{}",
                head_before + kill_after,
                output.describe()
            )
        })?;
    }
    // A replicating agent trims its journal behind the appliance's acks, so a replay from
    // zeroes is not possible; the replica compared with the source above is the check.
    agent.stop()?;
    appliance.stop()?;
    Ok(())
}

#[test]
fn a_write_the_source_disk_refused_never_reaches_the_replica() -> Result<()> {
    // The source disk's backing file lives on a 1 MiB tmpfs: a 2 MiB write fails with ENOSPC
    // and the client is told so. Whatever the agent does about it, the replica must end up
    // equal to the source disk.
    let test = "a_write_the_source_disk_refused_never_reaches_the_replica";
    let mut appliance = Appliance::start()?;
    let small = temp_dir("cdp-small-fs-")?;
    let mounted = Mounted::tmpfs(&small.path().join("fs"), MIB)?;
    let mut agent = Agent::builder()
        .disk_at("d0", &mounted.dir().join("d0.img"), 8 * MIB)
        .replicate_to(&appliance)
        .start()?;
    print_dirs(test, &agent, &appliance);
    let job = agent.job_id()?;
    agent.wait_job_state(&job, "replicating", LINK_UP_TIMEOUT)?;
    let uri = agent.uri("d0");
    QemuIo::new(&uri).cmd("write -q -P 0x11 0 512k").run()?;
    let refused = QemuIo::new(&uri)
        .cmd("write -q -P 0x22 1M 2M")
        .tool()
        .run()?;
    ensure!(
        !refused.status.success()
            && (refused.stdout.contains("No space left on device")
                || refused.stderr.contains("No space left on device")),
        "a 2 MiB write to a disk on a 1 MiB file system did not fail with ENOSPC:\n{}",
        refused.describe()
    );
    QemuIo::new(&uri).cmd("flush").run()?;
    let head = wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    assert_replicas_equal_sources(&agent, &appliance, &job).with_context(|| {
        format!(
            "the source disk refused a write with ENOSPC (the client got the error), drained at \
             seq {head}; `cdp-agent replay` of the agent's journal shows whether the journal \
             kept the refused write"
        )
    })?;
    // A replicating agent trims its journal behind the appliance's acks, so a replay from
    // zeroes is not possible; the replica compared with the source above is the check.
    agent.stop()?;
    appliance.stop()?;
    drop(mounted);
    Ok(())
}

/// Random small operations (patterned writes up to 256 KiB, some FUA, write-zeroes,
/// discards, flushes) inside `0..size_bytes`.
fn small_ops(rng: &mut Rng, size_bytes: u64, n: usize) -> Vec<Op> {
    (0..n)
        .map(|_| {
            let len = workload::random_len(rng, 256 * KIB);
            let offset = rng.below((size_bytes - len) / 512 + 1) * 512;
            match rng.below(10) {
                0 => Op::Zeroes {
                    offset,
                    len,
                    unmap: rng.below(2) == 0,
                },
                1 => Op::Discard { offset, len },
                2 => Op::Flush,
                k => Op::Write {
                    offset,
                    len,
                    byte: rng.nonzero_byte(),
                    fua: k == 3,
                },
            }
        })
        .collect()
}

/// Keeps writing small random operations to `uri` in rounds of `ops_per_round` until
/// stopped (at most `rounds_max`); any failed round is an error (the agent must keep
/// serving writes whatever happens to the appliance).
fn keep_writing(
    uri: String,
    mut rng: Rng,
    size_bytes: u64,
    ops_per_round: usize,
    rounds_max: u64,
) -> Background<u64> {
    Background::spawn(move |control| {
        let mut rounds = 0;
        while !control.stopping() && rounds < rounds_max {
            let ops = small_ops(&mut rng, size_bytes, ops_per_round);
            workload::script(&uri, &ops, None)
                .timeout(CLIENT_TIMEOUT)
                .run()
                .with_context(|| format!("client round {rounds}"))?;
            rounds += 1;
            control.round_done();
        }
        Ok(rounds)
    })
}

#[test]
fn appliance_kill9_mid_stream_converges_without_gaps() -> Result<()> {
    let test = "appliance_kill9_mid_stream_converges_without_gaps";
    let mut rng = Rng::for_test(test);
    const DISK_BYTES: u64 = 32 * MIB;
    let mut appliance = Appliance::start()?;
    let mut agent = Agent::builder()
        .disk("d0", DISK_BYTES)
        .replicate_to(&appliance)
        .start()?;
    print_dirs(test, &agent, &appliance);
    let job = agent.job_id()?;
    agent.wait_job_state(&job, "replicating", LINK_UP_TIMEOUT)?;

    let writer = keep_writing(
        agent.uri("d0"),
        Rng::new(rng.next_u64()),
        DISK_BYTES,
        20,
        2000,
    );
    let kill_at_landed = rng.range(10, 200);
    let mut landed_before_kill = 0;
    poll_until(
        "the appliance landing records before the kill",
        Duration::from_secs(60),
        || {
            let p = progress(&agent, &appliance, &job)?;
            landed_before_kill = p.landed;
            Ok((p.landed >= kill_at_landed || writer.is_finished()).then_some(()))
        },
    )?;
    ensure!(!writer.is_finished(), "the client stopped early");
    appliance.kill();
    let head_at_kill = agent.metric("cdp_journal_head_seq", &[("job", &job)]) as u64;
    // The agent keeps serving writes while the appliance is down.
    writer.wait_rounds(2, Duration::from_secs(60))?;
    ensure!(
        !writer.is_finished(),
        "the client stopped while the appliance was down"
    );
    appliance
        .restart()
        .context("restarting the appliance after kill -9")?;
    let landed_after_restart = appliance
        .metrics()?
        .value("cdp_landing_durable_seq", &[("job", &job)])? as u64;
    ensure!(
        landed_after_restart >= landed_before_kill,
        "the landing journal went back from {landed_before_kill} to {landed_after_restart} over kill -9"
    );
    eprintln!(
        "{test}: killed the appliance at landed {landed_before_kill} (agent head {head_at_kill}); \
         restarted with landed {landed_after_restart}"
    );
    // The agent comes back and ships what it journaled meanwhile; keep writing a bit more.
    let reconnected = Instant::now();
    poll_until(
        "the appliance landing what the agent journaled while it was down",
        RECONNECT_TIMEOUT,
        || {
            let p = progress(&agent, &appliance, &job)?;
            Ok((p.landed > head_at_kill).then_some(()))
        },
    )
    .with_context(|| format!("{}\n{}", agent.diagnostics(), appliance.diagnostics()))?;
    eprintln!(
        "{test}: the agent caught up {:.1?} after the restart",
        reconnected.elapsed()
    );
    writer.wait_rounds(2, Duration::from_secs(60))?;
    let rounds = writer.finish()?;
    let head = wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    eprintln!("{test}: {rounds} client rounds, drained at seq {head}");
    assert_replicas_equal_sources(&agent, &appliance, &job)?;
    let corrupt = appliance
        .metrics()?
        .value("cdp_corrupt_records_total", &[("job", &job)])?;
    ensure!(
        corrupt == 0.0,
        "the appliance counted {corrupt} corrupt records without any fault injected"
    );

    // A replicating agent trims its journal behind the appliance's acks, so a replay from
    // zeroes is not possible; the replica compared with the source above is the check.
    agent.stop()?;
    appliance.stop()?;
    let seqs = appliance.landing_seqs(&job)?;
    let first = *seqs.first().context("the landing journal is empty")?;
    let last = *seqs.last().context("the landing journal is empty")?;
    eprintln!(
        "{test}: the landing journal holds seqs {first}..={last} ({} records)",
        seqs.len()
    );
    if let Some(w) = seqs.windows(2).find(|w| w[1] != w[0] + 1) {
        bail!(
            "the landing journal is not dense: seq {} follows seq {} ({} records, {first}..={last})",
            w[1],
            w[0],
            seqs.len()
        );
    }
    ensure!(
        last == head,
        "the landing journal ends at seq {last}, the agent's journal at {head} ({first}..={last})"
    );
    // The applied seq recorded durably: the `applied` file where the appliance keeps one,
    // and in any case what a restart recovers.
    if appliance.job_dir(&job).join("applied").exists() {
        let applied = appliance.applied_file_seq(&job)?;
        ensure!(
            applied == head,
            "the applied file records seq {applied}, the agent's journal ends at {head}"
        );
    }
    appliance.restart()?;
    let applied = appliance.loaded_applied_seq(&job)?;
    ensure!(
        applied == head,
        "after a clean stop the appliance recovers applied seq {applied}, the agent's journal \
         ends at {head}\n{}",
        appliance.diagnostics()
    );
    appliance.stop()?;
    Ok(())
}

/// The agent's wait for the appliance's ack in sync mode before it falls back to async
/// (`sync_ack_timeout_ms`, default 5000).
const SYNC_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// One random patterned write (up to 256 KiB, FUA or not) inside `0..size_bytes`.
fn random_write(rng: &mut Rng, size_bytes: u64) -> Op {
    let len = workload::random_len(rng, 256 * KIB);
    Op::Write {
        offset: rng.below((size_bytes - len) / 512 + 1) * 512,
        len,
        byte: rng.nonzero_byte(),
        fua: rng.below(2) == 0,
    }
}

/// Runs one write and requires that, the moment qemu-io returns, the appliance's landing
/// journal already holds the agent's whole journal durably and sync mode is not degraded.
/// Returns the landed seq.
fn sync_write_is_landed(agent: &Agent, appliance: &Appliance, job: &str, op: &Op) -> Result<u64> {
    let labels = [("job", job)];
    workload::script(&agent.uri("d0"), std::slice::from_ref(op), None)
        .timeout(CLIENT_TIMEOUT)
        .run()?;
    // No waiting: the write was acknowledged, so the appliance must hold it already. The
    // agent is scraped first: the appliance's durable seq never goes back, so a later look
    // at it can only be higher.
    let a = agent.metrics()?;
    let head = a.value("cdp_journal_head_seq", &labels)? as u64;
    let degraded = a.value("cdp_sync_degraded", &labels)?;
    let landed = appliance
        .metrics()?
        .value("cdp_landing_durable_seq", &labels)? as u64;
    ensure!(
        degraded == 0.0,
        "{op:?}: sync replication had fallen back to async (no ack within {SYNC_ACK_TIMEOUT:?})\n{}",
        agent.diagnostics()
    );
    ensure!(
        landed >= head,
        "{op:?} was acknowledged in sync mode at agent head {head}, but the appliance's \
         landing journal is durable only up to {landed}\n{}\n{}",
        agent.diagnostics(),
        appliance.diagnostics()
    );
    Ok(landed)
}

#[test]
fn sync_mode_acknowledged_write_is_durable_at_appliance() -> Result<()> {
    let test = "sync_mode_acknowledged_write_is_durable_at_appliance";
    let mut rng = Rng::for_test(test);
    const DISK_BYTES: u64 = 16 * MIB;
    let mut appliance = Appliance::start()?;
    let mut agent = Agent::builder()
        .disk("d0", DISK_BYTES)
        .replicate_to(&appliance)
        .mode("sync")
        .start()?;
    print_dirs(test, &agent, &appliance);
    let job = agent.job_id()?;
    let labels = [("job", job.as_str())];
    agent.wait_job_state(&job, "replicating", LINK_UP_TIMEOUT)?;

    let writes = rng.range(8, 16);
    let mut landed = 0;
    for _ in 0..writes {
        landed = sync_write_is_landed(
            &agent,
            &appliance,
            &job,
            &random_write(&mut rng, DISK_BYTES),
        )?;
    }

    // The appliance crashes. A write still completes, but only after the agent waited the
    // ack timeout for it; then the job runs degraded (async).
    appliance.kill();
    let op = random_write(&mut rng, DISK_BYTES);
    let started = Instant::now();
    workload::script(&agent.uri("d0"), std::slice::from_ref(&op), None)
        .timeout(CLIENT_TIMEOUT)
        .run()
        .context("a write while the appliance is down")?;
    let took = started.elapsed();
    ensure!(
        took >= SYNC_ACK_TIMEOUT,
        "{op:?} was acknowledged in sync mode after {took:.1?} while the appliance was down: \
         before the ack timeout {SYNC_ACK_TIMEOUT:?}\n{}",
        agent.diagnostics()
    );
    let degraded = agent.metrics()?.value("cdp_sync_degraded", &labels)?;
    ensure!(
        degraded == 1.0,
        "after a write the appliance never acknowledged, cdp_sync_degraded is {degraded}\n{}",
        agent.diagnostics()
    );

    // What it acknowledged before the crash is still there after the restart.
    appliance
        .restart()
        .context("restarting the appliance after kill -9")?;
    let landed_after = appliance
        .metrics()?
        .value("cdp_landing_durable_seq", &labels)? as u64;
    ensure!(
        landed_after >= landed,
        "the appliance acknowledged seq {landed} in sync mode, but after kill -9 its landing \
         journal holds only up to {landed_after}\n{}",
        appliance.diagnostics()
    );
    let api = appliance.api_jobs()?;
    ensure!(
        api.len() == 1 && api[0]["landing_durable_seq"].as_u64() >= Some(landed),
        "API after restart: {api:?}, expected landing_durable_seq >= {landed}"
    );

    // The agent reconnects, ships the write made while the appliance was down, and leaves
    // degraded mode once the appliance caught up; writes wait for the appliance again.
    let reconnect = Instant::now();
    let head = wait_drained(&agent, &appliance, &job, RECONNECT_TIMEOUT)?;
    ensure!(
        head > landed,
        "the write made while the appliance was down made no record"
    );
    eprintln!(
        "{test}: {writes} sync writes landed up to {landed}; drained at {head} {:.1?} after the restart",
        reconnect.elapsed()
    );
    poll_until(
        "sync mode leaving degraded",
        Duration::from_secs(10),
        || Ok((agent.metrics()?.value("cdp_sync_degraded", &labels)? == 0.0).then_some(())),
    )
    .with_context(|| agent.diagnostics())?;
    for _ in 0..3 {
        sync_write_is_landed(
            &agent,
            &appliance,
            &job,
            &random_write(&mut rng, DISK_BYTES),
        )?;
    }
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    assert_replicas_equal_sources(&agent, &appliance, &job)?;
    // A replicating agent trims its journal behind the appliance's acks, so a replay from
    // zeroes is not possible; the replica compared with the source above is the check.
    agent.stop()?;
    appliance.stop()?;
    Ok(())
}

/// Watches a refused agent for [`REFUSED_WINDOW`]: it must never report `replicating`, and
/// its log must show why (`log_says`). Returns the log.
fn assert_never_replicates(agent: &Agent, what: &str, log_says: &str) -> Result<String> {
    let job = agent.job_id()?;
    let labels = [("job", job.as_str()), ("state", "replicating")];
    let until = Instant::now() + REFUSED_WINDOW;
    while Instant::now() < until {
        let up = agent.metric("cdp_job_state", &labels);
        ensure!(
            up == 0.0,
            "{what}: the agent reports replicating\n{}",
            agent.diagnostics()
        );
        thread::sleep(Duration::from_millis(100));
    }
    // The refusal itself is an event: wait for it in the log, with a deadline.
    poll_until(
        &format!("{what}: the refusal in the agent's log"),
        Duration::from_secs(30),
        || {
            let log = agent.log_text();
            Ok(log.contains(log_says).then_some(log))
        },
    )
    .with_context(|| format!("expected {log_says:?}\n{}", agent.diagnostics()))
}

/// Requires the appliance to hold no job: no job directory, nothing in the API or metrics.
fn assert_no_job(appliance: &Appliance, what: &str) -> Result<()> {
    let dirs = appliance.job_dirs()?;
    ensure!(
        dirs.is_empty(),
        "{what}: the appliance created job directories {dirs:?}"
    );
    let jobs = appliance.api_jobs()?;
    ensure!(jobs.is_empty(), "{what}: the API lists jobs {jobs:?}");
    let m = appliance.metrics()?;
    ensure!(
        m.sum("cdp_landing_durable_seq").is_none(),
        "{what}: the appliance's metrics show a job:\n{}",
        m.text
    );
    Ok(())
}

#[test]
fn unpaired_or_wrong_certificate_agents_are_refused_and_nothing_is_written() -> Result<()> {
    let test = "unpaired_or_wrong_certificate_agents_are_refused_and_nothing_is_written";
    let mut appliance = Appliance::start()?;
    let mut other = Appliance::start()?;
    eprintln!(
        "{test}: appliance dir {}, other appliance dir {}",
        appliance.dir().display(),
        other.dir().display()
    );

    // (a) Never paired: the agent refuses to start, and says why.
    let err = Agent::builder()
        .disk("d0", 4 * MIB)
        .target(appliance.quic_addr())
        .start()
        .err()
        .context("an agent that never paired started with --target")?;
    let message = format!("{err:#}");
    ensure!(
        message.contains("not paired"),
        "an unpaired agent failed without saying it is not paired:\n{message}"
    );
    assert_no_job(&appliance, "(a) unpaired agent")?;

    // (b) Paired with another appliance, pointed at this one: the agent refuses this
    // appliance's certificate (it pinned the other's).
    let wrong = Agent::builder()
        .disk("d0", 4 * MIB)
        .pair_with(&other)
        .agent_name("other-agent")
        .target(appliance.quic_addr())
        .start()?;
    eprintln!("{test}: (b) agent dir {}", wrong.dir().display());
    QemuIo::new(&wrong.uri("d0"))
        .cmd("write -q -f -P 0x5b 0 64k")
        .run()?;
    // The agent itself refuses (the handshake fails on its side, not "aborted by peer").
    let log = assert_never_replicates(
        &wrong,
        "(b) agent paired with another appliance",
        "invalid peer certificate",
    )?;
    ensure!(
        log.contains(&appliance.quic_addr().to_string()),
        "(b) the agent's log does not name the appliance it tried:\n{log}"
    );
    assert_no_job(&appliance, "(b) agent paired with another appliance")?;
    assert_no_job(&other, "(b) the other appliance (never dialled)")?;

    // (c) Paired with this appliance, but running with another identity (the certificate of
    // the agent in (b), which this appliance never pinned): the appliance refuses it.
    let stranger = Agent::builder()
        .disk("d0", 4 * MIB)
        .pair_with(&appliance)
        .agent_name("renamed-agent")
        .identity_from(&wrong.data_dir().join("identity"))
        .target(appliance.quic_addr())
        .start()?;
    eprintln!("{test}: (c) agent dir {}", stranger.dir().display());
    QemuIo::new(&stranger.uri("d0"))
        .cmd("write -q -f -P 0x5c 0 64k")
        .run()?;
    // The appliance refuses the handshake: the agent sees it aborted by its peer.
    let log = assert_never_replicates(
        &stranger,
        "(c) agent with a regenerated identity",
        "aborted by peer",
    )?;
    ensure!(
        log.contains("certificate") || log.contains("NotPaired"),
        "(c) the agent's log does not say its certificate was refused:\n{log}"
    );
    assert_no_job(&appliance, "(c) agent with a regenerated identity")?;

    stranger.finish()?;
    wrong.finish()?;
    appliance.stop()?;
    other.stop()?;
    Ok(())
}

#[test]
fn corrupted_batches_are_refused_and_refetched() -> Result<()> {
    let test = "corrupted_batches_are_refused_and_refetched";
    let mut rng = Rng::for_test(test);
    const DISK_BYTES: u64 = 32 * MIB;
    let mut appliance = Appliance::start()?;
    let mut agent = Agent::builder()
        .disk("d0", DISK_BYTES)
        .replicate_to(&appliance)
        .env("CDP_FAULT_CORRUPT_BATCHES", "3")
        .start()?;
    print_dirs(test, &agent, &appliance);
    let job = agent.job_id()?;
    agent.wait_job_state(&job, "replicating", LINK_UP_TIMEOUT)?;
    let source = Source::create(&mut rng, &agent.dir().join("source.bin"))?;

    // A few MiB in many small writes over several client runs, so that dozens of batches
    // go out one after the other.
    let mut model = Model::zeroed(DISK_BYTES);
    let mut written = 0;
    let mut runs = 0;
    while written < 4 * MIB {
        let mut ops = Vec::new();
        for _ in 0..25 {
            let len = rng.range(8, 128) * 512;
            let offset = rng.below((DISK_BYTES - len) / 512 + 1) * 512;
            ops.push(if rng.below(2) == 0 {
                Op::WriteFrom { offset, len }
            } else {
                Op::Write {
                    offset,
                    len,
                    byte: rng.nonzero_byte(),
                    fua: rng.below(4) == 0,
                }
            });
            written += len;
        }
        workload::apply(&mut model, &ops, Some(&source));
        workload::script(&agent.uri("d0"), &ops, Some(&source))
            .timeout(CLIENT_TIMEOUT)
            .run()?;
        runs += 1;
    }
    let head = wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    eprintln!("{test}: {written} bytes in {runs} client runs, drained at seq {head}");
    assert_replicas_equal_sources(&agent, &appliance, &job)?;
    model.assert_matches("replica", &appliance.replica_path(&job, "d0"))?;
    let corrupt = appliance
        .metrics()?
        .value("cdp_corrupt_records_total", &[("job", &job)])?;
    ensure!(
        corrupt > 0.0,
        "every 3rd batch was corrupted, yet the appliance counted no corrupt record\n{}\n{}",
        agent.diagnostics(),
        appliance.diagnostics()
    );
    eprintln!("{test}: the appliance refused {corrupt} corrupt records");
    // A replicating agent trims its journal behind the appliance's acks, so a replay from
    // zeroes is not possible; the replica compared with the source above is the check.
    agent.stop()?;
    appliance.stop()?;
    Ok(())
}
