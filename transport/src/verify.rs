//! The TLS certificate verifiers of both sides. Trust is a pinned fingerprint, nothing
//! else: no CA, no name, no validity dates. Handshake signatures are always checked against
//! the presented certificate's key with the *ring* provider's algorithms, so presenting a
//! copy of a pinned (public) certificate without its private key fails.
//!
//! Never return `Ok` from a signature check without verifying the signature.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::clock::Clock;
use crate::fingerprint::Fingerprint;
use crate::identity::provider;
use crate::pending::PendingTokens;
use crate::trust::TrustStore;

/// Which server certificates an agent accepts.
#[derive(Debug)]
pub(crate) enum Pins {
    /// Any peer pinned in the store (normally the one paired appliance).
    Store(Arc<TrustStore>),
    /// Exactly this fingerprint (from a pairing bundle).
    One(Fingerprint),
}

impl Pins {
    fn admits(&self, fingerprint: &Fingerprint) -> bool {
        match self {
            Pins::Store(trust) => trust.lookup(fingerprint).is_some(),
            Pins::One(pinned) => pinned == fingerprint,
        }
    }
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// Our certificates are self-signed and sent alone; a chain is not something we made.
fn refuse_chains(intermediates: &[CertificateDer<'_>]) -> Result<(), Error> {
    if intermediates.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }
}

fn not_pinned() -> Error {
    // "Unknown CA" is the closest TLS alert to "not pinned".
    Error::InvalidCertificate(CertificateError::UnknownIssuer)
}

/// The agent's check of the appliance's certificate.
#[derive(Debug)]
pub(crate) struct PinnedServerVerifier {
    pins: Pins,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedServerVerifier {
    pub(crate) fn new(pins: Pins) -> Self {
        Self {
            pins,
            algorithms: algorithms(),
        }
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        refuse_chains(intermediates)?;
        if self.pins.admits(&Fingerprint::of_certificate(end_entity)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(not_pinned())
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Unreachable in practice (TLS 1.3 only), but verified all the same.
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The appliance's check of an agent's certificate: it must be pinned, or — while a pairing
/// token is outstanding — it may be unknown. TLS cannot see which ALPN the unknown peer asked
/// for, so the QUIC driver checks that after the handshake: an unknown certificate is served
/// only the pairing exchange, and closed with `NotPaired` on anything else.
#[derive(Debug)]
pub(crate) struct PinnedClientVerifier {
    trust: Arc<TrustStore>,
    pending: PendingTokens,
    clock: Arc<dyn Clock>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedClientVerifier {
    pub(crate) fn new(
        trust: Arc<TrustStore>,
        pending: PendingTokens,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            trust,
            pending,
            clock,
            algorithms: algorithms(),
        }
    }
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        refuse_chains(intermediates)?;
        let fingerprint = Fingerprint::of_certificate(end_entity);
        if self.trust.lookup(&fingerprint).is_some() {
            return Ok(ClientCertVerified::assertion());
        }
        // Reads the pending-token directory: a few syscalls, cheaper than the handshake's
        // own signature, and always current with tokens added by another process.
        if self.pending.outstanding(self.clock.now()) {
            return Ok(ClientCertVerified::assertion());
        }
        tracing::debug!(%fingerprint, "refused an unpinned client certificate");
        Err(not_pinned())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Unreachable in practice (TLS 1.3 only), but verified all the same.
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
