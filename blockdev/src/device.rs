//! A disk behind a small trait: a real file or block device (`pread`, `pwrite`,
//! `fdatasync`, `fallocate` with a write-zeroes fallback) and an in-memory double with fault
//! injection for tests.
//!
//! Every method blocks: callers on the async runtime must go through `spawn_blocking`.
//! Zeroing is exact: after `zero_range` the range reads back as zeroes on every
//! implementation, so replaying a journal reproduces the backing disk byte for byte.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Bytes of zeroes written per call when `fallocate` cannot zero a range.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// A disk cdp reads and writes: an agent's backing disk, an appliance's replica.
pub trait BlockDevice: Send + Sync + std::fmt::Debug + 'static {
    /// Size in bytes, fixed while the agent runs.
    fn size_bytes(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `length` bytes from `offset` read as zeroes; `may_punch` allows deallocating
    /// them (a hole), otherwise they stay allocated.
    fn zero_range(&self, offset: u64, length: u64, may_punch: bool) -> io::Result<()>;
    /// Makes everything written so far durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
}

/// A raw image file or a block device.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    size_bytes: u64,
    /// Cleared after `FALLOC_FL_PUNCH_HOLE` is refused once, so it is not retried per call.
    punch_supported: AtomicBool,
    /// Cleared after `FALLOC_FL_ZERO_RANGE` is refused once.
    zero_range_supported: AtomicBool,
}

impl FileDevice {
    /// Opens `path` for reading and writing; its size is the file length, or the device size
    /// (`BLKGETSIZE64`) for a block device.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let meta = file.metadata()?;
        let size_bytes = if meta.file_type().is_block_device() {
            block_device_size(&file)?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        };
        Ok(Self {
            file,
            size_bytes,
            punch_supported: AtomicBool::new(true),
            zero_range_supported: AtomicBool::new(true),
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
        let (Ok(offset), Ok(length)) =
            (libc::off_t::try_from(offset), libc::off_t::try_from(length))
        else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate(2) only reads its integer arguments; the descriptor is owned by
        // `self.file` and open for the duration of the call.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, length) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        static ZEROES: [u8; ZERO_CHUNK_BYTES] = [0; ZERO_CHUNK_BYTES];
        let mut done = 0u64;
        while done < length {
            let n = (length - done).min(ZERO_CHUNK_BYTES as u64) as usize;
            self.file.write_all_at(&ZEROES[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Creates a sparse raw image of `size_bytes` at `path`, or opens the one there if it has
/// exactly that size (an image of another size is refused: it belongs to something else).
/// The file and its directory entry are durable when this returns.
pub fn create_image(path: &Path, size_bytes: u64) -> io::Result<FileDevice> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() == size_bytes => return FileDevice::open(path),
        Ok(meta) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists with {} bytes, not {size_bytes}",
                    path.display(),
                    meta.len()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    file.set_len(size_bytes)?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    drop(file);
    FileDevice::open(path)
}

/// Errors meaning "this kind of fallocate is not available here", after which the next
/// method is tried; any other error is a real failure.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV)
    )
}

fn block_device_size(file: &File) -> io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t); the libc crate does not export it.
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc == 0 {
        Ok(size)
    } else {
        Err(io::Error::last_os_error())
    }
}

impl BlockDevice for FileDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn zero_range(&self, offset: u64, length: u64, may_punch: bool) -> io::Result<()> {
        if may_punch && self.punch_supported.load(Ordering::Relaxed) {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                length,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => self.punch_supported.store(false, Ordering::Relaxed),
                Err(e) => return Err(e),
            }
        }
        if self.zero_range_supported.load(Ordering::Relaxed) {
            match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                length,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => {
                    self.zero_range_supported.store(false, Ordering::Relaxed)
                }
                Err(e) => return Err(e),
            }
        }
        self.write_zeroes(offset, length)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Which operation of a [`MemDevice`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `read_at` fails with `EIO`.
    Read,
    /// `write_at` and `zero_range` fail with `EIO` (before changing anything).
    Write,
    /// `sync_data` fails with `EIO`.
    Sync,
}

/// An in-memory disk for tests: a live image, a durable image (what survived the last
/// `sync_data`), counters and injectable faults.
#[derive(Debug)]
pub struct MemDevice {
    /// Invariant: `live.len() == durable.len() == size_bytes`.
    images: Mutex<(Vec<u8>, Vec<u8>)>,
    size_bytes: u64,
    fault: Mutex<Option<Fault>>,
    writes: AtomicU64,
    syncs: AtomicU64,
}

impl MemDevice {
    /// A zeroed disk of `size_bytes`.
    pub fn new(size_bytes: usize) -> Self {
        Self {
            images: Mutex::new((vec![0; size_bytes], vec![0; size_bytes])),
            size_bytes: size_bytes as u64,
            fault: Mutex::new(None),
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        }
    }

    /// Makes `fault` happen on every later call of that kind (`None` clears it).
    pub fn inject(&self, fault: Option<Fault>) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
    }

    /// A copy of the live image.
    pub fn live(&self) -> Vec<u8> {
        self.images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// A copy of the durable image.
    pub fn durable(&self) -> Vec<u8> {
        self.images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Number of successful writes and zeroings.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Number of successful syncs.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    fn fails(&self, kind: Fault) -> io::Result<()> {
        if *self.fault.lock().unwrap_or_else(|p| p.into_inner()) == Some(kind) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    fn range(&self, offset: u64, length: usize) -> io::Result<std::ops::Range<usize>> {
        let end = offset
            .checked_add(length as u64)
            .filter(|&end| end <= self.size_bytes)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        // Both fit in usize: end <= size_bytes, which came from a usize.
        Ok(offset as usize..end as usize)
    }
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.fails(Fault::Read)?;
        let range = self.range(offset, buf.len())?;
        let images = self.images.lock().unwrap_or_else(|p| p.into_inner());
        buf.copy_from_slice(&images.0[range]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.fails(Fault::Write)?;
        let range = self.range(offset, data.len())?;
        self.images.lock().unwrap_or_else(|p| p.into_inner()).0[range].copy_from_slice(data);
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn zero_range(&self, offset: u64, length: u64, _may_punch: bool) -> io::Result<()> {
        self.fails(Fault::Write)?;
        let length =
            usize::try_from(length).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let range = self.range(offset, length)?;
        self.images.lock().unwrap_or_else(|p| p.into_inner()).0[range].fill(0);
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fails(Fault::Sync)?;
        let mut images = self.images.lock().unwrap_or_else(|p| p.into_inner());
        let (live, durable) = &mut *images;
        durable.copy_from_slice(live);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(dev: &dyn BlockDevice) -> Vec<u8> {
        dev.write_at(&[0xaa; 8192], 0).unwrap();
        dev.zero_range(1024, 1024, true).unwrap();
        dev.zero_range(4096, 512, false).unwrap();
        dev.write_at(b"xyz", 5000).unwrap();
        dev.sync_data().unwrap();
        let mut buf = vec![0; 8192];
        dev.read_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn file_and_memory_devices_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let file = FileDevice::open(&path).unwrap();
        assert_eq!(file.size_bytes(), 1 << 20);
        let mem = MemDevice::new(1 << 20);
        let from_file = exercise(&file);
        assert_eq!(from_file, exercise(&mem));
        assert_eq!(&from_file[1024..2048], &[0; 1024]);
        assert_eq!(&from_file[5000..5003], b"xyz");
        assert_eq!(mem.durable(), mem.live());
    }

    #[test]
    fn file_zeroing_falls_back_to_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0xff; 3 << 20]).unwrap();
        let file = FileDevice::open(&path).unwrap();
        file.punch_supported.store(false, Ordering::Relaxed);
        file.zero_range_supported.store(false, Ordering::Relaxed);
        file.zero_range(100, (2 << 20) + 5, true).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..100].iter().all(|&b| b == 0xff));
        assert!(data[100..100 + (2 << 20) + 5].iter().all(|&b| b == 0));
        assert!(data[100 + (2 << 20) + 5..].iter().all(|&b| b == 0xff));
    }

    #[test]
    fn memory_faults() {
        let mem = MemDevice::new(4096);
        mem.inject(Some(Fault::Write));
        assert!(mem.write_at(b"x", 0).is_err());
        assert!(mem.zero_range(0, 1, true).is_err());
        assert_eq!(mem.writes(), 0);
        mem.inject(None);
        assert!(mem.write_at(b"x", 4096).is_err());
        mem.write_at(b"x", 4095).unwrap();
        assert_eq!(mem.durable()[4095], 0);
        mem.sync_data().unwrap();
        assert_eq!(mem.durable()[4095], b'x');
    }
}
