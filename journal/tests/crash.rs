//! Crash tests by enumeration on the storage double: the machine stops at every fdatasync
//! (and every other mutating call) of a workload, and the image a power cut would leave is
//! opened for every way the unsynced bytes can survive: none, any prefix in order (torn at
//! every byte of the tail batch), or only a torn prefix of the last write. After reopening:
//! every record acknowledged durable is intact, nothing past the tear is returned, and appends
//! continue with dense seqs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{check_reads, config, Model};
use journal::{Crash, Journal, MemOp, MemStorage, RecordKind, Seq};

const SEGMENT_BYTES: u64 = 16 << 10;

/// Batches of records, each followed by a sync: small records (so tearing every byte of a
/// batch is cheap), compressible and random ones, every kind, and records that force
/// rollovers (16 KiB segments) including one larger than a segment.
fn workload() -> Vec<Vec<Model>> {
    vec![
        vec![Model::write(10, 1, false), Model::write(300, 2, true)],
        vec![
            Model::new(RecordKind::Trim, 8192, 3, false, false),
            Model::write(700, 4, false),
            Model::new(RecordKind::Flush, 0, 5, false, true),
        ],
        vec![Model::write(9000, 6, false), Model::write(6000, 7, true)],
        vec![Model::write(20_000, 8, false)],
        vec![
            Model::new(RecordKind::Checkpoint, 0, 9, false, false),
            Model::new(RecordKind::WriteZeroes, 4096, 10, false, true),
            Model::write(1, 11, false),
        ],
        vec![Model::write(3000, 12, true), Model::write(100, 13, false)],
    ]
}

/// What a run did before the machine stopped.
struct Outcome {
    /// Every record whose append returned a seq, in seq order.
    appended: Vec<Model>,
    /// Highest seq a successful `sync` returned.
    acked_durable: Seq,
}

/// Runs the workload until a call fails (the machine halted).
fn run(storage: &MemStorage) -> Outcome {
    let mut out = Outcome {
        appended: Vec::new(),
        acked_durable: Seq::NONE,
    };
    let Ok(mut journal) = Journal::open(storage.clone(), config(SEGMENT_BYTES)) else {
        return out;
    };
    for batch in workload() {
        for record in batch {
            match journal.append(record.entry()) {
                Ok(seq) => {
                    out.appended.push(record);
                    assert_eq!(seq, Seq(out.appended.len() as u64));
                }
                Err(_) => return out,
            }
        }
        match journal.sync() {
            Ok(durable) => out.acked_durable = durable,
            Err(_) => return out,
        }
    }
    let _ = journal.trim(Seq(8));
    out
}

/// Opens the image and checks it against what the run acknowledged; returns whether opening
/// cut a torn tail.
fn verify(image: MemStorage, outcome: &Outcome, what: &str) -> bool {
    let mut journal = Journal::open(image.clone(), config(SEGMENT_BYTES))
        .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
    let head = journal.head_seq();
    let torn = journal.recovery().torn_tail.is_some();
    assert!(
        head >= outcome.acked_durable,
        "{what}: lost durable records (head {head}, acknowledged {})",
        outcome.acked_durable
    );
    assert!(
        head.0 as usize <= outcome.appended.len(),
        "{what}: head {head} beyond what was appended"
    );
    assert_eq!(journal.durable_seq(), head, "{what}");
    check_reads(&journal, journal.first_seq(), &outcome.appended);
    // Appends continue with dense seqs, and survive a further crash once synced.
    let more = Model::write(50, 99, false);
    assert_eq!(journal.append(more.entry()).unwrap(), head.next(), "{what}");
    journal.sync().unwrap();
    let mut model = outcome.appended[..head.0 as usize].to_vec();
    model.push(more);
    let image = image.crash(Crash::DropUnsynced);
    let journal = Journal::open(image, config(SEGMENT_BYTES)).unwrap();
    assert_eq!(journal.head_seq(), head.next(), "{what}");
    check_reads(&journal, journal.first_seq(), &model);
    torn
}

/// Every byte count from 0 to `total` when small, else a dense sample with both ends.
fn tear_points(total: u64) -> Vec<u64> {
    if total <= 24 << 10 {
        (0..=total).collect()
    } else {
        let step = total / 4096 + 1;
        let mut points: Vec<u64> = (0..=total).step_by(step as usize).collect();
        points.extend(total.saturating_sub(200)..=total);
        points
    }
}

fn calls_in_full_run(op: MemOp) -> u64 {
    let storage = MemStorage::new();
    let outcome = run(&storage);
    assert_eq!(outcome.acked_durable, Seq(outcome.appended.len() as u64));
    storage.op_count(op)
}

#[test]
fn crash_at_every_fdatasync_and_every_byte_of_the_tail_batch() {
    let syncs = calls_in_full_run(MemOp::SyncData);
    assert!(
        syncs >= 10,
        "the workload syncs, rolls over and creates segments"
    );
    let mut images = 0;
    let mut torn = 0;
    for n in 1..=syncs + 1 {
        let storage = MemStorage::new();
        storage.halt_at(MemOp::SyncData, n);
        let outcome = run(&storage);
        let unsynced = storage.unsynced_write_bytes();
        for bytes in tear_points(unsynced) {
            let what = format!("halt at fdatasync {n}, keep {bytes} of {unsynced} bytes");
            torn += usize::from(verify(
                storage.crash(Crash::KeepBytes(bytes)),
                &outcome,
                &what,
            ));
            images += 1;
        }
        if let Some(last) = storage.last_unsynced_write_bytes() {
            for bytes in tear_points(last as u64) {
                let what = format!("halt at fdatasync {n}, last write torn at {bytes} of {last}");
                let image = storage.crash(Crash::TearLast(bytes as usize));
                torn += usize::from(verify(image, &outcome, &what));
                images += 1;
            }
        }
    }
    assert!(images > 1000, "enumerated {images} images");
    assert!(
        torn > images / 2,
        "{torn} of {images} images had a torn tail"
    );
}

#[test]
fn crash_at_every_other_mutating_call() {
    for op in [
        MemOp::Write,
        MemOp::Create,
        MemOp::Allocate,
        MemOp::Rename,
        MemOp::SyncDir,
        MemOp::Remove,
        MemOp::SetLen,
    ] {
        let calls = calls_in_full_run(op);
        for n in 1..=calls {
            let storage = MemStorage::new();
            storage.halt_at(op, n);
            let outcome = run(&storage);
            let what = format!("halt at {op:?} {n}");
            verify(storage.crash(Crash::DropUnsynced), &outcome, &what);
            let all = storage.unsynced_write_bytes();
            verify(storage.crash(Crash::KeepBytes(all)), &outcome, &what);
            verify(storage.crash(Crash::KeepBytes(all / 2)), &outcome, &what);
            if let Some(last) = storage.last_unsynced_write_bytes() {
                verify(storage.crash(Crash::TearLast(last / 2)), &outcome, &what);
            }
        }
    }
}

/// Without a crash the page cache keeps everything: a process kill loses no appended record,
/// synced or not (append reached the OS before it returned).
#[test]
fn process_kill_loses_nothing_appended() {
    let storage = MemStorage::new();
    let mut journal = Journal::open(storage.clone(), config(SEGMENT_BYTES)).unwrap();
    let mut model = Vec::new();
    for (i, batch) in workload().into_iter().enumerate() {
        for record in batch {
            journal.append(record.entry()).unwrap();
            model.push(record);
        }
        if i % 2 == 0 {
            journal.sync().unwrap();
        }
    }
    drop(journal);
    let journal = Journal::open(storage, config(SEGMENT_BYTES)).unwrap();
    assert_eq!(journal.head_seq(), Seq(model.len() as u64));
    check_reads(&journal, Seq(1), &model);
}
