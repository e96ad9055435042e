//! Where the history store keeps before-images: RocksDB blob files or inline in the SST files,
//! measured side by side in one run (`docs/history.md` says which was chosen and why).
//!
//! `cargo bench -p target-receiver --bench history_values`. Each mode: ENTRIES before-images
//! of 4 KiB (random, incompressible) for random blocks of a 4 GiB disk with rising seqs, in
//! synced batches of BATCH entries (as the applier commits a pass), then a full compaction;
//! then LOOKUPS random point reads at random old points. Prints entries/s and MiB/s written,
//! bytes the process wrote to storage per byte of before-image (write amplification, from
//! /proc/self/io), bytes on disk, and lookups/s. Environment: `CDP_BENCH_DIR` (refused on
//! tmpfs), `CDP_BENCH_ENTRIES` (default 262144 = 1 GiB of images), `CDP_BENCH_LOOKUPS`
//! (default 100000). A benchmark, not a test: it panics on any error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use journal::{DiskId, Seq};
use target_receiver::history::{Block, Entry, History, Pending, ValueStorage, BLOCK_BYTES};

const DISK_BLOCKS: u64 = (4u64 << 30) / BLOCK_BYTES as u64;
const BATCH: usize = 1024;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn process_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn run(mode: ValueStorage, root: &std::path::Path, entries: u64, lookups: u64) {
    let dir = tempfile::tempdir_in(root).unwrap();
    let history = History::open_with(dir.path(), mode).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut image = vec![0u8; BLOCK_BYTES];
    let written_before = process_write_bytes();
    let started = Instant::now();
    let mut seq = 0u64;
    while seq < entries {
        let mut batch = Vec::with_capacity(BATCH);
        for _ in 0..BATCH.min((entries - seq) as usize) {
            seq += 1;
            for chunk in image.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next().to_le_bytes());
            }
            batch.push(Entry {
                disk: DiskId(0),
                block: rng.next() % DISK_BLOCKS,
                seq: Seq(seq),
                image: Block::from_bytes(&image),
            });
        }
        let pending = Pending {
            first: batch[0].seq,
            last: Seq(seq),
        };
        history.commit(pending, &batch).unwrap();
        history.finish_with(Seq(seq), &[]).unwrap();
    }
    let insert_s = started.elapsed().as_secs_f64();
    let compaction_started = Instant::now();
    history.compact().unwrap();
    let compact_s = compaction_started.elapsed().as_secs_f64();
    let written = process_write_bytes() - written_before;
    let image_bytes = entries * BLOCK_BYTES as u64;

    let started = Instant::now();
    let mut found = 0u64;
    for _ in 0..lookups {
        let at = Seq(rng.next() % entries);
        let mut reader = history.reader(DiskId(0), at).unwrap();
        if reader.block(rng.next() % DISK_BLOCKS).unwrap().is_some() {
            found += 1;
        }
    }
    let lookup_s = started.elapsed().as_secs_f64();
    // One reader reused over consecutive blocks, as a view reads a disk.
    let mut reader = history.reader(DiskId(0), Seq(entries / 4)).unwrap();
    let started = Instant::now();
    for block in 0..lookups {
        let _ = reader.block(block).unwrap();
    }
    let scan_s = started.elapsed().as_secs_f64();
    println!(
        "{:<10} insert {:>8.0} entries/s ({:>6.1} MiB/s of images, compaction {:>5.1} s)  written/image bytes {:>5.2}  on disk {:>6.0} MiB  random lookups {:>8.0}/s ({:.0}% hit)  sequential lookups {:>8.0}/s",
        format!("{mode:?}"),
        entries as f64 / insert_s,
        image_bytes as f64 / insert_s / 1048576.0,
        compact_s,
        written as f64 / image_bytes as f64,
        dir_bytes(dir.path()) as f64 / 1048576.0,
        lookups as f64 / lookup_s,
        found as f64 * 100.0 / lookups as f64,
        lookups as f64 / scan_s,
    );
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
    let entries = env_u64("CDP_BENCH_ENTRIES", 262_144);
    let lookups = env_u64("CDP_BENCH_LOOKUPS", 100_000);
    println!(
        "history store: {entries} before-images of 4 KiB over a 4 GiB disk, synced batches of {BATCH}, {lookups} lookups; dir {} ({fs})",
        root.display()
    );
    for mode in [ValueStorage::BlobFiles, ValueStorage::Inline] {
        run(mode, &root, entries, lookups);
    }
}
