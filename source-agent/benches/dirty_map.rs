//! What the dirty map (`source_agent::dirty`) costs a write: a 16 GiB disk with 1 MiB regions
//! on a real file system.
//!
//! `cargo bench -p source-agent --bench dirty_map`. Prints the cost of `mark()` on a region
//! already durably marked (ns per call, over 10 M calls), of a cold mark (µs per call, median
//! and p99 over 2000 regions, each a slot write and an `fdatasync`), a bare 4 KiB
//! `pwrite` + `fdatasync` of the same file system for comparison, and what that means for a
//! 64 KiB sequential write stream (one cold mark per 16 writes), both computed from the two
//! costs and measured over 2000 regions. Environment: `CDP_BENCH_DIR` (default: the system
//! temp dir; refused on tmpfs). A benchmark, not a test: it panics on any error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use source_agent::dirty::{DirtyMap, Initial, DIRTY_MAP_FILE, REGION_BYTES_DEFAULT};
use source_agent::sink::DiskId;

const DISK_BYTES: u64 = 16 << 30;
const WARM_CALLS: u64 = 10_000_000;
const COLD_REGIONS: u64 = 2000;
const WRITE_BYTES: u64 = 64 << 10;
const WRITES_PER_REGION: u64 = REGION_BYTES_DEFAULT / WRITE_BYTES;
const RAW_SYNCS: usize = 200;
const DISK: DiskId = DiskId(1);

fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    sorted[(sorted.len() * per_mille / 1000).min(sorted.len() - 1)]
}

fn us(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn main() {
    let root = std::env::var("CDP_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    std::fs::create_dir_all(&root).unwrap();
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&root)
        .output()
        .unwrap();
    let fs = String::from_utf8_lossy(&fs.stdout).trim().to_owned();
    assert!(
        fs != "tmpfs" && fs != "ramfs",
        "CDP_BENCH_DIR {} is on {fs}: use a real disk",
        root.display()
    );
    let bench_started = Instant::now();
    let dir = tempfile::tempdir_in(&root).unwrap();
    let path = dir.path().join(DIRTY_MAP_FILE);
    let map = DirtyMap::open(
        &path,
        &[(DISK, DISK_BYTES)],
        REGION_BYTES_DEFAULT,
        Initial::Clean,
    )
    .unwrap();
    println!(
        "dirty map: one disk of {} GiB, regions of {} MiB, file {} bytes; dir {} ({fs})",
        DISK_BYTES >> 30,
        REGION_BYTES_DEFAULT >> 20,
        std::fs::metadata(&path).unwrap().len(),
        root.display()
    );

    // Already durably marked: 64 KiB writes walking over region 0.
    map.mark(DISK, 0, WRITE_BYTES).unwrap();
    let started = Instant::now();
    for call in 0..WARM_CALLS {
        let offset = (call % WRITES_PER_REGION) * WRITE_BYTES;
        map.mark(black_box(DISK), black_box(offset), black_box(WRITE_BYTES))
            .unwrap();
    }
    let warm = started.elapsed();
    let warm_ns = warm.as_secs_f64() * 1e9 / WARM_CALLS as f64;
    println!("mark, region already durable: {warm_ns:>8.1} ns/call ({WARM_CALLS} calls)");

    // Cold: one 64 KiB write into each of regions 1..=2000.
    let mut cold: Vec<Duration> = (1..=COLD_REGIONS)
        .map(|region| {
            let started = Instant::now();
            map.mark(DISK, region * REGION_BYTES_DEFAULT, WRITE_BYTES)
                .unwrap();
            started.elapsed()
        })
        .collect();
    cold.sort_unstable();
    let cold_median = percentile(&cold, 500);
    println!(
        "mark, cold region:            {:>8.1} µs median, {:.1} µs p99 ({COLD_REGIONS} regions)",
        us(cold_median),
        us(percentile(&cold, 990)),
    );

    // The floor under a cold mark: a bare 4 KiB pwrite + fdatasync on the same file system.
    let raw_path = dir.path().join("raw");
    let raw = std::fs::File::create(&raw_path).unwrap();
    raw.write_all_at(&[0u8; 4096], 0).unwrap();
    raw.sync_all().unwrap();
    let mut raw_syncs: Vec<Duration> = (0..RAW_SYNCS)
        .map(|i| {
            let started = Instant::now();
            raw.write_all_at(&[i as u8; 4096], 0).unwrap();
            raw.sync_data().unwrap();
            started.elapsed()
        })
        .collect();
    raw_syncs.sort_unstable();
    println!(
        "bare 4 KiB pwrite + fdatasync: {:>7.1} µs median ({RAW_SYNCS} calls)",
        us(percentile(&raw_syncs, 500)),
    );

    // A 64 KiB sequential stream over fresh regions: 16 writes a region, the first one cold.
    let computed_us = (us(cold_median) + (WRITES_PER_REGION - 1) as f64 * warm_ns / 1e3)
        / WRITES_PER_REGION as f64;
    let first = COLD_REGIONS + 1;
    let writes = COLD_REGIONS * WRITES_PER_REGION;
    let persists_before = map.stats().persists;
    let started = Instant::now();
    for write in 0..writes {
        map.mark(
            DISK,
            first * REGION_BYTES_DEFAULT + write * WRITE_BYTES,
            WRITE_BYTES,
        )
        .unwrap();
    }
    let stream = started.elapsed();
    let measured_us = us(stream) / writes as f64;
    println!(
        "64 KiB sequential writes:     {computed_us:>8.2} µs/write computed (cold median / {WRITES_PER_REGION} + warm), \
         {measured_us:.2} µs/write measured over {writes} writes ({} persists); \
         the marks alone would cap the stream at {:.0} MiB/s",
        map.stats().persists - persists_before,
        WRITE_BYTES as f64 / 1048576.0 / (measured_us / 1e6),
    );
    let total = map.stats();
    assert_eq!(
        total.persists, total.cold_marks,
        "one thread: no group commit expected"
    );
    assert_eq!(
        map.dirty_bytes(),
        (1 + 2 * COLD_REGIONS) * REGION_BYTES_DEFAULT
    );
    println!("total {:.1} s", bench_started.elapsed().as_secs_f64());
}
