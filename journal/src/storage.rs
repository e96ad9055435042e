//! Where segment files live: the small [`Storage`] / [`StorageFile`] traits (as redb's
//! `StorageBackend`), and [`DirStorage`], the real implementation over one directory.
//!
//! The traits say exactly what the journal needs from a file system and nothing more, so the
//! in-memory double ([`crate::MemStorage`]) can model crashes and faults precisely. Must
//! never: buffer writes in user space (a returned `write_all_at` has reached the OS), or
//! report success for an fdatasync that failed.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A flat directory of named files.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Names of every file in the directory (any order).
    fn list(&self) -> io::Result<Vec<String>>;
    /// Creates a new, empty file; fails if `name` exists.
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// Renames `from` to `to`, replacing `to` if it exists.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes a file. Open handles keep working (as with unlink).
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals so far durable (fsync of the directory).
    fn sync_dir(&self) -> io::Result<()>;
}

/// One open file. All methods take `&self` so a sync can run while another thread appends.
pub trait StorageFile: Send + Sync + std::fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many (0 at or past the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset` (a pwrite into the OS, not a user-space buffer).
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn size_bytes(&self) -> io::Result<u64>;
    /// Sets the length (truncating or extending with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves blocks for the first `len` bytes and extends the file to at least `len`
    /// (posix_fallocate), so that later writes and fdatasyncs change no file size.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// fdatasync: every write that returned before this call is durable when it returns Ok.
    fn sync_data(&self) -> io::Result<()>;
    /// Starts writing `len` bytes from `offset` back to the device without waiting (a hint:
    /// it proves nothing durable). Keeps the dirty data a later `sync_data` must flush small.
    fn start_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

/// Reads until `buf` is full or the file ends; returns the number of bytes read.
pub(crate) fn read_full_at(
    file: &dyn StorageFile,
    buf: &mut [u8],
    offset: u64,
) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// The real storage: one directory on a local file system.
#[derive(Debug, Clone)]
pub struct DirStorage {
    dir: PathBuf,
}

impl DirStorage {
    /// Uses `dir`, creating it (and its parents) if missing.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        Ok(DirStorage { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> io::Result<PathBuf> {
        // Names come from the journal itself; refusing separators keeps every file inside
        // the directory even if a caller passes a hostile name.
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid file name {name:?}"),
            ));
        }
        Ok(self.dir.join(name))
    }
}

impl Storage for DirStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        Ok(names)
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.path(name)?)?;
        Ok(Arc::new(DirFile { file }))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path(name)?)?;
        Ok(Arc::new(DirFile { file }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path(from)?, self.path(to)?)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path(name)?)
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

/// A file of a [`DirStorage`].
#[derive(Debug)]
struct DirFile {
    file: File,
}

impl StorageFile for DirFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        allocate(&self.file, len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    #[cfg(target_os = "linux")]
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return Ok(());
        };
        // SAFETY: sync_file_range(2) reads only its integer arguments; the descriptor is owned
        // by `self.file` and open for the call. SYNC_FILE_RANGE_WRITE starts writeback and
        // does not wait for it, nor consume a writeback error a later fdatasync must report.
        let rc = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(target_os = "linux")]
fn allocate(file: &File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "allocation too large"))?;
    loop {
        // SAFETY: the descriptor is owned by `file`, open for the duration of the call;
        // posix_fallocate only reads its integer arguments.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        match rc {
            0 => return Ok(()),
            libc::EINTR => continue,
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn allocate(file: &File, len: u64) -> io::Result<()> {
    // No posix_fallocate: extending the length keeps the format correct; fdatasync may then
    // have to write metadata, which costs time, not safety.
    if file.metadata()?.len() < len {
        file.set_len(len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_storage_basics() {
        let tmp = tempfile::tempdir().unwrap();
        let storage = DirStorage::open(tmp.path().join("j")).unwrap();
        let file = storage.create("a").unwrap();
        assert!(storage.create("a").is_err());
        file.allocate(8192).unwrap();
        assert_eq!(file.size_bytes().unwrap(), 8192);
        file.write_all_at(b"hello", 4096).unwrap();
        file.sync_data().unwrap();
        let mut buf = [0u8; 5];
        assert_eq!(read_full_at(&*file, &mut buf, 4096).unwrap(), 5);
        assert_eq!(&buf, b"hello");
        assert_eq!(read_full_at(&*file, &mut buf, 8190).unwrap(), 2);
        storage.rename("a", "b").unwrap();
        storage.sync_dir().unwrap();
        assert_eq!(storage.list().unwrap(), vec!["b".to_string()]);
        let reopened = storage.open("b").unwrap();
        reopened.set_len(4100).unwrap();
        assert_eq!(file.size_bytes().unwrap(), 4100);
        storage.remove("b").unwrap();
        assert!(storage.list().unwrap().is_empty());
        assert!(storage.open("../etc").is_err());
    }
}
