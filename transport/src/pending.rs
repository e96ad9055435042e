//! The appliance's outstanding one-time pairing tokens: one file per token in a private
//! directory, named by the blake3 hash of the token (the token itself is never stored, so a
//! copy of the data directory cannot be used to pair). Several processes share it: the
//! `cdp-receiver pair` command adds a token, the running appliance consumes it.
//!
//! Single use holds across processes because consuming a token is unlinking its file, and of
//! two racing unlinks exactly one succeeds. A token is never accepted at or after its expiry.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::UnixTime;

use crate::bundle::PairingToken;
use crate::fingerprint::{hex_decode_32, hex_encode};
use crate::fsutil;

/// Most tokens outstanding at once; creating another fails until one is used or expires.
pub const PENDING_TOKENS_MAX: usize = 16;
/// Most directory entries looked at per scan, so a flooded directory costs bounded work.
const DIRECTORY_ENTRIES_SCANNED_MAX: usize = 1024;
/// Largest token file we read; ours are under 64 bytes.
const TOKEN_FILE_BYTES_MAX: u64 = 256;
const TOKEN_FILE_HEADER: &str = "cdp-pairing-token v1";

/// Outstanding pairing tokens in one directory.
#[derive(Debug, Clone)]
pub struct PendingTokens {
    dir: PathBuf,
}

/// Why a token could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddTokenError {
    /// [`PENDING_TOKENS_MAX`] unexpired tokens are already outstanding.
    #[error(
        "{PENDING_TOKENS_MAX} pairing tokens are already outstanding; use or let some expire first"
    )]
    TooMany,
    /// The directory or the token file could not be written.
    #[error("writing pairing token in {path}: {source}")]
    Io {
        /// The pending-token directory.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
}

/// Why a presented token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeTokenError {
    /// No outstanding token matches: it was never issued, or was already used.
    #[error("no outstanding pairing token matches (never issued or already used)")]
    Unknown,
    /// The token matched but its expiry has passed.
    #[error("the pairing token expired")]
    Expired,
    /// The pending-token directory could not be read or changed.
    #[error("pending pairing tokens in {path}: {source}")]
    Io {
        /// The pending-token directory.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
}

/// A token found valid by [`PendingTokens::find`], not yet consumed.
#[derive(Debug)]
pub(crate) struct FoundToken {
    path: PathBuf,
}

impl PendingTokens {
    /// The tokens kept in `dir` (created with mode 0700 when the first token is added).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory holding the tokens.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records a new token expiring at `expires_at`, after removing expired ones.
    pub(crate) fn add(
        &self,
        token: &PairingToken,
        expires_at: UnixTime,
        now: UnixTime,
    ) -> Result<(), AddTokenError> {
        let io_error = |source| AddTokenError::Io {
            path: self.dir.clone(),
            source,
        };
        fsutil::create_private_dir(&self.dir).map_err(io_error)?;
        self.purge_expired(now).map_err(io_error)?;
        if self.entries().map_err(io_error)?.len() >= PENDING_TOKENS_MAX {
            return Err(AddTokenError::TooMany);
        }
        let contents = format!("{TOKEN_FILE_HEADER}\nexpires {}\n", expires_at.as_secs());
        fsutil::write_new(
            &self.token_path(&token.hash()),
            contents.as_bytes(),
            fsutil::MODE_PRIVATE_FILE,
        )
        .map_err(io_error)
    }

    /// Whether any unexpired token is outstanding at `now`. Errors count as "no": the
    /// verifier that asks must fail closed.
    pub fn outstanding(&self, now: UnixTime) -> bool {
        let Ok(entries) = self.entries() else {
            return false;
        };
        entries
            .iter()
            .any(|(_, path)| read_expiry(path).is_some_and(|expires_at| now < expires_at))
    }

    /// Deletes the files of expired tokens (and of unreadable ones); returns how many.
    pub fn purge_expired(&self, now: UnixTime) -> io::Result<usize> {
        let mut removed = 0;
        for (_, path) in self.entries()? {
            if read_expiry(&path).is_none_or(|expires_at| now >= expires_at) {
                match fsutil::remove_durably(&path) {
                    Ok(()) => removed += 1,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(removed)
    }

    /// Finds the outstanding token equal to `token`, comparing against every outstanding
    /// token in constant time (blake3 hashes compare in constant time), and checks its expiry.
    pub(crate) fn find(
        &self,
        token: &PairingToken,
        now: UnixTime,
    ) -> Result<FoundToken, ConsumeTokenError> {
        let presented = token.hash();
        let entries = self.entries().map_err(|source| ConsumeTokenError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut matched = None;
        for (hash, path) in entries {
            // `blake3::Hash`'s `==` is constant-time; scanning every entry keeps the time
            // independent of where (or whether) the token is found.
            if hash == presented {
                matched = Some(path);
            }
        }
        let path = matched.ok_or(ConsumeTokenError::Unknown)?;
        match read_expiry(&path) {
            Some(expires_at) if now < expires_at => Ok(FoundToken { path }),
            Some(_) => {
                let _ = fsutil::remove_durably(&path);
                Err(ConsumeTokenError::Expired)
            }
            // Vanished (consumed concurrently) or unreadable.
            None => Err(ConsumeTokenError::Unknown),
        }
    }

    /// Uses up a token found by [`PendingTokens::find`]. Exactly one of several concurrent
    /// consumers, in any process, succeeds.
    pub(crate) fn consume(&self, found: FoundToken) -> Result<(), ConsumeTokenError> {
        match fsutil::remove_durably(&found.path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Err(ConsumeTokenError::Unknown),
            Err(source) => Err(ConsumeTokenError::Io {
                path: self.dir.clone(),
                source,
            }),
        }
    }

    fn token_path(&self, hash: &blake3::Hash) -> PathBuf {
        self.dir.join(hex_encode(hash.as_bytes()))
    }

    /// Token files: those named by 64 hex digits (temporary files start with `.`).
    fn entries(&self) -> io::Result<Vec<(blake3::Hash, PathBuf)>> {
        let reader = match fs::read_dir(&self.dir) {
            Ok(reader) => reader,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        let mut entries = Vec::new();
        for entry in reader.take(DIRECTORY_ENTRIES_SCANNED_MAX) {
            let entry = entry?;
            let name = entry.file_name();
            let Some(hash) = name.to_str().and_then(|name| hex_decode_32(name).ok()) else {
                continue;
            };
            entries.push((blake3::Hash::from_bytes(hash), entry.path()));
        }
        Ok(entries)
    }
}

/// The expiry recorded in a token file; `None` if it is missing or malformed.
fn read_expiry(path: &Path) -> Option<UnixTime> {
    let bytes = fsutil::read_bounded(path, TOKEN_FILE_BYTES_MAX).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let mut lines = text.lines();
    if lines.next()? != TOKEN_FILE_HEADER {
        return None;
    }
    let unix_s = lines
        .next()?
        .strip_prefix("expires ")?
        .parse::<u64>()
        .ok()?;
    Some(UnixTime::since_unix_epoch(Duration::from_secs(unix_s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(unix_s: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(unix_s))
    }

    #[test]
    fn a_token_is_found_until_expiry_and_consumed_once() {
        let dir = tempfile::tempdir().unwrap();
        let pending = PendingTokens::new(dir.path().join("pairing"));
        let token = PairingToken::random().unwrap();
        let other = PairingToken::random().unwrap();
        assert!(!pending.outstanding(at(100)));
        pending.add(&token, at(200), at(100)).unwrap();
        assert!(pending.outstanding(at(199)));
        assert!(!pending.outstanding(at(200)));
        assert!(matches!(
            pending.find(&other, at(150)),
            Err(ConsumeTokenError::Unknown)
        ));
        let found = pending.find(&token, at(150)).unwrap();
        let again = pending.find(&token, at(150)).unwrap();
        pending.consume(found).unwrap();
        // A second consumer of the same token loses.
        assert!(matches!(
            pending.consume(again),
            Err(ConsumeTokenError::Unknown)
        ));
        assert!(matches!(
            pending.find(&token, at(150)),
            Err(ConsumeTokenError::Unknown)
        ));
        assert!(!pending.outstanding(at(150)));
    }

    #[test]
    fn an_expired_token_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let pending = PendingTokens::new(dir.path());
        let token = PairingToken::random().unwrap();
        pending.add(&token, at(200), at(100)).unwrap();
        assert!(matches!(
            pending.find(&token, at(200)),
            Err(ConsumeTokenError::Expired)
        ));
        assert!(matches!(
            pending.find(&token, at(150)),
            Err(ConsumeTokenError::Unknown)
        ));
    }

    #[test]
    fn the_number_of_outstanding_tokens_is_bounded_and_expired_ones_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let pending = PendingTokens::new(dir.path());
        for _ in 0..PENDING_TOKENS_MAX {
            pending
                .add(&PairingToken::random().unwrap(), at(200), at(100))
                .unwrap();
        }
        assert!(matches!(
            pending.add(&PairingToken::random().unwrap(), at(200), at(100)),
            Err(AddTokenError::TooMany)
        ));
        pending
            .add(&PairingToken::random().unwrap(), at(400), at(300))
            .unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_token_itself_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let pending = PendingTokens::new(dir.path());
        let token = PairingToken::random().unwrap();
        pending.add(&token, at(200), at(100)).unwrap();
        let hex = hex_encode(token.as_bytes());
        for entry in fs::read_dir(dir.path()).unwrap() {
            let entry = entry.unwrap();
            assert!(!entry.file_name().to_string_lossy().contains(&hex));
            assert!(!fs::read_to_string(entry.path()).unwrap().contains(&hex));
        }
    }
}
