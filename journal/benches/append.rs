//! Journal append throughput against the machine's raw limit, measured side by side in one
//! run: the same payload bytes are appended to a `SharedJournal` with group commit and
//! written sequentially to a plain file, both with one fdatasync per `BATCH_BYTES` (1 MiB),
//! as 4 KiB and as 64 KiB records/writes. Random (incompressible) payloads are the honest
//! worst case; a compressible run is reported too. Prints MB/s and the ratio journal/raw.
//!
//! `cargo bench -p journal --bench append`. Environment: `CDP_BENCH_BYTES` (default 1 GiB
//! per run), `CDP_BENCH_DIR` (default the system temp dir; refused if it is tmpfs, where
//! fdatasync is free), `CDP_BENCH_THREADS` (journal writer threads, default 2),
//! `CDP_BENCH_ROUNDS` (default 3; medians are reported). A benchmark, not a test: it reads
//! the clock and panics on any error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use journal::record::RecordEncoder;
use journal::{
    Compression, DiskId, Entry, Generation, JobId, Journal, JournalConfig, Seq, Timestamp,
};

/// One fdatasync per this many payload bytes, for the journal and the raw file alike.
const BATCH_BYTES: u64 = 1 << 20;
/// Payload source: records are slices of this pool at moving offsets.
const POOL_BYTES: usize = 64 << 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn random_pool() -> Vec<u8> {
    let mut x: u64 = 0x243f_6a88_85a3_08d3;
    let mut out = Vec::with_capacity(POOL_BYTES);
    while out.len() < POOL_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Text-like bytes (log lines with counters): zstd level 1 shrinks them about 3-4x.
fn compressible_pool() -> Vec<u8> {
    let mut out = Vec::with_capacity(POOL_BYTES + 128);
    let mut i: u64 = 0;
    while out.len() < POOL_BYTES {
        let line = format!(
            "2025-11-25T14:{:02}:{:02}.{:06}Z INFO disk=vda op=write lba={} len={} seq={}\n",
            (i / 60) % 60,
            i % 60,
            (i * 7919) % 1_000_000,
            i * 8,
            4096 * (1 + i % 16),
            i
        );
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(POOL_BYTES);
    out
}

fn slice(pool: &[u8], index: u64, size: usize) -> &[u8] {
    let span = (pool.len() - size) as u64;
    let start = (index * size as u64 + index / 7) % span;
    &pool[start as usize..start as usize + size]
}

struct JournalRun {
    elapsed: Duration,
    syncs: u64,
    stored_bytes: u64,
    compressed_records: u64,
}

fn run_journal(
    dir: &Path,
    pool: &Arc<Vec<u8>>,
    size: usize,
    bytes: u64,
    threads: u64,
) -> JournalRun {
    let tmp = tempfile::tempdir_in(dir).unwrap();
    let config = JournalConfig::new(JobId([7; 16]), Generation(1));
    let journal = Arc::new(Journal::open(tmp.path(), config).unwrap().into_shared());
    let records = bytes / size as u64;
    let per_thread = records / threads;
    // Each writer waits for durability after every BATCH_BYTES of its own appends; waits of
    // different writers that overlap share one fdatasync (group commit).
    let wait_every = (BATCH_BYTES / size as u64).max(1);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let journal = journal.clone();
            let pool = pool.clone();
            thread::spawn(move || {
                let mut last = Seq::NONE;
                for i in 0..per_thread {
                    let index = t * per_thread + i;
                    let payload = slice(&pool, index, size);
                    let entry =
                        Entry::write(DiskId(0), index * size as u64, payload, Timestamp(index));
                    last = journal.append(entry).unwrap();
                    if (i + 1) % wait_every == 0 {
                        journal.wait_durable(last).unwrap();
                    }
                }
                journal.wait_durable(last).unwrap();
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    let elapsed = start.elapsed();
    let stats = journal.stats();
    assert_eq!(stats.records, per_thread * threads);
    JournalRun {
        elapsed,
        syncs: stats.syncs,
        stored_bytes: stats.stored_bytes,
        compressed_records: stats.compressed_records,
    }
}

fn run_raw(dir: &Path, pool: &[u8], size: usize, bytes: u64, preallocate: bool) -> Duration {
    let tmp = tempfile::tempdir_in(dir).unwrap();
    let path = tmp.path().join("raw.bin");
    let mut file = File::create(&path).unwrap();
    if preallocate {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor belongs to `file`, open for the duration of the call.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, bytes as libc::off_t) };
        assert_eq!(rc, 0, "posix_fallocate");
        file.sync_all().unwrap();
    }
    let records = bytes / size as u64;
    let start = Instant::now();
    let mut since_sync = 0;
    for index in 0..records {
        file.write_all(slice(pool, index, size)).unwrap();
        since_sync += size as u64;
        if since_sync >= BATCH_BYTES {
            file.sync_data().unwrap();
            since_sync = 0;
        }
    }
    file.sync_data().unwrap();
    start.elapsed()
}

/// Single-core encode cost (blake3, zstd attempt and probe, header) without any I/O.
fn encode_rate(pool: &[u8], size: usize, compression: Compression) -> f64 {
    let mut encoder = RecordEncoder::new(compression);
    let records = (256u64 << 20) / size as u64;
    let start = Instant::now();
    for index in 0..records {
        let entry = Entry::write(DiskId(0), 0, slice(pool, index, size), Timestamp(0));
        let prepared = encoder.prepare(&entry).unwrap();
        std::hint::black_box(prepared.record_bytes());
    }
    mb_per_s(records * size as u64, start.elapsed())
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

#[cfg(target_os = "linux")]
fn filesystem(dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut path = dir.as_os_str().as_bytes().to_vec();
    path.push(0);
    // SAFETY: `path` is NUL-terminated and outlives the call; `stat` is a plain out-param.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(path.as_ptr().cast(), &mut stat) };
    assert_eq!(rc, 0, "statfs {}", dir.display());
    match stat.f_type as i64 {
        0x0102_1994 => "tmpfs".to_string(),
        0xef53 => "ext2/3/4".to_string(),
        0x5846_5342 => "xfs".to_string(),
        0x9123_683e => "btrfs".to_string(),
        0x794c_7630 => "overlayfs".to_string(),
        other => format!("fs type {other:#x}"),
    }
}

#[cfg(not(target_os = "linux"))]
fn filesystem(_dir: &Path) -> String {
    "unknown".to_string()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is parsed.
    let bytes = env_u64("CDP_BENCH_BYTES", 1 << 30);
    let threads = env_u64("CDP_BENCH_THREADS", 2).max(1);
    let rounds = env_u64("CDP_BENCH_ROUNDS", 3).max(1);
    let dir = std::env::var_os("CDP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let fs = filesystem(&dir);
    assert!(
        fs != "tmpfs",
        "{} is tmpfs: fdatasync would be free",
        dir.display()
    );
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    println!("journal append benchmark");
    println!(
        "  dir {} ({fs}), {cpus} cpus, {} MiB per run, {threads} journal writer threads, \
         one fdatasync per {} KiB, {rounds} rounds (medians)",
        dir.display(),
        bytes >> 20,
        BATCH_BYTES >> 10
    );
    let random = Arc::new(random_pool());
    let text = Arc::new(compressible_pool());

    println!("\nencode cost, one core, no I/O (MB/s of payload):");
    for size in [4096usize, 65536] {
        println!(
            "  {:>2} KiB  random: none {:>6.0}  zstd-1 {:>6.0}   compressible: zstd-1 {:>6.0}",
            size >> 10,
            encode_rate(&random, size, Compression::None),
            encode_rate(&random, size, Compression::default()),
            encode_rate(&text, size, Compression::default()),
        );
    }

    for size in [4096usize, 65536] {
        let mut raw = Vec::new();
        let mut raw_pre = Vec::new();
        let mut jr = Vec::new();
        let mut jc = Vec::new();
        let mut last_random = None;
        let mut last_text = None;
        for _ in 0..rounds {
            raw.push(mb_per_s(bytes, run_raw(&dir, &random, size, bytes, false)));
            let run = run_journal(&dir, &random, size, bytes, threads);
            jr.push(mb_per_s(bytes, run.elapsed));
            last_random = Some(run);
            raw_pre.push(mb_per_s(bytes, run_raw(&dir, &random, size, bytes, true)));
            let run = run_journal(&dir, &text, size, bytes, threads);
            jc.push(mb_per_s(bytes, run.elapsed));
            last_text = Some(run);
        }
        let (raw, raw_pre, jr, jc) = (
            median(&mut raw),
            median(&mut raw_pre),
            median(&mut jr),
            median(&mut jc),
        );
        println!("\n{} KiB records/writes:", size >> 10);
        println!("  raw file, plain (grows)       {raw:>7.0} MB/s");
        println!("  raw file, preallocated        {raw_pre:>7.0} MB/s");
        if let Some(run) = last_random {
            println!(
                "  journal, random payload       {jr:>7.0} MB/s   ratio journal/raw {:.2} \
                 (vs preallocated {:.2}); {} fdatasyncs, {:.0} KiB stored per fdatasync, \
                 {} records compressed",
                jr / raw,
                jr / raw_pre,
                run.syncs,
                run.stored_bytes as f64 / run.syncs.max(1) as f64 / 1024.0,
                run.compressed_records
            );
        }
        if let Some(run) = last_text {
            println!(
                "  journal, compressible payload {jc:>7.0} MB/s   ratio journal/raw {:.2}; \
                 stored {:.2} of the payload bytes, {} fdatasyncs",
                jc / raw,
                run.stored_bytes as f64 / bytes as f64,
                run.syncs
            );
        }
    }
}
