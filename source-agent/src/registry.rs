//! `DATA_DIR/disks.toml`: the job's identity and its disk table (name → `DiskId`, size), kept
//! so that a disk's id never changes across restarts and `cdp-agent replay` can find a disk's
//! records and size without the agent's configuration. Also the data directory's lock, so two
//! agents never share one journal.
//!
//! The file is replaced atomically (write, fsync, rename, fsync the directory): a crash leaves
//! the old table or the new one, never a torn one. Ids are never reused.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::sink::DiskId;

/// Name of the table inside the data directory.
pub const REGISTRY_FILE: &str = "disks.toml";
/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "agent.lock";

/// Why the disk table could not be read, updated or written.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// Reading, writing or locking a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The table is not valid TOML of the expected shape.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// Another agent holds the data directory.
    #[error("{path}: another cdp-agent is using this data directory")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A disk's size differs from the one recorded: its journal would not replay onto it.
    #[error("disk {name}: size is {size_bytes} bytes but the journal recorded {recorded_bytes}; resizing a protected disk is not supported")]
    SizeChanged {
        /// The disk.
        name: String,
        /// Size now.
        size_bytes: u64,
        /// Size recorded.
        recorded_bytes: u64,
    },
    /// No disk of that name was ever registered.
    #[error("no disk named {name:?} in {path}")]
    UnknownDisk {
        /// The disk asked for.
        name: String,
        /// The table.
        path: PathBuf,
    },
    /// The job id in the table is not 32 hex digits.
    #[error("{path}: job id {job:?} is not 32 hexadecimal digits")]
    BadJobId {
        /// The table.
        path: PathBuf,
        /// The stored text.
        job: String,
    },
}

/// One registered disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRecord {
    /// Export name.
    pub name: String,
    /// Its id in the journal; never reused.
    pub id: u32,
    /// Size in bytes when registered.
    pub size_bytes: u64,
    /// Backing path when last started (informational).
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    /// The job's id, 32 hex digits.
    job: String,
    /// The journal generation the agent writes.
    generation: u64,
    #[serde(default, rename = "disk")]
    disks: Vec<DiskRecord>,
}

/// The disk table of one data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    path: PathBuf,
    job: [u8; 16],
    generation: u64,
    disks: Vec<DiskRecord>,
}

impl Registry {
    /// Loads `DATA_DIR/disks.toml`, or starts a new table with a fresh job id when there is
    /// none (nothing is written until [`Registry::save`]).
    pub fn load_or_new(data_dir: &Path) -> Result<Self, RegistryError> {
        let path = data_dir.join(REGISTRY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self {
                path,
                job: *uuid::Uuid::new_v4().as_bytes(),
                generation: 1,
                disks: Vec::new(),
            }),
            Err(source) => Err(RegistryError::Io { path, source }),
        }
    }

    /// Loads an existing table (for replay).
    pub fn load(data_dir: &Path) -> Result<Self, RegistryError> {
        let path = data_dir.join(REGISTRY_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| RegistryError::Io {
            path: path.clone(),
            source,
        })?;
        Self::parse(path, &text)
    }

    fn parse(path: PathBuf, text: &str) -> Result<Self, RegistryError> {
        let file: RegistryFile = toml::from_str(text).map_err(|e| RegistryError::Parse {
            path: path.clone(),
            message: e.message().to_owned(),
        })?;
        let job = journal::JobId::parse_hex(&file.job)
            .map(|id| id.0)
            .ok_or_else(|| RegistryError::BadJobId {
                path: path.clone(),
                job: file.job.clone(),
            })?;
        Ok(Self {
            path,
            job,
            generation: file.generation,
            disks: file.disks,
        })
    }

    /// The job's id.
    pub fn job(&self) -> [u8; 16] {
        self.job
    }

    /// The job's id as 32 hex digits.
    pub fn job_hex(&self) -> String {
        journal::JobId(self.job).to_string()
    }

    /// The journal generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The registered disk `name`.
    pub fn disk(&self, name: &str) -> Result<&DiskRecord, RegistryError> {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| RegistryError::UnknownDisk {
                name: name.to_owned(),
                path: self.path.clone(),
            })
    }

    /// The id of disk `name`, registering it with `size_bytes` if new; refuses a size change.
    pub fn register(
        &mut self,
        name: &str,
        size_bytes: u64,
        path: &Path,
    ) -> Result<DiskId, RegistryError> {
        if let Some(disk) = self.disks.iter_mut().find(|d| d.name == name) {
            if disk.size_bytes != size_bytes {
                return Err(RegistryError::SizeChanged {
                    name: name.to_owned(),
                    size_bytes,
                    recorded_bytes: disk.size_bytes,
                });
            }
            disk.path = path.to_owned();
            return Ok(DiskId(disk.id));
        }
        let id = self.disks.iter().map(|d| d.id).max().unwrap_or(0) + 1;
        self.disks.push(DiskRecord {
            name: name.to_owned(),
            id,
            size_bytes,
            path: path.to_owned(),
        });
        Ok(DiskId(id))
    }

    /// Writes the table atomically.
    pub fn save(&self) -> Result<(), RegistryError> {
        let file = RegistryFile {
            job: self.job_hex(),
            generation: self.generation,
            disks: self.disks.clone(),
        };
        let text = format!(
            "# cdp-agent disk table: written by the agent, read by `cdp-agent replay`.\n\
             # Do not edit while the agent runs; never change an id.\n{}",
            toml::to_string(&file).map_err(|e| RegistryError::Parse {
                path: self.path.clone(),
                message: e.to_string(),
            })?
        );
        let io = |source| RegistryError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("toml.tmp");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

/// An exclusive `flock` on `DATA_DIR/agent.lock`, held while the agent runs.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock or fails at once if another process holds it.
    pub fn acquire(data_dir: &Path) -> Result<Self, RegistryError> {
        let path = data_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| RegistryError::Io {
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock(2) takes a descriptor owned by `file`, alive for the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(RegistryError::Locked { path });
            }
            return Err(RegistryError::Io { path, source: err });
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = Registry::load_or_new(dir.path()).unwrap();
        assert_eq!(reg.register("a", 4096, Path::new("/a")).unwrap(), DiskId(1));
        assert_eq!(reg.register("b", 8192, Path::new("/b")).unwrap(), DiskId(2));
        reg.save().unwrap();
        let job = reg.job();

        let mut again = Registry::load_or_new(dir.path()).unwrap();
        assert_eq!(again.job(), job);
        assert_eq!(
            again.register("b", 8192, Path::new("/moved")).unwrap(),
            DiskId(2)
        );
        assert_eq!(again.register("c", 1, Path::new("/c")).unwrap(), DiskId(3));
        assert_eq!(
            again.register("a", 4096, Path::new("/a")).unwrap(),
            DiskId(1)
        );
        let err = again.register("a", 8192, Path::new("/a")).unwrap_err();
        assert!(
            err.to_string()
                .contains("resizing a protected disk is not supported"),
            "{err}"
        );
        again.save().unwrap();
        let loaded = Registry::load(dir.path()).unwrap();
        assert_eq!(loaded.disk("b").unwrap().path, PathBuf::from("/moved"));
        assert!(loaded.disk("zz").is_err());
    }

    #[test]
    fn bad_tables_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(REGISTRY_FILE),
            "job = \"xyz\"\ngeneration = 1\n",
        )
        .unwrap();
        assert!(Registry::load(dir.path())
            .unwrap_err()
            .to_string()
            .contains("not 32 hexadecimal digits"));
        std::fs::write(dir.path().join(REGISTRY_FILE), "jobs = 1\n").unwrap();
        assert!(matches!(
            Registry::load(dir.path()),
            Err(RegistryError::Parse { .. })
        ));
    }

    #[test]
    fn one_agent_per_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDirLock::acquire(dir.path()).unwrap();
        assert!(matches!(
            DataDirLock::acquire(dir.path()),
            Err(RegistryError::Locked { .. })
        ));
        drop(held);
        DataDirLock::acquire(dir.path()).unwrap();
    }
}
