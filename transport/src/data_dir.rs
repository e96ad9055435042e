//! Where the transport keeps its files inside a binary's data directory, so that
//! `cdp-receiver` and `cdp-agent` agree on the layout (documented in `docs/pairing.md`):
//!
//! ```text
//! DIR/identity/cert.pem   this side's certificate (0644), in a 0700 directory
//! DIR/identity/key.pem    this side's private key (0600)
//! DIR/trust               pinned peers (the appliance: its agents; an agent: its appliance)
//! DIR/pairing/<hash>      appliance only: outstanding one-time pairing tokens (0600)
//! ```
//!
//! It only names paths and opens the stores; it never deletes anything.

use std::path::{Path, PathBuf};

use crate::identity::{Identity, LoadOrGenerateIdentityError};
use crate::pending::PendingTokens;
use crate::trust::{LoadTrustError, TrustStore};

/// A binary's data directory, as far as the transport is concerned.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where this side's identity lives.
    pub fn identity_dir(&self) -> PathBuf {
        self.root.join("identity")
    }

    /// Where the trust store lives.
    pub fn trust_path(&self) -> PathBuf {
        self.root.join("trust")
    }

    /// Where outstanding pairing tokens live (appliance only).
    pub fn pending_dir(&self) -> PathBuf {
        self.root.join("pairing")
    }

    /// This side's identity, made on first use.
    pub fn identity(&self) -> Result<Identity, LoadOrGenerateIdentityError> {
        Identity::load_or_generate(&self.identity_dir())
    }

    /// The trust store (empty if none was written yet).
    pub fn trust_store(&self) -> Result<TrustStore, LoadTrustError> {
        TrustStore::open(self.trust_path())
    }

    /// The outstanding pairing tokens.
    pub fn pending_tokens(&self) -> PendingTokens {
        PendingTokens::new(self.pending_dir())
    }
}
