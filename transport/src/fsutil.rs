//! Crash-safe file writes for cdp's small files (identity, trust store, pending pairing
//! tokens; the appliance's job descriptions and applied seq): write a temporary file, fsync it, then rename (or link) it into
//! place and fsync the directory. A reader sees the old file or the new one, never a torn one.
//!
//! Never use this for anything large or hot: every call costs two fsyncs.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Permissions of a file only its owner may read: private keys, pending pairing tokens.
pub const MODE_PRIVATE_FILE: u32 = 0o600;
/// Permissions of a file anyone on the host may read: certificates, the trust store.
pub const MODE_PUBLIC_FILE: u32 = 0o644;
/// Permissions of the directories holding identities and pending tokens.
pub const MODE_PRIVATE_DIR: u32 = 0o700;

/// Creates `dir` (and its parents) with owner-only permissions if it does not exist.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(MODE_PRIVATE_DIR)
        .create(dir)
}

/// Replaces `path` with `contents` atomically and durably.
pub fn write_replacing(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let temp = write_temp(path, contents, mode)?;
    if let Err(err) = fs::rename(&temp, path) {
        let _ = fs::remove_file(&temp);
        return Err(err);
    }
    sync_parent(path)
}

/// Creates `path` with `contents` atomically and durably; fails with
/// [`io::ErrorKind::AlreadyExists`] if it exists, without touching it. A hard link, unlike a
/// rename, never replaces its target, so two writers cannot both win.
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let temp = write_temp(path, contents, mode)?;
    let linked = fs::hard_link(&temp, path);
    let _ = fs::remove_file(&temp);
    linked?;
    sync_parent(path)
}

/// Removes `path` and makes the removal durable. [`io::ErrorKind::NotFound`] is returned as
/// is: for a one-time token it means another consumer won the race.
pub fn remove_durably(path: &Path) -> io::Result<()> {
    fs::remove_file(path)?;
    sync_parent(path)
}

fn write_temp(path: &Path, contents: &[u8], mode: u32) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = path.with_file_name(temp_name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    match result {
        Ok(()) => Ok(temp),
        Err(err) => {
            let _ = fs::remove_file(&temp);
            Err(err)
        }
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Reads at most `bytes_max` bytes of `path`; a longer file is an error, so a corrupted or
/// hostile file cannot make us allocate without bound.
pub fn read_bounded(path: &Path, bytes_max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = File::open(path)?;
    let mut contents = Vec::new();
    file.take(bytes_max + 1).read_to_end(&mut contents)?;
    if contents.len() as u64 > bytes_max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file is larger than {bytes_max} bytes"),
        ));
    }
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_new_refuses_to_replace_and_write_replacing_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_new(&path, b"one", MODE_PRIVATE_FILE).unwrap();
        let err = write_new(&path, b"two", MODE_PRIVATE_FILE).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        write_replacing(&path, b"three", MODE_PRIVATE_FILE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, MODE_PRIVATE_FILE);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn read_bounded_refuses_larger_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"12345").unwrap();
        assert_eq!(read_bounded(&path, 5).unwrap(), b"12345");
        assert_eq!(
            read_bounded(&path, 4).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
