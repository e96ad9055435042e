//! The trust store: the peers whose certificate fingerprints are pinned, one text file in the
//! data directory, replaced atomically on every change and re-readable at run time. The
//! appliance pins its agents here; an agent pins its appliance (with its addresses).
//!
//! The in-memory copy is what the TLS verifiers consult; it changes only after the file on
//! disk has been durably replaced, so a crash never leaves a pin that was not written.
//!
//! File format (UTF-8, one record a line, `#` lines ignored):
//! ```text
//! cdp-trust v1
//! peer <name> <fingerprint: 64 hex> [<socket address> ...]
//! ```

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, PoisonError, RwLock};

use crate::fingerprint::Fingerprint;
use crate::fsutil;

/// Longest peer name, in bytes.
pub const PEER_NAME_BYTES_MAX: usize = 64;
/// Most peers one trust store holds.
pub const PINNED_PEERS_MAX: usize = 4096;
/// Most addresses kept for one peer.
pub const PEER_ADDRS_MAX: usize = 8;
/// Largest trust store file we read.
const TRUST_FILE_BYTES_MAX: u64 = 1024 * 1024;
const HEADER: &str = "cdp-trust v1";

/// A peer's name as the operator knows it: 1 to 64 bytes of ASCII letters, digits, `.`, `_`
/// and `-`, starting with a letter or digit (so it is safe in file names, logs and metrics).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerName(String);

/// Why a string is not a [`PeerName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerNameError {
    /// The name is empty.
    #[error("peer name is empty")]
    Empty,
    /// The name is longer than [`PEER_NAME_BYTES_MAX`].
    #[error("peer name is {0} bytes long; at most {PEER_NAME_BYTES_MAX} are allowed")]
    TooLong(usize),
    /// The name holds a character outside `[A-Za-z0-9._-]`, or starts with `.`, `_` or `-`.
    #[error("peer name may hold only ascii letters, digits, '.', '_' and '-', and must start with a letter or digit")]
    BadCharacter,
}

impl PeerName {
    /// Checks `name` and wraps it.
    pub fn new(name: &str) -> Result<Self, PeerNameError> {
        if name.is_empty() {
            return Err(PeerNameError::Empty);
        }
        if name.len() > PEER_NAME_BYTES_MAX {
            return Err(PeerNameError::TooLong(name.len()));
        }
        let allowed = |byte: &u8| byte.is_ascii_alphanumeric() || b"._-".contains(byte);
        if !name.as_bytes()[0].is_ascii_alphanumeric() || !name.as_bytes().iter().all(allowed) {
            return Err(PeerNameError::BadCharacter);
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PeerName {
    type Err = PeerNameError;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::new(name)
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerName({})", self.0)
    }
}

/// A peer whose certificate is pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedPeer {
    /// The operator's name for the peer; unique within a trust store.
    pub name: PeerName,
    /// The fingerprint its certificate must have; unique within a trust store.
    pub fingerprint: Fingerprint,
    /// Where to reach it (an agent keeps its appliance's addresses; the appliance keeps none
    /// for its agents, which connect to it). At most [`PEER_ADDRS_MAX`].
    pub addrs: Vec<SocketAddr>,
}

/// Why the trust store could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadTrustError {
    /// The file could not be read.
    #[error("reading trust store {path}: {source}")]
    Io {
        /// The trust store file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The file is not a valid trust store.
    #[error("trust store {path} line {line}: {reason}")]
    Invalid {
        /// The trust store file.
        path: PathBuf,
        /// One-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a peer could not be pinned or unpinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The trust store on disk could not be re-read before the change.
    #[error(transparent)]
    Load(#[from] LoadTrustError),
    /// Another certificate is already pinned under this name.
    #[error("peer name {0} is already pinned to another certificate")]
    NameTaken(PeerName),
    /// This certificate is already pinned under another name.
    #[error("certificate {fingerprint} is already pinned as {name}")]
    FingerprintTaken {
        /// The certificate.
        fingerprint: Fingerprint,
        /// The name it is pinned under.
        name: PeerName,
    },
    /// The store already holds [`PINNED_PEERS_MAX`] peers.
    #[error("the trust store already holds {PINNED_PEERS_MAX} peers")]
    Full,
    /// The peer has more than [`PEER_ADDRS_MAX`] addresses.
    #[error("a peer may have at most {PEER_ADDRS_MAX} addresses")]
    TooManyAddrs,
    /// Writing the new file failed; the store is unchanged.
    #[error("writing trust store {path}: {source}")]
    Io {
        /// The trust store file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
}

/// How [`TrustStore::pin`] treats an existing peer of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnNameTaken {
    /// Refuse: the appliance never lets a pairing replace another agent's pin.
    Refuse,
    /// Replace: an agent re-paired with a rebuilt appliance trusts the new one only.
    Replace,
}

/// The pinned peers, backed by one file.
#[derive(Debug)]
pub struct TrustStore {
    path: PathBuf,
    /// Invariant: equal to what the file held when last read or durably written.
    peers: RwLock<Vec<PinnedPeer>>,
    /// Serialises read-modify-write cycles within this process.
    writer: Mutex<()>,
}

impl TrustStore {
    /// Opens the trust store at `path`; a missing file is an empty store (the file is
    /// created by the first pin).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, LoadTrustError> {
        let path = path.into();
        let peers = read_file(&path)?;
        Ok(Self {
            path,
            peers: RwLock::new(peers),
            writer: Mutex::new(()),
        })
    }

    /// Re-reads the file, so pins and unpins made by another process (a CLI) take effect
    /// without restarting the endpoint. On error the previous contents stay in force.
    pub fn reload(&self) -> Result<(), LoadTrustError> {
        let peers = read_file(&self.path)?;
        *self.peers.write().unwrap_or_else(PoisonError::into_inner) = peers;
        Ok(())
    }

    /// The file behind this store.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All pinned peers.
    pub fn peers(&self) -> Vec<PinnedPeer> {
        self.peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The peer pinned with `fingerprint`, if any.
    pub fn lookup(&self, fingerprint: &Fingerprint) -> Option<PinnedPeer> {
        self.peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|peer| &peer.fingerprint == fingerprint)
            .cloned()
    }

    /// The peer pinned as `name`, if any.
    pub fn lookup_name(&self, name: &PeerName) -> Option<PinnedPeer> {
        self.peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|peer| &peer.name == name)
            .cloned()
    }

    /// Whether `peer` could be pinned now with [`OnNameTaken::Refuse`]; checks the
    /// in-memory copy only.
    pub fn check_pinnable(&self, peer: &PinnedPeer) -> Result<(), PinError> {
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        plan_pin(&peers, peer, OnNameTaken::Refuse).map(|_| ())
    }

    /// Pins `peer`: re-reads the file, adds or updates the peer, and replaces the file
    /// atomically. Pinning the same name and fingerprint again only updates the addresses.
    pub fn pin(&self, peer: PinnedPeer, on_name_taken: OnNameTaken) -> Result<(), PinError> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut peers = read_file(&self.path)?;
        let peers = match plan_pin(&peers, &peer, on_name_taken)? {
            Some(index) => {
                peers[index] = peer;
                peers
            }
            None => {
                peers.retain(|existing| existing.name != peer.name);
                peers.push(peer);
                peers
            }
        };
        self.write(peers)
    }

    /// Removes the peer named `name`; returns whether it was pinned. Its existing
    /// connections are not closed; new handshakes are refused.
    pub fn unpin(&self, name: &PeerName) -> Result<bool, PinError> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut peers = read_file(&self.path)?;
        let before = peers.len();
        peers.retain(|peer| &peer.name != name);
        let removed = peers.len() != before;
        self.write(peers)?;
        Ok(removed)
    }

    fn write(&self, peers: Vec<PinnedPeer>) -> Result<(), PinError> {
        let io_error = |source| PinError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(parent) = self
            .path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            fsutil::create_private_dir(parent).map_err(io_error)?;
        }
        fsutil::write_replacing(
            &self.path,
            encode(&peers).as_bytes(),
            fsutil::MODE_PUBLIC_FILE,
        )
        .map_err(|source| PinError::Io {
            path: self.path.clone(),
            source,
        })?;
        *self.peers.write().unwrap_or_else(PoisonError::into_inner) = peers;
        Ok(())
    }
}

/// Checks that `peer` may join `peers`; returns the index of the entry it updates in place.
fn plan_pin(
    peers: &[PinnedPeer],
    peer: &PinnedPeer,
    on_name_taken: OnNameTaken,
) -> Result<Option<usize>, PinError> {
    if peer.addrs.len() > PEER_ADDRS_MAX {
        return Err(PinError::TooManyAddrs);
    }
    if let Some(other) = peers
        .iter()
        .find(|other| other.fingerprint == peer.fingerprint && other.name != peer.name)
    {
        return Err(PinError::FingerprintTaken {
            fingerprint: peer.fingerprint,
            name: other.name.clone(),
        });
    }
    match peers.iter().position(|other| other.name == peer.name) {
        Some(index) if peers[index].fingerprint == peer.fingerprint => Ok(Some(index)),
        Some(_) if on_name_taken == OnNameTaken::Refuse => {
            Err(PinError::NameTaken(peer.name.clone()))
        }
        Some(_) => Ok(None),
        None if peers.len() >= PINNED_PEERS_MAX => Err(PinError::Full),
        None => Ok(None),
    }
}

fn encode(peers: &[PinnedPeer]) -> String {
    let mut text = String::from(
        "# cdp trust store: the peers whose certificates are pinned. Written atomically by cdp.\n",
    );
    text.push_str(HEADER);
    text.push('\n');
    for peer in peers {
        text.push_str(&format!("peer {} {}", peer.name, peer.fingerprint));
        for addr in &peer.addrs {
            text.push_str(&format!(" {addr}"));
        }
        text.push('\n');
    }
    text
}

fn read_file(path: &Path) -> Result<Vec<PinnedPeer>, LoadTrustError> {
    let bytes = match fsutil::read_bounded(path, TRUST_FILE_BYTES_MAX) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LoadTrustError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let invalid = |line: usize, reason: String| LoadTrustError::Invalid {
        path: path.to_owned(),
        line,
        reason,
    };
    let text = String::from_utf8(bytes).map_err(|_| invalid(0, "not utf-8".to_owned()))?;
    decode(&text).map_err(|(line, reason)| invalid(line, reason))
}

fn decode(text: &str) -> Result<Vec<PinnedPeer>, (usize, String)> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
    match lines.next() {
        Some((_, HEADER)) => {}
        Some((line, found)) => return Err((line, format!("expected `{HEADER}`, found `{found}`"))),
        None => return Err((1, format!("empty file; expected `{HEADER}`"))),
    }
    let mut peers: Vec<PinnedPeer> = Vec::new();
    for (line, content) in lines {
        let mut words = content.split_ascii_whitespace();
        if words.next() != Some("peer") {
            return Err((line, "expected a `peer` record".to_owned()));
        }
        let name = words
            .next()
            .ok_or((line, "missing peer name".to_owned()))?
            .parse::<PeerName>()
            .map_err(|err| (line, err.to_string()))?;
        let fingerprint = words
            .next()
            .ok_or((line, "missing fingerprint".to_owned()))?
            .parse::<Fingerprint>()
            .map_err(|err| (line, err.to_string()))?;
        let addrs = words
            .map(|word| {
                word.parse::<SocketAddr>()
                    .map_err(|_| (line, format!("`{word}` is not a socket address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let peer = PinnedPeer {
            name,
            fingerprint,
            addrs,
        };
        match plan_pin(&peers, &peer, OnNameTaken::Refuse) {
            Ok(None) => peers.push(peer),
            Ok(Some(_)) => return Err((line, format!("peer {} is listed twice", peer.name))),
            Err(err) => return Err((line, err.to_string())),
        }
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, byte: u8) -> PinnedPeer {
        PinnedPeer {
            name: PeerName::new(name).unwrap(),
            fingerprint: Fingerprint::of_certificate(&[byte]),
            addrs: Vec::new(),
        }
    }

    fn check_name(input: &str, expected: Result<(), &str>) {
        let got = PeerName::new(input)
            .map(|_| ())
            .map_err(|err| err.to_string());
        assert_eq!(got, expected.map_err(str::to_owned), "{input:?}");
    }

    #[test]
    fn peer_names() {
        check_name("agent-1.example_a", Ok(()));
        check_name("", Err("peer name is empty"));
        check_name(&"a".repeat(64), Ok(()));
        check_name(
            &"a".repeat(65),
            Err("peer name is 65 bytes long; at most 64 are allowed"),
        );
        for bad in ["-agent", ".agent", "a b", "a/b", "é", "a\n"] {
            assert_eq!(
                PeerName::new(bad),
                Err(PeerNameError::BadCharacter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn pin_persists_and_another_instance_sees_it_after_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust");
        let store = TrustStore::open(&path).unwrap();
        assert!(store.peers().is_empty());
        let mut one = peer("one", 1);
        one.addrs = vec![
            "127.0.0.1:7443".parse().unwrap(),
            "[::1]:7443".parse().unwrap(),
        ];
        store.pin(one.clone(), OnNameTaken::Refuse).unwrap();

        let other = TrustStore::open(&path).unwrap();
        assert_eq!(other.peers(), vec![one.clone()]);
        other.pin(peer("two", 2), OnNameTaken::Refuse).unwrap();
        assert!(store.lookup(&peer("two", 2).fingerprint).is_none());
        store.reload().unwrap();
        assert_eq!(
            store.lookup(&peer("two", 2).fingerprint),
            Some(peer("two", 2))
        );
        assert!(other.unpin(&one.name).unwrap());
        store.reload().unwrap();
        assert_eq!(store.peers(), vec![peer("two", 2)]);
    }

    #[test]
    fn pin_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let store = TrustStore::open(dir.path().join("trust")).unwrap();
        store.pin(peer("one", 1), OnNameTaken::Refuse).unwrap();
        // Same name, same certificate: idempotent.
        store.pin(peer("one", 1), OnNameTaken::Refuse).unwrap();
        assert!(matches!(
            store.pin(peer("one", 2), OnNameTaken::Refuse),
            Err(PinError::NameTaken(_))
        ));
        assert!(matches!(
            store.pin(peer("other", 1), OnNameTaken::Refuse),
            Err(PinError::FingerprintTaken { .. })
        ));
        store.pin(peer("one", 2), OnNameTaken::Replace).unwrap();
        assert_eq!(store.peers(), vec![peer("one", 2)]);
    }

    fn check_decode(text: &str, expected: Result<usize, &str>) {
        let got = decode(text)
            .map(|peers| peers.len())
            .map_err(|(line, reason)| format!("line {line}: {reason}"));
        assert_eq!(got, expected.map_err(str::to_owned), "{text:?}");
    }

    #[test]
    fn decode_rejects_garbage_with_line_numbers() {
        let fp = Fingerprint::of_certificate(b"x");
        check_decode("cdp-trust v1\n", Ok(0));
        check_decode(
            &format!("# c\ncdp-trust v1\npeer a {fp} 127.0.0.1:1\n"),
            Ok(1),
        );
        check_decode("", Err("line 1: empty file; expected `cdp-trust v1`"));
        check_decode(
            "cdp-trust v2\n",
            Err("line 1: expected `cdp-trust v1`, found `cdp-trust v2`"),
        );
        check_decode(
            "cdp-trust v1\nfoo\n",
            Err("line 2: expected a `peer` record"),
        );
        check_decode(
            "cdp-trust v1\npeer a 00\n",
            Err("line 2: not a fingerprint: expected 64 hex digits, found 2 characters"),
        );
        check_decode(
            &format!("cdp-trust v1\npeer a {fp} nowhere\n"),
            Err("line 2: `nowhere` is not a socket address"),
        );
        check_decode(
            &format!("cdp-trust v1\npeer a {fp}\npeer a {fp}\n"),
            Err("line 3: peer a is listed twice"),
        );
    }
}
