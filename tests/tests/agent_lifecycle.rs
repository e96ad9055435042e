//! The `cdp-agent` process itself: `/metrics` counts writes and the journal's head and durable
//! sequence numbers; SIGINT stops it cleanly; a kill -9 after a FLUSH (and after a FUA write)
//! loses nothing acknowledged and the agent restarts on the same journal; garbage and
//! hostile handshakes from a client never stop it (DESIGN §3 invariants 1 and 5).
//!
//! Must never: accept a crash as a clean stop, or pass while the agent has died.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cdp_tests::raw_nbd::read_option_reply;
use cdp_tests::workload::{self, verify_commands, Op, Source};
use cdp_tests::{
    export_to_file, poll_until, Agent, Metrics, Model, QemuIo, Rng, DEFAULT_DISK_BYTES, KIB, MIB,
};

/// A counter or gauge that a fresh agent may not expose before its first event.
fn value_or_zero(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.value(name, labels).unwrap_or(0.0)
}

#[test]
fn metrics_count_writes_and_journal_sequence() -> Result<()> {
    let agent = Agent::one_disk()?;
    let uri = agent.uri("d0");
    let disk = [("disk", "d0")];
    let m0 = agent.metrics()?;
    let writes0 = value_or_zero(&m0, "cdp_disk_writes_total", &disk);
    let head0 = value_or_zero(&m0, "cdp_journal_head_seq", &[]);
    assert_eq!(
        writes0, 0.0,
        "writes counted before any client wrote:\n{}",
        m0.text
    );

    // Twelve single-request writes (all below the client's 32 MiB maximum transfer size).
    const WRITES: u64 = 12;
    let mut io = QemuIo::new(&uri);
    for i in 0..WRITES {
        let len = [512, 4 * KIB, 64 * KIB, MIB][(i % 4) as usize];
        io.push(format!("write -q -P 0x{:02x} {} {len}", i + 1, i * 4 * MIB));
    }
    io.run()?;
    let mut last = String::new();
    let m1 = poll_until(
        "cdp_disk_writes_total reaching the writes made",
        Duration::from_secs(10),
        || {
            let m = agent.metrics()?;
            last.clone_from(&m.text);
            Ok((value_or_zero(&m, "cdp_disk_writes_total", &disk) >= WRITES as f64).then_some(m))
        },
    )
    .with_context(|| format!("last /metrics:\n{last}"))?;
    assert_eq!(
        m1.value("cdp_disk_writes_total", &disk)?,
        WRITES as f64,
        "each NBD write counted once:\n{}",
        m1.text
    );
    let head1 = m1.value("cdp_journal_head_seq", &[])?;
    ensure!(
        head1 - head0 >= WRITES as f64,
        "journal head moved by {} for {WRITES} writes:\n{}",
        head1 - head0,
        m1.text
    );

    // An acknowledged FLUSH makes every earlier record durable.
    QemuIo::new(&uri).cmd("flush").run()?;
    let m2 = agent.metrics()?;
    let durable2 = m2.value("cdp_journal_durable_seq", &[])?;
    let head2 = m2.value("cdp_journal_head_seq", &[])?;
    ensure!(
        durable2 >= head1 && durable2 <= head2,
        "after FLUSH: durable seq {durable2}, head before flush {head1}, head now {head2}:\n{}",
        m2.text
    );
    agent.finish()?;
    Ok(())
}

#[test]
fn sigint_stops_the_agent_cleanly() -> Result<()> {
    let mut agent = Agent::one_disk()?;
    QemuIo::new(&agent.uri("d0"))
        .cmd("write -q -P 0x5c 1M 1M")
        .run()?;
    agent.stop_with(libc::SIGINT)?;
    let mut model = Model::zeroed(DEFAULT_DISK_BYTES);
    model.fill(MIB, MIB, 0x5c);
    let replayed = agent.replay("d0")?;
    model.assert_matches("journal replayed after SIGINT", &replayed)?;
    agent.verify_replay()?;
    Ok(())
}

#[test]
fn kill_9_after_flush_and_fua_loses_nothing_acknowledged() -> Result<()> {
    let mut rng = Rng::for_test("kill_9_after_flush_and_fua_loses_nothing_acknowledged");
    let mut agent = Agent::one_disk()?;
    let uri = agent.uri("d0");
    let source = Source::create(&mut rng, &agent.dir().join("source.bin"))?;
    // Random work ending in a FLUSH, then one FUA write the FLUSH does not cover.
    let mut ops = workload::random_ops(&mut rng, 0, DEFAULT_DISK_BYTES, 80);
    ops.push(Op::Write {
        offset: 40 * MIB + 512,
        len: 68 * KIB,
        byte: 0xfa,
        fua: true,
    });
    let mut model = Model::zeroed(DEFAULT_DISK_BYTES);
    workload::apply(&mut model, &ops, Some(&source));
    workload::script(&uri, &ops, Some(&source)).run()?;

    agent.kill();
    ensure!(!agent.is_running(), "the agent survived SIGKILL");
    let replayed = agent.replay("d0")?;
    model.assert_matches("journal replayed after kill -9", &replayed)?;
    agent.verify_replay()?;

    // The agent comes back on the same journal and serves the same content.
    agent.restart().context("restarting after kill -9")?;
    let uri = agent.uri("d0");
    let mut io = QemuIo::new(&uri);
    for c in verify_commands(&model, 0, DEFAULT_DISK_BYTES, 4 * KIB) {
        io.push(c);
    }
    io.run()?;
    let more = [
        Op::Write {
            offset: 7 * MIB,
            len: 3 * MIB,
            byte: 0x3e,
            fua: false,
        },
        Op::Flush,
    ];
    workload::apply(&mut model, &more, None);
    workload::script(&uri, &more, None).run()?;
    let copy = agent.dir().join("export.img");
    export_to_file(&uri, &copy)?;
    model.assert_matches("export after restart", &copy)?;
    agent.finish()?;
    Ok(())
}

/// NBD fixed-newstyle greeting: "NBDMAGIC", "IHAVEOPT", 16-bit handshake flags.
const GREETING_BYTES: usize = 18;

fn connect(agent: &Agent) -> Result<UnixStream> {
    let s = UnixStream::connect(&agent.listeners().nbd_unix[0])?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

fn read_greeting(s: &mut UnixStream) -> Result<()> {
    let mut g = [0u8; GREETING_BYTES];
    s.read_exact(&mut g).context("reading the NBD greeting")?;
    ensure!(
        &g[..8] == b"NBDMAGIC" && &g[8..16] == b"IHAVEOPT",
        "not a fixed-newstyle greeting: {g:02x?}"
    );
    let flags = u16::from_be_bytes([g[16], g[17]]);
    ensure!(
        flags & 1 == 1,
        "server does not set NBD_FLAG_FIXED_NEWSTYLE: flags {flags:#x}"
    );
    Ok(())
}

/// Reads until the server closes the connection or stops sending; never waits unbounded.
fn drain_until_closed(s: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    for _ in 0..1024 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[test]
fn garbage_and_hostile_handshakes_never_stop_the_agent() -> Result<()> {
    let mut rng = Rng::for_test("garbage_and_hostile_handshakes_never_stop_the_agent");
    let mut agent = Agent::one_disk()?;

    // Random bytes instead of client flags.
    for _ in 0..8 {
        let mut s = connect(&agent)?;
        read_greeting(&mut s)?;
        let mut junk = vec![0u8; rng.range(1, 64 * 1024) as usize];
        rng.fill(&mut junk);
        let _ = s.write_all(&junk);
        drain_until_closed(&mut s);
    }
    // Hang up before reading the greeting.
    drop(connect(&agent)?);
    // Valid client flags, then an option claiming 4 GiB of data: must not be allocated.
    {
        let mut s = connect(&agent)?;
        read_greeting(&mut s)?;
        let mut msg = Vec::new();
        msg.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
        msg.extend_from_slice(b"IHAVEOPT");
        msg.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        msg.extend_from_slice(&u32::MAX.to_be_bytes());
        msg.extend_from_slice(&[0u8; 64]);
        let _ = s.write_all(&msg);
        drain_until_closed(&mut s);
    }
    // Valid flags, then an unknown option and a NBD_OPT_GO for an export that does not exist:
    // each must get an error reply, not a dropped connection.
    {
        let mut s = connect(&agent)?;
        read_greeting(&mut s)?;
        let mut msg = Vec::new();
        msg.extend_from_slice(&3u32.to_be_bytes());
        msg.extend_from_slice(b"IHAVEOPT");
        msg.extend_from_slice(&0x4242u32.to_be_bytes());
        msg.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&msg)?;
        let (option, kind, _) = read_option_reply(&mut s)?;
        let reply = (option, kind);
        ensure!(
            reply.0 == 0x4242 && reply.1 & 0x8000_0000 != 0,
            "unknown option got {reply:x?}, want an error reply"
        );
        ensure!(
            reply.1 == 0x8000_0001,
            "unknown option got reply type {:#x}, want NBD_REP_ERR_UNSUP",
            reply.1
        );
        let mut msg = Vec::new();
        msg.extend_from_slice(b"IHAVEOPT");
        msg.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        msg.extend_from_slice(&10u32.to_be_bytes());
        msg.extend_from_slice(&4u32.to_be_bytes());
        msg.extend_from_slice(b"nope");
        msg.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&msg)?;
        let (option, kind, _) = read_option_reply(&mut s)?;
        let reply = (option, kind);
        ensure!(
            reply == (7, 0x8000_0006),
            "NBD_OPT_GO for a missing export got {reply:x?}, want NBD_REP_ERR_UNKNOWN"
        );
    }
    ensure!(
        agent.is_running(),
        "the agent died on client garbage\n{}",
        agent.diagnostics()
    );

    // And it still serves.
    let uri = agent.uri("d0");
    QemuIo::new(&uri)
        .cmd("write -q -P 0x42 0 64k")
        .cmd("flush")
        .cmd("read -q -P 0x42 0 64k")
        .run()?;
    agent.finish()?;
    Ok(())
}
