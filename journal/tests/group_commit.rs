//! Group commit: many threads append and wait; seqs stay dense and unique, one fdatasync
//! covers many appends, appends go on while a leader's fdatasync runs (the append lock is
//! not held), and a segment rollover during that fdatasync is still covered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use common::{config, Model};
use journal::{
    Crash, DiskId, Entry, Journal, MemStorage, Seq, SharedJournal, Storage, StorageFile, Timestamp,
};

const THREADS: u64 = 4;
const PER_THREAD: u64 = 150;

fn payload_of(thread: u64, i: u64) -> Vec<u8> {
    let mut p = format!("thread {thread} write {i} ").into_bytes();
    p.resize(512 + (i as usize % 7) * 700, thread as u8);
    p
}

fn hammer(journal: &Arc<SharedJournal>) -> Vec<(u64, u64, Seq)> {
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let journal = journal.clone();
        handles.push(thread::spawn(move || {
            let mut mine = Vec::new();
            for i in 0..PER_THREAD {
                let payload = payload_of(t, i);
                let entry = Entry::write(DiskId(t as u32), i * 4096, &payload, Timestamp(i));
                let seq = journal.append(entry).unwrap();
                let durable = journal.wait_durable(seq).unwrap();
                assert!(durable >= seq);
                mine.push((t, i, seq));
            }
            mine
        }));
    }
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

fn check_all(journal: &SharedJournal, written: &[(u64, u64, Seq)]) {
    let total = THREADS * PER_THREAD;
    let mut seqs: Vec<Seq> = written.iter().map(|w| w.2).collect();
    seqs.sort();
    assert_eq!(
        seqs,
        (1..=total).map(Seq).collect::<Vec<_>>(),
        "dense, unique"
    );
    let mut by_seq = written.to_vec();
    by_seq.sort_by_key(|w| w.2);
    let records: Vec<_> = journal
        .reader(Seq(1))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(records.len() as u64, total);
    for (record, (t, i, seq)) in records.iter().zip(by_seq) {
        assert_eq!(record.header.seq, seq);
        assert_eq!(record.payload, payload_of(t, i));
    }
}

#[test]
fn threads_get_dense_seqs_and_durability_in_memory() {
    let storage = MemStorage::new();
    let journal = Arc::new(
        Journal::open(storage.clone(), config(64 << 10))
            .unwrap()
            .into_shared(),
    );
    let written = hammer(&journal);
    check_all(&journal, &written);
    assert!(journal.stats().segments_created > 5, "rolled over");
    // Everything acknowledged durable survives a power cut.
    let image = storage.crash(Crash::DropUnsynced);
    let reopened = Journal::open(image, config(64 << 10)).unwrap();
    assert_eq!(reopened.head_seq(), Seq(THREADS * PER_THREAD));
}

#[test]
fn threads_on_a_real_directory_share_fdatasyncs() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(
        Journal::open(dir.path(), config(256 << 10))
            .unwrap()
            .into_shared(),
    );
    let written = hammer(&journal);
    check_all(&journal, &written);
    let stats = journal.stats();
    assert_eq!(stats.records, THREADS * PER_THREAD);
    assert!(
        stats.syncs < stats.records,
        "group commit: {} fdatasyncs for {} waits",
        stats.syncs,
        stats.records
    );
}

/// A storage whose next fdatasync blocks until the test opens the gate.
#[derive(Debug)]
struct Gated {
    inner: MemStorage,
    gate: Arc<Gate>,
}

#[derive(Debug, Default)]
struct Gate {
    /// (armed: the next sync blocks, blocked: a sync is waiting, open: release it)
    state: Mutex<(bool, bool, bool)>,
    changed: Condvar,
}

impl Gate {
    fn arm(&self) {
        *self.state.lock().unwrap() = (true, false, false);
    }
    fn wait_blocked(&self) {
        let mut s = self.state.lock().unwrap();
        while !s.1 {
            s = self.changed.wait(s).unwrap();
        }
    }
    fn open(&self) {
        self.state.lock().unwrap().2 = true;
        self.changed.notify_all();
    }
    fn pass(&self) {
        let mut s = self.state.lock().unwrap();
        if !s.0 {
            return;
        }
        s.0 = false;
        s.1 = true;
        self.changed.notify_all();
        while !s.2 {
            s = self.changed.wait(s).unwrap();
        }
    }
}

#[derive(Debug)]
struct GatedFile {
    inner: Arc<dyn StorageFile>,
    gate: Arc<Gate>,
}

impl Storage for Gated {
    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(GatedFile {
            inner: self.inner.create(name)?,
            gate: self.gate.clone(),
        }))
    }
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(GatedFile {
            inner: self.inner.open(name)?,
            gate: self.gate.clone(),
        }))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.inner.sync_dir()
    }
}

impl StorageFile for GatedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn size_bytes(&self) -> io::Result<u64> {
        self.inner.size_bytes()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        self.inner.allocate(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.gate.pass();
        self.inner.sync_data()
    }
}

#[test]
fn appends_and_rollover_continue_during_a_leaders_fdatasync() {
    let memory = MemStorage::new();
    let gate = Arc::new(Gate::default());
    let storage: Arc<dyn Storage> = Arc::new(Gated {
        inner: memory.clone(),
        gate: gate.clone(),
    });
    let journal = Arc::new(
        Journal::open(storage, config(16 << 10))
            .unwrap()
            .into_shared(),
    );
    let mut model = Vec::new();
    let first = Model::write(3000, 1, false);
    let seq = journal.append(first.entry()).unwrap();
    model.push(first);

    gate.arm();
    let leader = {
        let journal = journal.clone();
        thread::spawn(move || journal.wait_durable(seq))
    };
    gate.wait_blocked();
    // The leader is inside fdatasync. Appends go on, and roll over to new segments (whose
    // own fsyncs pass: the gate holds only the leader's).
    let segments_before = journal.stats().segments_created;
    for i in 0..12 {
        let record = Model::write(3000, 10 + i, false);
        journal.append(record.entry()).unwrap();
        model.push(record);
    }
    assert!(
        journal.stats().segments_created > segments_before,
        "rolled over"
    );
    assert_eq!(journal.head_seq(), Seq(13));
    gate.open();
    assert!(leader.join().unwrap().unwrap() >= seq);

    // Everything appended since is covered by the next leader, across the rollover.
    assert_eq!(journal.wait_durable(Seq(13)).unwrap(), Seq(13));
    let image = memory.crash(Crash::DropUnsynced);
    let reopened = Journal::open(image, config(16 << 10)).unwrap();
    assert_eq!(reopened.head_seq(), Seq(13));
    common::check_reads(&reopened, Seq(1), &model);
}

#[test]
fn waiting_for_a_seq_never_appended_is_an_error() {
    let journal = Journal::open(MemStorage::new(), config(64 << 10))
        .unwrap()
        .into_shared();
    assert!(matches!(
        journal.wait_durable(Seq(1)),
        Err(journal::SyncError::NotAppended { .. })
    ));
    assert_eq!(journal.wait_durable(Seq::NONE).unwrap(), Seq::NONE);
}
