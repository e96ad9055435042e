//! Crash at every failpoint of the applier, reopen, and the views read the same bytes: the
//! replicas and every checkpoint equal the model after recovery and the rest of the apply.
//!
//! Needs the `failpoints` feature (`scripts/test` runs
//! `cargo test -p target-receiver --features failpoints --test apply_crash`); without it this
//! file compiles to nothing, because the failpoints it drives do not exist.

#![cfg(feature = "failpoints")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blockdev::BlockDevice;
use journal::mark::CheckpointMark;
use journal::ship::JobInfo;
use journal::wire::{DiskInfo, Mode};
use journal::{
    encode_record, Compression, DiskId, Entry, Flags, Generation, JobId, RecordKind, Seq, Timestamp,
};
use target_receiver::apply::{apply_pass, ApplyError};
use target_receiver::jobs::{Job, JobMeta, Jobs};
use target_receiver::views::read_at;

const DISKS: [(u32, u64); 2] = [(0, 192 << 10), (1, (64 << 10) + 512)];
const JOB: JobId = JobId([3; 16]);

/// Every failpoint of `apply.rs`, in the order a pass meets them.
const FAILPOINTS: [&str; 5] = [
    "apply::after-commit",
    "apply::mid-replica",
    "apply::after-replica-write",
    "apply::after-replica-sync",
    "apply::after-finish",
];

fn meta() -> JobMeta {
    JobMeta {
        info: JobInfo {
            job: JOB,
            job_name: "crash".into(),
            generation: Generation(1),
            mode: Mode::Async,
            disks: DISKS
                .iter()
                .map(|&(id, size_bytes)| DiskInfo {
                    disk: DiskId(id),
                    name: format!("d{id}"),
                    size_bytes,
                })
                .collect(),
        },
        agent: "a".into(),
    }
}

fn open(dir: &Path) -> (Jobs, Arc<Job>) {
    let jobs = Jobs::load(dir).unwrap();
    let job = jobs.get_or_create(meta()).unwrap();
    job.set_checkpoint_interval(Duration::from_secs(1 << 30));
    (jobs, job)
}

/// The model and the records written so far.
struct Model {
    disks: BTreeMap<u32, Vec<u8>>,
    snapshots: BTreeMap<Seq, BTreeMap<u32, Vec<u8>>>,
    head: Seq,
}

impl Model {
    /// Appends `n` writes (overlapping, unaligned, some zeroings) and a checkpoint.
    fn append(&mut self, job: &Job, round: u64, n: u64) {
        for i in 0..n {
            let (id, size) = DISKS[(i % 2) as usize];
            let offset = ((round * 7919 + i * 4099) * 512) % (size - (16 << 10));
            let length = 512 * (1 + (i * 13 + round) % 24);
            let kind = if i % 7 == 3 {
                RecordKind::WriteZeroes
            } else {
                RecordKind::Write
            };
            let payload: Vec<u8> = if kind == RecordKind::Write {
                (0..length)
                    .map(|b| (b as u8) ^ (round as u8) ^ (i as u8))
                    .collect()
            } else {
                Vec::new()
            };
            let image = self.disks.get_mut(&id).unwrap();
            let range = offset as usize..(offset + length) as usize;
            match kind {
                RecordKind::Write => image[range].copy_from_slice(&payload),
                _ => image[range].fill(0),
            }
            self.push(
                job,
                Entry {
                    disk: DiskId(id),
                    kind,
                    offset,
                    length: length as u32,
                    payload: &payload,
                    timestamp: Timestamp(round * 1000 + i),
                    flags: Flags::NONE,
                },
            );
        }
        let mark = CheckpointMark {
            request_id: round,
            app_consistent: false,
            tags: vec![format!("round-{round}")],
        }
        .encode()
        .unwrap();
        self.push(
            job,
            Entry {
                disk: DiskId(0),
                kind: RecordKind::Checkpoint,
                offset: 0,
                length: mark.len() as u32,
                payload: &mark,
                timestamp: Timestamp(round * 1000 + 999),
                flags: Flags::NONE,
            },
        );
        self.snapshots.insert(self.head, self.disks.clone());
        job.landing.sync().unwrap();
    }

    fn push(&mut self, job: &Job, entry: Entry<'_>) {
        self.head = self.head.next();
        let bytes =
            encode_record(&entry, Generation(1), self.head, Compression::default()).unwrap();
        job.landing.append_stored(&bytes).unwrap();
    }

    fn check(&self, job: &Job, context: &str) {
        for (seq, disks) in &self.snapshots {
            for (&id, expected) in disks {
                let mut buf = vec![0u8; expected.len()];
                read_at(job, DiskId(id), *seq, 0, &mut buf).unwrap();
                assert!(
                    buf == *expected,
                    "{context}: disk {id} at {seq} differs from the model"
                );
            }
        }
        for (&id, expected) in &self.disks {
            let mut buf = vec![0u8; expected.len()];
            job.replicas[&DiskId(id)]
                .device
                .read_at(&mut buf, 0)
                .unwrap();
            assert!(
                buf == *expected,
                "{context}: replica {id} differs from the model"
            );
        }
    }
}

fn apply_all(job: &Job, head: Seq) {
    while job.applied() < head {
        apply_pass(job, head).unwrap();
    }
}

#[test]
fn a_crash_at_any_failpoint_recovers_to_the_same_bytes() {
    let scenario = fail::FailScenario::setup();
    for name in FAILPOINTS {
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model {
            disks: DISKS
                .iter()
                .map(|&(id, size)| (id, vec![0u8; size as usize]))
                .collect(),
            snapshots: BTreeMap::new(),
            head: Seq::NONE,
        };
        {
            let (_jobs, job) = open(dir.path());
            model.append(&job, 1, 40);
            apply_all(&job, model.head);
            model.append(&job, 2, 40);
            fail::cfg(name, "return").unwrap();
            match apply_pass(&job, model.head) {
                Err(ApplyError::Failpoint(hit)) => assert_eq!(hit, name),
                other => panic!("{name}: the pass did not stop at its failpoint: {other:?}"),
            }
            fail::remove(name);
            // The process "dies" here: everything is dropped without another call.
        }
        let (_jobs, job) = open(dir.path());
        apply_all(&job, model.head);
        model.check(&job, &format!("after a crash at {name}"));
        model.append(&job, 3, 40);
        apply_all(&job, model.head);
        model.check(&job, &format!("after a crash at {name} and more writes"));
    }

    // A crash in the middle of recovery itself: recovery runs again and finishes.
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model {
        disks: DISKS
            .iter()
            .map(|&(id, size)| (id, vec![0u8; size as usize]))
            .collect(),
        snapshots: BTreeMap::new(),
        head: Seq::NONE,
    };
    {
        let (_jobs, job) = open(dir.path());
        model.append(&job, 1, 40);
        fail::cfg("apply::mid-replica", "return").unwrap();
        assert!(apply_pass(&job, model.head).is_err());
        fail::remove("apply::mid-replica");
    }
    fail::cfg("recover::before-clear", "return").unwrap();
    let err = Jobs::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("recover::before-clear"), "{err}");
    fail::remove("recover::before-clear");
    let (_jobs, job) = open(dir.path());
    apply_all(&job, model.head);
    model.check(&job, "after a crash during recovery");
    scenario.teardown();
}
