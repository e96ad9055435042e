//! [`MemStorage`]: the in-memory storage double for tests and the simulator. It keeps a
//! *live* and a *durable* image of every file and of the directory, injects I/O and fsync
//! errors at chosen calls, and can crash: everything not synced is dropped, optionally
//! keeping a torn prefix of the unsynced writes (redb's crash-consistency double).
//!
//! Model (pessimistic, as Linux after a power cut): a write is durable only after a
//! successful `sync_data` of its file; a creation, rename or removal only after `sync_dir`;
//! a failed `sync_data` forgets the file's unsynced writes (the kernel marks the pages clean)
//! although reads still see them. Must never: let a crash keep a byte the mode does not
//! allow, or let a later successful sync resurrect writes a failed sync lost.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::{Storage, StorageFile};

/// An operation of the double, for fault injection and counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemOp {
    /// `Storage::list`.
    List,
    /// `Storage::create`.
    Create,
    /// `Storage::open`.
    Open,
    /// `Storage::rename`.
    Rename,
    /// `Storage::remove`.
    Remove,
    /// `Storage::sync_dir`.
    SyncDir,
    /// `StorageFile::read_at`.
    Read,
    /// `StorageFile::write_all_at`.
    Write,
    /// `StorageFile::set_len`.
    SetLen,
    /// `StorageFile::allocate`.
    Allocate,
    /// `StorageFile::sync_data`.
    SyncData,
}

/// What survives a [`MemStorage::crash`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// Only what was synced.
    DropUnsynced,
    /// What was synced plus the unsynced changes in the order they were made, up to `bytes`
    /// bytes of written data: the last write kept may be torn at any byte (in-order model).
    KeepBytes(u64),
    /// What was synced plus the first `bytes` bytes of the last unsynced write only, every
    /// earlier unsynced write lost (pages written back out of order).
    TearLast(usize),
}

/// The in-memory storage double. Clones share the same files.
#[derive(Clone, Default)]
pub struct MemStorage {
    state: Arc<Mutex<MemState>>,
}

impl std::fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("MemStorage")
            .field("files", &state.live_dir.keys().collect::<Vec<_>>())
            .field("unsynced_changes", &state.unsynced.len())
            .finish()
    }
}

#[derive(Debug, Default)]
struct MemState {
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    live_dir: BTreeMap<String, u64>,
    durable_dir: BTreeMap<String, u64>,
    /// Every change not yet synced, in the order it was made (all files).
    unsynced: Vec<Pending>,
    /// Scheduled faults: the `nth` next call of `op` fails (counted down on every call).
    faults: Vec<(MemOp, u64)>,
    /// Scheduled halts: the `nth` next call of `op` stops the machine.
    halts: Vec<(MemOp, u64)>,
    /// Set by a halt: every call fails and changes nothing, until `crash` makes a new image.
    halted: bool,
    counts: HashMap<MemOp, u64>,
}

#[derive(Debug, Default, Clone)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Pending {
    inode: u64,
    change: Change,
}

#[derive(Debug, Clone)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

impl Change {
    fn apply(&self, image: &mut Vec<u8>) {
        match self {
            Change::Write { offset, data } => write_image(image, *offset, data),
            Change::SetLen(len) => image.resize(usize_of(*len), 0),
        }
    }
}

/// File offsets in the double are memory offsets; tests never go near `usize::MAX`.
fn usize_of(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

fn write_image(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let start = usize_of(offset);
    let end = start.saturating_add(data.len());
    if image.len() < end {
        image.resize(end, 0);
    }
    image[start..end].copy_from_slice(data);
}

/// Why a call of the double fails.
enum Refusal {
    /// An injected I/O error (the call's usual failure semantics apply).
    Fault(MemOp),
    /// The machine halted at or before this call: nothing changes.
    Halted(MemOp),
}

impl From<Refusal> for io::Error {
    fn from(refusal: Refusal) -> io::Error {
        match refusal {
            Refusal::Fault(op) => io::Error::other(format!("injected {op:?} fault")),
            Refusal::Halted(op) => io::Error::other(format!("machine halted at {op:?}")),
        }
    }
}

/// Counts down the schedule entries for `op`; true if one reached its call.
fn due(schedule: &mut Vec<(MemOp, u64)>, op: MemOp) -> bool {
    let mut hit = false;
    schedule.retain_mut(|(scheduled, nth)| {
        if *scheduled != op {
            return true;
        }
        *nth -= 1;
        if *nth == 0 {
            hit = true;
            false
        } else {
            true
        }
    });
    hit
}

impl MemState {
    /// Counts a call of `op` and tells whether a scheduled fault or halt refuses it.
    fn refusal(&mut self, op: MemOp) -> Result<(), Refusal> {
        if self.halted {
            return Err(Refusal::Halted(op));
        }
        *self.counts.entry(op).or_insert(0) += 1;
        if due(&mut self.halts, op) {
            self.halted = true;
            return Err(Refusal::Halted(op));
        }
        if due(&mut self.faults, op) {
            return Err(Refusal::Fault(op));
        }
        Ok(())
    }

    fn call(&mut self, op: MemOp) -> io::Result<()> {
        Ok(self.refusal(op)?)
    }

    fn inode(&mut self, id: u64) -> io::Result<&mut Inode> {
        self.inodes
            .get_mut(&id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such inode"))
    }

    fn change(&mut self, inode: u64, change: Change) -> io::Result<()> {
        change.apply(&mut self.inode(inode)?.live);
        self.unsynced.push(Pending { inode, change });
        Ok(())
    }
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        // A panic while holding the lock can only come from a test assertion elsewhere; the
        // state is plain data and stays usable, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the `nth` next call (1 = the very next) of `op` fail with an I/O error.
    pub fn fail(&self, op: MemOp, nth: u64) {
        if nth > 0 {
            self.lock().faults.push((op, nth));
        }
    }

    /// Stops the machine at the `nth` next call (1 = the very next) of `op`: that call and
    /// every later one fail and change nothing (an fdatasync in flight leaves its writes
    /// unsynced). Then [`crash`](MemStorage::crash) gives the image a power cut would leave.
    pub fn halt_at(&self, op: MemOp, nth: u64) {
        if nth > 0 {
            self.lock().halts.push((op, nth));
        }
    }

    /// Whether a halt stopped the machine.
    pub fn halted(&self) -> bool {
        self.lock().halted
    }

    /// How many times `op` was called (failed calls included, calls after a halt not).
    pub fn op_count(&self, op: MemOp) -> u64 {
        self.lock().counts.get(&op).copied().unwrap_or(0)
    }

    /// Bytes written and not yet synced (the range of [`Crash::KeepBytes`]).
    pub fn unsynced_write_bytes(&self) -> u64 {
        self.lock()
            .unsynced
            .iter()
            .map(|p| match &p.change {
                Change::Write { data, .. } => data.len() as u64,
                Change::SetLen(_) => 0,
            })
            .sum()
    }

    /// Length of the last unsynced write (the range of [`Crash::TearLast`]).
    pub fn last_unsynced_write_bytes(&self) -> Option<usize> {
        self.lock()
            .unsynced
            .iter()
            .rev()
            .find_map(|p| match &p.change {
                Change::Write { data, .. } => Some(data.len()),
                Change::SetLen(_) => None,
            })
    }

    /// The storage as it would be found after a power cut now: a new, independent storage
    /// holding the durable images plus what `mode` keeps of the unsynced changes. Handles of
    /// `self` keep writing into `self`, never into the result.
    pub fn crash(&self, mode: Crash) -> MemStorage {
        let state = self.lock();
        let mut images: HashMap<u64, Vec<u8>> = state
            .durable_dir
            .values()
            .filter_map(|id| {
                state
                    .inodes
                    .get(id)
                    .map(|inode| (*id, inode.durable.clone()))
            })
            .collect();
        match mode {
            Crash::DropUnsynced => {}
            Crash::KeepBytes(mut budget) => {
                for pending in &state.unsynced {
                    let image = images.get_mut(&pending.inode);
                    match &pending.change {
                        Change::SetLen(_) => {
                            if let Some(image) = image {
                                pending.change.apply(image);
                            }
                        }
                        Change::Write { offset, data } => {
                            let keep = usize_of(budget).min(data.len());
                            if let Some(image) = image {
                                write_image(image, *offset, &data[..keep]);
                            }
                            budget -= keep as u64;
                            if keep < data.len() {
                                break;
                            }
                        }
                    }
                }
            }
            Crash::TearLast(bytes) => {
                let last = state.unsynced.iter().rev().find_map(|p| match &p.change {
                    Change::Write { offset, data } => Some((p.inode, *offset, data)),
                    Change::SetLen(_) => None,
                });
                if let Some((inode, offset, data)) = last {
                    if let Some(image) = images.get_mut(&inode) {
                        write_image(image, offset, &data[..bytes.min(data.len())]);
                    }
                }
            }
        }
        let inodes = images
            .into_iter()
            .map(|(id, image)| {
                (
                    id,
                    Inode {
                        live: image.clone(),
                        durable: image,
                    },
                )
            })
            .collect();
        MemStorage {
            state: Arc::new(Mutex::new(MemState {
                inodes,
                next_inode: state.next_inode,
                live_dir: state.durable_dir.clone(),
                durable_dir: state.durable_dir.clone(),
                ..MemState::default()
            })),
        }
    }

    /// Names of the files (live directory), sorted.
    pub fn file_names(&self) -> Vec<String> {
        self.lock().live_dir.keys().cloned().collect()
    }

    /// The live content of a file.
    pub fn file(&self, name: &str) -> Option<Vec<u8>> {
        let state = self.lock();
        let id = state.live_dir.get(name)?;
        state.inodes.get(id).map(|inode| inode.live.clone())
    }

    /// Media corruption: XORs `mask` into the byte at `offset` of a file, in both its live
    /// and durable images. Returns false if there is no such file or byte.
    pub fn corrupt(&self, name: &str, offset: usize, mask: u8) -> bool {
        let mut state = self.lock();
        let Some(&id) = state.live_dir.get(name) else {
            return false;
        };
        let Some(inode) = state.inodes.get_mut(&id) else {
            return false;
        };
        let (Some(live), Some(durable)) =
            (inode.live.get_mut(offset), inode.durable.get_mut(offset))
        else {
            return false;
        };
        *live ^= mask;
        *durable ^= mask;
        true
    }
}

impl Storage for MemStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut state = self.lock();
        state.call(MemOp::List)?;
        Ok(state.live_dir.keys().cloned().collect())
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.lock();
        state.call(MemOp::Create)?;
        if state.live_dir.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                name.to_string(),
            ));
        }
        state.next_inode += 1;
        let inode = state.next_inode;
        state.inodes.insert(inode, Inode::default());
        state.live_dir.insert(name.to_string(), inode);
        Ok(Arc::new(MemFile {
            state: self.state.clone(),
            inode,
        }))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.lock();
        state.call(MemOp::Open)?;
        let inode = *state
            .live_dir
            .get(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_string()))?;
        Ok(Arc::new(MemFile {
            state: self.state.clone(),
            inode,
        }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut state = self.lock();
        state.call(MemOp::Rename)?;
        let inode = state
            .live_dir
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, from.to_string()))?;
        state.live_dir.insert(to.to_string(), inode);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.lock();
        state.call(MemOp::Remove)?;
        state
            .live_dir
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_string()))
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut state = self.lock();
        state.call(MemOp::SyncDir)?;
        state.durable_dir = state.live_dir.clone();
        Ok(())
    }
}

/// A file of a [`MemStorage`].
struct MemFile {
    state: Arc<Mutex<MemState>>,
    inode: u64,
}

impl std::fmt::Debug for MemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemFile")
            .field("inode", &self.inode)
            .finish()
    }
}

impl MemFile {
    fn lock(&self) -> MutexGuard<'_, MemState> {
        // See `MemStorage::lock`.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StorageFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut state = self.lock();
        state.call(MemOp::Read)?;
        let live = &state.inode(self.inode)?.live;
        let start = usize_of(offset).min(live.len());
        let n = buf.len().min(live.len() - start);
        buf[..n].copy_from_slice(&live[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.lock();
        state.call(MemOp::Write)?;
        state.change(
            self.inode,
            Change::Write {
                offset,
                data: buf.to_vec(),
            },
        )
    }

    fn size_bytes(&self) -> io::Result<u64> {
        let mut state = self.lock();
        Ok(state.inode(self.inode)?.live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.lock();
        state.call(MemOp::SetLen)?;
        state.change(self.inode, Change::SetLen(len))
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut state = self.lock();
        state.call(MemOp::Allocate)?;
        if (state.inode(self.inode)?.live.len() as u64) < len {
            state.change(self.inode, Change::SetLen(len))?;
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.lock();
        let inode = self.inode;
        match state.refusal(MemOp::SyncData) {
            Ok(()) => {}
            // Halted: the sync never happened, the changes stay pending for `crash`.
            Err(refusal @ Refusal::Halted(_)) => return Err(refusal.into()),
            Err(refusal @ Refusal::Fault(_)) => {
                // The kernel marks the pages clean after a failed writeback: the changes are
                // dropped, no later sync writes them, though reads still see them.
                state.unsynced.retain(|p| p.inode != inode);
                return Err(refusal.into());
            }
        }
        let (mine, others): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut state.unsynced)
            .into_iter()
            .partition(|p| p.inode == inode);
        state.unsynced = others;
        let file = state.inode(inode)?;
        for pending in mine {
            pending.change.apply(&mut file.durable);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn durable_after(storage: &MemStorage, mode: Crash, name: &str) -> Option<Vec<u8>> {
        storage.crash(mode).file(name)
    }

    #[test]
    fn live_and_durable_images() {
        let s = MemStorage::new();
        let f = s.create("a").unwrap();
        f.write_all_at(b"abc", 0).unwrap();
        // Not in the durable directory yet: gone after a crash.
        assert_eq!(durable_after(&s, Crash::DropUnsynced, "a"), None);
        s.sync_dir().unwrap();
        assert_eq!(durable_after(&s, Crash::DropUnsynced, "a"), Some(vec![]));
        f.sync_data().unwrap();
        f.write_all_at(b"defg", 3).unwrap();
        f.write_all_at(b"hi", 7).unwrap();
        assert_eq!(s.file("a").unwrap(), b"abcdefghi");
        assert_eq!(s.unsynced_write_bytes(), 6);
        assert_eq!(s.last_unsynced_write_bytes(), Some(2));
        let check = |mode, expected: &[u8]| {
            assert_eq!(durable_after(&s, mode, "a").unwrap(), expected, "{mode:?}");
        };
        check(Crash::DropUnsynced, b"abc");
        check(Crash::KeepBytes(0), b"abc");
        check(Crash::KeepBytes(2), b"abcde");
        check(Crash::KeepBytes(5), b"abcdefgh");
        check(Crash::KeepBytes(99), b"abcdefghi");
        check(Crash::TearLast(1), b"abc\0\0\0\0h");
        check(Crash::TearLast(0), b"abc");
    }

    #[test]
    fn failed_sync_loses_the_writes_for_good() {
        let s = MemStorage::new();
        let f = s.create("a").unwrap();
        s.sync_dir().unwrap();
        f.write_all_at(b"abc", 0).unwrap();
        s.fail(MemOp::SyncData, 1);
        assert!(f.sync_data().is_err());
        assert_eq!(s.file("a").unwrap(), b"abc");
        // A retried fsync "succeeds" but the data it claims is not durable.
        f.sync_data().unwrap();
        assert_eq!(durable_after(&s, Crash::DropUnsynced, "a").unwrap(), b"");
        assert_eq!(s.op_count(MemOp::SyncData), 2);
    }

    #[test]
    fn faults_hit_the_chosen_call() {
        let s = MemStorage::new();
        let f = s.create("a").unwrap();
        s.fail(MemOp::Write, 2);
        f.write_all_at(b"1", 0).unwrap();
        assert!(f.write_all_at(b"2", 1).is_err());
        f.write_all_at(b"3", 1).unwrap();
        assert_eq!(s.file("a").unwrap(), b"13");
    }

    #[test]
    fn halt_stops_everything_and_keeps_pending_writes() {
        let s = MemStorage::new();
        let f = s.create("a").unwrap();
        s.sync_dir().unwrap();
        f.write_all_at(b"abc", 0).unwrap();
        s.halt_at(MemOp::SyncData, 1);
        assert!(f.sync_data().is_err());
        assert!(s.halted());
        assert!(f.write_all_at(b"x", 0).is_err());
        assert_eq!(s.file("a").unwrap(), b"abc");
        assert_eq!(s.crash(Crash::KeepBytes(2)).file("a").unwrap(), b"ab");
        assert!(!s.crash(Crash::DropUnsynced).halted());
    }

    #[test]
    fn directory_operations_need_sync_dir() {
        let s = MemStorage::new();
        s.create("a").unwrap();
        s.sync_dir().unwrap();
        s.rename("a", "b").unwrap();
        assert_eq!(s.crash(Crash::DropUnsynced).file_names(), vec!["a"]);
        s.sync_dir().unwrap();
        s.remove("b").unwrap();
        assert_eq!(s.crash(Crash::DropUnsynced).file_names(), vec!["b"]);
        assert!(s.file_names().is_empty());
    }
}
