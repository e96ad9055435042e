//! The applier and the history store against a model: a `Vec<u8>` per disk and a copy of
//! every disk at every checkpoint. Random writes, trims and zeroings of random sizes on
//! several disks of one job, random checkpoints, passes of random length, random retention;
//! at every step chosen, every retained checkpoint read through the history (blake3 of each
//! whole disk) equals the model's copy, and the replicas equal the model now.
//!
//! Replayable: each run prints its seed; `CDP_TEST_SEED=N` runs that seed alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use blockdev::BlockDevice;
use journal::mark::CheckpointMark;
use journal::ship::JobInfo;
use journal::wire::{DiskInfo, Mode};
use journal::{
    encode_record, Compression, DiskId, Entry, Flags, Generation, JobId, RecordKind, Seq, Timestamp,
};
use target_receiver::apply::apply_pass;
use target_receiver::jobs::{Job, JobMeta, Jobs};
use target_receiver::retention::{retention_pass, RetentionPolicy};
use target_receiver::views::read_at;

/// xorshift64*: deterministic choices.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Disk sizes: one not a multiple of the 4 KiB history block.
const DISKS: [(u32, &str, u64); 3] = [
    (0, "os", 256 << 10),
    (1, "data", (1 << 20) + 512),
    (7, "log", 128 << 10),
];

fn meta() -> JobMeta {
    JobMeta {
        info: JobInfo {
            job: JobId([9; 16]),
            job_name: "model".into(),
            generation: Generation(1),
            mode: Mode::Async,
            disks: DISKS
                .iter()
                .map(|&(id, name, size_bytes)| DiskInfo {
                    disk: DiskId(id),
                    name: name.into(),
                    size_bytes,
                })
                .collect(),
        },
        agent: "model-agent".into(),
    }
}

struct World {
    job: Arc<Job>,
    /// The model: each disk's bytes now.
    disks: BTreeMap<u32, Vec<u8>>,
    /// Each checkpoint's copy of every disk.
    snapshots: BTreeMap<Seq, BTreeMap<u32, Vec<u8>>>,
    head: Seq,
    clock: u64,
}

impl World {
    fn append(&mut self, entry: Entry<'_>) {
        self.head = self.head.next();
        let bytes =
            encode_record(&entry, Generation(1), self.head, Compression::default()).unwrap();
        assert_eq!(self.job.landing.append_stored(&bytes).unwrap(), self.head);
    }

    fn write(&mut self, rng: &mut Rng) {
        let (id, _, size) = DISKS[rng.below(DISKS.len() as u64) as usize];
        let sectors = size / 512;
        let offset = rng.below(sectors) * 512;
        let max_len = (size - offset).min(96 << 10);
        let length = (1 + rng.below(max_len / 512)) * 512;
        self.clock += 1 + rng.below(5_000_000);
        let kind = match rng.below(10) {
            0 => RecordKind::Trim,
            1 => RecordKind::WriteZeroes,
            _ => RecordKind::Write,
        };
        let image = self.disks.get_mut(&id).unwrap();
        let range = offset as usize..(offset + length) as usize;
        let payload: Vec<u8> = if kind == RecordKind::Write {
            // Compressible and incompressible payloads alike.
            let fill = rng.next();
            (0..length)
                .map(|i| {
                    if fill.is_multiple_of(2) {
                        (fill >> 8) as u8
                    } else {
                        (fill.wrapping_mul(i + 1) >> 24) as u8
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        match kind {
            RecordKind::Write => image[range].copy_from_slice(&payload),
            _ => image[range].fill(0),
        }
        self.append(Entry {
            disk: DiskId(id),
            kind,
            offset,
            length: length as u32,
            payload: &payload,
            timestamp: Timestamp(self.clock),
            flags: Flags::NONE,
        });
    }

    fn checkpoint(&mut self, rng: &mut Rng) {
        self.clock += 1;
        let mark = CheckpointMark {
            request_id: rng.next(),
            app_consistent: rng.below(2) == 0,
            tags: vec![format!("t{}", self.head.0)],
        }
        .encode()
        .unwrap();
        self.append(Entry {
            disk: DiskId(0),
            kind: RecordKind::Checkpoint,
            offset: 0,
            length: mark.len() as u32,
            payload: &mark,
            timestamp: Timestamp(self.clock),
            flags: Flags::NONE,
        });
        self.snapshots.insert(self.head, self.disks.clone());
    }

    /// Applies up to a random durable point, in one or more passes.
    fn apply(&mut self, rng: &mut Rng) {
        let durable = self.job.landing.sync().unwrap();
        let applied = self.job.applied();
        if durable <= applied {
            return;
        }
        let up_to = Seq(applied.0 + 1 + rng.below(durable.0 - applied.0));
        while self.job.applied() < up_to {
            apply_pass(&self.job, up_to).unwrap();
        }
    }

    /// Every retained checkpoint reads back as the model's copy, and the replicas are now.
    fn check(&self, seed: u64) {
        let catalog = self.job.history.checkpoints().unwrap();
        let floor = self.job.history.floor();
        for cp in catalog
            .iter()
            .filter(|c| c.tags.iter().any(|t| t.starts_with('t')))
        {
            let expected = self
                .snapshots
                .get(&cp.seq)
                .unwrap_or_else(|| panic!("seed {seed}: catalog has {} the model lacks", cp.seq));
            assert!(
                cp.seq >= floor,
                "seed {seed}: checkpoint {} below the floor {floor}",
                cp.seq
            );
            for &(id, name, size) in &DISKS {
                let mut buf = vec![0u8; size as usize];
                read_at(&self.job, DiskId(id), cp.seq, 0, &mut buf).unwrap();
                assert_eq!(
                    blake3::hash(&buf),
                    blake3::hash(&expected[&id]),
                    "seed {seed}: disk {name} at checkpoint {} differs from the model",
                    cp.seq
                );
            }
        }
        // Tagged checkpoints the model made and the applier passed are all in the catalog.
        let applied = self.job.applied();
        let in_catalog: Vec<Seq> = catalog.iter().map(|c| c.seq).collect();
        for seq in self
            .snapshots
            .keys()
            .filter(|&&s| s <= applied && s >= floor)
        {
            assert!(
                in_catalog.contains(seq),
                "seed {seed}: checkpoint {seq} missing from the catalog"
            );
        }
        if applied == self.head {
            for &(id, name, size) in &DISKS {
                let mut buf = vec![0u8; size as usize];
                self.job.replicas[&DiskId(id)]
                    .device
                    .read_at(&mut buf, 0)
                    .unwrap();
                assert_eq!(
                    buf, self.disks[&id],
                    "seed {seed}: replica {name} differs from the model"
                );
            }
        }
    }
}

fn run(seed: u64) {
    eprintln!("history model: seed {seed} (CDP_TEST_SEED={seed} replays it)");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::load(dir.path()).unwrap();
    let job = jobs.get_or_create(meta()).unwrap();
    // No automatic checkpoints: the model knows only the ones it asked for.
    job.set_checkpoint_interval(Duration::from_secs(u64::MAX / 2_000_000));
    let mut world = World {
        job,
        disks: DISKS
            .iter()
            .map(|&(id, _, size)| (id, vec![0u8; size as usize]))
            .collect(),
        snapshots: BTreeMap::new(),
        head: Seq::NONE,
        clock: 1_000_000,
    };
    for step in 0..400 {
        match rng.below(20) {
            0..=13 => world.write(&mut rng),
            14 | 15 => world.checkpoint(&mut rng),
            16 | 17 => world.apply(&mut rng),
            18 => {
                // Retention with a random window: older checkpoints go from model and catalog.
                world.apply(&mut rng);
                let policy = RetentionPolicy {
                    window: Duration::from_micros(1 + rng.below(200_000_000)),
                    ..RetentionPolicy::default()
                };
                retention_pass(&world.job, &policy, None).unwrap();
                if rng.below(3) == 0 {
                    world.job.history.compact().unwrap();
                }
                let floor = world.job.history.floor();
                world.snapshots.retain(|&seq, _| seq >= floor);
            }
            _ => {
                world.apply(&mut rng);
                world.check(seed);
            }
        }
        if step % 100 == 99 {
            world.check(seed);
        }
    }
    world.job.landing.sync().unwrap();
    while world.job.applied() < world.head {
        apply_pass(&world.job, world.head).unwrap();
    }
    world.check(seed);
    assert!(
        world.job.history.stats().unwrap().entries > 0,
        "seed {seed}: no history recorded"
    );
    assert!(
        world.job.history.floor() > Seq::NONE,
        "seed {seed}: retention never raised the floor"
    );
    assert!(
        world.snapshots.len() > 3,
        "seed {seed}: too few checkpoints survived to check"
    );
}

#[test]
fn every_retained_checkpoint_reads_back_as_the_model() {
    match std::env::var("CDP_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => run(seed),
        None => {
            for seed in [1, 0x5eed, 0xdead_beef] {
                run(seed);
            }
        }
    }
}
