//! A peer's identity: a self-signed certificate and its private key, made once (at pairing)
//! and kept as PEM files in a private directory. The certificate is only a carrier for the
//! public key; peers trust each other by pinned [`Fingerprint`], never by names or CAs.
//!
//! Never write the key with permissions wider than 0600, and never load one that has them.

use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::fingerprint::Fingerprint;
use crate::fsutil;

/// File holding the PEM certificate inside an identity directory.
pub const CERTIFICATE_FILE: &str = "cert.pem";
/// File holding the PEM (PKCS#8) private key inside an identity directory; mode 0600.
pub const KEY_FILE: &str = "key.pem";

/// Largest identity file we read; ours are under 1 KiB.
const IDENTITY_FILE_BYTES_MAX: u64 = 64 * 1024;

/// The name every cdp certificate carries. Verifiers ignore it (peers are pinned by
/// fingerprint); it only has to be a valid DNS name for TLS.
pub(crate) const CERTIFICATE_NAME: &str = "cdp";

/// The one crypto provider of the crate: *ring*. aws-lc-rs is never compiled in.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    PROVIDER.clone()
}

/// A certificate and the private key it certifies.
#[derive(Clone)]
pub struct Identity {
    /// Invariant: `certified.cert` is exactly `[certificate]` and `certified.key` is the key
    /// whose public half `certificate` carries (checked by [`CertifiedKey::from_der`] on
    /// every construction except the test-only [`Identity::forged`]).
    certified: Arc<CertifiedKey>,
    certificate_pem: String,
    key_pem: String,
    fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Why an identity could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum GenerateIdentityError {
    /// rcgen could not make the key or the certificate.
    #[error("generating the certificate failed: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the generated key (should not happen with *ring* and P-256).
    #[error("the generated key is unusable: {0}")]
    Key(#[from] rustls::Error),
}

/// Why an identity could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveIdentityError {
    /// The directory already holds an identity; it is never overwritten, since the peer's
    /// pairing depends on it.
    #[error("an identity already exists in {0}")]
    AlreadyExists(PathBuf),
    /// Creating the directory or writing a file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file or directory being written.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
}

/// Why an identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadIdentityError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The key file can be read by users other than its owner.
    #[error("{path} has permissions {mode:o}; it must be readable by its owner only (chmod 600)")]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file is not the PEM it should be.
    #[error("{path} is not a pem {what}: {source}")]
    Pem {
        /// The file being parsed.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
        /// What the PEM parser found wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// The key is unusable or does not belong to the certificate.
    #[error("the key in {dir} does not match its certificate or is unsupported: {source}")]
    Mismatch {
        /// The identity directory.
        dir: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
}

/// Why [`Identity::load_or_generate`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadOrGenerateIdentityError {
    /// An existing identity could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadIdentityError),
    /// Only one of the two files exists: a half-written or damaged identity is never
    /// silently replaced, since pairings depend on it.
    #[error("{0} holds only one of {CERTIFICATE_FILE} and {KEY_FILE}; move it aside to make a new identity")]
    Incomplete(PathBuf),
    /// No identity existed and a new one could not be made.
    #[error(transparent)]
    Generate(#[from] GenerateIdentityError),
    /// No identity existed and the new one could not be saved.
    #[error(transparent)]
    Save(#[from] SaveIdentityError),
}

impl Identity {
    /// A new self-signed identity: ECDSA P-256, certificate valid from 1975 to 4096 (validity
    /// is deliberately unused: trust ends when the fingerprint is unpinned).
    pub fn generate() -> Result<Self, GenerateIdentityError> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec![CERTIFICATE_NAME.to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cdp peer");
        let certificate = params.self_signed(&key_pair)?;
        let certified = CertifiedKey::from_der(
            vec![certificate.der().clone()],
            PrivateKeyDer::Pkcs8(key_pair.serialize_der().into()),
            &provider(),
        )?;
        Ok(Self::from_certified(
            certified,
            certificate.pem(),
            key_pair.serialize_pem(),
        ))
    }

    /// Callers pass a `CertifiedKey` built from `vec![certificate]`, so `cert[0]` exists.
    fn from_certified(certified: CertifiedKey, certificate_pem: String, key_pem: String) -> Self {
        let fingerprint = Fingerprint::of_certificate(certified.cert[0].as_ref());
        Self {
            certified: Arc::new(certified),
            certificate_pem,
            key_pem,
            fingerprint,
        }
    }

    /// Writes `cert.pem` (0644) and `key.pem` (0600) into `dir`, creating it with mode 0700.
    /// Refuses to overwrite an existing identity.
    pub fn save(&self, dir: &Path) -> Result<(), SaveIdentityError> {
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |source| SaveIdentityError::Io { path, source }
        };
        fsutil::create_private_dir(dir).map_err(io_error(dir))?;
        let key_path = dir.join(KEY_FILE);
        let certificate_path = dir.join(CERTIFICATE_FILE);
        if certificate_path.exists() {
            return Err(SaveIdentityError::AlreadyExists(dir.to_owned()));
        }
        // The key first: a crash in between leaves a key without a certificate, which
        // `load_or_generate` reports instead of silently replacing.
        for (path, contents, mode) in [
            (&key_path, &self.key_pem, fsutil::MODE_PRIVATE_FILE),
            (
                &certificate_path,
                &self.certificate_pem,
                fsutil::MODE_PUBLIC_FILE,
            ),
        ] {
            match fsutil::write_new(path, contents.as_bytes(), mode) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(SaveIdentityError::AlreadyExists(dir.to_owned()))
                }
                Err(err) => return Err(io_error(path)(err)),
            }
        }
        Ok(())
    }

    /// Reads the identity saved in `dir`, checking the key's permissions and that the key
    /// belongs to the certificate.
    pub fn load(dir: &Path) -> Result<Self, LoadIdentityError> {
        let key_path = dir.join(KEY_FILE);
        let certificate_path = dir.join(CERTIFICATE_FILE);
        let read = |path: &Path| {
            fsutil::read_bounded(path, IDENTITY_FILE_BYTES_MAX).map_err(|source| {
                LoadIdentityError::Io {
                    path: path.to_owned(),
                    source,
                }
            })
        };
        let metadata = std::fs::metadata(&key_path).map_err(|source| LoadIdentityError::Io {
            path: key_path.clone(),
            source,
        })?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(LoadIdentityError::KeyPermissions {
                path: key_path,
                mode,
            });
        }
        let key_bytes = read(&key_path)?;
        let certificate_bytes = read(&certificate_path)?;
        let key =
            PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|source| LoadIdentityError::Pem {
                path: key_path.clone(),
                what: "private key",
                source,
            })?;
        let certificate = CertificateDer::from_pem_slice(&certificate_bytes).map_err(|source| {
            LoadIdentityError::Pem {
                path: certificate_path.clone(),
                what: "certificate",
                source,
            }
        })?;
        let certified =
            CertifiedKey::from_der(vec![certificate], key, &provider()).map_err(|source| {
                LoadIdentityError::Mismatch {
                    dir: dir.to_owned(),
                    source,
                }
            })?;
        // `from_der` accepts keys whose consistency it cannot check; ring's keys always can be.
        certified
            .keys_match()
            .map_err(|source| LoadIdentityError::Mismatch {
                dir: dir.to_owned(),
                source,
            })?;
        Ok(Self::from_certified(
            certified,
            String::from_utf8_lossy(&certificate_bytes).into_owned(),
            String::from_utf8_lossy(&key_bytes).into_owned(),
        ))
    }

    /// Loads the identity in `dir`, or generates and saves one if the directory holds none.
    pub fn load_or_generate(dir: &Path) -> Result<Self, LoadOrGenerateIdentityError> {
        let has_key = dir.join(KEY_FILE).exists();
        let has_certificate = dir.join(CERTIFICATE_FILE).exists();
        match (has_key, has_certificate) {
            (true, true) => Ok(Self::load(dir)?),
            (false, false) => {
                let identity = Self::generate()?;
                identity.save(dir)?;
                Ok(identity)
            }
            _ => Err(LoadOrGenerateIdentityError::Incomplete(dir.to_owned())),
        }
    }

    /// The pinned name of this identity: the blake3 hash of its certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The DER-encoded certificate.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        // Non-empty: see the invariant on `certified`.
        &self.certified.cert[0]
    }

    /// The certificate and key in the form rustls signs with.
    /// 32 secret bytes derived from the private key for `context` (a blake3 key derivation):
    /// stable across restarts of the same identity, useless without the key.
    pub(crate) fn derive_secret(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, self.key_pem.as_bytes())
    }

    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// An identity presenting `certificate_of`'s certificate but signing with `key_of`'s key:
    /// what an attacker who copied a pinned (public) certificate would present.
    #[cfg(test)]
    pub(crate) fn forged(certificate_of: &Identity, key_of: &Identity) -> Self {
        let certified = CertifiedKey::new(
            certificate_of.certified.cert.clone(),
            key_of.certified.key.clone(),
        );
        Self {
            certified: Arc::new(certified),
            certificate_pem: certificate_of.certificate_pem.clone(),
            key_pem: key_of.key_pem.clone(),
            fingerprint: certificate_of.fingerprint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn save_then_load_round_trips_with_private_key_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let identity_dir = dir.path().join("identity");
        let identity = Identity::generate().unwrap();
        identity.save(&identity_dir).unwrap();
        let mode = |path: PathBuf| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(identity_dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(identity_dir.clone()), 0o700);
        let loaded = Identity::load(&identity_dir).unwrap();
        assert_eq!(loaded.fingerprint(), identity.fingerprint());
        assert_eq!(
            Fingerprint::of_certificate(loaded.certificate_der()),
            identity.fingerprint()
        );
        // An existing identity is never overwritten.
        let other = Identity::generate().unwrap();
        assert!(matches!(
            other.save(&identity_dir),
            Err(SaveIdentityError::AlreadyExists(_))
        ));
        assert_eq!(
            Identity::load_or_generate(&identity_dir)
                .unwrap()
                .fingerprint(),
            identity.fingerprint()
        );
    }

    #[test]
    fn two_generated_identities_differ() {
        let one = Identity::generate().unwrap();
        let two = Identity::generate().unwrap();
        assert_ne!(one.fingerprint(), two.fingerprint());
    }

    #[test]
    fn load_refuses_a_key_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        Identity::generate().unwrap().save(dir.path()).unwrap();
        let key = dir.path().join(KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, LoadIdentityError::KeyPermissions { mode: 0o644, .. }),
            "{err}"
        );
    }

    #[test]
    fn load_refuses_a_key_that_is_not_the_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        Identity::generate().unwrap().save(dir.path()).unwrap();
        Identity::generate().unwrap().save(other.path()).unwrap();
        fs::copy(other.path().join(KEY_FILE), dir.path().join(KEY_FILE)).unwrap();
        let err = Identity::load(dir.path()).unwrap_err();
        assert!(matches!(err, LoadIdentityError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn load_reports_garbage_pem_and_half_identities() {
        let dir = tempfile::tempdir().unwrap();
        Identity::generate().unwrap().save(dir.path()).unwrap();
        fs::write(dir.path().join(CERTIFICATE_FILE), "garbage").unwrap();
        let err = Identity::load(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                LoadIdentityError::Pem {
                    what: "certificate",
                    ..
                }
            ),
            "{err}"
        );
        fs::remove_file(dir.path().join(CERTIFICATE_FILE)).unwrap();
        let err = Identity::load_or_generate(dir.path()).unwrap_err();
        assert!(
            matches!(err, LoadOrGenerateIdentityError::Incomplete(_)),
            "{err}"
        );
    }
}
