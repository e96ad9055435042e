//! End-to-end tests of pairing and the pinned QUIC link: a real appliance [`Server`] and real
//! agents on loopback, files in temporary data directories, time from a manual clock.
//! Each refusal test also proves the server's application saw nothing: after the refused
//! attempt a genuine agent connects, and it must be the first connection `accept` returns.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use transport::{
    pair_agent, Client, Clock, CloseCode, Connection, DataDir, Identity, ManualClock, OnNameTaken,
    PairError, PairingBundle, PeerName, PinnedPeer, Server, TrustStore, UnixTime,
    PAIRING_TTL_DEFAULT,
};

const LOOPBACK: &str = "127.0.0.1:0";

/// The appliance: its data directory, stores and a running server.
struct Appliance {
    _dir: tempfile::TempDir,
    data: DataDir,
    identity: Identity,
    trust: Arc<TrustStore>,
    clock: Arc<ManualClock>,
    server: Server,
}

impl Appliance {
    fn start() -> Self {
        Self::start_on(LOOPBACK)
    }

    fn start_on(listen: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let identity = data.identity().unwrap();
        let trust = Arc::new(data.trust_store().unwrap());
        let clock = Arc::new(ManualClock::new(UnixTime::since_unix_epoch(
            Duration::from_secs(1_800_000_000),
        )));
        let server = Server::bind(
            listen.parse().unwrap(),
            &identity,
            trust.clone(),
            data.pending_tokens(),
            clock.clone(),
        )
        .unwrap();
        Self {
            _dir: dir,
            data,
            identity,
            trust,
            clock,
            server,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr().unwrap()
    }

    /// `cdp-receiver pair`: a bundle as the operator receives it, as text.
    fn bundle_text(&self, ttl: Duration) -> String {
        PairingBundle::create(
            &self.identity,
            PeerName::new("dr-site").unwrap(),
            vec![self.addr()],
            ttl,
            &self.data.pending_tokens(),
            self.clock.as_ref(),
        )
        .unwrap()
        .encode()
    }

    fn pinned_names(&self) -> Vec<String> {
        self.trust
            .peers()
            .into_iter()
            .map(|peer| peer.name.to_string())
            .collect()
    }
}

/// An agent: its own data directory, identity and trust store.
struct Agent {
    _dir: tempfile::TempDir,
    name: PeerName,
    identity: Identity,
    trust: Arc<TrustStore>,
}

impl Agent {
    fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        Self {
            name: PeerName::new(name).unwrap(),
            identity: data.identity().unwrap(),
            trust: Arc::new(data.trust_store().unwrap()),
            _dir: dir,
        }
    }

    /// `cdp-agent pair --bundle FILE`, at the appliance's time.
    async fn pair(&self, bundle_text: &str, clock: &dyn Clock) -> Result<PinnedPeer, PairError> {
        let bundle = PairingBundle::decode(bundle_text.as_bytes()).unwrap();
        pair_agent(&bundle, &self.identity, &self.name, &self.trust, clock).await
    }

    /// Pins `appliance` directly, as if paired earlier: for agents the appliance never paired.
    fn trust_without_pairing(&self, appliance: &Appliance) {
        self.trust
            .pin(
                PinnedPeer {
                    name: PeerName::new("dr-site").unwrap(),
                    fingerprint: appliance.identity.fingerprint(),
                    addrs: vec![appliance.addr()],
                },
                OnNameTaken::Refuse,
            )
            .unwrap();
    }

    fn client(&self) -> Client {
        Client::bind(
            LOOPBACK.parse().unwrap(),
            &self.identity,
            self.trust.clone(),
        )
        .unwrap()
    }
}

/// Pairs a fresh agent named `expected`, connects it, and asserts it is the next connection
/// the appliance's application receives, i.e. nothing from an earlier refused peer got there
/// first.
async fn assert_first_accepted_is(appliance: &Appliance, expected: &str) {
    let agent = Agent::new(expected);
    agent
        .pair(
            &appliance.bundle_text(PAIRING_TTL_DEFAULT),
            appliance.clock.as_ref(),
        )
        .await
        .unwrap();
    let client = agent.client();
    let _to_appliance: Connection = client.connect(appliance.addr()).await.unwrap();
    let to_agent = appliance.server.accept().await.unwrap();
    assert_eq!(to_agent.peer_name().as_str(), expected);
    assert_eq!(to_agent.peer_fingerprint(), agent.identity.fingerprint());
}

#[tokio::test]
async fn pairing_then_replication_exchanges_bytes_both_ways() {
    let appliance = Appliance::start();
    let agent = Agent::new("agent-1");
    let bundle = appliance.bundle_text(PAIRING_TTL_DEFAULT);

    let pinned = agent.pair(&bundle, appliance.clock.as_ref()).await.unwrap();
    // Each side pinned the other, in memory and on disk.
    assert_eq!(pinned.fingerprint, appliance.identity.fingerprint());
    assert_eq!(pinned.addrs, vec![appliance.addr()]);
    assert_eq!(agent.trust.peers(), vec![pinned.clone()]);
    let on_disk = TrustStore::open(appliance.data.trust_path()).unwrap();
    assert_eq!(
        on_disk
            .lookup(&agent.identity.fingerprint())
            .map(|peer| peer.name),
        Some(agent.name.clone())
    );
    assert!(!appliance
        .data
        .pending_tokens()
        .outstanding(appliance.clock.now()));

    // Replication: the agent connects with what pairing stored, bytes flow both ways.
    let client = agent.client();
    let to_appliance = client.connect(pinned.addrs[0]).await.unwrap();
    assert_eq!(to_appliance.peer_name().as_str(), "dr-site");
    assert_eq!(
        to_appliance.peer_fingerprint(),
        appliance.identity.fingerprint()
    );
    let to_agent = appliance.server.accept().await.unwrap();
    assert_eq!(to_agent.peer_name(), &agent.name);
    assert_eq!(to_agent.peer_fingerprint(), agent.identity.fingerprint());

    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut send, mut recv) = to_appliance.open_bi().await.unwrap();
    send.write_all(&payload).await.unwrap();
    send.finish().unwrap();
    let (mut reply, mut request) = to_agent.accept_bi().await.unwrap();
    let received = request.read_to_end(2_000_000).await.unwrap();
    assert_eq!(blake3::hash(&received), blake3::hash(&payload));
    reply.write_all(b"ack 1000000").await.unwrap();
    reply.finish().unwrap();
    assert_eq!(recv.read_to_end(64).await.unwrap(), b"ack 1000000");

    // The appliance's side may open streams too.
    let mut push = to_agent.open_uni().await.unwrap();
    push.write_all(b"from the appliance").await.unwrap();
    push.finish().unwrap();
    let mut pushed = to_appliance.accept_uni().await.unwrap();
    assert_eq!(pushed.read_to_end(64).await.unwrap(), b"from the appliance");

    // The pairing survives a restart of the appliance: a new server from the same files.
    appliance.server.shutdown().await;
    let restarted = Server::bind(
        LOOPBACK.parse().unwrap(),
        &appliance.data.identity().unwrap(),
        Arc::new(appliance.data.trust_store().unwrap()),
        appliance.data.pending_tokens(),
        appliance.clock.clone(),
    )
    .unwrap();
    let again = client
        .connect(restarted.local_addr().unwrap())
        .await
        .unwrap();
    assert_eq!(again.peer_name().as_str(), "dr-site");
    assert_eq!(restarted.accept().await.unwrap().peer_name(), &agent.name);
}

#[tokio::test]
async fn an_unpaired_agent_is_refused_at_the_handshake() {
    let appliance = Appliance::start();
    let stranger = Agent::new("stranger");
    // It knows the appliance's (public) fingerprint, but was never paired.
    stranger.trust_without_pairing(&appliance);

    let err = stranger
        .client()
        .connect(appliance.addr())
        .await
        .unwrap_err();
    // A TLS alert: the handshake itself failed.
    assert!(err.is_certificate_refused(), "{err}");
    assert_eq!(err.close_code(), None, "{err}");

    assert!(appliance.pinned_names().is_empty());
    assert_first_accepted_is(&appliance, "genuine").await;
}

#[tokio::test]
async fn an_unpaired_agent_is_refused_even_while_a_pairing_token_is_outstanding() {
    let appliance = Appliance::start();
    // Outstanding tokens let unknown certificates finish TLS, for the pairing ALPN's sake.
    let _bundle = appliance.bundle_text(PAIRING_TTL_DEFAULT);
    let stranger = Agent::new("stranger");
    stranger.trust_without_pairing(&appliance);

    let err = stranger
        .client()
        .connect(appliance.addr())
        .await
        .unwrap_err();
    // TLS passed (a token is outstanding), but the connection was closed before admission.
    assert!(err.is_certificate_refused(), "{err}");
    assert_eq!(err.close_code(), Some(CloseCode::NotPaired), "{err}");

    assert!(appliance.pinned_names().is_empty());
    assert_first_accepted_is(&appliance, "genuine").await;
}

#[tokio::test]
async fn an_agent_presenting_another_certificate_than_the_pinned_one_is_refused() {
    let appliance = Appliance::start();
    let agent = Agent::new("agent-1");
    agent
        .pair(
            &appliance.bundle_text(PAIRING_TTL_DEFAULT),
            appliance.clock.as_ref(),
        )
        .await
        .unwrap();
    // Same name, same trust in the appliance, different certificate (a reinstalled or
    // impersonating agent).
    let impostor = Agent::new("agent-1");
    impostor.trust_without_pairing(&appliance);
    assert_ne!(
        impostor.identity.fingerprint(),
        agent.identity.fingerprint()
    );

    let err = impostor
        .client()
        .connect(appliance.addr())
        .await
        .unwrap_err();
    assert!(err.is_certificate_refused(), "{err}");

    assert_eq!(appliance.pinned_names(), vec!["agent-1"]);
    assert_first_accepted_is(&appliance, "genuine").await;
}

#[tokio::test]
async fn the_agent_refuses_an_appliance_whose_fingerprint_differs_from_the_bundle() {
    let appliance = Appliance::start();
    let agent = Agent::new("agent-1");
    let mut bundle =
        PairingBundle::decode(appliance.bundle_text(PAIRING_TTL_DEFAULT).as_bytes()).unwrap();
    // The bundle names another certificate than the one at the address: a man in the middle,
    // or the wrong appliance.
    bundle.fingerprint = Identity::generate().unwrap().fingerprint();

    let err = pair_agent(
        &bundle,
        &agent.identity,
        &agent.name,
        &agent.trust,
        appliance.clock.as_ref(),
    )
    .await
    .unwrap_err();
    match &err {
        PairError::Connect(connect) => assert!(connect.is_certificate_refused(), "{err}"),
        other => panic!("expected a refused certificate, got {other}"),
    }

    // The token never left the agent: the appliance still holds it, and nobody pinned anyone.
    assert!(agent.trust.peers().is_empty());
    assert!(appliance.pinned_names().is_empty());
    assert!(appliance
        .data
        .pending_tokens()
        .outstanding(appliance.clock.now()));
}

#[tokio::test]
async fn a_pairing_token_is_single_use() {
    let appliance = Appliance::start();
    let bundle = appliance.bundle_text(PAIRING_TTL_DEFAULT);
    let first = Agent::new("agent-1");
    let second = Agent::new("agent-2");
    // A second bundle keeps a token outstanding, so the reuse is refused by the token check
    // itself rather than already in TLS.
    let _other = appliance.bundle_text(PAIRING_TTL_DEFAULT);

    first.pair(&bundle, appliance.clock.as_ref()).await.unwrap();
    let err = second
        .pair(&bundle, appliance.clock.as_ref())
        .await
        .unwrap_err();
    assert!(matches!(err, PairError::Refused), "{err}");
    // The first agent, re-pairing with the used bundle, is refused as well.
    let err = first
        .pair(&bundle, appliance.clock.as_ref())
        .await
        .unwrap_err();
    assert!(matches!(err, PairError::Refused), "{err}");

    assert_eq!(appliance.pinned_names(), vec!["agent-1"]);
    assert!(second.trust.peers().is_empty());
}

#[tokio::test]
async fn a_pairing_token_expires() {
    let appliance = Appliance::start();
    let created = appliance.clock.now();
    let short = appliance.bundle_text(Duration::from_secs(60));
    let long = appliance.bundle_text(Duration::from_secs(3600));
    let agent = Agent::new("agent-1");

    appliance.clock.advance(Duration::from_secs(60));

    // The agent sees the expiry itself and does not even connect.
    let err = agent
        .pair(&short, appliance.clock.as_ref())
        .await
        .unwrap_err();
    assert!(matches!(err, PairError::Expired(_)), "{err}");

    // An agent whose clock is behind still sends it; the appliance refuses it.
    let behind = ManualClock::new(created);
    let err = agent.pair(&short, &behind).await.unwrap_err();
    assert!(matches!(err, PairError::Refused), "{err}");
    assert!(appliance.pinned_names().is_empty());

    // Once every token has expired, unknown certificates are refused in TLS already.
    appliance.clock.advance(Duration::from_secs(3600));
    let err = agent.pair(&long, &behind).await.unwrap_err();
    assert!(matches!(err, PairError::Refused), "{err}");
    assert!(appliance.pinned_names().is_empty());
    assert!(agent.trust.peers().is_empty());
}

#[tokio::test]
async fn trust_store_reload_takes_effect_without_restarting_the_server() {
    let appliance = Appliance::start();
    let agent = Agent::new("agent-1");
    agent.trust_without_pairing(&appliance);
    let client = agent.client();

    // Another process (an operator's CLI) pins the agent in the same file.
    let cli = TrustStore::open(appliance.data.trust_path()).unwrap();
    cli.pin(
        PinnedPeer {
            name: agent.name.clone(),
            fingerprint: agent.identity.fingerprint(),
            addrs: Vec::new(),
        },
        OnNameTaken::Refuse,
    )
    .unwrap();
    let err = client.connect(appliance.addr()).await.unwrap_err();
    assert!(err.is_certificate_refused(), "not reloaded yet: {err}");

    appliance.trust.reload().unwrap();
    let connection = client.connect(appliance.addr()).await.unwrap();
    assert_eq!(
        appliance.server.accept().await.unwrap().peer_name(),
        &agent.name
    );
    drop(connection);

    // And unpinned again.
    assert!(cli.unpin(&agent.name).unwrap());
    appliance.trust.reload().unwrap();
    let err = client.connect(appliance.addr()).await.unwrap_err();
    assert!(err.is_certificate_refused(), "{err}");
}

#[tokio::test]
async fn a_garbage_bundle_is_refused_with_a_clear_error() {
    let appliance = Appliance::start();
    let text = appliance.bundle_text(PAIRING_TTL_DEFAULT);
    let check = |bytes: &[u8], expected: &str| {
        let err = PairingBundle::decode(bytes).unwrap_err();
        assert_eq!(err.to_string(), expected);
    };
    check(
        b"\x00\x01garbage",
        "not a cdp pairing bundle: it must start with `cdp-pairing-bundle v1`",
    );
    check(
        &text.as_bytes()[..text.len() - 30],
        "pairing bundle is truncated: its last line must be `check <16 hex digits>`",
    );
    let flipped = text.replacen("addr 127.0.0.1", "addr 127.0.0.2", 1);
    check(
        flipped.as_bytes(),
        "pairing bundle is damaged: its check does not match its contents; copy it again",
    );
}

#[tokio::test]
async fn pairing_and_replication_work_over_ipv6_loopback() {
    let appliance = Appliance::start_on("[::1]:0");
    let agent = Agent::new("agent-6");
    let pinned = agent
        .pair(
            &appliance.bundle_text(PAIRING_TTL_DEFAULT),
            appliance.clock.as_ref(),
        )
        .await
        .unwrap();
    assert!(pinned.addrs[0].is_ipv6());
    // A dual-stack agent endpoint, as in production.
    let client = Client::bind(
        "[::]:0".parse().unwrap(),
        &agent.identity,
        agent.trust.clone(),
    )
    .unwrap();
    let to_appliance = client.connect(pinned.addrs[0]).await.unwrap();
    let to_agent = appliance.server.accept().await.unwrap();
    assert_eq!(to_agent.peer_name(), &agent.name);
    let mut send = to_appliance.open_uni().await.unwrap();
    send.write_all(b"over ipv6").await.unwrap();
    send.finish().unwrap();
    let mut recv = to_agent.accept_uni().await.unwrap();
    assert_eq!(recv.read_to_end(64).await.unwrap(), b"over ipv6");
}
