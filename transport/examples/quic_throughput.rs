//! "The machine's QUIC limit": one replication-style connection on loopback between a
//! pinned agent and appliance, one unidirectional stream, N GiB through it, MiB/s printed.
//! The replication benchmark compares its end-to-end figure against this one.
//!
//! Run (release, as the figure in `docs/pairing.md` was made):
//! `cargo run --release -p transport --example quic_throughput -- [GiB, default 1]`
//!
//! It must never leave loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is a failure

use std::sync::Arc;
use std::time::Instant;

use transport::{
    Client, DataDir, Identity, OnNameTaken, PeerName, PinnedPeer, Server, SystemClock, TrustStore,
};

/// Size of each write and read: the order of a replication record batch.
const CHUNK_BYTES: usize = 1024 * 1024;
const MIB: f64 = 1024.0 * 1024.0;

fn pin(trust: &TrustStore, name: &str, identity: &Identity) {
    trust
        .pin(
            PinnedPeer {
                name: PeerName::new(name).unwrap(),
                fingerprint: identity.fingerprint(),
                addrs: Vec::new(),
            },
            OnNameTaken::Refuse,
        )
        .unwrap();
}

#[tokio::main]
async fn main() {
    let gib: u64 = std::env::args()
        .nth(1)
        .map(|arg| arg.parse().expect("the argument is a whole number of GiB"))
        .unwrap_or(1);
    let total_bytes = gib * 1024 * 1024 * 1024;

    let appliance_dir = tempfile::tempdir().unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let appliance_data = DataDir::new(appliance_dir.path());
    let agent_data = DataDir::new(agent_dir.path());
    let appliance = appliance_data.identity().unwrap();
    let agent = agent_data.identity().unwrap();
    let appliance_trust = Arc::new(appliance_data.trust_store().unwrap());
    let agent_trust = Arc::new(agent_data.trust_store().unwrap());
    pin(&appliance_trust, "agent", &agent);
    pin(&agent_trust, "appliance", &appliance);

    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        &appliance,
        appliance_trust,
        appliance_data.pending_tokens(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let connection = server.accept().await.unwrap();
        let mut stream = connection.accept_uni().await.unwrap();
        let mut buffer = vec![0u8; CHUNK_BYTES];
        let mut received_bytes = 0u64;
        let mut started = None;
        while let Some(read) = stream.read(&mut buffer).await.unwrap() {
            started.get_or_insert_with(Instant::now);
            received_bytes += read as u64;
        }
        let elapsed = started.map_or(0.0, |started| started.elapsed().as_secs_f64());
        (received_bytes, elapsed, server)
    });

    let client = Client::bind("127.0.0.1:0".parse().unwrap(), &agent, agent_trust).unwrap();
    let connection = client.connect(addr).await.unwrap();
    let mut stream = connection.open_uni().await.unwrap();
    let chunk: Vec<u8> = (0..CHUNK_BYTES).map(|i| (i % 251) as u8).collect();
    let started = Instant::now();
    let mut sent_bytes = 0u64;
    while sent_bytes < total_bytes {
        stream.write_all(&chunk).await.unwrap();
        sent_bytes += CHUNK_BYTES as u64;
    }
    stream.finish().unwrap();
    let (received_bytes, receive_s, _server) = receiver.await.unwrap();
    let total_s = started.elapsed().as_secs_f64();
    assert_eq!(received_bytes, total_bytes);
    println!(
        "quic loopback, 1 stream, {gib} GiB: {:.0} MiB/s ({:.2} s; receiver-side {:.0} MiB/s; rtt {:?})",
        total_bytes as f64 / MIB / total_s,
        total_s,
        received_bytes as f64 / MIB / receive_s,
        connection.rtt()
    );
    connection.close(0, b"done");
    client.shutdown().await;
}
