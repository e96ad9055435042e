//! The link between agent and appliance: identities, pairing and pinned, mutually
//! authenticated QUIC. Nothing is accepted from a peer that was not paired: a peer whose
//! certificate fingerprint is not pinned changes nothing and learns nothing
//! (DESIGN.md §3 invariant 9). The pairing flow and file formats: `docs/pairing.md`.
//!
//! Only `quic.rs` imports quinn; everything else is plain files, codecs and rustls verifiers.
//!
//! Wiring, in short:
//! - `cdp-receiver pair`: [`DataDir::identity`], [`PairingBundle::create`] with
//!   [`DataDir::pending_tokens`], print [`PairingBundle::encode`].
//! - `cdp-agent pair`: [`PairingBundle::decode`], [`DataDir::identity`],
//!   [`DataDir::trust_store`], [`pair_agent`].
//! - appliance: [`Server::bind`] then loop on [`Server::accept`] (pairing is served inside).
//! - agent: [`Client::bind`] then [`Client::connect`] to an address of the pinned appliance.

// Tests: a panic is a failure.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod bundle;
mod clock;
mod data_dir;
mod fingerprint;
mod frames;
pub mod fsutil;
mod identity;
mod pairing;
mod pending;
mod quic;
mod trust;
mod verify;

pub use bundle::{
    CreateBundleError, DecodeBundleError, PairingBundle, PairingToken, BUNDLE_ADDRS_MAX,
    BUNDLE_BYTES_MAX, PAIRING_TTL_DEFAULT, PAIRING_TTL_MAX, TOKEN_BYTES,
};
pub use clock::{Clock, ManualClock, SystemClock, UnixTime};
pub use data_dir::DataDir;
pub use fingerprint::{Fingerprint, ParseFingerprintError, ParseHexError, FINGERPRINT_BYTES};
pub use frames::{Fault, FrameError, FrameReceiver, FrameSender};
pub use identity::{
    GenerateIdentityError, Identity, LoadIdentityError, LoadOrGenerateIdentityError,
    SaveIdentityError, CERTIFICATE_FILE, KEY_FILE,
};
pub use pairing::{CloseCode, ALPN_PAIRING, ALPN_REPLICATION};
pub use pending::{AddTokenError, ConsumeTokenError, PendingTokens, PENDING_TOKENS_MAX};
pub use quic::{
    pair_agent, BindError, Client, ClosedStream, Congestion, ConnectError, Connection,
    ConnectionError, PairError, ReadError, ReadExactError, ReadToEndError, RecvStream, SendStream,
    Server, VarInt, WriteError, ADMITTED, CONNECTION_RECEIVE_WINDOW_BYTES, HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT, KEEP_ALIVE_INTERVAL, PAIRING_SESSION_TIMEOUT, SEND_WINDOW_BYTES,
    STREAMS_BIDI_MAX, STREAMS_UNI_MAX, STREAM_RECEIVE_WINDOW_BYTES,
};
pub use trust::{
    LoadTrustError, OnNameTaken, PeerName, PeerNameError, PinError, PinnedPeer, TrustStore,
    PEER_ADDRS_MAX, PEER_NAME_BYTES_MAX, PINNED_PEERS_MAX,
};
