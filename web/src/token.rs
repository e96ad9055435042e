//! The REST API's bearer token: 32 random bytes, written as 64 lowercase hex digits, kept in
//! a file only its owner can read (`DATA_DIR/api-token`), compared in constant time.
//!
//! Must never print a token (its `Debug` is redacted), never write one with permissions
//! wider than 0600, never load one that group or other can read, and never replace an
//! existing token file.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;
/// Length of a token's text: two lowercase hex digits per byte.
pub const TOKEN_HEX_LEN: usize = TOKEN_BYTES * 2;
/// Conventional name of the token file inside the appliance's data directory.
pub const TOKEN_FILE_NAME: &str = "api-token";
/// Permissions of a token file.
const MODE_TOKEN_FILE: u32 = 0o600;
/// A token file is 65 bytes; anything much larger is not one, and is not read whole.
const TOKEN_FILE_BYTES_MAX: u64 = 1024;

/// A bearer token for the REST API.
///
/// **Invariant:** `hex` is exactly [`TOKEN_HEX_LEN`] lowercase hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    hex: String,
}

/// Why a string is not a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseTokenError {
    /// The text has the wrong length (after trimming surrounding whitespace).
    #[error("a token is {TOKEN_HEX_LEN} lowercase hex digits; this one has {len} characters")]
    Length {
        /// Its length in bytes.
        len: usize,
    },
    /// The text has a character that is not a lowercase hex digit.
    #[error("a token is {TOKEN_HEX_LEN} lowercase hex digits; this one has another character")]
    NotLowercaseHex,
}

/// Why a token could not be made, saved or loaded. Every variant names its file.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The system's random source could not be read.
    #[error("reading random bytes from /dev/urandom: {0}")]
    Random(#[source] io::Error),
    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (`reading`, `writing`, …).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// [`ApiToken::save_new`] found a file already there and left it alone.
    #[error("{path} already exists; refusing to replace an api token")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// The token file can be read by users other than its owner.
    #[error("{path} has permissions {mode:o}; it must be readable by its owner only (chmod 600)")]
    Permissions {
        /// The token file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold a token.
    #[error("{path} does not hold an api token: {source}")]
    Malformed {
        /// The token file.
        path: PathBuf,
        /// What is wrong with its contents.
        source: ParseTokenError,
    },
}

impl ApiToken {
    /// Draws a new token from the kernel's random source.
    ///
    /// `/dev/urandom` through std rather than a crate: one read, no dependency, and on the
    /// Linux versions we support (≥ 5.6) it blocks until the pool is initialised, as
    /// `getrandom(2)` does.
    pub fn generate() -> Result<Self, TokenFileError> {
        let mut bytes = [0u8; TOKEN_BYTES];
        File::open("/dev/urandom")
            .and_then(|mut random| random.read_exact(&mut bytes))
            .map_err(TokenFileError::Random)?;
        Ok(Self::from_bytes(&bytes))
    }

    /// The token whose bytes are `bytes` (tests and callers that draw their own).
    pub fn from_bytes(bytes: &[u8; TOKEN_BYTES]) -> Self {
        let mut hex = String::with_capacity(TOKEN_HEX_LEN);
        for byte in bytes {
            hex.push(hex_digit(byte >> 4));
            hex.push(hex_digit(byte & 0x0f));
        }
        Self { hex }
    }

    /// Parses a token's text; surrounding whitespace (a file's final newline) is ignored.
    pub fn parse(text: &str) -> Result<Self, ParseTokenError> {
        let text = text.trim();
        if text.len() != TOKEN_HEX_LEN {
            return Err(ParseTokenError::Length { len: text.len() });
        }
        if !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ParseTokenError::NotLowercaseHex);
        }
        Ok(Self {
            hex: text.to_owned(),
        })
    }

    /// The token's text, for an `Authorization` header or a file. Never log it.
    pub fn as_str(&self) -> &str {
        &self.hex
    }

    /// Whether `presented` is this token, in time independent of where they differ: both
    /// sides are hashed with blake3 and the hashes compared with blake3's constant-time
    /// equality, so neither the content nor the length of the secret leaks through timing.
    pub fn matches(&self, presented: &[u8]) -> bool {
        blake3::hash(self.hex.as_bytes()) == blake3::hash(presented)
    }

    /// Writes the token to `path` (mode 0600) atomically and durably, refusing to replace
    /// an existing file: a temporary file in the same directory is written and fsynced,
    /// hard-linked into place (a link, unlike a rename, never replaces its target) and the
    /// directory fsynced. A crash leaves no file or the whole one.
    pub fn save_new(&self, path: &Path) -> Result<(), TokenFileError> {
        let io_error = |action, source| TokenFileError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        let temp = temp_path(path).map_err(|source| io_error("writing", source))?;
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(MODE_TOKEN_FILE)
                .open(&temp)?;
            file.write_all(self.hex.as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()
        })();
        if let Err(source) = written {
            let _ = fs::remove_file(&temp);
            return Err(io_error("writing", source));
        }
        let linked = fs::hard_link(&temp, path);
        let _ = fs::remove_file(&temp);
        match linked {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                return Err(TokenFileError::AlreadyExists {
                    path: path.to_owned(),
                })
            }
            Err(source) => return Err(io_error("writing", source)),
        }
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| TokenFileError::Io {
                action: "syncing the directory of",
                path: path.to_owned(),
                source,
            })
    }

    /// Reads the token saved at `path`, refusing a file that group or other can read.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let io_error = |source| TokenFileError::Io {
            action: "reading",
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        let mode = file.metadata().map_err(io_error)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenFileError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let mut contents = Vec::new();
        file.take(TOKEN_FILE_BYTES_MAX)
            .read_to_end(&mut contents)
            .map_err(io_error)?;
        let malformed = |source| TokenFileError::Malformed {
            path: path.to_owned(),
            source,
        };
        let text = std::str::from_utf8(&contents)
            .map_err(|_| malformed(ParseTokenError::NotLowercaseHex))?;
        Self::parse(text).map_err(malformed)
    }

    /// Loads the token at `path`, or makes and saves a new one if there is no file. Of two
    /// processes racing to create it, one saves and both return the saved token.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenFileError> {
        match Self::load(path) {
            Err(TokenFileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                let token = Self::generate()?;
                match token.save_new(path) {
                    Ok(()) => Ok(token),
                    Err(TokenFileError::AlreadyExists { .. }) => Self::load(path),
                    Err(err) => Err(err),
                }
            }
            other => other,
        }
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(nibble & 0x0f)])
}

/// `DIR/.NAME.tmp.PID.N`: unique in this process and across processes.
fn temp_path(path: &Path) -> io::Result<PathBuf> {
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
    Ok(path.with_file_name(temp_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn parse_accepts_exactly_64_lowercase_hex() {
        let check = |text: &str, expected: Result<&str, ParseTokenError>| {
            let parsed = ApiToken::parse(text);
            assert_eq!(
                parsed.as_ref().map(ApiToken::as_str),
                expected.as_ref().map(|s| *s),
                "{text:?}"
            );
        };
        check(HEX, Ok(HEX));
        check(&format!("  {HEX}\n"), Ok(HEX));
        check(&HEX[1..], Err(ParseTokenError::Length { len: 63 }));
        check("", Err(ParseTokenError::Length { len: 0 }));
        check(&HEX.to_uppercase(), Err(ParseTokenError::NotLowercaseHex));
        check(
            &format!("{}g", &HEX[1..]),
            Err(ParseTokenError::NotLowercaseHex),
        );
        // 32 two-byte characters: 64 bytes, not 64 hex digits; must not panic on slicing.
        check(&"é".repeat(32), Err(ParseTokenError::NotLowercaseHex));
    }

    #[test]
    fn generated_tokens_are_well_formed_and_differ() {
        let one = ApiToken::generate().unwrap();
        let two = ApiToken::generate().unwrap();
        assert_eq!(ApiToken::parse(one.as_str()).unwrap(), one);
        assert_ne!(one, two);
        assert_eq!(format!("{one:?}"), "ApiToken(<redacted>)");
    }

    #[test]
    fn from_bytes_writes_lowercase_hex() {
        let mut bytes = [0u8; TOKEN_BYTES];
        bytes[0] = 0xab;
        bytes[31] = 0x0f;
        let token = ApiToken::from_bytes(&bytes);
        assert!(token.as_str().starts_with("ab00"));
        assert!(token.as_str().ends_with("000f"));
    }

    #[test]
    fn matches_only_the_same_text() {
        let token = ApiToken::parse(HEX).unwrap();
        assert!(token.matches(HEX.as_bytes()));
        assert!(!token.matches(&HEX.as_bytes()[1..]));
        assert!(!token.matches(HEX.to_uppercase().as_bytes()));
        assert!(!token.matches(b""));
    }

    #[test]
    fn save_new_then_load_round_trips_and_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE_NAME);
        let token = ApiToken::parse(HEX).unwrap();
        token.save_new(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{HEX}\n"));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ApiToken::load(&path).unwrap(), token);

        let other = ApiToken::generate().unwrap();
        let err = other.save_new(&path).unwrap_err();
        assert!(matches!(err, TokenFileError::AlreadyExists { .. }), "{err}");
        assert_eq!(ApiToken::load(&path).unwrap(), token);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn load_refuses_readable_by_others_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE_NAME);
        ApiToken::parse(HEX).unwrap().save_new(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = ApiToken::load(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} has permissions 640; it must be readable by its owner only (chmod 600)",
                path.display()
            )
        );
    }

    #[test]
    fn load_names_the_file_when_missing_or_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE_NAME);
        let err = ApiToken::load(&path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("reading {}: ", path.display())),
            "{err}"
        );

        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        file.write_all(b"not a token\n").unwrap();
        let err = ApiToken::load(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} does not hold an api token: a token is 64 lowercase hex digits; \
                 this one has 11 characters",
                path.display()
            )
        );
    }

    #[test]
    fn load_or_create_creates_once_then_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE_NAME);
        let first = ApiToken::load_or_create(&path).unwrap();
        let second = ApiToken::load_or_create(&path).unwrap();
        assert_eq!(first, second);
        assert_eq!(ApiToken::load(&path).unwrap(), first);
    }
}
