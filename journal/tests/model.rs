//! Property test against a model: random appends (every kind, payloads of 0..256 KiB,
//! compressible and random), syncs, trims, reopens, crashes and reads from random seqs, on the
//! storage double, compared with a `Vec` of what was appended. Reads must match exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{check_reads, config_with, Model};
use journal::{Compression, Crash, Journal, MemStorage, RecordKind, Seq};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Action {
    Append {
        kind: RecordKind,
        len: usize,
        seed: u64,
        compressible: bool,
        fua: bool,
    },
    Sync,
    /// Trim up to a fraction (per 256) of the way from the oldest seq to the head.
    Trim(u8),
    /// Drop the journal and open it again (a clean process restart, page cache intact).
    Reopen,
    /// Power cut: everything not synced is lost.
    Crash,
    /// Read from a fraction (per 256) of the way from the oldest seq to head + 1.
    Read(u8),
}

fn action() -> impl Strategy<Value = Action> {
    let len = prop_oneof![0usize..64, 0usize..8192, 0usize..(256 << 10)];
    let kind = prop_oneof![
        6 => Just(RecordKind::Write),
        1 => Just(RecordKind::Trim),
        1 => Just(RecordKind::WriteZeroes),
        1 => Just(RecordKind::Flush),
        1 => Just(RecordKind::Checkpoint),
    ];
    prop_oneof![
        10 => (kind, len, any::<u64>(), any::<bool>(), any::<bool>()).prop_map(
            |(kind, len, seed, compressible, fua)| Action::Append { kind, len, seed, compressible, fua }
        ),
        3 => Just(Action::Sync),
        1 => any::<u8>().prop_map(Action::Trim),
        1 => Just(Action::Reopen),
        1 => Just(Action::Crash),
        2 => any::<u8>().prop_map(Action::Read),
    ]
}

fn between(first: Seq, last: Seq, fraction: u8) -> Seq {
    Seq(first.0 + (last.0.saturating_sub(first.0)) * u64::from(fraction) / 255)
}

fn run(segment_bytes_max: u64, compression: Compression, actions: Vec<Action>) {
    let config = config_with(segment_bytes_max, compression);
    let mut storage = MemStorage::new();
    let mut journal = Journal::open(storage.clone(), config.clone()).unwrap();
    let mut model: Vec<Model> = Vec::new();
    for action in actions {
        match action {
            Action::Append {
                kind,
                len,
                seed,
                compressible,
                fua,
            } => {
                let record = Model::new(kind, len, seed, compressible, fua);
                let seq = journal.append(record.entry()).unwrap();
                model.push(record);
                assert_eq!(seq, Seq(model.len() as u64), "seqs are dense");
                assert_eq!(journal.head_seq(), seq);
            }
            Action::Sync => {
                let durable = journal.sync().unwrap();
                assert_eq!(durable, journal.head_seq());
                assert_eq!(journal.durable_seq(), durable);
            }
            Action::Trim(fraction) => {
                let before = journal.first_seq();
                let up_to = between(before, journal.head_seq().next(), fraction);
                let first = journal.trim(up_to).unwrap();
                assert!(first >= before);
                // Only whole segments go, and never a record at or above `up_to`.
                assert!(first <= up_to.max(before), "trim to {up_to} left {first}");
            }
            Action::Reopen => {
                let head = journal.head_seq();
                drop(journal);
                journal = Journal::open(storage.clone(), config.clone()).unwrap();
                assert_eq!(journal.head_seq(), head, "a restart loses nothing written");
                assert_eq!(journal.durable_seq(), head);
                assert!(journal.recovery().torn_tail.is_none());
            }
            Action::Crash => {
                let durable = journal.durable_seq();
                drop(journal);
                storage = storage.crash(Crash::DropUnsynced);
                journal = Journal::open(storage.clone(), config.clone()).unwrap();
                assert_eq!(
                    journal.head_seq(),
                    durable,
                    "exactly the durable records survive"
                );
                model.truncate(durable.0 as usize);
            }
            Action::Read(fraction) => {
                let from = between(journal.first_seq(), journal.head_seq().next(), fraction);
                check_reads(&journal, from, &model);
            }
        }
    }
    check_reads(&journal, journal.first_seq(), &model);
    // Raw reads return the stored bytes of the same records, each verifiable on its own.
    let mut seq = journal.first_seq();
    for stored in journal.raw_reader(seq).unwrap() {
        let stored = stored.unwrap();
        let (record, used) = journal::decode_record(&stored.bytes).unwrap();
        assert_eq!(used, stored.bytes.len());
        model[(seq.0 - 1) as usize].check(&record, seq, record.header.generation);
        seq = seq.next();
    }
    assert_eq!(seq, journal.head_seq().next());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn journal_matches_model(
        segment_bytes_max in prop_oneof![Just(16u64 << 10), Just(64u64 << 10), Just(1u64 << 20)],
        zstd in any::<bool>(),
        actions in proptest::collection::vec(action(), 1..60),
    ) {
        let compression = if zstd { Compression::default() } else { Compression::None };
        run(segment_bytes_max, compression, actions);
    }
}
