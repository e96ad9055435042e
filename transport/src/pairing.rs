//! The pairing exchange, without I/O: the one request an unpaired agent may send on a
//! `cdp-pair/1` connection, the one answer, the connection close codes, and the appliance's
//! decision (token valid, unused, unexpired → pin the agent's certificate). The QUIC driver
//! (`quic.rs`) moves the bytes.
//!
//! Wire format (all on the first bidirectional stream, each side finishing its half):
//! ```text
//! request  = version:u8 (=1) | token:[u8; 32] | name_len:u8 (1..=64) | name:[u8; name_len]
//! response = version:u8 (=1) | status:u8 (=0, paired)
//! ```
//! Every refusal is a connection close with a [`CloseCode`], never a response: an agent
//! without a valid token learns only that it was refused.

use rustls_pki_types::UnixTime;

use crate::bundle::{PairingToken, TOKEN_BYTES};
use crate::fingerprint::Fingerprint;
use crate::pending::{ConsumeTokenError, PendingTokens};
use crate::trust::{
    OnNameTaken, PeerName, PeerNameError, PinError, PinnedPeer, TrustStore, PEER_NAME_BYTES_MAX,
};

/// ALPN of replication connections.
pub const ALPN_REPLICATION: &[u8] = b"cdp/1";
/// ALPN of pairing connections.
pub const ALPN_PAIRING: &[u8] = b"cdp-pair/1";

const PAIR_WIRE_VERSION: u8 = 1;
const STATUS_PAIRED: u8 = 0;
/// Largest pairing request: version, token, name length, longest name.
pub(crate) const PAIR_REQUEST_BYTES_MAX: usize = 1 + TOKEN_BYTES + 1 + PEER_NAME_BYTES_MAX;
/// Size of the pairing response.
pub(crate) const PAIR_RESPONSE_BYTES: usize = 2;

/// Application error codes with which cdp closes a QUIC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// Normal end of the conversation.
    Done,
    /// The peer sent something the protocol does not allow at that point.
    ProtocolViolation,
    /// The pairing token is unknown, already used or expired.
    PairingRefused,
    /// The agent's name or certificate is already pinned to another certificate or name.
    PairingConflict,
    /// A replication connection from a certificate that is not pinned (possible only while a
    /// pairing token is outstanding; otherwise the TLS handshake already fails).
    NotPaired,
    /// The appliance failed locally (a disk error); nothing was changed.
    Internal,
    /// Too many pairing sessions at once.
    Busy,
}

impl CloseCode {
    const ALL: [CloseCode; 7] = [
        CloseCode::Done,
        CloseCode::ProtocolViolation,
        CloseCode::PairingRefused,
        CloseCode::PairingConflict,
        CloseCode::NotPaired,
        CloseCode::Internal,
        CloseCode::Busy,
    ];

    /// The code on the wire.
    pub fn code(self) -> u32 {
        match self {
            CloseCode::Done => 0,
            CloseCode::ProtocolViolation => 1,
            CloseCode::PairingRefused => 2,
            CloseCode::PairingConflict => 3,
            CloseCode::NotPaired => 4,
            CloseCode::Internal => 5,
            CloseCode::Busy => 6,
        }
    }

    /// The close code with wire value `code`, if cdp defines it.
    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|close| u64::from(close.code()) == code)
    }

    /// The short reason sent with the close; reveals nothing beyond the code.
    pub(crate) fn reason(self) -> &'static [u8] {
        match self {
            CloseCode::Done => b"done",
            CloseCode::ProtocolViolation => b"protocol violation",
            CloseCode::PairingRefused => b"pairing refused",
            CloseCode::PairingConflict => b"name or certificate already paired",
            CloseCode::NotPaired => b"not paired",
            CloseCode::Internal => b"internal error",
            CloseCode::Busy => b"busy",
        }
    }
}

/// The agent's pairing request.
#[derive(Debug)]
pub(crate) struct PairRequest {
    pub(crate) token: PairingToken,
    pub(crate) agent: PeerName,
}

/// Why bytes are not a pairing request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodePairRequestError {
    /// Shorter than the fixed part or than its declared name.
    #[error("pairing request is truncated")]
    Truncated,
    /// Longer than its declared name.
    #[error("pairing request has trailing bytes")]
    Trailing,
    /// Another wire version.
    #[error("pairing request version {0} is not supported")]
    Version(u8),
    /// The name is not a valid peer name.
    #[error("pairing request names the agent badly: {0}")]
    Name(PeerNameError),
}

impl PairRequest {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let name = self.agent.as_str().as_bytes();
        let mut bytes = Vec::with_capacity(PAIR_REQUEST_BYTES_MAX);
        bytes.push(PAIR_WIRE_VERSION);
        bytes.extend_from_slice(self.token.as_bytes());
        // A `PeerName` is at most `PEER_NAME_BYTES_MAX` (64) bytes, so this never truncates.
        bytes.push(name.len() as u8);
        bytes.extend_from_slice(name);
        bytes
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodePairRequestError> {
        let (&version, rest) = bytes
            .split_first()
            .ok_or(DecodePairRequestError::Truncated)?;
        if version != PAIR_WIRE_VERSION {
            return Err(DecodePairRequestError::Version(version));
        }
        let (token, rest) = rest
            .split_first_chunk::<TOKEN_BYTES>()
            .ok_or(DecodePairRequestError::Truncated)?;
        let (&name_len, rest) = rest
            .split_first()
            .ok_or(DecodePairRequestError::Truncated)?;
        let name_len = usize::from(name_len);
        if rest.len() < name_len {
            return Err(DecodePairRequestError::Truncated);
        }
        if rest.len() > name_len {
            return Err(DecodePairRequestError::Trailing);
        }
        let name = std::str::from_utf8(rest)
            .map_err(|_| DecodePairRequestError::Name(PeerNameError::BadCharacter))?;
        let agent = PeerName::new(name).map_err(DecodePairRequestError::Name)?;
        Ok(Self {
            token: PairingToken::from_bytes(*token),
            agent,
        })
    }
}

/// The appliance's answer when it pinned the agent.
pub(crate) fn encode_paired_response() -> [u8; PAIR_RESPONSE_BYTES] {
    [PAIR_WIRE_VERSION, STATUS_PAIRED]
}

/// Whether `bytes` is the "paired" response.
pub(crate) fn is_paired_response(bytes: &[u8]) -> bool {
    bytes == encode_paired_response()
}

/// The appliance's decision on a well-formed request from the holder of certificate
/// `agent`: check the token (constant-time, unexpired), check the name and certificate are
/// free, use the token up, pin the agent. Returns the pinned agent, or the close code.
///
/// The token is checked before anything about names, so a caller without a valid token
/// learns nothing about which agents are paired.
pub(crate) fn handle_pair_request(
    request: &PairRequest,
    agent: Fingerprint,
    pending: &PendingTokens,
    trust: &TrustStore,
    now: UnixTime,
) -> Result<PinnedPeer, CloseCode> {
    let found = pending.find(&request.token, now).map_err(token_refusal)?;
    let peer = PinnedPeer {
        name: request.agent.clone(),
        fingerprint: agent,
        addrs: Vec::new(),
    };
    trust.check_pinnable(&peer).map_err(pin_refusal)?;
    pending.consume(found).map_err(token_refusal)?;
    trust
        .pin(peer.clone(), OnNameTaken::Refuse)
        .map_err(pin_refusal)?;
    tracing::info!(agent = %peer.name, fingerprint = %peer.fingerprint, "paired agent");
    Ok(peer)
}

fn token_refusal(err: ConsumeTokenError) -> CloseCode {
    tracing::warn!("pairing refused: {err}");
    match err {
        ConsumeTokenError::Unknown | ConsumeTokenError::Expired => CloseCode::PairingRefused,
        ConsumeTokenError::Io { .. } => CloseCode::Internal,
    }
}

fn pin_refusal(err: PinError) -> CloseCode {
    tracing::warn!("pairing refused: {err}");
    match err {
        PinError::NameTaken(_) | PinError::FingerprintTaken { .. } | PinError::Full => {
            CloseCode::PairingConflict
        }
        PinError::TooManyAddrs | PinError::Load(_) | PinError::Io { .. } => CloseCode::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn request(name: &str) -> PairRequest {
        PairRequest {
            token: PairingToken::from_bytes([9; TOKEN_BYTES]),
            agent: PeerName::new(name).unwrap(),
        }
    }

    fn check(bytes: &[u8], expected: Result<&str, DecodePairRequestError>) {
        let got = PairRequest::decode(bytes).map(|request| request.agent.as_str().to_owned());
        assert_eq!(got, expected.map(str::to_owned), "{bytes:?}");
    }

    #[test]
    fn request_codec() {
        let good = request("agent-1").encode();
        assert_eq!(good.len(), 1 + 32 + 1 + 7);
        check(&good, Ok("agent-1"));
        check(&request(&"a".repeat(64)).encode(), Ok(&"a".repeat(64)));
        check(&[], Err(DecodePairRequestError::Truncated));
        check(
            &good[..good.len() - 1],
            Err(DecodePairRequestError::Truncated),
        );
        check(&good[..20], Err(DecodePairRequestError::Truncated));
        check(
            &[&good[..], b"x"].concat(),
            Err(DecodePairRequestError::Trailing),
        );
        let mut other_version = good.clone();
        other_version[0] = 2;
        check(&other_version, Err(DecodePairRequestError::Version(2)));
        let mut bad_name = good.clone();
        bad_name[34] = b'/';
        check(
            &bad_name,
            Err(DecodePairRequestError::Name(PeerNameError::BadCharacter)),
        );
        let mut empty_name = good[..34].to_vec();
        empty_name[33] = 0;
        check(
            &empty_name,
            Err(DecodePairRequestError::Name(PeerNameError::Empty)),
        );
        let mut not_utf8 = good.clone();
        not_utf8[34] = 0xff;
        check(
            &not_utf8,
            Err(DecodePairRequestError::Name(PeerNameError::BadCharacter)),
        );
    }

    #[test]
    fn close_codes_round_trip() {
        for close in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(u64::from(close.code())), Some(close));
        }
        assert_eq!(CloseCode::from_code(99), None);
    }

    #[test]
    fn decision_checks_the_token_before_names_and_uses_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let pending = PendingTokens::new(dir.path().join("pairing"));
        let trust = TrustStore::open(dir.path().join("trust")).unwrap();
        let now = UnixTime::since_unix_epoch(Duration::from_secs(1000));
        let later = UnixTime::since_unix_epoch(Duration::from_secs(2000));
        let agent = Fingerprint::of_certificate(b"agent");
        let intruder = Fingerprint::of_certificate(b"intruder");
        let taken = request("taken");
        trust
            .pin(
                PinnedPeer {
                    name: taken.agent.clone(),
                    fingerprint: Fingerprint::of_certificate(b"earlier"),
                    addrs: Vec::new(),
                },
                OnNameTaken::Refuse,
            )
            .unwrap();
        // No token outstanding: refused, whatever the name.
        assert_eq!(
            handle_pair_request(&taken, intruder, &pending, &trust, now).unwrap_err(),
            CloseCode::PairingRefused
        );
        pending.add(&taken.token, later, now).unwrap();
        // A valid token but a taken name: conflict, and the token stays usable.
        assert_eq!(
            handle_pair_request(&taken, agent, &pending, &trust, now).unwrap_err(),
            CloseCode::PairingConflict
        );
        let peer = handle_pair_request(&request("agent-1"), agent, &pending, &trust, now).unwrap();
        assert_eq!(trust.lookup(&agent), Some(peer));
        // Used up.
        assert_eq!(
            handle_pair_request(&request("agent-2"), intruder, &pending, &trust, now).unwrap_err(),
            CloseCode::PairingRefused
        );
        assert_eq!(trust.lookup(&intruder), None);
    }
}
