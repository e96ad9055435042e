//! The QUIC driver: the only file that imports quinn. It builds the rustls configurations
//! (TLS 1.3 only, *ring* only, no session resumption or 0-RTT, pinned verifiers), binds the
//! appliance's [`Server`] and the agent's [`Client`], and moves the pairing exchange's bytes.
//!
//! What a peer without a pinned certificate can do here: while no pairing token is
//! outstanding, nothing — its handshake fails in TLS. While one is, it may complete a
//! handshake, and is then served only the pairing exchange: one request, checked before
//! anything else happens; every other action closes the connection. A connection reaches
//! [`Server::accept`] only with the replication ALPN and a certificate pinned at that moment.
//!
//! A QUIC client finishes its handshake before the server has checked the client's
//! certificate, so the server *admits* each replication connection explicitly: it opens the
//! connection's first server-initiated unidirectional stream, writes [`ADMITTED`] and
//! finishes it. [`Client::connect`] returns only after reading that, so a refused agent gets
//! an error from `connect`, not from its first stream.
//!
//! Never hand a connection to the application before its peer's fingerprint is looked up.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, Semaphore};

use crate::bundle::PairingBundle;
use crate::clock::Clock;
use crate::fingerprint::Fingerprint;
use crate::identity::{provider, Identity, CERTIFICATE_NAME};
use crate::pairing::{
    encode_paired_response, handle_pair_request, is_paired_response, CloseCode, PairRequest,
    ALPN_PAIRING, ALPN_REPLICATION, PAIR_REQUEST_BYTES_MAX, PAIR_RESPONSE_BYTES,
};
use crate::pending::PendingTokens;
use crate::trust::{OnNameTaken, PeerName, PinError, PinnedPeer, TrustStore};
use crate::verify::{PinnedClientVerifier, PinnedServerVerifier, Pins};

pub use quinn::{
    ClosedStream, ConnectionError, ReadError, ReadExactError, ReadToEndError, RecvStream,
    SendStream, VarInt, WriteError,
};

/// Interval of keep-alive packets: keeps NAT bindings on the agent's side open.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A connection with no packet for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a whole pairing exchange may take, on either side.
pub const PAIRING_SESSION_TIMEOUT: Duration = Duration::from_secs(15);
/// Flow-control window of one stream: the bandwidth-delay product of a 1 Gbit/s link at
/// 100 ms RTT (12.5 MB) with headroom. Loopback (RTT ≈ 50 µs) is CPU-bound and needs far
/// less: 500–650 MiB/s measured with this and with quinn's defaults alike
/// (`examples/quic_throughput.rs`, figures in `docs/pairing.md`).
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Flow-control window of a whole connection (all streams together): the most an agent can
/// make the appliance buffer for it, so it bounds the appliance's memory per agent.
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 32 * 1024 * 1024;
/// Unacknowledged bytes a sender buffers per connection.
pub const SEND_WINDOW_BYTES: u64 = 32 * 1024 * 1024;
/// Bidirectional streams a peer may have open at once.
pub const STREAMS_BIDI_MAX: u32 = 16;
/// Unidirectional streams a peer may have open at once.
pub const STREAMS_UNI_MAX: u32 = 16;
/// Handshakes (and pairing sessions) the server runs at once; more are refused.
const HANDSHAKES_CONCURRENT_MAX: usize = 64;
/// Pairing sessions the server runs at once; more are closed with [`CloseCode::Busy`].
const PAIRING_SESSIONS_CONCURRENT_MAX: usize = 4;
/// Authenticated connections waiting for [`Server::accept`]; handshakes wait beyond that.
const ACCEPT_QUEUE_CONNECTIONS_MAX: usize = 16;
/// How long an agent waits for its closing pairing connection to drain.
const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// What the server writes on its first unidirectional stream to admit a replication
/// connection (version 1 of the admission).
pub const ADMITTED: [u8; 1] = [1];

/// The congestion controller a sender runs on a replication connection (the agent's
/// choice: it sends the data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (quinn's default): backs off on every loss, so on a lossy long link its rate
    /// stays far below the link's capacity (about MSS / (RTT × √loss)).
    #[default]
    Cubic,
    /// BBR (quinn's implementation is marked experimental): paces at the measured bottleneck
    /// bandwidth and does not treat random loss as congestion; for lossy WAN links.
    Bbr,
}

impl Congestion {
    /// The controller named `name` (`cubic` or `bbr`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "cubic" => Some(Congestion::Cubic),
            "bbr" => Some(Congestion::Bbr),
            _ => None,
        }
    }
}

/// QUIC transport parameters shared by both sides.
fn transport_config() -> Arc<quinn::TransportConfig> {
    Arc::new(base_transport_config())
}

fn base_transport_config() -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    config
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        // 30 000 ms fits a VarInt (< 2^62), so the conversion cannot fail.
        .max_idle_timeout(Some(quinn::IdleTimeout::from(VarInt::from_u32(
            IDLE_TIMEOUT.as_millis() as u32,
        ))))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES))
        .send_window(SEND_WINDOW_BYTES)
        .max_concurrent_bidi_streams(VarInt::from_u32(STREAMS_BIDI_MAX))
        .max_concurrent_uni_streams(VarInt::from_u32(STREAMS_UNI_MAX))
        // No datagrams: one less way to send bytes nobody reads.
        .datagram_receive_buffer_size(None);
    config
}

/// Why an endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// rustls refused the configuration.
    #[error("configuring tls: {0}")]
    Tls(#[from] rustls::Error),
    /// The crypto provider lacks the cipher suite QUIC's initial packets need.
    #[error("the crypto provider lacks quic's initial cipher suite")]
    NoInitialCipherSuite,
    /// Called outside a tokio runtime.
    #[error("no tokio runtime is running")]
    NoRuntime,
    /// The UDP socket could not be bound.
    #[error("binding udp socket {addr}: {source}")]
    Io {
        /// The local address.
        addr: SocketAddr,
        /// The operating system's error.
        source: io::Error,
    },
}

/// Why a connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// quinn refused to start the connection (bad address, endpoint closing).
    #[error("connecting to {addr}: {source}")]
    Start {
        /// The remote address.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// The handshake failed: unreachable, or a certificate was refused by either side.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The remote address.
        addr: SocketAddr,
        /// quinn's reason.
        source: ConnectionError,
    },
    /// The server admitted the connection with something other than [`ADMITTED`].
    #[error("{addr} did not admit the connection properly")]
    Admission {
        /// The remote address.
        addr: SocketAddr,
    },
    /// The handshake (or the admission) did not finish within [`HANDSHAKE_TIMEOUT`].
    #[error("handshake with {addr} timed out")]
    Timeout {
        /// The remote address.
        addr: SocketAddr,
    },
    /// The peer was unpinned while the handshake ran.
    #[error("{addr} presented certificate {fingerprint}, which is not pinned")]
    NotPinned {
        /// The remote address.
        addr: SocketAddr,
        /// The certificate's fingerprint.
        fingerprint: Fingerprint,
    },
}

impl ConnectError {
    /// The cdp close code the server ended the connection with, if it closed it that way
    /// (for example [`CloseCode::NotPaired`]).
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            ConnectError::Handshake {
                source: ConnectionError::ApplicationClosed(close),
                ..
            } => CloseCode::from_code(close.error_code.into_inner()),
            _ => None,
        }
    }

    /// Whether a certificate was refused, by this side or the peer: a TLS alert (carried as
    /// a QUIC crypto error), or the server's [`CloseCode::NotPaired`].
    pub fn is_certificate_refused(&self) -> bool {
        let code = match self {
            ConnectError::Handshake {
                source: ConnectionError::ApplicationClosed(_),
                ..
            } => return self.close_code() == Some(CloseCode::NotPaired),
            ConnectError::Handshake {
                source: ConnectionError::TransportError(error),
                ..
            } => error.code,
            ConnectError::Handshake {
                source: ConnectionError::ConnectionClosed(close),
                ..
            } => close.error_code,
            ConnectError::NotPinned { .. } => return true,
            _ => return false,
        };
        // QUIC carries TLS alerts as transport errors 0x100..=0x1ff (RFC 9001 §4.8).
        (0x100..=0x1ff).contains(&u64::from(code))
    }
}

/// Why pairing failed on the agent.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The bundle's expiry has passed.
    #[error("the pairing bundle expired at {0} (unix seconds); create a new one on the appliance")]
    Expired(u64),
    /// The bundle has no address.
    #[error("the pairing bundle holds no appliance address")]
    NoAddrs,
    /// The local endpoint could not be set up.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// No bundle address answered with the expected certificate; the last error is given.
    #[error("could not reach the appliance: {0}")]
    Connect(#[source] ConnectError),
    /// The appliance refused the token (unknown, already used or expired).
    #[error("the appliance refused the pairing token (unknown, already used or expired)")]
    Refused,
    /// The agent's name or certificate is already paired on the appliance.
    #[error("the appliance already has this agent name or certificate paired to something else; unpair it there or pick another name")]
    Conflict,
    /// The appliance is running its maximum number of pairing sessions.
    #[error("the appliance is busy with other pairings; try again")]
    Busy,
    /// The appliance failed (see its log); the token may be used up.
    #[error("the appliance failed while pairing; see its log")]
    ApplianceFailed,
    /// The connection failed for another reason.
    #[error("pairing connection failed: {0}")]
    Connection(ConnectionError),
    /// The appliance answered something that is not the pairing response.
    #[error("the appliance sent an invalid pairing response")]
    BadResponse,
    /// The exchange did not finish within [`PAIRING_SESSION_TIMEOUT`].
    #[error("pairing timed out")]
    Timeout,
    /// The appliance paired us, but pinning it locally failed.
    #[error("the appliance paired this agent, but pinning it here failed: {0}")]
    Pin(#[from] PinError),
}

/// An authenticated connection to a pinned peer. Streams are quinn's own. The transport
/// has used the server's first unidirectional stream for the admission (module doc); the
/// application's streams come after it.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: quinn::Connection,
    /// Invariant: the peer whose pinned fingerprint the connection's certificate has.
    peer: PinnedPeer,
}

impl Connection {
    /// The pinned peer at the other end.
    pub fn peer(&self) -> &PinnedPeer {
        &self.peer
    }

    /// The peer's name.
    pub fn peer_name(&self) -> &PeerName {
        &self.peer.name
    }

    /// The peer's certificate fingerprint.
    pub fn peer_fingerprint(&self) -> Fingerprint {
        self.peer.fingerprint
    }

    /// The peer's current address (it may change: QUIC connections survive NAT rebinding).
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Opens a bidirectional stream (the peer sees it when the first byte arrives).
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        self.inner.open_bi().await
    }

    /// Waits for the peer's next bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        self.inner.accept_bi().await
    }

    /// Opens a unidirectional stream.
    pub async fn open_uni(&self) -> Result<SendStream, ConnectionError> {
        self.inner.open_uni().await
    }

    /// Waits for the peer's next unidirectional stream.
    pub async fn accept_uni(&self) -> Result<RecvStream, ConnectionError> {
        self.inner.accept_uni().await
    }

    /// Closes the connection at once with an application code and a short reason.
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.inner.close(VarInt::from_u32(code), reason);
    }

    /// Waits until the connection is closed, by either side or by a timeout, and says why.
    pub async fn closed(&self) -> ConnectionError {
        self.inner.closed().await
    }

    /// Smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.inner.rtt()
    }

    /// UDP payload bytes this side sent on the connection: frames, QUIC and TLS overhead,
    /// retransmissions — what the link carried.
    pub fn udp_sent_bytes(&self) -> u64 {
        self.inner.stats().udp_tx.bytes
    }

    /// Packets this side declared lost (and sent again) on the connection, and the UDP
    /// datagrams it sent.
    pub fn loss_stats(&self) -> (u64, u64) {
        let stats = self.inner.stats();
        (stats.path.lost_packets, stats.udp_tx.datagrams)
    }
}

fn close(inner: &quinn::Connection, code: CloseCode) {
    inner.close(VarInt::from_u32(code.code()), code.reason());
}

/// The fingerprint of the certificate the peer presented.
fn peer_fingerprint(inner: &quinn::Connection) -> Option<Fingerprint> {
    let identity = inner.peer_identity()?;
    let certificates = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certificates
        .first()
        .map(|certificate| Fingerprint::of_certificate(certificate))
}

/// The ALPN protocol the handshake agreed on.
fn negotiated_alpn(inner: &quinn::Connection) -> Option<Vec<u8>> {
    inner
        .handshake_data()?
        .downcast::<HandshakeData>()
        .ok()?
        .protocol
}

/// Our own certificate, presented whatever the peer asks.
#[derive(Debug)]
struct OwnCertificate(Arc<CertifiedKey>);

impl ResolvesServerCert for OwnCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for OwnCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn server_config(
    identity: &Identity,
    verifier: PinnedClientVerifier,
) -> Result<quinn::ServerConfig, BindError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(OwnCertificate(identity.certified_key())));
    tls.alpn_protocols = vec![ALPN_REPLICATION.to_vec(), ALPN_PAIRING.to_vec()];
    // No resumption and no 0-RTT: every connection presents and proves its certificate
    // afresh, so an unpinned peer cannot ride on an earlier session.
    tls.max_early_data_size = 0;
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let crypto = QuicServerConfig::try_from(tls).map_err(|_| BindError::NoInitialCipherSuite)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

fn client_config(
    identity: &Identity,
    pins: Pins,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, BindError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier::new(pins)))
        .with_client_cert_resolver(Arc::new(OwnCertificate(identity.certified_key())));
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    tls.enable_early_data = false;
    let crypto = QuicClientConfig::try_from(tls).map_err(|_| BindError::NoInitialCipherSuite)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config());
    Ok(config)
}

fn require_runtime() -> Result<(), BindError> {
    tokio::runtime::Handle::try_current()
        .map(|_| ())
        .map_err(|_| BindError::NoRuntime)
}

/// Kernel buffer asked for on each side of a QUIC socket. With the default (about 200 KiB)
/// a receiver busy for a few milliseconds (an appliance syncing its disks on two cores)
/// overflows its socket, and every datagram dropped there is sent again (measured: 14 % more
/// wire bytes than record bytes in `scripts/bench-resync`).
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// Binds a UDP socket at `addr` with [`SOCKET_BUFFER_BYTES`] of kernel buffer each way (or
/// what the system allows: `SO_RCVBUFFORCE` needs CAP_NET_ADMIN, `SO_RCVBUF` is capped by
/// `net.core.rmem_max`).
fn bind_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, BindError> {
    use std::os::fd::AsRawFd;
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| BindError::Io { addr, source })?;
    let size = SOCKET_BUFFER_BYTES as libc::c_int;
    let set = |option: libc::c_int| {
        // SAFETY: a valid socket descriptor, a pointer to a c_int that outlives the call, and
        // its exact size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        rc == 0
    };
    for (forced, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !set(forced) && !set(plain) {
            tracing::warn!(%addr, "could not enlarge a QUIC socket's buffer; bursts may be dropped and sent again");
        }
    }
    Ok(socket)
}

fn bind_client_endpoint(local: SocketAddr) -> Result<quinn::Endpoint, BindError> {
    require_runtime()?;
    let socket = bind_socket(local)?;
    let runtime = quinn::default_runtime().ok_or_else(|| BindError::Io {
        addr: local,
        source: io::Error::other("no async runtime for QUIC"),
    })?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime).map_err(
        |source| BindError::Io {
            addr: local,
            source,
        },
    )
}

async fn connect_inner(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
) -> Result<quinn::Connection, ConnectError> {
    let connecting = endpoint
        .connect_with(config, addr, CERTIFICATE_NAME)
        .map_err(|source| ConnectError::Start { addr, source })?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(inner)) => Ok(inner),
        Ok(Err(source)) => Err(ConnectError::Handshake { addr, source }),
        Err(_) => Err(ConnectError::Timeout { addr }),
    }
}

/// What the server's background tasks share.
#[derive(Debug)]
struct ServerShared {
    trust: Arc<TrustStore>,
    pending: PendingTokens,
    clock: Arc<dyn Clock>,
    pairing_sessions: Arc<Semaphore>,
}

/// The appliance's endpoint: accepts replication connections from pinned agents and serves
/// pairing to holders of a valid token. Handshakes run in background tasks; dropping the
/// server stops accepting.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    accepted: tokio::sync::Mutex<mpsc::Receiver<Connection>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Listens on `listen` with the appliance's `identity`. `trust` holds the pinned agents
    /// (shared: [`TrustStore::reload`] takes effect on the next handshake); `pending` the
    /// outstanding pairing tokens; `clock` decides their expiry. Must run inside a tokio
    /// runtime.
    pub fn bind(
        listen: SocketAddr,
        identity: &Identity,
        trust: Arc<TrustStore>,
        pending: PendingTokens,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BindError> {
        require_runtime()?;
        let verifier = PinnedClientVerifier::new(trust.clone(), pending.clone(), clock.clone());
        let config = server_config(identity, verifier)?;
        // The stateless-reset key is derived from the appliance's identity, so it survives a
        // restart: an agent whose connection the old process held learns at its first packet
        // that the connection is gone (a stateless reset) and reconnects at once, instead of
        // waiting out the idle timeout.
        let reset_key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &identity.derive_secret("cdp 2026 quic stateless reset key v1"),
        );
        let socket = bind_socket(listen)?;
        let runtime = quinn::default_runtime().ok_or_else(|| BindError::Io {
            addr: listen,
            source: io::Error::other("no async runtime for QUIC"),
        })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::new(Arc::new(reset_key)),
            Some(config),
            socket,
            runtime,
        )
        .map_err(|source| BindError::Io {
            addr: listen,
            source,
        })?;
        let shared = Arc::new(ServerShared {
            trust,
            pending,
            clock,
            pairing_sessions: Arc::new(Semaphore::new(PAIRING_SESSIONS_CONCURRENT_MAX)),
        });
        let (sender, receiver) = mpsc::channel(ACCEPT_QUEUE_CONNECTIONS_MAX);
        let driver = tokio::spawn(drive_server(endpoint.clone(), shared, sender));
        Ok(Self {
            endpoint,
            accepted: tokio::sync::Mutex::new(receiver),
            driver,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The next replication connection from a pinned agent; `None` once the server is shut
    /// down. Pairing connections and refused peers never come out of here.
    pub async fn accept(&self) -> Option<Connection> {
        self.accepted.lock().await.recv().await
    }

    /// Closes every connection and stops accepting, then waits for the peers to be told.
    pub async fn shutdown(&self) {
        self.driver.abort();
        self.endpoint
            .close(VarInt::from_u32(CloseCode::Done.code()), b"shutdown");
        self.endpoint.wait_idle().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn drive_server(
    endpoint: quinn::Endpoint,
    shared: Arc<ServerShared>,
    accepted: mpsc::Sender<Connection>,
) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_CONCURRENT_MAX));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let _permit = permit;
            handle_incoming(incoming, &shared, &accepted).await;
        });
    }
}

async fn handle_incoming(
    incoming: quinn::Incoming,
    shared: &ServerShared,
    accepted: &mpsc::Sender<Connection>,
) {
    let remote = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(err) => {
            tracing::debug!(%remote, "connection refused before the handshake: {err}");
            return;
        }
    };
    let inner = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(inner)) => inner,
        // Debug, not info: anyone can cause these, and they must not flood the log.
        Ok(Err(err)) => {
            tracing::debug!(%remote, "handshake failed: {err}");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "handshake timed out");
            return;
        }
    };
    let (Some(alpn), Some(fingerprint)) = (negotiated_alpn(&inner), peer_fingerprint(&inner))
    else {
        close(&inner, CloseCode::ProtocolViolation);
        return;
    };
    if alpn == ALPN_REPLICATION {
        // Looked up again, not trusted from the verifier: the certificate may have passed
        // only because a pairing token is outstanding, or been unpinned since.
        match shared.trust.lookup(&fingerprint) {
            Some(peer) => {
                if let Err(err) = admit(&inner).await {
                    tracing::info!(%remote, "admission failed: {err}");
                    return;
                }
                // An error means the server was dropped; the connection then closes with it.
                let _ = accepted.send(Connection { inner, peer }).await;
            }
            None => {
                tracing::info!(%remote, %fingerprint, "replication connection from an unpaired certificate refused");
                close(&inner, CloseCode::NotPaired);
            }
        }
    } else if alpn == ALPN_PAIRING {
        serve_pairing(inner, fingerprint, shared).await;
    } else {
        close(&inner, CloseCode::ProtocolViolation);
    }
}

/// Tells the client its replication connection is accepted (see the module doc).
async fn admit(inner: &quinn::Connection) -> Result<(), WriteError> {
    let mut admission = inner.open_uni().await?;
    admission.write_all(&ADMITTED).await?;
    // Finishing a stream we just wrote cannot fail unless the connection is gone, in which
    // case the client never uses it.
    let _ = admission.finish();
    Ok(())
}

/// Waits for the server's admission; `Err` carries nothing: the caller reads the close reason.
async fn await_admission(inner: &quinn::Connection) -> Result<(), ()> {
    let mut admission = inner.accept_uni().await.map_err(drop)?;
    let bytes = admission.read_to_end(ADMITTED.len()).await.map_err(drop)?;
    if bytes == ADMITTED {
        Ok(())
    } else {
        Err(())
    }
}

async fn serve_pairing(inner: quinn::Connection, agent: Fingerprint, shared: &ServerShared) {
    let Ok(_session) = shared.pairing_sessions.clone().try_acquire_owned() else {
        close(&inner, CloseCode::Busy);
        return;
    };
    let exchange = pairing_exchange(&inner, agent, shared);
    match tokio::time::timeout(PAIRING_SESSION_TIMEOUT, exchange).await {
        Ok(Ok(())) => {
            // Let the agent read the answer and close first; bounded by the same timeout.
            let _ = tokio::time::timeout(PAIRING_SESSION_TIMEOUT, inner.closed()).await;
            close(&inner, CloseCode::Done);
        }
        Ok(Err(code)) => close(&inner, code),
        Err(_) => close(&inner, CloseCode::ProtocolViolation),
    }
}

/// The appliance's side of pairing: exactly one request on the first bidirectional stream,
/// nothing else before it is answered.
async fn pairing_exchange(
    inner: &quinn::Connection,
    agent: Fingerprint,
    shared: &ServerShared,
) -> Result<(), CloseCode> {
    let (mut send, mut recv) = tokio::select! {
        stream = inner.accept_bi() => stream.map_err(|_| CloseCode::ProtocolViolation)?,
        _ = inner.accept_uni() => return Err(CloseCode::ProtocolViolation),
    };
    let bytes = tokio::select! {
        bytes = recv.read_to_end(PAIR_REQUEST_BYTES_MAX) => bytes.map_err(|err| {
            tracing::warn!(%agent, "pairing request unreadable: {err}");
            CloseCode::ProtocolViolation
        })?,
        _ = inner.accept_uni() => return Err(CloseCode::ProtocolViolation),
        _ = inner.accept_bi() => return Err(CloseCode::ProtocolViolation),
    };
    let request = PairRequest::decode(&bytes).map_err(|err| {
        tracing::warn!(%agent, "invalid pairing request: {err}");
        CloseCode::ProtocolViolation
    })?;
    // Token and trust store files are fsynced: keep that off the async workers.
    let pending = shared.pending.clone();
    let trust = shared.trust.clone();
    let now = shared.clock.now();
    tokio::task::spawn_blocking(move || {
        handle_pair_request(&request, agent, &pending, &trust, now)
    })
    .await
    .map_err(|_| CloseCode::Internal)??;
    send.write_all(&encode_paired_response())
        .await
        .map_err(|_| CloseCode::Internal)?;
    send.finish().map_err(|_| CloseCode::Internal)?;
    Ok(())
}

/// The agent's endpoint: connects to pinned appliances only, presenting `identity`.
#[derive(Debug)]
pub struct Client {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    trust: Arc<TrustStore>,
}

impl Client {
    /// An endpoint bound to `local` (`0.0.0.0:0` or `[::]:0` in production) that accepts
    /// only servers pinned in `trust` (shared: [`TrustStore::reload`] takes effect on the next
    /// connection). Must run inside a tokio runtime.
    pub fn bind(
        local: SocketAddr,
        identity: &Identity,
        trust: Arc<TrustStore>,
    ) -> Result<Self, BindError> {
        let config = client_config(identity, Pins::Store(trust.clone()), ALPN_REPLICATION)?;
        let endpoint = bind_client_endpoint(local)?;
        Ok(Self {
            endpoint,
            config,
            trust,
        })
    }

    /// The same endpoint, its connections sending under `congestion`.
    pub fn with_congestion(mut self, congestion: Congestion) -> Self {
        let mut transport = base_transport_config();
        if congestion == Congestion::Bbr {
            transport
                .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        self.config.transport_config(Arc::new(transport));
        self
    }

    /// Opens a replication connection to `addr`, which must present a pinned certificate
    /// and admit ours.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Connection, ConnectError> {
        let inner = connect_inner(&self.endpoint, self.config.clone(), addr).await?;
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, await_admission(&inner)).await {
            Ok(Ok(())) => {}
            Ok(Err(())) => {
                return Err(match inner.close_reason() {
                    Some(source) => ConnectError::Handshake { addr, source },
                    None => {
                        close(&inner, CloseCode::ProtocolViolation);
                        ConnectError::Admission { addr }
                    }
                })
            }
            Err(_) => {
                close(&inner, CloseCode::ProtocolViolation);
                return Err(ConnectError::Timeout { addr });
            }
        }
        let Some(fingerprint) = peer_fingerprint(&inner) else {
            close(&inner, CloseCode::ProtocolViolation);
            return Err(ConnectError::Handshake {
                addr,
                source: ConnectionError::LocallyClosed,
            });
        };
        match self.trust.lookup(&fingerprint) {
            Some(peer) => Ok(Connection { inner, peer }),
            None => {
                close(&inner, CloseCode::NotPaired);
                Err(ConnectError::NotPinned { addr, fingerprint })
            }
        }
    }

    /// Closes every connection, then waits for the peers to be told.
    pub async fn shutdown(&self) {
        self.endpoint
            .close(VarInt::from_u32(CloseCode::Done.code()), b"shutdown");
        self.endpoint.wait_idle().await;
    }
}

/// The agent's side of pairing (`cdp-agent pair`): connects to the bundle's appliance with
/// the pairing ALPN, accepting only the bundle's fingerprint; presents `identity` and sends
/// the token and the name `agent`; on the appliance's "paired", pins the appliance in
/// `trust` (replacing an earlier appliance of the same name) and returns it.
pub async fn pair_agent(
    bundle: &PairingBundle,
    identity: &Identity,
    agent: &PeerName,
    trust: &TrustStore,
    clock: &dyn Clock,
) -> Result<PinnedPeer, PairError> {
    if bundle.is_expired(clock.now()) {
        return Err(PairError::Expired(bundle.expires_at.as_secs()));
    }
    let (endpoint, inner) = open_pairing_connection(bundle, identity).await?;
    let request = PairRequest {
        token: bundle.token.clone(),
        agent: agent.clone(),
    };
    let exchanged = tokio::time::timeout(
        PAIRING_SESSION_TIMEOUT,
        send_pair_request(&inner, &request.encode()),
    )
    .await
    .unwrap_or(Err(PairError::Timeout));
    close(&inner, CloseCode::Done);
    let _ = tokio::time::timeout(CLOSE_DRAIN_TIMEOUT, endpoint.wait_idle()).await;
    exchanged?;
    let appliance = PinnedPeer {
        name: bundle.appliance.clone(),
        fingerprint: bundle.fingerprint,
        addrs: bundle.addrs.clone(),
    };
    trust.pin(appliance.clone(), OnNameTaken::Replace)?;
    Ok(appliance)
}

/// Connects to the first bundle address that answers with the bundle's certificate.
async fn open_pairing_connection(
    bundle: &PairingBundle,
    identity: &Identity,
) -> Result<(quinn::Endpoint, quinn::Connection), PairError> {
    let config = client_config(identity, Pins::One(bundle.fingerprint), ALPN_PAIRING)?;
    let mut last_error = None;
    for &addr in &bundle.addrs {
        let local = match addr {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let endpoint = bind_client_endpoint(local)?;
        match connect_inner(&endpoint, config.clone(), addr).await {
            // The verifier admitted only the bundle's fingerprint; checked again regardless.
            Ok(inner) if peer_fingerprint(&inner) == Some(bundle.fingerprint) => {
                return Ok((endpoint, inner))
            }
            Ok(inner) => {
                close(&inner, CloseCode::ProtocolViolation);
                return Err(PairError::BadResponse);
            }
            Err(err) => {
                tracing::info!(%addr, "pairing connection failed: {err}");
                last_error = Some(err);
            }
        }
    }
    Err(last_error.map_or(PairError::NoAddrs, PairError::Connect))
}

/// Sends the request bytes on a new bidirectional stream and reads the answer.
async fn send_pair_request(inner: &quinn::Connection, request: &[u8]) -> Result<(), PairError> {
    let result: Result<Vec<u8>, ()> = async {
        let (mut send, mut recv) = inner.open_bi().await.map_err(|_| ())?;
        send.write_all(request).await.map_err(|_| ())?;
        send.finish().map_err(|_| ())?;
        recv.read_to_end(PAIR_RESPONSE_BYTES).await.map_err(|_| ())
    }
    .await;
    match result {
        Ok(response) if is_paired_response(&response) => Ok(()),
        Ok(_) => Err(PairError::BadResponse),
        Err(()) => Err(pair_error_from_close(inner.close_reason())),
    }
}

/// Why the appliance ended the pairing connection, as the agent reports it.
fn pair_error_from_close(reason: Option<ConnectionError>) -> PairError {
    match reason {
        Some(ConnectionError::ApplicationClosed(close)) => {
            match CloseCode::from_code(close.error_code.into_inner()) {
                Some(CloseCode::PairingRefused) => PairError::Refused,
                Some(CloseCode::PairingConflict) => PairError::Conflict,
                Some(CloseCode::Busy) => PairError::Busy,
                Some(CloseCode::Internal) => PairError::ApplianceFailed,
                _ => PairError::Connection(ConnectionError::ApplicationClosed(close)),
            }
        }
        // The appliance refused our certificate in TLS: it has no token outstanding.
        Some(ConnectionError::ConnectionClosed(close))
            if (0x100..=0x1ff).contains(&u64::from(close.error_code)) =>
        {
            PairError::Refused
        }
        Some(other) => PairError::Connection(other),
        None => PairError::BadResponse,
    }
}

#[cfg(test)]
mod tests {
    //! Tests that need what the public API hides: raw bytes on a pairing connection, and a
    //! certificate presented with the wrong key.

    use super::*;
    use crate::bundle::PAIRING_TTL_DEFAULT;
    use crate::clock::{ManualClock, UnixTime};

    struct Appliance {
        _dir: tempfile::TempDir,
        identity: Identity,
        trust: Arc<TrustStore>,
        pending: PendingTokens,
        clock: Arc<ManualClock>,
        server: Server,
    }

    fn appliance() -> Appliance {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity::generate().unwrap();
        let trust = Arc::new(TrustStore::open(dir.path().join("trust")).unwrap());
        let pending = PendingTokens::new(dir.path().join("pairing"));
        let clock = Arc::new(ManualClock::new(UnixTime::since_unix_epoch(
            Duration::from_secs(1_800_000_000),
        )));
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            &identity,
            trust.clone(),
            pending.clone(),
            clock.clone(),
        )
        .unwrap();
        Appliance {
            _dir: dir,
            identity,
            trust,
            pending,
            clock,
            server,
        }
    }

    fn bundle(appliance: &Appliance) -> PairingBundle {
        PairingBundle::create(
            &appliance.identity,
            PeerName::new("dr").unwrap(),
            vec![appliance.server.local_addr().unwrap()],
            PAIRING_TTL_DEFAULT,
            &appliance.pending,
            appliance.clock.as_ref(),
        )
        .unwrap()
    }

    async fn closed_with(inner: &quinn::Connection) -> Option<CloseCode> {
        match inner.closed().await {
            ConnectionError::ApplicationClosed(close) => {
                CloseCode::from_code(close.error_code.into_inner())
            }
            _ => None,
        }
    }

    #[tokio::test]
    async fn garbage_pairing_messages_are_refused_without_pairing() {
        let appliance = appliance();
        let bundle = bundle(&appliance);
        let agent = Identity::generate().unwrap();
        let name = PeerName::new("agent").unwrap();
        let good = PairRequest {
            token: bundle.token.clone(),
            agent: name.clone(),
        }
        .encode();
        let garbage: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"hello appliance".to_vec(),
            vec![0xff; PAIR_REQUEST_BYTES_MAX + 1],
            [&good[..], b"trailing"].concat(),
            good[..good.len() - 1].to_vec(),
            {
                let mut other_version = good.clone();
                other_version[0] = 9;
                other_version
            },
        ];
        for bytes in garbage {
            let (_endpoint, inner) = open_pairing_connection(&bundle, &agent).await.unwrap();
            let (mut send, _recv) = inner.open_bi().await.unwrap();
            send.write_all(&bytes).await.unwrap();
            send.finish().unwrap();
            assert_eq!(
                closed_with(&inner).await,
                Some(CloseCode::ProtocolViolation),
                "{bytes:?}"
            );
        }
        // A unidirectional stream instead of the request.
        let (_endpoint, inner) = open_pairing_connection(&bundle, &agent).await.unwrap();
        let mut uni = inner.open_uni().await.unwrap();
        uni.write_all(&good).await.unwrap();
        uni.finish().unwrap();
        assert_eq!(
            closed_with(&inner).await,
            Some(CloseCode::ProtocolViolation)
        );

        // Nothing was paired, and the token is still good for a real pairing.
        assert!(appliance.trust.peers().is_empty());
        let agent_dir = tempfile::tempdir().unwrap();
        let agent_trust = TrustStore::open(agent_dir.path().join("trust")).unwrap();
        pair_agent(
            &bundle,
            &agent,
            &name,
            &agent_trust,
            appliance.clock.as_ref(),
        )
        .await
        .unwrap();
        assert_eq!(
            appliance
                .trust
                .lookup(&agent.fingerprint())
                .map(|peer| peer.name),
            Some(name)
        );
    }

    #[tokio::test]
    async fn a_pinned_certificate_without_its_key_is_refused() {
        let appliance = appliance();
        let agent = Identity::generate().unwrap();
        let thief = Identity::generate().unwrap();
        appliance
            .trust
            .pin(
                PinnedPeer {
                    name: PeerName::new("agent").unwrap(),
                    fingerprint: agent.fingerprint(),
                    addrs: Vec::new(),
                },
                OnNameTaken::Refuse,
            )
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let trust = Arc::new(TrustStore::open(dir.path().join("trust")).unwrap());
        trust
            .pin(
                PinnedPeer {
                    name: PeerName::new("dr").unwrap(),
                    fingerprint: appliance.identity.fingerprint(),
                    addrs: Vec::new(),
                },
                OnNameTaken::Refuse,
            )
            .unwrap();
        let addr = appliance.server.local_addr().unwrap();

        // The agent's (public) certificate, signed for with the thief's key.
        let forged = Identity::forged(&agent, &thief);
        let client = Client::bind("127.0.0.1:0".parse().unwrap(), &forged, trust.clone()).unwrap();
        let err = client.connect(addr).await.unwrap_err();
        assert!(err.is_certificate_refused(), "{err}");

        // The genuine agent gets through, and is the first connection the server hands out.
        let client = Client::bind("127.0.0.1:0".parse().unwrap(), &agent, trust).unwrap();
        let connection = client.connect(addr).await.unwrap();
        let mut send = connection.open_uni().await.unwrap();
        send.write_all(b"genuine").await.unwrap();
        send.finish().unwrap();
        let accepted = appliance.server.accept().await.unwrap();
        assert_eq!(accepted.peer_fingerprint(), agent.fingerprint());
        let mut recv = accepted.accept_uni().await.unwrap();
        assert_eq!(recv.read_to_end(64).await.unwrap(), b"genuine");
    }

    #[test]
    fn close_reasons_map_to_pairing_errors() {
        let app = |code: CloseCode| {
            Some(ConnectionError::ApplicationClosed(
                quinn::ApplicationClose {
                    error_code: VarInt::from_u32(code.code()),
                    reason: Default::default(),
                },
            ))
        };
        assert!(matches!(
            pair_error_from_close(app(CloseCode::PairingRefused)),
            PairError::Refused
        ));
        assert!(matches!(
            pair_error_from_close(app(CloseCode::PairingConflict)),
            PairError::Conflict
        ));
        assert!(matches!(
            pair_error_from_close(app(CloseCode::Busy)),
            PairError::Busy
        ));
        assert!(matches!(
            pair_error_from_close(app(CloseCode::Internal)),
            PairError::ApplianceFailed
        ));
        assert!(matches!(
            pair_error_from_close(None),
            PairError::BadResponse
        ));
    }
}
