//! Poisoning: after an injected fsync or write error every later call fails with `Poisoned`
//! until the journal is reopened, an fsync is never retried and trusted, and reopening
//! recovers exactly the records that were durable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{check_reads, config, Model};
use journal::{
    AppendError, Crash, Journal, MemOp, MemStorage, ReadError, Seq, SyncError, TrimError,
};

fn assert_poisoned(journal: &mut Journal) {
    assert!(journal.poisoned().is_some());
    let record = Model::write(10, 1, false);
    assert!(matches!(
        journal.append(record.entry()),
        Err(AppendError::Poisoned { .. })
    ));
    assert!(matches!(journal.sync(), Err(SyncError::Poisoned { .. })));
    assert!(matches!(journal.sync(), Err(SyncError::Poisoned { .. })));
    assert!(matches!(
        journal.trim(Seq(5)),
        Err(TrimError::Poisoned { .. })
    ));
    assert!(matches!(
        journal.reader(Seq(1)),
        Err(ReadError::Poisoned { .. })
    ));
}

#[test]
fn fsync_error_poisons_and_is_never_retried() {
    let storage = MemStorage::new();
    let mut journal = Journal::open(storage.clone(), config(64 << 10)).unwrap();
    let mut model = Vec::new();
    for i in 0..3 {
        let record = Model::write(1000, i, false);
        journal.append(record.entry()).unwrap();
        model.push(record);
    }
    assert_eq!(journal.sync().unwrap(), Seq(3));
    for i in 3..6 {
        let record = Model::write(1000, i, false);
        journal.append(record.entry()).unwrap();
        model.push(record);
    }
    storage.fail(MemOp::SyncData, 1);
    let syncs_before = storage.op_count(MemOp::SyncData);
    match journal.sync() {
        Err(SyncError::Io { name, .. }) => assert!(name.ends_with(".seg"), "{name}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        journal.durable_seq(),
        Seq(3),
        "a failed fsync makes nothing durable"
    );
    assert_poisoned(&mut journal);
    assert_eq!(
        storage.op_count(MemOp::SyncData),
        syncs_before + 1,
        "no fsync after the failed one"
    );
    drop(journal);

    // The failed fsync dropped the dirty pages (as Linux does): after a power cut, only the
    // durable records are there, and the reopened journal continues from them.
    let image = storage.crash(Crash::DropUnsynced);
    let mut journal = Journal::open(image, config(64 << 10)).unwrap();
    assert_eq!(journal.head_seq(), Seq(3));
    check_reads(&journal, Seq(1), &model);
    let record = Model::write(10, 9, false);
    assert_eq!(journal.append(record.entry()).unwrap(), Seq(4));
    assert_eq!(journal.sync().unwrap(), Seq(4));
}

#[test]
fn write_error_poisons() {
    let storage = MemStorage::new();
    let mut journal = Journal::open(storage.clone(), config(64 << 10)).unwrap();
    let record = Model::write(100, 1, false);
    journal.append(record.entry()).unwrap();
    storage.fail(MemOp::Write, 1);
    assert!(matches!(
        journal.append(record.entry()),
        Err(AppendError::Io { .. })
    ));
    assert_eq!(journal.head_seq(), Seq(1), "a failed append takes no seq");
    assert_poisoned(&mut journal);
    drop(journal);
    // Reopening (same process, page cache intact) clears the poison.
    let mut journal = Journal::open(storage, config(64 << 10)).unwrap();
    assert!(journal.poisoned().is_none());
    assert_eq!(journal.append(record.entry()).unwrap(), Seq(2));
    assert_eq!(journal.sync().unwrap(), Seq(2));
}

#[test]
fn fsync_error_during_rollover_poisons() {
    let storage = MemStorage::new();
    let mut journal = Journal::open(storage.clone(), config(16 << 10)).unwrap();
    let record = Model::write(6000, 1, false);
    journal.append(record.entry()).unwrap();
    journal.append(record.entry()).unwrap();
    // The third record does not fit: the rollover's fsync of the full segment fails.
    storage.fail(MemOp::SyncData, 1);
    assert!(matches!(
        journal.append(record.entry()),
        Err(AppendError::Io { .. })
    ));
    assert_poisoned(&mut journal);
}

#[test]
fn invalid_entries_do_not_poison() {
    let storage = MemStorage::new();
    let mut journal = Journal::open(storage, config(64 << 10)).unwrap();
    let mut record = Model::write(10, 1, false);
    record.length = 11;
    assert!(matches!(
        journal.append(record.entry()),
        Err(AppendError::InvalidEntry(_))
    ));
    assert!(journal.poisoned().is_none());
    record.length = 10;
    assert_eq!(journal.append(record.entry()).unwrap(), Seq(1));
}

#[test]
fn shared_journal_fsync_error_fails_every_waiter() {
    let storage = MemStorage::new();
    let journal = Journal::open(storage.clone(), config(64 << 10))
        .unwrap()
        .into_shared();
    let record = Model::write(100, 1, false);
    let seq = journal.append(record.entry()).unwrap();
    assert_eq!(journal.wait_durable(seq).unwrap(), seq);
    let seq = journal.append(record.entry()).unwrap();
    storage.fail(MemOp::SyncData, 1);
    assert!(matches!(
        journal.wait_durable(seq),
        Err(SyncError::Io { .. })
    ));
    assert!(matches!(
        journal.wait_durable(seq),
        Err(SyncError::Poisoned { .. })
    ));
    assert!(matches!(
        journal.wait_durable(Seq(1)),
        Err(SyncError::Poisoned { .. })
    ));
    assert!(matches!(
        journal.append(record.entry()),
        Err(AppendError::Poisoned { .. })
    ));
    assert!(journal.poisoned().is_some());
}
